#!/usr/bin/env bash
# Builds the tunmesh container image with no registry, from Debian's
# packages and this checkout (deploy/Dockerfile says what goes in), and
# writes it as an archive that `podman load`, `docker load` and
# `ctr -n k8s.io images import` all take.
#
#   scripts/build-image.sh [--tag NAME:TAG] [--output FILE] [--bin-dir DIR] [--load]
#
#   --tag      image name (default tunmesh:VERSION, VERSION from Cargo.toml)
#   --output   archive to write (default target/tunmesh-image.tar)
#   --bin-dir  take the binaries from DIR instead of building them with
#              `cargo build --release` (tests pass the ones they run)
#   --load     also load the image into this machine's podman storage
#
# Root only (mmdebstrap, podman), on Debian: the base is this machine's
# release, from its apt sources. It is cached for a week in
# $TUNMESH_CACHE (default /var/cache/tunmesh); podman builds in a throwaway
# store, so nothing else on the machine changes unless --load is given.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/Cargo.toml" | head -1)
tag="tunmesh:$version" output="$here/target/tunmesh-image.tar" bin_dir="" load=0
while [ $# -gt 0 ]; do
    case $1 in
        --tag) tag=$2; shift 2 ;;
        --output) output=$2; shift 2 ;;
        --bin-dir) bin_dir=$2; shift 2 ;;
        --load) load=1; shift ;;
        *) sed -n '2,18p' "$0" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "build-image: needs root (mmdebstrap, podman)" >&2; exit 1; }
for tool in mmdebstrap podman strip; do
    command -v $tool >/dev/null || { echo "build-image: $tool is not installed (scripts/install-deps.sh)" >&2; exit 1; }
done

bins=(tunmesh-router tunmesh-ctl tunmesh-cni tunmesh-keygen)
if [ -z "$bin_dir" ]; then
    (cd "$here" && cargo build --release --locked -p tunmesh-router -p tunmesh-cni -p tunmesh-keygen)
    bin_dir="$here/target/release"
fi
for b in "${bins[@]}"; do
    [ -x "$bin_dir/$b" ] || { echo "build-image: $bin_dir/$b is missing" >&2; exit 1; }
done

# The base: Debian's essential packages plus the two the image needs, no
# documentation, from this machine's own apt sources and release (so the
# binaries' glibc matches the base's).
# shellcheck disable=SC1091
. /etc/os-release
suite=${VERSION_CODENAME:-}
if [ "${ID:-}" != debian ] || [ -z "$suite" ]; then
    echo "build-image: the base is made from this machine's Debian release and apt sources; this is ${PRETTY_NAME:-not Debian}" >&2
    exit 1
fi
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || { echo "build-image: no apt sources configured on this machine" >&2; exit 1; }
cache=${TUNMESH_CACHE:-/var/cache/tunmesh}/image
base="$cache/base-$suite.tar"
mkdir -p "$cache"
if [ -z "$(find "$base" -mtime -7 2>/dev/null)" ]; then
    echo "build-image: making the Debian $suite base with mmdebstrap (about a minute)" >&2
    mmdebstrap --quiet --format=tar --variant=essential --include=procps,wireguard-tools \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        "$suite" "$base.new" "${sources[@]}"
    mv "$base.new" "$base"
fi

# The reference portmap plugin, chained after tunmesh-cni for hostPort,
# built from the module deploy/cni-plugins pins (cached; Go needed).
cni_dir=$("$here/scripts/cni-plugins.sh")

work=$(mktemp -d /tmp/tunmesh-image.XXXXXX)
store="$work/store"
podman_() { podman --root "$store/root" --runroot "$store/run" --tmpdir "$store/tmp" --storage-driver vfs "$@"; }
cleanup() { podman_ rmi --all --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

ctx="$work/context"
mkdir -p "$ctx/bin" "$ctx/cni" "$store/tmp"
install -m 0755 "$cni_dir/portmap" "$ctx/cni/portmap"
cp "$cni_dir/VERSIONS" "$ctx/cni/VERSIONS"
cp "$here/deploy/Dockerfile" "$ctx/"
ln "$base" "$ctx/base.tar" 2>/dev/null || cp "$base" "$ctx/base.tar"
for b in "${bins[@]}"; do
    install -m 0755 "$bin_dir/$b" "$ctx/bin/$b"
    strip "$ctx/bin/$b"
done

podman_ build --quiet --build-arg "VERSION=$version" -t "$tag" "$ctx" >/dev/null
mkdir -p "$(dirname "$output")"
rm -f "$output"
podman_ save --quiet --format docker-archive -o "$output" "$tag"
if [ $load = 1 ]; then
    podman load --quiet -i "$output" >&2
fi
echo "build-image: $tag in $output ($(du -m "$output" | cut -f1) MiB)" >&2
