//! Longest-prefix-match table over allowed IPs: one hash map per prefix
//! length present, probed from the longest length down. Lookups cost one
//! hash probe per distinct prefix length (typically one or two), whatever
//! the number of peers.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

fn mask4(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask6(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// Hashing for the packet path's maps, whose keys the cluster's
/// configuration chooses (prefixes of allowed IPs) or this node hands out
/// (session indices), never a remote party: a multiply-and-fold per word
/// and splitmix64's finalizer, where the default SipHash costs as much as
/// a third of the rest of a data message's bookkeeping. NB: probed for
/// every packet (a route, a source check, a session index).
#[derive(Debug, Default, Clone, Copy)]
pub struct MixHash;

impl std::hash::BuildHasher for MixHash {
    type Hasher = MixHasher;
    fn build_hasher(&self) -> MixHasher {
        MixHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct MixHasher(u64);

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

impl std::hash::Hasher for MixHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x ^= x >> 30;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 27;
        x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(w));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(23) ^ i).wrapping_mul(MIX);
    }
    fn write_u128(&mut self, i: u128) {
        self.write_u64(i as u64);
        self.write_u64((i >> 64) as u64);
    }
}

/// Maps prefixes to values; `lookup` returns the value of the longest
/// prefix containing an address.
#[derive(Debug, Clone)]
pub struct Lpm<T> {
    v4: Vec<(u8, HashMap<u32, T, MixHash>)>,
    v6: Vec<(u8, HashMap<u128, T, MixHash>)>,
}

impl<T> Default for Lpm<T> {
    fn default() -> Self {
        Lpm {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

impl<T> Lpm<T> {
    /// Inserts `net -> value`, replacing any value for the same prefix.
    pub fn insert(&mut self, net: IpNetwork, value: T) {
        match net {
            IpNetwork::V4(n) => {
                let p = n.prefix();
                insert_at(&mut self.v4, p, u32::from(n.network()) & mask4(p), value);
            }
            IpNetwork::V6(n) => {
                let p = n.prefix();
                insert_at(&mut self.v6, p, u128::from(n.network()) & mask6(p), value);
            }
        }
    }

    /// The value of the longest prefix that contains `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(p, m)| m.get(&(a & mask4(*p))))
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(p, m)| m.get(&(a & mask6(*p))))
            }
        }
    }
}

/// Inserts into the map for prefix length `p`, keeping levels sorted longest first.
fn insert_at<K: std::hash::Hash + Eq, T>(
    levels: &mut Vec<(u8, HashMap<K, T, MixHash>)>,
    p: u8,
    key: K,
    value: T,
) {
    let i = levels
        .iter()
        .position(|(q, _)| *q <= p)
        .unwrap_or(levels.len());
    if levels.get(i).is_none_or(|(q, _)| *q != p) {
        levels.insert(i, (p, HashMap::with_hasher(MixHash)));
    }
    if let Some((_, m)) = levels.get_mut(i) {
        m.insert(key, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_prefix_wins() {
        let mut t = Lpm::default();
        let table = [
            ("0.0.0.0/0", 0),
            ("10.244.0.0/16", 1),
            ("10.244.2.0/24", 2),
            ("10.244.2.7/32", 3),
            ("fd00::/8", 4),
            ("fd00:10:244:2::/64", 5),
        ];
        for (n, v) in table {
            t.insert(n.parse().unwrap(), v);
        }
        let cases = [
            ("10.244.2.7", Some(3)),
            ("10.244.2.8", Some(2)),
            ("10.244.3.1", Some(1)),
            ("192.168.1.1", Some(0)),
            ("fd00:10:244:2::9", Some(5)),
            ("fd01::1", Some(4)),
            ("2001:db8::1", None),
        ];
        for (a, want) in cases {
            assert_eq!(t.lookup(a.parse().unwrap()).copied(), want, "{a}");
        }
    }

    #[test]
    fn empty_table_finds_nothing() {
        let t: Lpm<u8> = Lpm::default();
        assert!(t.lookup("10.0.0.1".parse().unwrap()).is_none());
    }
}
