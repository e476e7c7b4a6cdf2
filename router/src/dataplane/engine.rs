//! The packet path's protocol steps: the engine around boringtun's
//! `noise::Tunn`. Every step here is I/O-free: it takes a batch in and fills
//! batches out (what to write to the TUN device, what to send on the UDP
//! side), counting drops by reason and per-peer traffic as it goes; the
//! workers (`worker`) do the system calls around it. So two engines can be
//! driven against each other packet by packet in a test.
//!
//! ```text
//! seal            TUN packets ─ dst → peer (longest prefix over allowed IPs)
//!                 ─ Tunn::encapsulate ─ datagrams to peers' endpoints
//! open            datagrams ─ MAC + load check (cookie reply when under load)
//!                 ─ peer by receiver index, or by static key for an initiation
//!                 ─ Tunn::decapsulate ─ inner source in that peer's allowed
//!                 IPs? ─ TUN packets;  handshake replies ─ datagrams
//! flush_waiting   after a handshake: the packets that waited for it, sealed
//! tick            Tunn::update_timers per peer (rekey, keepalive, retries)
//! ```
//!
//! Buffers: every output batch is the caller's, allocated once per worker
//! and reused; a step writes into its slots in place. Nothing here
//! allocates per packet, except boringtun keeping a packet while a
//! handshake is in flight. A step never needs more output slots than it
//! was given packets (one datagram per packet, at most one reply or TUN
//! packet per datagram); what a handshake releases comes out of
//! `flush_waiting`, as many batches as it takes.
//!
//! The peer table is an immutable snapshot behind `ArcSwap`, loaded once per
//! batch; reconciles swap in a new one. Per-packet trouble is logged at
//! debug level only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use tracing::{debug, warn};

use super::counters::{Counters, Drop};
use super::io::Batch;
use super::keys::{NodeKeys, StaticKey, Verified};
use super::packet;
use super::peers::{Peer, PeerState, PeerTable};
use crate::model::DesiredMesh;
use crate::{PrivateKey, PublicKey};

/// How often WireGuard timers are ticked. The protocol's finest timer is
/// REKEY_TIMEOUT (5 s) with jitter; boringtun expects ticks well below that.
pub const TICK: Duration = Duration::from_millis(100);
/// Handshakes per second before the rate limiter answers with cookies.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard's data-message overhead: header, counter and tag.
pub const WG_OVERHEAD: usize = 32;
/// The first byte of a WireGuard transport data message.
const MESSAGE_DATA: u8 = 4;
/// How many packets boringtun keeps for a peer while a handshake is in
/// flight (its `MAX_QUEUE_DEPTH`); it discards more without saying so.
const HANDSHAKE_QUEUE: u16 = 256;
/// During a key rotation, how long an initiation goes unanswered before
/// it is tried with the other key (under boringtun's own retry, 5 s).
const KEY_FALLBACK: Duration = Duration::from_secs(4);

/// Placeholder address for TUN-bound packets (they have no UDP peer).
const UNSPECIFIED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// What a reconcile changed, by peer name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MeshDiff {
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub replaced: Vec<String>,
    pub removed: Vec<String>,
    pub unchanged: usize,
}

impl MeshDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.updated.is_empty()
            && self.replaced.is_empty()
            && self.removed.is_empty()
    }
}

/// A peer's live WireGuard session, carried from one router process to
/// its successor (a handover).
#[derive(Debug, Clone)]
pub struct PeerSession {
    pub name: String,
    pub public_key: PublicKey,
    /// The peer's session index prefix (its sessions' receiver indices).
    pub index: u32,
    /// Where the peer is now (it may have roamed from the configured one).
    pub endpoint: Option<SocketAddr>,
    pub tunn: boringtun::noise::state::TunnState,
}

/// The data plane of one node: its key, its peers and its counters.
pub struct Dataplane {
    table: ArcSwap<PeerTable>,
    /// The node's static keys (the next one too during a key rotation).
    keys: ArcSwap<NodeKeys>,
    /// This node's gateway on each pod network: the source of ICMP replies.
    gateways: ArcSwap<(Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>)>,
    pub counters: Counters,
    next_index: AtomicU32,
    apply_lock: Mutex<()>,
    buf_size: usize,
    /// The timer thread's first tick comes at once instead of a `TICK`
    /// later: set for a warm start, whose peers still hold sessions with
    /// this node's previous process and keep sending on them, unheard,
    /// until a handshake from here replaces them.
    pub first_tick_at_once: std::sync::atomic::AtomicBool,
    /// An eventfd the workers poll besides their queues: written when they
    /// are to stop, so they stop at once rather than within `POLL` (none if
    /// the kernel refused one: they then notice within `POLL`).
    pub(super) wake: Option<std::os::fd::OwnedFd>,
    /// Worker threads of the current generation that have entered their
    /// loops (a successor says it is forwarding once all of them have).
    pub(super) running: std::sync::atomic::AtomicUsize,
    /// Sessions handed over by the previous process, taken by the peers the
    /// next `apply` creates (by name and key).
    adopt: Mutex<std::collections::HashMap<String, PeerSession>>,
    /// The worker threads `spawn` started, and how each ended if it did.
    pub(super) workers: Mutex<Vec<WorkerSlot>>,
}

/// One supervised data-plane thread.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerSlot {
    /// `queue-N` or `timers`.
    pub name: String,
    /// `None` while it runs; why it ended otherwise (it ended while the
    /// router was running: a panic, or a loop that returned).
    pub failure: Option<String>,
}

impl Dataplane {
    /// A data plane for packets up to `mtu` bytes on the TUN side.
    pub fn new(key: &PrivateKey, mtu: usize) -> Arc<Self> {
        let mut seed = [0u8; 4];
        // The initial index only needs to differ between restarts, so that a
        // peer's stale session index does not match a new session.
        seed.copy_from_slice(&key.public_key().as_bytes()[..4]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let start = u32::from_le_bytes(seed) ^ std::process::id() ^ now;
        Arc::new(Dataplane {
            table: ArcSwap::from_pointee(PeerTable::default()),
            keys: ArcSwap::from_pointee(NodeKeys::new(StaticKey::new(key, HANDSHAKE_RATE_LIMIT))),
            gateways: ArcSwap::from_pointee((None, None)),
            counters: Counters::default(),
            next_index: AtomicU32::new(start),
            apply_lock: Mutex::new(()),
            workers: Mutex::new(Vec::new()),
            first_tick_at_once: std::sync::atomic::AtomicBool::new(false),
            wake: super::eventfd(),
            running: std::sync::atomic::AtomicUsize::new(0),
            adopt: Mutex::new(std::collections::HashMap::new()),
            // Room for the largest inner packet plus WireGuard's overhead, and
            // never less than a handshake initiation (148 bytes).
            buf_size: (mtu + WG_OVERHEAD + 64).max(256),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.load().current.public_key()
    }

    /// The private key, for the WireGuard UAPI's `get` (served on a
    /// root-only socket, as wireguard-go does).
    pub fn private_key_bytes(&self) -> [u8; 32] {
        self.keys.load().current.secret.to_bytes()
    }

    /// This node's gateways on its pod networks (the reconciler's, as it
    /// puts them on the TUN device): the first of each family answers for
    /// the router with ICMP.
    pub fn set_gateways(&self, gateways: &[std::net::IpAddr]) {
        let (mut v4, mut v6) = (None, None);
        for ip in gateways {
            match ip {
                std::net::IpAddr::V4(a) => v4 = v4.or(Some(*a)),
                std::net::IpAddr::V6(a) => v6 = v6.or(Some(*a)),
            }
        }
        self.gateways.store(Arc::new((v4, v6)));
    }

    /// Each peer's current endpoint, by name.
    pub fn peer_endpoints(&self) -> Vec<(String, Option<SocketAddr>)> {
        self.table
            .load()
            .peers
            .iter()
            .map(|p| (p.name.clone(), p.lock().endpoint))
            .collect()
    }

    /// Sets each peer's path MTU (by name; peers not named keep theirs).
    pub fn set_path_mtus(&self, mtus: &[(String, u16)]) {
        let table = self.table.load();
        for (name, mtu) in mtus {
            if let Some(p) = table.by_name(name) {
                p.lock().path_mtu = *mtu;
            }
        }
    }

    /// The key being rotated to, if a rotation is under way.
    pub fn next_public_key(&self) -> Option<PublicKey> {
        self.keys.load().next.as_ref().map(|k| k.public_key())
    }

    /// Starts a key rotation to `next` (`None`: abandons one): handshakes
    /// addressed to it are answered with it from now on, and each peer's
    /// session handshakes with it once that peer has used it.
    pub fn set_next_key(&self, next: Option<&PrivateKey>) {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let keys = self.keys.load_full();
        let next = next.map(|k| Arc::new(StaticKey::new(k, HANDSHAKE_RATE_LIMIT)));
        if next.is_none() {
            // Sessions that moved to the abandoned key go back.
            for p in &self.table.load().peers {
                let mut st = p.lock();
                if st.tunn.static_public() != *keys.current.public.as_bytes() {
                    use_key(&mut st, &keys.current);
                }
            }
        }
        self.keys.store(Arc::new(keys.with_next(next)));
    }

    /// Ends a key rotation: the next key becomes the current one for every
    /// peer, the old one is retired. False when no rotation was under way.
    pub fn commit_next_key(&self) -> bool {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(keys) = self.keys.load().committed() else {
            return false;
        };
        for p in &self.table.load().peers {
            let mut st = p.lock();
            if st.tunn.static_public() != *keys.current.public.as_bytes() {
                use_key(&mut st, &keys.current);
            }
        }
        self.keys.store(Arc::new(keys));
        true
    }

    /// During a rotation: the peers that have completed a handshake with
    /// the next key (so they know it), and those that have not.
    pub fn rotation_progress(&self) -> Option<(Vec<String>, Vec<String>)> {
        let keys = self.keys.load();
        let next = *keys.next.as_ref()?.public.as_bytes();
        let (mut done, mut waiting) = (Vec::new(), Vec::new());
        for p in &self.table.load().peers {
            if p.lock().confirmed_key == Some(next) {
                done.push(p.name.clone());
            } else {
                waiting.push(p.name.clone());
            }
        }
        Some((done, waiting))
    }

    /// The current peer table.
    pub fn table(&self) -> Arc<PeerTable> {
        self.table.load_full()
    }

    /// The current peer table, for one batch (cheaper than `table`).
    pub fn batch_table(&self) -> arc_swap::Guard<Arc<PeerTable>> {
        self.table.load()
    }

    /// Buffer size every batch of this data plane uses.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    fn new_index(&self, table: &PeerTable) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if table.by_index(i).is_none() {
                return i;
            }
        }
    }

    fn tunn_for(&self, spec: &crate::model::PeerSpec, index: u32) -> Tunn {
        let keys = self.keys.load();
        Tunn::new(
            keys.current.secret.clone(),
            x25519::PublicKey::from(*spec.public_key.as_bytes()),
            None,
            spec.persistent_keepalive,
            index,
            Some(Arc::clone(&keys.current.limiter)),
        )
    }

    /// Every peer's live session, for a successor. Call with the workers
    /// stopped: the successor's send counters start `margin` past these.
    pub fn export_sessions(&self, margin: u64) -> Vec<PeerSession> {
        self.table
            .load()
            .peers
            .iter()
            .map(|p| {
                let st = p.lock();
                PeerSession {
                    name: p.name.clone(),
                    public_key: p.public_key,
                    index: p.index,
                    endpoint: st.endpoint,
                    tunn: st.tunn.export_state(margin),
                }
            })
            .collect()
    }

    /// Drops every peer's sessions: each gets a new session index and a
    /// new `Tunn`, and handshakes at the next tick (when its endpoint is
    /// known). For a router resuming after a successor that may have sealed
    /// with the old keys: nothing sealed from here on can share a nonce with
    /// what it sent, and nothing it received can be replayed here. Counters
    /// and path MTUs stay. Returns how many peers there are.
    pub fn fresh_sessions(&self) -> usize {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut peers = Vec::with_capacity(old.peers.len());
        let mut taken: std::collections::HashSet<u32> = std::collections::HashSet::new();
        for p in &old.peers {
            let index = loop {
                let i = self.new_index(&old);
                if taken.insert(i) {
                    break i;
                }
            };
            let keys = self.keys.load();
            let tunn = Tunn::new(
                keys.current.secret.clone(),
                x25519::PublicKey::from(*p.public_key.as_bytes()),
                None,
                p.persistent_keepalive,
                index,
                Some(Arc::clone(&keys.current.limiter)),
            );
            peers.push(Arc::new(p.fresh(index, tunn)));
        }
        let n = peers.len();
        self.table.store(Arc::new(PeerTable::new(peers)));
        n
    }

    /// Hands the peers the next `apply` creates these sessions (matched by
    /// name and key) instead of new ones; new indices start past theirs.
    pub fn adopt_sessions(&self, sessions: Vec<PeerSession>) {
        if let Some(max) = sessions.iter().map(|s| s.index).max() {
            self.next_index
                .store(max.wrapping_add(1), Ordering::Relaxed);
        }
        let mut a = self.adopt.lock().unwrap_or_else(|p| p.into_inner());
        a.clear();
        a.extend(sessions.into_iter().map(|s| (s.name.clone(), s)));
    }

    /// Makes the peer set equal to `mesh` with the smallest change: an
    /// unchanged peer keeps its `Arc` (and session); a peer whose endpoint or
    /// allowed IPs changed keeps its session; a changed key or keepalive
    /// replaces the session; peers not in `mesh` are removed. Idempotent.
    pub fn apply(&self, mesh: &DesiredMesh) -> MeshDiff {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut diff = MeshDiff::default();
        let mut peers: Vec<Arc<Peer>> = Vec::with_capacity(mesh.peers.len());
        let mut seen_keys = std::collections::HashSet::new();
        let (own, own_next) = (self.public_key(), self.next_public_key());
        for spec in &mesh.peers {
            let ours = spec.public_key == own || own_next == Some(spec.public_key);
            if ours || !seen_keys.insert(spec.public_key) {
                warn!(peer = %spec.name, key = %spec.public_key, "skipping peer: its key is our own or another peer's");
                continue;
            }
            match old.by_name(&spec.name) {
                Some(p) if p.same_spec(spec) => {
                    peers.push(Arc::clone(p));
                    diff.unchanged += 1;
                }
                Some(p) if p.same_session(spec) => {
                    peers.push(Arc::new(p.updated(spec)));
                    diff.updated.push(spec.name.clone());
                }
                found => {
                    let adopted = self
                        .adopt
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&spec.name)
                        .filter(|s| {
                            s.public_key == spec.public_key
                                && old.by_index(s.index).is_none()
                                && !peers.iter().any(|p| p.index == s.index)
                        });
                    let index = adopted
                        .as_ref()
                        .map_or_else(|| self.new_index(&old), |s| s.index);
                    let mut tunn = self.tunn_for(spec, index);
                    let peer = match adopted {
                        Some(s) => match tunn.import_state(&s.tunn) {
                            Ok(()) => Peer::adopted(spec, index, tunn, s.endpoint),
                            Err(e) => {
                                warn!(peer = %spec.name, error = ?e, "the handed-over session does not fit; starting a new one");
                                let index = self.new_index(&old);
                                Peer::new(spec, index, self.tunn_for(spec, index))
                            }
                        },
                        None => Peer::new(spec, index, tunn),
                    };
                    peers.push(Arc::new(peer));
                    if found.is_some() {
                        diff.replaced.push(spec.name.clone());
                    } else {
                        diff.added.push(spec.name.clone());
                    }
                }
            }
        }
        for p in &old.peers {
            if !mesh.peers.iter().any(|s| s.name == p.name) {
                diff.removed.push(p.name.clone());
            }
        }
        self.table.store(Arc::new(PeerTable::new(peers)));
        diff
    }

    /// Seal: encrypts packets `0..input.n` read from the TUN into `out`
    /// (datagrams addressed to their peers' endpoints). `out` needs room
    /// for `input.n` more; a packet that finds none is dropped as
    /// `queue_full`. A packet longer than its peer's path MTU gets an ICMP
    /// reply in `tun_out` instead (to be written to the TUN).
    pub fn seal(&self, table: &PeerTable, input: &Batch, out: &mut Batch, tun_out: &mut Batch) {
        let gateways = self.gateways.load();
        self.counters
            .tun_rx_packets
            .fetch_add(input.n as u64, Ordering::Relaxed);
        // The peer's lock is held across a run of packets to the same peer
        // (one lock per run, not per packet).
        let mut held: Option<(&Arc<Peer>, MutexGuard<'_, PeerState>)> = None;
        for i in 0..input.n {
            let pkt = input.packet(i);
            let Some(dst) = packet::dst_addr(pkt) else {
                self.counters.drop(Drop::Malformed);
                continue;
            };
            let broadcast = matches!(dst, std::net::IpAddr::V4(a) if a.is_broadcast());
            if dst.is_multicast() || broadcast {
                self.counters.drop(Drop::Multicast);
                continue;
            }
            let Some(peer) = table.route(dst) else {
                debug!(%dst, "no peer for destination");
                self.counters.drop(Drop::NoPeer);
                continue;
            };
            let Some(buf) = out.bufs.get_mut(out.n) else {
                self.counters.drop(Drop::QueueFull);
                continue;
            };
            if pkt.len() + WG_OVERHEAD > buf.len() {
                self.counters.drop(Drop::Malformed);
                continue;
            }
            if !held.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
                // NB: release the previous peer before locking the next, so
                // no thread ever holds two peer locks (no lock ordering).
                drop(held.take());
                held = Some((peer, peer.lock()));
            }
            let Some((_, st)) = held.as_mut() else {
                continue;
            };
            if st.path_mtu != 0 && pkt.len() > usize::from(st.path_mtu) {
                let (gw4, gw6) = **gateways;
                let reply = match tun_out.slot(tun_out.n) {
                    Some(slot) => packet::too_big(pkt, usize::from(st.path_mtu), gw4, gw6, slot),
                    None => packet::TooBig::Silent,
                };
                match reply {
                    packet::TooBig::Pass => {}
                    packet::TooBig::Silent => {
                        self.counters.drop(Drop::TooBig);
                        continue;
                    }
                    packet::TooBig::Reply(len) => {
                        tun_out.commit(len, UNSPECIFIED);
                        self.counters.drop(Drop::TooBig);
                        self.counters
                            .icmp_too_big_sent
                            .fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            let endpoint = st.endpoint;
            // With no session, boringtun keeps the packet for after the
            // handshake (and answers with the initiation, or with Done when
            // one is in flight); a full queue discards it.
            let room = st.waiting < HANDSHAKE_QUEUE;
            let (len, sealed) = match st.tunn.encapsulate(pkt, buf) {
                TunnResult::WriteToNetwork(b) => (Some(b.len()), b.first() == Some(&MESSAGE_DATA)),
                TunnResult::Done => (None, false),
                TunnResult::Err(e) => {
                    debug!(peer = %peer.name, error = ?e, "encapsulate failed");
                    self.counters.drop(Drop::SendFailed);
                    continue;
                }
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    self.counters.drop(Drop::Malformed);
                    continue;
                }
            };
            if !sealed {
                if room {
                    st.waiting += 1;
                } else {
                    self.counters.drop(Drop::HandshakeQueueFull);
                }
            }
            // What goes out: the sealed packet, or the handshake initiation.
            if let Some(len) = len {
                match endpoint {
                    Some(ep) => {
                        out.commit(len, ep);
                        if sealed {
                            peer.counters.tx(pkt.len());
                        }
                    }
                    None => self.counters.drop(Drop::NoEndpoint),
                }
            }
        }
    }

    /// Open: authenticates and decrypts datagrams `0..input.n`; packets for
    /// this node go to `tun_out`, protocol replies (handshake responses,
    /// cookies, the keepalive that completes a handshake) to `udp_out`.
    /// Each needs room for `input.n` more. Returns true when a handshake
    /// completed: then `flush_waiting` has packets to send.
    pub fn open(
        &self,
        table: &PeerTable,
        input: &Batch,
        tun_out: &mut Batch,
        udp_out: &mut Batch,
    ) -> bool {
        self.counters
            .udp_rx_datagrams
            .fetch_add(input.n as u64, Ordering::Relaxed);
        let mut handshakes = false;
        let keys = self.keys.load();
        // As in seal: one lock per run of datagrams from the same peer.
        let mut held: Option<(&Arc<Peer>, MutexGuard<'_, PeerState>)> = None;
        for i in 0..input.n {
            let datagram = input.packet(i);
            let src = input.addrs.get(i).copied().unwrap_or(UNSPECIFIED);
            // MACs and load are checked before any Diffie-Hellman work, so a
            // flood of initiations from unknown keys costs little.
            // The key the sender addressed (current or next) comes with it.
            let (parsed, key) = match udp_out.bufs.get_mut(udp_out.n) {
                None => {
                    self.counters.drop(Drop::QueueFull);
                    continue;
                }
                Some(reply) => match keys.verify(src.ip(), datagram, reply) {
                    Verified::Packet(p, key) => (p, key),
                    Verified::Cookie(len) => {
                        self.counters.cookie_replies.fetch_add(1, Ordering::Relaxed);
                        udp_out.commit(len, src);
                        continue;
                    }
                    Verified::Dropped(why) => {
                        self.counters.drop(why);
                        continue;
                    }
                },
            };
            let initiation = matches!(parsed, Packet::HandshakeInit(_));
            let (peer, is_data) = match &parsed {
                Packet::HandshakeInit(h) => {
                    match parse_handshake_anon(&key.secret, &key.public, h) {
                        Ok(half) => (
                            table.by_key(&PublicKey::from_bytes(half.peer_static_public)),
                            false,
                        ),
                        Err(_) => (None, false),
                    }
                }
                Packet::HandshakeResponse(h) => (table.by_index(h.receiver_idx >> 8), false),
                Packet::PacketCookieReply(c) => (table.by_index(c.receiver_idx >> 8), false),
                Packet::PacketData(d) => (table.by_index(d.receiver_idx >> 8), true),
            };
            let Some(peer) = peer else {
                debug!(%src, "datagram for no known peer");
                self.counters.drop(if is_data {
                    Drop::DecryptFailed
                } else {
                    Drop::HandshakeRejected
                });
                continue;
            };
            if !held.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
                drop(held.take());
                held = Some((peer, peer.lock()));
            }
            let Some((_, st)) = held.as_mut() else {
                continue;
            };
            // A datagram yields a TUN packet or a reply, never both: the
            // reply is written straight into `udp_out`'s next slot, a
            // packet into `tun_out`'s.
            let (Some(pkt_buf), Some(reply_buf)) =
                (tun_out.slot(tun_out.n), udp_out.slot(udp_out.n))
            else {
                self.counters.drop(Drop::QueueFull);
                continue;
            };
            let buf = if is_data { pkt_buf } else { reply_buf };
            // An initiation addressed to the other of our keys (a rotation
            // under way): this peer's handshakes use that key from now on.
            if initiation && st.tunn.static_public() != *key.public.as_bytes() {
                use_key(st, key);
            }
            match st.tunn.decapsulate(Some(src.ip()), datagram, buf) {
                TunnResult::Done => st.endpoint = Some(src),
                TunnResult::WriteToNetwork(reply) => {
                    st.endpoint = Some(src);
                    if !is_data {
                        // A handshake completed (or was answered) with this key.
                        st.confirmed_key = Some(st.tunn.static_public());
                    }
                    let len = reply.len();
                    // A data datagram cannot answer with a reply; if boringtun
                    // ever did, it was written into the TUN batch's slot.
                    if is_data {
                        self.counters.drop(Drop::Malformed);
                    } else {
                        udp_out.commit(len, src);
                    }
                    // Packets that waited for the handshake follow.
                    st.flush = true;
                    handshakes = true;
                }
                TunnResult::WriteToTunnelV4(inner, addr) => {
                    st.endpoint = Some(src);
                    let len = inner.len();
                    self.accept_inner(table, peer, tun_out, len, addr.into());
                }
                TunnResult::WriteToTunnelV6(inner, addr) => {
                    st.endpoint = Some(src);
                    let len = inner.len();
                    self.accept_inner(table, peer, tun_out, len, addr.into());
                }
                TunnResult::Err(e) => {
                    debug!(peer = %peer.name, error = ?e, "decapsulate failed");
                    self.counters.drop(match e {
                        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => {
                            Drop::Replay
                        }
                        _ if is_data => Drop::DecryptFailed,
                        _ => Drop::HandshakeRejected,
                    });
                }
            }
        }
        handshakes
    }

    /// Keeps a decrypted packet in `tun_out` only if its source belongs to
    /// the peer that sent it (cryptokey routing, inbound half).
    fn accept_inner(
        &self,
        table: &PeerTable,
        peer: &Arc<Peer>,
        tun_out: &mut Batch,
        len: usize,
        src: std::net::IpAddr,
    ) {
        if table.source_allowed(peer, src) {
            tun_out.commit(len, UNSPECIFIED);
            peer.counters.rx(len);
        } else {
            debug!(peer = %peer.name, %src, "inner source not in the peer's allowed IPs");
            self.counters.drop(Drop::SourceNotAllowed);
        }
    }

    /// After a handshake: seals into `out` the packets that waited for it
    /// (they count as sent here, their inner bytes from boringtun's own
    /// running total). Returns true when `out` filled before every peer's
    /// queue was empty: call again with an empty batch.
    pub fn flush_waiting(&self, table: &PeerTable, out: &mut Batch) -> bool {
        for peer in &table.peers {
            let mut st = peer.lock();
            if !st.flush {
                continue;
            }
            let Some(to) = st.endpoint else {
                st.flush = false;
                continue;
            };
            let before = st.tunn.stats().1;
            let mut flushed = 0u16;
            let mut full = false;
            loop {
                let Some(buf) = out.bufs.get_mut(out.n) else {
                    full = true;
                    break;
                };
                let TunnResult::WriteToNetwork(b) = st.tunn.decapsulate(None, &[], buf) else {
                    break;
                };
                if b.first() == Some(&MESSAGE_DATA) {
                    flushed = flushed.saturating_add(1);
                }
                let len = b.len();
                out.commit(len, to);
            }
            if flushed > 0 {
                let bytes = st.tunn.stats().1.saturating_sub(before);
                peer.counters.tx_n(u64::from(flushed), bytes as u64);
                st.waiting = st.waiting.saturating_sub(flushed);
            }
            if full {
                return true;
            }
            st.flush = false;
        }
        false
    }

    /// Ticks the timers of the peers from index `from` on, filling `out`
    /// with what they ask to send (initiations, retries, keepalives).
    /// Returns where to resume when `out` filled first.
    pub fn tick(&self, out: &mut Batch, from: usize) -> Option<usize> {
        let table = self.table.load();
        let keys = self.keys.load();
        for (i, peer) in table.peers.iter().enumerate().skip(from) {
            let Some(buf) = out.bufs.get_mut(out.n) else {
                return Some(i);
            };
            let mut st = peer.lock();
            let endpoint = st.endpoint;
            // During a rotation a peer knows one of our two keys, and which
            // one is not known here after a restart: an initiation left
            // unanswered is tried again with the other key.
            if let Some(next) = &keys.next {
                if st
                    .tunn
                    .initiation_unanswered()
                    .is_some_and(|d| d >= KEY_FALLBACK)
                {
                    let other = if st.tunn.static_public() == *next.public.as_bytes() {
                        &keys.current
                    } else {
                        next
                    };
                    use_key(&mut st, other);
                    st.initiate = true;
                }
            }
            let result = if std::mem::take(&mut st.initiate) {
                st.tunn.format_handshake_initiation(buf, false)
            } else {
                st.tunn.update_timers(buf)
            };
            match result {
                TunnResult::WriteToNetwork(b) => match endpoint {
                    Some(ep) => {
                        let len = b.len();
                        out.commit(len, ep);
                    }
                    None => self.counters.drop(Drop::NoEndpoint),
                },
                // The handshake was given up: boringtun discarded what waited.
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    let lost = std::mem::take(&mut st.waiting);
                    self.counters
                        .drop_n(Drop::HandshakeTimeout, u64::from(lost));
                }
                TunnResult::Done => {}
                TunnResult::Err(e) => debug!(peer = %peer.name, error = ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
        }
        None
    }

    /// The load limiter's per-second count starts over (the timer thread
    /// calls this every second).
    pub fn reset_rate_limiter(&self) {
        for l in self.keys.load().limiters() {
            l.reset_count();
        }
    }
}

/// Makes `key` the static key of this peer's next handshakes (its sessions
/// stay).
fn use_key(st: &mut PeerState, key: &StaticKey) {
    st.tunn
        .use_static_key(key.secret.clone(), key.public, Arc::clone(&key.limiter));
}
