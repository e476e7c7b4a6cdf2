//! A userspace impairment relay for the underlay: this kernel has no
//! `netem`, so loss, delay, reordering, duplication and a link going down
//! are applied by a UDP relay that two nodes' WireGuard traffic is steered
//! through (with `tunmesh.io/force-endpoint`). Node A talks to the relay's
//! port `a_side`, which forwards to B from port `b_side`, and back.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::netns::in_netns;

/// What the relay does to each datagram.
#[derive(Debug, Clone, Copy, Default)]
pub struct Impairment {
    /// Probability of dropping a datagram.
    pub loss: f64,
    /// Fixed delay added to each datagram.
    pub delay: Duration,
    /// Random extra delay, up to this much (reorders datagrams).
    pub jitter: Duration,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
    /// Drop everything (the link is down).
    pub down: bool,
}

pub struct Relay {
    pub a_side: SocketAddr,
    pub b_side: SocketAddr,
    pub setting: Arc<Mutex<Impairment>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// xorshift64*: enough randomness for dropping and delaying datagrams.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Job {
    due: Instant,
    data: Vec<u8>,
    to_b: bool,
}

impl Relay {
    /// Starts a relay in namespace `ns` on address `ip` between `a` and `b`.
    pub fn start(ns: &str, ip: std::net::IpAddr, a: SocketAddr, b: SocketAddr) -> Result<Relay> {
        let bind = SocketAddr::new(ip, 0);
        let sock_a = in_netns(ns, move || UdpSocket::bind(bind))??;
        let sock_b = in_netns(ns, move || UdpSocket::bind(bind))??;
        let (a_side, b_side) = (sock_a.local_addr()?, sock_b.local_addr()?);
        for s in [&sock_a, &sock_b] {
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
        }
        let setting = Arc::new(Mutex::new(Impairment::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Job>();
        let mut threads = Vec::new();
        // Receivers: decide each datagram's fate, hand survivors to the sender.
        for (sock, to_b, seed) in [
            (sock_a.try_clone()?, true, 0x9e37_79b9_7f4a_7c15u64),
            (sock_b.try_clone()?, false, 0xd1b5_4a32_d192_ed03),
        ] {
            let (setting, stop, tx) = (Arc::clone(&setting), Arc::clone(&stop), tx.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(seed);
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let s = setting.lock().map(|s| *s).unwrap_or_default();
                    if s.down || rng.unit() < s.loss {
                        continue;
                    }
                    let copies = if rng.unit() < s.duplicate { 2 } else { 1 };
                    for _ in 0..copies {
                        let extra = s.jitter.mul_f64(rng.unit());
                        let _ = tx.send(Job {
                            due: Instant::now() + s.delay + extra,
                            data: buf[..n].to_vec(),
                            to_b,
                        });
                    }
                }
            }));
        }
        drop(tx);
        // Sender: releases datagrams when they are due (a heap by due time).
        {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut queue: Vec<Job> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let wait = queue
                        .iter()
                        .map(|j| j.due.saturating_duration_since(Instant::now()))
                        .min()
                        .unwrap_or(Duration::from_millis(20));
                    match rx.recv_timeout(wait) {
                        Ok(j) => queue.push(j),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    let now = Instant::now();
                    let (due, later): (Vec<Job>, Vec<Job>) =
                        queue.drain(..).partition(|j| j.due <= now);
                    queue = later;
                    for j in due {
                        let _ = if j.to_b {
                            sock_b.send_to(&j.data, b)
                        } else {
                            sock_a.send_to(&j.data, a)
                        };
                    }
                }
            }));
        }
        Ok(Relay {
            a_side,
            b_side,
            setting,
            stop,
            threads,
        })
    }

    pub fn set(&self, s: Impairment) {
        if let Ok(mut cur) = self.setting.lock() {
            *cur = s;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
