// tunmesh patch (not in boringtun 0.7.1): a data packet's AEAD apart from
// the tunnel's state, so that several threads can seal or open one
// tunnel's packets at once while its state (the send counters handed out
// in order, the timers, the current session) changes only under its
// owner's lock.
//
// Sending: under the lock, `Tunn::reserve_data` does what `encapsulate`
// does for a data packet except the AEAD (it takes the next send counter
// and records the timers and bytes), and returns the session with that
// counter; anywhere, `DataSession::seal` writes the data message with it.
// Whoever sends the messages in the order the counters were taken keeps a
// peer's packets in order.
//
// Receiving: under the lock, `Tunn::data_session` finds the session a
// data message is addressed to; anywhere, `DataSession::open` decrypts it;
// under the lock again, `DataSession::mark` checks its counter against the
// replay window and marks it received (a replay, or a message too old for
// the window, is refused there), and `Tunn::data_opened` does what
// `decapsulate` does after that (the current session, the timers, the
// bytes received) and validates the inner packet. The replay window is
// touched by the lock's holder only, in the order messages arrived. (No
// quick look at the window before decrypting, as `decapsulate` has: a
// replay costs what any forged message with a live index costs.)

use std::sync::Arc;

use super::errors::WireGuardError;
use super::session::Session;
use super::timers::TimerName;
use super::{Packet, PacketData, Tunn, TunnResult, N_SESSIONS};

/// One of a tunnel's sessions, for sealing or opening data messages on
/// any thread. Cheap to clone (a reference count); holding one does not
/// keep the tunnel from expiring the session.
#[derive(Clone)]
pub struct DataSession(Arc<Session>);

impl std::fmt::Debug for DataSession {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "DataSession({:?})", self.0)
    }
}

impl DataSession {
    /// Writes into `dst` the data message carrying `src` with send counter
    /// `counter` (one `Tunn::reserve_data` handed out for this packet).
    /// Returns its length, or `None` if `dst` is too small (nothing is
    /// written; the counter is then skipped, which a receiver tolerates).
    pub fn seal(&self, counter: u64, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        self.0.seal_with(counter, src, dst)
    }

    /// Opening data message `datagram` (addressed to this session, as
    /// `Tunn::data_session` found): decrypted into `dst`, with no look at
    /// the replay window (any thread). Returns the inner packet's length
    /// (before `Tunn::data_opened` trims it to its IP length) and the
    /// message's counter, for `mark`.
    pub fn open(&self, datagram: &[u8], dst: &mut [u8]) -> Result<(usize, u64), WireGuardError> {
        let m = data_message(datagram)?;
        if m.receiver_idx != self.0.receiving_index {
            return Err(WireGuardError::WrongIndex);
        }
        Ok((self.0.decrypt(&m, dst)?, m.counter))
    }

    /// The last step, for a message that decrypted: its counter marked as
    /// received in the replay window, refused if it was already (a replay
    /// within one batch is caught here).
    pub fn mark(&self, counter: u64) -> Result<(), WireGuardError> {
        self.0.mark(counter)
    }

    /// The session's receiver index (this side's).
    pub fn receiving_index(&self) -> u32 {
        self.0.receiving_index
    }
}

fn data_message(datagram: &[u8]) -> Result<PacketData<'_>, WireGuardError> {
    match Tunn::parse_incoming_packet(datagram)? {
        Packet::PacketData(p) => Ok(p),
        _ => Err(WireGuardError::InvalidPacket),
    }
}

/// The receiver index of data message `datagram`, if it is one.
pub fn data_receiver_index(datagram: &[u8]) -> Option<u32> {
    match Tunn::parse_incoming_packet(datagram) {
        Ok(Packet::PacketData(PacketData { receiver_idx, .. })) => Some(receiver_idx),
        _ => None,
    }
}

impl Tunn {
    /// For a data packet of `len` bytes about to be sealed: the current
    /// session and the send counter taken for the packet, with what
    /// `encapsulate` records for it (the timers of a packet sent, the bytes
    /// sent). `None` when there is no current session: call `encapsulate`,
    /// which keeps the packet for after the handshake it starts.
    pub fn reserve_data(&mut self, len: usize) -> Option<(DataSession, u64)> {
        let session = self.sessions[self.current % N_SESSIONS].as_ref()?;
        let counter = session.reserve_counter();
        let session = DataSession(Arc::clone(session));
        self.timer_tick(TimerName::TimeLastPacketSent);
        if len > 0 {
            self.timer_tick(TimerName::TimeLastDataPacketSent);
        }
        self.tx_bytes += len;
        Some((session, counter))
    }

    /// The session data messages with receiver index `receiver_idx` are
    /// for, if this tunnel has it.
    pub fn data_session(&self, receiver_idx: u32) -> Result<DataSession, WireGuardError> {
        let session = self.sessions[receiver_idx as usize % N_SESSIONS]
            .as_ref()
            .ok_or(WireGuardError::NoCurrentSession)?;
        if session.receiving_index != receiver_idx {
            return Err(WireGuardError::WrongIndex);
        }
        Ok(DataSession(Arc::clone(session)))
    }

    /// After `DataSession::open` opened a data message for `receiver_idx`
    /// into `inner` (its first `len` bytes): what `decapsulate` does next.
    /// The session becomes the current one if it is the newest, the timers
    /// of a packet received run, and the inner packet is validated and
    /// trimmed to its IP length (`Done` for a keepalive).
    pub fn data_opened<'a>(&mut self, receiver_idx: u32, inner: &'a mut [u8]) -> TunnResult<'a> {
        self.set_current_session(receiver_idx as usize);
        self.timer_tick(TimerName::TimeLastPacketReceived);
        self.validate_decapsulated_packet(inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x25519::{PublicKey, StaticSecret};
    use rand_core::OsRng;

    fn pair() -> (Tunn, Tunn) {
        let a_secret = StaticSecret::random_from_rng(OsRng);
        let b_secret = StaticSecret::random_from_rng(OsRng);
        let a_public = PublicKey::from(&a_secret);
        let b_public = PublicKey::from(&b_secret);
        let mut a = Tunn::new(a_secret, b_public, None, None, 1, None);
        let mut b = Tunn::new(b_secret, a_public, None, None, 2, None);
        let mut buf = [0u8; 2048];
        let mut reply = [0u8; 2048];
        let init = match a.format_handshake_initiation(&mut buf, false) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("initiation: {r:?}"),
        };
        let resp = match b.decapsulate(None, &init, &mut reply) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("response: {r:?}"),
        };
        // The initiator's session is up; its keepalive confirms the
        // responder's.
        let keepalive = match a.decapsulate(None, &resp, &mut buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            r => panic!("keepalive: {r:?}"),
        };
        assert!(matches!(
            b.decapsulate(None, &keepalive, &mut reply),
            TunnResult::Done
        ));
        (a, b)
    }

    fn ipv4(payload: u8, len: usize) -> Vec<u8> {
        let mut p = vec![payload; len];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p
    }

    #[test]
    fn sealed_apart_and_out_of_order_opens_in_either_path() {
        let (mut a, mut b) = pair();
        // Counters taken in order, sealed in reverse order (as two threads
        // might), opened by the split path and by decapsulate alike.
        let packets: Vec<Vec<u8>> = (0..4).map(|i| ipv4(i as u8, 100 + i)).collect();
        let reserved: Vec<_> = packets
            .iter()
            .map(|p| a.reserve_data(p.len()).expect("a session"))
            .collect();
        let counters: Vec<u64> = reserved.iter().map(|(_, c)| *c).collect();
        assert_eq!(counters, [counters[0], counters[0] + 1, counters[0] + 2, counters[0] + 3]);
        let mut sealed = vec![Vec::new(); packets.len()];
        for i in (0..packets.len()).rev() {
            let mut dst = [0u8; 2048];
            let (s, c) = &reserved[i];
            let n = s.seal(*c, &packets[i], &mut dst).expect("room");
            assert_eq!(n, packets[i].len() + 32);
            sealed[i] = dst[..n].to_vec();
        }
        for (i, m) in sealed.iter().enumerate() {
            let mut dst = [0u8; 2048];
            if i % 2 == 0 {
                let idx = data_receiver_index(m).expect("a data message");
                let s = b.data_session(idx).expect("the session");
                let (n, c) = s.open(m, &mut dst).expect("opens");
                s.mark(c).expect("marked");
                match b.data_opened(idx, &mut dst[..n]) {
                    TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &packets[i][..]),
                    r => panic!("{r:?}"),
                }
                // A replay is refused by either path: twice in flight, the
                // second mark refuses it.
                assert!(s.open(m, &mut dst).is_ok());
                assert!(s.mark(c).is_err());
                assert!(matches!(
                    b.decapsulate(None, m, &mut dst),
                    TunnResult::Err(WireGuardError::DuplicateCounter)
                ));
            } else {
                match b.decapsulate(None, m, &mut dst) {
                    TunnResult::WriteToTunnelV4(p, _) => assert_eq!(p, &packets[i][..]),
                    r => panic!("{r:?}"),
                }
            }
        }
        // Too small a buffer: nothing sealed, nothing opened, no panic.
        let (s, c) = a.reserve_data(10).expect("a session");
        assert!(s.seal(c, &[0u8; 10], &mut [0u8; 41]).is_none());
        let mut dst = [0u8; 2048];
        let n = s.seal(c, &ipv4(9, 40), &mut dst).expect("room");
        let idx = data_receiver_index(&dst[..n]).expect("data");
        let bs = b.data_session(idx).expect("session");
        assert!(bs.open(&dst[..n], &mut [0u8; 8]).is_err());
        let (_, c2) = bs.open(&dst[..n], &mut [0u8; 2048]).expect("opens");
        assert!(bs.mark(c2).is_ok(), "not marked by a failed open");
        assert!(bs.mark(c2).is_err());
        // A tampered message fails its tag.
        dst[20] ^= 1;
        assert!(matches!(
            bs.open(&dst[..n], &mut [0u8; 2048]),
            Err(WireGuardError::InvalidAeadTag)
        ));
        // An index this tunnel does not hold.
        assert!(b.data_session(idx ^ 0x10).is_err());
    }
}
