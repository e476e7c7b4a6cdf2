//! Batch-shaped I/O seams. Real implementations (`tun`, `udp`) and in-memory
//! fakes (`mem`) move vectors of packets per call, so offloads (multi-message
//! syscalls, UDP GSO/GRO, TUN TSO/GRO) change what one call carries, not the
//! shape of the loops.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Packets per batch.
pub const BATCH: usize = 128;

/// A fixed set of packet buffers, allocated once per worker and reused for
/// every batch. Packet `i` is `bufs[i][offset..offset + lens[i]]`, for its
/// UDP peer `addrs[i]` (unused for TUN batches); `n` is how many are
/// filled. `offset` leaves room before each packet for an I/O backend that
/// wants to write a header there (0 unless one asks).
pub struct Batch {
    pub bufs: Vec<Vec<u8>>,
    pub lens: Vec<usize>,
    pub addrs: Vec<SocketAddr>,
    pub n: usize,
    pub offset: usize,
}

impl Batch {
    pub fn new(count: usize, buf_size: usize) -> Self {
        Batch {
            bufs: (0..count).map(|_| vec![0u8; buf_size]).collect(),
            lens: vec![0; count],
            addrs: vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)); count],
            n: 0,
            offset: 0,
        }
    }

    /// As `new`, with `offset` bytes of room before each packet (added to
    /// `buf_size`).
    pub fn with_offset(count: usize, buf_size: usize, offset: usize) -> Self {
        Batch {
            offset,
            ..Batch::new(count, buf_size + offset)
        }
    }

    /// The room for packet `i`: its buffer after `offset`.
    #[inline]
    pub fn slot(&mut self, i: usize) -> Option<&mut [u8]> {
        let off = self.offset;
        self.bufs.get_mut(i).and_then(|b| b.get_mut(off..))
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    pub fn is_full(&self) -> bool {
        self.n >= self.bufs.len()
    }

    /// Marks the next slot (`bufs[n]`, already written by the caller) as a
    /// packet of `len` bytes for `addr`. Returns false, changing nothing,
    /// when the batch is full.
    #[inline]
    pub fn commit(&mut self, len: usize, addr: SocketAddr) -> bool {
        match (self.lens.get_mut(self.n), self.addrs.get_mut(self.n)) {
            (Some(l), Some(a)) => {
                *l = len;
                *a = addr;
                self.n += 1;
                true
            }
            _ => false,
        }
    }

    /// Removes the packets of length 0 (slots a step gave up after taking
    /// them), keeping the others' order; buffers are swapped, not copied.
    pub fn drop_empty(&mut self) {
        let mut w = 0;
        for r in 0..self.n {
            if self.lens.get(r).copied().unwrap_or(0) == 0 {
                continue;
            }
            if w != r {
                self.bufs.swap(w, r);
                self.lens.swap(w, r);
                self.addrs.swap(w, r);
            }
            w += 1;
        }
        self.n = w;
    }

    /// Packet `i` as a slice.
    #[inline]
    pub fn packet(&self, i: usize) -> &[u8] {
        let len = self.lens.get(i).copied().unwrap_or(0);
        self.bufs
            .get(i)
            .and_then(|b| b.get(self.offset..self.offset + len))
            .unwrap_or(&[])
    }
}

/// One data-plane queue: a TUN queue and the UDP socket paired with it.
pub type Queue = (std::sync::Arc<dyn TunIo>, std::sync::Arc<dyn UdpIo>);

/// The TUN side: IP packets to and from the kernel.
pub trait TunIo: Send + Sync {
    /// Waits up to `timeout` for packets, then reads as many as are ready
    /// (up to the batch's capacity) into `batch`, setting `batch.n`.
    /// Returns `Ok(0)` on timeout.
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize>;
    /// Writes packets `0..batch.n`. Returns how many the kernel accepted;
    /// the rest are the caller's to count as dropped. May rewrite headers in
    /// the batch (coalescing).
    fn send_batch(&self, batch: &mut Batch) -> io::Result<usize>;
    /// Packets the device itself dropped as malformed since the last call
    /// (e.g. a super-packet it could not segment).
    fn take_malformed(&self) -> u64 {
        0
    }
    /// Room this device wants before each packet of a batch it is given to
    /// write (`Batch::offset`).
    fn write_offset(&self) -> usize {
        0
    }
    /// A descriptor that polls readable when packets wait, if there is one
    /// (in-memory fakes have none).
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// The UDP side: WireGuard datagrams to and from peers.
pub trait UdpIo: Send + Sync {
    /// Waits up to `timeout`, then receives ready datagrams into `batch`
    /// with their source addresses. Returns `Ok(0)` on timeout.
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize>;
    /// Sends datagrams `0..batch.n` to `batch.addrs`. Returns how many were
    /// sent; datagrams the kernel refused are skipped and counted by the
    /// return value falling short.
    fn send_batch(&self, batch: &Batch) -> io::Result<usize>;
    /// Datagrams the socket itself dropped as malformed since the last call
    /// (e.g. truncated, or larger than a batch buffer).
    fn take_malformed(&self) -> u64 {
        0
    }
    /// A descriptor that polls readable when datagrams wait, if there is one.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}
