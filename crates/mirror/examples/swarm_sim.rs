//! The swarm's protocol simulated (`pier_mirror::swarm_sim`): `cargo run --release -p
//! pier-mirror --example swarm_sim` prints the table for 8, 100 and 1,000 nodes, one layer and
//! four, without a fault, with one fetcher killed at 30 % and with one peer serving corrupt
//! pieces. With `--nodes N` it runs only that size (`--layers`, `--fault`, `--size-mib`,
//! `--seed` narrow it further).

use std::process::ExitCode;

use pier_mirror::swarm_sim::{self, SwarmSimConfig, SwarmSimReport};

const USAGE: &str = "usage: swarm_sim [--nodes N] [--layers L] [--fault none|killed|corrupt] \
[--size-mib MIB] [--seed S]";

fn main() -> ExitCode {
    let mut nodes = vec![8, 100, 1000];
    let mut layers = vec![1, 4];
    let mut faults = vec!["none", "killed", "corrupt"];
    let mut size_mib: Option<u64> = None;
    let mut seed = 1;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--help" || flag == "-h" {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        let Some(value) = it.next() else {
            eprintln!("swarm_sim: {flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        let parsed = match flag.as_str() {
            "--nodes" => value.parse().map(|n| nodes = vec![n]).is_ok(),
            "--layers" => value.parse().map(|n| layers = vec![n]).is_ok(),
            "--size-mib" => value.parse().map(|n| size_mib = Some(n)).is_ok(),
            "--seed" => value.parse().map(|n| seed = n).is_ok(),
            "--fault" => match value.as_str() {
                "none" => {
                    faults = vec!["none"];
                    true
                }
                "killed" => {
                    faults = vec!["killed"];
                    true
                }
                "corrupt" => {
                    faults = vec!["corrupt"];
                    true
                }
                _ => false,
            },
            _ => {
                eprintln!("swarm_sim: unknown flag {flag}\n{USAGE}");
                return ExitCode::from(2);
            }
        };
        if !parsed {
            eprintln!("swarm_sim: {flag} does not take `{value}`\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    if nodes.iter().any(|n| *n < 2) || layers.iter().any(|l| *l < 1 || *l > 64) {
        eprintln!("swarm_sim: --nodes takes 2 or more, --layers 1 to 64\n{USAGE}");
        return ExitCode::from(2);
    }
    println!("{}", SwarmSimReport::header());
    for &n in &nodes {
        for &l in &layers {
            for &fault in &faults {
                let mut cfg = SwarmSimConfig::new(n, l);
                cfg.seed = seed;
                if let Some(mib) = size_mib {
                    cfg.layer_size = mib.max(1) * 1024 * 1024;
                }
                match fault {
                    "killed" => cfg.kill_at = Some(0.3),
                    "corrupt" => cfg.corrupt_peer = true,
                    _ => {}
                }
                println!("{}", swarm_sim::run(&cfg));
            }
        }
    }
    ExitCode::SUCCESS
}
