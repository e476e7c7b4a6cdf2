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

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tunmesh_keygen::PrivateKey;

use crate::controlplane::{self, ControlPlane};
use crate::netns::{self, add_netns, exec, ip, veth};

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
    /// A Kubernetes lab with `nodes` nodes and `pods` pods on each, for
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

    fn prefix(&self) -> String {
        format!("tm{}", self.state.id)
    }

    fn build(&mut self, opts: &LabOptions, cp_bin: Option<&Path>, prefix: &str) -> Result<()> {
        let ul = self.state.underlay_ns.clone();
        add_netns(&ul)?;
        ip(&["-n", &ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ul, "link", "set", "br0", "up"])?;

        if let Some(bin) = cp_bin {
            let ns = format!("{prefix}-cp");
            add_netns(&ns)?;
            self.plug_underlay(&ns, "cp", controlplane::API_IP)?;
            // Record the namespace before anything runs in it.
            self.state.control_plane = Some(ControlPlane {
                ns: ns.clone(),
                dir: self.state.dir.join("control-plane"),
                bin: bin.to_path_buf(),
                cluster_cidrs: Vec::new(),
                etcd_pid: None,
                apiserver_pid: None,
                controller_manager_pid: None,
            });
            self.save()?;
            let cp = ControlPlane::start(
                &ns,
                &self.state.dir.join("control-plane"),
                bin,
                &[CLUSTER_V4, CLUSTER_V6],
            );
            // Keep whatever PIDs it got even on failure, for teardown.
            self.state.control_plane = Some(cp?);
            self.save()?;
            for _ in 0..opts.nodes {
                self.add_node_namespace()?;
            }
            for i in 0..opts.nodes {
                self.start_router(i)?;
            }
            for i in 0..opts.nodes {
                self.wait_router(i)?;
                self.wait_node_ready(i)?;
            }
            // Every router has every other node as a peer.
            for n in self.state.nodes.clone() {
                let want = opts.nodes - 1;
                if self
                    .wait_status(&n.name, Duration::from_secs(30), |s| s.peers.len() == want)
                    .is_none()
                {
                    bail!(
                        "{}'s router has not got all {want} peers after 30 s; its log: {}",
                        n.name,
                        n.log.display()
                    );
                }
            }
        } else {
            let keys: Vec<PrivateKey> = (0..opts.nodes).map(|_| PrivateKey::generate()).collect();
            for key in &keys {
                let i = self.add_node_namespace()?;
                let n = &mut self.state.nodes[i];
                n.public_key = key.public_key().to_base64();
                key.write_file(&n.mesh_file.with_file_name("private.key"))?;
            }
            for i in 0..opts.nodes {
                let text = self.mesh_file_text(i, None);
                std::fs::write(&self.state.nodes[i].mesh_file, text)?;
                self.start_router(i)?;
            }
            for i in 0..opts.nodes {
                self.wait_router(i)?;
            }
        }
        self.save()?;
        for i in 1..=opts.nodes {
            for j in 1..=opts.pods_per_node {
                self.add_pod(i, j)?;
            }
        }
        Ok(())
    }

    /// Connects namespace `ns` to the underlay bridge as `eth0` with `addr`.
    fn plug_underlay(&self, ns: &str, port: &str, addr: &str) -> Result<()> {
        let ul = &self.state.underlay_ns;
        veth(ns, "eth0", ul, port)?;
        ip(&["-n", ul, "link", "set", port, "master", "br0", "up"])?;
        netns::addr_up(ns, "eth0", &format!("{addr}/24"))
    }

    /// Adds the next node: its namespace on the underlay, and in a
    /// Kubernetes lab its Node object (kubelet's part) with the podCIDRs
    /// the controller gives it. Returns its 0-based index. The router is
    /// not started.
    pub fn add_node_namespace(&mut self) -> Result<usize> {
        // The first free node number (a removed node's is free again).
        let i = (1..)
            .find(|k| {
                !self
                    .state
                    .nodes
                    .iter()
                    .any(|n| n.name == format!("node-{k}"))
            })
            .unwrap_or(self.state.nodes.len() + 1);
        let ns = format!("{}-node-{i}", self.prefix());
        let ndir = self.state.dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&ndir)?;
        let mut node = NodeInfo {
            name: format!("node-{i}"),
            ns: ns.clone(),
            interface: format!("tm{}n{i}", self.state.id),
            underlay_ip: node_underlay_ip(i),
            pod_cidr_v4: format!("10.244.{i}.0/24"),
            pod_cidr_v6: format!("fd00:10:244:{i:x}::/64"),
            gateway_v4: Ipv4Addr::new(10, 244, i as u8, 1),
            gateway_v6: format!("fd00:10:244:{i:x}::1").parse()?,
            public_key: String::new(),
            mesh_file: ndir.join("mesh.toml"),
            kubeconfig: None,
            state_dir: ndir.join("state"),
            log: ndir.join("router.log"),
            router_pid: None,
        };
        let idx = self.state.nodes.len();
        self.state.nodes.push(node.clone());
        self.save()?;
        add_netns(&ns)?;
        self.plug_underlay(&ns, &format!("n{i}"), &node.underlay_ip.to_string())?;
        if let Some(cp) = &self.state.control_plane {
            cp.register_node(&node.name, &node.underlay_ip.to_string())?;
            let cidrs = cp.wait_pod_cidrs(&node.name, Duration::from_secs(90))?;
            for c in cidrs {
                let net: ipnetwork::IpNetwork =
                    c.parse().with_context(|| format!("podCIDR {c}"))?;
                match net {
                    ipnetwork::IpNetwork::V4(n) => {
                        node.pod_cidr_v4 = c.clone();
                        node.gateway_v4 = Ipv4Addr::from(u32::from(n.network()) + 1);
                    }
                    ipnetwork::IpNetwork::V6(n) => {
                        node.pod_cidr_v6 = c.clone();
                        node.gateway_v6 = Ipv6Addr::from(u128::from(n.network()) + 1);
                    }
                }
            }
            let kubeconfig = ndir.join("kubeconfig");
            cp.router_kubeconfig(controlplane::SA_NAME, &kubeconfig)?;
            node.kubeconfig = Some(kubeconfig);
            self.state.nodes[idx] = node;
            self.save()?;
        }
        Ok(idx)
    }

    /// Adds a node to a running lab (a join): namespace, Node, router, and
    /// `pods` pods once the router is up.
    pub fn add_node(&mut self, pods: usize) -> Result<usize> {
        let i = self.add_node_namespace()?;
        self.start_router(i)?;
        self.wait_router(i)?;
        self.wait_node_ready(i)?;
        for j in 1..=pods {
            self.add_pod(i + 1, j)?;
        }
        Ok(i)
    }

    /// Waits until node `i`'s router has its pod CIDRs and published its
    /// key; records the key.
    pub fn wait_node_ready(&mut self, i: usize) -> Result<()> {
        let n = self.state.nodes[i].clone();
        let key = netns::wait_for(Duration::from_secs(60), || {
            let st = tunmesh_contract::NodeState::read(&n.state_dir).ok()?;
            if !st.pod_cidrs.iter().any(|c| c.to_string() == n.pod_cidr_v4) {
                return None;
            }
            let status = tunmesh_router::status::Status::read(&n.state_dir).ok()?;
            // The status snapshot too, so that what `up` prints and what
            // `tunmesh-ctl status` shows right after agree.
            status
                .pod_cidrs
                .contains(&n.pod_cidr_v4)
                .then_some(status.public_key)
        })
        .with_context(|| {
            format!(
                "{}'s router did not take its podCIDR {} within 60 s; its log: {}",
                n.name,
                n.pod_cidr_v4,
                n.log.display()
            )
        })?;
        self.state.nodes[i].public_key = key;
        self.save()
    }

    /// The mesh file of node `i` (0-based): every other node is a peer,
    /// except `without` (for tests that remove a peer).
    pub fn mesh_file_text(&self, i: usize, without: Option<usize>) -> String {
        let n = &self.state.nodes[i];
        let mut s = format!(
            "# tunmesh lab {id}, {name}\n[node]\nprivate_key_file = \"{key}\"\nlisten_port = {WG_PORT}\n\
             pod_cidrs = [\"{v4}\", \"{v6}\"]\ncluster_cidrs = [\"{CLUSTER_V4}\", \"{CLUSTER_V6}\"]\n",
            id = self.state.id,
            name = n.name,
            key = n.mesh_file.with_file_name("private.key").display(),
            v4 = n.pod_cidr_v4,
            v6 = n.pod_cidr_v6,
        );
        for (k, p) in self.state.nodes.iter().enumerate() {
            if k == i || Some(k) == without {
                continue;
            }
            s += &format!(
                "\n[[peer]]\nname = \"{}\"\npublic_key = \"{}\"\nendpoint = \"{}:{WG_PORT}\"\nallowed_ips = [\"{}\", \"{}\"]\nnode_addresses = [\"{}\"]\n",
                p.name, p.public_key, p.underlay_ip, p.pod_cidr_v4, p.pod_cidr_v6, p.underlay_ip
            );
        }
        s
    }

    /// Starts node `i`'s router (0-based) with the lab's router binary and
    /// arguments, and records its PID.
    pub fn start_router(&mut self, i: usize) -> Result<()> {
        let extra = self.state.router_args.clone();
        self.start_router_with(i, &extra)
    }

    /// Starts node `i`'s router with `extra` arguments instead of the lab's.
    pub fn start_router_with(&mut self, i: usize, extra: &[String]) -> Result<()> {
        let invocation = self.router_invocation(i, extra)?;
        self.spawn_router(i, &invocation)
    }

    /// Starts node `i`'s router with an invocation made beforehand by
    /// `router_invocation` (a restart measured from a fault spawns at once,
    /// without reading the ConfigMap first).
    pub fn spawn_router(&mut self, i: usize, (args, env): &(Vec<String>, Env)) -> Result<()> {
        let n = &self.state.nodes[i];
        // A previous run's status would look like this one's.
        let _ = std::fs::remove_file(n.state_dir.join(tunmesh_router::status::STATUS_FILE));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let child = netns::spawn(&n.ns, &self.state.router_bin, &args, &env, &n.log)?;
        self.state.nodes[i].router_pid = Some(child.id());
        self.save()
    }

    /// The arguments and environment node `i`'s router runs with: its own
    /// paths and names, then `extra`. Every path in them is under the lab's
    /// directory.
    pub fn router_invocation(&self, i: usize, extra: &[String]) -> Result<(Vec<String>, Env)> {
        let n = &self.state.nodes[i];
        let state = n.state_dir.display().to_string();
        let cni_conf = n.state_dir.with_file_name("cni-conf").display().to_string();
        // Per-node paths and names (many nodes share this machine); the
        // interface overrides the ConfigMap's, which every node would share.
        let mut args: Vec<String> = vec![
            "--interface".into(),
            n.interface.clone(),
            "--state-dir".into(),
            state,
            "--cni-conf-dir".into(),
            cni_conf,
        ];
        // In a Kubernetes lab, the rest comes as the DaemonSet gives it:
        // NODE_NAME and the ConfigMap from deploy/ as environment.
        let mut env: Env = Vec::new();
        match (&n.kubeconfig, &self.state.control_plane) {
            (Some(kc), Some(cp)) => {
                env = cp.router_env()?;
                env.push(("NODE_NAME".into(), n.name.clone()));
                args.extend(["--kubeconfig".into(), kc.display().to_string()]);
            }
            _ => args.extend([
                "--mtu".into(),
                MTU.to_string(),
                "--mesh-file".into(),
                n.mesh_file.display().to_string(),
            ]),
        }
        args.extend(extra.iter().cloned());
        Ok((args, env))
    }

    /// Node `i` (0-based) leaves: its router stops, its Node object is
    /// deleted (in a Kubernetes lab), and its namespaces and pods go. Later
    /// nodes keep their names; the next `add_node` reuses a freed number.
    pub fn remove_node(&mut self, i: usize) -> Result<()> {
        self.stop_router(i)?;
        let n = self.state.nodes[i].clone();
        if self.state.control_plane.is_some() {
            self.kubectl(&["delete", "node", &n.name, "--ignore-not-found"])?;
        }
        for p in self.state.pods.iter().filter(|p| p.node == i) {
            netns::del_netns(&p.ns);
        }
        let number = node_number(&n.name, i);
        let _ = ip(&[
            "-n",
            &self.state.underlay_ns,
            "link",
            "del",
            &format!("n{number}"),
        ]);
        netns::del_netns(&n.ns);
        let _ = std::fs::remove_dir_all(n.state_dir.parent().unwrap_or(&n.state_dir));
        self.state.pods.retain(|p| p.node != i);
        for p in &mut self.state.pods {
            if p.node > i {
                p.node -= 1;
            }
        }
        self.state.nodes.remove(i);
        self.save()
    }

    /// Replaces node `i` (0-based) with a new machine under the same Node
    /// name: router stopped, its pods' and its own namespace deleted, its
    /// disk (key, allocations) wiped; then the namespace made again on the
    /// same underlay address, the router started with a fresh state and
    /// the pods attached again. The Node object stays, as it does when a
    /// machine is reinstalled.
    pub fn recreate_node(&mut self, i: usize) -> Result<()> {
        self.stop_router(i)?;
        let n = self.state.nodes[i].clone();
        let pods: Vec<usize> = self
            .state
            .pods
            .iter()
            .filter(|p| p.node == i)
            .filter_map(|p| p.name.rsplit('-').next()?.parse().ok())
            .collect();
        for p in self.state.pods.iter().filter(|p| p.node == i) {
            netns::del_netns(&p.ns);
        }
        self.state.pods.retain(|p| p.node != i);
        // The underlay end first: a deleted namespace's links go away
        // asynchronously, and the new one needs the same port name.
        let _ = ip(&[
            "-n",
            &self.state.underlay_ns,
            "link",
            "del",
            &format!("n{}", node_number(&n.name, i)),
        ]);
        netns::del_netns(&n.ns);
        let _ = std::fs::remove_dir_all(&n.state_dir);
        let _ = std::fs::remove_dir_all(n.state_dir.with_file_name("cni-conf"));
        self.save()?;
        add_netns(&n.ns)?;
        self.plug_underlay(
            &n.ns,
            &format!("n{}", node_number(&n.name, i)),
            &n.underlay_ip.to_string(),
        )?;
        self.start_router(i)?;
        self.wait_router(i)?;
        self.wait_node_ready(i)?;
        for j in pods {
            self.add_pod(i + 1, j)?;
        }
        Ok(())
    }

    /// Stops node `i`'s router (SIGTERM) and waits for it to exit.
    pub fn stop_router(&mut self, i: usize) -> Result<()> {
        if let Some(pid) = self.state.nodes[i].router_pid.take() {
            netns::stop_pid(pid, Duration::from_secs(5));
        }
        self.save()
    }

    /// The control plane, or an error naming the mesh-file lab.
    pub fn control_plane(&self) -> Result<&ControlPlane> {
        self.state.control_plane.as_ref().with_context(|| {
            format!(
                "lab {} runs on mesh files, without Kubernetes",
                self.state.id
            )
        })
    }

    pub fn control_plane_mut(&mut self) -> Result<&mut ControlPlane> {
        let id = self.state.id.clone();
        self.state
            .control_plane
            .as_mut()
            .with_context(|| format!("lab {id} runs on mesh files, without Kubernetes"))
    }

    /// kubectl against the lab's cluster, as its admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.control_plane()?.kubectl(args)
    }

    /// Waits until node `i`'s router has written its first status.
    pub fn wait_router(&self, i: usize) -> Result<()> {
        let n = &self.state.nodes[i];
        crate::peers::wait_router(&n.name, n.router_pid.unwrap_or(0), &n.state_dir, &n.log)
    }

    /// Attaches pod `j` to node `i` (both 1-based): a namespace, then the
    /// `tunmesh-cni` binary run exactly as a container runtime runs it (the
    /// CNI environment, the node's conflist entry on stdin, inside the
    /// node's namespace); the pod's addresses are what it answers.
    pub fn add_pod(&mut self, i: usize, j: usize) -> Result<()> {
        let node = self.state.nodes[i - 1].clone();
        let name = format!("{}-pod-{j}", node.name);
        let ns = format!("{}-{name}", self.prefix());
        let container_id = format!("{}-{name}", self.state.id);
        self.state.pods.push(PodInfo {
            name: name.clone(),
            container_id: container_id.clone(),
            node: i - 1,
            ns: ns.clone(),
            ipv4: Ipv4Addr::UNSPECIFIED,
            ipv6: Ipv6Addr::UNSPECIFIED,
        });
        self.save()?;
        add_netns(&ns)?;
        let result = self
            .cni(
                &node,
                "ADD",
                &container_id,
                &format!("/var/run/netns/{ns}"),
                &name,
            )
            .with_context(|| format!("attaching {name} with tunmesh-cni"))?;
        let mut ipv4 = None;
        let mut ipv6 = None;
        for ip in result["ips"].as_array().into_iter().flatten() {
            let addr: ipnetwork::IpNetwork = ip["address"]
                .as_str()
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("tunmesh-cni result for {name}: bad ips entry {ip}"))?;
            match addr {
                ipnetwork::IpNetwork::V4(a) => ipv4 = Some(a.ip()),
                ipnetwork::IpNetwork::V6(a) => ipv6 = Some(a.ip()),
            }
        }
        let pod = self
            .state
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .context("pod record vanished")?;
        pod.ipv4 =
            ipv4.with_context(|| format!("tunmesh-cni gave {name} no IPv4 address: {result}"))?;
        pod.ipv6 =
            ipv6.with_context(|| format!("tunmesh-cni gave {name} no IPv6 address: {result}"))?;
        self.save()
    }

    /// The network configuration a runtime would pass to the plugin: the
    /// node's conflist (written by its router) with the list's name and
    /// version put into the plugin's entry.
    pub fn cni_config(&self, node: &NodeInfo) -> Result<serde_json::Value> {
        let path = node
            .state_dir
            .with_file_name("cni-conf")
            .join(tunmesh_contract::nodestate::CONFLIST_FILE);
        let text = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (the router writes it once it has a pod CIDR)",
                path.display()
            )
        })?;
        let list: serde_json::Value =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        let mut conf = list["plugins"][0].clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        Ok(conf)
    }

    /// Runs `tunmesh-cni` for `command` in `node`'s namespace as a runtime
    /// does; returns its stdout as JSON (`null` when it printed nothing).
    pub fn cni(
        &self,
        node: &NodeInfo,
        command: &str,
        container_id: &str,
        netns: &str,
        pod_name: &str,
    ) -> Result<serde_json::Value> {
        let conf = self.cni_config(node)?;
        let cni_path = self
            .state
            .cni_bin
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let out = crate::netns::run_cni(
            &node.ns,
            &self.state.cni_bin,
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", container_id),
                ("CNI_NETNS", netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", &cni_path),
                (
                    "CNI_ARGS",
                    &format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod_name};K8S_POD_INFRA_CONTAINER_ID={container_id}"),
                ),
            ],
            &conf.to_string(),
        )?;
        if !out.status.success() {
            bail!(
                "tunmesh-cni {command} failed: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("tunmesh-cni {command} printed {text:?}"))
    }

    fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.state)?;
        let path = self.state.dir.join("lab.json");
        let tmp = self.state.dir.join("lab.json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Loads lab `id`, or the newest lab under `root` when `id` is `None`.
    pub fn load(root: &Path, id: Option<&str>) -> Result<Lab> {
        let dir = match id {
            Some(id) => root.join(id),
            None => {
                let mut labs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(root)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter(|e| e.path().join("lab.json").exists())
                            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
                            .collect()
                    })
                    .unwrap_or_default();
                labs.sort();
                match labs.pop() {
                    Some((_, d)) => d,
                    None => bail!(
                        "no lab is running (none under {}); start one with `tunmesh-lab up`",
                        root.display()
                    ),
                }
            }
        };
        let path = dir.join("lab.json");
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let state: LabState =
            serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
        Ok(Lab { state, keep: true })
    }

    /// All labs under `root`.
    pub fn list(root: &Path) -> Vec<String> {
        std::fs::read_dir(root)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("lab.json").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Leave the lab running when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The namespace behind a short name (`node-1`, `node-1-pod-2`, `underlay`).
    pub fn resolve(&self, name: &str) -> Result<String> {
        if name == "underlay" {
            return Ok(self.state.underlay_ns.clone());
        }
        if let Some(n) = self.state.nodes.iter().find(|n| n.name == name) {
            return Ok(n.ns.clone());
        }
        if let Some(p) = self.state.pods.iter().find(|p| p.name == name) {
            return Ok(p.ns.clone());
        }
        if let (Some(cp), "control-plane") = (&self.state.control_plane, name) {
            return Ok(cp.ns.clone());
        }
        let mut names: Vec<&str> = self.state.nodes.iter().map(|n| n.name.as_str()).collect();
        names.extend(self.state.pods.iter().map(|p| p.name.as_str()));
        if self.state.control_plane.is_some() {
            names.push("control-plane");
        }
        bail!(
            "no node or pod named {name:?} in lab {} (have: underlay, {})",
            self.state.id,
            names.join(", ")
        )
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.state.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, name: &str) -> Option<&PodInfo> {
        self.state.pods.iter().find(|p| p.name == name)
    }

    /// The current status snapshot of a node's router.
    pub fn router_status(&self, node: &str) -> Result<tunmesh_router::status::Status> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        Ok(tunmesh_router::status::Status::read(&n.state_dir)?)
    }

    /// Runs a command in a node's or pod's namespace.
    pub fn exec(&self, name: &str, cmd: &str, args: &[&str]) -> Result<String> {
        exec(&self.resolve(name)?, cmd, args)
    }

    /// Removes everything: routers, namespaces, the lab's files.
    pub fn down(mut self) -> Result<()> {
        self.keep = true;
        teardown(&self.state.dir)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            let _ = teardown(&self.state.dir);
        }
    }
}

/// Removes the lab recorded in `dir`: stops its routers, deletes every
/// namespace carrying its id, removes `dir`. Safe to call twice, and on a
/// lab that was only partly built.
pub fn teardown(dir: &Path) -> Result<()> {
    let id = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .context("lab directory has no name")?;
    if let Ok(text) = std::fs::read(dir.join("lab.json")) {
        if let Ok(state) = serde_json::from_slice::<LabState>(&text) {
            for n in &state.nodes {
                if let Some(pid) = n.router_pid {
                    netns::stop_pid(pid, Duration::from_secs(3));
                }
            }
        }
    }
    // Anything else still running inside the lab's namespaces (iperf3,
    // tcpdump...), then the namespaces themselves.
    netns::purge_prefix(&format!("tm{id}-"));
    // API sockets of routers that could not remove their own.
    if let Ok(d) = std::fs::read_dir(tunmesh_router::uapi::SOCKET_DIR) {
        for e in d.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("tm{id}n"))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Mounts a container runtime left under the lab's files (podman's
    // shm), deepest first, so the directory can go.
    if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| Path::new(m).starts_with(dir))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = netns::run("umount", &["-l", m]);
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    if current() == Some(dir.to_path_buf()) {
        set_current(None);
    }
    Ok(())
}

static CURRENT: std::sync::Mutex<Option<PathBuf>> = std::sync::Mutex::new(None);

/// The lab being built or run by this process, for the Ctrl-C handler.
pub fn current() -> Option<PathBuf> {
    CURRENT.lock().map(|c| c.clone()).unwrap_or(None)
}

pub fn set_current(dir: Option<PathBuf>) {
    if let Ok(mut c) = CURRENT.lock() {
        *c = dir;
    }
}

impl Lab {
    /// Polls node `node`'s status until `pred` holds; returns that status.
    pub fn wait_status(
        &self,
        node: &str,
        timeout: Duration,
        mut pred: impl FnMut(&tunmesh_router::status::Status) -> bool,
    ) -> Option<tunmesh_router::status::Status> {
        netns::wait_for(timeout, || {
            self.router_status(node).ok().filter(|s| pred(s))
        })
    }

    /// Sends SIGHUP to node `node`'s router (reload its mesh file).
    pub fn reload(&self, node: &str) -> Result<()> {
        let pid = self
            .node(node)
            .and_then(|n| n.router_pid)
            .context("router not running")?;
        // SAFETY: signalling a process this lab started.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) } != 0 {
            bail!(
                "signalling router of {node}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
}
