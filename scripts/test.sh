#!/usr/bin/env bash
# The whole test suite, on a fresh machine, as root: installs what the tests
# need (Debian packages, the Kubernetes control plane built from Go modules),
# checks formatting and lints, builds everything once in release mode and
# runs every test (unit, in-memory, namespace end-to-end, Kubernetes, interop).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: run as root (the tests build network namespaces and TUN devices)" >&2
    exit 1
fi
scripts/install-deps.sh
# The peers the bench compares against (the bench's smoke test measures the
# newer wireguard-go): Debian trixie's wireguard-go, boringtun-cli.
scripts/install-anchors.sh
# etcd, kube-apiserver, kube-controller-manager and kubectl from the pinned
# Go modules: built once (several minutes), then taken from the cache.
TUNMESH_CONTROL_PLANE_BIN=$(scripts/control-plane.sh)
export TUNMESH_CONTROL_PLANE_BIN
cargo fmt --all -- --check
cargo clippy --release --locked --workspace --all-targets -- -D warnings
# The I/O comparison harness (scripts/ab-crates.sh) is off by default:
# keep it compiling.
cargo clippy --release --locked -p tunmesh-router --features ab-crates -- -D warnings
cargo build --release --locked --workspace
cargo test --release --locked --workspace
# The patched boringtun (third_party/boringtun, outside the workspace): its
# own unit tests (noise core, replay window) run against the patch too.
CARGO_TARGET_DIR=target/boringtun cargo test --release --locked \
    --manifest-path third_party/boringtun/Cargo.toml --lib
# Kubernetes' own network tests on a lab of real nodes (containerd, kubelet,
# kube-proxy; tunmesh from deploy/): the four [Conformance] tests of
# "Networking Granular Checks: Pods" and the [Conformance] HostPort test.
# scripts/conformance.sh runs every [sig-network] [Conformance] test of the
# release and the rest of the network list (about an hour).
target/release/tunmesh-lab conformance --ci --out target/conformance-ci
# Fuzzing (nightly + cargo-fuzz): every target for a bounded time. The
# corpora also replay on stable in router/tests/fuzz_corpus.rs above.
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    FUZZ_SECONDS=${FUZZ_SECONDS:-20} scripts/fuzz.sh
else
    echo "scripts/test.sh: no nightly toolchain, so the fuzz targets did not run" >&2
    [ -z "${CI:-}" ] || exit 1
fi
