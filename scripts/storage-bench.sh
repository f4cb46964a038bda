#!/usr/bin/env bash
# pier on its two storage backends side by side, on loopback: the filesystem with redb, and S3
# with PostgreSQL (the moto S3 server and the PostgreSQL that scripts/storage-services.sh
# starts). Prints one table and writes it, with the raw numbers, to target/bench/ (storage.md,
# push-fs.json, push-s3pg.json).
#
#   scripts/storage-bench.sh               # a 512 MiB blob, 8 images of 3 x 16 MiB layers
#   BENCH_QUICK=1 scripts/storage-bench.sh # smaller, to check the script
#
# The S3 servers run on this machine with pier and the load generators: moto (Python, the one
# the test suite uses) and s3s-fs (Rust, compiled in release, files on this disk; installed with
# `cargo install` into target/s3s-fs on first use, a few minutes). The S3 numbers show what pier
# does against those servers here, not against AWS; s3s-fs is the nearer to a real one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/target/bench}
mkdir -p "$OUT"
for cmd in curl python3 bc; do
    command -v "$cmd" >/dev/null || { echo "error: $cmd is needed" >&2; exit 1; }
done

if [[ -n ${BENCH_QUICK:-} ]]; then
    BIG_MB=64 PUSH_IMAGES=4 PUSH_LAYER=4MiB
else
    BIG_MB=512 PUSH_IMAGES=8 PUSH_LAYER=16MiB
fi

echo "== building pier (release)" >&2
cargo build --release -q -p pier
PIER=$ROOT/target/release/pier

source scripts/storage-services.sh
WORK=$(mktemp -d /tmp/pier-storage-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in ${PIDS[@]+"${PIDS[@]}"}; do
        kill "$p" 2>/dev/null || true
        wait "$p" 2>/dev/null || true
    done
    storage_services_stop || true
    rm -rf "$WORK"
}
trap cleanup EXIT
storage_services_start >&2

free_port() { storage_free_port; }
wait_http() {
    for _ in $(seq 1 200); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/v2/" && return 0
        sleep 0.1
    done
    echo "pier on port $1 did not start" >&2
    exit 1
}

# s3s-fs, pinned (its newest release needs a newer toolchain than this project's).
S3S_FS_VERSION=0.14.1
S3S_FS=$ROOT/target/s3s-fs/bin/s3s-fs
if [[ ! -x $S3S_FS ]]; then
    echo "== installing s3s-fs $S3S_FS_VERSION (cargo install, release)" >&2
    cargo install -q "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$ROOT/target/s3s-fs"
fi
S3S_PORT=$(storage_free_port)
mkdir -p "$WORK/s3s/$PIER_TEST_S3_BUCKET"
"$S3S_FS" --host 127.0.0.1 --port "$S3S_PORT" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "$WORK/s3s" >"$WORK/s3s-fs.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$S3S_PORT/" && break
    sleep 0.1
done

# A deployment config on S3 (at endpoint $1) + PostgreSQL: a fresh database and key prefix.
s3pg_config() {
    local name base endpoint=$1
    name=pier_bench_$(date +%s)_$RANDOM
    psql "$PIER_TEST_PG_URL" -qc "CREATE DATABASE $name" >/dev/null
    base=${PIER_TEST_PG_URL%/*}
    cat <<TOML
[storage]
blobs = "s3"
meta = "postgres"

[storage.s3]
bucket = "$PIER_TEST_S3_BUCKET"
endpoint = "$endpoint"
region = "us-east-1"
path_style = true
prefix = "$name/"

[storage.postgres]
url = "$base/$name"

[mirror]
builtin_upstreams = false
default_upstream = ""
TOML
}

echo "== generating a ${BIG_MB} MiB blob" >&2
head -c $((BIG_MB * 1024 * 1024)) /dev/urandom >"$WORK/big"
BIG=sha256:$(sha256sum "$WORK/big" | cut -d' ' -f1)

declare -A R
single() { # url: best of 3, GB/s
    local best=0 s
    for _ in 1 2 3; do
        s=$(curl -fs -o /dev/null -w '%{speed_download}' "$1")
        (($(echo "$s > $best" | bc))) && best=$s
    done
    echo "scale=2; $best / 1000000000" | bc
}
push_big() { # port: one monolithic push of the big blob, MB/s
    curl -fs -o /dev/null -w '%{speed_upload}' -X POST \
        -H 'Content-Type: application/octet-stream' --data-binary @"$WORK/big" \
        "http://127.0.0.1:$1/v2/bench/app/blobs/uploads/?digest=$BIG" |
        awk '{printf "%d", $1 / 1e6}'
}
push_mbps() { # port name
    "$PIER" bench --registry "http://127.0.0.1:$1" --no-progress --json \
        -c 4 -n "$PUSH_IMAGES" push --repo "push/$2" --layers 3 --layer-size "$PUSH_LAYER" \
        >"$OUT/push-$2.json"
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["summary"]; \
assert s["errors"] == 0, s["errors_by_kind"]; print(round(s["mb_per_s"]))' "$OUT/push-$2.json"
}

for backend in fs s3pg s3fs; do
    port=$(free_port)
    args=(serve --listen "127.0.0.1:$port" --data-dir "$WORK/$backend" --hosted '**')
    case $backend in
        s3pg) s3pg_config "$PIER_TEST_S3_ENDPOINT" >"$WORK/$backend.toml" ;;
        s3fs) s3pg_config "http://127.0.0.1:$S3S_PORT" >"$WORK/$backend.toml" ;;
    esac
    if [[ $backend != fs ]]; then
        args+=(--config "$WORK/$backend.toml")
    fi
    "$PIER" "${args[@]}" >"$WORK/pier-$backend.log" 2>&1 &
    PIDS+=($!)
    wait_http "$port"
    echo "== $backend: push and GET of ${BIG_MB} MiB, pier bench push" >&2
    R[put_$backend]=$(push_big "$port")
    R[get_$backend]=$(single "http://127.0.0.1:$port/v2/bench/app/blobs/$BIG")
    R[push_$backend]=$(push_mbps "$port" "$backend")
done

ratio() { echo "scale=2; $1 / $2" | bc; }
{
    echo "| work | fs + redb | S3 (moto) + PostgreSQL | S3 (s3s-fs) + PostgreSQL | s3s-fs vs fs |"
    echo "|---|---|---|---|---|"
    echo "| one ${BIG_MB} MiB blob pushed in one request (MB/s) | ${R[put_fs]} | ${R[put_s3pg]} | ${R[put_s3fs]} | $(ratio "${R[put_s3fs]}" "${R[put_fs]}")x |"
    echo "| one ${BIG_MB} MiB blob GET, single stream, best of 3 (GB/s) | ${R[get_fs]} | ${R[get_s3pg]} | ${R[get_s3fs]} | $(ratio "${R[get_s3fs]}" "${R[get_fs]}")x |"
    echo "| push of $PUSH_IMAGES images of 3 x $PUSH_LAYER layers, 4 pushers, \`pier bench push\` (MB/s) | ${R[push_fs]} | ${R[push_s3pg]} | ${R[push_s3fs]} | $(ratio "${R[push_s3fs]}" "${R[push_fs]}")x |"
} | tee "$OUT/storage.md"
