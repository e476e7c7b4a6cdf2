#!/usr/bin/env bash
# Builds, with no registry, the container images a real node of the
# kubelet lab and the upstream e2e tests need, under the exact names the
# tests ask for, as archives `ctr -n k8s.io images import` takes:
#
#   registry.k8s.io/pause:3.10.2                         pause (built by control-plane.sh)
#   registry.k8s.io/e2e-test-images/agnhost:2.66.1       agnhost on Debian trixie with sh, bash,
#                                                        curl, netcat-openbsd, iproute2, socat,
#                                                        iperf 2.2 (the iperf2 test parses its CSV)
#   registry.k8s.io/e2e-test-images/busybox:1.37.0-2     Debian's static busybox
#   registry.k8s.io/coredns/coredns:v1.15.0              CoreDNS with a small plugin set
#
# The programs come from the directory scripts/control-plane.sh prints;
# the trixie root file system from this machine's own Debian mirror. Each
# archive is cached in $TUNMESH_CACHE/images (default /var/cache/tunmesh)
# under a key of what went into it. Prints the directory holding them.
#
#   scripts/node-images.sh BIN_DIR
set -euo pipefail
bin=${1:?usage: node-images.sh BIN_DIR (from scripts/control-plane.sh)}
[ "$(id -u)" = 0 ] || { echo "node-images: needs root (mmdebstrap, podman)" >&2; exit 1; }
for tool in mmdebstrap podman; do
    command -v $tool >/dev/null || { echo "node-images: $tool is not installed (scripts/install-deps.sh)" >&2; exit 1; }
done
cache=${TUNMESH_CACHE:-/var/cache/tunmesh}/images
mkdir -p "$cache"

work=$(mktemp -d /tmp/tunmesh-node-images.XXXXXX)
store="$work/store"
podman_() { podman --root "$store/root" --runroot "$store/run" --tmpdir "$store/tmp" --storage-driver vfs "$@"; }
cleanup() { podman_ rmi --all --force >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$store/tmp"

# key FILE...: a short hash of the files' contents (and this script).
key() { cat "$0" "$@" | sha256sum | cut -c1-16; }

# image NAME:TAG ARCHIVE CONTEXT: builds CONTEXT/Dockerfile as NAME:TAG into ARCHIVE.
image() {
    local tag=$1 out=$2 ctx=$3
    echo "node-images: building $tag" >&2
    podman_ build --quiet -t "$tag" "$ctx" >/dev/null
    podman_ save --quiet --format docker-archive -o "$out.tmp" "$tag"
    mv "$out.tmp" "$out"
}

# pause: the sandbox every pod starts with.
pause_tar="$cache/pause-$(key "$bin/pause").tar"
if [ ! -s "$pause_tar" ]; then
    ctx="$work/pause"; mkdir -p "$ctx"
    cp "$bin/pause" "$ctx/pause"
    printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/pause:3.10.2 "$pause_tar" "$ctx"
fi

# busybox: Debian's static build, with its applets linked.
busybox_tar="$cache/busybox-$(key /bin/busybox).tar"
if [ ! -s "$busybox_tar" ]; then
    ctx="$work/busybox"; mkdir -p "$ctx/root/bin" "$ctx/root/tmp" "$ctx/root/etc"
    cp /bin/busybox "$ctx/root/bin/busybox"
    for a in $(/bin/busybox --list); do
        [ "$a" = busybox ] || ln -sf busybox "$ctx/root/bin/$a"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$ctx/root/etc/passwd"
    echo 'root:x:0:' >"$ctx/root/etc/group"
    tar -C "$ctx/root" -cf "$ctx/root.tar" .
    printf 'FROM scratch\nADD root.tar /\nENV PATH=/bin\nCMD ["sh"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/e2e-test-images/busybox:1.37.0-2 "$busybox_tar" "$ctx"
fi

# coredns: a static Go program.
coredns_tar="$cache/coredns-$(key "$bin/coredns").tar"
if [ ! -s "$coredns_tar" ]; then
    ctx="$work/coredns"; mkdir -p "$ctx"
    cp "$bin/coredns" "$ctx/coredns"
    printf 'FROM scratch\nCOPY coredns /coredns\nEXPOSE 53 53/udp\nENTRYPOINT ["/coredns"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/coredns/coredns:v1.15.0 "$coredns_tar" "$ctx"
fi

# agnhost: on a trixie root file system (bookworm's iperf 2.1.8 is too old
# for the iperf2 test), from this machine's Debian mirror.
agnhost_tar="$cache/agnhost-$(key "$bin/agnhost").tar"
if [ ! -s "$agnhost_tar" ]; then
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || { echo "node-images: no Debian mirror in this machine's apt sources" >&2; exit 1; }
    ctx="$work/agnhost"; mkdir -p "$ctx"
    echo "node-images: making a Debian trixie root file system for agnhost (a minute or two)" >&2
    mmdebstrap --quiet --format=tar --variant=essential \
        --include=bash,curl,netcat-openbsd,iproute2,socat,iperf,iputils-ping,dnsutils,ca-certificates \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        trixie "$ctx/root.tar" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main"
    cp "$bin/agnhost" "$ctx/agnhost"
    printf 'FROM scratch\nADD root.tar /\nCOPY agnhost /agnhost\nENTRYPOINT ["/agnhost"]\nCMD ["pause"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/e2e-test-images/agnhost:2.66.1 "$agnhost_tar" "$ctx"
fi

out="$cache/set-$(echo "$pause_tar $busybox_tar $coredns_tar $agnhost_tar" | sha256sum | cut -c1-16)"
mkdir -p "$out"
for t in "$pause_tar" "$busybox_tar" "$coredns_tar" "$agnhost_tar"; do
    ln -sfn "$t" "$out/$(basename "$t" | sed 's/-[0-9a-f]*\.tar$/.tar/')"
done
echo "$out"
