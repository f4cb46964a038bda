//! The mirror's metrics, and the observer that records upstream traffic. Registered into the
//! process's one Prometheus registry; docs/metrics.md lists them.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub upstream: String,
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub upstream: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointStateLabels {
    pub upstream: String,
    pub endpoint: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointResultLabels {
    pub upstream: String,
    pub endpoint: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub upstream: String,
}

pub struct MirrorMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub fills_in_flight: Gauge,
    pub upstream_bytes: Family<UpstreamLabels, Counter>,
    pub corrupt: Family<UpstreamLabels, Counter>,
    pub upstream_requests: Family<EndpointResultLabels, Counter>,
    pub upstream_duration: Family<EndpointLabels, Histogram>,
    pub endpoint_healthy: Family<EndpointLabels, Gauge>,
    pub endpoint_state: Family<EndpointStateLabels, Gauge>,
    pub fill_memory: Gauge,
    pub fill_reserved: Gauge,
    pub negative_hits: Counter,
    pub swarm_pieces: Family<ResultLabel, Counter>,
    pub swarm_fills: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl MirrorMetrics {
    pub fn new(registry: &mut Registry) -> MirrorMetrics {
        let m = MirrorMetrics {
            requests: Family::default(),
            fills_in_flight: Gauge::default(),
            upstream_bytes: Family::default(),
            corrupt: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 9))
            }),
            endpoint_healthy: Family::default(),
            endpoint_state: Family::default(),
            fill_memory: Gauge::default(),
            fill_reserved: Gauge::default(),
            negative_hits: Counter::default(),
            swarm_pieces: Family::default(),
            swarm_fills: Counter::default(),
        };
        registry.register(
            "mirror_requests",
            "Mirrored manifest and blob requests by upstream, kind and result (hit, miss, shared, stale, not_found, timeout, error)",
            m.requests.clone(),
        );
        registry.register(
            "mirror_fills_in_flight",
            "Blobs being fetched from upstreams now",
            m.fills_in_flight.clone(),
        );
        registry.register(
            "mirror_upstream_bytes",
            "Blob bytes received from each upstream",
            m.upstream_bytes.clone(),
        );
        registry.register(
            "mirror_corrupt",
            "Upstream answers discarded because their digest did not match",
            m.corrupt.clone(),
        );
        registry.register(
            "upstream_requests",
            "Requests to upstream endpoints by result (2xx, 404, 429, 4xx, 5xx, error, timeout)",
            m.upstream_requests.clone(),
        );
        registry.register(
            "upstream_request_duration_seconds",
            "Time to response headers from upstream endpoints",
            m.upstream_duration.clone(),
        );
        registry.register(
            "upstream_endpoint_healthy",
            "1 once an upstream endpoint answered, 0 while it is benched or its last request failed; absent until a request or probe has reached it",
            m.endpoint_healthy.clone(),
        );
        registry.register(
            "upstream_endpoint_state",
            "1 for an upstream endpoint's observed health (state: healthy, unhealthy, unknown until a request or probe has reached it), 0 for the others",
            m.endpoint_state.clone(),
        );
        registry.register(
            "mirror_fill_memory_bytes",
            "Bytes of fill batches held in memory (recent windows and write backlogs), within [mirror] fill_memory",
            m.fill_memory.clone(),
        );
        registry.register(
            "mirror_fill_reserved_bytes",
            "Bytes the fills in flight will add to the blob store (the sizes their sources announced)",
            m.fill_reserved.clone(),
        );
        registry.register(
            "mirror_negative_hits",
            "Manifest and blob requests answered 404 from a remembered upstream 404",
            m.negative_hits.clone(),
        );
        registry.register(
            "swarm_pieces",
            "Pieces a swarm fill fetched, by result (ok; upstream, fetched by the coordinator from its upstream; corrupt, failed its piece digest; busy, the holder was sending all it will at once; failed, the peer did not deliver)",
            m.swarm_pieces.clone(),
        );
        registry.register(
            "swarm_fills",
            "Fills that took their blob piece by piece from a swarm instead of one stream",
            m.swarm_fills.clone(),
        );
        m
    }

    pub fn piece(&self, result: &'static str) {
        self.swarm_pieces
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn request(&self, upstream: &str, kind: &'static str, result: &'static str) {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_string(),
                kind,
                result,
            })
            .inc();
    }

    /// The counter of blob bytes received from `upstream`, to keep for a whole fill.
    pub fn upstream_bytes_counter(&self, upstream: &str) -> Counter {
        self.upstream_bytes
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone()
    }

    pub fn corrupt(&self, upstream: &str) {
        self.corrupt
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .inc();
    }

    /// A configured endpoint at start: its health is unknown until something reaches it.
    pub fn endpoint_known(&self, upstream: &str, endpoint: &str) {
        self.endpoint_state_is(upstream, endpoint, pier_upstream::Health::Unknown);
    }

    fn endpoint_state_is(&self, upstream: &str, endpoint: &str, now: pier_upstream::Health) {
        for h in pier_upstream::Health::ALL {
            self.endpoint_state
                .get_or_create(&EndpointStateLabels {
                    upstream: upstream.to_string(),
                    endpoint: endpoint.to_string(),
                    state: h.as_str(),
                })
                .set(i64::from(h == now));
        }
    }
}

impl pier_upstream::Observer for MirrorMetrics {
    fn request(&self, upstream: &str, endpoint: &str, result: &'static str, elapsed: Duration) {
        self.upstream_requests
            .get_or_create(&EndpointResultLabels {
                upstream: upstream.to_string(),
                endpoint: endpoint.to_string(),
                result,
            })
            .inc();
        self.upstream_duration
            .get_or_create(&EndpointLabels {
                upstream: upstream.to_string(),
                endpoint: endpoint.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn health(&self, upstream: &str, endpoint: &str, healthy: bool) {
        self.endpoint_healthy
            .get_or_create(&EndpointLabels {
                upstream: upstream.to_string(),
                endpoint: endpoint.to_string(),
            })
            .set(i64::from(healthy));
        let now = if healthy {
            pier_upstream::Health::Healthy
        } else {
            pier_upstream::Health::Unhealthy
        };
        self.endpoint_state_is(upstream, endpoint, now);
    }
}
