//! The cluster at scale, simulated: `cargo run --release -p pier-cluster --example simulate --
//! --nodes 1000 --seed 1 [--json]` prints what `pier_cluster::simulation::run` measured.

use std::process::ExitCode;
use std::time::Duration;

use pier_cluster::simulation::{self, ScaleConfig};

const USAGE: &str = "usage: simulate [--nodes N] [--seed S] [--seeds K] [--join-over SECS] \
[--settle SECS] [--quiet SECS] [--loss FRACTION] [--lossy SECS] [--kill FRACTION] [--kill-loss FRACTION] \
[--keys N] [--replicas R] [--json]";

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok((cfg, json)) => {
            let report = simulation::run(&cfg);
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("simulate: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                println!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(Some(e)) => {
            eprintln!("simulate: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// The configuration and whether to print JSON; `Err(None)` when help was asked for.
fn parse(mut args: impl Iterator<Item = String>) -> Result<(ScaleConfig, bool), Option<String>> {
    parse_flags(&mut args).map_err(|e| (e != "help").then_some(e))
}

fn parse_flags(args: &mut impl Iterator<Item = String>) -> Result<(ScaleConfig, bool), String> {
    let mut nodes = 1000;
    let mut seed = 1;
    let mut json = false;
    let mut set: Vec<(String, String)> = Vec::new();
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--json" => json = true,
            "-h" | "--help" => return Err("help".to_string()),
            _ if flag.starts_with("--") => {
                let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
                set.push((flag, value));
            }
            _ => return Err(format!("unexpected argument `{flag}`")),
        }
    }
    // The node count and seed first: the defaults derive from them.
    for (flag, value) in &set {
        match flag.as_str() {
            "--nodes" => nodes = number(flag, value)?,
            "--seed" => seed = number(flag, value)?,
            _ => {}
        }
    }
    let mut cfg = ScaleConfig::new(nodes, seed);
    for (flag, value) in &set {
        match flag.as_str() {
            "--nodes" | "--seed" => {}
            "--seeds" => cfg.seeds = number(flag, value)?,
            "--join-over" => cfg.join_over = seconds(flag, value)?,
            "--settle" => cfg.settle = seconds(flag, value)?,
            "--quiet" => cfg.quiet = seconds(flag, value)?,
            "--loss" => cfg.loss = fraction(flag, value)?,
            "--lossy" => cfg.lossy = seconds(flag, value)?,
            "--kill" => cfg.kill_fraction = fraction(flag, value)?,
            "--kill-loss" => cfg.kill_loss = fraction(flag, value)?,
            "--keys" => cfg.keys = number(flag, value)?,
            "--replicas" => cfg.replicas = number(flag, value)?,
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if cfg.nodes < 2 {
        return Err("--nodes must be at least 2".to_string());
    }
    Ok((cfg, json))
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{flag} takes a whole number, not `{value}`"))
}

fn fraction(flag: &str, value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(f) if (0.0..1.0).contains(&f) => Ok(f),
        _ => Err(format!("{flag} takes a fraction in [0, 1), not `{value}`")),
    }
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    match value.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!("{flag} takes seconds, not `{value}`")),
    }
}
