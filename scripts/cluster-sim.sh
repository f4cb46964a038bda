#!/usr/bin/env bash
# The membership simulation at 1,000 nodes: the production membership engines (foca, sealed
# datagrams, the production tuning) and placement, in one process over a simulated site
# network (0.2-2 ms one way, 1 % of datagrams held up to 16 ms) with a simulated clock
# (crates/cluster/src/simulation.rs, the example `simulate`). Two runs, each printed and
# appended to target/bench/cluster-sim.txt under a dated header:
#
#   1. the whole scenario: a rollout of NODES nodes over 5 s through 3 seeds, 30 s of quiet
#      network (gossip bytes), 10 minutes at 5 % loss (false dead verdicts), 10 % killed at
#      once (agreement times), placement of 100,000 keys on 2 owners;
#   2. the kill again, under 5 % loss (no lossy window).
#
#   scripts/cluster-sim.sh                    # 1,000 nodes, seed 1 (about 25 min of one core)
#   NODES=200 LOSSY=60 scripts/cluster-sim.sh # a quick check of the script
#
# Extra arguments go to the first run (e.g. --json). Deterministic: the same seed gives the
# same numbers on any machine; only the wall-clock times differ.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-$PWD/target/bench}
mkdir -p "$OUT"
RESULTS=$OUT/cluster-sim.txt
NODES=${NODES:-1000}
SEED=${SEED:-1}
LOSSY=${LOSSY:-600}

cargo build --release -p pier-cluster --example simulate
SIM=target/release/examples/simulate

run() {
    echo "\$ simulate $*"
    "$SIM" "$@"
}

{
    echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $(git rev-parse --short HEAD 2>/dev/null || echo '?') =="
    run --nodes "$NODES" --seed "$SEED" --lossy "$LOSSY" "$@"
    echo
    run --nodes "$NODES" --seed "$SEED" --lossy 0 --kill-loss 0.05 --keys 1000
    echo
} | tee -a "$RESULTS"
echo "appended to $RESULTS"
