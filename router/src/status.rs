//! What the router reports about itself: a JSON snapshot of its key, peers,
//! counters and last reload, written atomically to the state directory every
//! second. Operators and tests read it; `tunmesh-ctl status` and metrics will
//! be built on the same snapshot.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::dataplane::counters::CountersSnapshot;
use crate::dataplane::Dataplane;
pub use crate::model::{unix_now, ReloadStatus};
use crate::{Error, Result};

/// File name of the snapshot inside the state directory.
pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PeerStatus {
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// The peer node's own addresses, accepted as sources, never routed.
    #[serde(default)]
    pub node_addresses: Vec<String>,
    pub persistent_keepalive: Option<u16>,
    /// Unix time of the last completed handshake, if any.
    pub latest_handshake_unix: Option<u64>,
    /// Seconds since the peer made its key (its Node's
    /// tunmesh.io/public-key-created; none while it rotates, or unknown).
    #[serde(default)]
    pub key_age_seconds: Option<u64>,
    /// The largest inner packet the path to the peer carries (none:
    /// unknown yet).
    #[serde(default)]
    pub path_mtu: Option<u16>,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

/// What one data-plane queue (a TUN queue and its UDP socket) carried.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueStatus {
    pub tun_packets_read: u64,
    pub tun_packets_written: u64,
    pub udp_datagrams_received: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
    pub counters: CountersSnapshot,
    /// What the TUN offloads did (all zero with offloads off).
    #[serde(default)]
    pub offload: crate::dataplane::tun::OffloadStats,
    /// Per data-plane queue, what it carried.
    #[serde(default)]
    pub queues: Vec<QueueStatus>,
    /// The crypto workers (the queue workers and their helpers) and how
    /// much of the batches' encryption the helpers took.
    #[serde(default)]
    pub crypto: crate::dataplane::crypto::PoolStats,
    pub reloads: u64,
    pub last_reload: Option<ReloadStatus>,
    /// The Kubernetes source's state (absent with a mesh file).
    #[serde(default)]
    pub kubernetes: Option<crate::model::KubeStatus>,
    /// This node's pod CIDRs as last applied (empty while none is assigned).
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    /// Host settings the router needs and could not make (forwarding, the
    /// TUN's rp_filter), one line each with the reason; empty when all is well.
    #[serde(default)]
    pub host_problems: Vec<String>,
    /// The data plane's threads (one per queue, and the timers); a dead one
    /// carries why it ended, and makes `/healthz` fail.
    #[serde(default)]
    pub workers: Vec<crate::dataplane::WorkerSlot>,
    /// How this router started: from the warm-start cache or cold, and why
    /// a cache that was there was not used.
    #[serde(default)]
    pub start: crate::warm::StartStatus,
    /// The node's key: its age, a rotation under way, the last one.
    #[serde(default)]
    pub key: crate::rotation::KeyStatus,
    /// The TUN device's and pods' MTU.
    #[serde(default)]
    pub mtu: u16,
    /// Handovers to a new router on this node that failed (this router
    /// resumed), and why the last one did.
    #[serde(default)]
    pub handovers: HandoverStatus,
    /// How long until this snapshot is rewritten: 1 s, longer with
    /// thousands of peers (writing it costs at most a quarter of a
    /// percent of a core). A snapshot older than this, and a few seconds,
    /// is a router that stopped writing it.
    #[serde(default)]
    pub rewritten_every_seconds: u64,
}

/// Handovers that did not happen, as the router that resumed saw them.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoverStatus {
    pub failed: u64,
    pub last_failure: Option<HandoverFailureStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HandoverFailureStatus {
    pub at_unix: u64,
    /// Which step it broke off at, why, and how this router resumed.
    pub message: String,
}

/// Peer statuses from the data plane's current table.
pub fn peers(dp: &Dataplane) -> Vec<PeerStatus> {
    dp.table()
        .peers
        .iter()
        .map(|p| {
            let (at, endpoint, path_mtu) = {
                let st = p.lock();
                (st.last_handshake(), st.endpoint, st.path_mtu)
            };
            let at = at.and_then(|t| t.duration_since(UNIX_EPOCH).ok());
            PeerStatus {
                name: p.name.clone(),
                public_key: p.public_key.to_base64(),
                endpoint: endpoint.map(|e| e.to_string()),
                allowed_ips: p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                node_addresses: p.node_addresses.iter().map(|n| n.to_string()).collect(),
                persistent_keepalive: p.persistent_keepalive,
                latest_handshake_unix: at.map(|d| d.as_secs()),
                path_mtu: Some(path_mtu).filter(|m| *m > 0),
                key_age_seconds: p.key_created_unix.map(|c| unix_now().saturating_sub(c)),
                tx_packets: p.counters.tx_packets.load(Relaxed),
                tx_bytes: p.counters.tx_bytes.load(Relaxed),
                rx_packets: p.counters.rx_packets.load(Relaxed),
                rx_bytes: p.counters.rx_bytes.load(Relaxed),
            }
        })
        .collect()
}

/// One real data-plane queue: its TUN queue and UDP socket.
pub type RealQueue = (
    std::sync::Arc<crate::dataplane::tun::TunDevice>,
    std::sync::Arc<crate::dataplane::udp::UdpSocket>,
);

/// What the workers read and write, from tunmesh's own queues.
pub fn queue_io(queues: &[RealQueue]) -> Vec<crate::dataplane::Queue> {
    queues
        .iter()
        .map(|(t, u)| {
            (
                std::sync::Arc::clone(t) as std::sync::Arc<dyn crate::dataplane::TunIo>,
                std::sync::Arc::clone(u) as std::sync::Arc<dyn crate::dataplane::UdpIo>,
            )
        })
        .collect()
}

/// What each queue carried.
pub fn queues(q: &[RealQueue]) -> Vec<QueueStatus> {
    q.iter()
        .map(|(tun, udp)| {
            let (read, written) = tun.packet_counts();
            QueueStatus {
                tun_packets_read: read,
                tun_packets_written: written,
                udp_datagrams_received: udp.datagrams_received(),
            }
        })
        .collect()
}

/// Everything the status snapshot says that is not the data plane's own.
pub struct Context<'a> {
    pub interface: &'a str,
    pub listen_port: u16,
    pub offload: crate::dataplane::tun::OffloadStats,
    pub queues: Vec<QueueStatus>,
    pub source: crate::model::SourceStatus,
    pub pod_cidrs: &'a [ipnetwork::IpNetwork],
    pub host_problems: &'a [String],
    pub start: &'a crate::warm::StartStatus,
    pub key: crate::rotation::KeyStatus,
    pub mtu: u16,
    pub handovers: HandoverStatus,
    pub rewritten_every: std::time::Duration,
}

impl Status {
    /// The snapshot of the data plane `dp` and `c`.
    pub fn collect(dp: &Dataplane, c: Context<'_>) -> Status {
        Status {
            interface: c.interface.to_string(),
            public_key: dp.public_key().to_base64(),
            listen_port: c.listen_port,
            peers: peers(dp),
            counters: dp.counters.snapshot(),
            offload: c.offload,
            queues: c.queues,
            crypto: dp.crypto_stats(),
            reloads: c.source.reloads,
            last_reload: c.source.last_reload,
            kubernetes: c.source.kubernetes,
            pod_cidrs: c.pod_cidrs.iter().map(|p| p.to_string()).collect(),
            host_problems: c.host_problems.to_vec(),
            workers: dp.workers(),
            start: c.start.clone(),
            key: c.key,
            mtu: c.mtu,
            handovers: c.handovers,
            rewritten_every_seconds: c.rewritten_every.as_secs(),
        }
    }
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// reader never sees a half-written file.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    tunmesh_contract::nodestate::write_atomic(path, contents)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

impl Status {
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_vec(self).map_err(|source| Error::Json {
            context: "encoding status".into(),
            source,
        })?;
        write_atomic(&dir.join(STATUS_FILE), &json)
    }

    pub fn read(dir: &Path) -> Result<Status> {
        let path = dir.join(STATUS_FILE);
        let text = std::fs::read(&path)
            .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
        serde_json::from_slice(&text).map_err(|source| Error::Json {
            context: format!("parsing {}", path.display()),
            source,
        })
    }
}
