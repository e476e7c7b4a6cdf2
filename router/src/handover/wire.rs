//! The live sessions as they travel in a handover: a compact binary
//! encoding (keys as bytes, a replay window as its non-zero words), made
//! after the old router's workers stopped and read before the new one's
//! start, so its size and speed are the handover's gap. Decoding checks
//! every length and key, and names what does not fit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use boringtun::noise::state::{SessionState, TunnState};

use super::StateError;
use crate::dataplane::PeerSession;
use crate::PublicKey;

/// This encoding's version (the first byte).
const VERSION: u8 = 1;

fn put_u16(o: &mut Vec<u8>, v: u16) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(o: &mut Vec<u8>, v: u32) {
    o.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(o: &mut Vec<u8>, v: u64) {
    o.extend_from_slice(&v.to_le_bytes());
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Encodes `sessions`.
pub fn encode(sessions: &[PeerSession]) -> Vec<u8> {
    let mut o = Vec::with_capacity(64 + sessions.len() * 320);
    o.push(VERSION);
    put_u32(&mut o, sessions.len() as u32);
    for p in sessions {
        let name = p.name.as_bytes();
        put_u16(&mut o, name.len().min(u16::MAX as usize) as u16);
        o.extend_from_slice(&name[..name.len().min(u16::MAX as usize)]);
        o.extend_from_slice(p.public_key.as_bytes());
        put_u32(&mut o, p.index);
        match p.endpoint {
            None => o.push(0),
            Some(SocketAddr::V4(a)) => {
                o.push(4);
                o.extend_from_slice(&a.ip().octets());
                put_u16(&mut o, a.port());
            }
            Some(SocketAddr::V6(a)) => {
                o.push(6);
                o.extend_from_slice(&a.ip().octets());
                put_u16(&mut o, a.port());
            }
        }
        let t = &p.tunn;
        put_u32(&mut o, t.current as u32);
        o.push(u8::from(t.is_initiator));
        o.push(u8::from(t.want_keepalive));
        o.push(u8::from(t.want_handshake));
        put_u32(&mut o, t.next_index);
        put_u64(&mut o, t.last_handshake_timestamp.0);
        put_u32(&mut o, t.last_handshake_timestamp.1);
        put_u64(&mut o, t.tx_bytes as u64);
        put_u64(&mut o, t.rx_bytes as u64);
        match t.last_rtt {
            None => o.push(0),
            Some(r) => {
                o.push(1);
                put_u32(&mut o, r);
            }
        }
        o.push(t.timer_ages.len().min(255) as u8);
        for a in t.timer_ages.iter().take(255) {
            put_u64(&mut o, nanos(*a));
        }
        o.push(t.sessions.len().min(255) as u8);
        for (slot, s) in t.sessions.iter().take(255) {
            put_u32(&mut o, *slot as u32);
            put_u32(&mut o, s.receiving_index);
            put_u32(&mut o, s.sending_index);
            o.extend_from_slice(&s.receiving_key);
            o.extend_from_slice(&s.sending_key);
            put_u64(&mut o, s.sending_counter);
            put_u64(&mut o, s.replay_next);
            put_u64(&mut o, s.replay_received);
            put_u64(&mut o, nanos(s.age));
            // The replay window: its length, then the words that are set.
            let words = s.replay_bitmap.len().min(u16::MAX as usize);
            put_u16(&mut o, words as u16);
            let set: Vec<(usize, u64)> = s.replay_bitmap[..words]
                .iter()
                .copied()
                .enumerate()
                .filter(|(_, w)| *w != 0)
                .collect();
            put_u16(&mut o, set.len() as u16);
            for (i, w) in set {
                put_u16(&mut o, i as u16);
                put_u64(&mut o, w);
            }
        }
    }
    o
}

/// Reads what `encode` wrote.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], StateError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.b.len());
        let Some(end) = end else {
            return Err(StateError::Field {
                field: format!("sessions (byte {})", self.at),
                problem: format!("ends inside {what}"),
            });
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self, what: &str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, StateError> {
        let mut a = [0u8; 2];
        a.copy_from_slice(self.take(2, what)?);
        Ok(u16::from_le_bytes(a))
    }
    fn u32(&mut self, what: &str) -> Result<u32, StateError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, what)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, what: &str) -> Result<u64, StateError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_le_bytes(a))
    }
    fn key(&mut self, what: &str) -> Result<[u8; 32], StateError> {
        let mut a = [0u8; 32];
        a.copy_from_slice(self.take(32, what)?);
        Ok(a)
    }
}

fn bad(field: String, problem: impl Into<String>) -> StateError {
    StateError::Field {
        field,
        problem: problem.into(),
    }
}

/// Decodes the sessions; the first thing that does not fit is named.
pub fn decode(b: &[u8]) -> Result<Vec<PeerSession>, StateError> {
    let mut r = Reader { b, at: 0 };
    let v = r.u8("the version")?;
    if v != VERSION {
        return Err(bad(
            "sessions".into(),
            format!("encoding {v}, this router reads {VERSION}"),
        ));
    }
    let n = r.u32("the count")? as usize;
    let mut out = Vec::with_capacity(n.min(1 << 20));
    for k in 0..n {
        let len = r.u16("a name")? as usize;
        let name = String::from_utf8(r.take(len, "a name")?.to_vec())
            .map_err(|_| bad(format!("sessions[{k}].name"), "not UTF-8"))?;
        let label = format!("sessions[{name:?}]");
        let key = r.key("a public key")?;
        if key == [0; 32] {
            return Err(bad(format!("{label}.public_key"), "is the all-zero key"));
        }
        let index = r.u32("an index")?;
        let endpoint = match r.u8("an endpoint")? {
            0 => None,
            4 => {
                let mut a = [0u8; 4];
                a.copy_from_slice(r.take(4, "an endpoint")?);
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(a)),
                    r.u16("a port")?,
                ))
            }
            6 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(r.take(16, "an endpoint")?);
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(a)),
                    r.u16("a port")?,
                ))
            }
            t => return Err(bad(format!("{label}.endpoint"), format!("family {t}"))),
        };
        let current = r.u32("current")? as usize;
        let is_initiator = r.u8("is_initiator")? != 0;
        let want_keepalive = r.u8("want_keepalive")? != 0;
        let want_handshake = r.u8("want_handshake")? != 0;
        let next_index = r.u32("next_index")?;
        let ts = (r.u64("a timestamp")?, r.u32("a timestamp")?);
        let tx_bytes = r.u64("tx_bytes")? as usize;
        let rx_bytes = r.u64("rx_bytes")? as usize;
        let last_rtt = match r.u8("last_rtt")? {
            0 => None,
            _ => Some(r.u32("last_rtt")?),
        };
        let ages = r.u8("timer ages")? as usize;
        let mut timer_ages = Vec::with_capacity(ages);
        for _ in 0..ages {
            timer_ages.push(Duration::from_nanos(r.u64("a timer age")?));
        }
        let count = r.u8("sessions")? as usize;
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            let slot = r.u32("a slot")? as usize;
            let receiving_index = r.u32("an index")?;
            let sending_index = r.u32("an index")?;
            let receiving_key = r.key("a key")?;
            let sending_key = r.key("a key")?;
            let sending_counter = r.u64("a counter")?;
            let replay_next = r.u64("a counter")?;
            let replay_received = r.u64("a counter")?;
            let age = Duration::from_nanos(r.u64("an age")?);
            let words = r.u16("a replay window")? as usize;
            let set = r.u16("a replay window")? as usize;
            let mut replay_bitmap = vec![0u64; words];
            for _ in 0..set {
                let i = r.u16("a replay window")? as usize;
                let w = r.u64("a replay window")?;
                *replay_bitmap.get_mut(i).ok_or_else(|| {
                    bad(
                        format!("{label}.replay_bitmap"),
                        format!("word {i} of {words}"),
                    )
                })? = w;
            }
            sessions.push((
                slot,
                SessionState {
                    receiving_index,
                    sending_index,
                    receiving_key,
                    sending_key,
                    sending_counter,
                    replay_next,
                    replay_received,
                    replay_bitmap,
                    age,
                },
            ));
        }
        out.push(PeerSession {
            name,
            public_key: PublicKey::from_bytes(key),
            index,
            endpoint,
            tunn: TunnState {
                sessions,
                current,
                is_initiator,
                timer_ages,
                want_keepalive,
                want_handshake,
                next_index,
                last_handshake_timestamp: ts,
                tx_bytes,
                rx_bytes,
                last_rtt,
            },
        });
    }
    if r.at != b.len() {
        return Err(bad(
            "sessions".into(),
            format!("{} bytes after the last", b.len() - r.at),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(name: &str, ep: Option<&str>, words: Vec<u64>) -> PeerSession {
        PeerSession {
            name: name.into(),
            public_key: PublicKey::from_bytes([7; 32]),
            index: 0x12_3456,
            endpoint: ep.map(|e| e.parse().unwrap()),
            tunn: TunnState {
                sessions: vec![(
                    3,
                    SessionState {
                        receiving_index: 1,
                        sending_index: 2,
                        receiving_key: [1; 32],
                        sending_key: [2; 32],
                        sending_counter: 99,
                        replay_next: 12,
                        replay_received: 11,
                        replay_bitmap: words,
                        age: Duration::from_millis(1500),
                    },
                )],
                current: 3,
                is_initiator: true,
                timer_ages: vec![Duration::from_secs(1); 9],
                want_keepalive: false,
                want_handshake: true,
                next_index: 4,
                last_handshake_timestamp: (123, 456),
                tx_bytes: 10,
                rx_bytes: 20,
                last_rtt: Some(3),
            },
        }
    }

    #[test]
    fn sessions_round_trip_and_damage_is_named() {
        let mut words = vec![0u64; 128];
        words[5] = 0xff;
        words[127] = u64::MAX;
        let s = vec![
            session("node-2", Some("172.28.0.12:51820"), words),
            session("node-3", Some("[fd00::3]:51820"), vec![0; 128]),
            session("node-4", None, vec![]),
        ];
        let b = encode(&s);
        let back = decode(&b).unwrap();
        assert_eq!(back.len(), 3);
        for (a, z) in s.iter().zip(&back) {
            assert_eq!(a.name, z.name);
            assert_eq!(a.endpoint, z.endpoint);
            assert_eq!(a.index, z.index);
            assert_eq!(format!("{:?}", a.tunn), format!("{:?}", z.tunn));
        }
        // An empty window costs its length, not its 128 words.
        assert_eq!(
            encode(&[session("n", None, vec![0; 128])]).len(),
            encode(&[session("n", None, vec![])]).len()
        );
        // Cut short, or with a stray byte: named.
        let e = decode(&b[..b.len() - 3]).unwrap_err().to_string();
        assert!(e.contains("ends inside"), "{e}");
        let mut more = b.clone();
        more.push(0);
        assert!(decode(&more)
            .unwrap_err()
            .to_string()
            .contains("after the last"));
        let mut v2 = b.clone();
        v2[0] = 9;
        assert!(decode(&v2).unwrap_err().to_string().contains("encoding 9"));
    }
}
