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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    /// The Node (or mesh-file node) this router serves.
    pub node_name: String,
    /// The TUN device pods' traffic to other nodes goes through.
    pub interface: String,
    /// MTU for pod interfaces: the TUN MTU, so nothing fragments.
    pub mtu: u16,
    /// The node's pod CIDRs, at most one per family; pods get addresses here.
    pub pod_cidrs: Vec<IpNetwork>,
    /// The gateway of each pod CIDR (its first host), in the same order.
    pub gateways: Vec<IpAddr>,
    /// The whole cluster's pod networks.
    pub cluster_cidrs: Vec<IpNetwork>,
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

impl NodeState {
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(&dir.join(NODE_STATE_FILE), &json)
    }

    /// Reads and checks the file: pod CIDRs and gateways must pair up.
    pub fn read(dir: &Path) -> Result<NodeState, String> {
        let path = dir.join(NODE_STATE_FILE);
        let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let st: NodeState = serde_json::from_slice(&text)
            .map_err(|e| format!("parsing {}: {e}", path.display()))?;
        if st.pod_cidrs.is_empty() {
            return Err(format!("{}: no pod CIDR yet", path.display()));
        }
        if st.gateways.len() != st.pod_cidrs.len()
            || st
                .pod_cidrs
                .iter()
                .zip(&st.gateways)
                .any(|(c, g)| !c.contains(*g))
        {
            return Err(format!(
                "{}: gateways {:?} do not match pod CIDRs {:?}",
                path.display(),
                st.gateways,
                st.pod_cidrs
            ));
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

/// The CNI network configuration list for this node: version 1.0.0 for
/// runtimes that know no newer one, 1.1.0 offered through `cniVersions`.
pub fn conflist(settings: &PluginSettings) -> serde_json::Value {
    let mut plugin = serde_json::json!({ "type": PLUGIN_TYPE });
    if let (Some(obj), Ok(serde_json::Value::Object(s))) =
        (plugin.as_object_mut(), serde_json::to_value(settings))
    {
        obj.extend(s);
    }
    serde_json::json!({
        "cniVersion": "1.0.0",
        "cniVersions": ["0.3.1", "0.4.0", "1.0.0", "1.1.0"],
        "name": NETWORK_NAME,
        "plugins": [plugin],
    })
}

/// Writes the conflist into `conf_dir` atomically (creating the directory).
pub fn write_conflist(conf_dir: &Path, settings: &PluginSettings) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(conf_dir)?;
    let path = conf_dir.join(CONFLIST_FILE);
    let json = serde_json::to_vec_pretty(&conflist(settings)).map_err(std::io::Error::other)?;
    write_atomic(&path, &json)?;
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
        assert!(NodeState::read(&dir).unwrap_err().contains("do not match"));
        std::fs::write(dir.join(NODE_STATE_FILE), "{").unwrap();
        assert!(NodeState::read(&dir).unwrap_err().contains("parsing"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn conflist_shape() {
        let c = conflist(&PluginSettings {
            router_state_dir: "/var/lib/tunmesh".into(),
            data_dir: "/var/lib/tunmesh/cni".into(),
            log_file: None,
        });
        assert_eq!(c["name"], "tunmesh");
        assert_eq!(c["plugins"][0]["type"], "tunmesh-cni");
        assert_eq!(c["plugins"][0]["routerStateDir"], "/var/lib/tunmesh");
        assert_eq!(c["plugins"][0]["dataDir"], "/var/lib/tunmesh/cni");
    }
}
