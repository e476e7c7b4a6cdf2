//! Coalescing: decrypted TCP segments (or UDP datagrams) of one flow that
//! follow each other are grouped, the group's first packet gets the
//! headers of the whole, and the TUN writes the group with one `writev`.

use std::net::IpAddr;

use super::vnet::*;

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
    use super::super::testutil::*;
    use super::*;

    /// (name, packets, expected group sizes in order)
    type Case = (&'static str, Vec<Vec<u8>>, Vec<usize>);

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
}
