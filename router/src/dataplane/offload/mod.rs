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
//!
//! - `vnet`: the virtio-net header and checksums (the word-at-a-time sum,
//!   folding, completing a partial checksum the kernel left);
//! - `gso`: segmentation of a TSO/USO super-packet read from the TUN;
//! - `gro`: coalescing decrypted segments of one flow for one TUN write.

mod gro;
mod gso;
#[cfg(test)]
mod testutil;
mod vnet;

pub use gro::{
    candidate, coalesce, finish_group, payload_offset, Coalescer, Group, Seg, MAX_SEGMENTS,
};
pub use gso::Gso;
pub use vnet::{
    complete_checksum, fold, sum16, OffloadError, VnetHdr, F_NEEDS_CSUM, GSO_ECN, GSO_NONE,
    GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4, VNET_HDR_LEN,
};

#[cfg(test)]
mod tests {
    use super::*;

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
