//! Plain domain types shared by every peer source and the data plane. Nothing
//! here knows about files, Kubernetes or sockets.

use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;

use crate::PublicKey;

/// One remote node as the mesh wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    /// Stable identity of the peer (the Node name). A changed key under the
    /// same name replaces the peer rather than adding a second one.
    pub name: String,
    pub public_key: PublicKey,
    /// Where to send UDP; `None` waits for the peer to reach us first.
    pub endpoint: Option<SocketAddr>,
    /// Inner source addresses accepted from this peer and destinations routed to it.
    pub allowed_ips: Vec<IpNetwork>,
    /// The peer node's own addresses (its InternalIPs), accepted as inner
    /// sources but never routed into the tunnel. A pod's request to that
    /// node's address leaves over the underlay, and the node answers from
    /// that address through the mesh (its route to the pod is the tunnel);
    /// without this the answer would be dropped as a spoofed source.
    pub node_addresses: Vec<IpAddr>,
    /// Seconds between keepalives, `None` for off.
    pub persistent_keepalive: Option<u16>,
}

/// The whole mesh a source wants right now: every peer, sorted by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredMesh {
    pub peers: Vec<PeerSpec>,
    /// Prefixes routed into the TUN device even without a peer (the cluster
    /// CIDR), so that traffic to a pod network with no peer is dropped and
    /// counted by the router instead of leaving the node in clear.
    pub blackhole_cidrs: Vec<IpNetwork>,
}

impl DesiredMesh {
    /// Every prefix that must be routed through the TUN device.
    pub fn routes(&self) -> Vec<IpNetwork> {
        let mut r: Vec<IpNetwork> = self
            .blackhole_cidrs
            .iter()
            .chain(self.peers.iter().flat_map(|p| p.allowed_ips.iter()))
            .copied()
            .collect();
        r.sort_by_key(|n| (n.is_ipv6(), n.network(), n.prefix()));
        r.dedup();
        r
    }
}

/// What a peer source hands the router each time something changes: the
/// mesh, and this node's own pod CIDRs (gateway addresses on the TUN device
/// and the CNI plugin's address ranges; empty while none is assigned).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub mesh: DesiredMesh,
    pub pod_cidrs: Vec<IpNetwork>,
}

/// Displays prefixes as `10.244.1.0/24, fd00:10:244:1::/64` (logs).
pub struct Nets<'a>(pub &'a [IpNetwork]);

impl std::fmt::Display for Nets<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{n}")?;
        }
        Ok(())
    }
}
