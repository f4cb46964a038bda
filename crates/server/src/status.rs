//! `GET /api/v1/status`: what this node is and how it is doing, as JSON, for people and
//! dashboards. Also the one place that decides readiness, so `/readyz` and the status agree.
//!
//! The document only grows: new sections (cluster members, upstreams) are new fields, and a
//! field once published keeps its meaning.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

use crate::metrics::ServedLabels;
use crate::AppState;

/// The status document.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub node: NodeStatus,
    pub ready: bool,
    /// Why the node is not ready, one sentence each; empty when ready.
    pub not_ready_reasons: Vec<String>,
    pub storage: StorageStatus,
    pub cache: CacheStatus,
    /// The mirrored upstreams, by name, with each endpoint's health.
    pub upstreams: Vec<UpstreamStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The host name.
    pub name: String,
    /// The node's zone; none until the node is part of a cluster with zones.
    pub zone: Option<String>,
    pub version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct StorageStatus {
    /// Free bytes on the data directory's filesystem (absent when not tracked).
    pub free_bytes: Option<u64>,
    pub min_free_bytes: Option<u64>,
    /// Whether pushes and fills may write now.
    pub writable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheStatus {
    /// Bytes of blobs stored.
    pub bytes: u64,
    pub blobs: u64,
    /// Blob and manifest bytes served to clients since start, by where they came from.
    pub served_bytes: ServedBytes,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedBytes {
    /// From this node's store.
    pub local: u64,
    /// From another node (always 0 until nodes form a cluster).
    pub peer: u64,
    /// Streamed from an upstream while the fill caching them ran.
    pub upstream: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub endpoints: Vec<EndpointStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointStatus {
    pub url: String,
    /// False while the endpoint is benched after a failure (it is retried after a cool-down).
    pub healthy: bool,
}

/// Why this node should not get traffic now; empty when it should.
pub fn not_ready_reasons(state: &AppState) -> Vec<String> {
    let mut reasons = Vec::new();
    if !state.ready.load(Ordering::Relaxed) {
        reasons.push("shutting down".to_string());
    }
    if let Some(reason) = state.space.as_ref().and_then(|s| s.state().reason) {
        reasons.push(reason);
    }
    reasons
}

/// Bytes served from `source`, over every kind of content.
fn served(state: &AppState, source: &'static str) -> u64 {
    ["blob", "manifest"]
        .into_iter()
        .map(|kind| {
            state
                .metrics
                .served_bytes
                .get_or_create(&ServedLabels { kind, source })
                .get()
        })
        .sum()
}

fn upstreams(state: &AppState) -> Vec<UpstreamStatus> {
    let Some(mirror) = &state.mirror else {
        return Vec::new();
    };
    mirror
        .upstreams()
        .iter()
        .map(|u| UpstreamStatus {
            name: u.name().to_string(),
            endpoints: u
                .client
                .endpoint_health()
                .into_iter()
                .map(|e| EndpointStatus {
                    url: e.url,
                    healthy: e.healthy,
                })
                .collect(),
        })
        .collect()
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub async fn status(State(state): State<AppState>) -> Json<Status> {
    let reasons = not_ready_reasons(&state);
    let space = state.space.as_ref().map(|s| s.state());
    let stats = state.registry.blob_store().stats();
    Json(Status {
        node: NodeStatus {
            name: host_name(),
            zone: None,
            version: env!("CARGO_PKG_VERSION"),
        },
        ready: reasons.is_empty(),
        not_ready_reasons: reasons,
        storage: StorageStatus {
            free_bytes: space.as_ref().map(|s| s.free_bytes),
            min_free_bytes: space.as_ref().map(|s| s.min_free_bytes),
            writable: space.as_ref().is_none_or(|s| s.writable),
        },
        cache: CacheStatus {
            bytes: stats.bytes,
            blobs: stats.blobs,
            served_bytes: ServedBytes {
                local: served(&state, "local"),
                peer: 0,
                upstream: served(&state, "upstream"),
            },
        },
        upstreams: upstreams(&state),
    })
}
