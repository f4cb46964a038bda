//! `pier bench`: a load generator for any OCI registry, pier or not.
//!
//! A run is one scenario (pull images, fetch a blob, push generated images, or a mix) driven by
//! N workers for a duration or a number of operations, or by a ramp that raises N until p99
//! latency passes a limit. It reports requests, bytes, throughput, latency percentiles (time to
//! the last body byte) and errors by kind, as a table or as JSON that a later run can
//! `--compare` against.
//!
//! Modules: `args` (the command line), `client` (HTTP and registry auth), `content` (generated
//! layers), `scenario` (what one operation does), `runner` (workers, phases, ramp, progress),
//! `stats` (recording), `cpu` (the server's CPU time from /proc), `report` (summaries, table,
//! JSON, comparison). Sizes and durations are read and printed by `pier_units::command_line`.
//!
//! Only loopback or a registry you own should be the target: the loops are bounded, but the
//! load is real.

pub mod args;
pub mod client;
pub mod content;
pub mod cpu;
pub mod error;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stats;

use tokio_util::sync::CancellationToken;

pub use args::{BenchArgs, Scenario};
pub use error::BenchError;
pub use report::{Comparison, Report};
pub use runner::run;

/// The whole command: run on a runtime of its own, print the partial report on Ctrl-C (a second
/// Ctrl-C quits at once), print the table or the JSON, with the comparison if asked.
pub fn cli(args: BenchArgs) -> Result<(), BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)?
        .block_on(cli_async(args))
}

async fn cli_async(args: BenchArgs) -> Result<(), BenchError> {
    // Read the saved report first: a typo in its path should not cost a whole run.
    let previous = match &args.output.compare {
        Some(path) => Some(Report::load(path)?),
        None => None,
    };
    let stop = CancellationToken::new();
    let signals = tokio::spawn(interrupt_on_ctrl_c(stop.clone()));
    let result = run(&args, stop).await;
    signals.abort();
    let mut report = result?;
    if report.interrupted {
        eprintln!("pier bench: interrupted; the report covers the part that ran");
    }
    if let (Some(previous), Some(path)) = (&previous, &args.output.compare) {
        report.compare = Some(Comparison::new(previous, &report, path));
    }
    if args.output.json {
        println!("{}", report.to_json()?);
    } else {
        print!("{}", report.to_table());
    }
    match report.all_failed() {
        Some((operations, kinds)) => Err(BenchError::AllFailed { operations, kinds }),
        None => Ok(()),
    }
}

async fn interrupt_on_ctrl_c(stop: CancellationToken) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    // Nothing printed here: the progress bar still owns the line until the run returns.
    stop.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(130);
    }
}
