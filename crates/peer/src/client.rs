//! The signed HTTP client for peer listeners.
//!
//! Paths (all under `/peer/v1`, all signed with the cluster secret):
//! - `HEAD /blobs/<digest>[?repo=R]`: 200 with `Content-Length` and `x-pier-holding: local` or
//!   `filling` when the peer holds the blob (linked to `R` when given), else 404.
//! - `GET /blobs/<digest>[?repo=R][&upstream=U&fill=1]` with an optional `Range: bytes=N-`: the
//!   bytes, from the store or the peer's growing fill. With `fill=1` a peer that lacks the blob
//!   fills it from upstream `U` (never from another peer: no loops).
//! - `GET /manifests/<reference>?repo=R[&upstream=U]`: a manifest the peer has (hosted), or that
//!   it resolves through its own mirror (with `upstream`): 200 with the exact bytes, else 404.
//! - `POST /pull` (JSON [`PullRequest`]): make the peer hold a blob or manifest durably, fetched
//!   from the node named `from` (or any holder); 200 once it does.
//! - `POST /swarm/<digest>` (JSON [`SwarmReport`]): tell a blob's swarm coordinator which
//!   pieces this node holds; it answers (JSON [`SwarmAnswer`]) with the piece digests and who
//!   holds which pieces. With `upstream` and `repo` in the report, a coordinator lacking the blob
//!   starts filling it from that upstream first (taking the pieces the members hold from them
//!   when the report carries the blob's piece digests: a takeover). With `repo` alone the blob
//!   is hosted content of that repository: 404 unless the coordinator has it linked there or
//!   fetches it for that repository (lacking it, it starts that fetch from the peers that
//!   store it there).
//! - `GET /blobs/<digest>` with `x-pier-piece: 1` and `Range: bytes=A-B`: pieces, served only
//!   when the peer holds every piece the range touches (from its store, or its growing fill
//!   whatever order the fill receives them in), else 404.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use pier_cluster::{ClusterSecret, NodeId};
use pier_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::metrics::PeerMetrics;

/// Header a peer sets on a blob HEAD: `local` (in its store) or `filling` (being fetched from
/// an upstream now).
pub const HOLDING_HEADER: &str = "x-pier-holding";
/// The whole blob's size on a ranged peer answer.
pub const SIZE_HEADER: &str = "x-pier-blob-size";

/// How long peer requests may take.
#[derive(Debug, Clone, Copy)]
pub struct PeerTimeouts {
    /// To open a TCP connection. A dead peer refuses at once; a partitioned one is given this.
    pub connect: Duration,
    /// For a HEAD or a small request to answer.
    pub quick: Duration,
    /// For a peer to start sending a blob it holds.
    pub first_byte: Duration,
    /// For a peer that fills from its upstream to start sending (the upstream's own first-byte
    /// deadline, and a margin).
    pub fill_first_byte: Duration,
    /// Without a byte mid-stream before the stream is failed (and resumed elsewhere).
    pub stall: Duration,
    /// For a pull request (the peer fetches the whole blob before answering).
    pub pull: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        PeerTimeouts {
            connect: Duration::from_millis(500),
            quick: Duration::from_millis(1000),
            first_byte: Duration::from_secs(2),
            fill_first_byte: Duration::from_secs(35),
            stall: Duration::from_secs(10),
            pull: Duration::from_secs(3600),
        }
    }
}

/// Why a peer request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("peer {0} unreachable: {1}")]
    Unreachable(String, String),
    #[error("peer {0} did not answer in time ({1})")]
    Timeout(String, String),
    #[error("peer {0} does not have it")]
    NotFound(String),
    #[error("peer {0} is sending as many pieces as it will at once")]
    Busy(String),
    #[error("peer {0} answered {1}: {2}")]
    Status(String, u16, String),
    #[error("peer {0}: {1}")]
    Protocol(String, String),
    #[error("peer client: {0}")]
    Client(String),
}

impl PeerError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, PeerError::NotFound(_))
    }
}

/// What a peer holds of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holding {
    pub size: u64,
    /// In its store (`true`) or being filled from an upstream (`false`).
    pub local: bool,
}

/// A peer's blob stream.
pub struct BlobAnswer {
    /// The whole blob's size, when the peer knows it.
    pub size: Option<u64>,
    pub body: std::pin::Pin<Box<dyn Stream<Item = Result<Bytes, PeerError>> + Send>>,
}

/// A manifest from a peer.
#[derive(Debug, Clone)]
pub struct ManifestAnswer {
    pub bytes: Bytes,
    pub media_type: String,
    /// What the peer says its digest is (the caller verifies).
    pub digest: Option<String>,
    /// `hit`, `miss` or `stale`, as the peer's mirror answered it.
    pub cache: Option<String>,
}

/// Ask a peer to hold something durably.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullRequest {
    /// `blob` or `manifest`.
    pub kind: String,
    pub repo: String,
    pub digest: String,
    /// For a manifest: the tag to point at it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The node to fetch from first (it holds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// For mirrored content: the upstream to fill from when no peer holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// Header that makes a ranged blob GET a piece request: answered from whatever pieces the peer
/// holds, in or out of order, instead of waiting for its fill to reach them.
pub const PIECE_HEADER: &str = "x-pier-piece";
/// On a piece request's 404: the holder has the piece but is sending as many pieces as it
/// will at once (older nodes send the 404 alone, which reads as "not here").
pub const BUSY_HEADER: &str = "x-pier-busy";

/// What a swarm member tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SwarmReport {
    /// The pieces it holds, as a hex bitmap (empty before it knows the piece count).
    #[serde(default)]
    pub have: String,
    /// How many piece digests it knows without a gap from the first; the answer sends the rest.
    #[serde(default)]
    pub known: u32,
    /// For mirrored content: the upstream and cache repository the coordinator fills from when
    /// it lacks the blob. `repo` without `upstream`: hosted content of that repository, which
    /// the coordinator shares only when the blob is linked to that repository on it or it
    /// fetches it for that repository (starting that fetch when it lacks the blob); else 404.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// Holders that sent this node a bad piece or failed to send one: the coordinator stops
    /// offering them to anyone and hands their pieces out again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad: Vec<String>,
    /// Sent to a node that takes over from a coordinator that stopped answering, until it
    /// answers: the blob's size, piece size and the piece digests this member knows (from
    /// the first piece on), so that a new coordinator that is not fetching the blob takes the
    /// pieces the members hold from them instead of filling from byte 0. Unverified: the new
    /// coordinator checks the whole blob's digest before it is visible. 0 and empty otherwise.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub piece_size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<Option<String>>,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

/// One holder of pieces, as the coordinator knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwarmHolder {
    pub node: String,
    /// Hex bitmap of the pieces it holds.
    pub have: String,
}

/// The coordinator's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwarmAnswer {
    pub size: u64,
    /// `false`: the blob is too small to be worth swarming; fetch it directly.
    pub swarm: bool,
    pub piece_size: u64,
    /// Digests (`blake3:…`, or `sha256:…`) of pieces `digests_from..`, `None` where the coordinator has not
    /// hashed the piece yet.
    pub digests_from: u32,
    pub digests: Vec<Option<String>>,
    /// Who holds which pieces: the coordinator, and members that reported recently (the
    /// asker excluded). A coordinator that sends `members` names only a sample of them, the
    /// holders of the pieces the asker lacks; an older one names every member.
    pub holders: Vec<SwarmHolder>,
    /// Pieces only the coordinator holds that the asker should take from it (and then share):
    /// so each piece leaves the coordinator about once.
    pub assign: Vec<u32>,
    /// Members of the swarm, the coordinator included; 0 from a coordinator that names every
    /// member in `holders` instead.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub members: u32,
    /// How many members (the coordinator included) hold each of the pieces
    /// `held_from..held_from + held.len()`: the asker's window.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_from: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<u32>,
}

/// Recent first-byte latencies of peer requests, for the hedge delay.
struct Latencies {
    recent: VecDeque<Duration>,
}

const LATENCY_WINDOW: usize = 128;
/// Bounds of the hedge delay: never hedge sooner (a healthy LAN answers well within it), never
/// wait longer (a hung peer must not hold a pull).
const HEDGE_MIN: Duration = Duration::from_millis(50);
const HEDGE_MAX: Duration = Duration::from_millis(1000);
const HEDGE_DEFAULT: Duration = Duration::from_millis(250);

/// A peer's clock as [`PeerClient::health`] read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerClock {
    /// The peer's unix milliseconds.
    pub peer_ms: u64,
    /// This node's unix milliseconds halfway through the round trip.
    pub local_ms: u64,
    pub round_trip_ms: u64,
}

impl PeerClock {
    /// How far the peer's clock is ahead of this node's (negative: behind), in milliseconds.
    pub fn skew_ms(&self) -> i64 {
        self.peer_ms as i64 - self.local_ms as i64
    }
}

/// The client. Cheap to clone.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    local: String,
    secret: ClusterSecret,
    timeouts: PeerTimeouts,
    latencies: Arc<Mutex<Latencies>>,
    metrics: Arc<PeerMetrics>,
    /// `https` with mutual TLS between peers, else `http`.
    scheme: &'static str,
}

fn enc(s: &str) -> String {
    form_urlencode(s)
}

/// Percent-encode a query value (names and digests are mostly safe; `/` and `:` are kept).
fn form_urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' | b':' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

impl PeerClient {
    pub fn new(
        local: String,
        secret: ClusterSecret,
        timeouts: PeerTimeouts,
        metrics: Arc<PeerMetrics>,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<PeerClient, PeerError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(30));
        let scheme = match tls {
            Some(config) => {
                builder = builder.use_preconfigured_tls(config);
                "https"
            }
            None => "http",
        };
        let http = builder
            .build()
            .map_err(|e| PeerError::Client(e.to_string()))?;
        Ok(PeerClient {
            http,
            local,
            secret,
            timeouts,
            latencies: Arc::new(Mutex::new(Latencies {
                recent: VecDeque::new(),
            })),
            metrics,
            scheme,
        })
    }

    pub fn metrics(&self) -> &Arc<PeerMetrics> {
        &self.metrics
    }

    pub fn timeouts(&self) -> PeerTimeouts {
        self.timeouts
    }

    /// How long to wait for a peer before also asking the next one: twice the 90th percentile
    /// of recent first-byte times, within [50 ms, 1 s].
    pub fn hedge_delay(&self) -> Duration {
        let l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.recent.len() < 8 {
            return HEDGE_DEFAULT;
        }
        let mut v: Vec<Duration> = l.recent.iter().copied().collect();
        v.sort();
        let p90 = v[(v.len() * 9 / 10).min(v.len() - 1)];
        (p90 * 2).clamp(HEDGE_MIN, HEDGE_MAX)
    }

    fn observe(&self, took: Duration) {
        let mut l = self.latencies.lock().unwrap_or_else(|e| e.into_inner());
        if l.recent.len() >= LATENCY_WINDOW {
            l.recent.pop_front();
        }
        l.recent.push_back(took);
    }

    fn request(
        &self,
        method: reqwest::Method,
        peer: &NodeId,
        path_and_query: &str,
    ) -> reqwest::RequestBuilder {
        let url = format!("{}://{}{}", self.scheme, peer.addr, path_and_query);
        let auth = self
            .secret
            .sign(method.as_str(), path_and_query, &self.local);
        self.http
            .request(method, url)
            .header(pier_cluster::secret::AUTH_HEADER, auth)
    }

    /// Send, with `deadline` for the response head; classify failures.
    async fn send(
        &self,
        op: &'static str,
        peer: &NodeId,
        req: reqwest::RequestBuilder,
        deadline: Duration,
    ) -> Result<reqwest::Response, PeerError> {
        let started = Instant::now();
        let sent = tokio::time::timeout(deadline, req.send()).await;
        let result = match sent {
            Err(_) => Err(PeerError::Timeout(
                peer.name.clone(),
                format!("no answer within {} ms", deadline.as_millis()),
            )),
            Ok(Err(e)) if e.is_connect() || e.is_timeout() => {
                Err(PeerError::Unreachable(peer.name.clone(), chain(&e)))
            }
            Ok(Err(e)) => Err(PeerError::Protocol(peer.name.clone(), chain(&e))),
            Ok(Ok(resp)) => {
                self.observe(started.elapsed());
                self.metrics.latency(op, started.elapsed());
                Ok(resp)
            }
        };
        let label = match &result {
            Ok(r) if r.status().is_success() => "ok",
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => "not_found",
            Ok(_) => "error",
            Err(PeerError::Timeout(..)) => "timeout",
            Err(PeerError::Unreachable(..)) => "unreachable",
            Err(_) => "error",
        };
        self.metrics.request(op, label);
        result
    }

    async fn check(peer: &NodeId, resp: reqwest::Response) -> Result<reqwest::Response, PeerError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        if status == reqwest::StatusCode::NOT_FOUND {
            if resp.headers().contains_key(BUSY_HEADER) {
                return Err(PeerError::Busy(peer.name.clone()));
            }
            return Err(PeerError::NotFound(peer.name.clone()));
        }
        let body = resp.text().await.unwrap_or_default();
        let mut body: String = body.chars().take(300).collect();
        if body.is_empty() {
            body = status.canonical_reason().unwrap_or("").to_string();
        }
        Err(PeerError::Status(peer.name.clone(), status.as_u16(), body))
    }

    /// Whether `peer` holds `digest` (linked to `repo` when given).
    pub async fn head_blob(
        &self,
        peer: &NodeId,
        digest: &Digest,
        repo: Option<&str>,
    ) -> Result<Option<Holding>, PeerError> {
        let mut path = format!("/peer/v1/blobs/{digest}");
        if let Some(repo) = repo {
            path.push_str(&format!("?repo={}", enc(repo)));
        }
        let req = self.request(reqwest::Method::HEAD, peer, &path);
        let resp = self
            .send("head_blob", peer, req, self.timeouts.quick)
            .await?;
        match Self::check(peer, resp).await {
            Ok(resp) => {
                let size = resp
                    .headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let local = resp
                    .headers()
                    .get(HOLDING_HEADER)
                    .is_none_or(|v| v.as_bytes() == b"local");
                Ok(Some(Holding { size, local }))
            }
            Err(PeerError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Stream `digest` from `offset` on. `fill`: the (upstream, repository) the peer should fill
    /// from when it lacks the blob.
    pub async fn get_blob(
        &self,
        peer: &NodeId,
        digest: &Digest,
        offset: u64,
        repo: Option<&str>,
        fill: Option<&str>,
    ) -> Result<BlobAnswer, PeerError> {
        let mut path = format!("/peer/v1/blobs/{digest}");
        let mut q = Vec::new();
        if let Some(repo) = repo {
            q.push(format!("repo={}", enc(repo)));
        }
        if let Some(up) = fill {
            q.push(format!("upstream={}&fill=1", enc(up)));
        }
        if !q.is_empty() {
            path.push('?');
            path.push_str(&q.join("&"));
        }
        let mut req = self.request(reqwest::Method::GET, peer, &path);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let deadline = if fill.is_some() {
            self.timeouts.fill_first_byte
        } else {
            self.timeouts.first_byte
        };
        let resp = self.send("get_blob", peer, req, deadline).await?;
        let resp = Self::check(peer, resp).await?;
        if offset > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(PeerError::Protocol(
                peer.name.clone(),
                format!("asked for bytes from {offset}, got {}", resp.status()),
            ));
        }
        let size = resp
            .headers()
            .get(SIZE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .or_else(|| (offset == 0).then(|| resp.content_length()).flatten());
        let name = peer.name.clone();
        let stall = self.timeouts.stall;
        let metrics = self.metrics.clone();
        let body = resp.bytes_stream();
        let body = futures::stream::unfold(Some(Box::pin(body)), move |state| {
            let name = name.clone();
            let metrics = metrics.clone();
            async move {
                let mut body = state?;
                match tokio::time::timeout(stall, body.next()).await {
                    Err(_) => Some((
                        Err(PeerError::Timeout(
                            name,
                            format!("stream stalled for {} s", stall.as_secs()),
                        )),
                        None,
                    )),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((Err(PeerError::Protocol(name, chain(&e))), None)),
                    Ok(Some(Ok(b))) => {
                        metrics.bytes.inc_by(b.len() as u64);
                        Some((Ok(b), Some(body)))
                    }
                }
            }
        });
        Ok(BlobAnswer {
            size,
            body: Box::pin(body),
        })
    }

    /// A manifest from `peer`: hosted there (`upstream` None) or resolved by its mirror.
    pub async fn get_manifest(
        &self,
        peer: &NodeId,
        repo: &str,
        reference: &str,
        upstream: Option<&str>,
    ) -> Result<Option<ManifestAnswer>, PeerError> {
        let mut path = format!("/peer/v1/manifests/{}?repo={}", enc(reference), enc(repo));
        if let Some(up) = upstream {
            path.push_str(&format!("&upstream={}", enc(up)));
        }
        let req = self.request(reqwest::Method::GET, peer, &path);
        // A peer resolving through its mirror may be waiting on its upstream.
        let deadline = if upstream.is_some() {
            self.timeouts.fill_first_byte
        } else {
            self.timeouts.first_byte
        };
        let resp = self.send("get_manifest", peer, req, deadline).await?;
        let resp = match Self::check(peer, resp).await {
            Ok(r) => r,
            Err(PeerError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let media_type = header("content-type").unwrap_or_default();
        let digest = header("docker-content-digest");
        let cache = header("x-pier-cache");
        let bytes = tokio::time::timeout(self.timeouts.first_byte, resp.bytes())
            .await
            .map_err(|_| PeerError::Timeout(peer.name.clone(), "manifest body".into()))?
            .map_err(|e| PeerError::Protocol(peer.name.clone(), chain(&e)))?;
        Ok(Some(ManifestAnswer {
            bytes,
            media_type,
            digest,
            cache,
        }))
    }

    /// Ask `peer` whether it answers, and its clock: the peer's unix milliseconds, and the
    /// local unix milliseconds halfway through the round trip (so their difference is the
    /// skew, within half the round trip).
    pub async fn health(&self, peer: &NodeId) -> Result<PeerClock, PeerError> {
        let now_ms = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        let sent = now_ms();
        let req = self.request(reqwest::Method::GET, peer, "/peer/v1/health");
        let resp = self
            .send("health", peer, req, self.timeouts.first_byte)
            .await?;
        let resp = Self::check(peer, resp).await?;
        let body: serde_json::Value = tokio::time::timeout(self.timeouts.first_byte, resp.json())
            .await
            .map_err(|_| PeerError::Timeout(peer.name.clone(), "health body".into()))?
            .map_err(|e| PeerError::Protocol(peer.name.clone(), chain(&e)))?;
        let received = now_ms();
        let peer_ms = body["time_ms"].as_u64().ok_or_else(|| {
            PeerError::Protocol(peer.name.clone(), "health answer has no time_ms".into())
        })?;
        Ok(PeerClock {
            peer_ms,
            local_ms: sent + (received.saturating_sub(sent)) / 2,
            round_trip_ms: received.saturating_sub(sent),
        })
    }

    /// Report to a swarm's coordinator and learn the swarm's state. `first`: the coordinator
    /// may have to start its fill before it can answer, so it is given the fill deadline.
    pub async fn swarm(
        &self,
        peer: &NodeId,
        digest: &Digest,
        report: &SwarmReport,
        first: bool,
    ) -> Result<SwarmAnswer, PeerError> {
        let path = format!("/peer/v1/swarm/{digest}");
        let req = self
            .request(reqwest::Method::POST, peer, &path)
            .json(report);
        let deadline = if first {
            self.timeouts.fill_first_byte
        } else {
            self.timeouts.first_byte
        };
        let resp = self.send("swarm", peer, req, deadline).await?;
        let resp = Self::check(peer, resp).await?;
        let body = tokio::time::timeout(self.timeouts.first_byte, resp.bytes())
            .await
            .map_err(|_| PeerError::Timeout(peer.name.clone(), "swarm answer body".into()))?
            .map_err(|e| PeerError::Protocol(peer.name.clone(), chain(&e)))?;
        serde_json::from_slice(&body)
            .map_err(|e| PeerError::Protocol(peer.name.clone(), format!("bad swarm answer: {e}")))
    }

    /// Bytes `start..end` of `digest` from `peer`'s pieces, whole. Fails (without retrying) if
    /// the peer lacks them, stalls, or sends a different length.
    pub async fn get_piece(
        &self,
        peer: &NodeId,
        digest: &Digest,
        start: u64,
        end: u64,
    ) -> Result<Bytes, PeerError> {
        let path = format!("/peer/v1/blobs/{digest}");
        let req = self
            .request(reqwest::Method::GET, peer, &path)
            .header(PIECE_HEADER, "1")
            .header(
                reqwest::header::RANGE,
                format!("bytes={start}-{}", end.saturating_sub(1)),
            );
        let resp = self
            .send("get_piece", peer, req, self.timeouts.first_byte)
            .await?;
        let resp = Self::check(peer, resp).await?;
        if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
            return Err(PeerError::Protocol(
                peer.name.clone(),
                format!("asked for a piece, got {}", resp.status()),
            ));
        }
        let want = (end - start) as usize;
        let mut out = bytes::BytesMut::with_capacity(want);
        let mut body = Box::pin(resp.bytes_stream());
        loop {
            match tokio::time::timeout(self.timeouts.stall, body.next()).await {
                Err(_) => {
                    return Err(PeerError::Timeout(
                        peer.name.clone(),
                        format!("piece stalled for {} s", self.timeouts.stall.as_secs()),
                    ))
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(PeerError::Protocol(peer.name.clone(), chain(&e))),
                Ok(Some(Ok(b))) => {
                    if out.len() + b.len() > want {
                        return Err(PeerError::Protocol(
                            peer.name.clone(),
                            "piece longer than asked".into(),
                        ));
                    }
                    self.metrics.bytes.inc_by(b.len() as u64);
                    out.extend_from_slice(&b);
                }
            }
        }
        if out.len() != want {
            return Err(PeerError::Protocol(
                peer.name.clone(),
                format!("piece ended after {} of {want} bytes", out.len()),
            ));
        }
        Ok(out.freeze())
    }

    /// Ask `peer` to hold something durably; returns once it does.
    pub async fn pull(&self, peer: &NodeId, pull: &PullRequest) -> Result<(), PeerError> {
        let req = self
            .request(reqwest::Method::POST, peer, "/peer/v1/pull")
            .json(pull);
        let resp = self.send("pull", peer, req, self.timeouts.pull).await?;
        Self::check(peer, resp).await.map(|_| ())
    }
}

/// An error with its causes, for logs and client messages.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let c = c.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        cause = c_source(cause);
    }
    s
}

fn c_source<'a>(
    e: Option<&'a (dyn std::error::Error + 'static)>,
) -> Option<&'a (dyn std::error::Error + 'static)> {
    e.and_then(|e| e.source())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_swarm_answer_without_counts_still_parses_and_one_with_them_round_trips() {
        // What a coordinator from before the counts sends: every member named, no counts.
        let old = r#"{"size":8388608,"swarm":true,"piece_size":4194304,"digests_from":0,
            "digests":[null,null],"holders":[{"node":"a","have":"03"}],"assign":[1]}"#;
        let a: SwarmAnswer = serde_json::from_str(old).unwrap();
        assert_eq!((a.members, a.held_from, a.held.len()), (0, 0, 0));
        assert_eq!(a.holders[0].node, "a");
        let new = SwarmAnswer {
            members: 1000,
            held_from: 1,
            held: vec![3],
            ..a
        };
        let wire = serde_json::to_string(&new).unwrap();
        assert_eq!(serde_json::from_str::<SwarmAnswer>(&wire).unwrap(), new);
        // An answer without counts is sent as before, so an older fetcher reads it as ever.
        let plain = SwarmAnswer {
            members: 0,
            held_from: 0,
            held: Vec::new(),
            ..new
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("members"));
    }

    #[test]
    fn swarm_reports_stay_readable_both_ways() {
        // A report from a node that predates hosted swarms and takeover seeds parses, with
        // the new fields empty.
        let old: SwarmReport = serde_json::from_str(
            r#"{"have":"ff","known":8,"upstream":"docker.io","repo":"docker.io/library/x"}"#,
        )
        .unwrap();
        assert_eq!(old.known, 8);
        assert_eq!((old.size, old.piece_size), (0, 0));
        assert!(old.digests.is_empty());
        // A report without a seed carries none of its fields, so older coordinators see
        // exactly what they used to; a hosted one names only its repository.
        let hosted = SwarmReport {
            repo: Some("team/app".into()),
            ..SwarmReport::default()
        };
        let json = serde_json::to_value(&hosted).unwrap();
        assert_eq!(
            json,
            serde_json::json!({ "have": "", "known": 0, "repo": "team/app" })
        );
        // A seed goes across whole.
        let seeded = SwarmReport {
            size: 64 << 20,
            piece_size: 4 << 20,
            digests: vec![Some("blake3:00".into()), None],
            ..hosted
        };
        let back: SwarmReport =
            serde_json::from_str(&serde_json::to_string(&seeded).unwrap()).unwrap();
        assert_eq!(back, seeded);
    }
}
