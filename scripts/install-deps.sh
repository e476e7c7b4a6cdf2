#!/usr/bin/env bash
# Installs what the demo and the tests need from Debian's packages, only
# what is missing, without recommended packages (those pull in a kernel).
set -euo pipefail
need=()
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v sockperf >/dev/null || need+=(sockperf) # the bench's round trips (ping-pong percentiles)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v sysctl >/dev/null || need+=(procps)
command -v wg >/dev/null || need+=(wireguard-tools)
[ -x /usr/bin/wireguard-go ] || need+=(wireguard-go)
command -v openssl >/dev/null || need+=(openssl)   # the lab's per-run CA and certificates
command -v iptables >/dev/null || need+=(iptables) # NodePort-style DNAT in the CNI tests
# A real container runtime for the CNI tests: podman with its CNI backend,
# runc (crun refuses this machine's hybrid cgroups), static busybox for the
# containers' root file system.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[ -x /bin/busybox ] || need+=(busybox-static)
# The image (scripts/build-image.sh and its test): a Debian root file system
# from Debian's packages, and strip for the binaries.
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v strip >/dev/null || need+=(binutils)
# Real nodes (tunmesh-lab up --kubelet, scripts/conformance.sh): containerd
# with its ctr client, and what kubelet and kube-proxy call on a node.
command -v containerd >/dev/null || need+=(containerd)
command -v conntrack >/dev/null || need+=(conntrack)
command -v socat >/dev/null || need+=(socat)
command -v ebtables >/dev/null || need+=(ebtables)
[ -x /usr/lib/cni/loopback ] || need+=(containernetworking-plugins)
command -v curl >/dev/null || need+=(curl)         # the kubelet test probes pods from a node
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
