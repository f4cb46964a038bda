//! The report of a run: built from the merged [`Stats`], printed as a table or as one JSON
//! object, saved and compared against a later run (`--compare`).
//!
//! The JSON carries what makes two runs comparable (scenario, its options, concurrency,
//! duration, registry, pier version) next to the numbers, and `format` is bumped if a field
//! changes meaning, so an old file is never misread.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use hdrhistogram::Histogram;
use pier_units::command_line::{format_bytes, format_ms};
use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::stats::{Counters, KindStats, Stats};

/// The version of the JSON layout.
pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    /// The version of pier (and of pier-bench: they are released together).
    pub pier_version: String,
    pub scenario: String,
    pub registry: String,
    /// Unix seconds when the measured run started.
    pub started_at: u64,
    pub concurrency: usize,
    /// How long the measured run took.
    pub duration_s: f64,
    pub limit: Limit,
    /// The scenario's parameters (images, layer size, chunking, verify…).
    pub options: serde_json::Value,
    /// Ctrl-C cut the run short; the numbers are for the part that ran.
    pub interrupted: bool,
    /// The run's numbers; for a ramp, those of the last good step (or the first step if none
    /// was good), the fair figure to compare.
    pub summary: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampReport>,
    /// An image the run pushed, for a following `pull --image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare: Option<Comparison>,
}

/// What ended the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Limit {
    /// `--duration`, in seconds.
    Duration(f64),
    /// `--requests`: this many operations.
    Operations(u64),
    /// `--ramp`: each step ran `--step-duration`.
    Ramp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub concurrency: usize,
    pub duration_s: f64,
    pub operations: u64,
    pub failed_operations: u64,
    pub operations_per_s: f64,
    /// HTTP requests to the registry, failed ones included (token requests are not counted:
    /// they are under `by_kind.token`).
    pub requests: u64,
    pub errors: u64,
    pub req_per_s: f64,
    /// Body bytes, including those of requests cut off when the run ended.
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub bytes: u64,
    /// `bytes` per second, in 10^6 bytes.
    pub mb_per_s: f64,
    /// From sending a request to the last byte of its response, successful requests only.
    pub latency_ms: Latency,
    pub errors_by_kind: BTreeMap<String, u64>,
    pub by_kind: BTreeMap<String, KindSummary>,
    /// CPU seconds (user + system) the server's processes (`--server-pid`) used during the
    /// run; absent without `--server-pid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_s: Option<f64>,
    /// `server_cpu_s` per GiB (2^30 bytes) of `bytes`: what each byte costs the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_s_per_gib: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1e3;
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            max: ms(h.max()),
            mean: round3(h.mean() / 1e3),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    pub requests: u64,
    pub errors: u64,
    pub req_per_s: f64,
    pub bytes: u64,
    pub mb_per_s: f64,
    pub latency_ms: Latency,
}

impl KindSummary {
    fn new(k: &KindStats, seconds: f64) -> KindSummary {
        let bytes = k.bytes_in + k.bytes_out;
        KindSummary {
            requests: k.requests,
            errors: k.errors,
            req_per_s: rate(k.requests as f64, seconds),
            bytes,
            mb_per_s: rate(bytes as f64 / 1e6, seconds),
            latency_ms: Latency::from_histogram(&k.latency),
        }
    }
}

fn rate(amount: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        round3(amount / seconds)
    } else {
        0.0
    }
}

/// Three decimals (a microsecond in `_ms`, a millisecond in `_s`) are all the precision a
/// benchmark has, and short decimals read back from JSON exactly.
pub(crate) fn round3(v: f64) -> f64 {
    (v * 1e3).round() / 1e3
}

impl Summary {
    pub fn new(
        stats: &Stats,
        counters: &Counters,
        elapsed: Duration,
        concurrency: usize,
        server_cpu_s: Option<f64>,
    ) -> Summary {
        let seconds = elapsed.as_secs_f64();
        let total = stats.registry_total();
        let bytes_received = Counters::get(&counters.bytes_in);
        let bytes_sent = Counters::get(&counters.bytes_out);
        let bytes = bytes_received + bytes_sent;
        Summary {
            concurrency,
            duration_s: round3(seconds),
            operations: stats.operations,
            failed_operations: stats.failed_operations,
            operations_per_s: rate(stats.operations as f64, seconds),
            requests: total.requests,
            errors: stats.errors.values().sum(),
            req_per_s: rate(total.requests as f64, seconds),
            bytes_received,
            bytes_sent,
            bytes,
            mb_per_s: rate(bytes as f64 / 1e6, seconds),
            latency_ms: Latency::from_histogram(&total.latency),
            errors_by_kind: stats.errors.clone(),
            by_kind: stats
                .kinds
                .iter()
                .map(|(kind, k)| (kind.as_str().to_string(), KindSummary::new(k, seconds)))
                .collect(),
            server_cpu_s: server_cpu_s.map(round3),
            cpu_s_per_gib: server_cpu_s
                .and_then(|cpu| crate::cpu::per_gib(cpu, bytes))
                .map(round3),
        }
    }

    /// A ramp step passes when its p99 is within the limit and at most 1% of its requests
    /// failed: a registry answering errors quickly has not kept up.
    pub fn within(&self, p99_limit: Duration) -> bool {
        self.requests > 0
            && self.latency_ms.p99 <= p99_limit.as_secs_f64() * 1e3
            && self.errors * 100 <= self.requests
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RampReport {
    pub start: usize,
    pub step: usize,
    pub max: usize,
    pub p99_limit_ms: f64,
    pub step_duration_s: f64,
    pub steps: Vec<RampStep>,
    /// The highest concurrency whose step stayed within the limit, if any did.
    pub last_good_concurrency: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RampStep {
    /// Within the limit (and not cut short by Ctrl-C).
    pub good: bool,
    pub interrupted: bool,
    pub summary: Summary,
}

/// How this run differs from a saved one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The saved report's file.
    pub against: String,
    pub req_per_s: Delta,
    pub mb_per_s: Delta,
    pub p99_ms: Delta,
    /// What makes the two runs not like for like (scenario, options, concurrency, registry,
    /// version).
    pub differences: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub before: f64,
    pub after: f64,
    /// `(after - before) / before` in percent; none when `before` is zero.
    pub change_pct: Option<f64>,
}

impl Delta {
    fn new(before: f64, after: f64) -> Delta {
        Delta {
            before,
            after,
            change_pct: (before != 0.0).then(|| round3((after - before) / before * 100.0)),
        }
    }

    fn pct(&self) -> String {
        match self.change_pct {
            Some(p) => format!("{p:+.1}%"),
            None => "n/a".into(),
        }
    }
}

impl Comparison {
    pub fn new(previous: &Report, current: &Report, against: &Path) -> Comparison {
        let mut differences = Vec::new();
        let mut differ = |what: &str, before: String, after: String| {
            if before != after {
                differences.push(format!("{what}: {before} then, {after} now"));
            }
        };
        differ(
            "scenario",
            previous.scenario.clone(),
            current.scenario.clone(),
        );
        differ(
            "options",
            previous.options.to_string(),
            current.options.to_string(),
        );
        differ(
            "concurrency",
            previous.summary.concurrency.to_string(),
            current.summary.concurrency.to_string(),
        );
        differ(
            "registry",
            previous.registry.clone(),
            current.registry.clone(),
        );
        differ(
            "pier version",
            previous.pier_version.clone(),
            current.pier_version.clone(),
        );
        let (p, c) = (&previous.summary, &current.summary);
        Comparison {
            against: against.display().to_string(),
            req_per_s: Delta::new(p.req_per_s, c.req_per_s),
            mb_per_s: Delta::new(p.mb_per_s, c.mb_per_s),
            p99_ms: Delta::new(p.latency_ms.p99, c.latency_ms.p99),
            differences,
        }
    }
}

impl Report {
    /// `Some((operations, "kind: n, ..."))` when the run did operations and every one of them
    /// failed (for a ramp: in every step), which `pier bench` turns into a failing exit status.
    /// A run with no operations at all (interrupted at once) is not "all failed".
    pub fn all_failed(&self) -> Option<(u64, String)> {
        let summaries: Vec<&Summary> = match &self.ramp {
            Some(ramp) => ramp.steps.iter().map(|s| &s.summary).collect(),
            None => vec![&self.summary],
        };
        let operations: u64 = summaries.iter().map(|s| s.operations).sum();
        let failed: u64 = summaries.iter().map(|s| s.failed_operations).sum();
        if operations == 0 || failed < operations {
            return None;
        }
        let mut kinds = BTreeMap::<&str, u64>::new();
        for s in &summaries {
            for (kind, n) in &s.errors_by_kind {
                *kinds.entry(kind).or_default() += n;
            }
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        Some((operations, kinds.join(", ")))
    }

    /// Read a report saved with `--json`.
    pub fn load(path: &Path) -> Result<Report, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| BenchError::BadReport {
            path: path.to_path_buf(),
            source,
        })
    }

    pub fn to_json(&self) -> Result<String, BenchError> {
        serde_json::to_string_pretty(self).map_err(BenchError::Encode)
    }

    /// The human report: a header, one row for all requests and one per request kind, errors,
    /// the ramp's steps and the comparison when there are.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let s = &self.summary;
        let _ = writeln!(
            out,
            "pier bench {} against {} (pier {}){}",
            self.scenario,
            self.registry,
            self.pier_version,
            if self.interrupted {
                " - interrupted"
            } else {
                ""
            }
        );
        let _ = writeln!(
            out,
            "concurrency {}, {:.2} s, {} operations ({} failed), {:.1} op/s",
            s.concurrency, s.duration_s, s.operations, s.failed_operations, s.operations_per_s
        );
        if let Some(ramp) = &self.ramp {
            let which = match ramp.last_good_concurrency {
                Some(_) => "the last good ramp step",
                None => "the first ramp step (none was good)",
            };
            let _ = writeln!(out, "figures below: {which}");
        }
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<14}{:>10}{:>8}{:>11}{:>11}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "requests", "errors", "req/s", "bytes", "MB/s", "p50", "p90", "p99", "max"
        );
        let row =
            |out: &mut String, name: &str, requests, errors, req_s, bytes, mb_s, l: &Latency| {
                // No successful request, no latency (the histogram never records 0).
                let ms = |v: f64| {
                    if l.max > 0.0 {
                        format_ms(v)
                    } else {
                        "-".into()
                    }
                };
                let _ = writeln!(
                    out,
                    "{:<14}{:>10}{:>8}{:>11.1}{:>11}{:>10.2}{:>10}{:>10}{:>10}{:>10}",
                    name,
                    requests,
                    errors,
                    req_s,
                    format_bytes(bytes),
                    mb_s,
                    ms(l.p50),
                    ms(l.p90),
                    ms(l.p99),
                    ms(l.max)
                );
            };
        row(
            &mut out,
            "all",
            s.requests,
            s.errors,
            s.req_per_s,
            s.bytes,
            s.mb_per_s,
            &s.latency_ms,
        );
        for (name, k) in &s.by_kind {
            row(
                &mut out,
                name,
                k.requests,
                k.errors,
                k.req_per_s,
                k.bytes,
                k.mb_per_s,
                &k.latency_ms,
            );
        }
        let _ = writeln!(out);
        if s.errors_by_kind.is_empty() {
            let _ = writeln!(out, "errors: none");
        } else {
            let list: Vec<String> = s
                .errors_by_kind
                .iter()
                .map(|(kind, n)| format!("{kind} {n}"))
                .collect();
            let _ = writeln!(out, "errors: {}", list.join(", "));
        }
        if let Some(cpu) = s.server_cpu_s {
            let per_gib = match s.cpu_s_per_gib {
                Some(v) => format!("{v:.3} s per GiB"),
                None => "nothing moved".into(),
            };
            let _ = writeln!(out, "server cpu: {cpu:.2} s (user + system), {per_gib}");
        }
        if let Some(pushed) = &self.pushed {
            let _ = writeln!(out, "pushed: {pushed}");
        }
        if let Some(ramp) = &self.ramp {
            let _ = writeln!(out);
            let _ = writeln!(
                out,
                "ramp: p99 limit {}, {:.1} s per step",
                format_ms(ramp.p99_limit_ms),
                ramp.step_duration_s
            );
            let _ = writeln!(
                out,
                "{:>12}{:>11}{:>10}{:>10}{:>8}  verdict",
                "concurrency", "req/s", "MB/s", "p99", "errors"
            );
            for step in &ramp.steps {
                let t = &step.summary;
                let _ = writeln!(
                    out,
                    "{:>12}{:>11.1}{:>10.2}{:>10}{:>8}  {}",
                    t.concurrency,
                    t.req_per_s,
                    t.mb_per_s,
                    format_ms(t.latency_ms.p99),
                    t.errors,
                    match (step.good, step.interrupted) {
                        (true, _) => "ok",
                        (false, true) => "interrupted",
                        (false, false) => "over the limit",
                    }
                );
            }
            match ramp.last_good_concurrency {
                Some(c) => {
                    let _ = writeln!(out, "last good concurrency: {c}");
                }
                None => {
                    let _ = writeln!(
                        out,
                        "last good concurrency: none (the first step was over the limit)"
                    );
                }
            }
        }
        if let Some(c) = &self.compare {
            let _ = writeln!(out);
            let _ = writeln!(out, "compared with {}:", c.against);
            let line = |out: &mut String,
                        name: &str,
                        d: &Delta,
                        fmt: &dyn Fn(f64) -> String,
                        note: &str| {
                let _ = writeln!(
                    out,
                    "  {name:<6}{:>12} -> {:<12}{:>8}{note}",
                    fmt(d.before),
                    fmt(d.after),
                    d.pct()
                );
            };
            line(&mut out, "req/s", &c.req_per_s, &|v| format!("{v:.1}"), "");
            line(&mut out, "MB/s", &c.mb_per_s, &|v| format!("{v:.2}"), "");
            line(
                &mut out,
                "p99",
                &c.p99_ms,
                &|v| format_ms(v),
                "  (lower is better)",
            );
            for d in &c.differences {
                let _ = writeln!(out, "  not like for like: {d}");
            }
        }
        out
    }
}
