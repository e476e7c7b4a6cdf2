//! The real TUN device (created with tun-rs; see docs/architecture.md's Choices for why), read and
//! written in batches.
//!
//! With offloads (`IFF_VNET_HDR` + `TUNSETOFFLOAD` CSUM/TSO4/TSO6/USO4/USO6),
//! a read may return a 64 KiB TCP or UDP super-packet: it is cut into
//! MTU-sized segments here (`offload::Gso`), so the engine only ever sees
//! plain packets. A super-packet that does not fit the batch stays pending
//! and continues into the next batch. On write, TCP segments (and UDP
//! datagrams) of one flow are coalesced (`offload::coalesce`) and written as one super-packet with one
//! `writev` (head packet, then the members' payloads: no copy).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use std::os::fd::{FromRawFd as _, IntoRawFd as _, OwnedFd};
use tun_rs::{DeviceBuilder, SyncDevice};

use super::io::{Batch, TunIo, BATCH};
use super::offload::{self, Coalescer, Gso, VnetHdr, F_NEEDS_CSUM, GSO_NONE, VNET_HDR_LEN};
use super::poll_readable;

const UNSPECIFIED: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// Largest read from an offloading TUN: a 64 KiB super-packet and its header.
const SUPER_BUF: usize = 65536 + VNET_HDR_LEN;

/// Read-side state: the last read and the super-packet being cut up.
struct Rx {
    buf: Vec<u8>,
    len: usize,
    pending: Option<(Gso, usize)>,
}

pub struct TunDevice {
    /// The queue's descriptor (IFF_NO_PI; IFF_VNET_HDR when `offload`).
    fd: OwnedFd,
    name: String,
    offload: bool,
    rx: Mutex<Rx>,
    tx: Mutex<Coalescer>,
    malformed: AtomicU64,
    stats: OffloadCounters,
    /// Packets this queue handed to the engine and wrote to the kernel.
    packets_read: AtomicU64,
    packets_written: AtomicU64,
}

/// What the offloads did, for the status snapshot.
#[derive(Debug, Default)]
struct OffloadCounters {
    super_packets_read: AtomicU64,
    segments_cut: AtomicU64,
    tcp_writes_coalesced: AtomicU64,
    udp_writes_coalesced: AtomicU64,
    packets_coalesced: AtomicU64,
}

/// A copy of the offload counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OffloadStats {
    /// TSO/USO super-packets read from the TUN and cut into segments.
    pub super_packets_read: u64,
    pub segments_cut: u64,
    /// TUN writes that carried several TCP segments / UDP datagrams.
    pub tcp_writes_coalesced: u64,
    pub udp_writes_coalesced: u64,
    /// Packets that went out inside those writes.
    pub packets_coalesced: u64,
}

impl std::iter::Sum for OffloadStats {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(OffloadStats::default(), |a, b| OffloadStats {
            super_packets_read: a.super_packets_read + b.super_packets_read,
            segments_cut: a.segments_cut + b.segments_cut,
            tcp_writes_coalesced: a.tcp_writes_coalesced + b.tcp_writes_coalesced,
            udp_writes_coalesced: a.udp_writes_coalesced + b.udp_writes_coalesced,
            packets_coalesced: a.packets_coalesced + b.packets_coalesced,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TunDevice {
    /// Creates (or, after a restart, re-creates) the TUN device `name` with
    /// `mtu` and `queues` queues (`IFF_MULTI_QUEUE` when more than one): each
    /// queue is a file descriptor of its own, read and written by its own
    /// worker. The kernel sends a flow's packets to the queue its incoming
    /// packets were written on (else picks one by the flow's hash), so a
    /// flow's packets are never reordered. With `offload`, asks for virtio
    /// headers and TSO/USO; if the kernel refuses, falls back to plain
    /// packets (see `offload()`).
    pub fn create_queues(
        name: &str,
        mtu: u16,
        offload: bool,
        queues: usize,
    ) -> io::Result<Vec<Self>> {
        let multi = queues > 1;
        let build = |offload: bool| {
            let mut b = DeviceBuilder::new().name(name).mtu(mtu);
            if multi {
                b = b.multi_queue(true);
            }
            if offload {
                b = b.offload(true);
            }
            b.build_sync()
        };
        let (first, offload) = match offload {
            true => match build(true) {
                Ok(d) => (d, true),
                Err(e) => {
                    tracing::warn!(error = %e, "TUN offloads refused; using plain packets");
                    (build(false)?, false)
                }
            },
            false => (build(false)?, false),
        };
        let mut devs = Vec::with_capacity(queues.max(1));
        for _ in 1..queues.max(1) {
            devs.push(first.try_clone()?);
        }
        devs.insert(0, first);
        devs.into_iter()
            .map(|dev| Self::wrap(dev, name, offload))
            .collect()
    }

    fn wrap(dev: SyncDevice, name: &str, offload: bool) -> io::Result<Self> {
        dev.set_nonblocking(true)?;
        // SAFETY: into_raw_fd gives up the descriptor; we are its only owner.
        let fd = unsafe { OwnedFd::from_raw_fd(dev.into_raw_fd()) };
        Ok(Self::from_fd(fd, name, offload))
    }

    /// A queue of an existing device, from its descriptor (a handover): the
    /// descriptor must have been opened as `TunDevice` opens one (IFF_NO_PI,
    /// IFF_VNET_HDR exactly when `offload`). It is made non-blocking.
    pub fn adopt(fd: OwnedFd, name: &str, offload: bool) -> io::Result<Self> {
        // SAFETY: fcntl on a descriptor we own, no memory arguments.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        // SAFETY: as above.
        if flags < 0
            || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(Self::from_fd(fd, name, offload))
    }

    fn from_fd(fd: OwnedFd, name: &str, offload: bool) -> Self {
        TunDevice {
            fd,
            name: name.to_string(),
            offload,
            rx: Mutex::new(Rx {
                buf: if offload {
                    vec![0u8; SUPER_BUF]
                } else {
                    Vec::new()
                },
                len: 0,
                pending: None,
            }),
            tx: Mutex::new(Coalescer {
                groups: Vec::with_capacity(BATCH),
                next: Vec::with_capacity(BATCH),
            }),
            malformed: AtomicU64::new(0),
            stats: OffloadCounters::default(),
            packets_read: AtomicU64::new(0),
            packets_written: AtomicU64::new(0),
        }
    }

    /// The queue's descriptor, to hand over to a successor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    pub fn offload_stats(&self) -> OffloadStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        OffloadStats {
            super_packets_read: l(&self.stats.super_packets_read),
            segments_cut: l(&self.stats.segments_cut),
            tcp_writes_coalesced: l(&self.stats.tcp_writes_coalesced),
            udp_writes_coalesced: l(&self.stats.udp_writes_coalesced),
            packets_coalesced: l(&self.stats.packets_coalesced),
        }
    }

    /// (packets read, packets written) on this queue.
    pub fn packet_counts(&self) -> (u64, u64) {
        (
            self.packets_read.load(Ordering::Relaxed),
            self.packets_written.load(Ordering::Relaxed),
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether virtio headers (TSO/USO, GRO) are in use.
    pub fn offload(&self) -> bool {
        self.offload
    }

    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Cuts the pending super-packet into free slots of `batch`.
    fn drain_pending(&self, rx: &mut Rx, batch: &mut Batch) {
        while let Some((gso, i)) = rx.pending {
            let Some(slot) = batch.bufs.get_mut(batch.n) else {
                return;
            };
            let pkt = rx.buf.get(VNET_HDR_LEN..rx.len).unwrap_or(&[]);
            match gso.segment(pkt, i, slot) {
                Ok(len) => {
                    batch.commit(len, UNSPECIFIED);
                }
                Err(e) => {
                    tracing::debug!(error = ?e, "cannot cut segment");
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            rx.pending = (i + 1 < gso.segments()).then_some((gso, i + 1));
        }
    }

    fn recv_offload(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        let mut rx = lock(&self.rx);
        self.drain_pending(&mut rx, batch);
        if batch.n == 0 && !poll_readable(self.fd(), timeout)? {
            return Ok(0);
        }
        while !batch.is_full() {
            // SAFETY: reading into a buffer we own, at most its length.
            let r = unsafe { libc::read(self.fd(), rx.buf.as_mut_ptr().cast(), rx.buf.len()) };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => break,
                    _ if batch.n > 0 => break,
                    _ => return Err(e),
                }
            }
            rx.len = r as usize;
            let Some(hdr) = VnetHdr::parse(&rx.buf[..rx.len]) else {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if hdr.gso_type == GSO_NONE {
                let len = rx.len - VNET_HDR_LEN;
                let Rx { buf, .. } = &mut *rx;
                let pkt = &mut buf[VNET_HDR_LEN..VNET_HDR_LEN + len];
                if hdr.flags & F_NEEDS_CSUM != 0
                    && offload::complete_checksum(
                        pkt,
                        usize::from(hdr.csum_start),
                        usize::from(hdr.csum_offset),
                    )
                    .is_err()
                {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                match batch.bufs.get_mut(batch.n).and_then(|b| b.get_mut(..len)) {
                    Some(slot) => {
                        slot.copy_from_slice(pkt);
                        batch.commit(len, UNSPECIFIED);
                    }
                    None => {
                        self.malformed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                continue;
            }
            match Gso::new(&hdr, &rx.buf[VNET_HDR_LEN..rx.len]) {
                Ok(gso) => {
                    self.stats
                        .super_packets_read
                        .fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .segments_cut
                        .fetch_add(gso.segments() as u64, Ordering::Relaxed);
                    rx.pending = Some((gso, 0));
                    self.drain_pending(&mut rx, batch);
                }
                Err(e) => {
                    tracing::debug!(error = ?e, "cannot segment super-packet");
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        Ok(batch.n)
    }

    fn send_offload(&self, batch: &mut Batch) -> io::Result<usize> {
        let mut c = lock(&self.tx);
        let n = batch.n.min(batch.capacity());
        {
            let b: &Batch = batch;
            offload::coalesce(&mut c, n, |i| b.packet(i));
        }
        let mut sent = 0;
        // The virtio header, the head packet, and the other members'
        // payloads: a group has at most MAX_SEGMENTS packets.
        // SAFETY: all-zero is a valid iovec.
        let mut iov: [libc::iovec; offload::MAX_SEGMENTS + 1] = unsafe { std::mem::zeroed() };
        for k in 0..c.groups.len() {
            let g = c.groups[k];
            let head_len = batch.lens.get(g.head).copied().unwrap_or(0);
            let Some(head) = batch.slot(g.head).and_then(|b| b.get_mut(..head_len)) else {
                continue;
            };
            let hdr = offload::finish_group(&g, head);
            let vnet = hdr.encode();
            iov[0] = libc::iovec {
                iov_base: vnet.as_ptr() as *mut libc::c_void,
                iov_len: vnet.len(),
            };
            iov[1] = libc::iovec {
                iov_base: head.as_mut_ptr().cast(),
                iov_len: head.len(),
            };
            let mut cnt = 2;
            let mut whole = true;
            let off = offload::payload_offset(&g);
            let mut next = c.next.get(g.head).copied().flatten();
            while let Some(i) = next {
                match (batch.packet(i).get(off..), iov.get_mut(cnt)) {
                    (Some(pl), Some(slot)) => {
                        *slot = libc::iovec {
                            iov_base: pl.as_ptr() as *mut libc::c_void,
                            iov_len: pl.len(),
                        };
                        cnt += 1;
                    }
                    // Never write part of a group: its packets are counted
                    // as not written instead.
                    _ => whole = false,
                }
                next = c.next.get(i).copied().flatten();
            }
            if !whole {
                tracing::debug!(packets = g.count, "coalesced group does not fit one write");
                continue;
            }
            // SAFETY: `iov[..cnt]` point at `vnet` and at batch buffers, all
            // alive for the call; the kernel only reads them.
            let r = unsafe { libc::writev(self.fd(), iov.as_ptr(), cnt as libc::c_int) };
            if r >= 0 {
                sent += g.count;
                if g.count > 1 {
                    let kind = if hdr.gso_type == offload::GSO_UDP_L4 {
                        &self.stats.udp_writes_coalesced
                    } else {
                        &self.stats.tcp_writes_coalesced
                    };
                    kind.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .packets_coalesced
                        .fetch_add(g.count as u64, Ordering::Relaxed);
                }
            } else {
                tracing::debug!(error = %io::Error::last_os_error(), packets = g.count, "tun writev");
            }
        }
        Ok(sent)
    }
}

impl TunIo for TunDevice {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        let got = self.recv_any(batch, timeout);
        if let Ok(n) = got {
            self.packets_read.fetch_add(n as u64, Ordering::Relaxed);
        }
        got
    }

    fn send_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let sent = self.send_any(batch);
        if let Ok(n) = sent {
            self.packets_written.fetch_add(n as u64, Ordering::Relaxed);
        }
        sent
    }

    fn take_malformed(&self) -> u64 {
        self.malformed.swap(0, Ordering::Relaxed)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.fd())
    }
}

impl TunDevice {
    fn recv_any(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        if self.offload {
            return self.recv_offload(batch, timeout);
        }
        if !poll_readable(self.fd(), timeout)? {
            return Ok(0);
        }
        while let Some(buf) = batch.bufs.get_mut(batch.n) {
            // SAFETY: reading into a buffer we own, at most its length.
            let r = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let got = if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(r as usize)
            };
            match got {
                Ok(len) => {
                    batch.commit(len, UNSPECIFIED);
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break
                }
                Err(e) if batch.n > 0 => {
                    tracing::debug!(error = %e, "tun read");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(batch.n)
    }

    fn send_any(&self, batch: &mut Batch) -> io::Result<usize> {
        if self.offload {
            return self.send_offload(batch);
        }
        let mut sent = 0;
        for i in 0..batch.n {
            let pkt = batch.packet(i);
            // SAFETY: writing from a buffer we own, at most its length.
            let r = unsafe { libc::write(self.fd(), pkt.as_ptr().cast(), pkt.len()) };
            if r < 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "tun write");
            } else {
                sent += 1;
            }
        }
        Ok(sent)
    }
}
