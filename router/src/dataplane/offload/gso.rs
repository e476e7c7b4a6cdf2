//! Segmentation: a TCP or UDP super-packet (TSO/USO, up to 64 KiB) read
//! from the TUN is cut into MTU-sized segments with correct IP lengths and
//! IDs, TCP sequence numbers and flags, and full checksums, before
//! encryption.

use super::vnet::*;

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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;

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
}
