//! Real nodes (`tunmesh-lab up --kubelet`): each node namespace also gets
//! a private mount namespace and cgroup root, and in them containerd,
//! kubelet and kube-proxy, built from the pinned Kubernetes release. tunmesh
//! is installed only as operators install it: its image imported into every
//! node's containerd and `kubectl apply -k deploy/`; kubelet starts the
//! DaemonSet, containerd's CRI calls `tunmesh-cni`, the scheduler places the
//! pods and kube-proxy programs Services.
//!
//! ```text
//!  tm<id>-node-N  (network namespace; eth0 172.28.0.1N, fd00:172:28::1N)
//!    holder: `unshare --mount` (keeps the node's mount namespace), in which
//!      /etc/cni/net.d, /opt/cni/bin, /var/lib/{kubelet,containerd,cni,tunmesh},
//!      /run/{containerd,wireguard,netns}, /var/log/{pods,containers},
//!      /etc/kubernetes are the node's own directories, bound from
//!      /run/tunmesh-lab/<id>/node-N/root/, and the sysctls kubelet rewrites
//!      (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops) are
//!      files of its own, so nodes do not fight over the shared kernel
//!    containerd, kubelet (cgroupfs, cgroup root /tm<id>-node-N), kube-proxy
//!    (iptables mode): processes tracked in the pids cgroup
//!    /tm<id>-node-N.daemons, so teardown finds shims and containers too
//! ```

//!
//! In parts: `node` (a node's namespaces, cgroups, daemons and joins),
//! `images` (the node images and tunmesh's, imported into containerd),
//! `workloads` (tunmesh installed from deploy/, CoreDNS, the test pods,
//! and the connectivity matrix over them).

use std::net::Ipv6Addr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::controlplane;

mod images;
mod node;
mod workloads;

pub use node::stop_node;
pub use workloads::{failed_paths, KubePath, KubePod};

/// The node's own directories: (name under the node's root, path in the node).
const BINDS: &[(&str, &str)] = &[
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("opt-cni-bin", "/opt/cni/bin"),
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("var-lib-containerd", "/var/lib/containerd"),
    ("var-lib-cni", "/var/lib/cni"),
    ("var-lib-tunmesh", "/var/lib/tunmesh"),
    ("run-containerd", "/run/containerd"),
    ("run-wireguard", "/run/wireguard"),
    ("run-netns", "/run/netns"),
    ("var-log-pods", "/var/log/pods"),
    ("var-log-containers", "/var/log/containers"),
    ("etc-kubernetes", "/etc/kubernetes"),
];

/// Sysctls kubelet sets on start, each given a file of the node's own:
/// (file name, path, initial value).
const SYSCTLS: &[(&str, &str, &str)] = &[
    ("overcommit_memory", "/proc/sys/vm/overcommit_memory", "1"),
    ("panic", "/proc/sys/kernel/panic", "10"),
    ("panic_on_oops", "/proc/sys/kernel/panic_on_oops", "1"),
];

/// The images every node holds (no registry is reachable): archive file
/// names in the set `scripts/node-images.sh` prints.
const NODE_IMAGES: &[&str] = &[
    "pause.tar",
    "busybox.tar",
    "agnhost.tar",
    "coredns.tar",
    "glibc-dns-testing.tar",
    "nginx.tar",
];

/// The tunmesh image's archive in the lab's directory.
const TUNMESH_IMAGE_FILE: &str = "tunmesh-image.tar";

/// What tunmesh's DaemonSet leaves on a node for the runtime: the
/// conflist and the plugin (paths under the node's root).
pub const CNI_FILES: &[&str] = &[
    "etc-cni-net.d/10-tunmesh.conflist",
    "opt-cni-bin/tunmesh-cni",
    "opt-cni-bin/tunmesh-portmap",
];

/// How a real node joins a running lab.
#[derive(Debug, Default)]
pub struct Join<'a> {
    /// Leave the tunmesh image out of the node's containerd, so its
    /// router cannot start until [`Lab::import_tunmesh_image`].
    pub without_tunmesh_image: bool,
    /// Copy tunmesh's CNI files from this node first, as a node made from
    /// another's disk image has them: kubelet then reports the network
    /// ready before the node's router is.
    pub cni_files_from: Option<&'a str>,
}

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// What the lab keeps about a real node, for teardown and later joins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubeletNode {
    /// Host directory holding the node's own directories.
    pub root: PathBuf,
    /// kubelet's cgroup root, made in every v1 hierarchy (`tm<id>-node-N`).
    pub cgroup: String,
    pub underlay_ip6: Ipv6Addr,
    pub holder_pid: Option<u32>,
    pub containerd_pid: Option<u32>,
    pub kubelet_pid: Option<u32>,
    pub proxy_pid: Option<u32>,
}

/// The underlay's IPv6 address of node `i` (and the control plane's, 2).
pub fn underlay_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x28, 0, 0, 0, 0, 10 + i as u16)
}

pub const API_IP6: &str = "fd00:172:28::2";

/// The tunmesh image's name as deploy/kustomization.yaml sets it, the way
/// containerd's CRI spells it (`tunmesh:0.1.0` → docker.io/library/...).
pub fn tunmesh_image() -> Result<String> {
    let text = std::fs::read_to_string(controlplane::deploy_dir().join("kustomization.yaml"))
        .context("reading deploy/kustomization.yaml")?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let (name, tag) = field("newName:")
        .zip(field("newTag:"))
        .context("deploy/kustomization.yaml sets no newName/newTag for the tunmesh image")?;
    Ok(format!("docker.io/library/{name}:{tag}"))
}
