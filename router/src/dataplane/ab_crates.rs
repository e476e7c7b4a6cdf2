//! The comparison harness for the crates that could replace tunmesh's own
//! I/O (built only with `--features ab-crates`; see docs/benchmarks.md,
//! Throughput, for what it measured and `scripts/ab-crates.sh` for
//! the command):
//!
//! - `TunrsTun`: the TUN side through tun-rs's own offload code (its port of
//!   wireguard-go's `tun_linux.go`): `recv_multiple` reads one super-packet
//!   and splits it, `send_multiple` coalesces by copying payloads into the
//!   head packet and writes each group with one `write`;
//! - `QuinnUdp`: the UDP side through quinn-udp: `recv` (`recvmmsg` with
//!   GRO), `send` of one `Transmit` per run (`sendmsg` with GSO; a run must
//!   be one contiguous buffer, so it is copied into one).
//!
//! `TUNMESH_AB_IO=tunrs`, `quinn` or `both` picks them at start; anything
//! else (or unset) is tunmesh's own I/O.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Mutex;
use std::time::Duration;

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tun_rs::{DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::io::{Batch, TunIo, UdpIo, BATCH};
use super::poll_readable;

/// Which of the crates' I/O to use, from `TUNMESH_AB_IO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub tunrs: bool,
    pub quinn: bool,
}

impl Choice {
    pub fn from_env() -> Choice {
        let v = std::env::var("TUNMESH_AB_IO").unwrap_or_default();
        Choice {
            tunrs: v == "tunrs" || v == "both",
            quinn: v == "quinn" || v == "both",
        }
    }
}

/// Room tun-rs wants before each packet it writes (the virtio header).
pub const TUN_OFFSET: usize = VIRTIO_NET_HDR_LEN;

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);
/// A super-packet of up to 64 KiB at the smallest MSS seen: the free slots
/// a `recv_multiple` must have.
const MAX_SPLIT: usize = 64;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct TunRx {
    original: Vec<u8>,
    sizes: Vec<usize>,
}

pub struct TunrsTun {
    dev: SyncDevice,
    rx: Mutex<TunRx>,
    gro: Mutex<GROTable>,
    buf_size: usize,
}

impl TunrsTun {
    /// `queues` queues of the TUN device `name`, with tun-rs's offloads.
    pub fn create_queues(
        name: &str,
        mtu: u16,
        queues: usize,
        buf_size: usize,
    ) -> io::Result<Vec<Self>> {
        let mut b = DeviceBuilder::new().name(name).mtu(mtu).offload(true);
        if queues > 1 {
            b = b.multi_queue(true);
        }
        let first = b.build_sync()?;
        let mut devs = Vec::new();
        for _ in 1..queues.max(1) {
            devs.push(first.try_clone()?);
        }
        devs.insert(0, first);
        devs.into_iter()
            .map(|dev| {
                dev.set_nonblocking(true)?;
                Ok(TunrsTun {
                    dev,
                    rx: Mutex::new(TunRx {
                        original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
                        sizes: vec![0; BATCH],
                    }),
                    gro: Mutex::new(GROTable::default()),
                    buf_size,
                })
            })
            .collect()
    }
}

impl TunIo for TunrsTun {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        if !poll_readable(self.dev.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        let mut rx = lock(&self.rx);
        let TunRx { original, sizes } = &mut *rx;
        while batch.capacity() - batch.n >= MAX_SPLIT {
            let n = batch.n;
            match self
                .dev
                .recv_multiple(original, &mut batch.bufs[n..], &mut sizes[n..], 0)
            {
                Ok(k) => {
                    batch.lens[n..n + k].copy_from_slice(&sizes[n..n + k]);
                    batch.addrs[n..n + k].fill(UNSPECIFIED);
                    batch.n += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if batch.n > 0 => {
                    tracing::debug!(error = %e, "tun-rs recv_multiple");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(batch.n)
    }

    fn send_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        let n = batch.n;
        if n == 0 {
            return Ok(0);
        }
        // tun-rs reads each packet as its whole buffer after the offset.
        for i in 0..n {
            let len = batch.offset + batch.lens[i];
            batch.bufs[i].truncate(len);
        }
        let r = self
            .dev
            .send_multiple(&mut lock(&self.gro), &mut batch.bufs[..n], batch.offset);
        let full = self.buf_size + batch.offset;
        for b in &mut batch.bufs[..n] {
            if b.len() < full {
                b.resize(full, 0);
            }
        }
        match r {
            Ok(_) => Ok(n),
            Err(e) => {
                tracing::debug!(error = %e, "tun-rs send_multiple");
                Ok(0)
            }
        }
    }

    fn write_offset(&self) -> usize {
        TUN_OFFSET
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.dev.as_raw_fd())
    }
}

struct QuinnRx {
    bufs: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Messages received, and (message, offset) of the next datagram.
    got: usize,
    cursor: (usize, usize),
}

pub struct QuinnUdp {
    sock: std::net::UdpSocket,
    state: UdpSocketState,
    v6: bool,
    rx: Mutex<QuinnRx>,
    scratch: Mutex<Vec<u8>>,
}

const QUINN_MSGS: usize = 8;

impl QuinnUdp {
    /// `count` dual-stack sockets on `port` (SO_REUSEPORT when more than
    /// one), with the same 8 MiB buffers as tunmesh's own.
    pub fn bind_group(port: u16, count: usize) -> io::Result<Vec<Self>> {
        (0..count.max(1))
            .map(|_| {
                let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
                s.set_only_v6(false)?;
                if count > 1 {
                    s.set_reuse_port(true)?;
                }
                let _ = s.set_recv_buffer_size(super::udp::SOCKET_BUFFER_BYTES);
                let _ = s.set_send_buffer_size(super::udp::SOCKET_BUFFER_BYTES);
                s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
                s.set_nonblocking(true)?;
                let sock: std::net::UdpSocket = s.into();
                let state = UdpSocketState::new((&sock).into())?;
                Ok(QuinnUdp {
                    sock,
                    state,
                    v6: true,
                    rx: Mutex::new(QuinnRx {
                        bufs: (0..QUINN_MSGS).map(|_| vec![0u8; 65536]).collect(),
                        meta: vec![RecvMeta::default(); QUINN_MSGS],
                        got: 0,
                        cursor: (0, 0),
                    }),
                    scratch: Mutex::new(vec![0u8; 65536]),
                })
            })
            .collect()
    }

    fn to_wire(&self, a: SocketAddr) -> SocketAddr {
        match (self.v6, a) {
            (true, SocketAddr::V4(v4)) => {
                SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
            }
            _ => a,
        }
    }

    /// Cuts received messages into datagrams in `batch`'s free slots.
    fn drain(rx: &mut QuinnRx, batch: &mut Batch) {
        while rx.cursor.0 < rx.got && !batch.is_full() {
            let (m, off) = rx.cursor;
            let meta = rx.meta[m];
            let stride = meta.stride.max(1);
            let end = (off + stride).min(meta.len);
            let from = match meta.addr {
                SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
                    Some(v4) => SocketAddr::from((v4, a.port())),
                    None => meta.addr,
                },
                v4 => v4,
            };
            let data = &rx.bufs[m][off..end];
            if let Some(slot) = batch.slot(batch.n).and_then(|s| s.get_mut(..data.len())) {
                slot.copy_from_slice(data);
                batch.commit(data.len(), from);
            }
            rx.cursor = if end >= meta.len {
                (m + 1, 0)
            } else {
                (m, end)
            };
        }
    }
}

impl UdpIo for QuinnUdp {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        let mut rx = lock(&self.rx);
        Self::drain(&mut rx, batch);
        if batch.n == 0 && !poll_readable(self.sock.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        while !batch.is_full() {
            let QuinnRx { bufs, meta, .. } = &mut *rx;
            let mut slices: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match self.state.recv((&self.sock).into(), &mut slices, meta) {
                Ok(k) => {
                    rx.got = k;
                    rx.cursor = (0, 0);
                    Self::drain(&mut rx, batch);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if batch.n > 0 => {
                    tracing::debug!(error = %e, "quinn-udp recv");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(batch.n)
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        let n = batch.n;
        let max_run = self.state.max_gso_segments().max(1);
        let mut scratch = lock(&self.scratch);
        let mut i = 0;
        let mut sent = 0;
        while i < n {
            let to = batch.addrs[i];
            let size = batch.lens[i];
            let mut j = i;
            let mut bytes = 0;
            while j < n && batch.addrs[j] == to && j - i < max_run && bytes + batch.lens[j] <= 65000
            {
                let len = batch.lens[j];
                if len > size {
                    break;
                }
                scratch[bytes..bytes + len].copy_from_slice(batch.packet(j));
                bytes += len;
                j += 1;
                if len < size {
                    break;
                }
            }
            let j = j.max(i + 1);
            let t = Transmit {
                destination: self.to_wire(to),
                ecn: None,
                contents: &scratch[..bytes],
                segment_size: (j - i > 1).then_some(size),
                src_ip: None,
            };
            loop {
                match self.state.try_send((&self.sock).into(), &t) {
                    Ok(()) => {
                        sent += j - i;
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => {
                        tracing::debug!(error = %e, "quinn-udp send");
                        break;
                    }
                }
            }
            i = j;
        }
        Ok(sent)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}
