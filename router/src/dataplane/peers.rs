//! Peers and the immutable peer table the packet path reads. A reconcile
//! builds a new `PeerTable` and swaps it in; packet threads keep using the
//! old one until their next batch. A peer's WireGuard state lives behind an
//! `Arc` shared by old and new tables, so an unchanged peer keeps its
//! session across reconciles.
//!
//! An idle peer costs its table entries and nothing else: its `Tunn` (the
//! handshake and session state, about 10 KB) is made when the peer is
//! first used (a packet to or from it, a handshake to start), and dropped
//! again once its sessions have expired; only peers with a `Tunn` are on
//! the timers' list (`in_timers`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::Tunn;
use ipnetwork::IpNetwork;

use super::counters::PeerCounters;
use super::table::{Lpm, MixHash};
use crate::model::PeerSpec;
use crate::PublicKey;

/// The mutable part of a peer: its session and where it currently is.
pub struct PeerState {
    /// The WireGuard state, while the peer is in use (see the module).
    pub tunn: Option<Box<Tunn>>,
    /// On the timers' list (it has a `Tunn`, or a handshake to start).
    pub in_timers: bool,
    /// When the last handshake completed, as of the last tick (kept once
    /// the `Tunn` is gone, for `wg show` and status).
    pub handshake_at: Option<std::time::SystemTime>,
    /// Bytes sent and received by `Tunn`s of this peer dropped before.
    pub transfer_base: (usize, usize),
    /// A live session handed over by the previous process, made into the
    /// `Tunn` at the peer's first use (after the handover's gap).
    pub handed: Option<Box<boringtun::noise::state::TunnState>>,
    /// Current endpoint: the configured one, or the last address an
    /// authenticated packet came from (roaming).
    pub endpoint: Option<SocketAddr>,
    /// Start a handshake at the next timer tick instead of waiting for
    /// traffic. Set for a new session with a known endpoint: the far side
    /// may still hold a session with this node's previous incarnation of the
    /// peer (re-added after a bad annotation, say), and would keep sending
    /// on it, unheard, until its own timers gave up (15 s or more). A
    /// handshake from here replaces it at once.
    pub initiate: bool,
    /// Packets handed to `Tunn` while it had no session, waiting in its
    /// queue for the handshake (as far as the engine can tell: boringtun
    /// does not say). Lets the engine count the ones boringtun discards.
    pub waiting: u16,
    /// A handshake completed: the packets that waited for it are to be
    /// sealed and sent (`Dataplane::flush_waiting`).
    pub flush: bool,
    /// Which of this node's static keys (public half) the last handshake
    /// this peer completed or initiated used: during a key rotation, the
    /// peer knows the next key once this is it.
    pub confirmed_key: Option<[u8; 32]>,
    /// The largest inner packet the path to this peer carries (the
    /// underlay's MTU on the way, less WireGuard's overhead); 0: unknown,
    /// nothing is refused.
    pub path_mtu: u16,
}

impl PeerState {
    /// When the last handshake with the peer completed, if one did.
    pub fn last_handshake(&self) -> Option<std::time::SystemTime> {
        match self
            .tunn
            .as_ref()
            .and_then(|t| t.time_since_last_handshake())
        {
            Some(d) => std::time::SystemTime::now().checked_sub(d),
            None => self.handshake_at,
        }
    }

    /// WireGuard bytes sent and received with the peer, all sessions.
    pub fn transfer(&self) -> (usize, usize) {
        let (tx, rx) = self
            .tunn
            .as_ref()
            .map(|t| {
                let (_, tx, rx, _, _) = t.stats();
                (tx, rx)
            })
            .unwrap_or_default();
        (self.transfer_base.0 + tx, self.transfer_base.1 + rx)
    }

    /// Drops the WireGuard state (its sessions expired), keeping what the
    /// peer's reports need.
    pub fn drop_tunn(&mut self) {
        let (tx, rx) = self.transfer();
        self.handshake_at = self.last_handshake();
        self.transfer_base = (tx, rx);
        self.tunn = None;
    }
}

/// One peer in a table.
pub struct Peer {
    pub name: String,
    pub public_key: PublicKey,
    /// Our local session index prefix (24 bits) for this peer's `Tunn`.
    pub index: u32,
    pub allowed_ips: Vec<IpNetwork>,
    /// Accepted as inner sources only (see `PeerSpec::node_addresses`).
    pub node_addresses: Vec<IpAddr>,
    pub persistent_keepalive: Option<u16>,
    /// The endpoint the source asked for (not the roamed one).
    pub configured_endpoint: Option<SocketAddr>,
    /// When the peer made its key (Unix seconds), if its Node says.
    pub key_created_unix: Option<u64>,
    state: Arc<Mutex<PeerState>>,
    pub counters: Arc<PeerCounters>,
}

impl Peer {
    /// A peer with no WireGuard state yet. `initiate`: start a handshake
    /// at the next tick (for a new session whose far side may still hold
    /// one with this node's previous incarnation).
    pub fn new(spec: &PeerSpec, index: u32, initiate: bool) -> Self {
        Peer {
            name: spec.name.clone(),
            public_key: spec.public_key,
            index,
            allowed_ips: spec.allowed_ips.clone(),
            node_addresses: spec.node_addresses.clone(),
            persistent_keepalive: spec.persistent_keepalive,
            configured_endpoint: spec.endpoint,
            key_created_unix: spec.key_created_unix,
            state: Arc::new(Mutex::new(PeerState {
                tunn: None,
                in_timers: false,
                handshake_at: None,
                transfer_base: (0, 0),
                handed: None,
                endpoint: spec.endpoint,
                initiate: initiate && spec.endpoint.is_some(),
                waiting: 0,
                flush: false,
                confirmed_key: None,
                path_mtu: 0,
            })),
            counters: Arc::default(),
        }
    }

    /// The same session and counters under a changed spec (allowed IPs,
    /// endpoint, key). A changed configured endpoint replaces the current
    /// one. A changed key (only an announced rotation gets here, see
    /// `same_session`) is used from the next handshake on, which starts at
    /// the next tick; until it completes, the live session goes on carrying
    /// traffic, so a rotation loses nothing.
    pub fn updated(&self, spec: &PeerSpec) -> Self {
        if spec.endpoint != self.configured_endpoint {
            if let Some(ep) = spec.endpoint {
                self.lock().endpoint = Some(ep);
            }
        }
        if spec.public_key != self.public_key {
            let mut st = self.lock();
            if let Some(t) = st.tunn.as_mut() {
                t.use_peer_key(boringtun::x25519::PublicKey::from(
                    *spec.public_key.as_bytes(),
                ));
            }
            st.initiate = true;
        }
        Peer {
            name: spec.name.clone(),
            public_key: spec.public_key,
            index: self.index,
            allowed_ips: spec.allowed_ips.clone(),
            node_addresses: spec.node_addresses.clone(),
            persistent_keepalive: self.persistent_keepalive,
            configured_endpoint: spec.endpoint,
            key_created_unix: spec.key_created_unix,
            state: Arc::clone(&self.state),
            counters: Arc::clone(&self.counters),
        }
    }

    /// The same peer with no session (a new `index`): its current
    /// endpoint, path MTU and counters kept, a handshake at the next tick.
    pub fn fresh(&self, index: u32) -> Self {
        let (endpoint, path_mtu) = {
            let st = self.lock();
            (st.endpoint, st.path_mtu)
        };
        Peer {
            name: self.name.clone(),
            public_key: self.public_key,
            index,
            allowed_ips: self.allowed_ips.clone(),
            node_addresses: self.node_addresses.clone(),
            persistent_keepalive: self.persistent_keepalive,
            configured_endpoint: self.configured_endpoint,
            key_created_unix: self.key_created_unix,
            state: Arc::new(Mutex::new(PeerState {
                tunn: None,
                in_timers: false,
                handshake_at: None,
                transfer_base: (0, 0),
                handed: None,
                endpoint,
                initiate: endpoint.is_some(),
                waiting: 0,
                flush: false,
                confirmed_key: None,
                path_mtu,
            })),
            counters: Arc::clone(&self.counters),
        }
    }

    /// Whether `other` is this peer with the same WireGuard state (an
    /// update keeps it, a replacement does not).
    pub fn same_state(&self, other: &Peer) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Locks the session. A poisoned lock (a panic elsewhere while holding
    /// it) still yields the state: the session data stays usable.
    #[inline]
    pub fn lock(&self) -> MutexGuard<'_, PeerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the spec differs only in ways `updated` can apply in place.
    /// A key change qualifies only as an announced rotation from this
    /// peer's current key; any other replaces the session.
    pub fn same_session(&self, spec: &PeerSpec) -> bool {
        self.persistent_keepalive == spec.persistent_keepalive
            && (self.public_key == spec.public_key || spec.rotated_from == Some(self.public_key))
    }

    pub fn same_spec(&self, spec: &PeerSpec) -> bool {
        self.same_session(spec)
            && self.public_key == spec.public_key
            && self.allowed_ips == spec.allowed_ips
            && self.node_addresses == spec.node_addresses
            && self.configured_endpoint == spec.endpoint
            && self.key_created_unix == spec.key_created_unix
    }
}

/// An immutable snapshot of all peers, with the lookups the packet path needs.
#[derive(Default)]
pub struct PeerTable {
    /// Sorted by name.
    pub peers: Vec<Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>, MixHash>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    routes: Lpm<Arc<Peer>>,
    /// Peer node addresses: inbound source check only, never routes.
    node_addresses: HashMap<IpAddr, Arc<Peer>>,
}

impl PeerTable {
    pub fn new(mut peers: Vec<Arc<Peer>>) -> Self {
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        let mut t = PeerTable::default();
        for p in &peers {
            t.by_index.insert(p.index, Arc::clone(p));
            t.by_key.insert(p.public_key, Arc::clone(p));
            for net in &p.allowed_ips {
                t.routes.insert(*net, Arc::clone(p));
            }
            for ip in &p.node_addresses {
                t.node_addresses.insert(*ip, Arc::clone(p));
            }
        }
        t.peers = peers;
        t
    }

    /// Outbound cryptokey routing: the peer whose allowed IPs hold `dst`
    /// with the longest prefix.
    #[inline]
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst)
    }

    /// Inbound cryptokey routing: whether `peer` may send packets from
    /// `src` (its allowed IPs, by longest prefix, or its node addresses).
    #[inline]
    pub fn source_allowed(&self, peer: &Arc<Peer>, src: IpAddr) -> bool {
        match self.routes.lookup(src) {
            Some(owner) => Arc::ptr_eq(owner, peer),
            None => self
                .node_addresses
                .get(&src)
                .is_some_and(|owner| Arc::ptr_eq(owner, peer)),
        }
    }

    /// The peer a session index (receiver index >> 8) belongs to.
    #[inline]
    pub fn by_index(&self, index: u32) -> Option<&Arc<Peer>> {
        self.by_index.get(&index)
    }

    pub fn by_key(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    pub fn by_name(&self, name: &str) -> Option<&Arc<Peer>> {
        self.peers
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
            .and_then(|i| self.peers.get(i))
    }
}
