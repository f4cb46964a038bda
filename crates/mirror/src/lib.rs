//! The pull-through mirror. For a repository that comes from an upstream it answers manifests
//! and blobs from the local stores when it can and from the upstream when it must, storing what
//! it fetches through the same stores the registry uses.
//!
//! - Routing ([`Mirror::route`]): containerd's `?ns=`, a path prefix naming an upstream, or the
//!   default upstream; see docs/mirror.md for the precedence.
//! - Blobs: one [`fill::Fill`] per missing blob, shared by every client that asks meanwhile.
//! - Manifests by digest are immutable and cached; by tag they are cached for the upstream's
//!   TTL, revalidated with HEAD, and served stale when the upstream fails.
//!
//! Architecture invariant: this crate knows nothing of HTTP servers. It knows upstreams only
//! through `pier-upstream` and storage only through `pier-store`'s traits.

pub mod fill;
pub use pier_oci::glob;
pub mod metrics;
pub mod pieces;
pub mod replicate;
pub mod room;
mod sources;
mod swarm;
pub mod swarm_sim;
/// Swarm pieces a node sends at once (the peer server turns further requests away).
pub use swarm::decide::UPLOADS as SWARM_UPLOADS;

pub use swarm::SwarmFor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use pier_oci::{Digest, Hasher, Manifest, Reference, RepoName};
use pier_store::{BlobStore, ManifestRecord, MetaStore};
use pier_upstream::{Upstream, UpstreamError};
use tokio::sync::mpsc;

use pier_cluster::NodeId;
use pier_peer::Cluster;

use crate::fill::FILL_BATCH;
use crate::fill::{Fill, FillError, MemoryBudget, Reservation};
use crate::metrics::MirrorMetrics;
use crate::pieces::{PieceHasher, Pieces};
use crate::room::{Reservations, Room};
use crate::sources::Source;
use pier_peer::rate::{limited, RateLimit};

/// Memory a fill holds besides its batches, charged for as long as it reads its source: hyper
/// reads the body into a buffer that grows to 408 KiB on a fast connection, a frame is in
/// flight, and the fill's writer thread, its connections and tasks hold the rest (measured:
/// about 0.8 MiB per fill at 128 concurrent fills, beyond what the batches are charged).
const SOURCE_BUFFERS: u64 = 1024 * 1024;
/// Batches the disk may lag behind the network before the fill stops reading the upstream.
/// Queued batches are charged to the fill memory budget like the recent window's.
const WRITE_BACKLOG: usize = 32;
/// Most upstream "not found" answers remembered at once; a flood of random names evicts the
/// oldest instead of growing memory.
const NEGATIVE_ENTRIES: usize = 10_000;

/// Limits on what fills may hold and fetch, and how long a "not found" is believed.
#[derive(Debug, Clone, Copy)]
pub struct FillPolicy {
    /// Bytes all fills together keep in memory for readers and the write backlog.
    pub memory: u64,
    /// Largest blob fetched from an upstream; a bigger (or endless) body fails the fill.
    pub max_blob_bytes: u64,
    /// How long an upstream 404 for a manifest or blob is answered without asking again
    /// (zero: not remembered).
    pub negative_ttl: Duration,
    /// Bytes per second all fills together may download from upstreams (none: no cap).
    pub max_upstream_rate: Option<u64>,
    /// Whether large blobs wanted by several nodes are swarmed (off: each node streams the
    /// blob from its owner).
    pub swarm: bool,
    /// A fault hook for tests: the piece digests this node sends a swarm's new coordinator
    /// are wrong, as a broken or malicious member's would be (`PIER_FAULT_LYING_SEED=1`).
    pub fault_lying_seed: bool,
}

impl Default for FillPolicy {
    fn default() -> Self {
        FillPolicy {
            memory: 256 * 1024 * 1024,
            max_blob_bytes: 64 * 1024 * 1024 * 1024,
            negative_ttl: Duration::from_secs(30),
            max_upstream_rate: None,
            swarm: true,
            fault_lying_seed: false,
        }
    }
}

/// What the upstream said did not exist, keyed by (cache repository, kind, reference), with
/// when it said so.
type NegativeKey = (String, &'static str, String);

/// An upstream and the policy pier applies to it.
pub struct UpstreamEntry {
    pub client: Arc<Upstream>,
    /// How long a tag's manifest is served without asking the upstream again.
    pub tag_ttl: Duration,
    /// Repository globs that may be mirrored (all when empty).
    pub allow: Vec<String>,
    /// Repository globs that may not be mirrored; wins over `allow`.
    pub deny: Vec<String>,
    /// Its images are served only to clients whose own credentials it accepts for the
    /// repository (checked by the HTTP front, docs/security.md).
    pub private: bool,
    /// How long a positive private check is remembered.
    pub private_check_ttl: Duration,
}

impl UpstreamEntry {
    pub fn name(&self) -> &str {
        self.client.name()
    }

    fn permits(&self, repo: &str) -> bool {
        let allowed = self.allow.is_empty() || self.allow.iter().any(|g| glob::matches(g, repo));
        allowed && !self.deny.iter().any(|g| glob::matches(g, repo))
    }
}

/// A request's repository resolved to an upstream.
#[derive(Clone)]
pub struct MirrorRef {
    pub upstream: Arc<UpstreamEntry>,
    /// The repository as the upstream names it (`library/nginx`).
    pub repo: String,
    /// Where pier keeps what it cached (`docker.io/library/nginx`).
    pub cache_repo: String,
}

impl MirrorRef {
    pub fn upstream_name(&self) -> &str {
        self.upstream.name()
    }
}

/// Why the mirror could not answer.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("repository {0} is not mirrored by policy")]
    NotAllowed(String),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("upstream sent content that does not match {0}")]
    Corrupt(String),
    #[error("storage failed: {0}")]
    Store(#[from] pier_store::StoreError),
    #[error("{0}")]
    Fill(FillError),
}

pub type Result<T, E = MirrorError> = std::result::Result<T, E>;

/// Where a manifest answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// From the cache, within its TTL or immutable.
    Hit,
    /// Fetched or revalidated from the upstream now.
    Miss,
    /// From the cache, because the upstream failed.
    Stale,
    /// From the key's owner in the cluster (which had it cached or asked its upstream).
    Peer,
}

/// A blob as the mirror can serve it.
pub enum BlobSource {
    /// In the local store.
    Local { size: u64 },
    /// Being fetched; read it from the fill.
    Filling { fill: Arc<Fill>, size: Option<u64> },
}

/// The mirror.
pub struct Mirror {
    upstreams: HashMap<String, Arc<UpstreamEntry>>,
    default_upstream: Option<String>,
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    max_manifest_bytes: u64,
    fills: Mutex<HashMap<Digest, Arc<Fill>>>,
    /// When each cached tag was last confirmed with its upstream.
    validated: Mutex<HashMap<(String, String), Instant>>,
    metrics: Arc<MirrorMetrics>,
    policy: FillPolicy,
    budget: Arc<MemoryBudget>,
    /// Bytes the fills in flight will add to the blob store.
    reservations: Arc<Reservations>,
    negative: Mutex<HashMap<NegativeKey, Instant>>,
    /// The cluster this node belongs to, once it has joined one.
    cluster: OnceLock<Arc<Cluster>>,
    /// One upstream manifest resolution at a time per (cache repository, reference): requests
    /// that arrive meanwhile (from clients or peers) wait and take its answer from the cache.
    resolving: Mutex<HashMap<(String, String), Turn>>,
    /// The swarms this node coordinates, by blob.
    boards: Mutex<HashMap<Digest, swarm::Board>>,
    /// Piece digests of stored blobs this node has coordinated a swarm for.
    stored_pieces: Mutex<HashMap<Digest, Arc<Pieces>>>,
    /// Held while a stored blob's piece digests are computed: the reports that arrive
    /// meanwhile wait for them instead of each reading and hashing the blob again.
    hashing_stored: tokio::sync::Mutex<()>,
    upstream_limit: Option<Arc<RateLimit>>,
}

/// One resolution's turn: held while it asks its owner or upstream.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// How a fill chooses its sources.
enum Plan {
    /// A mirrored blob; `ask_peers` false for a fill a peer's request started; `cap` the
    /// starter's own limit on the upstream's bytes (beside the node's).
    Mirrored {
        r: MirrorRef,
        ask_peers: bool,
        cap: Option<Arc<RateLimit>>,
        /// A swarm this node coordinates from the start, from the members' pieces: it took
        /// over from a coordinator that stopped answering without fetching the blob itself.
        takeover: Option<swarm::Seed>,
    },
    /// A hosted blob, from the peers that hold it (`from` first); `swarm` false for the fill
    /// a swarm coordinator starts for a member's report (it coordinates, it joins no swarm).
    Hosted {
        repo: String,
        from: Option<NodeId>,
        swarm: bool,
    },
}

/// Docker Hub's names without a namespace live under `library/`.
fn normalise(upstream: &str, repo: &str) -> String {
    if upstream == "docker.io" && !repo.contains('/') {
        format!("library/{repo}")
    } else {
        repo.to_string()
    }
}

impl Mirror {
    pub fn new(
        upstreams: Vec<UpstreamEntry>,
        default_upstream: Option<String>,
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        max_manifest_bytes: u64,
        metrics: Arc<MirrorMetrics>,
    ) -> Arc<Mirror> {
        Mirror::new_with(
            upstreams,
            default_upstream,
            blobs,
            meta,
            max_manifest_bytes,
            metrics,
            FillPolicy::default(),
        )
    }

    /// [`Mirror::new`] with fill limits other than the defaults.
    pub fn new_with(
        upstreams: Vec<UpstreamEntry>,
        default_upstream: Option<String>,
        blobs: Arc<dyn BlobStore>,
        meta: Arc<dyn MetaStore>,
        max_manifest_bytes: u64,
        metrics: Arc<MirrorMetrics>,
        policy: FillPolicy,
    ) -> Arc<Mirror> {
        let budget = MemoryBudget::new(policy.memory, metrics.fill_memory.clone());
        let reservations = Reservations::new(metrics.fill_reserved.clone());
        let upstreams = upstreams
            .into_iter()
            .map(|u| (u.name().to_string(), Arc::new(u)))
            .collect();
        Arc::new(Mirror {
            upstreams,
            default_upstream,
            blobs,
            meta,
            max_manifest_bytes,
            fills: Mutex::new(HashMap::new()),
            validated: Mutex::new(HashMap::new()),
            metrics,
            policy,
            budget,
            reservations,
            negative: Mutex::new(HashMap::new()),
            cluster: OnceLock::new(),
            resolving: Mutex::new(HashMap::new()),
            boards: Mutex::new(HashMap::new()),
            stored_pieces: Mutex::new(HashMap::new()),
            hashing_stored: tokio::sync::Mutex::new(()),
            upstream_limit: policy.max_upstream_rate.map(RateLimit::new),
        })
    }

    /// Make this mirror a cluster member's: fills ask peers before the upstream, mirrored
    /// manifests resolve through their owners. Set once, at start-up.
    pub fn set_cluster(&self, cluster: Arc<Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.get()
    }

    /// Tell `room` (the bounded cache) of every fill as it is admitted and as it ends, with the
    /// bytes all fills in flight will add. Set once, at start-up.
    pub fn set_room(&self, room: Arc<dyn Room>) {
        self.reservations.set_room(room);
    }

    /// Bytes the fills in flight will add to the blob store (the sizes their sources
    /// announced).
    pub fn reserved_bytes(&self) -> u64 {
        self.reservations.bytes()
    }

    /// Bytes of fill batches held in memory now.
    pub fn fill_memory(&self) -> u64 {
        self.budget.used()
    }

    /// Whether the upstream said `reference` does not exist less than `negative_ttl` ago.
    fn known_missing(&self, r: &MirrorRef, kind: &'static str, reference: &str) -> bool {
        if self.policy.negative_ttl.is_zero() {
            return false;
        }
        let key = (r.cache_repo.clone(), kind, reference.to_string());
        let mut negative = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        match negative.get(&key) {
            Some(t) if t.elapsed() < self.policy.negative_ttl => {
                self.metrics.negative_hits.inc();
                true
            }
            Some(_) => {
                negative.remove(&key);
                false
            }
            None => false,
        }
    }

    fn remember_missing(&self, r: &MirrorRef, kind: &'static str, reference: &str) {
        if self.policy.negative_ttl.is_zero() {
            return;
        }
        let ttl = self.policy.negative_ttl;
        let mut negative = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        if negative.len() >= NEGATIVE_ENTRIES {
            negative.retain(|_, t| t.elapsed() < ttl);
        }
        if negative.len() >= NEGATIVE_ENTRIES {
            if let Some(oldest) = negative
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone())
            {
                negative.remove(&oldest);
            }
        }
        negative.insert(
            (r.cache_repo.clone(), kind, reference.to_string()),
            Instant::now(),
        );
    }

    fn found(&self, r: &MirrorRef, kind: &'static str, reference: &str) {
        if self.policy.negative_ttl.is_zero() {
            return;
        }
        let mut negative = self.negative.lock().unwrap_or_else(|e| e.into_inner());
        negative.remove(&(r.cache_repo.clone(), kind, reference.to_string()));
    }

    pub fn metrics(&self) -> &Arc<MirrorMetrics> {
        &self.metrics
    }

    fn make_ref(&self, upstream: &Arc<UpstreamEntry>, repo: &str) -> Result<MirrorRef> {
        let repo = normalise(upstream.name(), repo);
        if !upstream.permits(&repo) {
            return Err(MirrorError::NotAllowed(format!(
                "{}/{}",
                upstream.name(),
                repo
            )));
        }
        Ok(MirrorRef {
            cache_repo: format!("{}/{}", upstream.name(), repo),
            upstream: upstream.clone(),
            repo,
        })
    }

    /// Every configured upstream, by name.
    pub fn upstreams(&self) -> Vec<Arc<UpstreamEntry>> {
        let mut all: Vec<_> = self.upstreams.values().cloned().collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Whether `name` is a configured upstream (what `?ns=` must name to be mirrored).
    pub fn has_upstream(&self, name: &str) -> bool {
        self.upstreams.contains_key(name)
    }

    /// Resolve a request's repository by `?ns=` or by path prefix. `Ok(None)`: not mirrored by
    /// either (the caller then considers hosted repositories and the default upstream).
    pub fn route(&self, name: &RepoName, ns: Option<&str>) -> Result<Option<MirrorRef>> {
        if let Some(up) = ns.and_then(|ns| self.upstreams.get(ns)) {
            // containerd sends the name without the registry; a name that still carries it
            // (through a path-prefixed mirror) is accepted too.
            let prefix = format!("{}/", up.name());
            let repo = name.as_str().strip_prefix(&prefix).unwrap_or(name.as_str());
            return self.make_ref(up, repo).map(Some);
        }
        let first = name.first();
        let looks_like_host = first.contains('.') || first.contains(':') || first == "localhost";
        if looks_like_host {
            if let Some(up) = self.upstreams.get(first) {
                if let Some((_, rest)) = name.as_str().split_once('/') {
                    return self.make_ref(up, rest).map(Some);
                }
            }
        }
        Ok(None)
    }

    /// The default upstream's view of `name`, if a default is configured.
    pub fn default_route(&self, name: &RepoName) -> Result<Option<MirrorRef>> {
        match self
            .default_upstream
            .as_ref()
            .and_then(|d| self.upstreams.get(d))
        {
            Some(up) => self.make_ref(up, name.as_str()).map(Some),
            None => Ok(None),
        }
    }

    fn fresh(&self, r: &MirrorRef, tag: &str) -> bool {
        let validated = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        validated
            .get(&(r.cache_repo.clone(), tag.to_string()))
            .is_some_and(|t| t.elapsed() < r.upstream.tag_ttl)
    }

    fn mark_fresh(&self, r: &MirrorRef, tag: &str) {
        let mut validated = self.validated.lock().unwrap_or_else(|e| e.into_inner());
        validated.insert((r.cache_repo.clone(), tag.to_string()), Instant::now());
    }

    async fn cached_manifest(
        &self,
        r: &MirrorRef,
        digest: &Digest,
    ) -> Result<Option<(ManifestRecord, Bytes)>> {
        let Some(record) = self.meta.manifest(&r.cache_repo, digest).await? else {
            return Ok(None);
        };
        Ok(self
            .meta
            .manifest_bytes(digest)
            .await?
            .map(|bytes| (record, bytes)))
    }

    /// Fetch a manifest from the upstream, verify it against `expected` (or the digest the
    /// upstream announced), and store it under the cache repository (with `tag`).
    async fn fetch_manifest(
        &self,
        r: &MirrorRef,
        reference: &str,
        expected: Option<&Digest>,
        tag: Option<&str>,
    ) -> Result<(ManifestRecord, Bytes)> {
        let fetched = r
            .upstream
            .client
            .get_manifest(&r.repo, reference, self.max_manifest_bytes)
            .await?;
        let check = expected.or(fetched.announced.as_ref());
        let digest = match check {
            Some(d) => {
                let actual = Digest::compute(d.algorithm(), &fetched.bytes);
                if actual != *d {
                    self.metrics.corrupt(r.upstream_name());
                    return Err(MirrorError::Corrupt(format!(
                        "manifest {reference}: expected {d}, got {actual}"
                    )));
                }
                actual
            }
            None => Digest::sha256(&fetched.bytes),
        };
        if let Err(e) = self
            .check_sizes(r, &fetched.bytes, &fetched.media_type)
            .await
        {
            self.metrics.corrupt(r.upstream_name());
            return Err(e);
        }
        self.store_manifest(
            &r.cache_repo,
            digest,
            fetched.bytes,
            &fetched.media_type,
            tag,
        )
        .await
    }

    /// Refuse an upstream manifest whose blob descriptors give sizes the blobs do not have:
    /// clients bound their reads by a descriptor's size, so a wrong one is never passed on.
    /// A blob is measured in the store when it is there, else by a HEAD to the upstream (all at
    /// once); one the upstream cannot size is left to the fill, which checks the bytes.
    async fn check_sizes(&self, r: &MirrorRef, bytes: &[u8], media_type: &str) -> Result<()> {
        let Ok(parsed) = Manifest::parse(bytes, Some(media_type)) else {
            return Ok(());
        };
        let measured = futures::future::join_all(
            parsed
                .blobs
                .iter()
                .filter(|b| b.urls.as_ref().is_none_or(|u| u.is_empty()))
                .map(|b| self.measure(r, &b.digest)),
        )
        .await;
        let blobs = parsed
            .blobs
            .iter()
            .filter(|b| b.urls.as_ref().is_none_or(|u| u.is_empty()));
        for (blob, size) in blobs.zip(measured) {
            if let Some(size) = size.filter(|s| *s != blob.size) {
                return Err(MirrorError::Corrupt(format!(
                    "the sizes its manifest of {} gives: the descriptor of {} says {} bytes, the blob has {size}",
                    r.repo, blob.digest, blob.size
                )));
            }
        }
        Ok(())
    }

    /// A blob's size from the store, else from the upstream; `None` when neither can tell.
    async fn measure(&self, r: &MirrorRef, digest: &Digest) -> Option<u64> {
        if let Ok(Some(size)) = self.blobs.stat(digest).await {
            return Some(size);
        }
        r.upstream
            .client
            .head_blob(&r.repo, digest)
            .await
            .ok()
            .flatten()
    }

    /// Keep a verified manifest's exact bytes under `repo` (with `tag`): a cache repository's,
    /// or a hosted one's copy replicated from a peer. Its blobs need not be here yet; they are
    /// fetched from peers when asked for.
    pub async fn store_manifest(
        &self,
        repo: &str,
        digest: Digest,
        bytes: Bytes,
        media_type: &str,
        tag: Option<&str>,
    ) -> Result<(ManifestRecord, Bytes)> {
        // Exact bytes are kept whatever they parse to; what parses gives referrers and GC data.
        let parsed = Manifest::parse(&bytes, Some(media_type)).ok();
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: parsed
                .as_ref()
                .map_or(media_type.to_string(), |m| m.media_type.clone()),
            size: bytes.len() as u64,
            artifact_type: parsed.as_ref().and_then(|m| m.artifact_type.clone()),
            subject: parsed
                .as_ref()
                .and_then(|m| m.subject.as_ref().map(|s| s.digest.clone())),
            annotations: parsed.as_ref().and_then(|m| m.annotations.clone()),
            references: parsed
                .as_ref()
                .map(|m| {
                    m.blobs
                        .iter()
                        .chain(m.manifests.iter())
                        .map(|d| d.digest.clone())
                        .collect()
                })
                .unwrap_or_default(),
            stored_ms: pier_store::jobs::unix_ms(),
        };
        self.meta
            .put_manifest(repo, &record, bytes.clone(), tag)
            .await?;
        Ok((record, bytes))
    }

    /// A mirrored manifest through its first reachable owner, so the upstream is asked once per
    /// cluster. `None` when this node should ask the upstream itself: it is the first owner
    /// reachable, or no owner could answer.
    async fn manifest_from_owners(
        &self,
        r: &MirrorRef,
        reference: &str,
        expected: Option<&Digest>,
        tag: Option<&str>,
    ) -> Result<Option<(ManifestRecord, Bytes, Freshness)>> {
        let Some(cluster) = self.cluster.get().filter(|c| c.has_peers()) else {
            return Ok(None);
        };
        let key = match tag {
            Some(tag) => format!("{}:{tag}", r.cache_repo),
            None => reference.to_string(),
        };
        let me = cluster.local().name;
        for owner in cluster.owners(key.as_bytes()) {
            if owner.name == me {
                return Ok(None);
            }
            let answer = cluster
                .client()
                .get_manifest(&owner, &r.cache_repo, reference, Some(r.upstream_name()))
                .await;
            let answer = match answer {
                Ok(Some(a)) => a,
                // The owner asked the upstream (or knows it has nothing): that is the answer.
                Ok(None) => return Err(MirrorError::Upstream(UpstreamError::NotFound)),
                Err(e) => {
                    tracing::warn!(owner = %owner.name, repo = %r.cache_repo, reference, error = %e, "manifest owner failed; trying the next");
                    continue;
                }
            };
            let announced = answer
                .digest
                .as_deref()
                .and_then(|d| d.parse::<Digest>().ok());
            let Some(want) = expected.cloned().or(announced) else {
                tracing::warn!(owner = %owner.name, reference, "owner sent a manifest without its digest");
                continue;
            };
            let actual = Digest::compute(want.algorithm(), &answer.bytes);
            if actual != want {
                tracing::warn!(owner = %owner.name, reference, expected = %want, %actual, "owner sent a manifest that does not match");
                continue;
            }
            let freshness = match answer.cache.as_deref() {
                Some("stale") => Freshness::Stale,
                _ => Freshness::Peer,
            };
            let (rec, bytes) = self
                .store_manifest(&r.cache_repo, actual, answer.bytes, &answer.media_type, tag)
                .await?;
            if let (Some(tag), false) = (tag, freshness == Freshness::Stale) {
                self.mark_fresh(r, tag);
            }
            return Ok(Some((rec, bytes, freshness)));
        }
        Ok(None)
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        &self,
        r: &MirrorRef,
        reference: &Reference,
    ) -> Result<(ManifestRecord, Bytes, Freshness)> {
        self.manifest_via(r, reference, true).await
    }

    /// A manifest for a peer's request: from the cache or this node's upstream, never from
    /// another peer.
    pub async fn manifest_for_peer(
        &self,
        r: &MirrorRef,
        reference: &Reference,
    ) -> Result<(ManifestRecord, Bytes, Freshness)> {
        self.manifest_via(r, reference, false).await
    }

    async fn manifest_via(
        &self,
        r: &MirrorRef,
        reference: &Reference,
        ask_peers: bool,
    ) -> Result<(ManifestRecord, Bytes, Freshness)> {
        let up = r.upstream_name();
        let key = reference.to_string();
        let result = if self.known_missing(r, "manifest", &key) {
            Err(MirrorError::Upstream(UpstreamError::NotFound))
        } else {
            let result = self.manifest_single(r, reference, ask_peers).await;
            match &result {
                Ok(_) => self.found(r, "manifest", &key),
                Err(MirrorError::Upstream(UpstreamError::NotFound)) => {
                    self.remember_missing(r, "manifest", &key)
                }
                Err(_) => {}
            }
            result
        };
        match &result {
            Ok((_, _, f)) => self.metrics.request(up, "manifest", freshness_label(*f)),
            Err(MirrorError::Upstream(UpstreamError::NotFound)) => {
                self.metrics.request(up, "manifest", "not_found")
            }
            Err(MirrorError::Upstream(UpstreamError::Timeout(_))) => {
                self.metrics.request(up, "manifest", "timeout")
            }
            Err(_) => self.metrics.request(up, "manifest", "error"),
        }
        result
    }

    /// [`Mirror::manifest_inner`], one at a time per reference; a waiter finds what the first
    /// one cached (fresh) and does not ask again.
    async fn manifest_single(
        &self,
        r: &MirrorRef,
        reference: &Reference,
        ask_peers: bool,
    ) -> Result<(ManifestRecord, Bytes, Freshness)> {
        let key = (r.cache_repo.clone(), reference.to_string());
        let lock = {
            let mut resolving = self.resolving.lock().unwrap_or_else(|e| e.into_inner());
            resolving.entry(key.clone()).or_default().clone()
        };
        let result = {
            let _turn = lock.lock().await;
            self.manifest_inner(r, reference, ask_peers).await
        };
        let mut resolving = self.resolving.lock().unwrap_or_else(|e| e.into_inner());
        // The last one out removes the entry (the map holds one reference, this call another).
        if resolving
            .get(&key)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            resolving.remove(&key);
        }
        result
    }

    async fn manifest_inner(
        &self,
        r: &MirrorRef,
        reference: &Reference,
        ask_peers: bool,
    ) -> Result<(ManifestRecord, Bytes, Freshness)> {
        match reference {
            Reference::Digest(d) => {
                if let Some((rec, bytes)) = self.cached_manifest(r, d).await? {
                    return Ok((rec, bytes, Freshness::Hit));
                }
                if ask_peers {
                    if let Some(found) = self
                        .manifest_from_owners(r, &d.to_string(), Some(d), None)
                        .await?
                    {
                        return Ok(found);
                    }
                }
                let (rec, bytes) = self
                    .fetch_manifest(r, &d.to_string(), Some(d), None)
                    .await?;
                Ok((rec, bytes, Freshness::Miss))
            }
            Reference::Tag(tag) => {
                let tag = tag.as_str();
                let cached = match self.meta.resolve_tag(&r.cache_repo, tag).await? {
                    Some(d) => self.cached_manifest(r, &d).await?,
                    None => None,
                };
                if let Some((rec, bytes)) = &cached {
                    if self.fresh(r, tag) {
                        return Ok((rec.clone(), bytes.clone(), Freshness::Hit));
                    }
                }
                if ask_peers {
                    match self.manifest_from_owners(r, tag, None, Some(tag)).await {
                        Ok(Some(found)) => return Ok(found),
                        Ok(None) => {}
                        // Every owner failing leaves this node's own cache and upstream.
                        Err(MirrorError::Upstream(UpstreamError::NotFound)) => {
                            return Err(MirrorError::Upstream(UpstreamError::NotFound))
                        }
                        Err(e) => return Err(e),
                    }
                }
                let head = r.upstream.client.head_manifest(&r.repo, tag).await;
                let outcome = match head {
                    Ok(head) => match (&cached, head.digest) {
                        (Some((rec, bytes)), Some(d)) if rec.digest == d => {
                            Ok((rec.clone(), bytes.clone()))
                        }
                        (_, Some(d)) => match self.cached_manifest(r, &d).await? {
                            Some((rec, bytes)) => {
                                // Known content under a moved tag: only the tag changes.
                                self.meta
                                    .put_manifest(&r.cache_repo, &rec, bytes.clone(), Some(tag))
                                    .await?;
                                Ok((rec, bytes))
                            }
                            None => {
                                self.fetch_manifest(r, &d.to_string(), Some(&d), Some(tag))
                                    .await
                            }
                        },
                        (_, None) => self.fetch_manifest(r, tag, None, Some(tag)).await,
                    },
                    Err(e) => Err(MirrorError::Upstream(e)),
                };
                match outcome {
                    Ok((rec, bytes)) => {
                        self.mark_fresh(r, tag);
                        Ok((rec, bytes, Freshness::Miss))
                    }
                    Err(MirrorError::Upstream(e)) if e.is_outage() => match cached {
                        Some((rec, bytes)) => {
                            tracing::warn!(
                                upstream = r.upstream_name(),
                                repo = %r.repo,
                                tag,
                                error = %e,
                                "upstream failing; serving the cached manifest"
                            );
                            Ok((rec, bytes, Freshness::Stale))
                        }
                        None => Err(MirrorError::Upstream(e)),
                    },
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// The size of a blob, asking the upstream with HEAD if it is not cached (no download).
    pub async fn blob_size(&self, r: &MirrorRef, digest: &Digest) -> Result<u64> {
        if self.meta.blob_link(&r.cache_repo, digest).await?.is_some() {
            if let Some(size) = self.blobs.stat(digest).await? {
                return Ok(size);
            }
        }
        let fill = {
            let fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
            fills.get(digest).cloned()
        };
        if let Some(fill) = fill {
            if let Ok(Some(size)) = fill.started().await {
                return Ok(size);
            }
        }
        let key = digest.to_string();
        if self.known_missing(r, "blob", &key) {
            return Err(MirrorError::Upstream(UpstreamError::NotFound));
        }
        let head = r.upstream.client.head_blob(&r.repo, digest).await;
        if matches!(head, Err(UpstreamError::NotFound)) {
            self.remember_missing(r, "blob", &key);
        }
        match head? {
            Some(size) => Ok(size),
            None => Err(MirrorError::Upstream(UpstreamError::Protocol(
                "HEAD without Content-Length".into(),
            ))),
        }
    }

    /// A blob: local if cached, otherwise the (possibly shared) fill bringing it in from peers
    /// or the upstream.
    pub async fn blob(self: &Arc<Self>, r: &MirrorRef, digest: &Digest) -> Result<BlobSource> {
        self.mirrored_blob(r, digest, true, None, None).await
    }

    /// [`Mirror::blob`] for a caller with its own cap (a pull rule's `bandwidth`): a fill this
    /// call starts reads its upstream through `cap` as well as the node's
    /// `max_upstream_rate`. A fill already in progress is joined as it runs, and bytes from
    /// peers are not capped (they do not cross the upstream link).
    pub async fn blob_capped(
        self: &Arc<Self>,
        r: &MirrorRef,
        digest: &Digest,
        cap: Option<Arc<RateLimit>>,
    ) -> Result<BlobSource> {
        self.mirrored_blob(r, digest, true, cap, None).await
    }

    /// A blob for a peer's request: from the store, a fill in progress, or the upstream; never
    /// from another peer, so peer requests cannot loop.
    pub async fn blob_for_peer(
        self: &Arc<Self>,
        r: &MirrorRef,
        digest: &Digest,
    ) -> Result<BlobSource> {
        self.mirrored_blob(r, digest, false, None, None).await
    }

    pub(crate) async fn mirrored_blob(
        self: &Arc<Self>,
        r: &MirrorRef,
        digest: &Digest,
        ask_peers: bool,
        cap: Option<Arc<RateLimit>>,
        takeover: Option<swarm::Seed>,
    ) -> Result<BlobSource> {
        let up = r.upstream_name();
        // A fill in progress is joined before the store is asked: its blob may be committed
        // but not yet linked, and the store would then ask the upstream about it.
        if self.fill_in_progress(digest).is_none() {
            if let Some(size) = self.local_blob(r, digest).await? {
                self.metrics.request(up, "blob", "hit");
                return Ok(BlobSource::Local { size });
            }
        }
        let key = digest.to_string();
        if self.known_missing(r, "blob", &key) {
            self.metrics.request(up, "blob", "not_found");
            return Err(MirrorError::Upstream(UpstreamError::NotFound));
        }
        let plan = Plan::Mirrored {
            r: r.clone(),
            ask_peers,
            cap,
            takeover,
        };
        let (fill, leader) = self.start_fill(digest, plan);
        match fill.started().await {
            Ok(size) => {
                self.metrics
                    .request(up, "blob", if leader { "miss" } else { "shared" });
                Ok(BlobSource::Filling { fill, size })
            }
            Err(FillError::NotFound) => {
                self.metrics.request(up, "blob", "not_found");
                Err(MirrorError::Upstream(UpstreamError::NotFound))
            }
            Err(e @ FillError::Timeout(_)) => {
                self.metrics.request(up, "blob", "timeout");
                Err(MirrorError::Fill(e))
            }
            Err(e) => {
                self.metrics.request(up, "blob", "error");
                Err(MirrorError::Fill(e))
            }
        }
    }

    /// A hosted blob this node lacks, fetched from the peers that hold it linked to `repo`
    /// (`from` first, when the caller knows who has it). Linked to `repo` once verified.
    pub async fn hosted_blob(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
        from: Option<NodeId>,
    ) -> Result<BlobSource> {
        self.hosted_fill(repo, digest, from, true).await
    }

    /// [`Mirror::hosted_blob`]; `swarm` false: never from a swarm (this node coordinates it).
    pub(crate) async fn hosted_fill(
        self: &Arc<Self>,
        repo: &str,
        digest: &Digest,
        from: Option<NodeId>,
        swarm: bool,
    ) -> Result<BlobSource> {
        if let Some(size) = self.blobs.stat(digest).await? {
            if self.meta.blob_link(repo, digest).await?.is_some() {
                return Ok(BlobSource::Local { size });
            }
        }
        let plan = Plan::Hosted {
            repo: repo.to_string(),
            from,
            swarm,
        };
        let (fill, _) = self.start_fill(digest, plan);
        match fill.started().await {
            Ok(size) => Ok(BlobSource::Filling { fill, size }),
            Err(FillError::NotFound) => Err(MirrorError::Fill(FillError::NotFound)),
            Err(e) => Err(MirrorError::Fill(e)),
        }
    }

    /// The fill in progress for `digest` on this node, if any (peers may read it when its bytes
    /// come from an upstream).
    pub fn fill_in_progress(&self, digest: &Digest) -> Option<Arc<Fill>> {
        let fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
        fills.get(digest).cloned()
    }

    /// Join the fill for `digest`, or start one (then `true`): one fill per digest per node,
    /// whatever its source.
    fn start_fill(self: &Arc<Self>, digest: &Digest, plan: Plan) -> (Arc<Fill>, bool) {
        let (fill, leader) = {
            let mut fills = self.fills.lock().unwrap_or_else(|e| e.into_inner());
            match fills.get(digest) {
                Some(f) => (f.clone(), false),
                None => {
                    let f = Fill::new(self.budget.clone());
                    if let Plan::Hosted { repo, .. } = &plan {
                        let _ = f.hosted.set(repo.clone());
                    }
                    fills.insert(digest.clone(), f.clone());
                    (f, true)
                }
            }
        };
        if leader {
            self.metrics.fills_in_flight.inc();
            tokio::spawn(self.clone().lead_fill(digest.clone(), fill.clone(), plan));
        }
        (fill, leader)
    }

    /// Run the fill this node leads for `d2`, publish its outcome and take it off the fills in
    /// progress. A takeover swarm that fails (its unverified piece digests did not make the
    /// blob, say) is replaced by a clean fill from the upstream before its failure is
    /// published, so the members' next reports find that one.
    fn lead_fill(
        self: Arc<Self>,
        d2: Digest,
        f2: Arc<Fill>,
        plan: Plan,
    ) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let this = self;
            let cluster = this.cluster.get().cloned();
            let cluster = cluster.as_deref();
            let (sources, link_repo, mirrored) = match &plan {
                Plan::Mirrored {
                    r,
                    ask_peers,
                    takeover,
                    ..
                } => {
                    let c = cluster.filter(|_| *ask_peers);
                    let sources = if takeover.is_some() {
                        vec![Source::Upstream(r.clone())]
                    } else {
                        sources::plan(c, sources::Want::Mirrored(r), &d2).await
                    };
                    (sources, r.cache_repo.clone(), Some(r))
                }
                Plan::Hosted { repo, from, .. } => {
                    let mut s = sources::plan(cluster, sources::Want::Hosted(repo), &d2).await;
                    if let Some(from) = from {
                        s.retain(
                            |x| !matches!(x, Source::Peer { node, .. } if node.name == from.name),
                        );
                        s.insert(
                            0,
                            Source::Peer {
                                node: from.clone(),
                                repo: Some(repo.clone()),
                                fill: None,
                            },
                        );
                    }
                    (s, repo.clone(), None)
                }
            };
            // A large blob is taken from its swarm unless this node coordinates it (then it
            // reads the upstream, or for hosted content a peer that stores it, in one stream,
            // hashing pieces for the swarm), or coordinates a swarm it took over.
            let swarm = match (&plan, cluster) {
                (
                    Plan::Mirrored {
                        r,
                        takeover: Some(seed),
                        ..
                    },
                    Some(c),
                ) => Some((
                    SwarmFor::Mirrored(r.clone()),
                    c,
                    (c.local(), seed.answer()),
                    true,
                )),
                (
                    Plan::Mirrored {
                        r, ask_peers: true, ..
                    },
                    Some(c),
                ) if c.has_peers() && this.policy.swarm => {
                    let want = SwarmFor::Mirrored(r.clone());
                    this.join_swarm(c, &want, &d2)
                        .await
                        .map(|j| (want, c, j, false))
                }
                (
                    Plan::Hosted {
                        repo, swarm: true, ..
                    },
                    Some(c),
                ) if c.has_peers() && this.policy.swarm => {
                    let want = SwarmFor::Hosted {
                        repo: repo.clone(),
                        holders: sources
                            .iter()
                            .filter_map(|s| match s {
                                Source::Peer {
                                    node, fill: None, ..
                                } => Some(node.clone()),
                                _ => None,
                            })
                            .collect(),
                    };
                    this.join_swarm(c, &want, &d2)
                        .await
                        .map(|j| (want, c, j, false))
                }
                _ => None,
            };
            let took_over = swarm.as_ref().is_some_and(|s| s.3);
            let outcome = if let Some((want, c, joined, coordinate)) = swarm {
                this.run_swarm(&d2, &f2, &link_repo, &want, c, joined, coordinate)
                    .await
            } else if sources.is_empty() {
                Err(FillError::NotFound)
            } else {
                let cap = match &plan {
                    Plan::Mirrored { cap, .. } => cap.clone(),
                    Plan::Hosted { .. } => None,
                };
                this.run_fill(&d2, &f2, &link_repo, &sources, cluster, cap)
                    .await
            };
            match (&outcome, mirrored) {
                (Ok(()), Some(r)) => this.found(r, "blob", &d2.to_string()),
                (Err(FillError::NotFound), Some(r))
                    if sources.iter().any(|s| matches!(s, Source::Upstream(_))) =>
                {
                    this.remember_missing(r, "blob", &d2.to_string())
                }
                (Err(FillError::NotFound), _) | (Ok(()), _) => {}
                (Err(e), _) => {
                    tracing::warn!(repo = %link_repo, digest = %d2, error = %e, "fill failed");
                }
            }
            // The upstream's own verdicts stand; anything else a takeover ran into (a piece
            // or the whole blob that did not match the members' digests, a stall) is tried
            // again the plain way.
            let again = match (&outcome, mirrored) {
                (
                    Err(
                        e @ (FillError::Corrupt(_)
                        | FillError::Peer(_)
                        | FillError::Upstream(_)
                        | FillError::Timeout(_)),
                    ),
                    Some(r),
                ) if took_over => {
                    tracing::warn!(digest = %d2, error = %e, "the swarm this node took over failed; filling from the upstream alone");
                    Some(r.clone())
                }
                _ => None,
            };
            // Readers of a finished fill read the committed spool; its memory goes back to
            // the budget for fills still running.
            f2.forget_written(true);
            let retry = again.map(|r| {
                let f3 = Fill::new(this.budget.clone());
                let mut fills = this.fills.lock().unwrap_or_else(|e| e.into_inner());
                fills.insert(d2.clone(), f3.clone());
                (f3, r)
            });
            if outcome.is_ok() {
                // The swarm this node coordinates goes on from the stored blob: its piece
                // digests are the fill's, not read and hashed again.
                if let Some(p) = f2.pieces() {
                    this.remember_pieces(&d2, p.clone());
                }
            }
            f2.progress.send_modify(|p| p.outcome = Some(outcome));
            if retry.is_none() {
                let mut fills = this.fills.lock().unwrap_or_else(|e| e.into_inner());
                if fills.get(&d2).is_some_and(|f| Arc::ptr_eq(f, &f2)) {
                    fills.remove(&d2);
                }
            }
            this.metrics.fills_in_flight.dec();
            if let Some((f3, r)) = retry {
                this.metrics.fills_in_flight.inc();
                let plan = Plan::Mirrored {
                    r,
                    ask_peers: false,
                    cap: None,
                    takeover: None,
                };
                tokio::spawn(this.clone().lead_fill(d2, f3, plan));
            }
        })
    }

    /// A cached blob's size, linking a blob the store already holds (from another repository)
    /// once the upstream confirms this repository has it.
    async fn local_blob(&self, r: &MirrorRef, digest: &Digest) -> Result<Option<u64>> {
        let Some(size) = self.blobs.stat(digest).await? else {
            return Ok(None);
        };
        if self.meta.blob_link(&r.cache_repo, digest).await?.is_some() {
            return Ok(Some(size));
        }
        match r.upstream.client.head_blob(&r.repo, digest).await {
            Ok(_) => {}
            Err(e) if e.is_outage() => {}
            Err(_) => return Ok(None),
        }
        self.meta.link_blob(&r.cache_repo, digest, size).await?;
        Ok(Some(size))
    }

    /// Fetch `digest` from the first of `sources` that answers, resuming from the next with
    /// `Range` when one fails mid-stream, and commit it linked to `link_repo` once verified.
    async fn run_fill(
        &self,
        digest: &Digest,
        fill: &Arc<Fill>,
        link_repo: &str,
        sources: &[Source],
        cluster: Option<&Cluster>,
        cap: Option<Arc<RateLimit>>,
    ) -> Result<(), FillError> {
        // The source connection's own buffers are charged for as long as the fill reads: a
        // fill that finds the budget spent waits here, before asking any source.
        let _connection = self.budget.reserve(SOURCE_BUFFERS).await;
        let (mut idx, size, body) = sources::open_first(sources, 0, cluster, digest, 0).await?;
        let mut body = self.limit_upstream(&sources[idx], body, &cap);
        let max = self.policy.max_blob_bytes;
        if let Some(size) = size.filter(|&s| s > max) {
            return Err(FillError::TooLarge(format!(
                "{} announced {size} bytes for {digest}, more than the {max}-byte limit",
                sources[idx].describe()
            )));
        }
        // Where the body must end: what the source announced, else the hard cap. A body that
        // goes past it is cut there, so an endless body cannot fill the disk.
        let cut_at = size.unwrap_or(max);
        // Held until the bytes are committed (or given up): the cache makes room for them now.
        let _reserved = self.reservations.reserve(size.unwrap_or(0));
        let spool = self.blobs.spool().await.map_err(FillError::store)?;
        let _ = fill.spool.set(spool.clone());
        // A blob large enough to swarm is hashed piece by piece as it goes by, so the nodes
        // that take its pieces from each other can verify each one.
        let pieces = size
            .filter(|&s| s >= pieces::SWARM_MIN && cluster.is_some())
            .map(|s| {
                fill.pieces
                    .get_or_init(|| Arc::new(Pieces::new(s, pieces::PIECE_SIZE)))
                    .clone()
            });
        let mut piece_hasher = pieces.clone().map(PieceHasher::new);
        fill.progress.send_modify(|p| {
            p.started = true;
            p.size = size;
            p.origin = Some(sources[idx].origin());
            p.from_node = sources[idx].node_name();
        });
        // The disk is often slower than the network: the writer thread writes while this task
        // keeps receiving, hashing and handing batches to readers straight from memory (the
        // fill's recent window). The channel bounds how far the disk may lag.
        let (tx, mut rx) = mpsc::channel::<Bytes>(WRITE_BACKLOG);
        let writer_spool = spool.clone();
        let progress = fill.clone();
        let writer_pieces = pieces.clone();
        let writer_budget = self.budget.clone();
        let writer = tokio::task::spawn_blocking(move || -> Result<u64, FillError> {
            let mut pos = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                writer_spool
                    .write_at(&chunk, pos)
                    .map_err(FillError::store)?;
                pos += chunk.len() as u64;
                if let Some(p) = &writer_pieces {
                    p.mark_written(pos);
                }
                progress.progress.send_modify(|p| p.written = pos);
                // With the budget short, the window keeps only what is not on disk yet: the
                // bytes just written go back to the budget (once no reader holds them).
                if writer_budget.short_of(FILL_BATCH as u64) {
                    progress.forget_written(false);
                }
            }
            writer_spool.sync().map_err(FillError::store)?;
            Ok(pos)
        });
        // Frames are small (often 16 KiB); batching them keeps syscalls, wake-ups of readers
        // and channel hops per byte low. Readers see progress a batch at a time.
        let mut hasher = Hasher::new(digest.algorithm());
        let mut received = 0u64;
        // Looked up once per source: frames are small and many.
        let counter = |s: &Source| match s {
            Source::Upstream(r) => Some(self.metrics.upstream_bytes_counter(r.upstream_name())),
            Source::Peer { .. } => None,
        };
        let mut upstream_bytes = counter(&sources[idx]);
        let mut streamed: Result<(), FillError> = Ok(());
        let mut pending: Option<Batch> = None;
        let mut source_ended = false;
        loop {
            let next = if source_ended {
                None
            } else {
                body.next().await
            };
            let got = received + pending.as_ref().map_or(0, |b| b.buf.len() as u64);
            // A source that fails, or ends before the size it announced, is replaced by the next
            // one from the byte where it stopped; the hash goes on over the joined bytes.
            let broke = match &next {
                Some(Err(e)) => Some(e.clone()),
                None if !source_ended && size.is_some_and(|s| got < s) => Some(FillError::Peer(
                    format!("{} ended at byte {got}", sources[idx].describe()),
                )),
                _ => None,
            };
            if let Some(e) = broke {
                match sources::open_first(sources, idx + 1, cluster, digest, got).await {
                    Ok((j, s2, b2)) if s2.is_none() || size.is_none() || s2 == size => {
                        tracing::info!(
                            %digest, from = %sources[idx].describe(), to = %sources[j].describe(),
                            offset = got, error = %e, "fill resumed from the next source"
                        );
                        idx = j;
                        body = self.limit_upstream(&sources[idx], b2, &cap);
                        upstream_bytes = counter(&sources[idx]);
                        fill.progress.send_modify(|p| {
                            p.origin = Some(sources[idx].origin());
                            p.from_node = sources[idx].node_name();
                        });
                        continue;
                    }
                    Ok((j, s2, _)) => {
                        streamed = Err(FillError::Corrupt(format!(
                            "{} says {digest} has {} bytes, {} said {}",
                            sources[j].describe(),
                            s2.unwrap_or(0),
                            sources[idx].describe(),
                            size.unwrap_or(0)
                        )));
                        break;
                    }
                    Err(_) => {
                        streamed = Err(e);
                        break;
                    }
                }
            }
            let handed = match &next {
                Some(Ok(c)) => {
                    if got + c.len() as u64 > cut_at {
                        streamed = Err(FillError::TooLarge(match size {
                            Some(s) => format!("body exceeded its announced {s} bytes"),
                            None => format!("body exceeded the {max}-byte limit"),
                        }));
                        break;
                    }
                    if let Some(c2) = &upstream_bytes {
                        c2.inc_by(c.len() as u64);
                    }
                    hasher.update(c);
                    if let Some(h) = &mut piece_hasher {
                        h.update(c);
                    }
                    self.gather(fill, &tx, &mut pending, &mut received, c.clone())
                        .await
                }
                // Handled above: the fill resumed from another source or stopped.
                Some(Err(_)) => true,
                None => {
                    source_ended = true;
                    match pending.take() {
                        Some(batch) => hand_over(fill, &tx, &mut received, batch).await,
                        None => true,
                    }
                }
            };
            if !handed {
                break;
            }
            if source_ended {
                break;
            }
        }
        let checked = streamed.and_then(|()| {
            let actual = hasher.finish();
            if actual != *digest {
                return Err(FillError::Corrupt(format!(
                    "expected {digest}, got {actual}"
                )));
            }
            if size.is_some_and(|s| s != received) {
                return Err(FillError::Corrupt(format!(
                    "announced {} bytes, got {received}",
                    size.unwrap_or(0)
                )));
            }
            // Readers may have the last byte as soon as the bytes are known to be right; the
            // write and fsync that make them durable are the cache's business, not theirs.
            fill.progress.send_modify(|p| p.verified = true);
            Ok(())
        });
        drop(tx);
        // The writer's failure first: a writer that died (of a full disk, say) stops taking
        // batches, which ends the stream early and would otherwise look like a short, corrupt
        // body from the source.
        let outcome = match writer.await {
            Err(e) => Err(FillError::Store(e.to_string())),
            Ok(Err(e)) => Err(e),
            Ok(Ok(n)) => checked.map(|()| n),
        };
        let n = match outcome {
            Ok(n) if n == received => n,
            Ok(n) => Err(FillError::Store(format!("wrote {n} of {received} bytes")))?,
            Err(e) => {
                if matches!(e, FillError::Corrupt(_)) {
                    if let Source::Upstream(r) = &sources[idx] {
                        self.metrics.corrupt(r.upstream_name());
                    }
                }
                spool.discard();
                return Err(e);
            }
        };
        self.blobs
            .commit_spool(spool, digest, n)
            .await
            .map_err(FillError::store)?;
        self.meta
            .link_blob(link_repo, digest, n)
            .await
            .map_err(FillError::store)?;
        Ok(())
    }

    /// Add frame `c` to the batch being gathered, handing each full batch to the window and
    /// the writer. A batch's buffer is charged to the budget when it is allocated, at its
    /// full size. When the budget has no room even after this fill gives back what of its
    /// window is on disk, the frame goes to the writer as it is (it is the connection's buffer,
    /// charged with the source), and the fill waits until it is written before reading on:
    /// the upstream read waits for the disk and readers read the spool. `false` once the writer
    /// is gone.
    async fn gather(
        &self,
        fill: &Arc<Fill>,
        tx: &mpsc::Sender<Bytes>,
        pending: &mut Option<Batch>,
        received: &mut u64,
        mut c: Bytes,
    ) -> bool {
        while !c.is_empty() {
            if pending.is_none() {
                let room = self.budget.try_reserve(FILL_BATCH as u64).or_else(|| {
                    fill.forget_written(false);
                    self.budget.try_reserve(FILL_BATCH as u64)
                });
                match room {
                    Some(charge) => {
                        *pending = Some(Batch {
                            buf: self.budget.batch_buffer(),
                            charge,
                        })
                    }
                    None => {
                        return writer_caught_up(fill, tx, *received).await
                            && send_batch(fill, tx, received, c, false).await
                            && writer_caught_up(fill, tx, *received).await;
                    }
                }
            }
            let Some(batch) = pending.as_mut() else {
                continue;
            };
            let take = (FILL_BATCH - batch.buf.len()).min(c.len());
            batch.buf.extend_from_slice(&c.split_to(take));
            if batch.buf.len() == FILL_BATCH {
                let Some(full) = pending.take() else { continue };
                if !hand_over(fill, tx, received, full).await {
                    return false;
                }
            }
        }
        true
    }

    /// `body`, held to the node's upstream download cap, and to the fill's own `cap`, when it
    /// comes from an upstream.
    fn limit_upstream(
        &self,
        source: &Source,
        body: sources::Body,
        cap: &Option<Arc<RateLimit>>,
    ) -> sources::Body {
        match source {
            Source::Upstream(_) => limited(limited(body, self.upstream_limit.clone()), cap.clone()),
            Source::Peer { .. } => body,
        }
    }

    /// The tags list of a mirrored repository: the upstream's, or the cached tags when the
    /// upstream fails.
    pub async fn tags(&self, r: &MirrorRef, query: &str) -> Result<(Bytes, Option<String>)> {
        match r.upstream.client.tags(&r.repo, query).await {
            Ok(answer) => Ok(answer),
            Err(e) if e.is_outage() => {
                let page = self.meta.tags(&r.cache_repo, None, 10_000).await?;
                if page.items.is_empty() {
                    return Err(MirrorError::Upstream(e));
                }
                let body = format!(
                    "{{\"name\":{:?},\"tags\":[{}]}}",
                    r.repo,
                    page.items
                        .iter()
                        .map(|t| format!("{t:?}"))
                        .collect::<Vec<_>>()
                        .join(",")
                );
                Ok((Bytes::from(body), None))
            }
            Err(e) => Err(MirrorError::Upstream(e)),
        }
    }
}

/// A batch being gathered and its charge (the buffer's full capacity).
struct Batch {
    buf: Vec<u8>,
    charge: Reservation,
}

/// Keep `batch` in the fill's window and queue it for the disk.
async fn hand_over(
    fill: &Arc<Fill>,
    tx: &mpsc::Sender<Bytes>,
    received: &mut u64,
    batch: Batch,
) -> bool {
    let bytes = batch.charge.hold_batch(batch.buf);
    send_batch(fill, tx, received, bytes, true).await
}

/// Queue `bytes` (the fill's next) for the disk, remembering them for readers if `keep`.
async fn send_batch(
    fill: &Arc<Fill>,
    tx: &mpsc::Sender<Bytes>,
    received: &mut u64,
    bytes: Bytes,
    keep: bool,
) -> bool {
    if keep {
        fill.remember(*received, bytes.clone());
    }
    *received += bytes.len() as u64;
    let r = *received;
    fill.progress.send_modify(|p| p.received = r);
    tx.send(bytes).await.is_ok()
}

/// Wait until the writer has written the first `upto` bytes; `false` if it stopped (a writer
/// that failed stops receiving).
async fn writer_caught_up(fill: &Arc<Fill>, tx: &mpsc::Sender<Bytes>, upto: u64) -> bool {
    let mut progress = fill.progress.subscribe();
    tokio::select! {
        r = progress.wait_for(|p| p.written >= upto) => r.is_ok(),
        () = tx.closed() => false,
    }
}

fn freshness_label(f: Freshness) -> &'static str {
    match f {
        Freshness::Hit => "hit",
        Freshness::Miss => "miss",
        Freshness::Stale => "stale",
        Freshness::Peer => "peer",
    }
}
