//! The real UDP socket: one dual-stack socket (IPv4 peers appear as
//! IPv4-mapped IPv6 addresses and are mapped back), falling back to IPv4
//! only where IPv6 is disabled. Batches move with `recvmmsg`/`sendmmsg`.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;
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
}

impl UdpSocket {
    /// Binds `port` on all addresses, IPv6 and IPv4 in one socket where possible.
    pub fn bind(port: u16) -> io::Result<Self> {
        let v6 = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
            s.set_only_v6(false)?;
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
        Ok(UdpSocket {
            sock,
            dual_stack,
            port,
        })
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

    fn to_sockaddr(&self, addr: SocketAddr) -> SockAddr {
        match addr {
            SocketAddr::V4(a) if self.dual_stack => {
                SockAddr::from(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
            }
            other => SockAddr::from(other),
        }
    }
}

/// Asks for `bytes` with the privileged option (root may exceed rmem_max),
/// falling back to the ordinary one.
fn set_buffer(sock: &Socket, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let val = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [force, plain] {
        // SAFETY: setsockopt with a valid fd, a pointer to a c_int and its size.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&val as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return;
        }
    }
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

impl UdpIo for UdpSocket {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
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
        // SAFETY: `hdrs[..cap]` point at `iovs`/`names` and at buffers owned by
        // `batch`, all of which outlive the call; the kernel writes at most
        // `iov_len` bytes into each buffer.
        let r = unsafe {
            libc::recvmmsg(
                self.sock.as_raw_fd(),
                hdrs.as_mut_ptr(),
                cap as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = (r as usize).min(cap);
        for i in 0..n {
            let truncated = hdrs[i].msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
            // A truncated datagram is kept with length 0: it fails to parse
            // and is counted as malformed.
            batch.lens[i] = if truncated {
                0
            } else {
                hdrs[i].msg_len as usize
            };
            // SAFETY: the kernel filled `names[i]` with `msg_namelen` bytes of a sockaddr.
            let addr = unsafe { SockAddr::new(names[i], hdrs[i].msg_hdr.msg_namelen) };
            batch.addrs[i] = addr
                .as_socket()
                .map(canonical)
                .unwrap_or_else(|| SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)));
        }
        batch.n = n;
        Ok(n)
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        let n = batch.n.min(BATCH).min(batch.capacity());
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        let mut names: [libc::sockaddr_storage; BATCH] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..n {
            let pkt = batch.packet(i);
            iovs[i] = libc::iovec {
                iov_base: pkt.as_ptr() as *mut libc::c_void,
                iov_len: pkt.len(),
            };
            let sa = self.to_sockaddr(batch.addrs[i]);
            let len = (sa.len() as usize).min(size_of::<libc::sockaddr_storage>());
            // SAFETY: copying `len` bytes of a sockaddr into a sockaddr_storage, which is large enough.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    sa.as_ptr().cast::<u8>(),
                    (&mut names[i] as *mut libc::sockaddr_storage).cast::<u8>(),
                    len,
                );
            }
            hdrs[i].msg_hdr.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            hdrs[i].msg_hdr.msg_namelen = len as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut off = 0;
        let mut sent = 0;
        while off < n {
            // SAFETY: `hdrs[off..n]` are initialised above and point at data
            // that outlives the call; the kernel only reads the buffers.
            let r = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    hdrs.as_mut_ptr().add(off),
                    (n - off) as libc::c_uint,
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                // The datagram at `off` was refused (unreachable, bad
                // address...): skip it and send the rest.
                tracing::debug!(error = %e, to = %batch.addrs[off], "udp send refused");
                off += 1;
                continue;
            }
            off += r as usize;
            sent += r as usize;
        }
        Ok(sent)
    }
}
