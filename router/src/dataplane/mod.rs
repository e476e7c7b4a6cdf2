//! The data plane: peers and their allowed-IPs table (`peers`, `table`),
//! the engine's I/O-free steps (`engine`), the threads that do the I/O
//! around them (`worker`), the batch I/O seams (`io`: real `tun` and `udp`,
//! in-memory `mem`), and the TUN offloads (`offload`).

#[cfg(feature = "ab-crates")]
pub mod ab_crates;
pub mod counters;
pub mod crypto;
pub mod engine;
pub mod io;
pub mod keys;
pub mod mem;
pub mod offload;
pub mod packet;
pub mod peers;
pub mod table;
pub mod tun;
pub mod udp;
pub mod worker;

pub use counters::{Counters, Drop};
pub use engine::{Dataplane, MeshDiff, PeerSession, Plan, WorkerSlot};
pub use io::{Batch, Queue, TunIo, UdpIo, BATCH};

use std::os::fd::RawFd;
use std::time::Duration;

/// A non-blocking eventfd, or `None` if the kernel refuses one.
pub(crate) fn eventfd() -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd has no memory arguments; a valid result is a new fd we own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
    (fd >= 0).then(|| unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Waits until `fd` is readable or `timeout` passes. `Ok(false)` on timeout
/// or interruption. A zero timeout does not poll at all (`Ok(true)`): the
/// caller's non-blocking read finds out, one system call instead of two.
pub(crate) fn poll_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    if timeout.is_zero() {
        return Ok(true);
    }
    poll_any([fd], timeout)
}

/// Waits until any of `fds` is readable or `timeout` passes. `Ok(false)` on
/// timeout or interruption.
pub(crate) fn poll_any<const N: usize>(
    fds: [RawFd; N],
    timeout: Duration,
) -> std::io::Result<bool> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `pfds` holds N valid pollfds for the duration of the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}
