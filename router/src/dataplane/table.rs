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
                let key = u32::from(n.network()) & mask4(p);
                let pos = self.v4.iter().position(|(q, _)| *q <= p);
                let slot = match pos {
                    Some(i) if self.v4[i].0 == p => i,
                    Some(i) => {
                        self.v4.insert(i, (p, HashMap::new()));
                        i
                    }
                    None => {
                        self.v4.push((p, HashMap::new()));
                        self.v4.len() - 1
                    }
                };
                self.v4[slot].1.insert(key, value);
            }
            IpNetwork::V6(n) => {
                let p = n.prefix();
                let key = u128::from(n.network()) & mask6(p);
                let pos = self.v6.iter().position(|(q, _)| *q <= p);
                let slot = match pos {
                    Some(i) if self.v6[i].0 == p => i,
                    Some(i) => {
                        self.v6.insert(i, (p, HashMap::new()));
                        i
                    }
                    None => {
                        self.v6.push((p, HashMap::new()));
                        self.v6.len() - 1
                    }
                };
                self.v6[slot].1.insert(key, value);
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
