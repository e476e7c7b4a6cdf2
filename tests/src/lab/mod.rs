//! The cluster in namespaces.
//!
//! ```text
//!  tm<id>-ul:  br0 ── cp ── n1 ── n2 ── n3       underlay bridge, 172.28.0.0/24
//!                     │     │     │
//!  tm<id>-cp:     eth0 172.28.0.2: etcd, kube-apiserver :6443, kube-controller-manager
//!  tm<id>-node-1: eth0 172.28.0.11, tm<id>n1 (10.244.0.1/32, fd00:10:244::1/128), router
//!     tm<hash> ── tm<id>-node-1-pod-1: eth0 10.244.0.2/32, fd00:10:244::2/128
//!     tm<hash> ── tm<id>-node-1-pod-2: eth0 10.244.0.3/32, ...   (by tunmesh-cni)
//! ```
//!
//! By default the routers take their peers from Node objects: the lab runs
//! a real control plane (`controlplane`), registers one Node per node
//! namespace as kubelet would, and the node IPAM controller hands out the
//! podCIDRs. With `LabOptions::mesh_file` the routers read static mesh files
//! instead, and node N gets 10.244.N.0/24.
//!
//! Users type short names (`node-1`, `node-1-pod-2`); the namespaces carry
//! a per-run id. The lab's record (`lab.json`) and its files live in
//! `/run/tunmesh-lab/<id>/`, written before anything is created, so that
//! `down` (or a Ctrl-C) removes exactly what `up` made.
//!
//! - `topology`: the underlay, node namespaces, joins, leaves, reinstalls;
//! - `routers`: each node's router, its command line and readiness;
//! - `pods`: pods attached by running the CNI plugin as a runtime does;
//! - `record`: the lab's record on disk, lookups, and teardown.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::controlplane::{self, ControlPlane};
use crate::netns::{self};

pub mod kubelet;
mod pods;
mod record;
mod routers;
mod topology;

pub use record::{current, set_current, teardown};

/// Where labs keep their records and files.
pub const DEFAULT_ROOT: &str = "/run/tunmesh-lab";
/// WireGuard port of every lab router.
pub const WG_PORT: u16 = 51820;
/// TUN and pod MTU in the lab (1500-byte underlay minus 80).
pub const MTU: u16 = 1420;
pub const CLUSTER_V4: &str = "10.244.0.0/16";
pub const CLUSTER_V6: &str = "fd00:10:244::/48";

#[derive(Debug, Clone)]
pub struct LabOptions {
    pub nodes: usize,
    pub pods_per_node: usize,
    /// Directory holding lab records (default `/run/tunmesh-lab`).
    pub root: PathBuf,
    /// The router binary; default: found next to the running executable.
    pub router_bin: Option<PathBuf>,
    /// Extra arguments for every router (e.g. `--offload=false`).
    pub router_args: Vec<String>,
    /// Static mesh files instead of the Kubernetes control plane.
    pub mesh_file: bool,
    /// Real nodes: containerd, kubelet and kube-proxy run tunmesh's
    /// DaemonSet and the pods (`kubelet` module).
    pub kubelet: bool,
    /// Underlay links with another MTU than 1500: (node name, MTU), set on
    /// both ends of that node's link before its router starts.
    pub underlay_mtus: Vec<(String, u32)>,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            nodes: 3,
            pods_per_node: 2,
            root: PathBuf::from(DEFAULT_ROOT),
            router_bin: None,
            router_args: Vec::new(),
            mesh_file: false,
            kubelet: false,
            underlay_mtus: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub ns: String,
    /// The router's TUN device; unique across labs, because the WireGuard
    /// API socket `/var/run/wireguard/<interface>.sock` is shared by all
    /// namespaces (`wg show` finds every lab node's router there).
    #[serde(default = "default_interface")]
    pub interface: String,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr_v4: String,
    pub pod_cidr_v6: String,
    pub gateway_v4: Ipv4Addr,
    pub gateway_v6: Ipv6Addr,
    pub public_key: String,
    /// The router's mesh file (mesh-file labs) or kubeconfig (Kubernetes labs).
    pub mesh_file: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub router_pid: Option<u32>,
    /// A real node's daemons and directories (kubelet labs).
    #[serde(default)]
    pub kubelet: Option<kubelet::KubeletNode>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    /// The container ID the CNI plugin knows this pod by.
    #[serde(default)]
    pub container_id: String,
    pub node: usize,
    pub ns: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
}

/// The lab's record on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub id: String,
    pub dir: PathBuf,
    pub underlay_ns: String,
    pub nodes: Vec<NodeInfo>,
    pub pods: Vec<PodInfo>,
    /// The Kubernetes control plane (absent in mesh-file labs).
    #[serde(default)]
    pub control_plane: Option<ControlPlane>,
    /// Router and CNI plugin binaries and the routers' extra arguments,
    /// for nodes added later.
    #[serde(default)]
    pub router_bin: PathBuf,
    #[serde(default)]
    pub cni_bin: PathBuf,
    #[serde(default)]
    pub router_args: Vec<String>,
    #[serde(default)]
    pub underlay_mtus: Vec<(String, u32)>,
    /// Image archives every real node imports (kubelet labs).
    #[serde(default)]
    pub node_images: Vec<PathBuf>,
}

/// A running lab. Dropping it tears it down unless `keep` was called.
pub struct Lab {
    pub state: LabState,
    keep: bool,
}

/// The router binary: `$TUNMESH_ROUTER_BIN`, else next to this executable
/// (or one level up, for test binaries in `target/*/deps`).
pub fn find_binary(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "{name} not found next to {} (run `cargo build --release --workspace`, or set {env})",
        exe.display()
    )
}

/// N of `node-N` (`fallback` + 1 if the name is not of that form).
fn node_number(name: &str, fallback: usize) -> usize {
    name.trim_start_matches("node-")
        .parse()
        .unwrap_or(fallback + 1)
}

fn default_interface() -> String {
    "tunmesh0".into()
}

fn node_underlay_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(172, 28, 0, 10 + i as u8)
}

/// Environment variables for a process, in order.
pub type Env = Vec<(String, String)>;

impl Lab {
    /// tests: panics with the reason if it cannot be built.
    pub fn for_test(nodes: usize, pods: usize) -> Lab {
        Lab::up(&LabOptions {
            nodes,
            pods_per_node: pods,
            ..Default::default()
        })
        .expect("lab up")
    }

    /// Builds the cluster: underlay, nodes with routers, pods. On any failure
    /// everything made so far is removed before the error is returned.
    pub fn up(opts: &LabOptions) -> Result<Lab> {
        if opts.nodes == 0 || opts.nodes > 200 || opts.pods_per_node > 200 {
            bail!("--nodes must be 1-200 and --pods-per-node 0-200");
        }
        if opts.kubelet && opts.mesh_file {
            bail!("--kubelet runs Kubernetes nodes; it cannot take static mesh files");
        }
        let router_bin = match &opts.router_bin {
            Some(p) => p.clone(),
            None => find_binary("tunmesh-router", "TUNMESH_ROUTER_BIN")?,
        };
        let cni_bin = find_binary("tunmesh-cni", "TUNMESH_CNI_BIN")?;
        let id = netns::run_id();
        let dir = opts.root.join(&id);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let prefix = format!("tm{id}");
        let mut lab = Lab {
            state: LabState {
                id: id.clone(),
                dir: dir.clone(),
                underlay_ns: format!("{prefix}-ul"),
                nodes: Vec::new(),
                pods: Vec::new(),
                control_plane: None,
                router_bin,
                cni_bin,
                router_args: opts.router_args.clone(),
                underlay_mtus: opts.underlay_mtus.clone(),
                node_images: Vec::new(),
            },
            keep: false,
        };
        lab.save()?;
        crate::lab::set_current(Some(dir.clone()));
        // The control plane's binaries first: a first build takes minutes,
        // and nothing should be half up meanwhile.
        let cp_bin = if opts.mesh_file {
            None
        } else {
            Some(controlplane::binaries()?)
        };
        lab.build(opts, cp_bin.as_deref(), &prefix)?;
        Ok(lab)
    }
}
