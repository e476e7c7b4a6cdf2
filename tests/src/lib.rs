//! The tunmesh lab: a Kubernetes-shaped cluster built from network
//! namespaces on one machine, and the checks the demo and the end-to-end
//! tests run against it.
//!
//! - `netns`: namespaces, veths, commands and sockets inside a namespace;
//! - `lab`: the cluster (underlay bridge, node namespaces running routers,
//!   pod namespaces), recorded on disk so `exec` and `down` find it later;
//! - `controlplane`: etcd, kube-apiserver, kube-controller-manager (and
//!   kube-scheduler for real nodes) for the lab;
//! - `conformance`: Kubernetes' e2e tests against a lab of real nodes;
//! - `checks`: ping, byte-exact TCP transfers, iperf3, the connectivity matrix;
//! - `pcap`: just enough of the pcap format to inspect underlay captures;
//! - `peers`: a one-peer tunmesh router or a `wg`-configured WireGuard
//!   daemon in a namespace;
//! - `podman`: a container runtime with its own storage, in a node's namespace;
//! - `probe`: a numbered UDP probe between namespaces and the silence it measures;
//! - `bench`: tunmesh against raw veth, wireguard-go and boringtun-cli;
//! - `scale`: a router's cost among thousands of hollow Nodes.

pub mod bench;
pub mod checks;
pub mod conformance;
pub mod controlplane;
pub mod impair;
pub mod lab;
pub mod netns;
pub mod pcap;
pub mod peers;
pub mod podman;
pub mod probe;
pub mod scale;
pub mod soak;

pub use lab::{Lab, LabOptions};

/// The reference portmap plugin the image carries as `tunmesh-portmap`
/// (`scripts/cni-plugins.sh`, linked into the control plane's directory by
/// `scripts/control-plane.sh`): what the tests chain.
pub fn portmap_bin() -> anyhow::Result<std::path::PathBuf> {
    let p = controlplane::binaries()?.join("portmap");
    anyhow::ensure!(
        p.is_file(),
        "{} is missing (scripts/control-plane.sh builds it)",
        p.display()
    );
    Ok(p)
}

/// True when running as root (namespaces need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that need root: returns false (and says so) when they must be
/// skipped on a developer's machine; in CI (`CI` set) a missing root is a
/// failure, never a skip.
pub fn require_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI must run it"
    );
    eprintln!("skipping {test}: needs root (runs in CI)");
    false
}
