#!/usr/bin/env bash
# The demo, on a fresh machine, as root: installs what it needs, builds the
# release binaries and the Kubernetes control plane (cached after the first
# time), then builds a cluster in network namespaces, checks every
# pod-to-pod and node-to-pod pair, runs iperf3 and removes the cluster.
# Extra arguments go to `tunmesh-lab demo` (e.g. --nodes 4 --pods-per-node 3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/demo.sh: run as root (the demo builds network namespaces and TUN devices)" >&2
    exit 1
fi
scripts/install-deps.sh
TUNMESH_CONTROL_PLANE_BIN=$(scripts/control-plane.sh)
export TUNMESH_CONTROL_PLANE_BIN
cargo build --release --locked --workspace --bins
exec target/release/tunmesh-lab demo "$@"
