//! pier's HTTP front. `/v2/` is routed once, by [`pier_oci::route::parse`], and dispatched in
//! [`v2`]; `/healthz`, `/readyz` and `/metrics` sit beside it. Every request gets a tracing span
//! and is counted. With auth on, [`auth::guard`] runs in front of every route.
//!
//! Architecture invariant: this crate turns HTTP into registry calls and registry results into
//! HTTP. It holds no storage logic, and failures become responses only in [`error`].

pub mod auth;
pub mod cache;
pub mod cluster;
pub mod conn;
pub mod error;
pub mod events;
pub mod export;
pub mod gc;
pub mod health;
pub mod import;
pub mod metrics;
pub mod mirror;
pub mod peer;
pub mod ranges;
pub mod respond;
pub mod status;
pub mod sync;
pub mod ui;
pub mod v2;
pub mod warm;
pub mod zerocopy;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pier_oci::{ErrorCode, RouteError};
use pier_registry::Registry;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::error::ApiError;
use crate::metrics::{KindLabels, Metrics, RequestLabels, RouteLabels};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// The pull-through mirror, when upstreams are configured.
    pub mirror: Option<Arc<pier_mirror::Mirror>>,
    pub metrics: Arc<Metrics>,
    /// False once shutdown has begun: `/readyz` then answers 503 so load balancers drain us.
    pub ready: Arc<AtomicBool>,
    /// Repository globs that are hosted here even though the default upstream would serve
    /// them (`[mirror] hosted`): pushes into them are accepted and reads never go upstream.
    pub hosted: Arc<Vec<String>>,
    /// Free-space tracking of the data directory, when the store has one.
    pub space: Option<Arc<pier_store::Space>>,
    /// Copies pushed content to its owners, when this node is part of a cluster.
    pub replicator: Option<Arc<pier_mirror::replicate::Replicator>>,
    /// How archives are imported (the repository prefix, the log of imported files).
    pub import: Arc<import::ImportSettings>,
    /// The sync rules and the job queue's status, when the node runs them.
    pub sync: Option<Arc<pier_sync::SyncEngine>>,
    /// The last 5xx answers, for the dashboard.
    pub recent_errors: Arc<ui::RecentErrors>,
    /// Garbage-collection settings (`[gc]`).
    pub gc: Arc<gc::GcSettings>,
    /// The cache bound and pins (`[cache]`).
    pub cache: Arc<cache::CacheSettings>,
    /// Where pins live (`pier pin`), when the metadata store keeps them.
    pub pins: Option<Arc<dyn pier_store::PinStore>>,
    /// Authentication and authorization; `None`: every request is allowed (docs/security.md).
    pub auth: Option<Arc<auth::AuthGate>>,
    /// Positive answers of private upstreams to clients' credentials.
    pub private: Arc<auth::PrivateChecks>,
    /// What the node health checks of `pier check` look at.
    pub health: Arc<health::HealthSettings>,
    /// This node's name and zone as configured (`--node-name`, `--zone`), in a cluster or not.
    pub node: Arc<status::NodeIdentity>,
}

impl AppState {
    pub fn new(registry: Arc<Registry>) -> AppState {
        AppState {
            registry,
            mirror: None,
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(true)),
            hosted: Arc::new(Vec::new()),
            space: None,
            replicator: None,
            import: Arc::new(import::ImportSettings::default()),
            sync: None,
            recent_errors: Arc::default(),
            gc: Arc::new(gc::GcSettings::default()),
            cache: Arc::new(cache::CacheSettings::default()),
            pins: None,
            auth: None,
            private: Arc::default(),
            health: Arc::default(),
            node: Arc::default(),
        }
    }

    /// A node that also mirrors upstreams; `metrics` must have the mirror's registered.
    pub fn with_mirror(
        registry: Arc<Registry>,
        mirror: Arc<pier_mirror::Mirror>,
        metrics: Metrics,
    ) -> AppState {
        AppState {
            mirror: Some(mirror),
            metrics: Arc::new(metrics),
            ..AppState::new(registry)
        }
    }
}

impl AppState {
    /// Report the data directory's free space on `/readyz`, `/metrics` and the status endpoint.
    pub fn with_space(mut self, space: Arc<pier_store::Space>) -> AppState {
        self.space = Some(space);
        self
    }
}

/// The whole HTTP application.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status::status))
        .route("/api/v1/warm", axum::routing::post(warm::warm))
        .route("/api/v1/import", axum::routing::post(import::import))
        .route("/api/v1/export", get(export::export))
        .route("/api/v1/sync/jobs", get(sync::jobs))
        .route("/api/v1/sync/pins", get(sync::pins))
        .route("/api/v1/sync/retry", axum::routing::post(sync::retry))
        .route("/api/v1/sync/run/{name}", axum::routing::post(sync::run))
        .route("/api/v1/errors", get(ui::errors))
        .route("/ui", get(ui::redirect))
        .route("/ui/", get(ui::index))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .route("/api/v1/gc", axum::routing::post(gc::gc))
        .route("/api/v1/check", axum::routing::post(gc::check))
        .route("/api/v1/pin", axum::routing::post(cache::pin))
        .route("/api/v1/unpin", axum::routing::post(cache::unpin))
        .route("/token", get(auth::token).post(auth::token))
        .fallback(registry_api)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> Response {
    let reasons = status::not_ready_reasons(&state);
    if reasons.is_empty() {
        "ready\n".into_response()
    } else {
        let mut body = reasons.join("\n");
        body.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Some(sync) = &state.sync {
        sync.refresh_metrics().await;
    }
    let stats = state.registry.blob_store().stats();
    let m = &state.metrics;
    m.store_blobs.set(stats.blobs as i64);
    m.store_bytes.set(stats.bytes as i64);
    m.cache_bytes.set(stats.bytes as i64);
    m.cache_max_bytes
        .set(state.cache.max_bytes.map_or(0, |b| b as i64));
    m.upload_sessions
        .set(state.registry.uploads().open_sessions() as i64);
    if let Some(space) = &state.space {
        let s = space.state();
        m.storage_free_bytes
            .set(i64::try_from(s.free_bytes).unwrap_or(i64::MAX));
        m.storage_writable.set(i64::from(s.writable));
        let c = m
            .store_errors
            .get_or_create(&KindLabels { kind: "no_space" });
        c.inc_by(s.no_space_errors.saturating_sub(c.get()));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

/// Every path that is not a fixed endpoint: parse it as a `/v2/` route and dispatch.
async fn registry_api(State(state): State<AppState>, req: Request<Body>) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let read = method == Method::GET || method == Method::HEAD;
    let route = pier_oci::route::parse(req.uri().path());
    let kind = route.as_ref().map_or("unknown", |r| r.kind());
    let span = tracing::info_span!(
        "request",
        method = %method,
        path = %req.uri().path(),
        route = kind,
        status = tracing::field::Empty,
    );
    let metrics = state.metrics.clone();
    let recent = state.recent_errors.clone();
    let mut resp = async {
        let resp = match route {
            Ok(route) => match v2::dispatch(state, route, req).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            },
            // A reference that is not a valid tag names nothing that exists: reads get 404
            // (the specification's table allows no 400 for them); a push of it is invalid.
            Err(RouteError::Reference(e)) if read => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::ManifestUnknown,
                format!("no manifest has the reference: {e}"),
            )
            .into_response(),
            Err(e) => ApiError::from(e).into_response(),
        };
        let status = resp.status();
        tracing::Span::current().record("status", status.as_u16());
        if status.is_server_error() {
            tracing::warn!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "answered"
            );
        } else {
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "answered"
            );
        }
        resp
    }
    .instrument(span)
    .await;
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    if resp.status().is_server_error() {
        recent.record(method.as_str(), &path, resp.status().as_u16());
    }
    let method = method.as_str().to_string();
    metrics
        .requests
        .get_or_create(&RequestLabels {
            route: kind,
            method: method.clone(),
            status: resp.status().as_u16(),
        })
        .inc();
    metrics
        .duration
        .get_or_create(&RouteLabels {
            route: kind,
            method,
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

/// Serve `app` on an already bound listener until `shutdown` completes, then let in-flight
/// requests finish. `ready` flips to false as soon as shutdown begins.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, conn::ConnLimits::default(), shutdown).await
}

/// [`serve`] with explicit bounds on connections (timeouts, how many at once).
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    limits: conn::ConnLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_tls_with(listener, state, limits, None, shutdown).await
}

/// [`serve_with`], every connection TLS when `tls` is given.
pub async fn serve_tls_with(
    listener: TcpListener,
    state: AppState,
    limits: conn::ConnLimits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let ready = state.ready.clone();
    let metrics = state.metrics.clone();
    let app = router(state);
    conn::serve_tls(listener, app, metrics, limits, tls, async move {
        shutdown.await;
        ready.store(false, Ordering::Relaxed);
    })
    .await
}
