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
#   - the swarm: NODES (8) nodes with links shaped by tc tbf to MBIT (1000) Mbit/s both ways,
#     the upstream too, cold-pull one SWARM_MIB (1024) MiB layer at the same moment, with
#     swarming on and then off; then warm (the layer already on its two owners) and a mixed
#     image (four layers, 8/4/2/1 sixteenths of the size). For each: completion p50/p99/max,
#     the per-node minimum (size / link rate) and the ratio, upstream bytes as a multiple of the
#     content, bytes uploaded per node (max/min) and the first owner's share, and each node's
#     CPU. Each node's client runs inside the node's namespace, as containerd runs beside its
#     node, so the links carry only what the nodes exchange; CLIENTS=outside runs them in the
#     test process instead, where each node's own download also crosses its link.
#
#   scripts/cluster-bench.sh                        # everything, at the sizes above
#   ONLY=swarm scripts/cluster-bench.sh             # the swarm runs only
#   ONLY=cluster TRIALS=3 BLOB_MIB=128 scripts/cluster-bench.sh  # detection etc., quickly
#   NODES=6 MBIT=400 SWARM_MIB=256 ONLY=swarm scripts/cluster-bench.sh
#   RUNS=on,warm QUEUE_MS=5 ...                     # some swarm runs; shallow link buffers
#
# NODE_BIN=path runs that pier binary as the nodes (an A/B of two builds under one harness).
# QUEUE_MS is how long each link's token bucket may queue (100 ms unless set: a deep FIFO).
# SYSCTL=key=value,... sets TCP sysctls in every host's namespace (SYSCTL=net.ipv4.
# tcp_slow_start_after_idle=0, say). Each swarm run also prints what every node's link carried
# into it per half second and the share of its link it used until done, and how busy the
# machine's cores were.
#
# Needs root (network namespaces, iptables, a tmpfs). The nodes' data directories and the
# upstream's storage go on a tmpfs (this machine's disk is slower than eight links), which
# needs about (NODES + 3) x SWARM_MIB of memory; installs missing tools with apt-get. Numbers
# depend on the machine: every node shares its cores.
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
    [openssl]=openssl [curl]=curl [docker-registry]=docker-registry [skopeo]=skopeo [containerd]=containerd [ctr]=containerd)
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

case ${ONLY:-all} in
    all) filters=(bench:: swarm::swarm_bench) ;;
    swarm) filters=(swarm::swarm_bench) ;;
    cluster) filters=(bench::) ;;
    *) echo "error: ONLY is all, swarm or cluster" >&2; exit 1 ;;
esac
cargo test --release -q -p pier --test cluster --no-run
TMPFS=$(mktemp -d)
mount -t tmpfs -o size=$(((${NODES:-8} + 4) * ${SWARM_MIB:-1024} + 2048))m tmpfs "$TMPFS"
trap 'umount "$TMPFS"; rmdir "$TMPFS"' EXIT
{
    echo
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "trials=${TRIALS:-10} blob=${BLOB_MIB:-1024}MiB nodes=${NODES:-8} mbit=${MBIT:-1000}" \
        "swarm=${SWARM_MIB:-1024}MiB clients=${CLIENTS:-node} only=${ONLY:-all}" \
        "runs=${RUNS:-all} queue=${QUEUE_MS:-100}ms sysctl=${SYSCTL:-} nodes_bin=${NODE_BIN:-built}"
} >>"$RESULTS"
if [[ -n ${NODE_BIN:-} ]]; then
    export PIER_CLUSTER_NODE_BIN=$(realpath "$NODE_BIN")
fi
TMPDIR=$TMPFS PIER_CLUSTER=1 PIER_CLUSTER_BENCH=1 PIER_CLUSTER_BENCH_OUT=$RESULTS \
    PIER_CLUSTER_BENCH_TRIALS=${TRIALS:-10} PIER_CLUSTER_BENCH_BLOB_MIB=${BLOB_MIB:-1024} \
    PIER_CLUSTER_BENCH_NODES=${NODES:-8} PIER_CLUSTER_BENCH_MBIT=${MBIT:-1000} \
    PIER_CLUSTER_BENCH_SWARM_MIB=${SWARM_MIB:-1024} PIER_CLUSTER_BENCH_CLIENTS=${CLIENTS:-node} \
    PIER_CLUSTER_BENCH_RUNS=${RUNS:-} PIER_NET_QUEUE_MS=${QUEUE_MS:-100} PIER_NET_SYSCTL=${SYSCTL:-} \
    cargo test --release -q -p pier --test cluster -- --nocapture --test-threads 1 "${filters[@]}"
echo "results appended to $RESULTS"
