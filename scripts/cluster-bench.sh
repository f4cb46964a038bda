#!/usr/bin/env bash
# The cluster benchmark: four pier nodes, each in its own network namespace on a Linux bridge,
# with Debian's docker-registry as their upstream in another (the harness of the cluster test
# tier, crates/pier/tests/cluster, in its benchmark mode). Prints, and appends to
# target/bench/cluster.txt under a dated header:
#
#   - upstream requests caused by a cold pull on all four nodes at once (blobs, manifests);
#   - single-stream GET throughput of a blob filled from a peer over the veth links, and of the
#     same blob once local;
#   - failure detection time for a kill (SIGKILL), a hang (SIGSTOP) and a partition (iptables
#     DROP in the victim's namespace): from the fault until every other node's status lists
#     the victim dead, p50 and max over the trials.
#
#   scripts/cluster-bench.sh                        # 10 trials per fault, a 1 GiB peer read
#   TRIALS=3 BLOB_MIB=128 scripts/cluster-bench.sh  # a quick check of the script
#
# Needs root (network namespaces, iptables) and about 5 GiB free in the temporary directory
# for the 1 GiB blob and its copies; installs missing tools with apt-get. Numbers depend on
# the machine: every node shares its cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-$PWD/target/bench}
mkdir -p "$OUT"
RESULTS=$OUT/cluster.txt

if [[ $(id -u) -ne 0 ]]; then
    echo "error: the cluster benchmark needs root (network namespaces, iptables)" >&2
    exit 1
fi
declare -A packages=([ip]=iproute2 [tc]=iproute2 [iptables]=iptables [setpriv]=util-linux
    [docker-registry]=docker-registry [skopeo]=skopeo [containerd]=containerd [ctr]=containerd)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

{
    echo
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "trials=${TRIALS:-10} blob=${BLOB_MIB:-1024}MiB"
} >>"$RESULTS"
PIER_CLUSTER=1 PIER_CLUSTER_BENCH=1 PIER_CLUSTER_BENCH_OUT=$RESULTS \
    PIER_CLUSTER_BENCH_TRIALS=${TRIALS:-10} PIER_CLUSTER_BENCH_BLOB_MIB=${BLOB_MIB:-1024} \
    cargo test --release -q -p pier --test cluster bench:: -- --nocapture
echo "results appended to $RESULTS"
