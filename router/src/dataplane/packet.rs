//! Pure helpers over raw IP packets: no I/O, no allocation, never panic on
//! short or malformed input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The destination address of an IPv4 or IPv6 packet, or `None` when the
/// buffer is too short or not an IP packet.
#[inline]
pub fn dst_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let b: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// The source address of an IPv4 or IPv6 packet.
#[inline]
pub fn src_addr(pkt: &[u8]) -> Option<IpAddr> {
    match pkt.first()? >> 4 {
        4 => {
            let b: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Internet checksum (RFC 1071) over `data`, folded and complemented.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an IPv4 ICMP echo request (for tests and probes) into `buf`,
/// returning its length.
pub fn icmpv4_echo(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Option<usize> {
    let len = 20 + 8 + payload.len();
    let pkt = buf.get_mut(..len)?;
    pkt.fill(0);
    pkt[0] = 0x45;
    pkt[2..4].copy_from_slice(&u16::try_from(len).ok()?.to_be_bytes());
    pkt[8] = 64;
    pkt[9] = 1;
    pkt[12..16].copy_from_slice(&src.octets());
    pkt[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&pkt[..20]);
    pkt[10..12].copy_from_slice(&c.to_be_bytes());
    pkt[20] = 8;
    pkt[24..26].copy_from_slice(&id.to_be_bytes());
    pkt[26..28].copy_from_slice(&seq.to_be_bytes());
    pkt[28..].copy_from_slice(payload);
    let c = checksum(&pkt[20..]);
    pkt[22..24].copy_from_slice(&c.to_be_bytes());
    Some(len)
}

/// What a packet too big for its peer's path gets back (RFC 792, RFC 4443).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TooBig {
    /// Send it anyway: IPv4 without DF (the outer datagram is fragmented),
    /// or too small to be refused (IPv6's minimum MTU).
    Pass,
    /// Drop it without a reply: a fragment past the first, or an ICMP
    /// error itself (never answered with an error).
    Silent,
    /// Drop it and answer with this many bytes of ICMP written.
    Reply(usize),
}

/// Bytes of the offending packet an ICMPv4 error quotes (the reply stays
/// within 576 bytes, as RFC 1812 has it).
const QUOTE_V4: usize = 576 - 28;
/// The IPv6 minimum MTU: a packet no larger is never refused, and an
/// ICMPv6 error fits in it.
pub const IPV6_MIN_MTU: usize = 1280;

/// For a packet longer than `mtu`: the ICMP "fragmentation needed" (IPv4,
/// DF set) or "packet too big" (IPv6) reply into `out`, from `gw4`/`gw6`
/// (this node's gateway on the pod network) to the packet's source, with
/// `mtu` as the next-hop MTU. No allocation.
pub fn too_big(
    pkt: &[u8],
    mtu: usize,
    gw4: Option<Ipv4Addr>,
    gw6: Option<Ipv6Addr>,
    out: &mut [u8],
) -> TooBig {
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => {
            let df = pkt[6] & 0x40 != 0;
            let frag_offset = u16::from_be_bytes([pkt[6] & 0x1f, pkt[7]]);
            if !df {
                return TooBig::Pass;
            }
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            // ICMP errors (not echo, not echo reply, not info) get none.
            let icmp_error =
                pkt[9] == 1 && pkt.get(ihl).is_some_and(|t| !matches!(t, 0 | 8 | 13 | 14));
            let Some(gw) = gw4 else { return TooBig::Silent };
            if frag_offset != 0 || icmp_error {
                return TooBig::Silent;
            }
            let quote = pkt.len().min(QUOTE_V4);
            let len = 28 + quote;
            let Some(r) = out.get_mut(..len) else {
                return TooBig::Silent;
            };
            r.fill(0);
            r[0] = 0x45;
            r[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            r[8] = 64;
            r[9] = 1;
            r[12..16].copy_from_slice(&gw.octets());
            r[16..20].copy_from_slice(&pkt[12..16]);
            let c = checksum(&r[..20]);
            r[10..12].copy_from_slice(&c.to_be_bytes());
            r[20] = 3; // destination unreachable
            r[21] = 4; // fragmentation needed and DF set
            r[26..28].copy_from_slice(&(mtu.min(0xffff) as u16).to_be_bytes());
            r[28..].copy_from_slice(&pkt[..quote]);
            let c = checksum(&r[20..]);
            r[22..24].copy_from_slice(&c.to_be_bytes());
            TooBig::Reply(len)
        }
        Some(6) if pkt.len() >= 40 => {
            if pkt.len() <= IPV6_MIN_MTU {
                return TooBig::Pass;
            }
            // ICMPv6 errors (types below 128) get none.
            if pkt[6] == 58 && pkt.get(40).is_some_and(|t| *t < 128) {
                return TooBig::Silent;
            }
            let Some(gw) = gw6 else { return TooBig::Silent };
            let quote = pkt.len().min(IPV6_MIN_MTU - 48);
            let len = 48 + quote;
            let Some(r) = out.get_mut(..len) else {
                return TooBig::Silent;
            };
            r.fill(0);
            r[0] = 0x60;
            r[4..6].copy_from_slice(&((8 + quote) as u16).to_be_bytes());
            r[6] = 58;
            r[7] = 64;
            r[8..24].copy_from_slice(&gw.octets());
            r[24..40].copy_from_slice(&pkt[8..24]);
            r[40] = 2; // packet too big
            r[44..48].copy_from_slice(&(mtu.max(IPV6_MIN_MTU) as u32).to_be_bytes());
            r[48..].copy_from_slice(&pkt[..quote]);
            let c = icmpv6_checksum(r);
            r[42..44].copy_from_slice(&c.to_be_bytes());
            TooBig::Reply(len)
        }
        _ => TooBig::Silent,
    }
}

/// The ICMPv6 checksum of the message in IPv6 packet `p` (RFC 4443 2.3:
/// over the pseudo-header and the message, checksum field zero).
fn icmpv6_checksum(p: &[u8]) -> u16 {
    let body = p.get(40..).unwrap_or(&[]);
    let mut sum: u32 = 0;
    let mut add = |d: &[u8]| {
        let mut c = d.chunks_exact(2);
        for w in &mut c {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = c.remainder() {
            sum += u32::from(*last) << 8;
        }
    };
    add(p.get(8..40).unwrap_or(&[]));
    add(&(body.len() as u32).to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(body);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_v4_and_v6() {
        let mut b = [0u8; 64];
        let n = icmpv4_echo(
            &mut b,
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            1,
            1,
            b"hi",
        )
        .unwrap();
        assert_eq!(dst_addr(&b[..n]), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(src_addr(&b[..n]), Some("10.0.0.1".parse().unwrap()));
        assert_eq!(checksum(&b[..20]), 0, "header checksum verifies");
        let mut v6 = [0u8; 40];
        v6[0] = 0x60;
        v6[8..24].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(dst_addr(&v6), Some("fd00::2".parse().unwrap()));
        assert_eq!(src_addr(&v6), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn short_or_foreign_input_is_none() {
        for b in [
            &[][..],
            &[0x45][..],
            &[0x45; 19][..],
            &[0x60; 39][..],
            &[0x10; 60][..],
        ] {
            assert_eq!(dst_addr(b), None);
        }
    }

    #[test]
    fn too_big_replies_are_well_formed() {
        let gw4 = Ipv4Addr::new(10, 244, 1, 1);
        let gw6: Ipv6Addr = "fd00:10:244:1::1".parse().unwrap();
        let mut big = vec![0u8; 1400];
        let mut out = [0u8; 1500];
        // IPv4, DF set: fragmentation needed, next-hop MTU 1320.
        icmpv4_echo(
            &mut big,
            Ipv4Addr::new(10, 244, 1, 5),
            Ipv4Addr::new(10, 244, 3, 5),
            1,
            1,
            &[7; 1372],
        )
        .unwrap();
        big[6] = 0x40;
        let TooBig::Reply(n) = too_big(&big, 1320, Some(gw4), Some(gw6), &mut out) else {
            panic!("no reply")
        };
        let r = &out[..n];
        assert_eq!(n, 576);
        assert_eq!(checksum(&r[..20]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&r[20..]), 0, "ICMP checksum");
        assert_eq!(src_addr(r), Some(IpAddr::V4(gw4)));
        assert_eq!(dst_addr(r), Some("10.244.1.5".parse().unwrap()));
        assert_eq!((r[20], r[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([r[26], r[27]]), 1320);
        // Without DF it passes (fragmented outside); a later fragment and an
        // ICMP error get nothing.
        big[6] = 0;
        assert_eq!(too_big(&big, 1320, Some(gw4), None, &mut out), TooBig::Pass);
        big[6] = 0x40;
        big[7] = 1;
        assert_eq!(
            too_big(&big, 1320, Some(gw4), None, &mut out),
            TooBig::Silent
        );
        big[7] = 0;
        big[20] = 3;
        assert_eq!(
            too_big(&big, 1320, Some(gw4), None, &mut out),
            TooBig::Silent
        );
        // IPv6: packet too big, checksum right (verified by summing with
        // the pseudo-header again).
        let mut v6 = vec![0u8; 1400];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[8..24].copy_from_slice(&"fd00:10:244:1::5".parse::<Ipv6Addr>().unwrap().octets());
        v6[24..40].copy_from_slice(&"fd00:10:244:3::5".parse::<Ipv6Addr>().unwrap().octets());
        let TooBig::Reply(n) = too_big(&v6, 1300, Some(gw4), Some(gw6), &mut out) else {
            panic!("no reply")
        };
        let r = &out[..n];
        assert_eq!(n, 1280);
        assert_eq!(
            icmpv6_checksum(r),
            0,
            "a message with its checksum sums to zero"
        );
        assert_eq!(r[40], 2);
        assert_eq!(u32::from_be_bytes([r[44], r[45], r[46], r[47]]), 1300);
        assert_eq!(dst_addr(r), Some("fd00:10:244:1::5".parse().unwrap()));
        // At or under IPv6's minimum MTU: never refused.
        assert_eq!(
            too_big(&v6[..1280], 1200, None, Some(gw6), &mut out),
            TooBig::Pass
        );
    }
}
