//! The packet path: the I/O shell around boringtun's `noise::Tunn`.
//!
//! One worker thread per queue (a TUN queue and its UDP socket) runs both
//! directions to completion, plus one timer thread; each owns the batches it
//! fills (allocated once at start, reused for every batch; nothing on this
//! path allocates per packet except boringtun queueing a packet while a
//! handshake is in flight):
//!
//! ```text
//! outbound  TUN recv_batch ─ dst → peer (longest prefix over allowed IPs)
//!           ─ Tunn::encapsulate into `udp_out` ─ UDP send_batch to the peer's endpoint
//! inbound   UDP recv_batch ─ MAC + load check (cookie reply when under load)
//!           ─ peer by receiver index, or by static key for a handshake initiation
//!           ─ Tunn::decapsulate into `tun_out` ─ inner source in that peer's
//!             allowed IPs? ─ TUN send_batch;  handshake replies ─ UDP send_batch
//! timers    every TICK: Tunn::update_timers per peer (rekey, keepalive,
//!           handshake retries) ─ UDP send; rate limiter reset every second
//! ```
//!
//! The peer table is an immutable snapshot behind `ArcSwap`, loaded once per
//! batch; reconciles swap in a new one. Every dropped packet is counted with
//! its reason in `Counters`; per-packet trouble is logged at debug level only.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use tracing::{debug, error, info, warn};

use super::counters::{Counters, Drop};
use super::io::{Batch, Queue, TunIo, UdpIo, BATCH};
use super::packet;
use super::peers::{Peer, PeerState, PeerTable};
use crate::model::DesiredMesh;
use crate::{PrivateKey, PublicKey};

/// How often WireGuard timers are ticked. The protocol's finest timer is
/// REKEY_TIMEOUT (5 s) with jitter; boringtun expects ticks well below that.
pub const TICK: Duration = Duration::from_millis(100);
/// How long a worker waits for I/O before checking whether to stop.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a worker over in-memory fakes (no descriptor to poll) idles.
const FAKE_IDLE: Duration = Duration::from_micros(200);
/// Handshakes per second before the rate limiter answers with cookies.
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard's data-message overhead: header, counter and tag.
pub const WG_OVERHEAD: usize = 32;
/// The first byte of a WireGuard transport data message.
const MESSAGE_DATA: u8 = 4;
/// How many packets boringtun keeps for a peer while a handshake is in
/// flight (its `MAX_QUEUE_DEPTH`); it discards more without saying so.
const HANDSHAKE_QUEUE: u16 = 256;

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

/// The data plane of one node: its key, its peers and its counters.
pub struct Dataplane {
    table: ArcSwap<PeerTable>,
    secret: x25519::StaticSecret,
    public: x25519::PublicKey,
    rate_limiter: Arc<RateLimiter>,
    pub counters: Counters,
    next_index: AtomicU32,
    apply_lock: Mutex<()>,
    buf_size: usize,
    /// The worker threads `spawn` started, and how each ended if it did.
    workers: Mutex<Vec<WorkerSlot>>,
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
        let secret = x25519::StaticSecret::from(*key.as_bytes());
        let public = x25519::PublicKey::from(&secret);
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
            rate_limiter: Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT)),
            secret,
            public,
            counters: Counters::default(),
            next_index: AtomicU32::new(start),
            apply_lock: Mutex::new(()),
            workers: Mutex::new(Vec::new()),
            // Room for the largest inner packet plus WireGuard's overhead, and
            // never less than a handshake initiation (148 bytes).
            buf_size: (mtu + WG_OVERHEAD + 64).max(256),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(*self.public.as_bytes())
    }

    /// The private key, for the WireGuard UAPI's `get` (served on a
    /// root-only socket, as wireguard-go does).
    pub fn private_key_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// The current peer table.
    pub fn table(&self) -> Arc<PeerTable> {
        self.table.load_full()
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
        for spec in &mesh.peers {
            if spec.public_key == self.public_key() || !seen_keys.insert(spec.public_key) {
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
                    let index = self.new_index(&old);
                    let tunn = Tunn::new(
                        self.secret.clone(),
                        x25519::PublicKey::from(*spec.public_key.as_bytes()),
                        None,
                        spec.persistent_keepalive,
                        index,
                        Some(Arc::clone(&self.rate_limiter)),
                    );
                    peers.push(Arc::new(Peer::new(spec, index, tunn)));
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

    /// Sends and empties `out`, counting refused datagrams.
    fn flush_udp(&self, out: &mut Batch, udp: &dyn UdpIo) {
        let sent = Self::flush(out, |b| udp.send_batch(b));
        self.account(sent, &self.counters.udp_tx_datagrams, Drop::SendFailed);
    }

    /// Writes and empties `out` to the TUN device, counting refused packets.
    fn flush_tun(&self, out: &mut Batch, tun: &dyn TunIo) {
        let sent = Self::flush(out, |b| tun.send_batch(b));
        self.account(sent, &self.counters.tun_tx_packets, Drop::TunWriteFailed);
    }

    /// Hands `out` to `send` and empties it; returns (sent, refused).
    fn flush(out: &mut Batch, send: impl FnOnce(&mut Batch) -> io::Result<usize>) -> (u64, u64) {
        if out.n == 0 {
            return (0, 0);
        }
        let sent = match send(out) {
            Ok(sent) => sent.min(out.n),
            Err(e) => {
                debug!(error = %e, "batch send failed");
                0
            }
        };
        let refused = out.n - sent;
        out.n = 0;
        (sent as u64, refused as u64)
    }

    fn account(&self, (sent, refused): (u64, u64), ok: &std::sync::atomic::AtomicU64, why: Drop) {
        ok.fetch_add(sent, Ordering::Relaxed);
        self.counters.drop_n(why, refused);
    }

    /// Copies `data` into the next slot of `out` addressed to `to`, flushing first if full.
    fn queue_udp(&self, out: &mut Batch, udp: &dyn UdpIo, data: &[u8], to: SocketAddr) {
        if out.is_full() {
            self.flush_udp(out, udp);
        }
        match out
            .bufs
            .get_mut(out.n)
            .and_then(|b| b.get_mut(..data.len()))
        {
            Some(dst) => {
                dst.copy_from_slice(data);
                out.commit(data.len(), to);
            }
            None => self.counters.drop(Drop::QueueFull),
        }
    }

    /// Outbound: encrypts packets `0..input.n` read from the TUN into `out`
    /// and sends them (flushing `out` whenever it fills, and at the end).
    pub fn process_outbound(
        &self,
        table: &PeerTable,
        input: &Batch,
        out: &mut Batch,
        udp: &dyn UdpIo,
    ) {
        self.counters
            .tun_rx_packets
            .fetch_add(input.n as u64, Ordering::Relaxed);
        // The peer's lock is held across a run of packets to the same peer
        // (one lock per run, not per packet) and released before a send.
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
            if out.is_full() {
                held = None;
                self.flush_udp(out, udp);
            }
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
        drop(held);
        self.flush_udp(out, udp);
    }

    /// Inbound: authenticates and decrypts datagrams `0..input.n`, writes
    /// allowed packets to the TUN and protocol replies to the network.
    pub fn process_inbound(
        &self,
        table: &PeerTable,
        input: &Batch,
        tun_out: &mut Batch,
        udp_out: &mut Batch,
        tun: &dyn TunIo,
        udp: &dyn UdpIo,
    ) {
        self.counters
            .udp_rx_datagrams
            .fetch_add(input.n as u64, Ordering::Relaxed);
        let mut cookie = [0u8; 64];
        // As outbound: one lock per run of datagrams from the same peer.
        let mut held: Option<(&Arc<Peer>, MutexGuard<'_, PeerState>)> = None;
        for i in 0..input.n {
            let datagram = input.packet(i);
            let src = input.addrs.get(i).copied().unwrap_or(UNSPECIFIED);
            // MACs and load are checked before any Diffie-Hellman work, so a
            // flood of initiations from unknown keys costs little.
            let parsed =
                match self
                    .rate_limiter
                    .verify_packet(Some(src.ip()), datagram, &mut cookie)
                {
                    Ok(p) => p,
                    Err(TunnResult::WriteToNetwork(reply)) => {
                        self.counters.cookie_replies.fetch_add(1, Ordering::Relaxed);
                        let len = reply.len();
                        self.queue_udp(udp_out, udp, &cookie[..len], src);
                        continue;
                    }
                    Err(TunnResult::Err(WireGuardError::InvalidMac))
                    | Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                        self.counters.drop(Drop::HandshakeRejected);
                        continue;
                    }
                    Err(_) => {
                        self.counters.drop(Drop::Malformed);
                        continue;
                    }
                };
            let (peer, is_data) = match &parsed {
                Packet::HandshakeInit(h) => {
                    match parse_handshake_anon(&self.secret, &self.public, h) {
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
            if tun_out.is_full() {
                held = None;
                self.flush_tun(tun_out, tun);
            }
            let Some(buf) = tun_out.bufs.get_mut(tun_out.n) else {
                self.counters.drop(Drop::QueueFull);
                continue;
            };
            if !held.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
                drop(held.take());
                held = Some((peer, peer.lock()));
            }
            let Some((_, st)) = held.as_mut() else {
                continue;
            };
            match st.tunn.decapsulate(Some(src.ip()), datagram, buf) {
                TunnResult::Done => st.endpoint = Some(src),
                TunnResult::WriteToNetwork(reply) => {
                    st.endpoint = Some(src);
                    self.queue_udp(udp_out, udp, reply, src);
                    // Packets that waited for the handshake follow the
                    // reply, sealed now: they count as sent here (their
                    // inner bytes from boringtun's own running total).
                    let before = st.tunn.stats().1;
                    let mut flushed = 0u16;
                    while let TunnResult::WriteToNetwork(more) = st.tunn.decapsulate(None, &[], buf)
                    {
                        if more.first() == Some(&MESSAGE_DATA) {
                            flushed = flushed.saturating_add(1);
                        }
                        self.queue_udp(udp_out, udp, more, src);
                    }
                    if flushed > 0 {
                        let bytes = st.tunn.stats().1.saturating_sub(before);
                        peer.counters.tx_n(u64::from(flushed), bytes as u64);
                        st.waiting = st.waiting.saturating_sub(flushed);
                    }
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
                    self.counters.drop(if is_data {
                        Drop::DecryptFailed
                    } else {
                        Drop::HandshakeRejected
                    });
                }
            }
        }
        drop(held);
        self.flush_tun(tun_out, tun);
        self.flush_udp(udp_out, udp);
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

    /// Ticks every peer's timers and sends what they ask for.
    pub fn tick(&self, out: &mut Batch, udp: &dyn UdpIo) {
        let table = self.table.load();
        for peer in &table.peers {
            if out.is_full() {
                self.flush_udp(out, udp);
            }
            let Some(buf) = out.bufs.get_mut(out.n) else {
                continue;
            };
            let mut st = peer.lock();
            let endpoint = st.endpoint;
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
        self.flush_udp(out, udp);
    }

    /// Starts one worker thread per queue (a TUN queue and the UDP socket
    /// paired with it, both directions: see `queue_loop`) and one timer
    /// thread. They run until `stop` is set (checked at least every `POLL`).
    ///
    /// The kernel keeps a peer's datagrams on one socket (by its address and
    /// port) and a flow on one TUN queue (the queue its incoming packets were
    /// written to), so no flow is reordered and a peer's traffic stays on
    /// one worker: queues spread peers over cores; workers share no lock but
    /// a peer's own.
    pub fn spawn(
        self: &Arc<Self>,
        queues: &[Queue],
        stop: Arc<AtomicBool>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let Some((_, first_udp)) = queues.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the data plane needs at least one queue",
            ));
        };
        let mut handles = Vec::new();
        for (q, (tun, udp)) in queues.iter().enumerate() {
            let (dp, tun, udp, run) = (
                Arc::clone(self),
                Arc::clone(tun),
                Arc::clone(udp),
                Arc::clone(&stop),
            );
            handles.push(self.supervised(format!("queue-{q}"), &stop, move || {
                dp.queue_loop(&*tun, &*udp, &run)
            })?);
        }
        {
            let (dp, udp, run) = (Arc::clone(self), Arc::clone(first_udp), Arc::clone(&stop));
            handles.push(self.supervised("timers".into(), &stop, move || {
                let mut out = Batch::new(BATCH, dp.buf_size);
                let mut last_reset = Instant::now();
                while !run.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    dp.tick(&mut out, &*udp);
                    if last_reset.elapsed() >= Duration::from_secs(1) {
                        dp.rate_limiter.reset_count();
                        last_reset = Instant::now();
                    }
                }
            })?);
        }
        info!(public_key = %self.public_key(), queues = queues.len(), "data plane running");
        Ok(handles)
    }

    /// Starts `body` on a thread named `tm-<name>` and records, in the
    /// worker list `workers()` reports, if it ends (returns or panics)
    /// while `stop` is not set: a router with a dead queue is not healthy,
    /// and `/healthz` says so, so that it gets restarted.
    fn supervised(
        self: &Arc<Self>,
        name: String,
        stop: &Arc<AtomicBool>,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<JoinHandle<()>> {
        let slot = {
            let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            w.push(WorkerSlot {
                name: name.clone(),
                failure: None,
            });
            w.len() - 1
        };
        let (dp, stop) = (Arc::clone(self), Arc::clone(stop));
        std::thread::Builder::new()
            .name(format!("tm-{name}"))
            .spawn(move || {
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let why = match ended {
                    Ok(()) => "its loop returned".to_string(),
                    Err(p) => format!("panicked: {}", panic_message(p.as_ref())),
                };
                error!(worker = %name, reason = %why, "data-plane worker died; /healthz fails from now on so that the router is restarted");
                let mut w = dp.workers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = w.get_mut(slot) {
                    s.failure = Some(why);
                }
            })
    }

    /// The data-plane threads and how each is doing.
    pub fn workers(&self) -> Vec<WorkerSlot> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The workers that died, `name: reason` each.
    pub fn dead_workers(&self) -> Vec<String> {
        self.workers()
            .into_iter()
            .filter_map(|w| Some(format!("{}: {}", w.name, w.failure?)))
            .collect()
    }

    /// One queue's worker, both directions, run to completion: datagrams
    /// from the socket are decrypted and written to the TUN queue, then
    /// packets waiting on the TUN queue are encrypted and sent, until both
    /// are empty; only then does it sleep in `poll` on both. What a TUN write
    /// sets off in the kernel (the receiving TCP stack's ACK, the sending
    /// stack's next segments) lands on this same queue and is picked up by
    /// this thread on its next turn, without waking another.
    fn queue_loop(&self, tun: &dyn TunIo, udp: &dyn UdpIo, stop: &AtomicBool) {
        let mut from_tun = Batch::new(BATCH, self.buf_size);
        let mut to_udp = Batch::new(BATCH, self.buf_size);
        let mut from_udp = Batch::new(BATCH, self.buf_size);
        let mut to_tun = Batch::new(BATCH, self.buf_size);
        let mut replies = Batch::new(BATCH, self.buf_size);
        let mut tun_errors = ErrorLog::new("reading the TUN device");
        let mut udp_errors = ErrorLog::new("receiving UDP");
        let mut poll_errors = ErrorLog::new("waiting for packets");
        let fds = tun.raw_fd().zip(udp.raw_fd());
        while !stop.load(Ordering::Relaxed) {
            let mut busy = false;
            let got = udp.recv_batch(&mut from_udp, Duration::ZERO);
            self.counters.drop_n(Drop::Malformed, udp.take_malformed());
            if arrived(got, &mut udp_errors) {
                busy = true;
                let table = self.table.load();
                self.process_inbound(&table, &from_udp, &mut to_tun, &mut replies, tun, udp);
            }
            let got = tun.recv_batch(&mut from_tun, Duration::ZERO);
            self.counters.drop_n(Drop::Malformed, tun.take_malformed());
            if arrived(got, &mut tun_errors) {
                busy = true;
                let table = self.table.load();
                self.process_outbound(&table, &from_tun, &mut to_udp, udp);
            }
            if busy {
                continue;
            }
            let waited = match fds {
                Some((t, u)) => super::poll_any([t, u], POLL).map(|_| ()),
                // In-memory fakes have nothing to poll: look again shortly.
                None => {
                    std::thread::sleep(FAKE_IDLE);
                    Ok(())
                }
            };
            if let Err(e) = waited {
                poll_errors.record(&e);
            }
        }
    }
}

/// The text of a panic's payload (`panic!` with a literal or a format).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Whether a receive brought packets; an error is logged (rate-limited).
fn arrived(got: io::Result<usize>, errors: &mut ErrorLog) -> bool {
    match got {
        Ok(n) => n > 0,
        Err(e) => {
            errors.record(&e);
            false
        }
    }
}

/// Logs a repeating I/O error at most once per second with a count, and
/// backs off briefly so a broken device does not spin a core.
struct ErrorLog {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn new(what: &'static str) -> Self {
        ErrorLog {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn record(&mut self, e: &io::Error) {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            warn!(error = %e, repeated = self.suppressed, "{}", self.what);
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
