//! What a run measures while it runs: per-worker [`Stats`] (latency histograms and counts by
//! request kind, errors by kind) merged when the workers finish, and shared [`Counters`] that the
//! progress bar reads live and that count bytes as they move.
//!
//! Each worker owns its `Stats`, so recording a request takes no lock; merging is done once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hdrhistogram::Histogram;

/// The kinds of HTTP request a scenario makes; each gets its own row in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    ManifestGet,
    BlobGet,
    /// A monolithic `POST ?digest=` (or the `PUT` of a registry that answered it with 202).
    BlobPut,
    UploadStart,
    UploadChunk,
    UploadFinish,
    ManifestPut,
    /// A token endpoint request; not counted in the totals, which are about the registry.
    Token,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ManifestGet => "manifest_get",
            Kind::BlobGet => "blob_get",
            Kind::BlobPut => "blob_put",
            Kind::UploadStart => "upload_start",
            Kind::UploadChunk => "upload_chunk",
            Kind::UploadFinish => "upload_finish",
            Kind::ManifestPut => "manifest_put",
            Kind::Token => "token",
        }
    }
}

/// Why one request failed, as counted in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// An unexpected status (`http_404`, `http_503`, …).
    Status(u16),
    Connect,
    Timeout,
    /// The connection broke while sending or receiving a body.
    Body,
    /// `--verify`: the downloaded bytes do not hash to the digest asked for.
    DigestMismatch,
    /// A manifest that does not parse, or an index with no manifests.
    BadManifest,
    /// A response the protocol does not allow (a missing `Location`, say).
    Protocol,
    /// The token endpoint refused or failed.
    Auth,
    Other,
}

impl Failure {
    pub fn label(&self) -> String {
        match self {
            Failure::Status(code) => format!("http_{code}"),
            Failure::Connect => "connect".into(),
            Failure::Timeout => "timeout".into(),
            Failure::Body => "body".into(),
            Failure::DigestMismatch => "digest_mismatch".into(),
            Failure::BadManifest => "bad_manifest".into(),
            Failure::Protocol => "protocol".into(),
            Failure::Auth => "auth".into(),
            Failure::Other => "other".into(),
        }
    }

    pub fn from_reqwest(e: &reqwest::Error) -> Failure {
        if e.is_timeout() {
            Failure::Timeout
        } else if e.is_connect() {
            Failure::Connect
        } else if e.is_body() || e.is_decode() || e.is_request() {
            Failure::Body
        } else {
            Failure::Other
        }
    }
}

/// Latencies from 1 µs to an hour with three significant digits: a few tens of KiB each.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug, Clone)]
pub struct KindStats {
    pub requests: u64,
    pub errors: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Microseconds from sending the request to its last body byte, successful requests only
    /// (a fast error would otherwise flatter the percentiles).
    pub latency: Histogram<u64>,
}

impl Default for KindStats {
    fn default() -> Self {
        KindStats {
            requests: 0,
            errors: 0,
            bytes_in: 0,
            bytes_out: 0,
            latency: histogram(),
        }
    }
}

impl KindStats {
    fn merge(&mut self, other: &KindStats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
    }
}

/// One worker's (or, merged, one run's) measurements.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub operations: u64,
    pub failed_operations: u64,
    pub kinds: BTreeMap<Kind, KindStats>,
    pub errors: BTreeMap<String, u64>,
}

impl Stats {
    pub fn success(&mut self, kind: Kind, latency: Duration, bytes_out: u64) {
        let k = self.kinds.entry(kind).or_default();
        k.requests += 1;
        k.bytes_out += bytes_out;
        k.latency
            .saturating_record((latency.as_micros() as u64).max(1));
    }

    pub fn failure(&mut self, kind: Kind, failure: &Failure) {
        let k = self.kinds.entry(kind).or_default();
        k.requests += 1;
        k.errors += 1;
        *self.errors.entry(failure.label()).or_default() += 1;
    }

    /// Body bytes received, counted as they arrive so a run cut short still counts them.
    pub fn received(&mut self, kind: Kind, bytes: u64) {
        self.kinds.entry(kind).or_default().bytes_in += bytes;
    }

    pub fn merge(&mut self, other: &Stats) {
        self.operations += other.operations;
        self.failed_operations += other.failed_operations;
        for (kind, k) in &other.kinds {
            self.kinds.entry(*kind).or_default().merge(k);
        }
        for (label, n) in &other.errors {
            *self.errors.entry(label.clone()).or_default() += n;
        }
    }

    /// Every registry request together (token requests excluded).
    pub fn registry_total(&self) -> KindStats {
        let mut total = KindStats::default();
        for (_, k) in self.kinds.iter().filter(|(kind, _)| **kind != Kind::Token) {
            total.merge(k);
        }
        total
    }
}

/// Live totals shared by every worker of a phase; the progress bar reads them and the report
/// takes its byte totals from them (they include the bytes of requests cut off at the end).
#[derive(Debug, Default)]
pub struct Counters {
    pub operations: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A worker's recording desk: its own [`Stats`] and the phase's shared [`Counters`], updated
/// together so the live view and the report agree.
pub struct Tally {
    pub stats: Stats,
    pub counters: Arc<Counters>,
}

impl Tally {
    pub fn new(counters: Arc<Counters>) -> Tally {
        Tally {
            stats: Stats::default(),
            counters,
        }
    }

    pub fn success(&mut self, kind: Kind, latency: Duration, bytes_out: u64) {
        self.stats.success(kind, latency, bytes_out);
        if kind != Kind::Token {
            Counters::add(&self.counters.requests, 1);
        }
    }

    pub fn failure(&mut self, kind: Kind, failure: &Failure) {
        self.stats.failure(kind, failure);
        Counters::add(&self.counters.requests, 1);
        Counters::add(&self.counters.errors, 1);
    }

    /// A token request failed: shown on the token row; the request that needed the token then
    /// fails as `auth`, which is the one error counted.
    pub fn token_failure(&mut self) {
        let k = self.stats.kinds.entry(Kind::Token).or_default();
        k.requests += 1;
        k.errors += 1;
    }

    /// A failure found after a successful exchange (a manifest that does not parse, a missing
    /// `Location`): an error, but not another request.
    pub fn error(&mut self, failure: &Failure) {
        *self.stats.errors.entry(failure.label()).or_default() += 1;
        Counters::add(&self.counters.errors, 1);
    }

    pub fn received(&mut self, kind: Kind, bytes: u64) {
        self.stats.received(kind, bytes);
        Counters::add(&self.counters.bytes_in, bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_up() {
        let mut a = Stats::default();
        a.success(Kind::BlobGet, Duration::from_millis(2), 0);
        a.received(Kind::BlobGet, 100);
        a.failure(Kind::BlobGet, &Failure::Status(404));
        let mut b = Stats::default();
        b.success(Kind::BlobGet, Duration::from_millis(4), 0);
        b.success(Kind::Token, Duration::from_millis(1), 0);
        b.failure(Kind::ManifestGet, &Failure::Status(404));
        b.operations = 2;
        a.merge(&b);
        assert_eq!(a.operations, 2);
        assert_eq!(a.errors["http_404"], 2);
        let total = a.registry_total();
        assert_eq!(total.requests, 4);
        assert_eq!(total.errors, 2);
        assert_eq!(total.bytes_in, 100);
        assert_eq!(total.latency.len(), 2);
        assert_eq!(a.kinds[&Kind::Token].requests, 1);
    }
}
