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
}
