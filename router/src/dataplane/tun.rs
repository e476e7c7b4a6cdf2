//! The real TUN device (created with tun-rs; see README for why), read and
//! written in batches. Plain IP packets for now (no IFF_VNET_HDR); offloads
//! arrive with the throughput issue behind the same `TunIo` interface.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tun_rs::{DeviceBuilder, SyncDevice};

use super::io::{Batch, TunIo};
use super::poll_readable;

const UNSPECIFIED: std::net::SocketAddr =
    std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

pub struct TunDevice {
    dev: SyncDevice,
    name: String,
}

impl TunDevice {
    /// Creates (or, after a restart, re-creates) the TUN device `name` with `mtu`.
    pub fn create(name: &str, mtu: u16) -> io::Result<Self> {
        let dev = DeviceBuilder::new().name(name).mtu(mtu).build_sync()?;
        dev.set_nonblocking(true)?;
        Ok(TunDevice {
            dev,
            name: name.to_string(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
}

impl TunIo for TunDevice {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        batch.n = 0;
        if !poll_readable(self.dev.as_raw_fd(), timeout)? {
            return Ok(0);
        }
        while let Some(buf) = batch.bufs.get_mut(batch.n) {
            match self.dev.recv(buf) {
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

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        let mut sent = 0;
        for i in 0..batch.n {
            match self.dev.send(batch.packet(i)) {
                Ok(_) => sent += 1,
                Err(e) => tracing::debug!(error = %e, "tun write"),
            }
        }
        Ok(sent)
    }
}
