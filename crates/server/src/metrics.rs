//! Prometheus metrics. Every name starts with `pier_`; docs/metrics.md lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServedLabels {
    pub kind: &'static str,
    /// `local` (from this node's store) or `upstream` (streamed while a fill runs).
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `imported`, `duplicate`, `failed` or `retry` (imports); `allowed`, `unauthorized`,
    /// `denied` or `rate_limited` (auth).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    /// `timer` (`[cache] check_every`) or `fill` (a fill would take the store past the bound).
    pub trigger: &'static str,
}

/// The metrics the HTTP layer records, and the registry they are exposed from.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteLabels, Histogram>,
    pub served_bytes: Family<ServedLabels, Counter>,
    pub received_bytes: Family<KindLabels, Counter>,
    pub store_blobs: Gauge,
    pub store_bytes: Gauge,
    pub upload_sessions: Gauge,
    pub storage_free_bytes: Gauge,
    pub storage_writable: Gauge,
    pub store_errors: Family<KindLabels, Counter>,
    pub connections: Gauge,
    pub connections_rejected: Counter,
    pub timeouts: Family<KindLabels, Counter>,
    pub blob_served_bytes: Family<SourceLabels, Counter>,
    pub cluster_members: Family<StateLabels, Gauge>,
    pub gossip_rejected: Counter,
    pub peer_rejected: Counter,
    pub peer_sent_bytes: Counter,
    pub import_files: Family<ResultLabels, Counter>,
    pub gc_freed_blobs: Counter,
    pub gc_freed_bytes: Counter,
    pub gc_removed_manifests: Counter,
    pub check_quarantined: Counter,
    pub cache_evicted_blobs: Counter,
    pub cache_evicted_bytes: Counter,
    pub cache_passes: Family<TriggerLabels, Counter>,
    pub cache_bytes: Gauge,
    pub cache_max_bytes: Gauge,
    pub auth_requests: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics::new_with(|_| ()).0
    }

    /// The HTTP metrics plus whatever `extra` registers (the mirror's, for one), all exposed
    /// together on `/metrics`.
    pub fn new_with<T>(extra: impl FnOnce(&mut Registry) -> T) -> (Metrics, T) {
        let mut registry = Registry::with_prefix("pier");
        let more = extra(&mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route, method and status",
            requests.clone(),
        );
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 4.0, 10))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response headers, by route and method",
            duration.clone(),
        );
        let served_bytes = Family::<ServedLabels, Counter>::default();
        registry.register(
            "served_bytes",
            "Content bytes sent to clients, by kind (blob, manifest) and source (local, upstream)",
            served_bytes.clone(),
        );
        let received_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "received_bytes",
            "Content bytes accepted from clients, by kind (blob, manifest)",
            received_bytes.clone(),
        );
        let store_blobs = Gauge::default();
        registry.register(
            "store_blobs",
            "Blobs in the blob store",
            store_blobs.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_size_bytes",
            "Bytes of blobs in the blob store",
            store_bytes.clone(),
        );
        let upload_sessions = Gauge::default();
        registry.register(
            "upload_sessions_open",
            "Blob upload sessions started and not yet finished or cancelled",
            upload_sessions.clone(),
        );
        let storage_free_bytes = Gauge::default();
        registry.register(
            "storage_free_bytes",
            "Free bytes on the data directory's filesystem, as last measured",
            storage_free_bytes.clone(),
        );
        let storage_writable = Gauge::default();
        registry.register(
            "storage_writable",
            "1 while pushes and fills may write, 0 while the disk is full or below min_free_space",
            storage_writable.clone(),
        );
        let store_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "store_errors",
            "Store writes that failed or were refused, by kind (no_space)",
            store_errors.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "http_connections",
            "Client connections open now",
            connections.clone(),
        );
        let connections_rejected = Counter::default();
        registry.register(
            "http_connections_rejected",
            "Connections refused because max_connections were open",
            connections_rejected.clone(),
        );
        let timeouts = Family::<KindLabels, Counter>::default();
        registry.register(
            "http_timeouts",
            "Connections or requests cut by a timeout, by kind (header, idle, body, write)",
            timeouts.clone(),
        );
        let blob_served_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "blob_served_bytes",
            "Blob bytes sent to clients, by where this node got them (local, peer, upstream)",
            blob_served_bytes.clone(),
        );
        let cluster_members = Family::<StateLabels, Gauge>::default();
        registry.register(
            "cluster_members",
            "Cluster members this node knows, by state (alive, suspect, dead), itself included",
            cluster_members.clone(),
        );
        let gossip_rejected = Counter::default();
        registry.register(
            "cluster_gossip_rejected",
            "Gossip datagrams dropped because they did not open with the cluster secret",
            gossip_rejected.clone(),
        );
        let peer_rejected = Counter::default();
        registry.register(
            "peer_requests_rejected",
            "Requests to the peer listener refused for a missing or bad signature",
            peer_rejected.clone(),
        );
        let peer_sent_bytes = Counter::default();
        registry.register(
            "peer_sent_bytes",
            "Blob bytes this node sent to peers (whole blobs, resumed ranges and swarm pieces)",
            peer_sent_bytes.clone(),
        );
        let import_files = Family::<ResultLabels, Counter>::default();
        registry.register(
            "import_files",
            "Archive files imported (by `pier import` or the watched folder), by result \
             (imported, duplicate, failed, retry)",
            import_files.clone(),
        );
        let gc_freed_blobs = Counter::default();
        registry.register(
            "gc_freed_blobs",
            "Unreferenced blobs the garbage collector removed",
            gc_freed_blobs.clone(),
        );
        let gc_removed_manifests = Counter::default();
        registry.register(
            "gc_removed_manifests",
            "Untagged hosted manifests removed by retention ([gc] untagged_after)",
            gc_removed_manifests.clone(),
        );
        let gc_freed_bytes = Counter::default();
        registry.register(
            "gc_freed_bytes",
            "Bytes of the blobs the garbage collector removed",
            gc_freed_bytes.clone(),
        );
        let check_quarantined = Counter::default();
        registry.register(
            "check_quarantined_blobs",
            "Blobs a deep check found corrupt and moved to quarantine",
            check_quarantined.clone(),
        );
        let cache_evicted_blobs = Counter::default();
        registry.register(
            "cache_evicted_blobs",
            "Mirrored blobs evicted to keep the store under [cache] max_size or min_free",
            cache_evicted_blobs.clone(),
        );
        let cache_evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes of the evicted blobs",
            cache_evicted_bytes.clone(),
        );
        let cache_passes = Family::<TriggerLabels, Counter>::default();
        registry.register(
            "cache_passes",
            "Eviction passes, by what started them (timer, or a fill that would pass the bound)",
            cache_passes.clone(),
        );
        let cache_bytes = Gauge::default();
        registry.register(
            "cache_bytes",
            "Bytes in the blob store, which [cache] max_size bounds",
            cache_bytes.clone(),
        );
        let cache_max_bytes = Gauge::default();
        registry.register(
            "cache_max_bytes",
            "[cache] max_size in bytes (0 when unbounded)",
            cache_max_bytes.clone(),
        );
        let auth_requests = Family::<ResultLabels, Counter>::default();
        registry.register(
            "auth_requests",
            "Requests decided by authentication and authorization, by result (allowed, \
             unauthorized, denied, rate_limited); counted only when auth is on",
            auth_requests.clone(),
        );
        let metrics = Metrics {
            registry,
            requests,
            duration,
            served_bytes,
            received_bytes,
            store_blobs,
            store_bytes,
            upload_sessions,
            storage_free_bytes,
            storage_writable,
            store_errors,
            connections,
            connections_rejected,
            timeouts,
            blob_served_bytes,
            cluster_members,
            gossip_rejected,
            peer_rejected,
            peer_sent_bytes,
            import_files,
            gc_freed_blobs,
            gc_freed_bytes,
            gc_removed_manifests,
            check_quarantined,
            cache_evicted_blobs,
            cache_evicted_bytes,
            cache_passes,
            cache_bytes,
            cache_max_bytes,
            auth_requests,
        };
        (metrics, more)
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
