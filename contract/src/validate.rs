//! One set of validators for the values every source hands the router: a
//! WireGuard public key, a UDP endpoint, a CIDR. The Kubernetes source, the
//! mesh file, the WireGuard API (`wg set`) and the CNI plugin all call
//! these, so the same text gets the same verdict and the same words
//! wherever it comes from. Each error names the value and what is wrong;
//! the caller adds where it was (a Node's annotation, a file's field).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use tunmesh_keygen::PublicKey;

/// A value that is not valid: the text as given, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} {reason}")]
pub struct Invalid {
    pub value: String,
    pub reason: String,
}

fn invalid(value: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks a key's bytes: the all-zero key is X25519's identity, with which
/// no handshake can succeed (`wg` refuses it too).
fn key_bytes(text: &str, bytes: [u8; 32]) -> Result<PublicKey, Invalid> {
    if bytes == [0; 32] {
        return Err(invalid(text, "is the all-zero key"));
    }
    Ok(PublicKey::from_bytes(bytes))
}

/// A public key as `wg pubkey` prints it: base64 of 32 bytes.
pub fn public_key(text: &str) -> Result<PublicKey, Invalid> {
    let t = text.trim();
    let k = PublicKey::from_base64(t).map_err(|e| invalid(t, format!("is not a key: {e}")))?;
    key_bytes(t, *k.as_bytes())
}

/// A public key as the WireGuard API writes it: 64 hex digits.
pub fn public_key_hex(text: &str) -> Result<PublicKey, Invalid> {
    let t = text.trim();
    let mut out = [0u8; 32];
    let hex = t.as_bytes();
    if hex.len() != 64 {
        return Err(invalid(t, "is not a key: not 64 hex digits"));
    }
    for (i, pair) in hex.chunks(2).enumerate() {
        let digit = |c: u8| (c as char).to_digit(16);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
            _ => return Err(invalid(t, "is not a key: not 64 hex digits")),
        }
    }
    key_bytes(t, out)
}

/// A UDP endpoint: an IP literal and a port (`1.2.3.4:51820`,
/// `[fd00::1]:51820`), unicast, port not 0. Host names are not resolved.
pub fn endpoint(text: &str) -> Result<SocketAddr, Invalid> {
    let t = text.trim();
    let ep: SocketAddr = t.parse().map_err(|_| {
        invalid(
            t,
            "is not IP:PORT (host names are not resolved; IPv6 as [addr]:port)",
        )
    })?;
    if ep.port() == 0 {
        return Err(invalid(t, "has port 0"));
    }
    let broadcast = matches!(ep.ip(), IpAddr::V4(a) if a.is_broadcast());
    if ep.ip().is_unspecified() || ep.ip().is_multicast() || broadcast {
        return Err(invalid(t, "is not a unicast address"));
    }
    Ok(ep)
}

/// A CIDR: an address, `/`, a prefix length, and no host bits set, so
/// that a typo such as `10.244.2.1/24` is caught instead of silently
/// meaning `10.244.2.0/24`.
pub fn cidr(text: &str) -> Result<IpNetwork, Invalid> {
    let t = text.trim();
    let net: IpNetwork = t
        .parse()
        .map_err(|e| invalid(t, format!("is not a CIDR ({e})")))?;
    if !t.contains('/') {
        return Err(invalid(
            t,
            format!("has no prefix length (write {t}/{})", net.prefix()),
        ));
    }
    network(net).map_err(|clean| invalid(t, format!("has host bits set (did you mean {clean}?)")))
}

/// `net` if it is a clean network address, else `Err` with the network it
/// would be.
fn network(net: IpNetwork) -> Result<IpNetwork, IpNetwork> {
    // NB: the prefix came from a parsed IpNetwork, so it is in range.
    let clean = IpNetwork::new(net.network(), net.prefix()).unwrap_or(net);
    if clean.ip() == net.ip() {
        Ok(clean)
    } else {
        Err(clean)
    }
}

/// Two prefixes overlap when one contains the other's network address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Prefixes of many owners, to find one that overlaps a new prefix without
/// a pass over all of them: a lookup per prefix length in use (a cluster
/// has one or two) and one range query, so checking thousands of peers'
/// allowed IPs stays O(n log n).
#[derive(Debug)]
pub struct PrefixIndex<T> {
    /// (IPv6?, network address, length) -> the prefix and its owner.
    by_network: BTreeMap<(bool, u128, u8), (IpNetwork, T)>,
    /// The lengths in use, per family.
    lengths: [BTreeSet<u8>; 2],
}

impl<T> Default for PrefixIndex<T> {
    fn default() -> Self {
        PrefixIndex {
            by_network: BTreeMap::new(),
            lengths: [BTreeSet::new(), BTreeSet::new()],
        }
    }
}

/// A prefix as (IPv6?, its address bits, its address width).
fn bits(net: &IpNetwork) -> (bool, u128, u8) {
    match net {
        IpNetwork::V4(n) => (false, u128::from(u32::from(n.network())), 32),
        IpNetwork::V6(n) => (true, u128::from(n.network()), 128),
    }
}

/// `addr`'s first `len` bits of `width`, the rest zero.
fn masked(addr: u128, len: u8, width: u8) -> u128 {
    let host = u32::from(width.saturating_sub(len));
    if host >= 128 {
        0
    } else {
        addr & !((1u128 << host) - 1)
    }
}

impl<T> PrefixIndex<T> {
    /// A prefix already in the index that overlaps `net` (contains it, is
    /// inside it, or equals it), with its owner.
    pub fn overlapping(&self, net: &IpNetwork) -> Option<(&IpNetwork, &T)> {
        let (v6, addr, width) = bits(net);
        let len = net.prefix();
        // One that contains `net` (or equals it).
        for &l in self.lengths[usize::from(v6)].range(..=len) {
            if let Some((p, o)) = self.by_network.get(&(v6, masked(addr, l, width), l)) {
                return Some((p, o));
            }
        }
        // One inside `net`: its network address lies in `net`'s range.
        let first = masked(addr, len, width);
        let host = u32::from(width - len.min(width));
        let last = if host >= 128 {
            u128::MAX
        } else {
            first | ((1u128 << host) - 1)
        };
        self.by_network
            .range((v6, first, 0)..=(v6, last, u8::MAX))
            .next()
            .map(|(_, (p, o))| (p, o))
    }

    pub fn insert(&mut self, net: IpNetwork, owner: T) {
        let (v6, addr, _) = bits(&net);
        self.lengths[usize::from(v6)].insert(net.prefix());
        self.by_network
            .insert((v6, addr, net.prefix()), (net, owner));
    }
}

/// First usable address of a prefix (network + 1; the address itself for
/// /32 and /128): a node's gateway in its pod CIDR.
pub fn first_host(net: IpNetwork) -> IpAddr {
    match net {
        IpNetwork::V4(n) if n.prefix() < 32 => IpAddr::V4((u32::from(n.network()) + 1).into()),
        IpNetwork::V6(n) if n.prefix() < 128 => IpAddr::V6((u128::from(n.network()) + 1).into()),
        other => other.ip(),
    }
}

/// Values with their verdicts, shared by the tests of every source: each
/// source must refuse the bad ones with the reason given here (as a
/// substring of its message) and accept the good ones.
pub mod cases {
    /// (text, reason substring) pairs that every endpoint input refuses.
    pub const BAD_ENDPOINTS: [(&str, &str); 7] = [
        ("172.28.0.12", "is not IP:PORT"),
        ("node-2.example:51820", "is not IP:PORT"),
        ("172.28.0.12:0", "has port 0"),
        ("0.0.0.0:51820", "is not a unicast address"),
        ("[::]:51820", "is not a unicast address"),
        ("224.0.0.1:51820", "is not a unicast address"),
        ("255.255.255.255:51820", "is not a unicast address"),
    ];
    /// Endpoints every input accepts.
    pub const GOOD_ENDPOINTS: [&str; 2] = ["172.28.0.12:51820", "[fd00::12]:51820"];
    /// CIDRs every input refuses.
    pub const BAD_CIDRS: [(&str, &str); 4] = [
        ("10.244.2.1/24", "has host bits set"),
        ("10.244.2.0", "has no prefix length"),
        ("10.244.2.0/33", "is not a CIDR"),
        ("ten/8", "is not a CIDR"),
    ];
    /// CIDRs every input accepts.
    pub const GOOD_CIDRS: [&str; 2] = ["10.244.2.0/24", "fd00:10:244:2::/64"];
    /// Public keys (base64) every input refuses.
    pub const BAD_KEYS: [(&str, &str); 3] = [
        ("not-a-key", "is not a key"),
        ("AAAA", "is not a key"),
        (
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "is the all-zero key",
        ),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_index_finds_what_overlaps_as_a_pass_would() {
        let nets: Vec<IpNetwork> = [
            "10.244.0.0/24",
            "10.244.1.0/24",
            "10.245.0.0/16",
            "fd00:10:244::/64",
            "fd00:10:244:1::/64",
            "192.168.7.7/32",
            "0.0.0.0/0",
            "10.244.1.128/25",
            "10.0.0.0/8",
            "fd00::/8",
            "fd00:10:244:1::/64",
            "::/0",
            "172.16.0.0/12",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let mut index = PrefixIndex::default();
        let mut seen: Vec<IpNetwork> = Vec::new();
        for (i, n) in nets.iter().enumerate() {
            let by_pass = seen.iter().any(|o| overlaps(n, o));
            let found = index.overlapping(n);
            assert_eq!(found.is_some(), by_pass, "{n} (#{i})");
            if let Some((o, _)) = found {
                assert!(overlaps(n, o), "{n} does not overlap {o}");
            } else {
                index.insert(*n, i);
                seen.push(*n);
            }
        }
        assert_eq!(seen.len(), 7, "{seen:?}");
    }

    #[test]
    fn the_shared_cases_get_their_verdicts() {
        for (t, why) in cases::BAD_ENDPOINTS {
            let e = endpoint(t).unwrap_err();
            assert!(e.to_string().contains(why), "{t}: {e}");
            assert!(
                e.to_string().contains(t),
                "{t}: the message names the value: {e}"
            );
        }
        for t in cases::GOOD_ENDPOINTS {
            endpoint(t).unwrap();
        }
        for (t, why) in cases::BAD_CIDRS {
            let e = cidr(t).unwrap_err();
            assert!(e.to_string().contains(why), "{t}: {e}");
        }
        for t in cases::GOOD_CIDRS {
            assert_eq!(cidr(t).unwrap().to_string(), t);
        }
        for (t, why) in cases::BAD_KEYS {
            let e = public_key(t).unwrap_err();
            assert!(e.to_string().contains(why), "{t}: {e}");
        }
    }

    #[test]
    fn host_bits_name_the_network_meant() {
        assert_eq!(
            cidr("10.244.2.1/24").unwrap_err().to_string(),
            "\"10.244.2.1/24\" has host bits set (did you mean 10.244.2.0/24?)"
        );
        assert_eq!(
            network("10.244.2.1/24".parse().unwrap()),
            Err("10.244.2.0/24".parse().unwrap())
        );
    }

    #[test]
    fn hex_and_base64_keys_agree() {
        let k = PublicKey::from_bytes([0x5a; 32]);
        let hex: String = k.as_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(public_key_hex(&hex).unwrap(), k);
        assert_eq!(public_key(&k.to_base64()).unwrap(), k);
        assert!(public_key_hex(&"0".repeat(64))
            .unwrap_err()
            .to_string()
            .contains("all-zero"));
        assert!(public_key_hex("zz").is_err());
    }

    #[test]
    fn gateways_and_overlaps() {
        assert_eq!(
            first_host("10.244.1.0/24".parse().unwrap()),
            "10.244.1.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            first_host("10.9.9.9/32".parse().unwrap()),
            "10.9.9.9".parse::<IpAddr>().unwrap()
        );
        let (a, b) = (
            "10.244.0.0/16".parse().unwrap(),
            "10.244.3.0/24".parse().unwrap(),
        );
        assert!(overlaps(&a, &b) && overlaps(&b, &a));
        assert!(!overlaps(&a, &"fd00::/8".parse().unwrap()));
    }
}
