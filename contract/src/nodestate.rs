//! What the router hands the CNI plugin: the node state file (pod CIDRs,
//! gateways, MTU) and the CNI network configuration list. The router writes
//! both atomically (temporary file, then rename) whenever they change; the
//! plugin only reads them and never talks to the API server.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// File name of the node state inside the router's state directory.
pub const NODE_STATE_FILE: &str = "node.json";
/// The network's name in the conflist (what runtimes call it).
pub const NETWORK_NAME: &str = "tunmesh";
/// The plugin's executable name (`type` in the conflist).
pub const PLUGIN_TYPE: &str = "tunmesh-cni";
/// File name of the conflist in the CNI configuration directory.
pub const CONFLIST_FILE: &str = "10-tunmesh.conflist";
/// The reference `portmap` plugin as tunmesh installs it beside its own
/// (the DaemonSet's init step; a name of its own, so that a node's own
/// `portmap`, of whatever version, is left alone), chained for hostPort.
pub const PORTMAP_TYPE: &str = "tunmesh-portmap";
/// The CNI versions every plugin of the list speaks (a runtime passes one
/// version to the whole chain): tunmesh-cni's, which the chained portmap
/// (containernetworking/plugins, deploy/cni-plugins) speaks too.
pub const CONFLIST_VERSIONS: &[&str] = &["0.3.1", "0.4.0", "1.0.0", "1.1.0"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    /// The Node (or mesh-file node) this router serves.
    pub node_name: String,
    /// The TUN device pods' traffic to other nodes goes through.
    pub interface: String,
    /// MTU for pod interfaces: the TUN MTU, so nothing fragments.
    pub mtu: u16,
    /// The node's pod CIDRs, at most one per family; pods get addresses
    /// here. Read with the same validator as every other input.
    #[serde(deserialize_with = "pod_cidrs")]
    pub pod_cidrs: Vec<IpNetwork>,
    /// The gateway of each pod CIDR (its first host), in the same order.
    pub gateways: Vec<IpAddr>,
    /// The whole cluster's pod networks.
    #[serde(deserialize_with = "cluster_cidrs")]
    pub cluster_cidrs: Vec<IpNetwork>,
}

/// CIDRs as text, each through `validate::cidr` (a CIDR with host bits set
/// or no prefix is refused here as it is everywhere else), named by field.
fn cidrs<'de, D: serde::Deserializer<'de>>(field: &str, d: D) -> Result<Vec<IpNetwork>, D::Error> {
    let texts: Vec<String> = Vec::deserialize(d)?;
    texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            crate::validate::cidr(t)
                .map_err(|e| serde::de::Error::custom(format_args!("{field}[{i}]: {e}")))
        })
        .collect()
}

fn pod_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNetwork>, D::Error> {
    cidrs("pod_cidrs", d)
}

fn cluster_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNetwork>, D::Error> {
    cidrs("cluster_cidrs", d)
}

/// Writes `contents` to `path` through a temporary file in the same
/// directory and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// What is wrong with the node state or the conflist, and which file.
#[derive(Debug, thiserror::Error)]
pub enum NodeStateError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: no pod CIDR yet")]
    NoPodCidr { path: PathBuf },
    #[error("{path}: gateways {gateways:?} do not match pod CIDRs {pod_cidrs:?} (one per CIDR, inside it)")]
    Gateways {
        path: PathBuf,
        gateways: Vec<IpAddr>,
        pod_cidrs: Vec<IpNetwork>,
    },
}

impl NodeState {
    pub fn write(&self, dir: &Path) -> Result<(), NodeStateError> {
        let path = dir.join(NODE_STATE_FILE);
        // NB: a struct of plain fields always encodes.
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        write_atomic(&path, &json).map_err(|source| NodeStateError::Io {
            action: "writing",
            path,
            source,
        })
    }

    /// Reads and checks the file: at least one pod CIDR (each a valid CIDR,
    /// by the same rule as every other input), each with its gateway.
    pub fn read(dir: &Path) -> Result<NodeState, NodeStateError> {
        let path = dir.join(NODE_STATE_FILE);
        let text = std::fs::read(&path).map_err(|source| NodeStateError::Io {
            action: "reading",
            path: path.clone(),
            source,
        })?;
        let st: NodeState =
            serde_json::from_slice(&text).map_err(|source| NodeStateError::Parse {
                path: path.clone(),
                source,
            })?;
        if st.pod_cidrs.is_empty() {
            return Err(NodeStateError::NoPodCidr { path });
        }
        if st.gateways.len() != st.pod_cidrs.len()
            || st
                .pod_cidrs
                .iter()
                .zip(&st.gateways)
                .any(|(c, g)| !c.contains(*g))
        {
            return Err(NodeStateError::Gateways {
                path,
                gateways: st.gateways,
                pod_cidrs: st.pod_cidrs,
            });
        }
        Ok(st)
    }
}

/// The plugin's own settings inside the conflist.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PluginSettings {
    /// Where the router writes node.json.
    pub router_state_dir: PathBuf,
    /// Where the plugin keeps its address allocations (persistent).
    pub data_dir: PathBuf,
    /// Optional log file (logs otherwise go to stderr, never stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file: Option<PathBuf>,
}

/// What the conflist chains after tunmesh-cni.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Chain {
    /// `tunmesh-portmap` with the `portMappings` capability: the runtime
    /// passes each pod's hostPorts, and the plugin DNATs them (and
    /// masquerades hairpin and localhost traffic, `snat`).
    pub portmap: bool,
}

/// The CNI network configuration list for this node: tunmesh-cni, then
/// what `chain` names; version 1.0.0 for runtimes that know no newer one,
/// 1.1.0 offered through `cniVersions`.
pub fn conflist(settings: &PluginSettings, chain: Chain) -> serde_json::Value {
    let mut plugin = serde_json::json!({ "type": PLUGIN_TYPE });
    if let (Some(obj), Ok(serde_json::Value::Object(s))) =
        (plugin.as_object_mut(), serde_json::to_value(settings))
    {
        obj.extend(s);
    }
    let mut plugins = vec![plugin];
    if chain.portmap {
        plugins.push(serde_json::json!({
            "type": PORTMAP_TYPE,
            "capabilities": { "portMappings": true },
            "snat": true,
        }));
    }
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": CONFLIST_VERSIONS,
        "name": NETWORK_NAME,
        "plugins": plugins,
    })
}

/// Writes the conflist into `conf_dir` atomically (creating the directory).
pub fn write_conflist(
    conf_dir: &Path,
    settings: &PluginSettings,
    chain: Chain,
) -> Result<PathBuf, NodeStateError> {
    let path = conf_dir.join(CONFLIST_FILE);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| NodeStateError::Io {
            action: "writing",
            path,
            source,
        }
    };
    std::fs::create_dir_all(conf_dir).map_err(io(conf_dir))?;
    // NB: a `Value` always encodes.
    let json = serde_json::to_vec_pretty(&conflist(settings, chain)).unwrap_or_default();
    write_atomic(&path, &json).map_err(io(&path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() {
        let dir = std::env::temp_dir().join(format!("tunmesh-nodestate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = NodeState {
            node_name: "n1".into(),
            interface: "tunmesh0".into(),
            mtu: 1420,
            pod_cidrs: vec![
                "10.244.1.0/24".parse().unwrap(),
                "fd00::/64".parse().unwrap(),
            ],
            gateways: vec!["10.244.1.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
        };
        s.write(&dir).unwrap();
        assert_eq!(NodeState::read(&dir).unwrap(), s);
        s.gateways[0] = "10.9.9.9".parse().unwrap();
        s.write(&dir).unwrap();
        assert!(matches!(
            NodeState::read(&dir),
            Err(NodeStateError::Gateways { ref gateways, .. }) if gateways[0] == s.gateways[0]
        ));
        let (cidrs, gateways) = (
            std::mem::take(&mut s.pod_cidrs),
            std::mem::take(&mut s.gateways),
        );
        s.write(&dir).unwrap();
        let e = NodeState::read(&dir).unwrap_err();
        assert!(matches!(e, NodeStateError::NoPodCidr { .. }), "{e}");
        assert!(e.to_string().contains(NODE_STATE_FILE), "{e}");
        (s.pod_cidrs, s.gateways) = (cidrs, gateways);
        s.gateways[0] = "10.244.1.1".parse().unwrap();
        s.pod_cidrs[0] = "10.244.1.7/24".parse().unwrap();
        s.write(&dir).unwrap();
        let e = NodeState::read(&dir).unwrap_err().to_string();
        assert!(
            e.contains("pod_cidrs") && e.contains("has host bits set"),
            "{e}"
        );
        std::fs::write(dir.join(NODE_STATE_FILE), "{").unwrap();
        assert!(NodeState::read(&dir)
            .unwrap_err()
            .to_string()
            .contains("parsing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn conflist_shape() {
        let settings = PluginSettings {
            router_state_dir: "/var/lib/tunmesh".into(),
            data_dir: "/var/lib/tunmesh/cni".into(),
            log_file: None,
        };
        let c = conflist(&settings, Chain { portmap: true });
        assert_eq!(c["name"], "tunmesh");
        assert_eq!(c["cniVersion"], "1.0.0");
        assert_eq!(
            c["cniVersions"],
            serde_json::json!(["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(c["plugins"][0]["type"], "tunmesh-cni");
        assert_eq!(c["plugins"][0]["routerStateDir"], "/var/lib/tunmesh");
        assert_eq!(c["plugins"][0]["dataDir"], "/var/lib/tunmesh/cni");
        assert_eq!(c["plugins"][1]["type"], "tunmesh-portmap");
        assert_eq!(c["plugins"][1]["capabilities"]["portMappings"], true);
        assert_eq!(c["plugins"][1]["snat"], true);
        let alone = conflist(&settings, Chain::default());
        assert_eq!(alone["plugins"].as_array().map(Vec::len), Some(1));
    }
}
