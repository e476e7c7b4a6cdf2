//! Plain domain types shared by every peer source, the reconciler, the
//! data plane and what the router reports. Nothing here knows about files,
//! Kubernetes or sockets.

use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

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
    /// The peer is rotating its static key from this one to `public_key`
    /// (it answers handshakes to both): the change is made in place and
    /// the live session carries on. Any other key change replaces the
    /// peer's sessions (a reinstalled node, say).
    pub rotated_from: Option<PublicKey>,
    /// When the peer made its key (Unix seconds, as its Node says).
    pub key_created_unix: Option<u64>,
    /// The MTU of the peer's own underlay link, as its Node says: the path
    /// to it is no wider than that.
    pub underlay_mtu: Option<u16>,
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

/// Whether `net` lies inside one of `cidrs`.
pub fn covered(net: &IpNetwork, cidrs: &[IpNetwork]) -> bool {
    cidrs.iter().any(|c| {
        c.is_ipv4() == net.is_ipv4() && c.prefix() <= net.prefix() && c.contains(net.network())
    })
}

impl DesiredMesh {
    /// Every prefix that must be routed through the TUN device: the
    /// cluster CIDRs, and the peers' prefixes they do not cover (one route
    /// for the whole cluster, not one per peer; the router's own table
    /// picks the peer).
    pub fn routes(&self) -> Vec<IpNetwork> {
        let mut r: Vec<IpNetwork> = self
            .blackhole_cidrs
            .iter()
            .chain(
                self.peers
                    .iter()
                    .flat_map(|p| p.allowed_ips.iter())
                    .filter(|a| !covered(a, &self.blackhole_cidrs)),
            )
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

/// What a peer source reports about itself: for status.json, `tunmesh-ctl
/// status` and metrics. Each source fills in its part; the router reads it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceStatus {
    /// The Kubernetes source's state (absent with a mesh file).
    pub kubernetes: Option<KubeStatus>,
    /// Mesh-file reloads asked for (SIGHUP), and how the last one went.
    pub reloads: u64,
    pub last_reload: Option<ReloadStatus>,
}

/// One problem found on a Node, as status.json shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProblemStatus {
    pub node: String,
    pub field: String,
    pub reason: String,
    pub message: String,
}

/// The Kubernetes source's state: is the API reachable, when was the mesh
/// last rebuilt, what is wrong and what is waiting.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KubeStatus {
    pub node_name: String,
    pub connected: bool,
    /// The last error talking to the API server (cleared on success).
    pub last_error: Option<String>,
    /// Unix time of the last rebuild from a complete listing.
    pub last_sync_unix: Option<u64>,
    pub nodes: usize,
    pub problems: Vec<ProblemStatus>,
    /// Nodes that are not peers yet, with why (joining).
    pub pending: Vec<String>,
    /// The endpoint this router last published on its Node.
    pub published_endpoint: Option<String>,
    /// The `tunmesh.io/next-public-key` the API shows on this router's
    /// Node (a key rotation announced to the peers).
    #[serde(default)]
    pub announced_next_key: Option<String>,
    /// Events from the API server (Node changes, listings), and those that
    /// changed something the mesh reads.
    #[serde(default)]
    pub watch_events: u64,
    #[serde(default)]
    pub watch_events_changed: u64,
    /// Updates handed to the router (a whole mesh, or the peers that
    /// changed): none for an event that changed no peer.
    #[serde(default)]
    pub mesh_updates: u64,
    /// Bytes the API server sent this router.
    #[serde(default)]
    pub received_bytes: u64,
    /// Nodes whose key changed without being announced: the mesh keeps
    /// the key it had until the change is confirmed.
    #[serde(default)]
    pub held_keys: Vec<HeldKeyStatus>,
    /// Key changes held back since the router started.
    #[serde(default)]
    pub key_holds: u64,
}

/// A key change held back, as status.json shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldKeyStatus {
    pub node: String,
    /// The key the mesh goes on using.
    pub using: String,
    /// The key the Node shows, not taken.
    pub shown: String,
}

/// This router's keys as its Node is to announce them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnKeys {
    pub current: PublicKey,
    /// The key being rotated to.
    pub next: Option<PublicKey>,
    /// When the current key was made (Unix seconds).
    pub created_unix: Option<u64>,
}

/// How the last mesh-file reload went.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadStatus {
    pub at_unix: u64,
    pub ok: bool,
    pub message: String,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
