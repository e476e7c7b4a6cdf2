//! Packet builders and independent checks shared by the offload tests.

use super::vnet::*;
use super::*;

/// Independent checker: RFC 1071 over 16-bit words, one at a time,
/// with the pseudo-header built as bytes. Valid iff the result is 0xffff.
pub fn l4_checksum_ok(pkt: &[u8]) -> bool {
    let v6 = pkt[0] >> 4 == 6;
    let (l3, proto, src, dst) = if v6 {
        (40, pkt[6], &pkt[8..24], &pkt[24..40])
    } else {
        (
            usize::from(pkt[0] & 15) * 4,
            pkt[9],
            &pkt[12..16],
            &pkt[16..20],
        )
    };
    let l4 = &pkt[l3..];
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    if v6 {
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    }
    let mut all = pseudo;
    all.extend_from_slice(l4);
    if all.len() % 2 == 1 {
        all.push(0);
    }
    let mut sum: u32 = 0;
    for w in all.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

pub fn ipv4_header_ok(pkt: &[u8]) -> bool {
    let mut sum: u32 = 0;
    for w in pkt[..20].chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}

pub fn payload(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A TCP super-packet as the kernel hands it over with TSO: total
/// lengths for the whole, checksum field holding the pseudo-header sum.
pub fn tcp_super(v6: bool, data: &[u8], flags: u8, opts: &[u8]) -> Vec<u8> {
    let l4 = 20 + opts.len();
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&((l4 + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(
            &"fd00:10:244:1::11"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        p.extend_from_slice(
            &"fd00:10:244:2::11"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
    } else {
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&((20 + l4 + data.len()) as u16).to_be_bytes());
        p.extend_from_slice(&[
            0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 244, 1, 11, 10, 244, 2, 11,
        ]);
    }
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&5201u16.to_be_bytes());
    p.extend_from_slice(&0xffff_fff0u32.to_be_bytes()); // wraps inside the packet
    p.extend_from_slice(&7u32.to_be_bytes());
    p.push(((l4 / 4) as u8) << 4);
    p.push(flags);
    p.extend_from_slice(&[0x01, 0xf6, 0, 0, 0, 0]);
    p.extend_from_slice(opts);
    p.extend_from_slice(data);
    p
}

pub fn udp_super(v6: bool, data: &[u8]) -> Vec<u8> {
    let mut p = tcp_super(v6, &[], TCP_ACK, &[]);
    let l3 = if v6 { 40 } else { 20 };
    p.truncate(l3);
    if v6 {
        p[6] = 17;
        p[4..6].copy_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    } else {
        p[9] = 17;
        p[2..4].copy_from_slice(&((28 + data.len()) as u16).to_be_bytes());
    }
    p.extend_from_slice(&[0x9c, 0x40, 0x14, 0x51]);
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

pub fn udp_port(mut p: Vec<u8>, sport: u16) -> Vec<u8> {
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p
}

pub fn icmp() -> Vec<u8> {
    let mut b = vec![0u8; 60];
    let n = crate::dataplane::packet::icmpv4_echo(
        &mut b,
        [10, 0, 0, 1].into(),
        [10, 0, 0, 2].into(),
        1,
        1,
        b"x",
    )
    .unwrap();
    b.truncate(n);
    b
}

/// Coalesces `segs` into groups and rebuilds each super-packet as the
/// TUN write would (virtio header, head, members' payloads).
pub fn rebuild(segs: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
    let mut c = Coalescer::default();
    coalesce(&mut c, segs.len(), |i| &segs[i]);
    c.groups
        .iter()
        .map(|g| {
            let mut whole = segs[g.head].clone();
            let hdr = finish_group(g, &mut whole);
            let mut i = c.next[g.head];
            while let Some(k) = i {
                whole.extend_from_slice(&segs[k][payload_offset(g)..]);
                i = c.next[k];
            }
            (hdr, whole)
        })
        .collect()
}

pub fn split(hdr: VnetHdr, sup: &[u8]) -> Vec<Vec<u8>> {
    let g = Gso::new(&hdr, sup).unwrap();
    (0..g.segments())
        .map(|i| {
            let mut out = vec![0u8; 2000];
            let n = g.segment(sup, i, &mut out).unwrap();
            out.truncate(n);
            out
        })
        .collect()
}

pub const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3];

pub fn seg_with(seq_off: u32, flags: u8, sport: u16, len: usize, opts: &[u8]) -> Vec<u8> {
    let mut p = tcp_super(false, &payload(len, 1), flags, opts);
    let seq = u32::from_be_bytes(p[24..28].try_into().unwrap()).wrapping_add(seq_off);
    p[24..28].copy_from_slice(&seq.to_be_bytes());
    p[20..22].copy_from_slice(&sport.to_be_bytes());
    p
}
