//! The sync metrics: `pier_sync_jobs{state}` (jobs of the queue by state, every kind),
//! `pier_sync_bytes_total{rule}` (bytes a rule moved: uploaded to a registry, fetched by a
//! pull rule, or asked of nodes for a cluster target) and `pier_sync_lag_seconds{rule}` (the
//! age of the rule's oldest unfinished job; 0 when it has none).

use std::sync::atomic::AtomicU64;

use pier_store::jobs::{Job, JobState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

pub struct SyncMetrics {
    pub jobs: Family<StateLabel, Gauge>,
    pub bytes: Family<RuleLabel, Counter>,
    pub lag: Family<RuleLabel, Gauge<f64, AtomicU64>>,
}

const STATES: [JobState; 5] = [
    JobState::Queued,
    JobState::Running,
    JobState::Succeeded,
    JobState::Retrying,
    JobState::Failed,
];

impl SyncMetrics {
    /// Register on pier's registry, whose `pier_` prefix the names get.
    pub fn new(registry: &mut Registry) -> SyncMetrics {
        let m = SyncMetrics::unregistered();
        registry.register(
            "sync_jobs",
            "Jobs of the durable queue by state",
            m.jobs.clone(),
        );
        registry.register(
            "sync_bytes",
            "Bytes moved by sync and replicate rules",
            m.bytes.clone(),
        );
        registry.register(
            "sync_lag_seconds",
            "Age of the oldest unfinished job of each rule",
            m.lag.clone(),
        );
        m
    }

    pub fn unregistered() -> SyncMetrics {
        SyncMetrics {
            jobs: Family::default(),
            bytes: Family::default(),
            lag: Family::default(),
        }
    }

    pub fn sent(&self, rule: &str, n: u64) {
        self.bytes
            .get_or_create(&RuleLabel {
                rule: rule.to_string(),
            })
            .inc_by(n);
    }

    /// Set the gauges from the queue's jobs at `now_ms`; `rules` get a lag even when idle.
    pub fn observe(&self, jobs: &[Job], rules: &[String], now_ms: u64) {
        for state in STATES {
            let n = jobs.iter().filter(|j| j.state == state).count();
            self.jobs
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(n as i64);
        }
        for rule in rules {
            let oldest = jobs
                .iter()
                .filter(|j| j.state.is_active() && j.payload["rule"].as_str() == Some(rule))
                .map(|j| j.created_ms)
                .min();
            let lag = oldest.map_or(0.0, |c| now_ms.saturating_sub(c) as f64 / 1000.0);
            self.lag
                .get_or_create(&RuleLabel { rule: rule.clone() })
                .set(lag);
        }
    }
}
