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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::split::DataSession;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519;
use tracing::{debug, warn};

use super::counters::{Counters, Drop, PeerCounters};
use super::crypto::Feed;
use super::io::Batch;
use super::keys::{NodeKeys, StaticKey, Verified};
use super::packet;
use super::peers::{Peer, PeerState, PeerTable};
use crate::model::{DesiredMesh, PeerSpec};
use crate::{PrivateKey, PublicKey};

/// How often WireGuard timers are ticked. The protocol's finest timer is
/// REKEY_TIMEOUT (5 s) with jitter; boringtun expects ticks well below that.
pub const TICK: Duration = Duration::from_millis(100);
/// Handshakes per second before the rate limiter answers with cookies. A
/// node that restarts cold in a 5,000-node cluster may hear from every
/// node that had traffic for it; 1,000 a second (an estimate: some 150 us
/// of DH each, about a sixth of a core) lets them in within seconds, where
/// 100 held most of them to a cookie and a 5 s retry.
pub const HANDSHAKE_RATE_LIMIT: u64 = 1000;
/// Initiations the timers start in one tick (10 ticks a second). A warm
/// start with thousands of peers in use spreads them over seconds rather
/// than meeting every peer's rate limiter, and its own CPU, in one burst.
const INITIATIONS_PER_TICK: usize = 50;
/// WireGuard's data-message overhead: header, counter and tag.
pub const WG_OVERHEAD: usize = 32;
/// The first byte of a WireGuard transport data message.
const MESSAGE_DATA: u8 = 4;
/// How many packets boringtun keeps for a peer while a handshake is in
/// flight (its `MAX_QUEUE_DEPTH`); it discards more without saying so.
const HANDSHAKE_QUEUE: u16 = 256;
/// How long a far side may hold a session this node dropped: WireGuard
/// clears every session 3 x REJECT_AFTER_TIME after its handshake.
const STALE_SESSION: Duration = Duration::from_secs(540);
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
    /// Session indices of the previous process's peers, taken by the peers
    /// the next `apply` creates (by name), so that their handed-over
    /// sessions fit.
    indices: Mutex<std::collections::HashMap<String, u32>>,
    /// The worker threads `spawn` started, and how each ended if it did.
    pub(super) workers: Mutex<Vec<WorkerSlot>>,
    /// Peers put on the timers' list since their last tick (first used,
    /// or a handshake to start).
    timer_wake: Mutex<Vec<Arc<Peer>>>,
    /// The peers the timers tick: those with WireGuard state.
    timer_set: Mutex<Vec<Arc<Peer>>>,
    /// Peers to handshake with at once on the first load (a warm start).
    first_load: Mutex<HashSet<String>>,
    /// Peers whose handshake completed with packets waiting for it.
    flush_list: Mutex<Vec<Arc<Peer>>>,
    /// Peers removed lately, and when: one that comes back within
    /// `STALE_SESSION` handshakes at once (the far side may still hold the
    /// session this node dropped).
    removed_at: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// Peer tables built.
    table_builds: AtomicU64,
    /// The crypto workers the AEAD of a batch is spread over (none: the
    /// queue worker alone), set once before the workers start.
    crypto: std::sync::OnceLock<Arc<super::crypto::CryptoPool>>,
    /// Jobs in a chunk of crypto work: `CHUNK_BYTES` of the largest
    /// packets.
    chunk_jobs: usize,
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
            timer_wake: Mutex::new(Vec::new()),
            timer_set: Mutex::new(Vec::new()),
            first_load: Mutex::new(HashSet::new()),
            flush_list: Mutex::new(Vec::new()),
            removed_at: Mutex::new(std::collections::HashMap::new()),
            table_builds: AtomicU64::new(0),
            indices: Mutex::new(std::collections::HashMap::new()),
            crypto: std::sync::OnceLock::new(),
            chunk_jobs: (CHUNK_BYTES / (mtu + WG_OVERHEAD)).max(1),
            // Room for the largest inner packet plus WireGuard's overhead, and
            // never less than a handshake initiation (148 bytes).
            buf_size: (mtu + WG_OVERHEAD + 64).max(256),
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.keys.load().current.public_key()
    }

    /// Spreads the AEAD of each batch over `workers` crypto workers (the
    /// queue worker that read the batch and `workers - 1` helper threads).
    /// Once, before the workers start; false if it was set already.
    pub fn start_crypto_workers(&self, workers: usize) -> bool {
        if self.crypto.get().is_some() {
            return false;
        }
        self.crypto
            .set(Arc::new(super::crypto::CryptoPool::new(workers)))
            .is_ok()
    }

    /// Uses the crypto workers of `other` (two data planes in one process,
    /// as a benchmark has them, share one set of helpers rather than
    /// competing for the cores with two). Once, before the workers start;
    /// false if this one has its own already or `other` has none.
    pub fn share_crypto_workers(&self, other: &Dataplane) -> bool {
        match other.crypto.get() {
            Some(pool) => self.crypto.set(Arc::clone(pool)).is_ok(),
            None => false,
        }
    }

    /// The crypto workers and what they did (1 worker: the queue workers
    /// alone).
    pub fn crypto_stats(&self) -> super::crypto::PoolStats {
        self.crypto
            .get()
            .map(|p| p.stats())
            .unwrap_or(super::crypto::PoolStats {
                workers: 1,
                ..Default::default()
            })
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

    /// The peers in use (with WireGuard state), by name.
    pub fn active_peers(&self) -> Vec<String> {
        self.active_peer_endpoints()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    /// The peers in use (on the timers' list), with their current endpoint.
    pub fn active_peer_endpoints(&self) -> Vec<(String, Option<SocketAddr>)> {
        let set: Vec<Arc<Peer>> = self.timer_set.lock().map(|s| s.clone()).unwrap_or_default();
        let table = self.table.load();
        set.iter()
            .filter(|p| table.by_index(p.index).is_some_and(|q| q.same_state(p)))
            .filter_map(|p| {
                let st = p.lock();
                st.tunn.as_ref()?;
                Some((p.name.clone(), st.endpoint))
            })
            .collect()
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
                if st
                    .tunn
                    .as_ref()
                    .is_some_and(|t| t.static_public() != *keys.current.public.as_bytes())
                {
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
            if st
                .tunn
                .as_ref()
                .is_some_and(|t| t.static_public() != *keys.current.public.as_bytes())
            {
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

    /// A new `Tunn` for `peer`, with the node's key the peer last used (the
    /// next one during a rotation, once it has), else the current one.
    fn new_tunn(&self, peer: &Peer, confirmed: Option<[u8; 32]>) -> Box<Tunn> {
        let keys = self.keys.load();
        let key = match &keys.next {
            Some(next) if confirmed == Some(*next.public.as_bytes()) => next,
            _ => &keys.current,
        };
        Box::new(Tunn::new(
            key.secret.clone(),
            x25519::PublicKey::from(*peer.public_key.as_bytes()),
            None,
            peer.persistent_keepalive,
            peer.index,
            Some(Arc::clone(&key.limiter)),
        ))
    }

    /// `peer`'s `Tunn`, made now if it has none (its first use), and the
    /// peer on the timers' list. Under the peer's lock (`st`).
    fn session<'s>(&self, peer: &Arc<Peer>, st: &'s mut PeerState) -> &'s mut Tunn {
        if !st.in_timers {
            st.in_timers = true;
            self.wake_timers(peer);
        }
        self.tunn_of(peer, st)
    }

    /// The peer's `Tunn`, made if it has none: from the session handed
    /// over for it, if one was, else new.
    fn tunn_of<'s>(&self, peer: &Peer, st: &'s mut PeerState) -> &'s mut Tunn {
        if st.tunn.is_none() {
            let mut t = self.new_tunn(peer, st.confirmed_key);
            if let Some(h) = st.handed.take() {
                if let Err(e) = t.import_state(&h) {
                    warn!(peer = %peer.name, error = ?e, "the handed-over session does not fit; starting a new one");
                    t = self.new_tunn(peer, st.confirmed_key);
                }
            }
            st.tunn = Some(t);
        }
        let confirmed = st.confirmed_key;
        // NB: made just above when there was none.
        st.tunn
            .get_or_insert_with(|| self.new_tunn(peer, confirmed))
    }

    /// Puts `peer` on the timers' list (from its next tick on).
    fn wake_timers(&self, peer: &Arc<Peer>) {
        self.timer_wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::clone(peer));
    }

    /// Every peer's live session, for a successor. Call with the workers
    /// stopped: the successor's send counters start `margin` past these.
    /// Peers with no session have nothing to hand over.
    pub fn export_sessions(&self, margin: u64) -> Vec<PeerSession> {
        self.table
            .load()
            .peers
            .iter()
            .filter_map(|p| {
                let st = p.lock();
                let tunn = match (&st.tunn, &st.handed) {
                    (Some(t), _) => t.export_state(margin),
                    // Handed over and never used: passed on as it came,
                    // its counters moved past the margin once more.
                    (None, Some(h)) => {
                        let mut h = (**h).clone();
                        for (_, s) in &mut h.sessions {
                            s.sending_counter = s.sending_counter.saturating_add(margin);
                        }
                        h
                    }
                    (None, None) => return None,
                };
                Some(PeerSession {
                    name: p.name.clone(),
                    public_key: p.public_key,
                    index: p.index,
                    endpoint: st.endpoint,
                    tunn,
                })
            })
            .collect()
    }

    /// Drops every peer's sessions (live, or handed over and not used yet):
    /// each peer that had one gets a new session index and handshakes at
    /// the next tick (when its endpoint is known). For a router resuming after a successor that may have sealed
    /// with the old keys: nothing sealed from here on can share a nonce with
    /// what it sent, and nothing it received can be replayed here. Counters
    /// and path MTUs stay. Returns how many peers had a session.
    pub fn fresh_sessions(&self) -> usize {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut peers = Vec::with_capacity(old.peers.len());
        let mut taken: HashSet<u32> = HashSet::new();
        let mut fresh = Vec::new();
        for p in &old.peers {
            // A session handed over and not used yet went to the successor
            // too (`export_sessions`), so it is dropped as well.
            let had = {
                let st = p.lock();
                st.tunn.is_some() || st.handed.is_some()
            };
            if !had {
                peers.push(Arc::clone(p));
                continue;
            }
            let index = loop {
                let i = self.new_index(&old);
                if taken.insert(i) {
                    break i;
                }
            };
            let f = Arc::new(p.fresh(index));
            fresh.push(Arc::clone(&f));
            peers.push(f);
        }
        self.store_table(peers, fresh.iter());
        fresh.len()
    }

    /// The previous process's peers' session indices (by name), for the
    /// peers the next `apply` creates; new indices start past theirs.
    pub fn adopt_indices(&self, indices: &[(String, u32)]) {
        if let Some(max) = indices.iter().map(|(_, i)| *i).max() {
            self.next_index
                .store(max.wrapping_add(1), Ordering::Relaxed);
        }
        let mut a = self.indices.lock().unwrap_or_else(|p| p.into_inner());
        a.clear();
        a.extend(indices.iter().cloned());
    }

    /// The previous process's live sessions, each given to its peer (same
    /// name, key and index), made into its `Tunn` at its first use; the
    /// peers go on the timers' list. Returns how many found their peer.
    pub fn install_sessions(&self, sessions: Vec<PeerSession>) -> usize {
        let table = self.table.load();
        let mut n = 0;
        for s in sessions {
            let Some(p) = table
                .by_name(&s.name)
                .filter(|p| p.public_key == s.public_key && p.index == s.index)
            else {
                warn!(peer = %s.name, "a handed-over session for no such peer; dropped");
                continue;
            };
            let mut st = p.lock();
            st.handed = Some(Box::new(s.tunn));
            st.tunn = None;
            st.initiate = false;
            st.endpoint = s.endpoint.or(st.endpoint);
            if !st.in_timers {
                st.in_timers = true;
                self.wake_timers(p);
            }
            n += 1;
        }
        n
    }

    /// The peers to handshake with at once when the next `apply` is the
    /// first (a warm start: those that had sessions before the restart).
    /// Otherwise a first load starts no handshake: a node joining or
    /// starting cold with thousands of peers handshakes with each one when
    /// traffic first goes to or comes from it.
    pub fn initiate_on_first_load(&self, names: impl IntoIterator<Item = String>) {
        let mut set = self.first_load.lock().unwrap_or_else(|p| p.into_inner());
        set.clear();
        set.extend(names);
    }

    /// Makes the peer set equal to `mesh` with the smallest change: an
    /// unchanged peer keeps its `Arc` (and session); a peer whose endpoint or
    /// allowed IPs changed keeps its session; a changed key or keepalive
    /// replaces the session; peers not in `mesh` are removed. Idempotent.
    pub fn apply(&self, mesh: &DesiredMesh) -> MeshDiff {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut b = Builder::new(self, &old);
        let mut peers: Vec<Arc<Peer>> = Vec::with_capacity(mesh.peers.len());
        for spec in &mesh.peers {
            if let Some(p) = b.peer(spec) {
                peers.push(p);
            }
        }
        let wanted: HashSet<&str> = mesh.peers.iter().map(|s| s.name.as_str()).collect();
        for p in &old.peers {
            if !wanted.contains(p.name.as_str()) {
                b.diff.removed.push(p.name.clone());
            }
        }
        let (diff, initiate) = b.finish();
        self.store_table(peers, initiate.iter());
        diff
    }

    /// Applies what changed: each peer named is added or changed (`Some`,
    /// as `apply` would) or removed (`None`); the others are not looked at.
    pub fn apply_changes(&self, changes: &[(String, Option<PeerSpec>)]) -> MeshDiff {
        let _guard = self.apply_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.table.load_full();
        let mut by_name: std::collections::BTreeMap<&str, Arc<Peer>> = old
            .peers
            .iter()
            .map(|p| (p.name.as_str(), Arc::clone(p)))
            .collect();
        let mut b = Builder::new(self, &old);
        // The keys of the peers that stay, for the duplicate check.
        let changed: HashSet<&str> = changes.iter().map(|(n, _)| n.as_str()).collect();
        b.seen_keys.extend(
            old.peers
                .iter()
                .filter(|p| !changed.contains(p.name.as_str()))
                .map(|p| p.public_key),
        );
        let mut touched = 0;
        for (name, spec) in changes {
            match spec {
                None => {
                    if by_name.remove(name.as_str()).is_some() {
                        b.diff.removed.push(name.clone());
                        touched += 1;
                    }
                }
                Some(spec) => {
                    if by_name.contains_key(name.as_str()) {
                        touched += 1;
                    }
                    by_name.remove(name.as_str());
                    if let Some(p) = b.peer(spec) {
                        by_name.insert(spec.name.as_str(), p);
                    }
                }
            }
        }
        let peers: Vec<Arc<Peer>> = by_name.into_values().collect();
        let (mut diff, initiate) = b.finish();
        diff.unchanged += old.peers.len().saturating_sub(touched);
        self.store_table(peers, initiate.iter());
        diff
    }

    /// Swaps in a table of `peers`, and puts `wake` on the timers' list.
    fn store_table<'a>(&self, peers: Vec<Arc<Peer>>, wake: impl Iterator<Item = &'a Arc<Peer>>) {
        self.table.store(Arc::new(PeerTable::new(peers)));
        self.table_builds.fetch_add(1, Ordering::Relaxed);
        for p in wake {
            let mut st = p.lock();
            if !st.in_timers {
                st.in_timers = true;
                self.wake_timers(p);
            }
        }
    }

    /// How many peer tables were built (each apply or change swaps one in).
    pub fn table_builds(&self) -> u64 {
        self.table_builds.load(Ordering::Relaxed)
    }

    /// Seal: encrypts packets `0..input.n` read from the TUN into `out`
    /// (datagrams addressed to their peers' endpoints). `out` needs room
    /// for `input.n` more; a packet that finds none is dropped as
    /// `queue_full`. A packet longer than its peer's path MTU gets an ICMP
    /// reply in `tun_out` instead (to be written to the TUN).
    ///
    /// In order, under the peers' locks, each packet is routed and given
    /// its slot in `out` and its send counter (`plan`); the AEAD runs on
    /// the crypto workers, which start on the first packets while the
    /// rest are planned. The slots keep the counters' order, whichever
    /// thread sealed them.
    pub fn seal(
        &self,
        table: &PeerTable,
        input: &Batch,
        out: &mut Batch,
        tun_out: &mut Batch,
        plan: &mut Plan,
    ) {
        self.counters
            .tun_rx_packets
            .fetch_add(input.n as u64, Ordering::Relaxed);
        let offset = input.offset;
        let seal_one = |job: &mut SealJob| {
            let len = input.lens.get(job.input).copied().unwrap_or(0);
            let pkt = input
                .bufs
                .get(job.input)
                .and_then(|b| b.get(offset..offset + len))
                .unwrap_or(&[]);
            job.sealed = job.session.seal(job.counter, pkt, &mut job.buf).is_some();
        };
        let mut sent = Tally::new(PeerCounters::tx_n);
        let mut outs = (out, tun_out, 0u64);
        self.crypto().stream(
            &mut plan.seal,
            self.chunk_jobs,
            &mut outs,
            &seal_one,
            |feed, (out, tun_out, _)| self.plan_seal(table, input, out, tun_out, feed, &mut sent),
            // Each buffer back in its slot; a packet that could not be
            // sealed (no room: checked when planned, so never) leaves it.
            |job, (out, _, failed)| {
                if let Some(b) = out.bufs.get_mut(job.slot) {
                    *b = std::mem::take(&mut job.buf);
                }
                if !job.sealed {
                    if let Some(l) = out.lens.get_mut(job.slot) {
                        *l = 0;
                    }
                    *failed += 1;
                }
            },
        );
        plan.seal.clear();
        sent.flush();
        let (out, _, failed) = outs;
        if failed > 0 {
            self.counters.drop_n(Drop::SendFailed, failed);
            out.drop_empty();
        }
    }

    /// Seal's planning pass over `input`, in order: drops, ICMP replies and
    /// handshake initiations done here; a packet with a session gets its
    /// slot in `out` and its counter, and goes to `feed` for the AEAD.
    fn plan_seal<'t>(
        &self,
        table: &'t PeerTable,
        input: &Batch,
        out: &mut Batch,
        tun_out: &mut Batch,
        feed: &mut Feed<'_, SealJob>,
        sent: &mut Tally<'t>,
    ) {
        let gateways = self.gateways.load();
        // The peer's lock is held across a run of packets to the same peer
        // (one lock per run, not per packet).
        let mut held: Held<'_> = None;
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
            let slot = out.n;
            let Some(buf) = out.bufs.get_mut(slot) else {
                self.counters.drop(Drop::QueueFull);
                continue;
            };
            if pkt.len() + WG_OVERHEAD > buf.len() {
                self.counters.drop(Drop::Malformed);
                continue;
            }
            let st = hold(&mut held, peer);
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
            let tunn = self.session(peer, st);
            // With a session: its next counter now, the AEAD on the crypto
            // workers.
            if let Some((session, counter)) = tunn.reserve_data(pkt.len()) {
                let Some(ep) = endpoint else {
                    self.counters.drop(Drop::NoEndpoint);
                    continue;
                };
                let job = SealJob {
                    input: i,
                    slot,
                    session,
                    counter,
                    buf: std::mem::take(buf),
                    sealed: false,
                };
                match feed.push(job) {
                    Ok(()) => {
                        out.commit(pkt.len() + WG_OVERHEAD, ep);
                        sent.add(peer, pkt.len());
                    }
                    Err(job) => {
                        // NB: never (the plan has room for a batch).
                        *buf = job.buf;
                        self.counters.drop(Drop::QueueFull);
                    }
                }
                continue;
            }
            // With no session, boringtun keeps the packet for after the
            // handshake (and answers with the initiation, or with Done when
            // one is in flight); a full queue discards it.
            let room = st.waiting < HANDSHAKE_QUEUE;
            let len = match self.session(peer, st).encapsulate(pkt, buf) {
                TunnResult::WriteToNetwork(b) => Some(b.len()),
                TunnResult::Done => None,
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
            if room {
                st.waiting += 1;
            } else {
                self.counters.drop(Drop::HandshakeQueueFull);
            }
            // What goes out: the handshake initiation.
            if let Some(len) = len {
                match endpoint {
                    Some(ep) => {
                        out.commit(len, ep);
                    }
                    None => self.counters.drop(Drop::NoEndpoint),
                }
            }
        }
    }

    /// The crypto workers (none started: the queue workers alone).
    fn crypto(&self) -> &super::crypto::CryptoPool {
        self.crypto
            .get_or_init(|| Arc::new(super::crypto::CryptoPool::new(1)))
    }

    /// Open: authenticates and decrypts datagrams `0..input.n`; packets for
    /// this node go to `tun_out`, protocol replies (handshake responses,
    /// cookies, the keepalive that completes a handshake) to `udp_out`.
    /// Each needs room for `input.n` more. Returns true when a handshake
    /// completed: then `flush_waiting` has packets to send.
    ///
    /// Data messages in three steps: in order, under the peers' locks,
    /// each finds its session and a slot in `tun_out` (`plan`); the AEAD
    /// runs on the crypto workers, which start on the first messages while
    /// the rest are planned; in order again, under the locks, each opened
    /// message is checked against the replay window, updates its peer
    /// (timers, endpoint) and is kept only if its source is in the peer's
    /// allowed IPs. Handshake messages are handled in the first pass, in
    /// their place.
    pub fn open(
        &self,
        table: &PeerTable,
        input: &Batch,
        tun_out: &mut Batch,
        udp_out: &mut Batch,
        plan: &mut Plan,
    ) -> bool {
        self.counters
            .udp_rx_datagrams
            .fetch_add(input.n as u64, Ordering::Relaxed);
        let offset = tun_out.offset;
        let open_one = |job: &mut OpenJob| {
            let datagram = input.packet(job.input);
            job.opened = match job.buf.get_mut(offset..) {
                Some(dst) => job.session.open(datagram, dst),
                None => Err(WireGuardError::DestinationBufferTooSmall),
            };
        };
        let mut handshakes = false;
        let mut ctx = Opened {
            tun_out,
            udp_out,
            held: None,
            received: Tally::new(PeerCounters::rx_n),
            emptied: false,
        };
        self.crypto().stream(
            &mut plan.open,
            self.chunk_jobs,
            &mut ctx,
            &open_one,
            |feed, ctx| handshakes = self.plan_open(table, input, ctx.tun_out, ctx.udp_out, feed),
            // In order again, as each chunk is open: each peer learns what
            // arrived, and each packet is kept only if its source is the
            // peer's. (The peer is the one the first pass found: the same
            // table, the same index.)
            |job, ctx| {
                let len = match table.by_index(job.index >> 8) {
                    Some(peer) => {
                        let st = hold(&mut ctx.held, peer);
                        let len = self.opened(peer, st, job, offset, table);
                        if len > 0 {
                            ctx.received.add(peer, len);
                        }
                        len
                    }
                    None => {
                        self.counters.drop(Drop::DecryptFailed);
                        0
                    }
                };
                if let (Some(b), Some(l)) = (
                    ctx.tun_out.bufs.get_mut(job.slot),
                    ctx.tun_out.lens.get_mut(job.slot),
                ) {
                    *b = std::mem::take(&mut job.buf);
                    *l = len;
                }
                ctx.emptied |= len == 0;
            },
        );
        plan.open.clear();
        drop(ctx.held.take());
        ctx.received.flush();
        if ctx.emptied {
            ctx.tun_out.drop_empty();
        }
        handshakes
    }

    /// Open's first pass over `input`, in order: handshake messages
    /// answered here (into `udp_out`), data messages given their session
    /// and a slot in `tun_out` and sent to `feed` for the AEAD. Whether a
    /// handshake completed.
    fn plan_open(
        &self,
        table: &PeerTable,
        input: &Batch,
        tun_out: &mut Batch,
        udp_out: &mut Batch,
        feed: &mut Feed<'_, OpenJob>,
    ) -> bool {
        let mut handshakes = false;
        let keys = self.keys.load();
        // As in seal: one lock per run of datagrams from the same peer.
        let mut held: Held<'_> = None;
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
            let (peer, data_index) = match &parsed {
                Packet::HandshakeInit(h) => {
                    match parse_handshake_anon(&key.secret, &key.public, h) {
                        Ok(half) => (
                            table.by_key(&PublicKey::from_bytes(half.peer_static_public)),
                            None,
                        ),
                        Err(_) => (None, None),
                    }
                }
                Packet::HandshakeResponse(h) => (table.by_index(h.receiver_idx >> 8), None),
                Packet::PacketCookieReply(c) => (table.by_index(c.receiver_idx >> 8), None),
                Packet::PacketData(d) => {
                    (table.by_index(d.receiver_idx >> 8), Some(d.receiver_idx))
                }
            };
            let is_data = data_index.is_some();
            let Some(peer) = peer else {
                debug!(%src, "datagram for no known peer");
                self.counters.drop(if is_data {
                    Drop::DecryptFailed
                } else {
                    Drop::HandshakeRejected
                });
                continue;
            };
            let st = hold(&mut held, peer);
            // Only an initiation makes WireGuard state for a peer that has
            // none (its sessions expired, or it never had one): anything
            // else matches no session of it.
            if st.tunn.is_none() && st.handed.is_none() && !initiation {
                self.counters.drop(if is_data {
                    Drop::DecryptFailed
                } else {
                    Drop::HandshakeRejected
                });
                continue;
            }
            if let Some(index) = data_index {
                // A data message: its session now, the AEAD on the crypto
                // workers.
                let session = match self.session(peer, st).data_session(index) {
                    Ok(s) => s,
                    Err(e) => {
                        debug!(peer = %peer.name, error = ?e, "data message refused");
                        self.counters.drop(data_drop(&e));
                        continue;
                    }
                };
                let slot = tun_out.n;
                let Some(buf) = tun_out.bufs.get_mut(slot) else {
                    self.counters.drop(Drop::QueueFull);
                    continue;
                };
                let job = OpenJob {
                    input: i,
                    slot,
                    index,
                    src,
                    session,
                    buf: std::mem::take(buf),
                    opened: Err(WireGuardError::InvalidPacket),
                };
                match feed.push(job) {
                    Ok(()) => {
                        tun_out.commit(0, UNSPECIFIED);
                    }
                    Err(job) => {
                        // NB: never (the plan has room for a batch).
                        *buf = job.buf;
                        self.counters.drop(Drop::QueueFull);
                    }
                }
                continue;
            }
            // A handshake message: answered now, the reply written straight
            // into `udp_out`'s next slot.
            let Some(reply_buf) = udp_out.slot(udp_out.n) else {
                self.counters.drop(Drop::QueueFull);
                continue;
            };
            let tunn = self.session(peer, st);
            // An initiation addressed to the other of our keys (a rotation
            // under way): this peer's handshakes use that key from now on.
            if initiation && tunn.static_public() != *key.public.as_bytes() {
                use_key(st, key);
            }
            let result = match st.tunn.as_mut() {
                Some(t) => t.decapsulate(Some(src.ip()), datagram, reply_buf),
                None => continue,
            };
            match result {
                TunnResult::Done => st.endpoint = Some(src),
                TunnResult::WriteToNetwork(reply) => {
                    st.endpoint = Some(src);
                    // A handshake completed (or was answered) with this key.
                    st.confirmed_key = st.tunn.as_ref().map(|t| t.static_public());
                    let len = reply.len();
                    udp_out.commit(len, src);
                    // Packets that waited for the handshake follow.
                    if !std::mem::replace(&mut st.flush, true) {
                        self.flush_list
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(Arc::clone(peer));
                    }
                    handshakes = true;
                }
                // A handshake message never yields a packet for the TUN.
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
                    self.counters.drop(Drop::Malformed);
                }
                TunnResult::Err(e) => {
                    debug!(peer = %peer.name, error = ?e, "handshake message refused");
                    self.counters.drop(Drop::HandshakeRejected);
                }
            }
        }
        handshakes
    }

    /// The last pass of `open` for one data message, under its peer's lock
    /// (`st`): the peer's state updated, and the packet's length for the
    /// TUN, 0 when it goes nowhere (counted).
    fn opened(
        &self,
        peer: &Arc<Peer>,
        st: &mut PeerState,
        job: &mut OpenJob,
        offset: usize,
        table: &PeerTable,
    ) -> usize {
        // Authentic, and new to the replay window (in the order the
        // messages came: a replay within the batch is caught here).
        let opened = std::mem::replace(&mut job.opened, Err(WireGuardError::InvalidPacket));
        let n = match opened.and_then(|(n, counter)| job.session.mark(counter).map(|()| n)) {
            Ok(n) => n,
            Err(e) => {
                debug!(peer = %peer.name, error = ?e, "decapsulate failed");
                self.counters.drop(data_drop(&e));
                return 0;
            }
        };
        let (Some(inner), Some(tunn)) = (job.buf.get_mut(offset..offset + n), st.tunn.as_mut())
        else {
            // The peer's state expired since the first pass (its sessions
            // with it): what they carried is not taken.
            self.counters.drop(Drop::DecryptFailed);
            return 0;
        };
        let (len, src) = match tunn.data_opened(job.index, inner) {
            TunnResult::WriteToTunnelV4(p, addr) => (p.len(), std::net::IpAddr::from(addr)),
            TunnResult::WriteToTunnelV6(p, addr) => (p.len(), std::net::IpAddr::from(addr)),
            TunnResult::Done => {
                // A keepalive.
                st.endpoint = Some(job.src);
                return 0;
            }
            TunnResult::Err(e) => {
                debug!(peer = %peer.name, error = ?e, "decrypted packet is not IP");
                self.counters.drop(Drop::DecryptFailed);
                return 0;
            }
            TunnResult::WriteToNetwork(_) => {
                self.counters.drop(Drop::Malformed);
                return 0;
            }
        };
        st.endpoint = Some(job.src);
        if table.source_allowed(peer, src) {
            len
        } else {
            debug!(peer = %peer.name, %src, "inner source not in the peer's allowed IPs");
            self.counters.drop(Drop::SourceNotAllowed);
            0
        }
    }

    /// After a handshake: seals into `out` the packets that waited for it
    /// (they count as sent here, their inner bytes from boringtun's own
    /// running total), for the peers `open` marked. Returns true when `out`
    /// filled before every such peer's queue was empty: call again with an
    /// empty batch.
    pub fn flush_waiting(&self, _table: &PeerTable, out: &mut Batch) -> bool {
        loop {
            let Some(peer) = self
                .flush_list
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
            else {
                return false;
            };
            let mut st = peer.lock();
            if !st.flush {
                continue;
            }
            let Some(to) = st.endpoint else {
                st.flush = false;
                continue;
            };
            let Some(tunn) = st.tunn.as_mut() else {
                st.flush = false;
                continue;
            };
            let before = tunn.stats().1;
            let mut flushed = 0u16;
            let mut full = false;
            loop {
                let Some(buf) = out.bufs.get_mut(out.n) else {
                    full = true;
                    break;
                };
                let TunnResult::WriteToNetwork(b) = tunn.decapsulate(None, &[], buf) else {
                    break;
                };
                if b.first() == Some(&MESSAGE_DATA) {
                    flushed = flushed.saturating_add(1);
                }
                let len = b.len();
                out.commit(len, to);
            }
            if flushed > 0 {
                let bytes = tunn.stats().1.saturating_sub(before);
                peer.counters.tx_n(u64::from(flushed), bytes as u64);
                st.waiting = st.waiting.saturating_sub(flushed);
            }
            if full {
                drop(st);
                self.flush_list
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(peer);
                return true;
            }
            st.flush = false;
        }
    }

    /// Ticks the timers of the peers on the timers' list (those with
    /// WireGuard state, or a handshake to start) from position `from` on,
    /// filling `out` with what they ask to send (initiations, retries,
    /// keepalives). Returns where to resume when `out` filled first. A peer
    /// whose sessions have all expired loses its state and leaves the list:
    /// an idle peer costs the timers nothing.
    pub fn tick(&self, out: &mut Batch, from: usize) -> Option<usize> {
        let table = self.table.load();
        let keys = self.keys.load();
        let mut set = self.timer_set.lock().unwrap_or_else(|p| p.into_inner());
        if from == 0 {
            let woken =
                std::mem::take(&mut *self.timer_wake.lock().unwrap_or_else(|p| p.into_inner()));
            set.extend(woken);
        }
        let mut i = from;
        let mut initiated = 0;
        while i < set.len() {
            let Some(buf) = out.bufs.get_mut(out.n) else {
                return Some(i);
            };
            // An updated peer (the same state under a new spec) is ticked
            // as it is now; one removed or replaced since leaves the list.
            let now = table
                .by_index(set[i].index)
                .filter(|p| p.same_state(&set[i]))
                .cloned();
            let Some(now) = now else {
                set.swap_remove(i);
                continue;
            };
            set[i] = now;
            let peer = &set[i];
            let mut st = peer.lock();
            if !st.in_timers {
                st.in_timers = false;
                drop(st);
                set.swap_remove(i);
                continue;
            }
            let endpoint = st.endpoint;
            if st.initiate && initiated >= INITIATIONS_PER_TICK {
                // Its turn comes at a later tick.
                drop(st);
                i += 1;
                continue;
            }
            let initiate = std::mem::take(&mut st.initiate);
            initiated += usize::from(initiate);
            if st.tunn.is_none()
                && st.handed.is_none()
                && !initiate
                && peer.persistent_keepalive.is_none()
            {
                // Its state expired and nothing asks for it.
                st.in_timers = false;
                drop(st);
                set.swap_remove(i);
                continue;
            }
            let tunn = self.tunn_of(peer, &mut st);
            // During a rotation a peer knows one of our two keys, and which
            // one is not known here after a restart: an initiation left
            // unanswered is tried again with the other key.
            let mut initiate = initiate;
            if let Some(next) = &keys.next {
                if tunn
                    .initiation_unanswered()
                    .is_some_and(|d| d >= KEY_FALLBACK)
                {
                    let other = if tunn.static_public() == *next.public.as_bytes() {
                        &keys.current
                    } else {
                        next
                    };
                    tunn.use_static_key(
                        other.secret.clone(),
                        other.public,
                        Arc::clone(&other.limiter),
                    );
                    initiate = true;
                }
            }
            let result = if initiate {
                tunn.format_handshake_initiation(buf, false)
            } else {
                tunn.update_timers(buf)
            };
            let since = tunn.time_since_last_handshake();
            if let Some(at) = since.and_then(|d| std::time::SystemTime::now().checked_sub(d)) {
                st.handshake_at = Some(at);
            }
            match result {
                TunnResult::WriteToNetwork(b) => match endpoint {
                    Some(ep) => {
                        let len = b.len();
                        out.commit(len, ep);
                    }
                    None => self.counters.drop(Drop::NoEndpoint),
                },
                // The handshake was given up, or every session expired:
                // boringtun discarded what waited; the state goes.
                TunnResult::Err(WireGuardError::ConnectionExpired) => {
                    let lost = std::mem::take(&mut st.waiting);
                    self.counters
                        .drop_n(Drop::HandshakeTimeout, u64::from(lost));
                    if peer.persistent_keepalive.is_none() {
                        st.drop_tunn();
                        st.in_timers = false;
                        drop(st);
                        set.swap_remove(i);
                        continue;
                    }
                }
                TunnResult::Done => {}
                TunnResult::Err(e) => debug!(peer = %peer.name, error = ?e, "timer error"),
                TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {}
            }
            i += 1;
        }
        None
    }

    /// Peers on the timers' list (with WireGuard state or a handshake to
    /// start), as of the last tick.
    pub fn timed_peers(&self) -> usize {
        self.timer_set.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// The load limiter's per-second count starts over (the timer thread
    /// calls this every second).
    pub fn reset_rate_limiter(&self) {
        for l in self.keys.load().limiters() {
            l.reset_count();
        }
    }
}

/// How much of a batch (bytes of packets, as many packets of the data
/// plane's largest size) one chunk of crypto work carries: small enough
/// that two workers share a batch evenly and a helper starts early, large
/// enough that claiming a chunk (one atomic operation on a line both
/// threads touch) costs nothing next to its AEAD (some 5 us for 8 KiB on
/// one core here). (16 KiB: the poster waited twice as long for a
/// helper's last chunk, and the speed-up was no better.)
pub const CHUNK_BYTES: usize = 8 * 1024;

/// A batch's AEAD work, planned in order by `seal` and `open` and run on
/// the crypto workers. Owned by a queue worker and reused for every batch:
/// its vectors grow to a batch once and are never allocated again.
pub struct Plan {
    seal: Vec<SealJob>,
    open: Vec<OpenJob>,
}

impl Plan {
    /// Room for a batch (`BATCH` packets) each way.
    pub fn new() -> Self {
        Plan {
            seal: Vec::with_capacity(super::io::BATCH),
            open: Vec::with_capacity(super::io::BATCH),
        }
    }
}

impl Default for Plan {
    fn default() -> Self {
        Plan::new()
    }
}

/// One packet to seal: input packet `input` into `out`'s slot `slot`
/// (whose buffer the job holds meanwhile), with `counter` of `session`.
struct SealJob {
    input: usize,
    slot: usize,
    session: DataSession,
    counter: u64,
    buf: Vec<u8>,
    sealed: bool,
}

/// One data message to open: input datagram `input` (from `src`, for
/// session index `index`) into the TUN batch's slot `slot` (whose buffer
/// the job holds meanwhile); `opened`: its length and counter once open.
struct OpenJob {
    input: usize,
    slot: usize,
    index: u32,
    src: SocketAddr,
    session: DataSession,
    buf: Vec<u8>,
    opened: Result<(usize, u64), WireGuardError>,
}

/// The lock of the peer of a run of packets, held across the run (one lock
/// per run, not per packet).
type Held<'p> = Option<(&'p Arc<Peer>, MutexGuard<'p, PeerState>)>;

/// `peer`'s state, locked in `held` unless `held` holds it already. NB: the
/// previous peer is released before the next is locked, so no thread ever
/// holds two peer locks (no lock ordering to keep).
fn hold<'h, 'p>(held: &'h mut Held<'p>, peer: &'p Arc<Peer>) -> &'h mut PeerState {
    if !held.as_ref().is_some_and(|(p, _)| Arc::ptr_eq(p, peer)) {
        *held = None;
    }
    let (_, st) = held.get_or_insert_with(|| (peer, peer.lock()));
    st
}

/// What open's last pass writes to, as each chunk of a batch is open:
/// the output batches, the lock of the peer of the run, the run's tally.
struct Opened<'t, 'b> {
    tun_out: &'b mut Batch,
    udp_out: &'b mut Batch,
    held: Held<'t>,
    received: Tally<'t>,
    /// A slot was given up (its length 0): the batch is to be compacted.
    emptied: bool,
}

/// Packets and bytes of one peer's run, added to its counters once per
/// run rather than once per packet (its counters are shared by every
/// queue's worker): `record` is the direction (sent or received).
struct Tally<'t> {
    record: fn(&PeerCounters, u64, u64),
    peer: Option<&'t Arc<Peer>>,
    packets: u64,
    bytes: u64,
}

impl<'t> Tally<'t> {
    fn new(record: fn(&PeerCounters, u64, u64)) -> Self {
        Tally {
            record,
            peer: None,
            packets: 0,
            bytes: 0,
        }
    }

    fn add(&mut self, peer: &'t Arc<Peer>, bytes: usize) {
        if !self.peer.is_some_and(|p| Arc::ptr_eq(p, peer)) {
            self.flush();
            self.peer = Some(peer);
        }
        self.packets += 1;
        self.bytes += bytes as u64;
    }

    fn flush(&mut self) {
        if let Some(p) = self.peer.take() {
            (self.record)(&p.counters, self.packets, self.bytes);
        }
        self.packets = 0;
        self.bytes = 0;
    }
}

/// Why a data message was dropped, by what refused it.
fn data_drop(e: &WireGuardError) -> Drop {
    match e {
        WireGuardError::InvalidCounter | WireGuardError::DuplicateCounter => Drop::Replay,
        _ => Drop::DecryptFailed,
    }
}

/// Turns specs into peers for one apply: the same `Arc` for an unchanged
/// peer, an updated one where the session can stay, a new one (an adopted
/// session, or none yet) otherwise; duplicate keys refused.
struct Builder<'d> {
    dp: &'d Dataplane,
    old: &'d PeerTable,
    diff: MeshDiff,
    seen_keys: HashSet<PublicKey>,
    /// Session indices given out in this apply.
    indices: HashSet<u32>,
    /// The peers to handshake with at once on a first load (a warm start).
    first_load: HashSet<String>,
    /// Peers removed lately (they may come back).
    removed: std::collections::HashMap<String, std::time::Instant>,
    initiate: Vec<Arc<Peer>>,
}

impl<'d> Builder<'d> {
    fn new(dp: &'d Dataplane, old: &'d PeerTable) -> Self {
        let first_load = if old.peers.is_empty() {
            std::mem::take(&mut *dp.first_load.lock().unwrap_or_else(|p| p.into_inner()))
        } else {
            HashSet::new()
        };
        let removed = {
            let mut r = dp.removed_at.lock().unwrap_or_else(|p| p.into_inner());
            r.retain(|_, at| at.elapsed() < STALE_SESSION);
            r.clone()
        };
        Builder {
            dp,
            old,
            diff: MeshDiff::default(),
            seen_keys: HashSet::new(),
            indices: HashSet::new(),
            first_load,
            removed,
            initiate: Vec::new(),
        }
    }

    fn peer(&mut self, spec: &PeerSpec) -> Option<Arc<Peer>> {
        let (own, own_next) = (self.dp.public_key(), self.dp.next_public_key());
        let ours = spec.public_key == own || own_next == Some(spec.public_key);
        if ours || !self.seen_keys.insert(spec.public_key) {
            warn!(peer = %spec.name, key = %spec.public_key, "skipping peer: its key is our own or another peer's");
            return None;
        }
        match self.old.by_name(&spec.name) {
            Some(p) if p.same_spec(spec) => {
                self.diff.unchanged += 1;
                Some(Arc::clone(p))
            }
            Some(p) if p.same_session(spec) => {
                self.diff.updated.push(spec.name.clone());
                let p = Arc::new(p.updated(spec));
                if p.lock().initiate {
                    self.initiate.push(Arc::clone(&p));
                }
                Some(p)
            }
            found => {
                let handed = self
                    .dp
                    .indices
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&spec.name)
                    .filter(|i| self.old.by_index(*i).is_none() && !self.indices.contains(i));
                let index = match handed {
                    Some(i) => i,
                    None => loop {
                        let i = self.dp.new_index(self.old);
                        if self.indices.insert(i) {
                            break i;
                        }
                    },
                };
                let peer = Peer::new(spec, index, self.eager(spec, found));
                self.indices.insert(peer.index);
                let p = Arc::new(peer);
                {
                    // Timed from now: a handshake to start, a session handed
                    // over, or a keepalive to keep.
                    let st = p.lock();
                    if st.initiate || st.tunn.is_some() || p.persistent_keepalive.is_some() {
                        self.initiate.push(Arc::clone(&p));
                    }
                }
                if found.is_some() {
                    self.diff.replaced.push(spec.name.clone());
                } else {
                    self.diff.added.push(spec.name.clone());
                }
                Some(p)
            }
        }
    }

    /// Whether a new session for `spec` handshakes at once, rather than
    /// when traffic first goes to or comes from it: only where the far side
    /// may hold a session this node no longer has, that is a peer back
    /// after a removal, a peer replaced under the same key (its keepalive
    /// changed), or one a warm start knows was in use. A Node new to the
    /// cluster is not handshaken by every router at once.
    fn eager(&self, spec: &PeerSpec, found: Option<&Arc<Peer>>) -> bool {
        match found {
            Some(p) => p.public_key == spec.public_key,
            None => self.first_load.contains(&spec.name) || self.removed.contains_key(&spec.name),
        }
    }

    fn finish(self) -> (MeshDiff, Vec<Arc<Peer>>) {
        let now = std::time::Instant::now();
        let mut r = self.dp.removed_at.lock().unwrap_or_else(|p| p.into_inner());
        for name in &self.diff.removed {
            r.insert(name.clone(), now);
        }
        (self.diff, self.initiate)
    }
}

/// Makes `key` the static key of this peer's next handshakes (its sessions
/// stay).
fn use_key(st: &mut PeerState, key: &StaticKey) {
    if let Some(t) = st.tunn.as_mut() {
        t.use_static_key(key.secret.clone(), key.public, Arc::clone(&key.limiter));
    }
}
