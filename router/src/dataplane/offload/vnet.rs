//! The virtio-net header that prefixes every TUN read and write with
//! offloads on, and the Internet checksum: the word-at-a-time sum, folding,
//! the pseudo-header, and completing a checksum the kernel left partial.

/// Size of `struct virtio_net_hdr` (no `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

// TCP flags the segmentation and coalescing rules look at.
pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_RST: u8 = 0x04;
pub(super) const TCP_PSH: u8 = 0x08;
pub(super) const TCP_ACK: u8 = 0x10;
pub(super) const TCP_URG: u8 = 0x20;
pub(super) const TCP_CWR: u8 = 0x80;

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
pub(super) fn pseudo_sum(pkt: &[u8], v6: bool, proto: u8, len: usize) -> u64 {
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

pub(super) fn ipv4_header_checksum(hdr: &mut [u8]) {
    hdr[10] = 0;
    hdr[11] = 0;
    let c = !fold(sum16(hdr, 0));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

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
}
