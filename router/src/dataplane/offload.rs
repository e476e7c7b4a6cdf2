//! TUN offloads (`IFF_VNET_HDR`): pure functions over packets, no I/O.
//!
//! With offloads on, every TUN read and write carries a 10-byte virtio-net
//! header. Reads may hold a TCP or UDP *super-packet* (up to 64 KiB) that the
//! kernel did not segment (TSO/USO): `Gso` splits it into MTU-sized segments
//! with correct IP lengths, IDs, TCP sequence numbers, flags and full
//! checksums before encryption. Writes may carry several decrypted TCP
//! segments (or UDP datagrams) of one flow coalesced into one super-packet
//! (GRO): `Coalescer`
//! decides which packets of a batch join, `finish_group` rewrites the
//! first packet's headers, and the TUN writes the group with one `writev`.

use std::net::IpAddr;

/// Size of `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
const TCP_ACK: u8 = 0x10;
const TCP_URG: u8 = 0x20;
const TCP_CWR: u8 = 0x80;

/// The virtio-net header in front of every packet (little-endian fields,
/// as on every host tunmesh supports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b
    }
}

/// Why a packet from the TUN could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffloadError {
    /// Shorter than its headers claim.
    Truncated,
    /// Not IPv4/IPv6, or the GSO type does not match the packet.
    Mismatch,
    /// A GSO type or IPv6 extension header tunmesh does not segment.
    Unsupported,
    /// A segment does not fit the output buffer.
    TooBig,
}

/// One's complement sum of `data` as big-endian 16-bit words, added to
/// `initial`, not folded. The sum is byte-order independent (RFC 1071), so
/// the data is summed as little-endian 64-bit words, in two 32-bit halves
/// so nothing overflows (the compiler vectorises this loop), and the folded
/// result is swapped back: about three times as fast as big-endian words.
#[inline]
pub fn sum16(data: &[u8], initial: u64) -> u64 {
    let (mut lo, mut hi) = (0u64, 0u64);
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let w = u64::from_le_bytes(w);
        lo += w & 0xffff_ffff;
        hi += w >> 32;
    }
    // The remainder starts at an even offset: zero-padded, its words keep
    // their place.
    let mut tail = [0u8; 8];
    let rest = chunks.remainder();
    if let Some(t) = tail.get_mut(..rest.len()) {
        t.copy_from_slice(rest);
    }
    let w = u64::from_le_bytes(tail);
    lo += w & 0xffff_ffff;
    hi += w >> 32;
    initial + u64::from(fold(lo + hi).swap_bytes())
}

/// Folds a sum to 16 bits (not complemented).
#[inline]
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Sum of the TCP/UDP pseudo-header for an L4 length of `len`.
#[inline]
fn pseudo_sum(pkt: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
    let addrs = if v6 { pkt.get(8..40) } else { pkt.get(12..20) };
    sum16(addrs.unwrap_or(&[]), u64::from(proto) + len as u64)
}

/// Fills in a checksum the kernel left partial (`VIRTIO_NET_HDR_F_NEEDS_CSUM`):
/// the field holds the pseudo-header sum; the sum from `start` to the end is
/// complemented and stored at `start + offset`.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start + offset;
    if at + 2 > pkt.len() {
        return Err(OffloadError::Truncated);
    }
    let c = !fold(sum16(&pkt[start..], 0));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

fn ipv4_header_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = !fold(sum16(hdr, 0));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A super-packet read from the TUN, ready to be cut into segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    v6: bool,
    tcp: bool,
    l3_len: usize,
    l4_len: usize,
    mss: usize,
    payload: usize,
}

impl Gso {
    /// Checks `pkt` (after the virtio header) against `hdr`.
    pub fn new(hdr: &VnetHdr, pkt: &[u8]) -> Result<Self, OffloadError> {
        let first = *pkt.first().ok_or(OffloadError::Truncated)?;
        let (v6, l3_len, proto) = match first >> 4 {
            4 => {
                let l3 = usize::from(first & 0x0f) * 4;
                (false, l3, *pkt.get(9).ok_or(OffloadError::Truncated)?)
            }
            6 => (true, 40, *pkt.get(6).ok_or(OffloadError::Truncated)?),
            _ => return Err(OffloadError::Mismatch),
        };
        if l3_len < 20 || pkt.len() < l3_len {
            return Err(OffloadError::Truncated);
        }
        let tcp = match (hdr.gso_type & !GSO_ECN, v6, proto) {
            (GSO_TCPV4, false, 6) | (GSO_TCPV6, true, 6) => true,
            (GSO_UDP_L4, _, 17) => false,
            (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _, 0 | 43 | 44 | 60) if v6 => {
                return Err(OffloadError::Unsupported)
            }
            (GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4, _, _) => return Err(OffloadError::Mismatch),
            _ => return Err(OffloadError::Unsupported),
        };
        let l4_len = if tcp {
            usize::from(pkt.get(l3_len + 12).ok_or(OffloadError::Truncated)? >> 4) * 4
        } else {
            8
        };
        if (tcp && l4_len < 20) || pkt.len() < l3_len + l4_len {
            return Err(OffloadError::Truncated);
        }
        let mss = usize::from(hdr.gso_size);
        if mss == 0 {
            return Err(OffloadError::Mismatch);
        }
        Ok(Gso {
            v6,
            tcp,
            l3_len,
            l4_len,
            mss,
            payload: pkt.len() - l3_len - l4_len,
        })
    }

    /// How many segments the super-packet makes.
    pub fn segments(&self) -> usize {
        self.payload.div_ceil(self.mss).max(1)
    }

    /// Writes segment `i` of `pkt` into `out` and returns its length.
    pub fn segment(&self, pkt: &[u8], i: usize, out: &mut [u8]) -> Result<usize, OffloadError> {
        let hlen = self.l3_len + self.l4_len;
        let start = i * self.mss;
        let chunk = self.mss.min(self.payload.saturating_sub(start));
        let len = hlen + chunk;
        let src = pkt
            .get(hlen + start..hlen + start + chunk)
            .ok_or(OffloadError::Truncated)?;
        let out = out.get_mut(..len).ok_or(OffloadError::TooBig)?;
        out[..hlen].copy_from_slice(pkt.get(..hlen).ok_or(OffloadError::Truncated)?);
        out[hlen..].copy_from_slice(src);
        let l3 = self.l3_len;
        if self.v6 {
            out[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        } else {
            out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(i as u16);
            out[4..6].copy_from_slice(&id.to_be_bytes());
            ipv4_header_checksum(&mut out[..l3]);
        }
        let last = i + 1 == self.segments();
        let check_at = if self.tcp {
            let seq = u32::from_be_bytes([out[l3 + 4], out[l3 + 5], out[l3 + 6], out[l3 + 7]])
                .wrapping_add(start as u32);
            out[l3 + 4..l3 + 8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                out[l3 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if i != 0 {
                out[l3 + 13] &= !TCP_CWR;
            }
            l3 + 16
        } else {
            out[l3 + 4..l3 + 6].copy_from_slice(&((self.l4_len + chunk) as u16).to_be_bytes());
            l3 + 6
        };
        out[check_at] = 0;
        out[check_at + 1] = 0;
        let proto = if self.tcp { 6 } else { 17 };
        let sum = sum16(&out[l3..], pseudo_sum(out, self.v6, proto, len - l3));
        let mut c = !fold(sum);
        if !self.tcp && c == 0 {
            c = 0xffff;
        }
        out[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
        Ok(len)
    }
}

/// What the coalescer needs to know of a TCP segment or UDP datagram that
/// may join others of its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub udp: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number (0 for UDP).
    pub seq: u32,
    /// TCP flags (0 for UDP).
    pub flags: u8,
    pub l3_len: usize,
    pub l4_len: usize,
    pub payload: usize,
}

impl Seg {
    fn same_flow(&self, o: &Seg) -> bool {
        self.udp == o.udp
            && self.src == o.src
            && self.dst == o.dst
            && self.sport == o.sport
            && self.dport == o.dport
    }
}

/// A candidate for GRO: a TCP segment with data and only ACK (and maybe
/// PSH) set, or a UDP datagram with data; no IP options, fragments or IPv6
/// extension headers, lengths consistent with the buffer.
pub fn candidate(pkt: &[u8]) -> Option<Seg> {
    let (v6, l3_len, proto) = match pkt.first()? >> 4 {
        4 if pkt[0] & 0x0f == 5 => {
            // No MF flag, no fragment offset.
            if u16::from_be_bytes([*pkt.get(6)?, *pkt.get(7)?]) & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*pkt.get(2)?, *pkt.get(3)?]));
            if total != pkt.len() {
                return None;
            }
            (false, 20, *pkt.get(9)?)
        }
        6 => {
            let plen = usize::from(u16::from_be_bytes([*pkt.get(4)?, *pkt.get(5)?]));
            if plen + 40 != pkt.len() {
                return None;
            }
            (true, 40, *pkt.get(6)?)
        }
        _ => return None,
    };
    let (src, dst) = if v6 {
        let s: [u8; 16] = pkt.get(8..24)?.try_into().ok()?;
        let d: [u8; 16] = pkt.get(24..40)?.try_into().ok()?;
        (IpAddr::from(s), IpAddr::from(d))
    } else {
        let s: [u8; 4] = pkt.get(12..16)?.try_into().ok()?;
        let d: [u8; 4] = pkt.get(16..20)?.try_into().ok()?;
        (IpAddr::from(s), IpAddr::from(d))
    };
    match proto {
        6 => {
            let t = pkt.get(l3_len..l3_len + 20)?;
            let l4_len = usize::from(t[12] >> 4) * 4;
            let flags = t[13];
            if l4_len < 20 || pkt.len() <= l3_len + l4_len {
                return None;
            }
            if flags & (TCP_SYN | TCP_FIN | TCP_RST | TCP_URG | TCP_CWR | 0x40) != 0
                || flags & TCP_ACK == 0
            {
                return None;
            }
            Some(Seg {
                udp: false,
                src,
                dst,
                sport: u16::from_be_bytes([t[0], t[1]]),
                dport: u16::from_be_bytes([t[2], t[3]]),
                seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
                flags,
                l3_len,
                l4_len,
                payload: pkt.len() - l3_len - l4_len,
            })
        }
        17 => {
            let u = pkt.get(l3_len..l3_len + 8)?;
            let ulen = usize::from(u16::from_be_bytes([u[4], u[5]]));
            if ulen != pkt.len() - l3_len || ulen <= 8 {
                return None;
            }
            Some(Seg {
                udp: true,
                src,
                dst,
                sport: u16::from_be_bytes([u[0], u[1]]),
                dport: u16::from_be_bytes([u[2], u[3]]),
                seq: 0,
                flags: 0,
                l3_len,
                l4_len: 8,
                payload: ulen - 8,
            })
        }
        _ => None,
    }
}

/// Headers that must be equal for two packets to join: IPv4 TOS, DF and
/// TTL (or IPv6 traffic class, flow label and hop limit); for TCP also the
/// ACK number and the options.
fn same_headers(a: &[u8], b: &[u8], s: &Seg) -> bool {
    let l3_same = if s.l3_len == 40 {
        a.get(0..4) == b.get(0..4) && a.get(7) == b.get(7)
    } else {
        a.get(1) == b.get(1)
            && a.get(8) == b.get(8)
            && (a.get(6).map(|x| x & 0x40) == b.get(6).map(|x| x & 0x40))
    };
    let t = s.l3_len;
    l3_same
        && (s.udp
            || (a.get(t + 8..t + 12) == b.get(t + 8..t + 12)
                && a.get(t + 20..t + s.l4_len) == b.get(t + 20..t + s.l4_len)))
}

/// A run of packets of one flow that will be written as one super-packet.
#[derive(Debug, Clone, Copy)]
pub struct Group {
    /// Index of the first packet (its headers become the super-packet's).
    pub head: usize,
    /// Index of the last packet joined (for the `next` chain).
    pub tail: usize,
    pub count: usize,
    seg: Option<Seg>,
    next_seq: u32,
    gso_size: usize,
    pub total_payload: usize,
    psh: bool,
    closed: bool,
}

/// Largest super-packet the coalescer builds (IPv4 total length is 16 bits).
const MAX_SUPER: usize = 65535;
/// Most packets in one super-packet, TCP or UDP (the kernel's
/// UDP_MAX_SEGMENTS). NB: it also bounds the iovecs of one TUN write.
pub const MAX_SEGMENTS: usize = 64;

/// Groups the packets of a batch for writing: TCP segments of one flow with
/// contiguous sequence numbers and equal headers, or UDP datagrams of one
/// flow, join one group (at most `MAX_SEGMENTS`); everything else is a
/// group of one. Groups keep the order of their first packet, so
/// packets of one flow are never reordered. Reuses its vectors across batches.
#[derive(Debug, Default)]
pub struct Coalescer {
    pub groups: Vec<Group>,
    /// `next[i]`: the packet after `i` in its group.
    pub next: Vec<Option<usize>>,
}

impl Coalescer {
    pub fn clear(&mut self) {
        self.groups.clear();
        self.next.clear();
    }
}

/// Groups packets `0..n` of a batch; `pkt(i)` returns packet `i`.
pub fn coalesce<'a>(c: &mut Coalescer, n: usize, pkt: impl Fn(usize) -> &'a [u8]) {
    c.clear();
    for i in 0..n {
        c.next.push(None);
        let p = pkt(i);
        let seg = candidate(p);
        if let Some(s) = seg {
            // The newest group of this flow, if any.
            let found = c
                .groups
                .iter()
                .rposition(|g| g.seg.is_some_and(|h| h.same_flow(&s)));
            if let Some(gi) = found {
                let g = &mut c.groups[gi];
                let head = pkt(g.head);
                let fits = !g.closed
                    && (s.udp || g.next_seq == s.seq)
                    && g.count < MAX_SEGMENTS
                    && s.payload <= g.gso_size
                    && g.seg
                        .is_some_and(|h| h.l4_len == s.l4_len && h.l3_len == s.l3_len)
                    && s.l3_len + s.l4_len + g.total_payload + s.payload <= MAX_SUPER
                    && same_headers(head, p, &s);
                if fits {
                    c.next[g.tail] = Some(i);
                    g.tail = i;
                    g.count += 1;
                    g.total_payload += s.payload;
                    g.next_seq = s.seq.wrapping_add(s.payload as u32);
                    if s.flags & TCP_PSH != 0 {
                        g.psh = true;
                        g.closed = true;
                    }
                    if s.payload < g.gso_size {
                        g.closed = true;
                    }
                    continue;
                }
                // Same flow but cannot join: later packets of this flow must
                // not join the older group past this one.
                g.closed = true;
            }
        }
        c.groups.push(Group::single(i, seg));
    }
}

impl Group {
    fn single(i: usize, seg: Option<Seg>) -> Self {
        Group {
            head: i,
            tail: i,
            count: 1,
            seg,
            next_seq: seg
                .map(|s| s.seq.wrapping_add(s.payload as u32))
                .unwrap_or(0),
            gso_size: seg.map(|s| s.payload).unwrap_or(0),
            total_payload: seg.map(|s| s.payload).unwrap_or(0),
            psh: seg.is_some_and(|s| s.flags & TCP_PSH != 0),
            closed: seg.is_none_or(|s| s.flags & TCP_PSH != 0),
        }
    }
}

/// Rewrites the head packet of a group of two or more into the header of
/// the super-packet (lengths, IPv4 header checksum, PSH, the pseudo-header
/// sum in the TCP or UDP checksum field) and returns the virtio header to
/// write with it. For a group of one: the packet is left alone, header all zero.
pub fn finish_group(g: &Group, head: &mut [u8]) -> VnetHdr {
    let Some(s) = g.seg.filter(|_| g.count > 1) else {
        return VnetHdr::default();
    };
    let l3 = s.l3_len;
    let l4_total = s.l4_len + g.total_payload;
    let v6 = l3 == 40;
    if v6 {
        head[4..6].copy_from_slice(&(l4_total as u16).to_be_bytes());
    } else {
        head[2..4].copy_from_slice(&((l3 + l4_total) as u16).to_be_bytes());
        ipv4_header_checksum(&mut head[..l3]);
    }
    let (proto, check_at, gso_type) = if s.udp {
        // The UDP length covers the whole super-datagram; the kernel sets
        // each segment's own when it cuts them apart.
        head[l3 + 4..l3 + 6].copy_from_slice(&(l4_total as u16).to_be_bytes());
        (17, 6, GSO_UDP_L4)
    } else {
        if g.psh {
            head[l3 + 13] |= TCP_PSH;
        }
        (6, 16, if v6 { GSO_TCPV6 } else { GSO_TCPV4 })
    };
    let partial = fold(pseudo_sum(head, v6, proto, l4_total));
    head[l3 + check_at..l3 + check_at + 2].copy_from_slice(&partial.to_be_bytes());
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type,
        hdr_len: (l3 + s.l4_len) as u16,
        gso_size: g.gso_size as u16,
        csum_start: l3 as u16,
        csum_offset: check_at as u16,
    }
}

/// Offset of the payload of a packet in a group (headers of the head are
/// written once; members contribute only their payload).
pub fn payload_offset(g: &Group) -> usize {
    g.seg.map(|s| s.l3_len + s.l4_len).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The word-at-a-time sum agrees with 16-bit big-endian words summed one
    /// by one, for every length (odd ones included) and start offset.
    #[test]
    fn sum16_matches_word_by_word() {
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let naive = |d: &[u8], init: u64| {
            let mut acc = init;
            for w in d.chunks(2) {
                acc += u64::from(w[0]) << 8 | u64::from(w.get(1).copied().unwrap_or(0));
            }
            fold(acc)
        };
        for start in 0..9 {
            for len in 0..data.len() - start {
                let d = &data[start..start + len];
                for init in [0, 0xffff, 0x1_2345] {
                    assert_eq!(
                        fold(sum16(d, init)),
                        naive(d, init),
                        "start {start} len {len}"
                    );
                }
            }
        }
        let ones = vec![0xffu8; 70000];
        assert_eq!(fold(sum16(&ones, 0)), naive(&ones, 0));
    }

    /// Independent checker: RFC 1071 over 16-bit words, one at a time,
    /// with the pseudo-header built as bytes. Valid iff the result is 0xffff.
    fn l4_checksum_ok(pkt: &[u8]) -> bool {
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

    fn ipv4_header_ok(pkt: &[u8]) -> bool {
        let mut sum: u32 = 0;
        for w in pkt[..20].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// A TCP super-packet as the kernel hands it over with TSO: total
    /// lengths for the whole, checksum field holding the pseudo-header sum.
    fn tcp_super(v6: bool, data: &[u8], flags: u8, opts: &[u8]) -> Vec<u8> {
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

    fn udp_super(v6: bool, data: &[u8]) -> Vec<u8> {
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

    fn udp_port(mut p: Vec<u8>, sport: u16) -> Vec<u8> {
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p
    }

    fn icmp() -> Vec<u8> {
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
    fn rebuild(segs: &[Vec<u8>]) -> Vec<(VnetHdr, Vec<u8>)> {
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

    #[test]
    fn split_coalesce_split_round_trips_byte_for_byte() {
        for (v6, udp) in [(false, false), (true, false), (false, true), (true, true)] {
            let data = payload(7000, 11);
            let (sup, gso) = if udp {
                (udp_super(v6, &data), GSO_UDP_L4)
            } else {
                (
                    tcp_super(v6, &data, TCP_ACK | TCP_PSH, &TS_OPTS),
                    if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                )
            };
            let segs = split(
                VnetHdr {
                    gso_type: gso,
                    gso_size: 1300,
                    ..Default::default()
                },
                &sup,
            );
            let groups = rebuild(&segs);
            assert_eq!(groups.len(), 1, "v6={v6} udp={udp}");
            let (hdr, whole) = &groups[0];
            assert_eq!(hdr.gso_type, gso);
            let mut check = whole.clone();
            complete_checksum(
                &mut check,
                usize::from(hdr.csum_start),
                usize::from(hdr.csum_offset),
            )
            .unwrap();
            if udp {
                // The UDP length of the super-datagram covers all of it.
                let l3 = if v6 { 40 } else { 20 };
                assert_eq!(
                    usize::from(u16::from_be_bytes([check[l3 + 4], check[l3 + 5]])),
                    check.len() - l3
                );
            }
            assert!(
                l4_checksum_ok(&check),
                "v6={v6} udp={udp}: super-packet checksum"
            );
            // Cutting the super-packet again (as the kernel does on receive)
            // gives back exactly the datagrams/segments that went in.
            let again = split(*hdr, whole);
            assert_eq!(again, segs, "v6={v6} udp={udp}");
        }
    }

    fn split(hdr: VnetHdr, sup: &[u8]) -> Vec<Vec<u8>> {
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

    const TS_OPTS: [u8; 12] = [1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3];

    #[test]
    fn tcp_segmentation_v4_and_v6() {
        for v6 in [false, true] {
            let data = payload(5000, 3);
            let sup = tcp_super(v6, &data, TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR, &TS_OPTS);
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                gso_size: 1400,
                ..Default::default()
            };
            let segs = split(hdr, &sup);
            assert_eq!(segs.len(), 4);
            let l3 = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(l4_checksum_ok(s), "v6={v6} segment {i}: TCP checksum");
                if v6 {
                    assert_eq!(usize::from(u16::from_be_bytes([s[4], s[5]])), s.len() - 40);
                } else {
                    assert!(ipv4_header_ok(s), "segment {i}: IPv4 header checksum");
                    assert_eq!(usize::from(u16::from_be_bytes([s[2], s[3]])), s.len());
                    assert_eq!(
                        u16::from_be_bytes([s[4], s[5]]),
                        0x1234 + i as u16,
                        "IP ID increments"
                    );
                }
                let seq = u32::from_be_bytes(s[l3 + 4..l3 + 8].try_into().unwrap());
                assert_eq!(
                    seq,
                    0xffff_fff0u32.wrapping_add(1400 * i as u32),
                    "contiguous sequence numbers"
                );
                let flags = s[l3 + 13];
                let last = i == 3;
                assert_eq!(flags & TCP_FIN != 0, last, "FIN only on the last");
                assert_eq!(flags & TCP_PSH != 0, last, "PSH only on the last");
                assert_eq!(flags & TCP_CWR != 0, i == 0, "CWR only on the first");
                assert_eq!(&s[l3 + 20..l3 + 32], &TS_OPTS, "options copied");
                joined.extend_from_slice(&s[l3 + 32..]);
            }
            assert_eq!(joined, data);
            assert_eq!(segs[3].len(), l3 + 32 + 800);
        }
    }

    #[test]
    fn udp_segmentation_v4_and_v6() {
        for v6 in [false, true] {
            let data = payload(3000, 9);
            let sup = udp_super(v6, &data);
            let hdr = VnetHdr {
                gso_type: GSO_UDP_L4,
                gso_size: 1200,
                ..Default::default()
            };
            let segs = split(hdr, &sup);
            assert_eq!(segs.len(), 3);
            let l3 = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for s in &segs {
                assert!(l4_checksum_ok(s), "v6={v6}: UDP checksum");
                assert_eq!(
                    usize::from(u16::from_be_bytes([s[l3 + 4], s[l3 + 5]])),
                    s.len() - l3
                );
                joined.extend_from_slice(&s[l3 + 8..]);
            }
            assert_eq!(joined, data);
        }
    }

    #[test]
    fn partial_checksum_is_completed() {
        let mut p = udp_super(false, &payload(333, 1));
        let l4len = p.len() - 20;
        let partial = fold(pseudo_sum(&p, false, 17, l4len));
        p[26..28].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(&mut p, 20, 6).unwrap();
        assert!(l4_checksum_ok(&p));
        assert_eq!(
            complete_checksum(&mut p, 20, 9999),
            Err(OffloadError::Truncated)
        );
    }

    #[test]
    fn segments_coalesce_back_into_the_super_packet() {
        for v6 in [false, true] {
            let data = payload(6000, 5);
            let sup = tcp_super(v6, &data, TCP_ACK | TCP_PSH, &TS_OPTS);
            let gso = if v6 { GSO_TCPV6 } else { GSO_TCPV4 };
            let mut segs = split(
                VnetHdr {
                    gso_type: gso,
                    gso_size: 1400,
                    ..Default::default()
                },
                &sup,
            );
            let mut c = Coalescer::default();
            coalesce(&mut c, segs.len(), |i| &segs[i]);
            assert_eq!(c.groups.len(), 1, "one flow, contiguous: one group");
            let g = c.groups[0];
            assert_eq!(g.count, 5);
            let mut head = segs[0].clone();
            let hdr = finish_group(&g, &mut head);
            assert_eq!(hdr.gso_type, gso);
            assert_eq!(hdr.gso_size, 1400);
            assert_eq!(hdr.flags, F_NEEDS_CSUM);
            let l3 = if v6 { 40 } else { 20 };
            assert_eq!(usize::from(hdr.csum_start), l3);
            // Rebuild the super-packet as the TUN write would (head, then
            // each member's payload) and let "the kernel" finish the checksum.
            let mut whole = head.clone();
            let mut i = c.next[g.head];
            while let Some(k) = i {
                whole.extend_from_slice(&segs[k][payload_offset(&g)..]);
                i = c.next[k];
            }
            assert_eq!(&whole[l3 + 32..], &data[..]);
            if !v6 {
                assert!(ipv4_header_ok(&whole));
                assert_eq!(
                    usize::from(u16::from_be_bytes([whole[2], whole[3]])),
                    whole.len()
                );
            }
            assert!(
                whole[l3 + 13] & TCP_PSH != 0,
                "PSH of the last segment kept"
            );
            complete_checksum(&mut whole, l3, 16).unwrap();
            assert!(l4_checksum_ok(&whole));
            segs.clear();
        }
    }

    fn seg_with(seq_off: u32, flags: u8, sport: u16, len: usize, opts: &[u8]) -> Vec<u8> {
        let mut p = tcp_super(false, &payload(len, 1), flags, opts);
        let seq = u32::from_be_bytes(p[24..28].try_into().unwrap()).wrapping_add(seq_off);
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p
    }

    /// (name, packets, expected group sizes in order)
    type Case = (&'static str, Vec<Vec<u8>>, Vec<usize>);

    #[test]
    fn coalescing_never_merges_wrongly() {
        let a = TCP_ACK;
        let cases: Vec<Case> = vec![
            (
                "contiguous",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(100, a, 1, 100, &[]),
                    seg_with(200, a, 1, 50, &[]),
                ],
                vec![3],
            ),
            (
                "gap in sequence",
                vec![seg_with(0, a, 1, 100, &[]), seg_with(150, a, 1, 100, &[])],
                vec![1, 1],
            ),
            (
                "two flows interleaved",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(0, a, 2, 100, &[]),
                    seg_with(100, a, 1, 100, &[]),
                    seg_with(100, a, 2, 100, &[]),
                ],
                vec![2, 2],
            ),
            (
                "PSH closes the group",
                vec![
                    seg_with(0, a | TCP_PSH, 1, 100, &[]),
                    seg_with(100, a, 1, 100, &[]),
                ],
                vec![1, 1],
            ),
            (
                "FIN is never merged",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(100, a | TCP_FIN, 1, 100, &[]),
                ],
                vec![1, 1],
            ),
            (
                "RST is never merged",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(100, a | TCP_RST, 1, 100, &[]),
                ],
                vec![1, 1],
            ),
            (
                "URG is never merged",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(100, a | TCP_URG, 1, 100, &[]),
                ],
                vec![1, 1],
            ),
            (
                "SYN is never merged",
                vec![seg_with(0, TCP_SYN, 1, 100, &[])],
                vec![1],
            ),
            (
                "options differ",
                vec![
                    seg_with(0, a, 1, 100, &TS_OPTS),
                    seg_with(100, a, 1, 100, &[1, 1, 8, 10, 0, 0, 0, 10, 0, 0, 0, 3]),
                ],
                vec![1, 1],
            ),
            (
                "longer segment starts anew",
                vec![seg_with(0, a, 1, 100, &[]), seg_with(100, a, 1, 200, &[])],
                vec![1, 1],
            ),
            (
                "short segment ends the group",
                vec![
                    seg_with(0, a, 1, 100, &[]),
                    seg_with(100, a, 1, 50, &[]),
                    seg_with(150, a, 1, 100, &[]),
                ],
                vec![2, 1],
            ),
            (
                "pure ACK is not merged",
                vec![seg_with(0, a, 1, 0, &[]), seg_with(0, a, 1, 0, &[])],
                vec![1, 1],
            ),
            (
                "UDP datagrams of one flow join",
                vec![
                    udp_super(false, &payload(10, 1)),
                    udp_super(false, &payload(10, 1)),
                ],
                vec![2],
            ),
            (
                "UDP: a longer datagram starts anew",
                vec![
                    udp_super(false, &payload(10, 1)),
                    udp_super(false, &payload(20, 1)),
                ],
                vec![1, 1],
            ),
            (
                "UDP: other port, other flow",
                vec![
                    udp_super(false, &payload(10, 1)),
                    udp_port(udp_super(false, &payload(10, 1)), 9),
                    udp_super(false, &payload(10, 1)),
                ],
                vec![2, 1],
            ),
            (
                "TCP: tiny segments, at most 64 per super-packet",
                (0..65).map(|k| seg_with(k, a, 1, 1, &[])).collect(),
                vec![64, 1],
            ),
            (
                "UDP: at most 64 per super-packet",
                (0..65).map(|_| udp_super(false, &payload(10, 1))).collect(),
                vec![64, 1],
            ),
            ("neither TCP nor UDP", vec![icmp(), icmp()], vec![1, 1]),
        ];
        for (name, pkts, want) in cases {
            let mut c = Coalescer::default();
            coalesce(&mut c, pkts.len(), |i| &pkts[i]);
            let got: Vec<usize> = c.groups.iter().map(|g| g.count).collect();
            assert_eq!(got, want, "{name}");
            // Order within each flow is kept: heads come in increasing order.
            assert!(c.groups.windows(2).all(|w| w[0].head < w[1].head), "{name}");
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u64 = 0x1234_5678;
        let mut out = vec![0u8; 2048];
        for n in 0..20_000usize {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x as usize) % 300;
            let mut p: Vec<u8> = (0..len).map(|i| (x >> (i % 56)) as u8).collect();
            if let Some(b) = p.first_mut() {
                *b = if n % 2 == 0 { 0x45 } else { 0x60 };
            }
            let hdr = VnetHdr {
                gso_type: [GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, 3][n % 4],
                gso_size: (x % 1500) as u16,
                ..Default::default()
            };
            if let Ok(g) = Gso::new(&hdr, &p) {
                for i in 0..g.segments().min(4) {
                    let _ = g.segment(&p, i, &mut out);
                }
            }
            let _ = candidate(&p);
            let _ = complete_checksum(&mut p, (x % 64) as usize, (x % 20) as usize);
            let pkts = [p.clone(), p.clone()];
            let mut c = Coalescer::default();
            coalesce(&mut c, 2, |i| &pkts[i]);
        }
    }
}
