//! The node state file: what the CNI plugin needs from the router, written
//! atomically to the state directory whenever it changes. The plugin never
//! talks to the API server; this file is its only input about the node.

use std::net::IpAddr;
use std::path::Path;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::status::write_atomic;
use crate::{Error, Result};

/// File name inside the router's state directory.
pub const NODE_STATE_FILE: &str = "node.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeState {
    /// The Node (or mesh-file node) this router serves.
    pub node_name: String,
    /// The TUN device pods' traffic to other nodes goes through.
    pub interface: String,
    /// MTU for pod interfaces: the TUN MTU, so nothing fragments.
    pub mtu: u16,
    /// The node's pod CIDRs, one per family; pods get addresses from these.
    pub pod_cidrs: Vec<IpNetwork>,
    /// The gateway of each pod CIDR (its first host), in the same order;
    /// on the TUN device, and pods' default route.
    pub gateways: Vec<IpAddr>,
    /// The whole cluster's pod networks.
    pub cluster_cidrs: Vec<IpNetwork>,
}

impl NodeState {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::io("encoding node state", e.into()))?;
        write_atomic(&dir.join(NODE_STATE_FILE), &json)
    }

    pub fn read(dir: &Path) -> Result<NodeState> {
        let path = dir.join(NODE_STATE_FILE);
        let text = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::io(format!("parsing {}", path.display()), e.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = std::env::temp_dir().join(format!("tunmesh-nodestate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = NodeState {
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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
