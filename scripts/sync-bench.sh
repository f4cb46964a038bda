#!/usr/bin/env bash
# The sync benchmark: replication throughput from pier to Debian's docker-registry (a fresh
# image, then the same layer mounted into a second repository), a fault run (many images
# through a proxy that fails a share of requests at random: the share of jobs that still
# succeed, and the attempts they took), and replication to every node of a four-node cluster
# in network namespaces. Prints, and appends to target/bench/sync.txt under a dated header.
#
#   scripts/sync-bench.sh                          # a 512 MiB layer, 50 images at 20 % faults
#   MIB=64 FAULT_IMAGES=10 scripts/sync-bench.sh   # a quick check of the script
#
# Needs root for the cluster part (network namespaces); installs missing tools with apt-get.
# Numbers depend on the machine: pier, the registry and every node share its cores and disk.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-$PWD/target/bench}
mkdir -p "$OUT"
RESULTS=$OUT/sync.txt

declare -A packages=([ip]=iproute2 [tc]=iproute2 [iptables]=iptables [setpriv]=util-linux
    [docker-registry]=docker-registry [skopeo]=skopeo [containerd]=containerd [ctr]=containerd)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "error: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

{
    echo
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        "MIB=${MIB:-512} FAULT_IMAGES=${FAULT_IMAGES:-50} FAULT_PERCENT=${FAULT_PERCENT:-20}"
} >>"$RESULTS"
export PIER_SYNC_BENCH=1 PIER_INTEROP=1 PIER_CLUSTER=1 PIER_SYNC_BENCH_OUT=$RESULTS
export PIER_SYNC_BENCH_MIB=${MIB:-512}
export PIER_SYNC_BENCH_FAULT_IMAGES=${FAULT_IMAGES:-50}
export PIER_SYNC_BENCH_FAULT_PERCENT=${FAULT_PERCENT:-20}
cargo test --release -p pier --test sync sync_bench -- --nocapture
cargo test --release -p pier --test cluster sync_bench_all_nodes -- --nocapture
echo "results appended to $RESULTS"
