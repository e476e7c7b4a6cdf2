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

/// Maps prefixes to values; `lookup` returns the value of the longest
/// prefix containing an address.
#[derive(Debug, Clone)]
pub struct Lpm<T> {
    v4: Vec<(u8, HashMap<u32, T>)>,
    v6: Vec<(u8, HashMap<u128, T>)>,
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
    levels: &mut Vec<(u8, HashMap<K, T>)>,
    p: u8,
    key: K,
    value: T,
) {
    let i = levels
        .iter()
        .position(|(q, _)| *q <= p)
        .unwrap_or(levels.len());
    if levels.get(i).is_none_or(|(q, _)| *q != p) {
        levels.insert(i, (p, HashMap::new()));
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
