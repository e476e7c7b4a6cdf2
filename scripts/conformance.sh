#!/usr/bin/env bash
# Kubernetes' own network end-to-end tests (e2e.test from the pinned
# release) against a lab of real nodes: containerd, kubelet and kube-proxy
# on every node, tunmesh installed with `kubectl apply -k deploy/`.
#
#   scripts/conformance.sh [--ci] [--nodes N] [--focus REGEX]... [--keep] [--out DIR]
#
#   (default)   every [sig-network] test the pinned release tags
#               [Conformance] (selected by the tag), and the rest of the
#               network list (tests/src/conformance.rs); about an hour
#   --ci        only what CI runs: the four [Conformance] tests of
#               "Networking Granular Checks: Pods" and the [Conformance]
#               HostPort test (a few minutes)
#   --keep      leave the lab running afterwards (`tunmesh-lab down` removes it)
#
# Builds what it needs first (cached under /var/cache/tunmesh): the control
# plane, kubelet, kube-proxy, e2e.test and the node images, and this
# checkout in release mode. It prints how many of the release's
# [sig-network] [Conformance] tests passed (by default all of them must),
# and last `conformance: P passed, F failed, S skipped`; exit status 1 on
# any failure, skip or selected test that did not run. Root only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/conformance.sh: run as root (the lab builds namespaces, cgroups and mounts)" >&2
    exit 1
fi
scripts/install-deps.sh
TUNMESH_CONTROL_PLANE_BIN=$(scripts/control-plane.sh)
export TUNMESH_CONTROL_PLANE_BIN
cargo build --release --locked --workspace
exec target/release/tunmesh-lab conformance "$@"
