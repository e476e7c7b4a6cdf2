#!/usr/bin/env bash
# Builds, with no registry, the container images a real node of the
# kubelet lab and the upstream e2e tests need, under the exact names the
# tests ask for, as archives `ctr -n k8s.io images import` takes:
#
#   registry.k8s.io/pause:3.10.2                         pause (built by control-plane.sh)
#   registry.k8s.io/e2e-test-images/agnhost:2.66.1       agnhost on Debian trixie with sh, bash,
#                                                        curl, netcat-openbsd, iproute2, socat,
#                                                        iperf 2.2 (the iperf2 test parses its CSV),
#                                                        and the porter's test certificate
#   registry.k8s.io/e2e-test-images/busybox:1.37.0-2     Debian's static busybox
#   registry.k8s.io/coredns/coredns:v1.15.0              CoreDNS with a small plugin set
#   registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1
#                                                        the DNS tests' glibc prober: agnhost's
#                                                        trixie root file system (sh, dig, getent)
#   registry.k8s.io/e2e-test-images/nginx:1.27.0-2       Debian trixie's nginx on port 80 (the
#                                                        Endpoints and EndpointSlice tests' pods)
#
# Every image the release's [sig-network] [Conformance] tests use
# (test/utils/image/manifest.go) is here.
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

# trixie ROOT.tar PACKAGES: a Debian trixie root file system (bookworm's
# iperf 2.1.8 is too old for the iperf2 test) from this machine's mirror.
trixie() {
    local tar=$1 packages=$2 uri
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
    [ -n "$uri" ] || { echo "node-images: no Debian mirror in this machine's apt sources" >&2; exit 1; }
    echo "node-images: making a Debian trixie root file system with $packages (a minute or two)" >&2
    mmdebstrap --quiet --format=tar --variant=essential --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        trixie "$tar" "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main"
}

# agnhost, and glibc-dns-testing from the same root file system (glibc,
# sh, dig, getent: what the DNS tests' glibc prober runs). agnhost's own
# image carries the porter's test certificate in its working directory
# (the Proxy tests' TLS ports): taken from the same release's source.
porter=$(cd "$(dirname "$0")/../tests/controlplane/node" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/test/images/agnhost/porter
for f in localhost.crt localhost.key; do
    [ -s "$porter/$f" ] || { echo "node-images: $porter/$f is missing" >&2; exit 1; }
done
agnhost_tar="$cache/agnhost-$(key "$bin/agnhost" "$porter/localhost.crt" "$porter/localhost.key").tar"
dns_tar="$cache/glibc-dns-testing-$(key "$bin/agnhost").tar"
if [ ! -s "$agnhost_tar" ] || [ ! -s "$dns_tar" ]; then
    ctx="$work/agnhost"; mkdir -p "$ctx"
    trixie "$ctx/root.tar" bash,curl,netcat-openbsd,iproute2,socat,iperf,iputils-ping,dnsutils,ca-certificates
    cp "$bin/agnhost" "$ctx/agnhost"
    cp "$porter/localhost.crt" "$porter/localhost.key" "$ctx/"
    printf 'FROM scratch\nADD root.tar /\nCOPY agnhost /agnhost\nCOPY localhost.crt localhost.key /\nENTRYPOINT ["/agnhost"]\nCMD ["pause"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/e2e-test-images/agnhost:2.66.1 "$agnhost_tar" "$ctx"
    printf 'FROM scratch\nADD root.tar /\nCMD ["/bin/sh"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1 "$dns_tar" "$ctx"
fi

# nginx: Debian's, in the foreground, on port 80.
nginx_tar="$cache/nginx-$(key).tar"
if [ ! -s "$nginx_tar" ]; then
    ctx="$work/nginx"; mkdir -p "$ctx"
    trixie "$ctx/root.tar" nginx
    printf 'FROM scratch\nADD root.tar /\nEXPOSE 80\nSTOPSIGNAL SIGQUIT\nCMD ["/usr/sbin/nginx", "-g", "daemon off;"]\n' >"$ctx/Dockerfile"
    image registry.k8s.io/e2e-test-images/nginx:1.27.0-2 "$nginx_tar" "$ctx"
fi

all=("$pause_tar" "$busybox_tar" "$coredns_tar" "$agnhost_tar" "$dns_tar" "$nginx_tar")
out="$cache/set-$(echo "${all[*]}" | sha256sum | cut -c1-16)"
mkdir -p "$out"
for t in "${all[@]}"; do
    ln -sfn "$t" "$out/$(basename "$t" | sed 's/-[0-9a-f]*\.tar$/.tar/')"
done
echo "$out"
