#!/usr/bin/env bash
# The import benchmark: MB/s of importing a 1 GiB `docker save` tarball into a real pier node
# (blobs fsynced to disk), through `pier import` and, zstd-compressed, through the watched
# folder, plus the time to recognise a renamed copy. Prints, and appends to
# target/bench/import.txt under a dated header.
#
#   scripts/import-bench.sh              # a 1 GiB archive, release build
#   MIB=256 scripts/import-bench.sh      # a quick check of the script
#   PROFILE=dev scripts/import-bench.sh  # without the release build (dependencies are
#                                        # optimised in dev builds too)
#
# Needs about 6 GiB free in the temporary directory (two archives, a compressed copy, and what
# the node stores). The archives are freshly written, so they are read from the page cache:
# the number is pier's, not the source disk's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${BENCH_OUT:-$PWD/target/bench}
mkdir -p "$OUT"
RESULTS=$OUT/import.txt
if ! command -v zstd >/dev/null 2>&1; then
    echo "note: no zstd command; the compressed case is skipped (apt-get install zstd)" >&2
fi
profile=()
if [[ ${PROFILE:-release} == release ]]; then
    profile=(--release)
fi
{
    echo
    echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
        "archive=${MIB:-1024}MiB profile=${PROFILE:-release}"
} >>"$RESULTS"
PIER_IMPORT_BENCH=1 PIER_IMPORT_BENCH_MIB=${MIB:-1024} PIER_IMPORT_BENCH_OUT=$RESULTS \
    cargo test "${profile[@]}" -q -p pier --test import_bench -- --nocapture
echo "results appended to $RESULTS"
