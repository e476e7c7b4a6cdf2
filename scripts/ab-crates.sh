#!/usr/bin/env bash
# tunmesh's own I/O against the crates that could replace it, side by side
# with scripts/ab-routers.sh (paired rounds, throughput and CPU per Gbit):
#   tunrs   the TUN side through tun-rs's offload code (recv_multiple /
#           send_multiple, its port of wireguard-go's)
#   quinn   the UDP side through quinn-udp (recvmmsg+GRO, sendmsg+GSO)
#   control the same build against itself: the noise of a paired round here
# Builds the router twice (plain, and with the comparison harness, feature
# ab-crates), then leaves target/release as a plain build again. As root.
#
#   scripts/ab-crates.sh [ROUNDS] [SECONDS]      (default 8 rounds of 5 s)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-8}
SECS=${2:-5}
DIR=$(mktemp -d /tmp/tunmesh-ab-crates.XXXX)
trap 'rm -rf "$DIR"' EXIT
cargo build --release --locked -p tunmesh-router
cp target/release/tunmesh-router "$DIR/ours"
cp target/release/tunmesh-router "$DIR/ours-again"
cargo build --release --locked -p tunmesh-router --features ab-crates
cp target/release/tunmesh-router "$DIR/crates"
cargo build --release --locked -p tunmesh-router
compare() { # NAME TUNMESH_AB_IO B [IPERF3 ARGS...]
    local name=$1 io=$2 b=$3
    shift 3
    echo "== $name ${*:-(tcp, 1 stream)}"
    TUNMESH_AB_IO=$io scripts/ab-routers.sh "$DIR/ours" "$b" "$ROUNDS" "$SECS" -- "$@" 2>/dev/null | tail -2
}
compare "control (the same build twice)" "" "$DIR/ours-again"
compare "tun-rs offload (TUN side)" tunrs "$DIR/crates"
compare "tun-rs offload (TUN side)" tunrs "$DIR/crates" -P 4
compare "quinn-udp (UDP side)" quinn "$DIR/crates"
compare "quinn-udp (UDP side)" quinn "$DIR/crates" -P 4
compare "quinn-udp (UDP side)" quinn "$DIR/crates" -u -b 0 -l 1392
