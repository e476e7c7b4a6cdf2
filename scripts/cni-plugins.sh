#!/usr/bin/env bash
# Builds the reference CNI plugins tunmesh chains after its own (portmap,
# for hostPort), from the module deploy/cni-plugins pins, once, and reuses
# the result: cached under $TUNMESH_CACHE/go (default /var/cache/tunmesh),
# keyed by its go.mod, go.sum and the Go version. About 10 s the first time.
# The image carries it (scripts/build-image.sh); the DaemonSet's init step
# installs it on each node as tunmesh-portmap.
#
#   scripts/cni-plugins.sh        build if missing, print the directory holding portmap
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
mod="$here/deploy/cni-plugins"
cache_root=${TUNMESH_CACHE:-/var/cache/tunmesh}
command -v go >/dev/null || { echo "cni-plugins: Go is not installed" >&2; exit 1; }
key=$( (cat "$mod/go.mod" "$mod/go.sum"; go version) | sha256sum | cut -c1-16)
out="$cache_root/go/cni-plugins-$key"
if [[ ! -x "$out/portmap" ]]; then
    echo "cni-plugins: building portmap ($(cd "$mod" && go list -m -f '{{.Path}} {{.Version}}' github.com/containernetworking/plugins))" >&2
    mkdir -p "$out"
    (cd "$mod" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/portmap.tmp" \
        github.com/containernetworking/plugins/plugins/meta/portmap)
    (cd "$mod" && go list -m -f 'portmap: {{.Path}} {{.Version}}' github.com/containernetworking/plugins) >"$out/VERSIONS"
    mv "$out/portmap.tmp" "$out/portmap"
fi
echo "$out"
