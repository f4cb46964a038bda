//! Cluster tier: real `pier` processes as cluster nodes, each in its own network namespace on a
//! Linux bridge, with Debian's `docker-registry` as their upstream in another namespace, pulled
//! from by skopeo, containerd and plain HTTP. Faults are real too: SIGKILL, SIGSTOP, and
//! partitions made of iptables rules inside a node's namespace.
//!
//! - `net`: the bridge, the namespaces and the network faults;
//! - `nodes`: the pier and registry processes, status views, pulls, the failure report;
//! - `harness`: the tier's own machinery checked against a single pier without cluster flags;
//! - `scenarios`: what a cluster promises (one upstream fetch per cluster, node loss, hosted
//!   content surviving a node, a wrong secret, an upstream outage);
//! - `replicate`: the built-in `cluster` rule, a push reaching every node, a node that was
//!   down catching up;
//! - `bench`: failure detection times, peer throughput and upstream requests, printed (only
//!   with `PIER_CLUSTER_BENCH=1`; `scripts/cluster-bench.sh` runs it).
//!
//! Runs only with `PIER_CLUSTER=1`, as root, with `ip` (iproute2) installed; otherwise each test
//! prints `SKIPPED` and passes. `scripts/test.sh` sets it up. The tests of this binary run one
//! at a time: each starts four or five nodes, and the machines this runs on have two cores.

#[path = "../common/mod.rs"]
mod common;
#[path = "../mirror_support/mod.rs"]
mod mirror_support;

mod bench;
mod drills;
mod harness;
mod net;
mod nodes;
mod replicate;
mod scenarios;
mod swarm;

use common::find_on_path;

/// Held by each test of this binary for its whole run.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Print `SKIPPED: <test>: <why>` where it is seen: straight to stderr, since the test
/// harness keeps what the print macros write from a passing test to itself.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// Whether the tier may run here; prints why not when it may not. With `PIER_CLUSTER=1`, as
/// root, a missing tool other than `ip` is a failure, not a skip.
pub fn gate(test: &str) -> bool {
    if std::env::var("PIER_CLUSTER").as_deref() != Ok("1") {
        skipped(test, "set PIER_CLUSTER=1 (as root) to run the cluster tier");
        return false;
    }
    if !rustix::process::geteuid().is_root() {
        skipped(test, "the cluster tier needs root for network namespaces");
        return false;
    }
    if find_on_path("ip").is_none() {
        skipped(test, "`ip` (iproute2) is not installed");
        return false;
    }
    for (tool, package) in [
        ("iptables", "iptables"),
        ("tc", "iproute2"),
        ("setpriv", "util-linux"),
        ("docker-registry", "docker-registry"),
        ("skopeo", "skopeo"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
    ] {
        assert!(
            find_on_path(tool).is_some(),
            "PIER_CLUSTER=1 but `{tool}` is not on PATH: install {package} \
             (apt-get install -y {package}, or run scripts/test.sh)"
        );
    }
    true
}

/// [`gate`], then the lock that runs this binary's tests one at a time; `None` when skipped.
pub async fn serial(test: &str) -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if !gate(test) {
        return None;
    }
    Some(ONE_AT_A_TIME.lock().await)
}
