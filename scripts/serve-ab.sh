#!/usr/bin/env bash
# A/B of the stored-blob GET path: two pier binaries and nginx (sendfile, tcp_nopush) serving
# the same blobs on loopback, interleaved round by round so that the machine's drift hits all
# three alike. Prints GB/s and the server's CPU seconds per GiB (user + system from
# /proc/PID/stat) for one 1 GiB stream and for 32 concurrent GETs of a 200 MiB blob (wrk).
#
#   scripts/serve-ab.sh OLD_PIER NEW_PIER      # ROUNDS=3 by default
#
# Build the two binaries first (for instance `git worktree add /tmp/old <commit>` and
# `cargo build --release -p pier` in each). Needs nginx, wrk, curl, bc, python3.
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${ROUNDS:-3}
W=$(mktemp -d /tmp/pier-ab.XXXXXX)
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    [[ -f $W/nginx.pid ]] && kill "$(cat "$W/nginx.pid")" 2>/dev/null || true
    sleep 1
    rm -rf "$W"
}
trap cleanup EXIT
head -c 1024M /dev/urandom >"$W/big"
head -c 200M /dev/urandom >"$W/mid"
BIG=sha256:$(sha256sum "$W/big" | cut -d' ' -f1)
MID=sha256:$(sha256sum "$W/mid" | cut -d' ' -f1)
"$OLD" serve --listen 127.0.0.1:5200 --data-dir "$W/old" --hosted '**' >"$W/old.log" 2>&1 &
OP=$!
"$NEW" serve --listen 127.0.0.1:5201 --data-dir "$W/new" --hosted '**' >"$W/new.log" 2>&1 &
NP=$!
sleep 2
push() { # port file digest
    local loc sep
    loc=$(curl -fs -X POST -D - -o /dev/null "http://127.0.0.1:$1/v2/b/a/blobs/uploads/" |
        tr -d '\r' | awk 'tolower($1)=="location:" {print $2}')
    [[ $loc == http* ]] || loc="http://127.0.0.1:$1$loc"
    [[ $loc == *\?* ]] && sep='&' || sep='?'
    curl -fs -X PUT -T "$2" -H 'Content-Type: application/octet-stream' \
        "$loc${sep}digest=$3" -o /dev/null
}
for p in 5200 5201; do
    push $p "$W/big" "$BIG"
    push $p "$W/mid" "$MID"
done
mkdir -p "$W/www/v2/b/a/blobs"
cp "$W/big" "$W/www/v2/b/a/blobs/$BIG"
cp "$W/mid" "$W/www/v2/b/a/blobs/$MID"
chmod -R a+rX "$W"
cat >"$W/nginx.conf" <<N
worker_processes 2; pid $W/nginx.pid; error_log $W/nginx.err;
events { worker_connections 1024; }
http { access_log off; sendfile on; tcp_nopush on; default_type application/octet-stream;
 client_body_temp_path $W; proxy_temp_path $W; fastcgi_temp_path $W; uwsgi_temp_path $W;
 scgi_temp_path $W; server { listen 127.0.0.1:5202; root $W/www; } }
N
nginx -c "$W/nginx.conf"
sleep 1
NM=$(cat "$W/nginx.pid")
NPIDS="$NM $(pgrep -P "$NM" | tr '\n' ' ')"
ticks() {
    local t=0 p
    for p in "$@"; do t=$((t + $(sed 's/.*) //' "/proc/$p/stat" | awk '{print $12 + $13}'))); done
    echo "$t"
}
HZ=$(getconf CLK_TCK)
for r in $(seq "$ROUNDS"); do
    for who in old new nginx; do
        case $who in
        old) port=5200 pids=$OP ;;
        new) port=5201 pids=$NP ;;
        nginx) port=5202 pids=$NPIDS ;;
        esac
        # shellcheck disable=SC2086
        b=$(ticks $pids)
        s=$(curl -fs -o /dev/null -w '%{speed_download}' "http://127.0.0.1:$port/v2/b/a/blobs/$BIG")
        # shellcheck disable=SC2086
        a=$(ticks $pids)
        printf "round %s %-5s one stream     %5.2f GB/s  cpu %.3f s/GiB\n" "$r" "$who" \
            "$(echo "$s / 1000000000" | bc -l)" "$(echo "($a - $b) / $HZ" | bc -l)"
        # shellcheck disable=SC2086
        b=$(ticks $pids)
        out=$(wrk -t2 -c32 -d8s "http://127.0.0.1:$port/v2/b/a/blobs/$MID" 2>&1)
        # shellcheck disable=SC2086
        a=$(ticks $pids)
        rate=$(echo "$out" | awk '/Transfer\/sec/ {print $2}')
        total=$(echo "$out" | awk '/read$/ {print $(NF-1)}')
        gib=$(python3 -c "t='$total'; m={'KB':2**10,'MB':2**20,'GB':2**30}; print(float(t[:-2])*m[t[-2:]]/2**30)")
        printf "round %s %-5s 32 concurrent %8s/s  cpu %.3f s/GiB (%.1f GiB)\n" "$r" "$who" \
            "$rate" "$(echo "($a - $b) / $HZ / $gib" | bc -l)" "$gib"
    done
done
