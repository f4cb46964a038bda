//! `pier serve`: load configuration, open the stores, recover upload sessions, listen, and shut
//! down gracefully on SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use pier_peer::tls::CertFiles;
use pier_registry::{Limits, Registry, UploadCaps};
use pier_server::AppState;
use pier_store::{FsBlobStore, PgMetaStore, RedbMetaStore, S3BlobStore, S3Options, Space};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use std::time::Duration;

use pier_mirror::metrics::MirrorMetrics;
use pier_mirror::{FillPolicy, Mirror, UpstreamEntry};
use pier_server::metrics::Metrics;
use pier_store::{BlobStore, MetaStore};
use pier_upstream::Upstream;

use crate::config::{
    BlobBackend, ClusterConfig, Config, LogFormat, MetaBackend, ServerConfig, UpstreamConfig,
};
use crate::ServeArgs;
use pier_cluster::membership::{Membership, MembershipConfig};
use pier_cluster::{ClusterSecret, MemberState};
use pier_server::conn::ConnLimits;
use pier_server::metrics::StateLabels;

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
    config.mirror.hosted.extend(args.hosted.iter().cloned());
    let c = &mut config.cluster;
    if args.node_name.is_some() {
        c.node_name = args.node_name.clone();
    }
    if args.zone.is_some() {
        c.zone = args.zone.clone();
    }
    if let Some(addr) = args.peer_listen {
        c.peer_listen = addr;
    }
    if args.advertise.is_some() {
        c.advertise = args.advertise.clone();
    }
    c.join
        .extend(args.join.iter().filter(|j| !j.is_empty()).cloned());
    if args.cluster_secret_file.is_some() {
        c.cluster_secret_file = args.cluster_secret_file.clone();
    }
    if let Some(r) = args.replicas {
        c.replicas = r;
    }
    if args.no_swarm {
        c.swarm = false;
    }
    for (flag, key) in [
        (&args.peer_tls_cert, &mut c.peer_tls_cert),
        (&args.peer_tls_key, &mut c.peer_tls_key),
        (&args.peer_tls_ca, &mut c.peer_tls_ca),
    ] {
        if flag.is_some() {
            *key = flag.clone();
        }
    }
    for (flag, key) in [
        (&args.tls_cert, &mut config.tls.cert),
        (&args.tls_key, &mut config.tls.key),
        (&args.tls_client_ca, &mut config.tls.client_ca),
    ] {
        if flag.is_some() {
            *key = flag.clone();
        }
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    if let Some(h) = &args.htpasswd {
        config.auth.get_or_insert_with(Default::default).htpasswd = Some(h.clone());
    }
    let flag_upstreams = args
        .upstream
        .iter()
        .map(|f| UpstreamConfig::from_flag(f))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let upstreams = config.effective_upstreams(&flag_upstreams)?;
    init_logging(&config)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(serve(config, upstreams))
}

fn init_logging(config: &Config) -> anyhow::Result<()> {
    let filter = EnvFilter::try_from_env("PIER_LOG")
        .or_else(|_| EnvFilter::try_new(&config.log_level))
        .context("invalid log_level")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// The blob store `[storage] blobs` names.
async fn open_blobs(config: &Config, space: &Arc<Space>) -> anyhow::Result<Arc<dyn BlobStore>> {
    Ok(match config.storage.blobs {
        BlobBackend::Fs => FsBlobStore::open_with(&config.data_dir, Some(space.clone()))
            .await
            .context("cannot open the blob store")?,
        BlobBackend::S3 => {
            let s3 = config.storage.s3.as_ref().ok_or_else(|| {
                anyhow::anyhow!("storage.blobs = \"s3\" needs a [storage.s3] table")
            })?;
            let options = S3Options {
                bucket: s3.bucket.clone(),
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                path_style: s3.path_style,
                prefix: s3.prefix.clone(),
                access_key_id: s3.access_key_id.clone(),
                secret_access_key: s3.secret_access_key.clone(),
                session_token: s3.session_token.clone(),
                redirect: s3
                    .redirect
                    .then(|| std::time::Duration::from_secs(s3.redirect_ttl)),
            };
            S3BlobStore::open(options, config.data_dir.join("spool"))
                .await
                .with_context(|| format!("cannot open the S3 bucket {}", s3.bucket))?
        }
    })
}

async fn serve(config: Config, upstreams: Vec<UpstreamConfig>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let space = Arc::new(Space::new(
        &config.data_dir,
        config.storage.min_free_space.0,
    ));
    let blobs = open_blobs(&config, &space).await?;
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
    // One durable job queue for every kind of background work (replication to owners now).
    let job_store: Arc<dyn pier_store::JobStore> = Arc::new(meta.clone());
    let import_log: Arc<dyn pier_store::ImportLog> = Arc::new(meta.clone());
    // The job queue and the import log stay in this node's redb in every mode; repositories,
    // tags, manifests, uploads and pins move to PostgreSQL when `meta = "postgres"`.
    let (meta, pins): (Arc<dyn MetaStore>, Arc<dyn pier_store::PinStore>) =
        match config.storage.meta {
            MetaBackend::Redb => (Arc::new(meta.clone()), Arc::new(meta)),
            MetaBackend::Postgres => {
                let pg = config.storage.postgres.as_ref().ok_or_else(|| {
                    anyhow::anyhow!("storage.meta = \"postgres\" needs a [storage.postgres] table")
                })?;
                let store = PgMetaStore::connect(&pg.url)
                    .await
                    .context("cannot open the PostgreSQL metadata database")?;
                (Arc::new(store.clone()), Arc::new(store))
            }
        };
    let caps = UploadCaps {
        total: config.registry.max_upload_sessions,
        per_client: config.registry.max_upload_sessions_per_client,
    };
    let registry =
        Arc::new(Registry::new(blobs.clone(), meta.clone(), limits).with_upload_caps(caps));
    let (metrics, (mirror_metrics, peer_metrics, sync_metrics)) = Metrics::new_with(|r| {
        (
            Arc::new(MirrorMetrics::new(r)),
            Arc::new(pier_peer::metrics::PeerMetrics::new(r)),
            Arc::new(pier_sync::metrics::SyncMetrics::new(r)),
        )
    });
    let mut entries = Vec::new();
    for u in &upstreams {
        let mut c = pier_upstream::UpstreamConfig::new(u.name.clone(), u.endpoints.clone());
        c.username = u.username.clone();
        c.password = u.password.clone();
        c.timeouts = pier_upstream::Timeouts {
            connect: Duration::from_secs(config.mirror.upstream_connect_timeout.max(1)),
            first_byte: Duration::from_secs(config.mirror.upstream_first_byte_timeout.max(1)),
            idle: Duration::from_secs(config.mirror.upstream_idle_timeout.max(1)),
        };
        for e in &u.endpoints {
            mirror_metrics.endpoint_known(&u.name, e.trim_end_matches('/'));
        }
        let client = Upstream::new(c, mirror_metrics.clone())
            .map_err(|e| anyhow::anyhow!("upstream {}: {e}", u.name))?;
        entries.push(UpstreamEntry {
            client,
            tag_ttl: Duration::from_secs(u.tag_ttl.unwrap_or(config.mirror.tag_ttl)),
            allow: u.allow.clone(),
            deny: u.deny.clone(),
            private: u.private,
            private_check_ttl: Duration::from_secs(u.private_check_ttl),
        });
    }
    let default_upstream = Some(config.mirror.default_upstream.clone()).filter(|d| !d.is_empty());
    // Where a push lands is the first surprise of a new registry: say it at start.
    let hosted_globs = if config.mirror.hosted.is_empty() {
        "none declared".to_string()
    } else {
        config.mirror.hosted.join(",")
    };
    match &default_upstream {
        Some(d) => {
            // Docker Hub alone respells single names (`myapp` is its `library/myapp`).
            let single = if d == "docker.io" {
                " and single names (myapp)"
            } else {
                ""
            };
            tracing::info!(
                hosted = %hosted_globs,
                default_upstream = %d,
                "pushes: accepted into hosted namespaces ({hosted_globs}){single}; other names \
                 without a registry prefix (team/app) are {d}'s and refused unless hosted \
                 (--hosted 'team/**' or [mirror] hosted)"
            )
        }
        None => tracing::info!(
            hosted = %hosted_globs,
            default_upstream = "none",
            "pushes: every repository not routed to an upstream is hosted here"
        ),
    }
    tracing::info!(
        upstreams = %upstreams.iter().map(|u| u.name.as_str()).collect::<Vec<_>>().join(","),
        default = default_upstream.as_deref().unwrap_or("none"),
        hosted = %config.mirror.hosted.join(","),
        "mirroring"
    );
    let upstream_names: Vec<String> = entries.iter().map(|e| e.name().to_string()).collect();
    let upstream_names_builtin: Vec<String> = upstreams
        .iter()
        .filter(|u| u.builtin)
        .map(|u| u.name.clone())
        .collect();
    let meta_for_jobs = meta.clone();
    let target_timeouts = pier_upstream::Timeouts {
        connect: Duration::from_secs(config.mirror.upstream_connect_timeout.max(1)),
        first_byte: Duration::from_secs(config.mirror.upstream_first_byte_timeout.max(1)),
        idle: Duration::from_secs(config.mirror.upstream_idle_timeout.max(1)),
    };
    let mirror = Mirror::new_with(
        entries,
        default_upstream,
        blobs,
        meta,
        limits.max_manifest_bytes,
        mirror_metrics,
        FillPolicy {
            memory: config.mirror.fill_memory.0,
            max_blob_bytes: config.mirror.max_blob_size.0,
            negative_ttl: Duration::from_secs(config.mirror.negative_ttl),
            max_upstream_rate: config.cluster.max_upstream_rate.map(|r| r.0),
            swarm: config.cluster.swarm,
            // A fault hook for the test tier: this node lies to a swarm's new coordinator
            // about the piece digests.
            fault_lying_seed: std::env::var("PIER_FAULT_LYING_SEED").is_ok_and(|v| v == "1"),
        },
    );
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
    let cluster = start_cluster(&config.cluster, &config.data_dir, peer_metrics).await?;
    if let Some(c) = &cluster {
        mirror.set_cluster(c.cluster.clone());
    }
    let conn_limits = connection_limits(&config.server);
    let tls = main_tls(&config.tls)?;
    let signal = shutdown_signal()?;
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "pier is serving"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut membership: Option<Arc<Membership>> = None;
    let runner = pier_store::JobRunner::new(
        job_store,
        pier_store::RunnerConfig {
            concurrency: config.jobs.concurrency.max(1),
            keep_succeeded: config.jobs.keep_succeeded,
            keep_succeeded_for: Some(config.jobs.keep_succeeded_for.0),
            ..pier_store::RunnerConfig::default()
        },
    );
    let cluster_view = cluster.as_ref().map(|c| c.cluster.clone());
    // Abandoned upload sessions would hold disk forever: sweep them every ten minutes.
    let sweeper = {
        let registry = registry.clone();
        let idle = Duration::from_secs(config.registry.upload_idle_timeout);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(600));
            loop {
                tick.tick().await;
                match registry.uploads().purge_idle(idle).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(purged = n, "idle upload sessions removed"),
                    Err(e) => tracing::warn!(error = %e, "sweeping idle upload sessions failed"),
                }
            }
        })
    };
    // Free space is measured every two seconds: writes are refused below the floor, and a
    // full disk that has been cleared is noticed without a restart.
    let space_watch = {
        let space = space.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            let mut was = space.state().writable;
            loop {
                tick.tick().await;
                let s = space.clone();
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || s.refresh()).await {
                    tracing::warn!(error = %e, "measuring free space failed");
                }
                let now = space.state();
                if now.writable != was {
                    match &now.reason {
                        Some(reason) => tracing::warn!(%reason, "storage not writable"),
                        None => tracing::info!(free_bytes = now.free_bytes, "storage writable"),
                    }
                    was = now.writable;
                }
            }
        })
    };
    let mut stopped = stop_rx.clone();
    let mut state = AppState::with_mirror(registry, mirror, metrics).with_space(space);
    state.hosted = Arc::new(config.mirror.hosted.clone());
    state.node = Arc::new(pier_server::status::NodeIdentity {
        name: config.cluster.name(),
        zone: config.cluster.zone(),
    });
    state.gc = Arc::new(pier_server::gc::GcSettings {
        grace: config.gc.grace.0,
        untagged_after: config.gc.untagged_after.as_ref().map(|d| d.0),
    });
    state.pins = Some(pins.clone());
    state.cache = Arc::new(pier_server::cache::CacheSettings {
        max_bytes: config.cache.max_size.map(|b| b.0),
        min_free: config.cache.min_free.map(|b| b.0),
        pins: config.cache.pins.clone(),
        every: config.cache.check_every.0,
    });
    if let Some(every) = &config.gc.every {
        if !every.0.is_zero() {
            pier_server::gc::schedule(state.clone(), every.0);
        }
    }
    // A quick consistency pass (links against stored sizes, no hashing) in the background:
    // what it finds is logged; `pier check` tells the rest.
    {
        let registry = state.registry.clone();
        tokio::spawn(async move {
            match registry.check(false, &|_| ()).await {
                Ok(f) if f.missing_links.is_empty() && f.wrong_size.is_empty() => {
                    tracing::info!(links = f.links, blobs = f.blobs, "store consistent");
                }
                Ok(f) => tracing::warn!(
                    missing = f.missing_links.len(),
                    wrong_size = f.wrong_size.len(),
                    "blob links without their bytes; run pier check for details"
                ),
                Err(e) => tracing::warn!(error = %e, "start-up consistency check failed"),
            }
        });
    }
    state.auth = auth_gate(&config)?.map(Arc::new);
    let watch_health = Arc::new(pier_server::import::watch::WatchHealth::default());
    state.health = Arc::new(pier_server::health::HealthSettings {
        data_dir: Some(config.data_dir.clone()),
        listen: Some((listener.local_addr()?, tls.is_some())),
        watch: config
            .import
            .watch
            .clone()
            .map(|dir| (dir, watch_health.clone())),
        unlisted_builtins: upstream_names_builtin.clone(),
    });
    state.import = Arc::new(pier_server::import::ImportSettings {
        prefix: config.import.prefix.clone(),
        log: import_log,
        max_size: config.import.max_size.0,
        jobs: Some(runner.clone()),
    });
    // The sync rules, with the built-in `cluster` rule when a cluster has no rule of its own.
    let mut push_rules = config.replicate_rules.clone();
    if cluster_view.is_some()
        && config.cluster.replicate_all
        && !push_rules
            .iter()
            .any(|r| r.target == pier_sync::rules::Target::Cluster)
    {
        push_rules.push(pier_sync::rules::PushRule::default_cluster());
    }
    let mut cluster_tasks = Vec::new();
    if let Some(c) = cluster {
        let peer_state = pier_server::peer::PeerState {
            app: state.clone(),
            secret: c.secret.clone(),
            upload_limit: config
                .cluster
                .max_upload_rate
                .map(|r| pier_peer::rate::RateLimit::new(r.0)),
            // A fault hook for the test tier: this node serves corrupt swarm pieces.
            corrupt_pieces: std::env::var("PIER_FAULT_CORRUPT_PIECES").is_ok_and(|v| v == "1"),
            piece_uploads: pier_server::peer::piece_uploads(),
        };
        let mut stopped = stop_rx.clone();
        let peer_app = pier_server::peer::router(peer_state);
        let metrics = state.metrics.clone();
        cluster_tasks.push(tokio::spawn(async move {
            let served = pier_server::conn::serve_tls(
                c.peer_listener,
                peer_app,
                metrics,
                conn_limits,
                c.tls,
                async move {
                    let _ = stopped.wait_for(|s| *s).await;
                },
            )
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the peer listener failed");
            }
        }));
        cluster_tasks.push(tokio::spawn(member_gauges(
            c.membership.clone(),
            state.metrics.clone(),
        )));
        // One decision of where a hosted image lives: a repository a `cluster` rule sends
        // to every node is not also copied to its owners.
        let everywhere: Vec<pier_sync::rules::PushRule> = push_rules
            .iter()
            .filter(|r| r.target == pier_sync::rules::Target::Cluster)
            .cloned()
            .collect();
        let replicator = pier_mirror::replicate::Replicator::new(
            c.cluster.clone(),
            meta_for_jobs.clone(),
            runner.clone(),
            upstream_names.clone(),
            Arc::new(move |repo: &str| everywhere.iter().any(|r| r.matches(repo))),
        );
        cluster_tasks.push(tokio::spawn(
            replicator.clone().follow(c.membership.changes()),
        ));
        state.replicator = Some(replicator);
        membership = Some(c.membership);
    }
    let sync = pier_sync::SyncEngine::new(
        config.sync_rules.clone(),
        push_rules,
        pier_sync::SyncParts {
            registry: state.registry.clone(),
            mirror: state.mirror.clone(),
            cluster: cluster_view.clone(),
            pins: pins.clone(),
            runner: runner.clone(),
            metrics: sync_metrics,
            cache_prefixes: upstream_names.iter().map(|u| format!("{u}/")).collect(),
            timeouts: target_timeouts,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(rules = %sync.rule_names().join(","), "sync rules");
    cluster_tasks.push(tokio::spawn(sync.clone().schedule(stop_rx.clone())));
    if let Some(m) = &membership {
        cluster_tasks.push(tokio::spawn(sync.clone().follow(m.changes())));
    }
    state.sync = Some(sync);
    // The cache bound (and the flush of access times), with the pins the sync rules hold.
    pier_server::cache::run(state.clone());
    let watch_cfg = config.import.watch.clone().map(|dir| {
        use crate::config::AfterImport;
        use pier_server::import::watch::{After, WatchConfig};
        WatchConfig {
            dir,
            stable: Duration::from_secs(config.import.stable_seconds),
            rescan: Duration::from_secs(config.import.rescan_seconds.max(1)),
            after: match config.import.after {
                AfterImport::Keep => After::Keep,
                AfterImport::Delete => After::Delete,
                AfterImport::Move => After::Move,
            },
            health: watch_health,
        }
    });
    // Imports are rows of the queue; the runner imports again a watched file that is due.
    runner.register(
        pier_server::import::job::KIND,
        Arc::new(pier_server::import::watch::ImportJobs {
            state: state.clone(),
            watch: watch_cfg.clone(),
        }),
    );
    cluster_tasks.push(runner.start());
    let job_runner = runner;
    let watcher = watch_cfg.map(|cfg| {
        tokio::spawn(pier_server::import::watch::run(
            state.clone(),
            cfg,
            stop_rx.clone(),
        ))
    });
    let reloader = tls
        .as_ref()
        .map(|(files, _)| reload_certificates(files.clone()).map(tokio::spawn))
        .transpose()?;
    let server = tokio::spawn(pier_server::serve_tls_with(
        listener,
        state,
        conn_limits,
        tls.map(|(_, config)| config),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let signal = signal.await;
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
    job_runner.shutdown();
    if let Some(m) = &membership {
        // Tell the others now, so they stop asking this node at once.
        m.shutdown().await;
    }
    for t in cluster_tasks {
        t.abort();
    }
    sweeper.abort();
    space_watch.abort();
    if let Some(r) = reloader {
        r.abort();
    }
    if let Some(w) = watcher {
        // It stops between files by itself; one import in progress is not waited for (its
        // blobs are content-addressed and nothing of it is visible until it finishes).
        w.abort();
    }
    drop(stop_rx);
    tracing::info!("stopped");
    Ok(())
}

/// What a node that is part of a cluster runs besides the main listener.
struct ClusterParts {
    membership: Arc<Membership>,
    cluster: Arc<pier_peer::Cluster>,
    peer_listener: TcpListener,
    secret: ClusterSecret,
    /// Mutual TLS for the peer listener, when configured.
    tls: Option<Arc<rustls::ServerConfig>>,
}

/// The generation this node's last life kept in `file`, if any.
fn read_generation(file: &Path) -> anyhow::Result<Option<u64>> {
    match std::fs::read_to_string(file) {
        Ok(text) => text.trim().parse().map(Some).with_context(|| {
            format!(
                "{} does not hold a generation (a number); remove it to start afresh",
                file.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", file.display())),
    }
}

/// Keep `generation` in `file` durably (temporary file, fsync, rename, directory fsync).
fn write_generation(file: &Path, generation: u64) -> anyhow::Result<()> {
    let dir = file
        .parent()
        .context("the generation file has a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join("generation.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(format!("{generation}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().with_context(|| format!("cannot write {}", file.display()))
}

/// A renewal (after a false death) raises the generation while running; keep that too, so
/// the next life starts above it.
fn keep_renewed_generations(membership: Arc<Membership>, file: PathBuf, mut kept: u64) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = membership.local().generation;
            if now > kept {
                let file = file.clone();
                match tokio::task::spawn_blocking(move || write_generation(&file, now)).await {
                    Ok(Ok(())) => kept = now,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %format!("{e:#}"), "cannot keep the renewed generation")
                    }
                    Err(_) => {}
                }
            }
        }
    });
}

/// Join the cluster (when configured): bind the peer port (TCP for peer HTTP, UDP for gossip),
/// work out the address peers reach this node at, and start gossip.
async fn start_cluster(
    c: &ClusterConfig,
    data_dir: &Path,
    peer_metrics: Arc<pier_peer::metrics::PeerMetrics>,
) -> anyhow::Result<Option<ClusterParts>> {
    if !c.enabled() {
        return Ok(None);
    }
    let secret_file = c.cluster_secret_file.as_ref().context(
        "joining a cluster needs the shared secret: --cluster-secret-file FILE (or [cluster] \
         cluster_secret_file)",
    )?;
    let secret = ClusterSecret::from_file(secret_file).map_err(|e| anyhow::anyhow!(e))?;
    let tls = match (&c.peer_tls_cert, &c.peer_tls_key, &c.peer_tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => {
            Some(pier_peer::tls::PeerTls::load(cert, key, ca).map_err(|e| anyhow::anyhow!(e))?)
        }
        _ => anyhow::bail!(
            "mutual TLS between peers needs all of --peer-tls-cert, --peer-tls-key and \
             --peer-tls-ca"
        ),
    };
    let peer_listener = TcpListener::bind(c.peer_listen)
        .await
        .with_context(|| format!("cannot listen for peers on {} (TCP)", c.peer_listen))?;
    let bound = peer_listener.local_addr()?;
    let udp = tokio::net::UdpSocket::bind(bound)
        .await
        .with_context(|| format!("cannot listen for gossip on {bound} (UDP)"))?;
    let advertise = advertise_addr(c, bound).await?;
    let name = c.name();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let generation_file = data_dir.join("cluster").join("generation");
    let generation =
        pier_cluster::identity::next_generation(now_ms, read_generation(&generation_file)?);
    // Kept before gossip starts, so no life is announced that the next could fall below.
    write_generation(&generation_file, generation)?;
    let identity = pier_cluster::NodeId {
        name: name.clone(),
        generation,
        addr: advertise,
        zone: c.zone(),
    };
    let mut mcfg = MembershipConfig::new(identity, c.join.clone());
    mcfg.probe_period = Duration::from_millis(c.probe_period_ms.max(50));
    let membership = Membership::start(mcfg, udp, secret.gossip_key())
        .await
        .context("cannot start gossip")?;
    keep_renewed_generations(membership.clone(), generation_file, generation);
    let view: Arc<dyn pier_peer::View> = membership.clone();
    let cluster = pier_peer::Cluster::new(
        view,
        secret.clone(),
        c.replicas,
        pier_peer::PeerTimeouts::default(),
        peer_metrics,
        tls.as_ref().map(|t| t.client.clone()),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(
        node = %name,
        zone = c.zone.as_deref().unwrap_or(""),
        peer_listen = %bound,
        advertise = %advertise,
        join = %c.join.join(","),
        replicas = c.replicas,
        peer_tls = tls.is_some(),
        "cluster member started"
    );
    Ok(Some(ClusterParts {
        membership,
        cluster,
        peer_listener,
        secret,
        tls: tls.map(|t| t.server),
    }))
}

/// The peer address to advertise: `advertise` when set (a name is resolved), else the bound
/// address, with an unspecified IP replaced by the one this host routes to the first peer from.
async fn advertise_addr(
    c: &ClusterConfig,
    bound: std::net::SocketAddr,
) -> anyhow::Result<std::net::SocketAddr> {
    if let Some(a) = &c.advertise {
        let mut addrs = tokio::net::lookup_host(a.as_str())
            .await
            .with_context(|| format!("cannot resolve --advertise {a} (HOST:PORT)"))?;
        return addrs
            .next()
            .with_context(|| format!("--advertise {a} resolves to no address"));
    }
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    for j in &c.join {
        let Ok(mut addrs) = tokio::net::lookup_host(j.as_str()).await else {
            continue;
        };
        let Some(target) = addrs.next() else { continue };
        let probe = match target {
            std::net::SocketAddr::V4(_) => std::net::UdpSocket::bind("0.0.0.0:0"),
            std::net::SocketAddr::V6(_) => std::net::UdpSocket::bind("[::]:0"),
        };
        // Connecting a UDP socket sends nothing; it only asks the routing table.
        if let Ok(probe) = probe {
            if probe.connect(target).is_ok() {
                if let Ok(local) = probe.local_addr() {
                    return Ok(std::net::SocketAddr::new(local.ip(), bound.port()));
                }
            }
        }
    }
    anyhow::bail!(
        "cannot tell which address peers reach this node at: give --advertise HOST:PORT (or a \
         specific --peer-listen address)"
    )
}

/// Keep `pier_cluster_members{state}` and the gossip rejection count current.
async fn member_gauges(membership: Arc<Membership>, metrics: Arc<Metrics>) {
    let mut changes = membership.changes();
    loop {
        let members = membership.members();
        for state in [MemberState::Alive, MemberState::Suspect, MemberState::Dead] {
            let n = members.iter().filter(|m| m.state == state).count();
            metrics
                .cluster_members
                .get_or_create(&StateLabels {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        let rejected = membership.rejected_datagrams();
        let c = &metrics.gossip_rejected;
        c.inc_by(rejected.saturating_sub(c.get()));
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// File descriptors kept back from `max_connections` for the stores, upstream fetches and
/// upload buffers.
const FD_RESERVE: u64 = 256;

/// Raise the soft open-file limit to the hard one (the common soft default of 1024 would let a
/// thousand idle sockets take pier offline) and derive the connection bounds from the config.
fn connection_limits(server: &ServerConfig) -> ConnLimits {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let mut soft = before.current;
    if before.current != before.maximum {
        let raised = rustix::process::Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = before.maximum,
            Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
        }
    }
    let fit = soft.map_or(4096, |s| s.saturating_sub(FD_RESERVE).max(16));
    let max_connections = server
        .max_connections
        .unwrap_or(fit.min(4096) as usize)
        .max(1);
    let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
    let limits = ConnLimits {
        header_timeout: secs(server.header_timeout),
        idle_timeout: secs(server.idle_timeout),
        body_stall_timeout: secs(server.body_stall_timeout),
        write_stall_timeout: secs(server.write_stall_timeout),
        max_connections,
    };
    tracing::info!(
        open_files_before = ?before.current,
        open_files = ?soft,
        max_connections,
        "connection limits"
    );
    limits
}

/// The main listener's TLS from `[tls]` (or the flags), when a certificate is configured.
fn main_tls(
    tls: &crate::config::TlsConfig,
) -> anyhow::Result<Option<(Arc<CertFiles>, Arc<rustls::ServerConfig>)>> {
    let (cert, key) = match (&tls.cert, &tls.key) {
        (None, None) if tls.client_ca.is_none() => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        _ => anyhow::bail!(
            "TLS on the main listener needs both --tls-cert and --tls-key ([tls] cert and key)"
        ),
    };
    let files = CertFiles::load(cert, key).map_err(|e| anyhow::anyhow!(e))?;
    let server = pier_peer::tls::main_server_config(files.clone(), tls.client_ca.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Some((files, server)))
}

/// Re-read the main listener's certificate when its files change (checked every five
/// seconds) or on SIGHUP. New connections get the new certificate; open ones keep theirs. A
/// file that cannot be read, or a key that does not match, leaves the old certificate in use.
fn reload_certificates(
    files: Arc<CertFiles>,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    Ok(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                _ = hup.recv() => true,
            };
            let result = if forced {
                files.reload().map(|()| true)
            } else {
                files.reload_if_changed()
            };
            match result {
                Ok(true) => tracing::info!(
                    trigger = if forced { "SIGHUP" } else { "file change" },
                    "TLS certificate reloaded"
                ),
                Ok(false) => {}
                Err(e) => tracing::warn!(
                    error = %e,
                    "TLS certificate not reloaded; the previous one stays in use"
                ),
            }
        }
    })
}

/// Install the SIGTERM and SIGINT handlers now (before pier says it is serving, so a signal
/// that arrives right after is handled gracefully) and return a future that resolves at the
/// first one.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

/// The `[auth]` table (and `--htpasswd`) as the HTTP front runs it; `None` when auth is off.
fn auth_gate(config: &Config) -> anyhow::Result<Option<pier_server::auth::AuthGate>> {
    use pier_auth::{Actions, AuthSettings, ExternalIssuer, IpNet, Rule, TokenSettings};
    let Some(a) = &config.auth else {
        return Ok(None);
    };
    let nets = |list: &[String], what: &str| -> anyhow::Result<Vec<IpNet>> {
        list.iter()
            .map(|n| {
                // A bare address is a network of one.
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| anyhow::anyhow!("{what}: {n:?} is not a CIDR network or address"))
            })
            .collect()
    };
    let mut rules = Vec::new();
    for (i, r) in a.rules.iter().enumerate() {
        let what = format!("[[auth.rule]] #{}", i + 1);
        let mut grant = Actions::NONE;
        for g in &r.grant {
            match g.as_str() {
                "pull" | "push" | "delete" | "admin" => {
                    grant = grant.union(Actions::parse(g).unwrap_or_default())
                }
                other => {
                    anyhow::bail!("{what}: grant {other:?} is not one of pull, push, delete, admin")
                }
            }
        }
        let to =
            r.to.iter()
                .map(|s| {
                    s.parse()
                        .map_err(|e: String| anyhow::anyhow!("{what}: {e}"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!r.repos.is_empty(), "{what}: repos is empty");
        rules.push(Rule {
            repos: r.repos.clone(),
            grant,
            to,
            allow: nets(&r.allow, &what)?,
        });
    }
    let token = a.token_service.then(|| TokenSettings {
        issuer: a.issuer.clone(),
        ttl: Duration::from_secs(a.token_ttl.max(1)),
        key_file: a
            .signing_key
            .clone()
            .unwrap_or_else(|| config.data_dir.join("auth").join("token-key.pem")),
        generate: a.signing_key.is_none(),
        service: a.service.clone(),
    });
    let external = a.external.as_ref().map(|e| ExternalIssuer {
        public_key: e.public_key.clone(),
        jwks: e.jwks.clone(),
        issuer: e.issuer.clone(),
        audience: e.audience.clone(),
    });
    let settings = AuthSettings {
        htpasswd: a.htpasswd.clone(),
        groups: a.groups.clone().into_iter().collect(),
        rules,
        allow: nets(&a.allow, "[auth] allow")?,
        token,
        external,
    };
    let auth = pier_auth::Auth::new(settings).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut gate = pier_server::auth::AuthGate::new(auth);
    gate.metrics_open = a.metrics_open;
    // Challenges name the token service with the scheme clients reach this listener by.
    gate.https = config.tls.cert.is_some();
    gate.trusted_proxies = nets(&a.trusted_proxies, "[auth] trusted_proxies")?;
    let limiter = |rate: &Option<String>| -> anyhow::Result<Option<pier_server::auth::Limiter>> {
        rate.as_deref()
            .map(|r| {
                let per_sec = crate::config::parse_rate(r)?;
                let burst = a.rate.burst.unwrap_or(per_sec.ceil() as u32);
                Ok(pier_server::auth::Limiter::new(per_sec, burst))
            })
            .transpose()
    };
    gate.per_ip = limiter(&a.rate.per_ip)?;
    gate.per_user = limiter(&a.rate.per_user)?;
    anyhow::ensure!(
        !a.rate.failed_login_window.0.is_zero(),
        "[auth.rate] failed_login_window must be longer than 0 (set failed_logins_per_ip and failed_logins_per_user to 0 to turn the limits off)"
    );
    gate.logins = pier_auth::FailedLogins::new(pier_auth::LoginLimits {
        per_ip: a.rate.failed_logins_per_ip,
        per_user: a.rate.failed_logins_per_user,
        window: a.rate.failed_login_window.0,
    });
    tracing::info!(
        token_service = a.token_service,
        rules = a.rules.len(),
        htpasswd = a.htpasswd.is_some(),
        "auth on"
    );
    Ok(Some(gate))
}
