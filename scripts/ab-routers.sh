#!/usr/bin/env bash
# Side-by-side comparison of two tunmesh-router builds on this noisy shared
# machine: alternating runs (A, B, A, B, ...) of iperf3 through a tunnel
# between two namespaces, so both builds see the same background load.
# `tunmesh-lab bench` compares tunmesh with the other implementations; this
# compares tunmesh with itself (a change against main, say).
#
#   scripts/ab-routers.sh BIN_A BIN_B [ROUNDS] [SECONDS] [-- IPERF3 ARGS...]
#
# Example: build main into /tmp/a, the change into /tmp/b, then
#   scripts/ab-routers.sh /tmp/a/tunmesh-router /tmp/b/tunmesh-router 6 5 -- -P 4
# Prints every run's Gbit/s (receiver goodput) and the routers' CPU
# seconds per Gbit that arrived, the ratios B/A of each round (both runs of
# a round are back to back, so they share the machine's load), and the
# median of those ratios with min-max: the figures to trust. The last line
# is the throughput ratio.
# Environment given to
# this script (TUNMESH_QUEUES=1, say) reaches both routers. Needs root,
# iperf3 and wg (for keys). Namespaces are named after this run and removed
# on exit, failure or Ctrl-C.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,16p' "$0"; exit 2; }
A=$(realpath "$1") B=$(realpath "$2")
shift 2
ROUNDS=${1:-4}; [ $# -gt 0 ] && shift
SECS=${1:-5}; [ $# -gt 0 ] && shift
[ "${1:-}" = "--" ] && shift
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "not executable: $bin" >&2; exit 2; }; done

ID="ab$$"
NA="tm-$ID-a" NB="tm-$ID-b"
DIR=$(mktemp -d "/tmp/tunmesh-$ID.XXXX")
cleanup() {
    for ns in "$NA" "$NB"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    sleep 0.3
    for ns in "$NA" "$NB"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NA"
ip netns add "$NB"
ip link add "v$ID" netns "$NA" type veth peer name "w$ID" netns "$NB"
ip -n "$NA" addr add 192.168.77.1/24 dev "v$ID"
ip -n "$NB" addr add 192.168.77.2/24 dev "w$ID"
for ns in "$NA" "$NB"; do ip -n "$ns" link set lo up; done
ip -n "$NA" link set "v$ID" up
ip -n "$NB" link set "w$ID" up
(umask 077; wg genkey >"$DIR/ka"; wg genkey >"$DIR/kb")
PA=$(wg pubkey <"$DIR/ka") PB=$(wg pubkey <"$DIR/kb")
mesh() { # KEY OWN_CIDR PEER_KEY PEER_ENDPOINT PEER_CIDR
    printf '[node]\nprivate_key_file = "%s"\nlisten_port = 51820\npod_cidrs = ["%s"]\n\n' "$1" "$2"
    printf '[[peer]]\nname = "peer"\npublic_key = "%s"\nendpoint = "%s"\nallowed_ips = ["%s"]\n' "$3" "$4" "$5"
}
mesh "$DIR/ka" 10.99.1.0/24 "$PB" 192.168.77.2:51820 10.99.2.0/24 >"$DIR/a.toml"
mesh "$DIR/kb" 10.99.2.0/24 "$PA" 192.168.77.1:51820 10.99.1.0/24 >"$DIR/b.toml"

stop_routers() {
    for ns in "$NA" "$NB"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    for _ in $(seq 50); do
        [ -z "$(ip netns pids "$NA")$(ip netns pids "$NB")" ] && return 0
        sleep 0.1
    done
    echo "routers did not stop" >&2
    return 1
}

# CPU clock ticks used so far by the routers in both namespaces (any
# binary name: the builds compared are often copies named A and B).
router_ticks() {
    local t=0 p
    for p in $(ip netns pids "$NA") $(ip netns pids "$NB"); do
        # Everything in the two namespaces but iperf3 is a router.
        [ "$(cat "/proc/$p/comm" 2>/dev/null)" = iperf3 ] && continue
        t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}

# One run: both routers from BIN, wait for the tunnel, iperf3 for SECS;
# prints "Gbit/s CPU-s/Gbit".
run() {
    local bin=$1 s
    for s in a b; do
        local ns=$NA; [ $s = b ] && ns=$NB
        rm -rf "$DIR/$s-state"
        ip netns exec "$ns" "$bin" --mesh-file "$DIR/$s.toml" --state-dir "$DIR/$s-state" \
            --uapi-dir "$DIR/$s-uapi" --cni-conf-dir "" --metrics-address "" --mtu 1420 \
            >"$DIR/$s.log" 2>&1 &
    done
    # In this script's session, as `tunmesh-lab bench` runs it: a daemonized
    # iperf3 (-D) would get a scheduler autogroup of its own (measured: the
    # machine a few points more idle during tcp1).
    ip netns exec "$NB" iperf3 -s -1 >/dev/null 2>&1 &
    local up=0 _
    for _ in $(seq 50); do
        ip netns exec "$NA" ping -c 1 -W 1 10.99.2.1 >/dev/null 2>&1 && { up=1; break; }
        sleep 0.2
    done
    for _ in $(seq 50); do
        ip netns exec "$NB" ss -Hltn 'sport = :5201' | grep -q . && break
        sleep 0.1
    done
    if [ $up = 0 ]; then
        echo "no traffic through the tunnel with $bin; logs:" >&2
        cat "$DIR/a.log" "$DIR/b.log" >&2
        return 1
    fi
    # Both routers' CPU time (utime + stime, clock ticks) across the run.
    local t0 t1
    t0=$(router_ticks)
    ip netns exec "$NA" iperf3 -c 10.99.2.1 -t "$SECS" -J "$@" >"$DIR/iperf.json"
    t1=$(router_ticks)
    # "Gbit/s CPU-seconds-per-Gbit": goodput at the receiver, and the
    # routers' CPU per Gbit that arrived.
    python3 - "$DIR/iperf.json" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))["end"]["sum_received"]
ticks = (int(sys.argv[3]) - int(sys.argv[2])) / float(sys.argv[4])
gbit = d["bytes"] * 8 / 1e9
print("%.2f %.4f" % (d["bits_per_second"] / 1e9, ticks / gbit if gbit else float("nan")))
PY
    stop_routers
}

# The median of the numbers on stdin (the mean of the middle two for an even count).
median() {
    tr ' ' '\n' | grep -v '^nan$' | grep . | sort -n |
        awk '{v[NR]=$1} END {if (NR % 2) print v[(NR+1)/2]; else printf "%.3f\n", (v[NR/2]+v[NR/2+1])/2}'
}
RA="" RB="" RATIOS="" CRATIOS=""
# Rounds alternate the order (AB, BA, ...) so that neither build always
# runs first. Two identical builds gave medians 12% apart over 4 rounds
# here: take 6 or more, and trust only differences well beyond the spread.
for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then
        a=$(run "$A" "$@"); b=$(run "$B" "$@")
    else
        b=$(run "$B" "$@"); a=$(run "$A" "$@")
    fi

    ga=${a% *} ca=${a#* } gb=${b% *} cb=${b#* }
    RA="$RA $ga" RB="$RB $gb"
    ratio=$(awk -v a="$ga" -v b="$gb" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "nan" }')
    cratio=$(awk -v a="$ca" -v b="$cb" 'BEGIN { if (a > 0) printf "%.3f", b / a; else print "nan" }')
    RATIOS="$RATIOS $ratio" CRATIOS="$CRATIOS $cratio"
    echo "round $r: A $ga Gbit/s $ca CPU-s/Gbit  B $gb Gbit/s $cb CPU-s/Gbit  B/A $ratio, CPU per Gbit B/A $cratio" >&2
done
echo "A $A:$RA  median $(echo "$RA" | median)"
echo "B $B:$RB  median $(echo "$RB" | median)"
spread() { # the ratios on stdin: "median (median of N paired rounds, min X, max Y)"
    local all sorted
    all=$(cat)
    sorted=$(echo "$all" | tr ' ' '\n' | grep -v '^nan$' | grep . | sort -n)
    echo "$(echo "$all" | median) (median of $(echo "$sorted" | wc -l) paired rounds, min $(echo "$sorted" | head -1), max $(echo "$sorted" | tail -1))"
}
echo "B/A per round:$RATIOS"
echo "B/A CPU-s per Gbit per round:$CRATIOS"
echo "CPU per Gbit B/A = $(echo "$CRATIOS" | spread)"
echo "B/A = $(echo "$RATIOS" | spread)"
