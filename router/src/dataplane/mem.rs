//! In-memory TUN and UDP fakes, for root-free tests of the whole packet path
//! (the shape of wireguard-go's `tuntest` and `bindtest`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::io::{Batch, TunIo, UdpIo};

/// A datagram in flight: its source and its bytes.
type Datagram = (SocketAddr, Vec<u8>);

/// A switch joining in-memory UDP sockets by address.
#[derive(Default)]
pub struct MemNet {
    ports: Mutex<HashMap<SocketAddr, Sender<Datagram>>>,
}

impl MemNet {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A socket bound to `addr` on this network.
    pub fn bind(self: &Arc<Self>, addr: SocketAddr) -> MemUdp {
        let (tx, rx) = channel();
        self.ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr, tx);
        MemUdp {
            addr,
            net: Arc::clone(self),
            rx: Mutex::new(rx),
        }
    }

    /// Delivers a datagram as if `from` had sent it (for injecting packets).
    pub fn deliver(&self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) -> bool {
        let ports = self.ports.lock().unwrap_or_else(|p| p.into_inner());
        ports
            .get(&to)
            .is_some_and(|tx| tx.send((from, data)).is_ok())
    }
}

pub struct MemUdp {
    addr: SocketAddr,
    net: Arc<MemNet>,
    rx: Mutex<Receiver<Datagram>>,
}

fn fill<T>(
    rx: &Receiver<T>,
    batch: &mut Batch,
    timeout: Duration,
    mut put: impl FnMut(&mut Batch, usize, T) -> bool,
) -> io::Result<usize> {
    batch.n = 0;
    let first = match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(RecvTimeoutError::Timeout) => return Ok(0),
        Err(RecvTimeoutError::Disconnected) => return Err(io::ErrorKind::BrokenPipe.into()),
    };
    let mut next = Some(first);
    while let Some(v) = next.take() {
        let i = batch.n;
        if put(batch, i, v) {
            batch.n += 1;
        }
        if batch.is_full() {
            break;
        }
        next = rx.try_recv().ok();
    }
    Ok(batch.n)
}

fn copy_in(batch: &mut Batch, i: usize, data: &[u8]) -> bool {
    match batch.bufs.get_mut(i).and_then(|b| b.get_mut(..data.len())) {
        Some(dst) => {
            dst.copy_from_slice(data);
            batch.lens[i] = data.len();
            true
        }
        None => false,
    }
}

impl UdpIo for MemUdp {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        let rx = self.rx.lock().unwrap_or_else(|p| p.into_inner());
        fill(&rx, batch, timeout, |b, i, (from, data)| {
            b.addrs[i] = from;
            copy_in(b, i, &data)
        })
    }

    fn send_batch(&self, batch: &Batch) -> io::Result<usize> {
        Ok((0..batch.n)
            .filter(|&i| {
                self.net
                    .deliver(self.addr, batch.addrs[i], batch.packet(i).to_vec())
            })
            .count())
    }
}

/// The router's side of an in-memory TUN device.
pub struct MemTun {
    from_host: Mutex<Receiver<Vec<u8>>>,
    to_host: Sender<Vec<u8>>,
}

/// The test's side: write packets "from the kernel", read what the router wrote.
pub struct MemTunHost {
    pub to_router: Sender<Vec<u8>>,
    pub from_router: Receiver<Vec<u8>>,
}

impl MemTun {
    pub fn pair() -> (MemTun, MemTunHost) {
        let (a_tx, a_rx) = channel();
        let (b_tx, b_rx) = channel();
        (
            MemTun {
                from_host: Mutex::new(a_rx),
                to_host: b_tx,
            },
            MemTunHost {
                to_router: a_tx,
                from_router: b_rx,
            },
        )
    }
}

impl TunIo for MemTun {
    fn recv_batch(&self, batch: &mut Batch, timeout: Duration) -> io::Result<usize> {
        let rx = self.from_host.lock().unwrap_or_else(|p| p.into_inner());
        fill(&rx, batch, timeout, |b, i, data| copy_in(b, i, &data))
    }

    fn send_batch(&self, batch: &mut Batch) -> io::Result<usize> {
        Ok((0..batch.n)
            .filter(|&i| self.to_host.send(batch.packet(i).to_vec()).is_ok())
            .count())
    }
}
