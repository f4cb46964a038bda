#!/usr/bin/env bash
# A/B of the mirror's cold fill: two pier binaries, each in turn a fresh mirror in front of the
# same pier upstream on loopback, one `curl` GET of a blob the mirror does not hold, interleaved
# round by round. Prints the direct GET from the upstream, then per round and binary MB/s, the
# mirror's CPU seconds (user + system from /proc/PID/stat) for the blob and its peak RSS.
#
#   scripts/fill-ab.sh OLD_PIER NEW_PIER       # MIB=1024 ROUNDS=3 by default
#   DISK=/var/tmp scripts/fill-ab.sh OLD NEW   # the mirror's data on DISK, not on the tmpfs,
#                                              # with that disk's fsynced write rate per round
#   LINK_MBIT=2500 scripts/fill-ab.sh OLD NEW  # the upstream in a network namespace behind a
#                                              # veth pair shaped by tc tbf to LINK_MBIT both ways
#
# Root (it mounts a tmpfs for the upstream's data and the blob). Needs curl and sha256sum.
set -euo pipefail
OLD=$1 NEW=$2 MIB=${MIB:-1024} ROUNDS=${ROUNDS:-3} DISK=${DISK:-} LINK_MBIT=${LINK_MBIT:-}
NS=pier-fill-ab UP_IP=127.0.0.1 IN_NS=()
W=$(mktemp -d /tmp/pier-fill-ab.XXXXXX)
mkdir "$W/t"
mount -t tmpfs -o size=$((MIB * 3 + 512))m tmpfs "$W/t"
MIRROR=$W/t/m
[[ -n $DISK ]] && MIRROR=$DISK/pier-fill-ab.$$
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    sleep 0.5
    umount "$W/t" || true
    [[ -n $LINK_MBIT ]] && ip netns del "$NS" 2>/dev/null
    [[ -n $LINK_MBIT ]] && ip link del pfab0 2>/dev/null
    rm -rf "$W" "$MIRROR" "$DISK/pier-fill-ab.dd"
}
trap cleanup EXIT

if [[ -n $LINK_MBIT ]]; then
    # A token bucket both ways; its burst must hold a timer tick's worth of bytes at the rate.
    ip netns del "$NS" 2>/dev/null || true
    ip link del pfab0 2>/dev/null || true
    ip netns add "$NS"
    ip link add pfab0 type veth peer name pfab1
    ip link set pfab1 netns "$NS"
    ip addr add 10.213.0.1/24 dev pfab0
    ip link set pfab0 up
    ip netns exec "$NS" ip addr add 10.213.0.2/24 dev pfab1
    ip netns exec "$NS" ip link set pfab1 up
    ip netns exec "$NS" ip link set lo up
    tbf=(root tbf rate "${LINK_MBIT}mbit" burst 4mb latency 50ms)
    tc qdisc replace dev pfab0 "${tbf[@]}"
    ip netns exec "$NS" tc qdisc replace dev pfab1 "${tbf[@]}"
    UP_IP=10.213.0.2 IN_NS=(ip netns exec "$NS")
fi
head -c $((MIB * 1024 * 1024)) /dev/urandom >"$W/t/blob"
D=sha256:$(sha256sum "$W/t/blob" | cut -d' ' -f1)
"${IN_NS[@]}" "$OLD" serve --listen $UP_IP:5600 --data-dir "$W/t/up" --hosted '**' >"$W/up.log" 2>&1 &
sleep 1
LOC=$(curl -fsi -X POST http://$UP_IP:5600/v2/lib/x/blobs/uploads/ |
    awk -F': ' 'tolower($1)=="location"{print $2}' | tr -d '\r')
case $LOC in http*) ;; *) LOC=http://$UP_IP:5600$LOC ;; esac
SEP='?'
[[ $LOC == *\?* ]] && SEP='&'
curl -fs -X PUT -H 'Content-Type: application/octet-stream' -T "$W/t/blob" "$LOC${SEP}digest=$D" -o /dev/null
rm "$W/t/blob"
mbs() { awk '{printf "%.0f MB/s", $1 / 1e6}'; }
echo "direct from the upstream: $(curl -fs -o /dev/null -w '%{speed_download}' "http://$UP_IP:5600/v2/lib/x/blobs/$D" | mbs)"
for round in $(seq "$ROUNDS"); do
    for side in old new; do
        bin=$OLD
        [[ $side == new ]] && bin=$NEW
        rm -rf "$MIRROR"
        if [[ -n $DISK ]]; then
            sync
            rate=$(dd if=/dev/zero of="$DISK/pier-fill-ab.dd" bs=1M count="$MIB" conv=fsync 2>&1 |
                tail -1 | awk -F, '{print $NF}')
            rm -f "$DISK/pier-fill-ab.dd"
            echo "round $round: $DISK fsynced write:$rate"
        fi
        "$bin" serve --listen 127.0.0.1:5601 --data-dir "$MIRROR" \
            --upstream up.test=http://$UP_IP:5600 >"$W/m.log" 2>&1 &
        P=$!
        sleep 1
        r=$(curl -fs -o /dev/null -w '%{speed_download}' "http://127.0.0.1:5601/v2/up.test/lib/x/blobs/$D")
        sleep 0.5
        cpu=$(awk '{print ($14 + $15) / 100}' "/proc/$P/stat")
        rss=$(awk '/VmHWM/{printf "%.0f", $2 / 1024}' "/proc/$P/status")
        echo "round $round $side: $(echo "$r" | mbs), mirror CPU $cpu s for $MIB MiB, peak RSS $rss MiB"
        kill "$P"
        wait "$P" 2>/dev/null || true
    done
done
