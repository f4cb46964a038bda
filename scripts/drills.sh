#!/usr/bin/env bash
# The fault drills: four pier nodes in network namespaces (the cluster tier's harness,
# crates/pier/tests/cluster/drills.rs) with Debian's docker-registry as their upstream, pulls
# running against the cluster throughout, and one fault after another: node loss, network
# partition, upstream outage, disk full, a slow peer, a node restart. Writes a markdown report
# (pulls attempted and failed, time until noticed, time until full service, bytes lost) to
# docs/drills.md under a dated header, and fails when bytes were lost or a pull failed in the
# node-loss, partition or upstream-outage drill.
#
#   scripts/drills.sh                 # release build
#   PROFILE=dev scripts/drills.sh     # the debug build the test suite already has
#
# Needs root (network namespaces, iptables, tc, a tmpfs); installs missing tools with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $(id -u) -ne 0 ]]; then
    echo "error: the drills need root (network namespaces, iptables, tmpfs)" >&2
    exit 1
fi
declare -A packages=([ip]=iproute2 [tc]=iproute2 [iptables]=iptables [setpriv]=util-linux
    [docker-registry]=docker-registry [skopeo]=skopeo [containerd]=containerd [ctr]=containerd
    [fallocate]=util-linux)
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
profile=()
[[ ${PROFILE:-release} == release ]] && profile=(--release)
mkdir -p target
report=$PWD/target/drills.md
status=0
PIER_CLUSTER=1 PIER_DRILLS=1 PIER_DRILLS_REPORT=$report \
    cargo test "${profile[@]}" -q -p pier --test cluster -- --nocapture --test-threads 1 \
    drills::drills || status=$?
if [[ -s $report ]]; then
    {
        echo
        echo "## $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')," \
            "${PROFILE:-release} build, \`scripts/drills.sh\`"
        echo
        cat "$report"
    } >>docs/drills.md
    echo "report appended to docs/drills.md"
fi
exit $status
