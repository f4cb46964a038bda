//! Peer client metrics (docs/metrics.md): requests by operation and result, first-byte latency,
//! bytes received from peers.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpResult {
    pub op: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Op {
    pub op: &'static str,
}

pub struct PeerMetrics {
    pub requests: Family<OpResult, Counter>,
    pub latency: Family<Op, Histogram>,
    pub bytes: Counter,
    pub hedged: Counter,
}

impl PeerMetrics {
    pub fn new(registry: &mut Registry) -> PeerMetrics {
        let m = PeerMetrics::unregistered();
        registry.register(
            "peer_requests",
            "Requests this node made to peers, by operation and result (ok, not_found, error, timeout, unreachable)",
            m.requests.clone(),
        );
        registry.register(
            "peer_request_seconds",
            "Time until a peer's response head arrived, by operation",
            m.latency.clone(),
        );
        registry.register(
            "peer_received_bytes",
            "Blob bytes received from peers",
            m.bytes.clone(),
        );
        registry.register(
            "peer_hedged_requests",
            "Peer requests also sent to the next candidate because the first had not answered by the hedge delay",
            m.hedged.clone(),
        );
        m
    }

    /// Metrics that go nowhere (tests).
    pub fn unregistered() -> PeerMetrics {
        PeerMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 3.0, 10))
            }),
            bytes: Counter::default(),
            hedged: Counter::default(),
        }
    }

    pub fn request(&self, op: &'static str, result: &'static str) {
        self.requests.get_or_create(&OpResult { op, result }).inc();
    }

    pub fn latency(&self, op: &'static str, took: Duration) {
        self.latency
            .get_or_create(&Op { op })
            .observe(took.as_secs_f64());
    }
}
