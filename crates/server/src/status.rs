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
    /// Every cluster member this node knows, itself included (just itself outside a cluster).
    pub members: Vec<MemberStatus>,
    pub storage: StorageStatus,
    pub cache: CacheStatus,
    /// The mirrored upstreams, by name, with each endpoint's health.
    pub upstreams: Vec<UpstreamStatus>,
}

/// What the node is called, set once at start: `--node-name` (default: the host name) and
/// `--zone`, whether or not the node joins a cluster.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub name: String,
    pub zone: Option<String>,
}

impl Default for NodeIdentity {
    fn default() -> Self {
        NodeIdentity {
            name: host_name(),
            zone: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// `--node-name` (`[cluster] node_name`), by default the host name.
    pub name: String,
    /// The node's zone (`--zone`); none when not set.
    pub zone: Option<String>,
    pub version: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub name: String,
    /// Its peer address (`host:port`); none outside a cluster.
    pub address: Option<String>,
    pub zone: Option<String>,
    /// `alive`, `suspect` or `dead`.
    pub state: &'static str,
    /// When it entered that state (RFC 3339, UTC).
    pub since: String,
    /// Its generation: the start time of the process, in ms since the epoch, or above the
    /// last one its data directory kept.
    pub generation: u64,
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
    /// The bound `[cache] max_size` puts on the blob store; none when unbounded.
    pub max_bytes: Option<u64>,
    /// Blob and manifest bytes served to clients since start, by where they came from.
    pub served_bytes: ServedBytes,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServedBytes {
    /// From this node's store.
    pub local: u64,
    /// Fetched from another node of the cluster.
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
    /// `healthy` (its last answer came), `unhealthy` (benched, or its last request or probe
    /// failed) or `unknown` (nothing has reached it yet).
    pub state: &'static str,
    /// True only when `state` is `healthy`: never for an endpoint nothing has reached.
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
                    state: e.health.as_str(),
                    healthy: e.health == pier_upstream::Health::Healthy,
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
    let cluster = state.mirror.as_ref().and_then(|m| m.cluster()).cloned();
    let (node, members) = match &cluster {
        Some(c) => {
            let local = c.local();
            let mut members: Vec<MemberStatus> = c
                .view()
                .members()
                .into_iter()
                .map(|m| MemberStatus {
                    name: m.id.name,
                    address: Some(m.id.addr.to_string()),
                    zone: m.id.zone,
                    state: m.state.as_str(),
                    since: rfc3339(m.since),
                    generation: m.id.generation,
                })
                .collect();
            members.sort_by(|a, b| a.name.cmp(&b.name));
            (
                NodeStatus {
                    name: local.name,
                    zone: local.zone,
                    version: env!("CARGO_PKG_VERSION"),
                },
                members,
            )
        }
        None => {
            let name = state.node.name.clone();
            (
                NodeStatus {
                    name: name.clone(),
                    zone: state.node.zone.clone(),
                    version: env!("CARGO_PKG_VERSION"),
                },
                vec![MemberStatus {
                    name,
                    address: None,
                    zone: state.node.zone.clone(),
                    state: "alive",
                    since: rfc3339(*STARTED),
                    generation: 0,
                }],
            )
        }
    };
    Json(Status {
        node,
        ready: reasons.is_empty(),
        not_ready_reasons: reasons,
        members,
        storage: StorageStatus {
            free_bytes: space.as_ref().map(|s| s.free_bytes),
            min_free_bytes: space.as_ref().map(|s| s.min_free_bytes),
            writable: space.as_ref().is_none_or(|s| s.writable),
        },
        cache: CacheStatus {
            bytes: stats.bytes,
            blobs: stats.blobs,
            max_bytes: state.cache.max_bytes,
            served_bytes: ServedBytes {
                local: served(&state, "local"),
                peer: served(&state, "peer"),
                upstream: served(&state, "upstream"),
            },
        },
        upstreams: upstreams(&state),
    })
}

static STARTED: std::sync::LazyLock<std::time::SystemTime> =
    std::sync::LazyLock::new(std::time::SystemTime::now);

/// A time as RFC 3339 in UTC with milliseconds (`2026-12-02T01:02:03.456Z`).
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_173_323_456);
        assert_eq!(rfc3339(t), "2026-12-02T01:02:03.456Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
