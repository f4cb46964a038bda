#!/usr/bin/env bash
# Side-by-side benchmark on loopback: pier, CNCF distribution (Debian's docker-registry, also in
# its proxy mode) and nginx (static files, sendfile) serving the same content. Prints one table
# and writes it, with the raw numbers, to target/bench/ (results.md, results.json).
#
#   scripts/bench.sh              # everything (about 5 minutes on 2 cores)
#   BENCH_QUICK=1 scripts/bench.sh  # smaller blobs and shorter runs, to check the script
#
# Every server runs on this machine with the load generators, so absolute numbers depend on the
# machine; the ratios are the point. Needs root for apt-get when a tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${BENCH_OUT:-$ROOT/target/bench}
mkdir -p "$OUT"

declare -A packages=([docker-registry]=docker-registry [nginx]=nginx [wrk]=wrk [curl]=curl
    [python3]=python3 [bc]=bc)
missing=()
for cmd in "${!packages[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${packages[$cmd]}")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
fi

echo "== building pier (release)" >&2
cargo build --release -q -p pier
PIER=$ROOT/target/release/pier

if [[ -n ${BENCH_QUICK:-} ]]; then
    BIG_MB=256 MID_MB=50 WRK_SECS=3 CLIENTS=8 PUSH_IMAGES=8 PUSH_LAYER=8MiB
else
    BIG_MB=1024 MID_MB=200 WRK_SECS=10 CLIENTS=32 PUSH_IMAGES=16 PUSH_LAYER=64MiB
fi

WORK=$(mktemp -d /tmp/pier-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

P_PIER=5100 P_DIST=5101 P_NGINX=5102 P_PROXY=5103 P_MIRROR=5104

wait_http() {
    for _ in $(seq 100); do
        curl -fs -o /dev/null "http://127.0.0.1:$1/v2/" && return 0
        sleep 0.1
    done
    echo "server on port $1 did not start" >&2
    exit 1
}

start_pier() { # port datadir [args...]
    local port=$1 dir=$2
    shift 2
    "$PIER" serve --listen "127.0.0.1:$port" --data-dir "$dir" "$@" \
        >"$WORK/pier-$port.log" 2>&1 &
    PIDS+=($!)
    wait_http "$port"
}

start_dist() { # port rootdir [proxy-remote-url]
    local port=$1 dir=$2 remote=${3:-}
    mkdir -p "$dir"
    {
        echo "version: 0.1"
        echo "log: {level: info, formatter: json, accesslog: {disabled: false}}"
        echo "storage: {filesystem: {rootdirectory: $dir}, delete: {enabled: true}}"
        echo "http: {addr: 127.0.0.1:$port}"
        [[ -n $remote ]] && echo "proxy: {remoteurl: $remote}"
    } >"$WORK/dist-$port.yml"
    docker-registry serve "$WORK/dist-$port.yml" >"$WORK/dist-$port.log" 2>&1 &
    PIDS+=($!)
    wait_http "$port"
}

pid_of_port() { # the process listening on a port
    ss -Hltnp "sport = :$1" | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1
}

# Peak RSS in KiB since the last reset, summed over a process and its children (nginx workers).
reset_peak() { for p in "$@"; do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }
peak_kib() {
    local total=0 p
    for p in "$@"; do
        total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

# CPU seconds (user + system) a set of processes has used so far, from /proc/PID/stat: the
# fields after the command name's last ")" put utime and stime 12th and 13th. A process's
# figure covers all its threads; nginx's workers are listed with their master.
cpu_s() {
    local ticks=0 p
    for p in "$@"; do
        ticks=$((ticks + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}')))
    done
    echo "scale=3; $ticks / $(getconf CLK_TCK)" | bc
}
# CPU seconds per GiB: before, after, bytes moved.
per_gib() { echo "scale=3; ($2 - $1) * 1073741824 / $3" | bc; }

echo "== content: ${BIG_MB} MiB and ${MID_MB} MiB blobs, one image" >&2
head -c "${BIG_MB}M" /dev/urandom >"$WORK/big"
head -c "${MID_MB}M" /dev/urandom >"$WORK/mid"
echo '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]},"config":{}}' >"$WORK/config"
sha() { echo "sha256:$(sha256sum "$1" | cut -d' ' -f1)"; }
BIG=$(sha "$WORK/big") MID=$(sha "$WORK/mid") CFG=$(sha "$WORK/config")
size() { stat -c %s "$1"; }
cat >"$WORK/manifest" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"$CFG","size":$(size "$WORK/config")},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$MID","size":$(size "$WORK/mid")},{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"$BIG","size":$(size "$WORK/big")}]}
EOF
MT=application/vnd.oci.image.manifest.v1+json

push_blob() { # port repo file digest
    local loc
    loc=$(curl -fs -X POST -D - -o /dev/null "http://127.0.0.1:$1/v2/$2/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    [[ $loc == http* ]] || loc="http://127.0.0.1:$1$loc"
    [[ $loc == *\?* ]] && sep='&' || sep='?'
    curl -fs -X PUT -T "$3" -H 'Content-Type: application/octet-stream' \
        "$loc${sep}digest=$4" -o /dev/null
}
push_image() { # port repo
    push_blob "$1" "$2" "$WORK/config" "$CFG"
    push_blob "$1" "$2" "$WORK/mid" "$MID"
    push_blob "$1" "$2" "$WORK/big" "$BIG"
    curl -fs -X PUT -H "Content-Type: $MT" --data-binary @"$WORK/manifest" \
        "http://127.0.0.1:$1/v2/$2/manifests/v1" -o /dev/null
}

echo "== starting pier, distribution, nginx" >&2
# Every name hosted: the benchmark pushes its own images (docs/mirror.md, "hosted").
start_pier $P_PIER "$WORK/pier-data" --hosted '**'
start_dist $P_DIST "$WORK/dist-data"
push_image $P_PIER bench/app
push_image $P_DIST bench/app
mkdir -p "$WORK/www/v2/bench/app/blobs" "$WORK/www/v2/bench/app/manifests"
cp "$WORK/big" "$WORK/www/v2/bench/app/blobs/$BIG"
cp "$WORK/mid" "$WORK/www/v2/bench/app/blobs/$MID"
cp "$WORK/manifest" "$WORK/www/v2/bench/app/manifests/v1"
mkdir -p "$WORK/nginx"
# nginx's workers run as an unprivileged user: let them read the files.
chmod -R a+rX "$WORK"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 2;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on; tcp_nopush on;
    default_type application/octet-stream;
    client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
    fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
    server {
        listen 127.0.0.1:$P_NGINX;
        root $WORK/www;
        location = /v2/ { return 200 '{}'; }
        location /v2/bench/app/manifests/ { default_type $MT; }
    }
}
EOF
nginx -c "$WORK/nginx/nginx.conf"
wait_http $P_NGINX
NGINX_MASTER=$(cat "$WORK/nginx/nginx.pid")
NGINX_PIDS="$NGINX_MASTER $(pgrep -P "$NGINX_MASTER" | tr '\n' ' ')"
trap 'kill $(cat "$WORK/nginx/nginx.pid" 2>/dev/null) 2>/dev/null || true; cleanup' EXIT

declare -A R

PIER_PID=$(pid_of_port $P_PIER) DIST_PID=$(pid_of_port $P_DIST)

# 1. One big blob, one stream: the best of 3 GB/s, and the server's CPU s/GiB over all three.
single() { # url pids...
    local url=$1 best=0 s before
    shift
    before=$(cpu_s "$@")
    for _ in 1 2 3; do
        s=$(curl -fs -o /dev/null -w '%{speed_download}' "$url")
        (($(echo "$s > $best" | bc))) && best=$s
    done
    echo "$(echo "scale=2; $best / 1000000000" | bc) $(per_gib "$before" "$(cpu_s "$@")" $((3 * BIG_MB * 1048576)))"
}
echo "== single-stream ${BIG_MB} MiB GET" >&2
read -r R[single_pier] R[single_cpu_pier] <<<"$(single "http://127.0.0.1:$P_PIER/v2/bench/app/blobs/$BIG" "$PIER_PID")"
read -r R[single_dist] R[single_cpu_dist] <<<"$(single "http://127.0.0.1:$P_DIST/v2/bench/app/blobs/$BIG" "$DIST_PID")"
# shellcheck disable=SC2086
read -r R[single_nginx] R[single_cpu_nginx] <<<"$(single "http://127.0.0.1:$P_NGINX/v2/bench/app/blobs/$BIG" $NGINX_PIDS)"

# 2. Many clients downloading the mid blob at once: aggregate MB/s and the server's peak RSS.
many() { # port pids...
    local port=$1
    shift
    reset_peak "$@"
    local start end before
    before=$(cpu_s "$@")
    start=$(date +%s.%N)
    for _ in $(seq "$CLIENTS"); do
        curl -fs -o /dev/null "http://127.0.0.1:$port/v2/bench/app/blobs/$MID" &
    done
    wait
    end=$(date +%s.%N)
    echo "$(echo "scale=0; $CLIENTS * $MID_MB * 1048576 / ($end - $start) / 1000000" | bc) $(($(peak_kib "$@") / 1024)) $(per_gib "$before" "$(cpu_s "$@")" $((CLIENTS * MID_MB * 1048576)))"
}
echo "== $CLIENTS concurrent ${MID_MB} MiB GETs" >&2
read -r R[many_pier] R[rss_pier] R[many_cpu_pier] <<<"$(many $P_PIER "$PIER_PID")"
read -r R[many_dist] R[rss_dist] R[many_cpu_dist] <<<"$(many $P_DIST "$DIST_PID")"
# shellcheck disable=SC2086
read -r R[many_nginx] R[rss_nginx] R[many_cpu_nginx] <<<"$(many $P_NGINX $NGINX_PIDS)"

# 3. Manifest GET by tag, 64 connections.
manifest_rps() {
    wrk -t2 -c64 -d"${WRK_SECS}s" -H "Accept: $MT" "$1" | awk '/Requests\/sec/ {printf "%d", $2}'
}
echo "== manifest GET by tag, 64 connections" >&2
R[manifest_pier]=$(manifest_rps "http://127.0.0.1:$P_PIER/v2/bench/app/manifests/v1")
R[manifest_dist]=$(manifest_rps "http://127.0.0.1:$P_DIST/v2/bench/app/manifests/v1")
R[manifest_nginx]=$(manifest_rps "http://127.0.0.1:$P_NGINX/v2/bench/app/manifests/v1")

# 4. Pushes, with `pier bench push`: generated images of 3 fresh layers, 4 pushers at once.
# Each run's JSON is kept, so a later run can be compared (`pier bench ... --compare FILE`).
push_mbps() { # port name: MB/s and the server's CPU s/GiB (pier bench --server-pid)
    "$PIER" bench --registry "http://127.0.0.1:$1" --no-progress --json --server-pid "$(pid_of_port "$1")" \
        -c 4 -n "$PUSH_IMAGES" push --repo "push/$2" --layers 3 --layer-size "$PUSH_LAYER" \
        >"$OUT/push-$2.json"
    python3 -c 'import json,sys; s=json.load(open(sys.argv[1]))["summary"]; \
assert s["errors"] == 0, s["errors_by_kind"]; print(round(s["mb_per_s"]), s["cpu_s_per_gib"])' "$OUT/push-$2.json"
}
echo "== pushes" >&2
read -r R[push_pier] R[push_cpu_pier] <<<"$(push_mbps $P_PIER pier)"
read -r R[push_dist] R[push_cpu_dist] <<<"$(push_mbps $P_DIST distribution)"

# 5-7. Mirrors: pier mirroring distribution, and distribution's proxy mode, of the same content.
echo "== mirrors" >&2
start_pier $P_MIRROR "$WORK/mirror-data" --upstream "localhost:$P_DIST=http://127.0.0.1:$P_DIST"
start_dist $P_PROXY "$WORK/proxy-data" "http://127.0.0.1:$P_DIST"
NS="ns=localhost:$P_DIST"
# Cold big blob through each mirror, against the same GET straight from the upstream.
read -r R[direct_big] _ <<<"$(single "http://127.0.0.1:$P_DIST/v2/bench/app/blobs/$BIG" "$DIST_PID")"
cold() { # url pid: GB/s and the mirror's own CPU s/GiB (its upstream's is not counted)
    local before gbps
    before=$(cpu_s "$2")
    gbps=$(curl -fs -o /dev/null -w '%{speed_download}' "$1" | awk '{printf "%.2f", $1 / 1e9}')
    echo "$gbps $(per_gib "$before" "$(cpu_s "$2")" $((BIG_MB * 1048576)))"
}
# A writer on pages this virtual machine has not touched for a while pays for the first touch
# (page-cache writes run at a tenth of their speed on them): before each cold fill, and before
# the disk's own figure, write and delete a file of twice the blob, so that every writer gets
# pages just freed and the order of the rows does not decide them.
pretouch() {
    dd if=/dev/zero of="$WORK/pretouch" bs=1M count=$((2 * BIG_MB)) status=none
    rm -f "$WORK/pretouch"
}
# The disk's fsynced write rate for the blob's size, the other bound of a cold fill.
pretouch
R[disk_write]=$(dd if=/dev/zero of="$WORK/disk-write" bs=1M count="$BIG_MB" conv=fsync 2>&1 |
    awk '/copied/ {for (i = 1; i <= NF; i++) if ($i == "s,") {printf "%.2f", ($1 / $(i - 1)) / 1e9}}')
rm -f "$WORK/disk-write"
pretouch
read -r R[cold_pier] R[cold_cpu_pier] <<<"$(cold "http://127.0.0.1:$P_MIRROR/v2/bench/app/blobs/$BIG?$NS" "$(pid_of_port $P_MIRROR)")"
pretouch
read -r R[cold_proxy] R[cold_cpu_proxy] <<<"$(cold "http://127.0.0.1:$P_PROXY/v2/bench/app/blobs/$BIG" "$(pid_of_port $P_PROXY)")"
# Warm manifest pulls by tag.
curl -fs -o /dev/null -H "Accept: $MT" "http://127.0.0.1:$P_MIRROR/v2/bench/app/manifests/v1?$NS"
curl -fs -o /dev/null -H "Accept: $MT" "http://127.0.0.1:$P_PROXY/v2/bench/app/manifests/v1"
R[warm_pier]=$(manifest_rps "http://127.0.0.1:$P_MIRROR/v2/bench/app/manifests/v1?$NS")
R[warm_proxy]=$(manifest_rps "http://127.0.0.1:$P_PROXY/v2/bench/app/manifests/v1")
# 16 concurrent cold GETs of the mid blob: how many GETs of it reach the upstream.
upstream_gets() {
    python3 - "$WORK/dist-$P_DIST.log" "$MID" <<'PY'
import json, sys
n = 0
for line in open(sys.argv[1], errors="replace"):
    try:
        e = json.loads(line)
    except ValueError:
        continue
    if e.get("http.request.method") == "GET" and sys.argv[2] in e.get("http.request.uri", "") \
            and e.get("http.response.status") in (200, 206) and "http.response.written" in e:
        n += 1
print(n)
PY
}
herd() { # url
    local before after
    before=$(upstream_gets)
    for _ in $(seq 16); do curl -fs -o /dev/null "$1" & done
    wait
    sleep 1
    after=$(upstream_gets)
    echo $((after - before))
}
R[herd_pier]=$(herd "http://127.0.0.1:$P_MIRROR/v2/bench/app/blobs/$MID?$NS")
R[herd_proxy]=$(herd "http://127.0.0.1:$P_PROXY/v2/bench/app/blobs/$MID")

ratio() { # a / b, or a dash when b is zero (a server that used less than a tick)
    if (($(echo "$2 == 0" | bc))); then echo "—"; else echo "scale=2; $1 / $2" | bc; fi
}
{
    echo "| work | nginx | distribution | distribution proxy | pier | pier vs distribution |"
    echo "|---|---|---|---|---|---|"
    echo "| one ${BIG_MB} MiB blob GET, single stream (GB/s) | ${R[single_nginx]} | ${R[single_dist]} | — | ${R[single_pier]} | $(ratio "${R[single_pier]}" "${R[single_dist]}")x |"
    echo "| $CLIENTS concurrent ${MID_MB} MiB GETs, aggregate (MB/s) | ${R[many_nginx]} | ${R[many_dist]} | — | ${R[many_pier]} | $(ratio "${R[many_pier]}" "${R[many_dist]}")x |"
    echo "| peak RSS during those GETs (MiB) | ${R[rss_nginx]} | ${R[rss_dist]} | — | ${R[rss_pier]} | |"
    echo "| manifest GET by tag, 64 connections (req/s) | ${R[manifest_nginx]} | ${R[manifest_dist]} | — | ${R[manifest_pier]} | $(ratio "${R[manifest_pier]}" "${R[manifest_dist]}")x |"
    echo "| push of $PUSH_IMAGES images of 3 x $PUSH_LAYER layers, 4 pushers, \`pier bench push\` (MB/s) | — | ${R[push_dist]} | — | ${R[push_pier]} | $(ratio "${R[push_pier]}" "${R[push_dist]}")x |"
    echo "| cold ${BIG_MB} MiB blob through the mirror (GB/s; direct from upstream: ${R[direct_big]}; disk, fsynced: ${R[disk_write]}) | — | — | ${R[cold_proxy]} | ${R[cold_pier]} | pier $(ratio "${R[cold_pier]}" "${R[direct_big]}")x of direct, proxy $(ratio "${R[cold_proxy]}" "${R[direct_big]}")x |"
    echo "| warm manifest GET by tag through the mirror, 64 connections (req/s) | — | — | ${R[warm_proxy]} | ${R[warm_pier]} | $(ratio "${R[warm_pier]}" "${R[warm_proxy]}")x of proxy |"
    echo "| upstream GETs caused by 16 concurrent cold GETs of one blob | — | — | ${R[herd_proxy]} | ${R[herd_pier]} | |"
    echo "| server CPU s/GiB: single-stream GET | ${R[single_cpu_nginx]} | ${R[single_cpu_dist]} | — | ${R[single_cpu_pier]} | $(ratio "${R[single_cpu_pier]}" "${R[single_cpu_nginx]}")x of nginx |"
    echo "| server CPU s/GiB: $CLIENTS concurrent GETs | ${R[many_cpu_nginx]} | ${R[many_cpu_dist]} | — | ${R[many_cpu_pier]} | $(ratio "${R[many_cpu_pier]}" "${R[many_cpu_nginx]}")x of nginx |"
    echo "| server CPU s/GiB: push | — | ${R[push_cpu_dist]} | — | ${R[push_cpu_pier]} | $(ratio "${R[push_cpu_pier]}" "${R[push_cpu_dist]}")x |"
    echo "| mirror CPU s/GiB: cold blob (the mirror only) | — | — | ${R[cold_cpu_proxy]} | ${R[cold_cpu_pier]} | $(ratio "${R[cold_cpu_pier]}" "${R[cold_cpu_proxy]}")x of proxy |"
} >"$OUT/results.md"

python3 - "$OUT/results.json" <<PY
import json, sys
r = {$(for k in "${!R[@]}"; do printf '"%s": "%s", ' "$k" "${R[$k]}"; done)}
r = {k: float(v) for k, v in r.items()}
r["machine"] = {"cpus": $(nproc), "mem_gib": $(awk '/MemTotal/ {printf "%d", $2/1048576}' /proc/meminfo),
                "cpu": "$(awk -F: '/model name/ {gsub(/^ +/, "", $2); print $2; exit}' /proc/cpuinfo)"}
r["sizes_mib"] = {"big": $BIG_MB, "mid": $MID_MB, "clients": $CLIENTS}
json.dump(r, open(sys.argv[1], "w"), indent=2, sort_keys=True)
PY
cat "$OUT/results.md"
echo "(written to $OUT/results.md and $OUT/results.json)" >&2
