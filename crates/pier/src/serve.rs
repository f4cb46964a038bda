//! `pier serve`: load configuration, open the stores, recover upload sessions, listen, and shut
//! down gracefully on SIGTERM or SIGINT.

use std::sync::Arc;

use anyhow::Context;
use pier_registry::{Limits, Registry};
use pier_server::AppState;
use pier_store::{FsBlobStore, RedbMetaStore};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use crate::ServeArgs;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    init_logging(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config))
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("PIER_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .context("invalid log_level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

async fn serve(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let blobs = FsBlobStore::open(&config.data_dir)
        .await
        .context("cannot open the blob store")?;
    let db_path = config.data_dir.join("meta.redb");
    let meta = RedbMetaStore::open(&db_path).with_context(|| {
        format!(
            "cannot open the metadata database {} (is another pier using this data directory?)",
            db_path.display()
        )
    })?;
    let limits = Limits {
        max_manifest_bytes: config.registry.max_manifest_size.0,
        max_blob_bytes: config.registry.max_blob_size.map(|s| s.0),
    };
    let registry = Arc::new(Registry::new(blobs, Arc::new(meta), limits));
    let recovery = registry
        .uploads()
        .recover()
        .await
        .context("cannot recover upload sessions")?;
    tracing::info!(
        resumable = recovery.resumable,
        dropped_records = recovery.dropped_records,
        dropped_buffers = recovery.dropped_buffers,
        "upload sessions recovered"
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "pier is serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut stopped = stop_rx.clone();
    let server = tokio::spawn(pier_server::serve(
        listener,
        AppState::new(registry),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let signal = shutdown_signal().await;
    tracing::info!(
        signal,
        grace_s = config.shutdown_grace.as_secs(),
        "shutting down; finishing in-flight requests"
    );
    let _ = stop_tx.send(true);
    match tokio::time::timeout(config.shutdown_grace, server).await {
        Ok(joined) => joined
            .context("server task failed")?
            .context("server failed")?,
        Err(_) => tracing::warn!("grace period over; exiting with requests still in flight"),
    }
    drop(stop_rx);
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
