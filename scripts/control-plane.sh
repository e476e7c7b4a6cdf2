#!/usr/bin/env bash
# Builds the Go programs the lab and the tests run, once, and reuses them:
#   tests/controlplane/kubernetes  kube-apiserver, kube-controller-manager, kubectl
#                                  (the Kubernetes release pinned in its go.mod)
#   tests/controlplane/etcd        etcd (the release pinned in its go.mod)
#   tests/controlplane/cnitool     cnitool, upstream's CNI client
#   tests/controlplane/node        kubelet, kube-proxy, kube-scheduler, agnhost and
#                                  e2e.test (the upstream end-to-end tests), for
#                                  the kubelet lab; pause from the same release
#   tests/controlplane/coredns     CoreDNS with a small plugin set
#   deploy/cni-plugins             the reference portmap plugin the image
#                                  carries (scripts/cni-plugins.sh), for the
#                                  tests that chain it
# Each module is cached on its own, keyed by its go.mod, go.sum and the Go
# version, so changing one pin rebuilds only that module. The directory
# printed on stdout holds links to all of them.
#
#   scripts/control-plane.sh          build what is missing, print the bin directory
#   TUNMESH_CACHE=/some/dir ...       cache root (default /var/cache/tunmesh)
#
# Progress goes to stderr; stdout is only the bin directory, so callers can
# write `bin=$(scripts/control-plane.sh)`.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
mods="$here/tests/controlplane"
cache_root=${TUNMESH_CACHE:-/var/cache/tunmesh}

command -v go >/dev/null || { echo "control-plane: Go is not installed" >&2; exit 1; }
gover=$(go version)

module_key() { # module-dir
    (cat "$mods/$1/go.mod" "$mods/$1/go.sum"; echo "$gover") | sha256sum | cut -c1-16
}

# go build -v names each package as it compiles it: turn that into a count
# every 100 packages, so a first build (minutes on two cores) shows progress.
progress() {
    awk -v what="$1" '
        { n++ }
        n % 100 == 0 { printf "control-plane:   %s: %d packages compiled\n", what, n > "/dev/stderr"; fflush("/dev/stderr") }
        END { printf "control-plane:   %s: %d packages compiled\n", what, n > "/dev/stderr" }'
}

start=$SECONDS
built=0

build_module() { # module-dir ldflags (package output-name)...
    local dir=$1 flags=$2; shift 2
    local out="$cache_root/go/$dir-$(module_key "$dir")"
    local missing=() pkg name
    while [[ $# -gt 0 ]]; do
        pkg=$1 name=$2; shift 2
        [[ -x "$out/$name" ]] || missing+=("$pkg" "$name")
    done
    MODULE_DIR=$out
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $built -eq 0 ]]; then
        echo "control-plane: building into $cache_root/go; a first build takes several minutes on two cores, later runs reuse it" >&2
    fi
    built=1
    local work="$out.tmp"
    rm -rf "$work"
    mkdir -p "$work" "$out"
    set -- "${missing[@]}"
    while [[ $# -gt 0 ]]; do
        pkg=$1 name=$2; shift 2
        echo "control-plane: building $name ($pkg) ..." >&2
        # `test:PKG` is a test binary (go test -c), the rest are programs.
        local build=(go build -v)
        if [[ $pkg == test:* ]]; then
            pkg=${pkg#test:}
            build=(go test -c -v)
        fi
        if ! ( cd "$mods/$dir" && CGO_ENABLED=0 "${build[@]}" -trimpath -ldflags "$flags" -o "$work/$name" "$pkg" 2>&1 ) \
                | tee "$work/$name.log" | { grep --line-buffered -v '^go: downloading' || true; } | progress "$name"; then
            echo "control-plane: building $name failed; the end of its log:" >&2
            tail -n 40 "$work/$name.log" >&2
            rm -rf "$work"
            exit 1
        fi
        mv "$work/$name" "$out/$name"
        echo "control-plane: $name done after $((SECONDS - start)) s" >&2
    done
    rm -rf "$work"
}

kube_version=$(cd "$mods/kubernetes" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[[ -n "$kube_version" ]] || { echo "control-plane: no k8s.io/kubernetes pin in go.mod" >&2; exit 1; }
major=${kube_version#v}; major=${major%%.*}
minor=${kube_version#v*.}; minor=${minor%%.*}
# What `kubectl version` and the API server's /version report; a build from
# the module zip has no git metadata, so stamp it the way Kubernetes' own
# build does.
kube_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    kube_ldflags+=" -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    kube_ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

build_module kubernetes "$kube_ldflags" \
    k8s.io/kubernetes/cmd/kube-apiserver kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager kube-controller-manager \
    k8s.io/kubernetes/cmd/kubectl kubectl
kube_dir=$MODULE_DIR
build_module etcd "-s -w" go.etcd.io/etcd/server/v3 etcd
etcd_dir=$MODULE_DIR
build_module cnitool "-s -w" github.com/containernetworking/cni/cnitool cnitool
cnitool_dir=$MODULE_DIR
build_module node "$kube_ldflags" \
    k8s.io/kubernetes/cmd/kubelet kubelet \
    k8s.io/kubernetes/cmd/kube-proxy kube-proxy \
    k8s.io/kubernetes/cmd/kube-scheduler kube-scheduler \
    k8s.io/kubernetes/test/images/agnhost agnhost \
    test:k8s.io/kubernetes/test/e2e e2e.test
node_dir=$MODULE_DIR
# The pod sandbox's pause program, from the same release's source.
if [[ ! -x "$node_dir/pause" ]]; then
    src=$(cd "$mods/node" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c
    echo "control-plane: building pause ($src) ..." >&2
    gcc -Os -Wall -Werror -static -DVERSION="v3.10.2-$kube_version" -o "$node_dir/pause.tmp" "$src"
    strip "$node_dir/pause.tmp"
    mv "$node_dir/pause.tmp" "$node_dir/pause"
fi
build_module coredns "-s -w" . coredns
coredns_dir=$MODULE_DIR
cni_dir=$(TUNMESH_CACHE=$cache_root "$here/scripts/cni-plugins.sh")

# One directory with all of them, named after what it links to.
key=$(echo "$kube_dir $etcd_dir $cnitool_dir $node_dir $coredns_dir $cni_dir" | sha256sum | cut -c1-16)
bin="$cache_root/control-plane/$key/bin"
if [[ ! -e "$bin/portmap" ]]; then
    mkdir -p "$bin"
    for t in kube-apiserver kube-controller-manager kubectl; do ln -sfn "$kube_dir/$t" "$bin/$t"; done
    ln -sfn "$etcd_dir/etcd" "$bin/etcd"
    ln -sfn "$cnitool_dir/cnitool" "$bin/cnitool"
    for t in kubelet kube-proxy kube-scheduler agnhost e2e.test pause; do ln -sfn "$node_dir/$t" "$bin/$t"; done
    ln -sfn "$coredns_dir/coredns" "$bin/coredns"
    ln -sfn "$cni_dir/portmap" "$bin/portmap"
fi
if [[ $built -eq 1 ]]; then
    echo "control-plane: all built in $((SECONDS - start)) s" >&2
else
    echo "control-plane: cached in $bin" >&2
fi
echo "$bin"
