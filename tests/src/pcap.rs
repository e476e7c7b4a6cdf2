//! Just enough of the classic pcap format (as `tcpdump -w` writes it on an
//! Ethernet link) to check what crossed the underlay.

use anyhow::{bail, Result};

/// What one captured frame carried, as far as the checks need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// UDP over IPv4 or IPv6, with ports and the frame's length (a GSO
    /// super-datagram crossing a veth is one frame holding many datagrams).
    Udp {
        src_port: u16,
        dst_port: u16,
        bytes: usize,
    },
    /// IGMP, or IPv6 neighbour discovery, router solicitation or MLD:
    /// multicast and neighbour housekeeping of the link itself.
    LinkHousekeeping,
    /// ARP: link housekeeping.
    Arp,
    /// Any other IP packet: protocol number.
    OtherIp(u8),
    /// Any other ethertype.
    Other(u16),
}

/// Splits a pcap file into its frames (little- or big-endian, micro- or
/// nanosecond variants, Ethernet link type).
pub fn raw_frames(data: &[u8]) -> Result<Vec<&[u8]>> {
    if data.len() < 24 {
        bail!("pcap file too short ({} bytes)", data.len());
    }
    let magic = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        m => bail!("not a pcap file (magic {m:#x})"),
    };
    let u32_at = |b: &[u8], o: usize| -> u32 {
        let a = [b[o], b[o + 1], b[o + 2], b[o + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = u32_at(data, 20);
    if linktype != 1 {
        bail!("pcap link type {linktype} is not Ethernet");
    }
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32_at(data, off + 8) as usize;
        let start = off + 16;
        let Some(frame) = data.get(start..start + incl) else {
            break; // truncated last record (capture stopped mid-write)
        };
        out.push(frame);
        off = start + incl;
    }
    Ok(out)
}

/// Parses a pcap file into frames (see `raw_frames`) and classifies them.
pub fn frames(data: &[u8]) -> Result<Vec<Frame>> {
    Ok(raw_frames(data)?.into_iter().map(classify).collect())
}

/// One UDP-over-IPv4 datagram from a capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpDatagram {
    pub src: std::net::SocketAddrV4,
    pub dst: std::net::SocketAddrV4,
    pub payload: Vec<u8>,
}

/// The UDP-over-IPv4 datagrams of a capture whose IP and UDP lengths agree
/// with the frame (single datagrams, not GSO super-frames).
pub fn udp4_datagrams(data: &[u8]) -> Result<Vec<UdpDatagram>> {
    let mut out = Vec::new();
    for f in raw_frames(data)? {
        let Some(ip) = f.get(14..) else { continue };
        if f.len() < 34 || u16::from_be_bytes([f[12], f[13]]) != 0x0800 || ip[9] != 17 {
            continue;
        }
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let Some(udp) = ip.get(ihl..total.min(ip.len())) else {
            continue;
        };
        if udp.len() < 8 || usize::from(u16::from_be_bytes([udp[4], udp[5]])) != udp.len() {
            continue;
        }
        let addr = |o: usize, p: usize| {
            std::net::SocketAddrV4::new(
                std::net::Ipv4Addr::new(ip[o], ip[o + 1], ip[o + 2], ip[o + 3]),
                u16::from_be_bytes([udp[p], udp[p + 1]]),
            )
        };
        out.push(UdpDatagram {
            src: addr(12, 0),
            dst: addr(16, 2),
            payload: udp[8..].to_vec(),
        });
    }
    Ok(out)
}

fn classify(f: &[u8]) -> Frame {
    if f.len() < 14 {
        return Frame::Other(0);
    }
    let ethertype = u16::from_be_bytes([f[12], f[13]]);
    let ip = &f[14..];
    match ethertype {
        0x0806 => Frame::Arp,
        0x0800 if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let proto = ip[9];
            match (proto, ip.get(ihl..ihl + 4)) {
                (17, Some(p)) => Frame::Udp {
                    src_port: u16::from_be_bytes([p[0], p[1]]),
                    dst_port: u16::from_be_bytes([p[2], p[3]]),
                    bytes: f.len(),
                },
                (2, _) => Frame::LinkHousekeeping,
                _ => Frame::OtherIp(proto),
            }
        }
        0x86dd if ip.len() >= 40 => {
            let mut next = ip[6];
            let mut off = 40;
            // Hop-by-hop options (MLD carries a router-alert option).
            if next == 0 {
                if let (Some(&nh), Some(&len)) = (ip.get(off), ip.get(off + 1)) {
                    next = nh;
                    off += (usize::from(len) + 1) * 8;
                }
            }
            match (next, ip.get(off..off + 4)) {
                (17, Some(p)) => Frame::Udp {
                    src_port: u16::from_be_bytes([p[0], p[1]]),
                    dst_port: u16::from_be_bytes([p[2], p[3]]),
                    bytes: f.len(),
                },
                (58, Some(p)) if (130..=143).contains(&p[0]) => Frame::LinkHousekeeping,
                _ => Frame::OtherIp(next),
            }
        }
        other => Frame::Other(other),
    }
}

/// True when `needle` occurs anywhere in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// A tcpdump capture of the underlay bridge while `traffic` runs. After the
/// traffic, waits until `done` holds for the capture so far (or its size
/// stops changing), so that stopping tcpdump loses nothing.
pub fn capture_underlay(
    lab: &crate::lab::Lab,
    traffic: impl FnOnce(),
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    capture_bridge(&lab.state.underlay_ns, &lab.state.dir, traffic, done)
}

/// `capture_underlay` for code that needs the lab mutably meanwhile: the
/// underlay namespace and a directory for the capture file.
pub fn capture_bridge(
    underlay_ns: &str,
    dir: &std::path::Path,
    traffic: impl FnOnce(),
    done: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    let file = dir.join(format!("underlay-{}.pcap", crate::netns::run_id()));
    let log = file.with_extension("log");
    let f = file.display().to_string();
    let mut dump = crate::netns::spawn(
        underlay_ns,
        std::path::Path::new("tcpdump"),
        &[
            "-i",
            "br0",
            "-n",
            "-U",
            "--immediate-mode",
            "-s",
            "0",
            "-w",
            &f,
        ],
        &[],
        &log,
    )
    .expect("start tcpdump");
    let listening = crate::netns::wait_for(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.contains("listening on"))
            .map(|_| ())
    });
    assert!(
        listening.is_some(),
        "tcpdump did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    traffic();
    // Immediate mode hands packets over at once; then wait until the file
    // stops growing for half a second, or `done` says everything is there.
    let (mut last, mut since) = (0, std::time::Instant::now());
    let _ = crate::netns::wait_for(std::time::Duration::from_secs(10), || {
        let data = std::fs::read(&file).unwrap_or_default();
        if data.len() != last {
            (last, since) = (data.len(), std::time::Instant::now());
        }
        (done(&data) || since.elapsed() >= std::time::Duration::from_millis(500)).then_some(())
    });
    // SIGINT makes tcpdump flush and exit.
    // SAFETY: signalling the tcpdump process this test started.
    unsafe { libc::kill(dump.id() as libc::pid_t, libc::SIGINT) };
    let _ = dump.wait();
    std::fs::read(&file).expect("read capture")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_with(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
        v.extend_from_slice(&[2, 0, 4, 0]);
        v.extend_from_slice(&[0; 8]);
        v.extend_from_slice(&65535u32.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        for f in frames {
            v.extend_from_slice(&[0; 8]);
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(&(f.len() as u32).to_le_bytes());
            v.extend_from_slice(f);
        }
        v
    }

    #[test]
    fn classifies_udp_tcp_and_arp() {
        let mut udp = vec![0u8; 14 + 28];
        udp[12..14].copy_from_slice(&[0x08, 0x00]);
        udp[14] = 0x45;
        udp[14 + 9] = 17;
        udp[34..36].copy_from_slice(&51820u16.to_be_bytes());
        udp[36..38].copy_from_slice(&51820u16.to_be_bytes());
        let mut tcp = udp.clone();
        tcp[14 + 9] = 6;
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let f = frames(&pcap_with(&[udp, tcp, arp])).unwrap();
        assert_eq!(
            f,
            vec![
                Frame::Udp {
                    src_port: 51820,
                    dst_port: 51820,
                    bytes: 42
                },
                Frame::OtherIp(6),
                Frame::Arp
            ]
        );
    }

    #[test]
    fn rejects_non_pcap() {
        assert!(frames(b"definitely not a capture file").is_err());
    }
}
