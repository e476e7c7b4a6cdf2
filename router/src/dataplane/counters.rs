//! Counters the packet path bumps: drops by reason and totals. Relaxed
//! atomics: they are statistics, read by the status writer.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

/// Why a packet was dropped. Every drop on the packet path has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Outbound: no peer's allowed IPs contain the destination.
    NoPeer,
    /// Outbound: a multicast or broadcast destination. The mesh carries
    /// unicast only; these are mostly the kernel's own IPv6 housekeeping
    /// (MLD reports, router solicitations) on the TUN device.
    Multicast,
    /// Outbound: the peer has no endpoint yet (it has not reached us).
    NoEndpoint,
    /// Inbound: decrypted, but the inner source is not in the sender's allowed IPs.
    SourceNotAllowed,
    /// Inbound: authentication or decryption failed (bad tag, bad index).
    DecryptFailed,
    /// Inbound: a data message whose counter was seen already, or is older
    /// than the replay window (8192 messages) allows.
    Replay,
    /// Inbound: a handshake with a bad MAC, or from a key that is not a peer.
    HandshakeRejected,
    /// Not an IP packet (outbound) or not a WireGuard message (inbound).
    Malformed,
    /// The kernel refused the UDP send.
    SendFailed,
    /// The kernel refused the TUN write.
    TunWriteFailed,
    /// A batch was full and the packet could not be queued.
    QueueFull,
    /// Outbound while a handshake is in flight: the peer's queue of packets
    /// waiting for the session (boringtun's, 256 deep) was full.
    HandshakeQueueFull,
    /// Packets that waited for a handshake that never completed: boringtun
    /// gives up after REKEY_ATTEMPT_TIME (90 s) and discards them.
    HandshakeTimeout,
    /// Inbound: a handshake addressed to a static key this node gave up in
    /// a key rotation (a peer that still has the old key).
    RetiredKey,
    /// Outbound: longer than the path MTU to its peer allows (and not to
    /// be fragmented): answered with ICMP "fragmentation needed" or
    /// "packet too big" from the pod's gateway (`icmp_too_big_sent`).
    TooBig,
}

const N: usize = 15;

impl Drop {
    pub const ALL: [Drop; N] = [
        Drop::NoPeer,
        Drop::Multicast,
        Drop::NoEndpoint,
        Drop::SourceNotAllowed,
        Drop::DecryptFailed,
        Drop::Replay,
        Drop::HandshakeRejected,
        Drop::Malformed,
        Drop::SendFailed,
        Drop::TunWriteFailed,
        Drop::QueueFull,
        Drop::HandshakeQueueFull,
        Drop::HandshakeTimeout,
        Drop::RetiredKey,
        Drop::TooBig,
    ];

    /// Stable snake_case name, used in status output and (later) metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Drop::NoPeer => "no_peer",
            Drop::Multicast => "multicast",
            Drop::NoEndpoint => "no_endpoint",
            Drop::SourceNotAllowed => "source_not_allowed",
            Drop::DecryptFailed => "decrypt_failed",
            Drop::Replay => "replay",
            Drop::HandshakeRejected => "handshake_rejected",
            Drop::Malformed => "malformed",
            Drop::SendFailed => "send_failed",
            Drop::TunWriteFailed => "tun_write_failed",
            Drop::QueueFull => "queue_full",
            Drop::HandshakeQueueFull => "handshake_queue_full",
            Drop::HandshakeTimeout => "handshake_timeout",
            Drop::RetiredKey => "retired_key",
            Drop::TooBig => "too_big",
        }
    }
}

/// Data-plane wide counters.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; N],
    pub tun_rx_packets: AtomicU64,
    pub tun_tx_packets: AtomicU64,
    pub udp_rx_datagrams: AtomicU64,
    pub udp_tx_datagrams: AtomicU64,
    pub cookie_replies: AtomicU64,
    /// ICMP "fragmentation needed" / "packet too big" replies written to
    /// the TUN for packets too big for their peer's path.
    pub icmp_too_big_sent: AtomicU64,
}

impl Counters {
    #[inline]
    pub fn drop(&self, why: Drop) {
        self.drops[why as usize].fetch_add(1, Relaxed);
    }

    #[inline]
    pub fn drop_n(&self, why: Drop, n: u64) {
        if n > 0 {
            self.drops[why as usize].fetch_add(n, Relaxed);
        }
    }

    pub fn drops(&self, why: Drop) -> u64 {
        self.drops[why as usize].load(Relaxed)
    }

    pub fn snapshot(&self) -> CountersSnapshot {
        CountersSnapshot {
            drops: Drop::ALL
                .iter()
                .map(|d| (d.name().to_string(), self.drops(*d)))
                .collect(),
            tun_rx_packets: self.tun_rx_packets.load(Relaxed),
            tun_tx_packets: self.tun_tx_packets.load(Relaxed),
            udp_rx_datagrams: self.udp_rx_datagrams.load(Relaxed),
            udp_tx_datagrams: self.udp_tx_datagrams.load(Relaxed),
            cookie_replies: self.cookie_replies.load(Relaxed),
            icmp_too_big_sent: self.icmp_too_big_sent.load(Relaxed),
        }
    }
}

/// A point-in-time copy of the counters, for status output.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub drops: std::collections::BTreeMap<String, u64>,
    pub tun_rx_packets: u64,
    pub tun_tx_packets: u64,
    pub udp_rx_datagrams: u64,
    pub udp_tx_datagrams: u64,
    pub cookie_replies: u64,
    #[serde(default)]
    pub icmp_too_big_sent: u64,
}

impl CountersSnapshot {
    /// The drops that happened, `reason=count` separated by spaces, or
    /// `none` (for one-line summaries).
    pub fn drops_summary(&self) -> String {
        let drops: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if drops.is_empty() {
            "none".into()
        } else {
            drops.join(" ")
        }
    }
}

/// Per-peer traffic counters (inner packets and their bytes).
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
}

impl PeerCounters {
    /// `packets` sealed and sent at once (a run of one peer's in a batch,
    /// or the ones that waited for a handshake), `bytes` of inner packets
    /// in all.
    #[inline]
    pub fn tx_n(&self, packets: u64, bytes: u64) {
        self.tx_packets.fetch_add(packets, Relaxed);
        self.tx_bytes.fetch_add(bytes, Relaxed);
    }

    /// `packets` received at once (a run of one peer's in a batch),
    /// `bytes` of inner packets in all.
    #[inline]
    pub fn rx_n(&self, packets: u64, bytes: u64) {
        self.rx_packets.fetch_add(packets, Relaxed);
        self.rx_bytes.fetch_add(bytes, Relaxed);
    }
}
