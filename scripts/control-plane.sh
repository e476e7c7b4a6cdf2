#!/usr/bin/env bash
# Builds the lab's Kubernetes control plane once and reuses it:
# kube-apiserver, kube-controller-manager and kubectl from the Kubernetes
# release pinned in tests/controlplane/kubernetes/go.mod, etcd from the release
# pinned in tests/controlplane/etcd/go.mod. Binaries go to a cache directory
# keyed by both modules and the Go version, so a changed pin builds afresh and
# an unchanged one costs nothing.
#
#   scripts/control-plane.sh          build if needed, print the bin directory
#   TUNMESH_CACHE=/some/dir ...       cache root (default /var/cache/tunmesh)
#
# Progress goes to stderr; stdout is only the bin directory, so callers can
# write `bin=$(scripts/control-plane.sh)`.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
mods="$here/tests/controlplane"
cache_root=${TUNMESH_CACHE:-/var/cache/tunmesh}

command -v go >/dev/null || { echo "control-plane: Go is not installed" >&2; exit 1; }

key=$( (cat "$mods/kubernetes/go.mod" "$mods/kubernetes/go.sum" \
           "$mods/etcd/go.mod" "$mods/etcd/go.sum"; go version) | sha256sum | cut -c1-16)
bin="$cache_root/control-plane/$key/bin"
tools=(kube-apiserver kube-controller-manager kubectl etcd)

have_all() {
    local t
    for t in "${tools[@]}"; do [[ -x "$bin/$t" ]] || return 1; done
}

if have_all; then
    echo "control-plane: cached in $bin" >&2
    echo "$bin"
    exit 0
fi

kube_version=$(cd "$mods/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[[ -n "$kube_version" ]] || { echo "control-plane: no k8s.io/kubernetes pin in go.mod" >&2; exit 1; }
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
# What `kubectl version` and the API server's /version report; a build from
# the module zip has no git metadata, so stamp it the way Kubernetes' own
# build does.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

work="$cache_root/control-plane/$key/tmp"
rm -rf "$work"
mkdir -p "$work" "$bin"
trap 'rm -rf "$work"' EXIT

start=$SECONDS
# go build -v names each package as it compiles it: turn that into a count
# every 100 packages, so a first build (minutes on two cores) shows progress.
progress() {
    awk -v what="$1" -v t0="$start" '
        { n++ }
        n % 100 == 0 { printf "control-plane:   %s: %d packages compiled\n", what, n > "/dev/stderr"; fflush("/dev/stderr") }
        END { printf "control-plane:   %s: %d packages compiled\n", what, n > "/dev/stderr" }'
}

build() { # module-dir output-name package ldflags
    local dir=$1 out=$2 pkg=$3 flags=$4
    echo "control-plane: building $out ($pkg) ..." >&2
    if ! ( cd "$mods/$dir" && CGO_ENABLED=0 go build -v -trimpath -ldflags "$flags" -o "$work/$out" "$pkg" 2>&1 ) \
            | tee "$work/$out.log" | grep --line-buffered -v '^go: downloading' | progress "$out"; then
        echo "control-plane: building $out failed; the end of its log:" >&2
        tail -n 40 "$work/$out.log" >&2
        exit 1
    fi
    mv "$work/$out" "$bin/$out"
    echo "control-plane: $out done after $((SECONDS - start)) s" >&2
}

echo "control-plane: building Kubernetes $kube_version and etcd into $bin" >&2
echo "control-plane: a first build takes several minutes on two cores; later runs reuse it" >&2
build kubernetes kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldflags"
build kubernetes kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ldflags"
build kubernetes kubectl k8s.io/kubernetes/cmd/kubectl "$ldflags"
build etcd etcd go.etcd.io/etcd/server/v3 "-s -w"
echo "control-plane: all built in $((SECONDS - start)) s" >&2
echo "$bin"
