//! The load loop: workers running operations back to back until the phase's bound (a duration
//! or a number of operations) or Ctrl-C, the ramp that runs one phase per concurrency step, and
//! the progress bar.
//!
//! Every loop here is bounded: a phase ends at its deadline or when its operations are taken,
//! and a cancelled phase drops its in-flight requests at once (they are not counted; their
//! bytes so far are).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::args::BenchArgs;
use crate::cpu::ServerCpu;
use crate::error::BenchError;
use crate::report::{round3, Limit, RampReport, RampStep, Report, Summary, FORMAT};
use crate::scenario::{Worker, Workload};
use crate::stats::{Counters, Stats, Tally};

const DEFAULT_DURATION: Duration = Duration::from_secs(10);
/// How often the progress bar is redrawn.
const TICK: Duration = Duration::from_millis(200);

/// What ends a phase (besides Ctrl-C).
#[derive(Debug, Clone, Copy)]
enum Bound {
    Duration(Duration),
    Operations(u64),
}

/// One phase's measurements.
struct Phase {
    stats: Stats,
    counters: Arc<Counters>,
    elapsed: Duration,
    /// The server's CPU seconds over the phase, with `--server-pid`.
    server_cpu_s: Option<f64>,
}

impl Phase {
    fn summary(&self, concurrency: usize) -> Summary {
        Summary::new(
            &self.stats,
            &self.counters,
            self.elapsed,
            concurrency,
            self.server_cpu_s,
        )
    }
}

/// Run the benchmark `args` describes and return its report. Cancelling `stop` ends the run
/// early with the report of what ran.
pub async fn run(args: &BenchArgs, stop: CancellationToken) -> Result<Report, BenchError> {
    let load = &args.load;
    if load.ramp.is_some() {
        if load.concurrency.is_some() || load.duration.is_some() || load.requests.is_some() {
            return Err(BenchError::Usage(
                "--ramp sets concurrency and duration itself; drop --concurrency, --duration and --requests"
                    .into(),
            ));
        }
    } else if load.p99_limit.is_some() {
        return Err(BenchError::Usage(
            "--p99-limit only applies to --ramp".into(),
        ));
    }
    if load.concurrency == Some(0) {
        return Err(BenchError::Usage("--concurrency must be at least 1".into()));
    }
    if load.requests == Some(0) || load.duration.is_some_and(|d| d.is_zero()) {
        return Err(BenchError::Usage(
            "--requests and --duration must be more than zero".into(),
        ));
    }
    let cpu = ServerCpu::new(&args.output.server_pid).map_err(BenchError::Usage)?;
    let workload = Arc::new(Workload::prepare(args).await?);
    if stop.is_cancelled() {
        return Err(BenchError::Interrupted);
    }
    let progress =
        !(args.output.json || args.output.no_progress) && std::io::stderr().is_terminal();
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let started = Instant::now();

    let (summary, limit, ramp) = if let Some(spec) = load.ramp {
        let p99_limit = load
            .p99_limit
            .ok_or_else(|| BenchError::Usage("--ramp needs --p99-limit".into()))?;
        if load.step_duration.is_zero() {
            return Err(BenchError::Usage(
                "--step-duration must be more than zero".into(),
            ));
        }
        let mut steps: Vec<RampStep> = Vec::new();
        let mut last_good = None;
        let mut concurrency = spec.start;
        while concurrency <= spec.max {
            let phase = run_phase(
                &workload,
                cpu.as_ref(),
                concurrency,
                Bound::Duration(load.step_duration),
                &stop,
                progress,
                &format!("concurrency {concurrency}: "),
            )
            .await;
            let summary = phase.summary(concurrency);
            let interrupted = stop.is_cancelled();
            let good = !interrupted && summary.within(p99_limit);
            steps.push(RampStep {
                good,
                interrupted,
                summary,
            });
            if !good {
                break;
            }
            last_good = Some(concurrency);
            concurrency += spec.step;
        }
        let best = steps
            .iter()
            .rev()
            .find(|s| s.good)
            .or(steps.first())
            .map(|s| s.summary.clone())
            .expect("a ramp runs at least one step");
        let ramp = RampReport {
            start: spec.start,
            step: spec.step,
            max: spec.max,
            p99_limit_ms: p99_limit.as_secs_f64() * 1e3,
            step_duration_s: load.step_duration.as_secs_f64(),
            steps,
            last_good_concurrency: last_good,
        };
        (best, Limit::Ramp, Some(ramp))
    } else {
        let concurrency = load.concurrency.unwrap_or(1);
        let (bound, limit) = match load.requests {
            Some(n) => (Bound::Operations(n), Limit::Operations(n)),
            None => {
                let d = load.duration.unwrap_or(DEFAULT_DURATION);
                (Bound::Duration(d), Limit::Duration(d.as_secs_f64()))
            }
        };
        let phase = run_phase(
            &workload,
            cpu.as_ref(),
            concurrency,
            bound,
            &stop,
            progress,
            "",
        )
        .await;
        (phase.summary(concurrency), limit, None)
    };

    Ok(Report {
        format: FORMAT,
        pier_version: env!("CARGO_PKG_VERSION").to_string(),
        scenario: args.scenario.name().to_string(),
        registry: args.target.registry.clone(),
        started_at,
        concurrency: summary.concurrency,
        duration_s: round3(started.elapsed().as_secs_f64()),
        limit,
        options: workload.options(),
        interrupted: stop.is_cancelled(),
        summary,
        ramp,
        pushed: workload.pushed(),
        compare: None,
    })
}

/// Run `concurrency` workers until `bound` or `stop`.
async fn run_phase(
    workload: &Arc<Workload>,
    cpu: Option<&ServerCpu>,
    concurrency: usize,
    bound: Bound,
    stop: &CancellationToken,
    progress: bool,
    label: &str,
) -> Phase {
    let counters = Arc::new(Counters::default());
    // A child token: the deadline ends this phase only, Ctrl-C ends every phase.
    let phase_stop = stop.child_token();
    let deadline = match bound {
        Bound::Duration(d) => {
            let phase_stop = phase_stop.clone();
            Some(tokio::spawn(async move {
                tokio::time::sleep(d).await;
                phase_stop.cancel();
            }))
        }
        Bound::Operations(_) => None,
    };
    let max_operations = match bound {
        Bound::Operations(n) => Some(n),
        Bound::Duration(_) => None,
    };
    let taken = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu.map(ServerCpu::seconds);
    let started = Instant::now();
    let bar = progress_bar(progress, bound);
    let ticker = tokio::spawn(tick(
        bar.clone(),
        bound,
        Arc::clone(&counters),
        started,
        label.to_string(),
    ));

    let mut workers = JoinSet::new();
    for id in 0..concurrency {
        workers.spawn(worker(
            id,
            Arc::clone(workload),
            Tally::new(Arc::clone(&counters)),
            phase_stop.clone(),
            max_operations,
            Arc::clone(&taken),
        ));
    }
    let mut stats = Stats::default();
    while let Some(joined) = workers.join_next().await {
        // A worker only ends by returning its stats; a panic is a bug worth seeing.
        match joined {
            Ok(s) => stats.merge(&s),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => {}
        }
    }
    let elapsed = started.elapsed();
    let server_cpu_s = cpu
        .zip(cpu_before)
        .map(|(cpu, before)| cpu.seconds() - before);
    phase_stop.cancel();
    if let Some(deadline) = deadline {
        deadline.abort();
    }
    ticker.abort();
    bar.finish_and_clear();
    Phase {
        stats,
        counters,
        elapsed,
        server_cpu_s,
    }
}

async fn worker(
    id: usize,
    workload: Arc<Workload>,
    mut tally: Tally,
    stop: CancellationToken,
    max_operations: Option<u64>,
    taken: Arc<AtomicU64>,
) -> Stats {
    let mut worker = Worker::new(id);
    loop {
        if stop.is_cancelled() {
            break;
        }
        if let Some(max) = max_operations {
            if taken.fetch_add(1, Ordering::Relaxed) >= max {
                break;
            }
        }
        let ok = tokio::select! {
            biased;
            // Dropping the operation aborts its request; what it recorded so far stays.
            _ = stop.cancelled() => break,
            ok = workload.operation(&mut worker, &mut tally) => ok,
        };
        tally.stats.operations += 1;
        if !ok {
            tally.stats.failed_operations += 1;
        }
        Counters::add(&tally.counters.operations, 1);
    }
    tally.stats
}

fn progress_bar(visible: bool, bound: Bound) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let (len, template) = match bound {
        Bound::Duration(d) => (
            d.as_millis() as u64,
            "{spinner} [{bar:30}] {elapsed:>4} {msg}",
        ),
        Bound::Operations(n) => (n, "{spinner} [{bar:30}] {pos}/{len} ops {msg}"),
    };
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Redraw the bar with live rates until aborted.
async fn tick(
    bar: ProgressBar,
    bound: Bound,
    counters: Arc<Counters>,
    started: Instant,
    label: String,
) {
    if bar.is_hidden() {
        return;
    }
    let mut interval = tokio::time::interval(TICK);
    loop {
        interval.tick().await;
        let elapsed = started.elapsed();
        let seconds = elapsed.as_secs_f64().max(1e-3);
        match bound {
            Bound::Duration(_) => bar.set_position(elapsed.as_millis() as u64),
            Bound::Operations(_) => bar.set_position(Counters::get(&counters.operations)),
        }
        let requests = Counters::get(&counters.requests);
        let bytes = Counters::get(&counters.bytes_in) + Counters::get(&counters.bytes_out);
        bar.set_message(format!(
            "{label}{requests} requests, {:.0} req/s, {:.1} MB/s, {} errors",
            requests as f64 / seconds,
            bytes as f64 / 1e6 / seconds,
            Counters::get(&counters.errors)
        ));
    }
}
