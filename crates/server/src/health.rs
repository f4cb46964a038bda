//! The node's health checks of `pier check` (`POST /api/v1/check`), beside the storage checks
//! of [`crate::gc`]: the data directory takes a write, the listeners answer, the upstreams
//! answer `/v2/`, the peers are alive and answer, their clocks agree with this one, the
//! watched folder receives file system events, and free disk is above the floor.
//!
//! Each check is bounded by [`PROBE_LIMIT`] and they run at once, so a node with a dead
//! upstream and a hung peer still answers within a few seconds. A check that does not apply
//! (no cluster, no watched folder, no mirror) is left out.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::join_all;
use serde::{Deserialize, Serialize};

use crate::import::watch::WatchHealth;
use crate::AppState;

/// How long one probe (a listener, an upstream endpoint, a peer) may take.
pub const PROBE_LIMIT: Duration = Duration::from_secs(3);

/// How long the watched folder has to report an event for a file written into it.
const EVENT_LIMIT: Duration = Duration::from_secs(2);

/// Peers' clocks further apart than this are a warning (logs and times across nodes stop
/// lining up)...
const SKEW_WARN_MS: u64 = 1_000;
/// ...and this far a failure (garbage-collection grace periods and tag lifetimes are compared
/// across nodes; beyond 300 s peers refuse each other's signed requests).
const SKEW_FAIL_MS: u64 = 30_000;

/// What the health checks need to know about the node (set by `pier serve`).
#[derive(Debug, Clone, Default)]
pub struct HealthSettings {
    /// The data directory, which must take writes.
    pub data_dir: Option<PathBuf>,
    /// The main listener's bound address, and whether it speaks TLS.
    pub listen: Option<(SocketAddr, bool)>,
    /// The watched folder and its watcher's state.
    pub watch: Option<(PathBuf, Arc<WatchHealth>)>,
    /// Built-in upstreams (`[mirror] builtin_upstreams`) that no table or flag names: one of
    /// them unreachable is a warning, not a failure, unless it served a pull lately.
    pub unlisted_builtins: Vec<String>,
}

/// An unlisted built-in upstream that served a pull this recently counts as one in use.
pub const IN_USE_WITHIN: Duration = Duration::from_secs(3600);

/// One named result of a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    pub name: String,
    /// `pass`, `warn`, `fixed` (found and repaired) or `fail` (lost data, or not repairable).
    pub status: String,
    pub message: String,
    /// Details, one line each (what is missing where).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub details: Vec<String>,
}

/// A named result (also the consistency check's, [`crate::gc`]).
pub(crate) fn result(
    name: &str,
    status: &str,
    message: String,
    details: Vec<String>,
) -> CheckResult {
    CheckResult {
        name: name.into(),
        status: status.into(),
        message,
        details,
    }
}

/// Every health check that applies to this node, in a fixed order.
pub async fn checks(state: &AppState) -> Vec<CheckResult> {
    let (data, listeners, upstreams, peers, watch) = tokio::join!(
        data_dir(state),
        listeners(state),
        upstreams(state),
        peers(state),
        watch(state),
    );
    let mut out = Vec::new();
    out.extend(data);
    out.extend(disk(state));
    out.extend(listeners);
    out.extend(upstreams);
    if let Some((members, clocks)) = peers {
        out.push(members);
        out.extend(clocks);
    }
    out.extend(watch);
    out
}

/// A probe file created, written, synced and removed in the data directory.
async fn data_dir(state: &AppState) -> Option<CheckResult> {
    let dir = state.health.data_dir.clone()?;
    let shown = dir.display().to_string();
    let probe = dir.join(probe_name());
    let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        let wrote = f.write_all(&[0u8; 4096]).and_then(|()| f.sync_all());
        drop(f);
        let removed = std::fs::remove_file(&probe);
        wrote.and(removed)
    });
    let answer = tokio::time::timeout(PROBE_LIMIT, written).await;
    Some(match answer {
        Ok(Ok(Ok(()))) => result(
            "data directory",
            "pass",
            format!("{shown} takes writes (a probe file written, synced and removed)"),
            Vec::new(),
        ),
        Ok(Ok(Err(e))) => result(
            "data directory",
            "fail",
            format!("{shown} does not take writes: {e}"),
            Vec::new(),
        ),
        Ok(Err(e)) => result(
            "data directory",
            "fail",
            format!("{shown}: the probe write did not finish: {e}"),
            Vec::new(),
        ),
        Err(_) => result(
            "data directory",
            "fail",
            format!(
                "{shown}: a 4 KiB write and fsync took more than {} s",
                PROBE_LIMIT.as_secs()
            ),
            Vec::new(),
        ),
    })
}

fn probe_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(".pier-check-{}-{nanos}", std::process::id())
}

fn mib(n: u64) -> String {
    format!("{} MiB", n / (1024 * 1024))
}

/// Free space on the data directory's filesystem against the write floor
/// (`[storage] min_free_space`) and the cache's floor (`[cache] min_free`).
fn disk(state: &AppState) -> Option<CheckResult> {
    let space = state.space.as_ref()?;
    let _ = space.refresh();
    let s = space.state();
    let floor = s.min_free_bytes;
    Some(if !s.writable || s.free_bytes < floor {
        result(
            "free disk",
            "fail",
            format!(
                "{} free, below the floor of {}: {}",
                mib(s.free_bytes),
                mib(floor),
                s.reason
                    .unwrap_or_else(|| "writes are refused until space is freed".into())
            ),
            Vec::new(),
        )
    } else if s.free_bytes < floor.saturating_mul(2) {
        result(
            "free disk",
            "warn",
            format!(
                "{} free, less than twice the floor of {} (writes stop below it)",
                mib(s.free_bytes),
                mib(floor)
            ),
            Vec::new(),
        )
    } else if let Some(cache_floor) = state.cache.min_free.filter(|f| s.free_bytes < *f) {
        result(
            "free disk",
            "warn",
            format!(
                "{} free, below the cache's floor of {}: mirrored blobs are being evicted",
                mib(s.free_bytes),
                mib(cache_floor)
            ),
            Vec::new(),
        )
    } else {
        result(
            "free disk",
            "pass",
            format!(
                "{} free (writes stop below {})",
                mib(s.free_bytes),
                mib(floor)
            ),
            Vec::new(),
        )
    })
}

/// The address to reach a listener bound to `addr` on from this host.
fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `/healthz` on the main listener, and the peer API on the peer listener.
async fn listeners(state: &AppState) -> Option<CheckResult> {
    let main = state.health.listen;
    let cluster = state.mirror.as_ref().and_then(|m| m.cluster()).cloned();
    if main.is_none() && cluster.is_none() {
        return None;
    }
    let main_probe = async {
        let (addr, tls) = main?;
        let target = reachable(addr);
        let scheme = if tls { "https" } else { "http" };
        let url = format!("{scheme}://{target}/healthz");
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(PROBE_LIMIT)
            // The probe asks this very process: the certificate names the host clients use,
            // not the loopback address.
            .danger_accept_invalid_certs(true)
            .build();
        let answer = match client {
            Err(e) => Err(format!("no HTTP client: {e}")),
            Ok(c) => match c.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("answered {}", r.status())),
                // A listener that wants a client certificate refuses the handshake: it answers.
                Err(e) if tls && !e.is_connect() && !e.is_timeout() => Ok(()),
                Err(e) => Err(pier_upstream::causes(&e)),
            },
        };
        Some((format!("main {url}"), answer))
    };
    let peer_probe = async {
        let c = cluster.as_ref()?;
        let local = c.local();
        let answer = c
            .client()
            .health(&local)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string());
        Some((format!("peer {}", local.addr), answer))
    };
    let (main, peer) = tokio::join!(main_probe, peer_probe);
    let probes: Vec<(String, Result<(), String>)> = main.into_iter().chain(peer).collect();
    let failed: Vec<String> = probes
        .iter()
        .filter_map(|(what, a)| a.as_ref().err().map(|e| format!("{what}: {e}")))
        .collect();
    let names: Vec<&str> = probes.iter().map(|(w, _)| w.as_str()).collect();
    Some(if failed.is_empty() {
        result(
            "listeners",
            "pass",
            format!("answering: {}", names.join(", ")),
            Vec::new(),
        )
    } else {
        result(
            "listeners",
            "fail",
            format!(
                "{} of {} listeners do not answer",
                failed.len(),
                probes.len()
            ),
            failed,
        )
    })
}

/// `/v2/` of every endpoint of every upstream. 200, or 401/403 from a registry that wants
/// credentials, means it is there. An upstream that does not answer fails the check when the
/// operator configured it or it served a pull within [`IN_USE_WITHIN`]; a built-in one nobody
/// named or used only warns, and says how to turn the built-ins off.
async fn upstreams(state: &AppState) -> Option<CheckResult> {
    let mirror = state.mirror.as_ref()?;
    let upstreams = mirror.upstreams();
    if upstreams.is_empty() {
        return None;
    }
    let asked = join_all(upstreams.iter().map(|u| async move {
        let idle_builtin = state.health.unlisted_builtins.iter().any(|b| b == u.name())
            && !u.client.served_within(IN_USE_WITHIN);
        (
            u.name().to_string(),
            idle_builtin,
            u.client.probe(PROBE_LIMIT).await,
        )
    }))
    .await;
    let mut down = Vec::new();
    let mut idle_down = Vec::new();
    let mut degraded = Vec::new();
    let mut details = Vec::new();
    for (name, idle_builtin, endpoints) in &asked {
        let mut ok = 0;
        for (url, answer) in endpoints {
            match answer {
                Ok(s) if pier_upstream::probe_answered(*s) => ok += 1,
                Ok(status) => details.push(format!("{name}: {url}/v2/ answered {status}")),
                Err(e) => details.push(format!("{name}: {url}/v2/: {e}")),
            }
        }
        if ok == 0 && *idle_builtin {
            idle_down.push(name.as_str());
        } else if ok == 0 {
            down.push(name.as_str());
        } else if ok < endpoints.len() {
            degraded.push(name.as_str());
        }
    }
    let idle_note = || {
        format!(
            "{} built-in {} nobody configured or pulled from in the last hour {} unreachable \
             ({}); turn the built-ins off with [mirror] builtin_upstreams = false",
            idle_down.len(),
            if idle_down.len() == 1 {
                "upstream"
            } else {
                "upstreams"
            },
            if idle_down.len() == 1 { "is" } else { "are" },
            idle_down.join(", ")
        )
    };
    Some(if !down.is_empty() {
        if !idle_down.is_empty() {
            details.push(idle_note());
        }
        let in_use = asked.len() - idle_down.len();
        result(
            "upstreams",
            "fail",
            format!(
                "{} of {in_use} configured or used upstreams unreachable: {}",
                down.len(),
                down.join(", ")
            ),
            details,
        )
    } else if !idle_down.is_empty() {
        result("upstreams", "warn", idle_note(), details)
    } else if !degraded.is_empty() {
        result(
            "upstreams",
            "warn",
            format!(
                "some endpoints of {} do not answer; the others serve",
                degraded.join(", ")
            ),
            details,
        )
    } else {
        result(
            "upstreams",
            "pass",
            format!("{} upstreams answer /v2/", asked.len()),
            Vec::new(),
        )
    })
}

/// The other members: dead or suspect in gossip, or alive but not answering the peer API;
/// and the clocks of those that answer.
async fn peers(state: &AppState) -> Option<(CheckResult, Option<CheckResult>)> {
    let cluster = state.mirror.as_ref().and_then(|m| m.cluster())?.clone();
    let local = cluster.local();
    let others: Vec<_> = cluster
        .view()
        .members()
        .into_iter()
        .filter(|m| m.id.name != local.name)
        .collect();
    let asked = join_all(others.iter().map(|m| {
        let cluster = cluster.clone();
        async move {
            if m.state == pier_cluster::MemberState::Dead {
                return None;
            }
            let answer = tokio::time::timeout(PROBE_LIMIT, cluster.client().health(&m.id)).await;
            Some(match answer {
                Err(_) => Err(format!("no answer within {} s", PROBE_LIMIT.as_secs())),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(clock)) => Ok(clock),
            })
        }
    }))
    .await;
    let mut failed = Vec::new();
    let mut suspect = Vec::new();
    let mut clocks = Vec::new();
    for (m, answer) in others.iter().zip(asked) {
        let who = format!("{} ({})", m.id.name, m.id.addr);
        match (m.state, answer) {
            (pier_cluster::MemberState::Dead, _) | (_, None) => failed.push(format!(
                "{who}: dead since {}",
                crate::status::rfc3339(m.since)
            )),
            (_, Some(Err(e))) => failed.push(format!("{who}: does not answer: {e}")),
            (pier_cluster::MemberState::Suspect, Some(Ok(clock))) => {
                suspect.push(format!("{who}: suspect in gossip, answers HTTP"));
                clocks.push((who, clock));
            }
            (_, Some(Ok(clock))) => clocks.push((who, clock)),
        }
    }
    let members = if !failed.is_empty() {
        let n = failed.len();
        failed.extend(suspect);
        result(
            "peers",
            "fail",
            format!("{n} of {} peers are down", others.len()),
            failed,
        )
    } else if !suspect.is_empty() {
        result(
            "peers",
            "warn",
            format!("{} of {} peers are suspect", suspect.len(), others.len()),
            suspect,
        )
    } else if others.is_empty() {
        result(
            "peers",
            "warn",
            "no other member known: this node is alone in its cluster".into(),
            Vec::new(),
        )
    } else {
        result(
            "peers",
            "pass",
            format!("{} peers alive and answering", others.len()),
            Vec::new(),
        )
    };
    let skew = if clocks.is_empty() {
        None
    } else {
        // The skew is known within half the round trip: count only what is certain.
        let certain = |c: &pier_peer::PeerClock| {
            c.skew_ms()
                .unsigned_abs()
                .saturating_sub(c.round_trip_ms / 2)
        };
        let worst = clocks.iter().map(|(_, c)| certain(c)).max().unwrap_or(0);
        let details: Vec<String> = clocks
            .iter()
            .filter(|(_, c)| certain(c) > SKEW_WARN_MS)
            .map(|(who, c)| {
                format!(
                    "{who}: {} ms {} (round trip {} ms)",
                    c.skew_ms().unsigned_abs(),
                    if c.skew_ms() > 0 { "ahead" } else { "behind" },
                    c.round_trip_ms
                )
            })
            .collect();
        let status = if worst > SKEW_FAIL_MS {
            "fail"
        } else if worst > SKEW_WARN_MS {
            "warn"
        } else {
            "pass"
        };
        let message = match status {
            "pass" => format!(
                "{} peers' clocks within {} ms of this node's",
                clocks.len(),
                SKEW_WARN_MS
            ),
            _ => format!(
                "clocks differ by up to {worst} ms (warn above {SKEW_WARN_MS} ms, fail above \
                 {SKEW_FAIL_MS} ms)"
            ),
        };
        Some(result("clock skew", status, message, details))
    };
    Some((members, skew))
}

/// The watched folder: the watcher runs, the folder lists, and a file written into it is seen
/// as a file system event.
async fn watch(state: &AppState) -> Option<CheckResult> {
    let (dir, health) = state.health.watch.clone()?;
    let shown = dir.display().to_string();
    let fail = |message: String| Some(result("watch folder", "fail", message, Vec::new()));
    if !health.running() {
        return fail(format!(
            "the watcher of {shown} is not running{}",
            health
                .problem()
                .map(|p| format!(": {p}"))
                .unwrap_or_default()
        ));
    }
    if let Err(e) = tokio::fs::read_dir(&dir).await {
        return fail(format!("cannot list {shown}: {e}"));
    }
    if !health.events_on() {
        return Some(result(
            "watch folder",
            "warn",
            format!(
                "{shown} is listed every rescan but sends no file system events{}",
                health
                    .problem()
                    .map(|p| format!(" ({p})"))
                    .unwrap_or_default()
            ),
            Vec::new(),
        ));
    }
    // A dot file: the watcher never imports those.
    let probe = dir.join(probe_name());
    let before = health.events();
    if let Err(e) = tokio::fs::write(&probe, b"pier check\n").await {
        return fail(format!("cannot write into {shown}: {e}"));
    }
    let deadline = tokio::time::Instant::now() + EVENT_LIMIT;
    let mut seen = false;
    while tokio::time::Instant::now() < deadline {
        if health.events() > before {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = tokio::fs::remove_file(&probe).await;
    if seen {
        Some(result(
            "watch folder",
            "pass",
            format!("{shown} receives file system events"),
            Vec::new(),
        ))
    } else {
        fail(format!(
            "no file system event from {shown} within {} s of a file written into it",
            EVENT_LIMIT.as_secs()
        ))
    }
}
