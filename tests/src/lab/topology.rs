//! The lab's topology: the underlay bridge, the control plane's and the
//! nodes' namespaces, and nodes joining, leaving and being reinstalled.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tunmesh_keygen::PrivateKey;

use super::*;
use crate::controlplane::{self, ControlPlane};
use crate::netns::{self, add_netns, ip, veth};

impl Lab {
    pub(super) fn prefix(&self) -> String {
        format!("tm{}", self.state.id)
    }

    pub(super) fn build(
        &mut self,
        opts: &LabOptions,
        cp_bin: Option<&Path>,
        prefix: &str,
    ) -> Result<()> {
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
                kubelets: opts.kubelet,
                scheduler_pid: None,
            });
            self.save()?;
            let cp = ControlPlane::start(
                &ns,
                &self.state.dir.join("control-plane"),
                bin,
                &[CLUSTER_V4, CLUSTER_V6],
                opts.kubelet,
            );
            // Keep whatever PIDs it got even on failure, for teardown.
            self.state.control_plane = Some(cp?);
            self.save()?;
            if opts.kubelet {
                return self.build_kubelet(opts);
            }
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
    pub(super) fn plug_underlay(&self, ns: &str, port: &str, addr: &str) -> Result<()> {
        let ul = &self.state.underlay_ns;
        veth(ns, "eth0", ul, port)?;
        ip(&["-n", ul, "link", "set", port, "master", "br0", "up"])?;
        netns::addr_up(ns, "eth0", &format!("{addr}/24"))
    }

    /// A namespace of the lab's on the underlay with address `addr` (for
    /// what plays other hosts there); removed with the lab.
    pub fn add_underlay_namespace(&self, name: &str, addr: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix());
        add_netns(&ns)?;
        self.plug_underlay(&ns, name, addr)?;
        Ok(ns)
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
            kubelet: None,
        };
        let idx = self.state.nodes.len();
        self.state.nodes.push(node.clone());
        self.save()?;
        add_netns(&ns)?;
        self.plug_underlay(&ns, &format!("n{i}"), &node.underlay_ip.to_string())?;
        if let Some((_, mtu)) = self
            .state
            .underlay_mtus
            .iter()
            .find(|(n, _)| *n == node.name)
        {
            let mtu = mtu.to_string();
            ip(&["-n", &ns, "link", "set", "eth0", "mtu", &mtu])?;
            ip(&[
                "-n",
                &self.state.underlay_ns,
                "link",
                "set",
                &format!("n{i}"),
                "mtu",
                &mtu,
            ])?;
        }
        // Real nodes register themselves (kubelet).
        if let Some(cp) = self.state.control_plane.as_ref().filter(|cp| !cp.kubelets) {
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
            cp.router_kubeconfig(controlplane::SA_NAME, &node.name, &kubeconfig)?;
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

    /// Annotation `key` of Node `node` ("" when it has none).
    pub fn annotation(&self, node: &str, key: &str) -> Result<String> {
        let path = format!(
            "jsonpath={{.metadata.annotations.{}}}",
            key.replace('.', "\\.")
        );
        Ok(self
            .kubectl(&["get", "node", node, "-o", &path])?
            .trim()
            .to_string())
    }

    /// The messages of the Events recorded on Node `node` with `reason`.
    pub fn node_events(&self, node: &str, reason: &str) -> Result<Vec<String>> {
        let out = self.kubectl(&[
            "get",
            "events",
            "-n",
            "default",
            "--field-selector",
            &format!("involvedObject.kind=Node,involvedObject.name={node},reason={reason}"),
            "-o",
            "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
        ])?;
        Ok(out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The peers' keys `wg show` lists on node `node`.
    pub fn wg_peers(&self, node: &str) -> Result<String> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        crate::netns::exec(&n.ns, "wg", &["show", &n.interface, "peers"])
    }
}
