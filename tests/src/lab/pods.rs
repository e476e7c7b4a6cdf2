//! Pods: a namespace each, attached to its node by running the built
//! `tunmesh-cni` exactly as a container runtime runs it.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};

use super::*;
use crate::netns::add_netns;

impl Lab {
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
}
