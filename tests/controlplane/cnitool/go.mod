// Builds upstream cnitool, a real CNI client (libcni), for the CNI plugin's
// tests (scripts/control-plane.sh). It is a main package of the CNI module.
module tunmesh.dev/lab/cnitool

go 1.26.0

tool github.com/containernetworking/cni/cnitool

require github.com/containernetworking/cni v1.3.0 // indirect
