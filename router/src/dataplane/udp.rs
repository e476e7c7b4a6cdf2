//! The real UDP socket: one dual-stack socket (IPv4 peers appear as
//! IPv4-mapped IPv6 addresses and are mapped back), falling back to IPv4
//! only where IPv6 is disabled. Batches move with `recvmmsg`/`sendmmsg`.
//!
//! Offloads: on send, consecutive datagrams of a batch to the same peer and
//! of the same size go out as one message with `UDP_SEGMENT` (GSO), the
//! kernel cutting them apart; on receive, `UDP_GRO` hands over runs of
//! datagrams from one sender as one buffer with their segment size, which is
//! cut back into datagrams here. If the kernel refuses GSO at send time,
//! the socket falls back to plain datagrams for good.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use super::io::{Batch, UdpIo, BATCH};
use super::poll_readable;

/// Socket buffer size asked for in each direction. With the kernel default
/// (208 KiB) the tunnels measured here lose packets at speed.
pub const SOCKET_BUFFER_BYTES: usize = 8 << 20;

pub struct UdpSocket {
    sock: Socket,
    dual_stack: bool,
    port: u16,
    gso: AtomicBool,
    gro: Option<Mutex<Gro>>,
    malformed: AtomicU64,
    /// Datagrams received on this socket.
    received: AtomicU64,
}

/// Receive-side GRO state: large buffers, and the coalesced message being
/// cut into datagrams (it may span several batches).
struct Gro {
    bufs: Vec<Vec<u8>>,
    ctrl: Vec<[u64; CMSG_WORDS]>,
    /// (buffer index, length, segment size, sender) of each message.
    msgs: Vec<(usize, usize, usize, SocketAddr)>,
    /// Next message in `msgs`, and offset inside it.
    cursor: (usize, usize),
}

/// Messages per GRO `recvmmsg` and the size of each buffer.
const GRO_MSGS: usize = 8;
const GRO_BUF: usize = 65536;
/// Control buffer per message, in u64 words (room for one int/u16 cmsg).
const CMSG_WORDS: usize = 4;
/// The kernel's limit on segments per GSO send.
const GSO_MAX_SEGMENTS: usize = 64;
const GSO_MAX_BYTES: usize = 65000;

impl UdpSocket {
    /// `count` sockets on `port`, all addresses, IPv6 and IPv4 in one socket
    /// where possible (`SO_REUSEPORT` when more than one), one per worker.
    /// `offload` turns on UDP GSO and GRO where the kernel has them. The
    /// kernel picks the socket by the sender's address and port, so each
    /// peer's datagrams arrive, in order, on one of them.
    pub fn bind_group(port: u16, offload: bool, count: usize) -> io::Result<Vec<Self>> {
        let reuse = count > 1;
        if reuse && port != 0 {
            // A group accepts any socket that also sets SO_REUSEPORT: make
            // sure no one (an old router still running) holds the port
            // before opening it to our own sockets.
            drop(Self::bind_with(port, false, false)?);
        }
        let first = Self::bind_with(port, offload, reuse)?;
        let port = first.port;
        let mut socks = vec![first];
        for _ in 1..count {
            socks.push(Self::bind_with(port, offload, reuse)?);
        }
        Ok(socks)
    }

    fn bind_with(port: u16, offload: bool, reuse: bool) -> io::Result<Self> {
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
            s.set_only_v6(false)?;
            if reuse {
                s.set_reuse_port(true)?;
            }
            s.bind(&SockAddr::from(SocketAddr::from((
                Ipv6Addr::UNSPECIFIED,
                port,
            ))))?;
            Ok(s)
        });
        let (sock, dual_stack) = match v6 {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(e) => {
                tracing::info!(error = %e, "no IPv6 UDP socket; serving IPv4 endpoints only");
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                if reuse {
                    s.set_reuse_port(true)?;
                }
                s.bind(&SockAddr::from(SocketAddr::from((
                    Ipv4Addr::UNSPECIFIED,
                    port,
                ))))?;
                (s, false)
            }
        };
        set_buffer(
            &sock,
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            SOCKET_BUFFER_BYTES,
        );
        set_buffer(
            &sock,
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            SOCKET_BUFFER_BYTES,
        );
        let port = sock
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(port);
        Ok(Self::wrap(sock, dual_stack, port, offload))
    }

    /// A bound socket from its descriptor (a handover), set up as
    /// `bind_group` sets one up (GRO on again when `offload`; GSO is tried
    /// on the first send and turned off if refused).
    pub fn adopt(fd: std::os::fd::OwnedFd, offload: bool) -> io::Result<Self> {
        let sock = Socket::from(fd);
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let dual_stack = local.is_ipv6();
        let port = local.as_socket().map(|a| a.port()).unwrap_or(0);
        Ok(Self::wrap(sock, dual_stack, port, offload))
    }

    /// The socket's descriptor, to hand over to a successor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.sock.as_fd()
    }

    fn wrap(sock: Socket, dual_stack: bool, port: u16, offload: bool) -> Self {
        let gro = (offload && setsockopt_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1)).then(|| {
            Mutex::new(Gro {
                bufs: (0..GRO_MSGS).map(|_| vec![0u8; GRO_BUF]).collect(),
                ctrl: vec![[0u64; CMSG_WORDS]; GRO_MSGS],
                msgs: Vec::with_capacity(GRO_MSGS),
                cursor: (0, 0),
            })
        });
        UdpSocket {
            sock,
            dual_stack,
            port,
            gso: AtomicBool::new(offload),
            gro,
            malformed: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    /// Whether UDP GSO (send) and GRO (receive) are in use.
    pub fn offloads(&self) -> (bool, bool) {
        (self.gso.load(Ordering::Relaxed), self.gro.is_some())
    }

    /// Datagrams received on this socket so far.
    pub fn datagrams_received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Receive and send buffer sizes the kernel granted.
    pub fn buffer_sizes(&self) -> (usize, usize) {
        (
            self.sock.recv_buffer_size().unwrap_or(0),
            self.sock.send_buffer_size().unwrap_or(0),
        )
    }

    /// Writes `addr` (IPv4-mapped on a dual-stack socket) into `name` and
    /// returns its length.
    fn fill_name(&self, addr: SocketAddr, name: &mut libc::sockaddr_storage) -> libc::socklen_t {
        let sa = self.to_sockaddr(addr);
        let len = (sa.len() as usize).min(size_of::<libc::sockaddr_storage>());
        // SAFETY: copying `len` bytes of a sockaddr into a sockaddr_storage,
        // which is at least that large.
        unsafe {
            std::ptr::copy_nonoverlapping(
                sa.as_ptr().cast::<u8>(),
                (name as *mut libc::sockaddr_storage).cast::<u8>(),
                len,
            );
        }
        len as libc::socklen_t
    }

    /// `recvmmsg` without blocking: the number of messages, 0 when none
    /// are ready.
    ///
    /// # Safety
    /// Every header must point at buffers that stay valid for the call.
    unsafe fn recvmmsg(&self, hdrs: &mut [libc::mmsghdr]) -> io::Result<usize> {
        // SAFETY: the caller guarantees the headers' buffers; the count is the slice's length.
        let r = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
            _ => Err(e),
        }
    }

    fn to_sockaddr(&self, addr: SocketAddr) -> SockAddr {
        match addr {
            SocketAddr::V4(a) if self.dual_stack => {
                SockAddr::from(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => SockAddr::from(other),
        }
    }
}

fn setsockopt_int(sock: &Socket, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> bool {
    // SAFETY: setsockopt with a valid fd, a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            opt,
            (&val as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Asks for `bytes` with the privileged option (root may exceed rmem_max),
/// falling back to the ordinary one.
fn set_buffer(sock: &Socket, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let _ = setsockopt_int(sock, libc::SOL_SOCKET, force, val)
        || setsockopt_int(sock, libc::SOL_SOCKET, plain, val);
}

/// The sender of a received message, IPv4-mapped addresses mapped back.
fn sender(name: &libc::sockaddr_storage, len: libc::socklen_t) -> SocketAddr {
    // SAFETY: the kernel filled `name` with `len` bytes of a sockaddr.
    let addr = unsafe { SockAddr::new(*name, len) };
    addr.as_socket()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
        .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
}

impl UdpSocket {
    fn recv_plain(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        if !poll_readable(self.sock.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        let cap = batch.capacity().min(BATCH);
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for (i, buf) in batch.bufs.iter_mut().take(cap).enumerate() {
            iovs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: the headers point at iovecs, names, control buffers and
        // data buffers that all outlive the call; the kernel writes within
        // the lengths given.
        let r = match unsafe { self.recvmmsg(&mut hdrs[..cap]) } {
            Ok(0) => return Ok(0),
            Ok(r) => r,
            Err(e) => return Err(e),
        };
        let n = r.min(cap);
        for i in 0..n {
            let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // A truncated datagram is kept with length 0: it fails to parse
            // and is counted as malformed.
            batch.lens[i] = if truncated {
                0
            } else {
                hdrs[i].msg_len as usize
            };
            batch.addrs[i] = sender(&names[i], hdrs[i].msg_hdr.msg_namelen);
        }
        batch.n = n;
        Ok(n)
    }
}

/// Fills `msg`'s control buffer with one cmsg carrying `val` (u16).
fn put_u16_cmsg(
    msg: &mut libc::msghdr,
    ctrl: &mut [u64; CMSG_WORDS],
    level: libc::c_int,
    ty: libc::c_int,
    val: u16,
) {
    msg.msg_control = ctrl.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
    // SAFETY: the control buffer is CMSG_WORDS*8 = 32 bytes, more than
    // CMSG_SPACE(2) = 24, and aligned for cmsghdr; CMSG_FIRSTHDR/DATA stay inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(msg);
        (*c).cmsg_level = level;
        (*c).cmsg_type = ty;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), val);
    }
}

/// The GRO segment size in a received message's control data, if any.
fn gro_segment_size(msg: &libc::msghdr) -> Option<usize> {
    // SAFETY: iterating cmsgs the kernel wrote into our control buffer,
    // bounded by msg_controllen, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(v).ok().filter(|v| *v > 0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

impl UdpSocket {
    /// Receives with GRO: coalesced messages land in large buffers and are
    /// cut into datagrams of their segment size, copied into `batch`.
    fn recv_gro(
        &self,
        gro: &Mutex<Gro>,
        batch: &mut Batch,
        timeout: Duration,
    ) -> io::Result<usize> {
        let mut g = gro.lock().unwrap_or_else(|p| p.into_inner());
        self.drain_gro(&mut g, batch);
        if batch.n > 0 {
            return Ok(batch.n);
        }
        if !poll_readable(self.sock.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        let Gro {
            bufs,
            ctrl,
            msgs,
            cursor,
        } = &mut *g;
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut iovs: [libc::iovec; GRO_MSGS] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_storage; GRO_MSGS] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; GRO_MSGS] = unsafe { zeroed() };
        for (i, buf) in bufs.iter_mut().enumerate().take(GRO_MSGS) {
            iovs[i] = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let h = &mut hdrs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = CMSG_WORDS * 8;
        }
        // SAFETY: the headers point at iovecs, names, control buffers and
        // data buffers that all outlive the call; the kernel writes within
        // the lengths given.
        let r = match unsafe { self.recvmmsg(&mut hdrs[..GRO_MSGS]) } {
            Ok(0) => return Ok(0),
            Ok(r) => r,
            Err(e) => return Err(e),
        };
        msgs.clear();
        for (i, h) in hdrs.iter().enumerate().take(r.min(GRO_MSGS)) {
            let len = h.msg_len as usize;
            if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                self.malformed.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let seg = gro_segment_size(&h.msg_hdr).unwrap_or(len);
            msgs.push((i, len, seg, sender(&names[i], h.msg_hdr.msg_namelen)));
        }
        *cursor = (0, 0);
        self.drain_gro(&mut g, batch);
        Ok(batch.n)
    }

    /// Copies datagrams from the pending GRO messages into free slots.
    fn drain_gro(&self, g: &mut Gro, batch: &mut Batch) {
        while let Some(&(buf, len, seg, from)) = g.msgs.get(g.cursor.0) {
            let seg = seg.max(1);
            let off = g.cursor.1;
            if off >= len {
                g.cursor = (g.cursor.0 + 1, 0);
                continue;
            }
            let Some(slot) = batch.bufs.get_mut(batch.n) else {
                return;
            };
            let end = (off + seg).min(len);
            let data = g.bufs.get(buf).and_then(|b| b.get(off..end)).unwrap_or(&[]);
            match slot.get_mut(..data.len()) {
                Some(dst) => {
                    dst.copy_from_slice(data);
                    batch.commit(data.len(), from);
                }
                None => {
                    self.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            g.cursor.1 = end;
        }
    }

    /// Sends datagrams `start..batch.n`. Runs of up to `max_run`
    /// datagrams to one peer, all of one size but the last, go out as one
    /// message with `UDP_SEGMENT` (GSO); with `max_run` 1, one datagram per
    /// message. If the kernel refuses GSO, the rest goes out plain, and so
    /// does everything after.
    fn send_runs(&self, batch: &Batch, start: usize, max_run: usize) -> io::Result<usize> {
        let n = batch.n.min(BATCH).min(batch.capacity());
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        let mut ctrl = [[0u64; CMSG_WORDS]; BATCH];
        // Datagram count and first datagram of each message.
        let mut counts = [0usize; BATCH];
        let mut firsts = [0usize; BATCH];
        let mut m = 0;
        let mut i = start;
        while i < n {
            let to = batch.addrs[i];
            let size = batch.lens[i];
            let mut j = i;
            let mut bytes = 0;
            // Extend the run: same peer, same size; a shorter datagram ends it.
            while j < n
                && batch.addrs[j] == to
                && j - i < max_run
                && bytes + batch.lens[j] <= GSO_MAX_BYTES
            {
                let len = batch.lens[j];
                if len > size {
                    break;
                }
                let pkt = batch.packet(j);
                iovs[j] = libc::iovec {
                    iov_base: pkt.as_ptr() as *mut libc::c_void,
                    iov_len: pkt.len(),
                };
                bytes += len;
                j += 1;
                if len < size {
                    break;
                }
            }
            let j = j.max(i + 1);
            let h = &mut hdrs[m].msg_hdr;
            h.msg_namelen = self.fill_name(to, &mut names[m]);
            h.msg_name = (&mut names[m] as *mut libc::sockaddr_storage).cast();
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = j - i;
            if j - i > 1 {
                put_u16_cmsg(
                    h,
                    &mut ctrl[m],
                    libc::SOL_UDP,
                    libc::UDP_SEGMENT,
                    size as u16,
                );
            }
            (counts[m], firsts[m]) = (j - i, i);
            m += 1;
            i = j;
        }
        let mut off = 0;
        let mut sent = 0;
        while off < m {
            // SAFETY: `hdrs[off..m]` are initialised above and point at data
            // that outlives the call; the kernel only reads the buffers.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr().add(off),
                    (m - off) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // The kernel or device cannot segment: plain datagrams from now on.
                    Some(libc::EIO) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                        if counts[off] > 1 =>
                    {
                        tracing::warn!(error = %e, "UDP GSO refused; sending plain datagrams");
                        self.gso.store(false, Ordering::Relaxed);
                        return Ok(sent + self.send_runs(batch, firsts[off], 1)?);
                    }
                    // This message was refused (unreachable, bad address...):
                    // skip it and send the rest.
                    _ => {
                        tracing::debug!(error = %e, to = %batch.addrs[firsts[off]], "udp send refused");
                        off += 1;
                        continue;
                    }
                }
            }
            let r = r as usize;
            sent += counts[off..off + r].iter().sum::<usize>();
            off += r;
        }
        Ok(sent)
    }
}

impl UdpIo for UdpSocket {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        let got = match &self.gro {
            Some(gro) => self.recv_gro(gro, batch, timeout),
            None => self.recv_plain(batch, timeout),
        };
        if let Ok(n) = got {
            self.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        got
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        let max_run = if self.gso.load(Ordering::Relaxed) {
            GSO_MAX_SEGMENTS
        } else {
            1
        };
        self.send_runs(batch, 0, max_run)
    }

    fn take_malformed(&self) -> u64 {
        self.malformed.swap(0, Ordering::Relaxed)
    }

    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.sock.as_raw_fd())
    }
}
