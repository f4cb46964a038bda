//! `GET /api/v1/status`: what this node is and how it is doing, as JSON, for people and
//! dashboards. Also the one place that decides readiness, so `/readyz` and the status agree.
//!
//! The document only grows: new sections (cluster members, upstreams) are new fields, and a
//! field once published keeps its meaning.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::Json;
use serde::Serialize;

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
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// The host name.
    pub name: String,
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
        },
    })
}
