// tunmesh patch (not in boringtun 0.7.1): a tunnel's live sessions, exported
// from one `Tunn` and imported into another, so that a process handing its
// peers over to its successor keeps every session: same keys, same
// indices, the replay windows as they are, and send counters moved forward
// so that no nonce is used twice. Handshakes in flight are not carried: the
// timers start a new one if one is needed.

use std::time::Duration;

use super::errors::WireGuardError;
use super::session::Session;
use super::timers::TimerName;
use super::rate_limiter::RateLimiter;
use super::{Tunn, N_SESSIONS};
use crate::x25519;

#[cfg(feature = "mock-instant")]
use mock_instant::Instant;

#[cfg(not(feature = "mock-instant"))]
use crate::sleepyinstant::Instant;

/// One session of a tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionState {
    pub receiving_index: u32,
    pub sending_index: u32,
    pub receiving_key: [u8; 32],
    pub sending_key: [u8; 32],
    /// The next counter to send with.
    pub sending_counter: u64,
    /// The replay window: the next expected counter, how many were
    /// received, and the bitmap of what was seen.
    pub replay_next: u64,
    pub replay_received: u64,
    pub replay_bitmap: Vec<u64>,
    /// How long ago the session was established.
    pub age: Duration,
}

/// A tunnel's sessions and timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TunnState {
    /// (slot in the ring, session).
    pub sessions: Vec<(usize, SessionState)>,
    /// The index of the session in use for sending (its slot: modulo the
    /// ring's size).
    pub current: usize,
    pub is_initiator: bool,
    /// How long ago each timer last fired, in `TimerName` order.
    pub timer_ages: Vec<Duration>,
    pub want_keepalive: bool,
    pub want_handshake: bool,
    /// The index the next handshake will use.
    pub next_index: u32,
    /// The TAI64N timestamp of the last initiation received (replayed
    /// initiations stay refused).
    pub last_handshake_timestamp: (u64, u32),
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub last_rtt: Option<u32>,
}

const TIMERS: usize = TimerName::Top as usize;

impl Tunn {
    /// The tunnel's live state, every session's send counter moved forward
    /// by `counter_margin`: as long as this `Tunn` sends fewer than that
    /// many packets after the export (its owner should send none), the
    /// importer never uses a nonce this one did.
    pub fn export_state(&self, counter_margin: u64) -> TunnState {
        let now = Instant::now().duration_since(self.timers.time_started);
        let age = |t: Duration| now.saturating_sub(t);
        let sessions = self
            .sessions
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let mut st = s.as_ref()?.export(counter_margin);
                st.age = age(self.timers.session_timers[slot]);
                Some((slot, st))
            })
            .collect();
        let ts = &self.handshake.last_handshake_timestamp;
        TunnState {
            sessions,
            current: self.current,
            is_initiator: self.timers.is_initiator,
            timer_ages: self.timers.timers.iter().map(|t| age(*t)).collect(),
            want_keepalive: self.timers.want_keepalive,
            want_handshake: self.timers.want_handshake,
            next_index: self.handshake.next_index,
            last_handshake_timestamp: (ts.secs, ts.nano),
            tx_bytes: self.tx_bytes,
            rx_bytes: self.rx_bytes,
            last_rtt: self.handshake.last_rtt,
        }
    }

    /// Takes over `st` (from `export_state` of a `Tunn` with the same keys):
    /// its sessions replace this one's, its timers keep their ages. The
    /// state is checked first and refused whole if it does not fit.
    pub fn import_state(&mut self, st: &TunnState) -> Result<(), WireGuardError> {
        if st.timer_ages.len() != TIMERS {
            return Err(WireGuardError::InvalidPacket);
        }
        let mut sessions: [Option<std::sync::Arc<Session>>; N_SESSIONS] = Default::default();
        for (slot, s) in &st.sessions {
            let session = Session::import(s).ok_or(WireGuardError::InvalidPacket)?;
            if *slot >= N_SESSIONS || session.local_index() % N_SESSIONS != *slot {
                return Err(WireGuardError::InvalidPacket);
            }
            sessions[*slot] = Some(std::sync::Arc::new(session));
        }
        // Times are kept as offsets from the tunnel's start: start it far
        // enough back that the oldest event is at or after it.
        let oldest = st
            .timer_ages
            .iter()
            .chain(st.sessions.iter().map(|(_, s)| &s.age))
            .max()
            .copied()
            .unwrap_or_default();
        let now = Instant::now();
        let (started, shift) = match now.checked_sub(oldest) {
            Some(t) => (t, oldest),
            None => (now, Duration::ZERO),
        };
        let at = |age: Duration| shift.saturating_sub(age);
        self.timers.time_started = started;
        for (t, a) in self.timers.timers.iter_mut().zip(&st.timer_ages) {
            *t = at(*a);
        }
        self.timers.timers[TimerName::TimeCurrent as usize] = shift;
        for t in self.timers.session_timers.iter_mut() {
            *t = shift;
        }
        for (slot, s) in &st.sessions {
            self.timers.session_timers[*slot] = at(s.age);
        }
        self.timers.is_initiator = st.is_initiator;
        self.timers.want_keepalive = st.want_keepalive;
        self.timers.want_handshake = st.want_handshake;
        self.sessions = sessions;
        self.current = st.current;
        self.handshake.next_index = st.next_index;
        self.handshake.last_handshake_timestamp.secs = st.last_handshake_timestamp.0;
        self.handshake.last_handshake_timestamp.nano = st.last_handshake_timestamp.1;
        self.handshake.last_rtt = st.last_rtt;
        self.tx_bytes = st.tx_bytes;
        self.rx_bytes = st.rx_bytes;
        Ok(())
    }
}

// Tested in tunmesh's router/tests/session_state.rs (through the public API).

// tunmesh patch: key rotation. Either side's static key changes for the
// next handshake while the sessions already made go on carrying traffic.
impl Tunn {
    /// Our static key (and the load limiter that checks MAC1 against it)
    /// from the next handshake on. Unlike `set_static_private`, the
    /// sessions stay. `static_public` must be `static_private`'s.
    pub fn use_static_key(
        &mut self,
        static_private: x25519::StaticSecret,
        static_public: x25519::PublicKey,
        rate_limiter: std::sync::Arc<RateLimiter>,
    ) {
        self.rate_limiter = rate_limiter;
        self.handshake.rekey_static(static_private, static_public);
    }

    /// The peer's static key from the next handshake on; the sessions stay.
    pub fn use_peer_key(&mut self, peer_static_public: x25519::PublicKey) {
        self.handshake.rekey_peer(peer_static_public);
    }

    /// The public half of the static key this tunnel handshakes with.
    pub fn static_public(&self) -> [u8; 32] {
        self.handshake.static_public_bytes()
    }

    /// How long our handshake initiation has gone unanswered (`None`: none
    /// in flight).
    pub fn initiation_unanswered(&self) -> Option<Duration> {
        self.handshake.timer().map(|t| t.elapsed())
    }
}
