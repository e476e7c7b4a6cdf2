//go:build tools

// The reference CNI plugins tunmesh chains after its own, pinned by this
// module's go.mod: portmap, for hostPort. scripts/cni-plugins.sh builds it;
// the image carries it and the DaemonSet's init step installs it on each
// node as tunmesh-portmap.
package tools

import _ "github.com/containernetworking/plugins/plugins/meta/portmap"
