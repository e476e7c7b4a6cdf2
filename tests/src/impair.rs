//! A userspace impairment relay for the underlay: this kernel has no
//! `netem`, so loss, delay, reordering, duplication and a link going down
//! are applied by a UDP relay that two nodes' WireGuard traffic is steered
//! through (with `tunmesh.io/force-endpoint`). Node A talks to the relay's
//! port `a_side`, which forwards to B from port `b_side`, and back.
//!
//! The relay counts what it did (`counts()`), so a test can assert that
//! the impairment it asked for happened to its traffic, and that its
//! traffic went through the relay at all.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// Hold datagrams until this many of one direction are held (or
    /// `BURST_WAIT` passed), then send them newest first: the oldest of a
    /// burst arrives that many behind the newest (0: off).
    pub reverse_burst: usize,
}

/// How long a partial burst is held before it goes out reversed anyway.
pub const BURST_WAIT: Duration = Duration::from_millis(100);

pub struct Relay {
    pub a_side: SocketAddr,
    pub b_side: SocketAddr,
    pub setting: Arc<Mutex<Impairment>>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// What the relay did, both directions together.
#[derive(Debug, Default)]
struct Counters {
    received: AtomicU64,
    forwarded: AtomicU64,
    dropped_loss: AtomicU64,
    dropped_down: AtomicU64,
    duplicated: AtomicU64,
    delayed: AtomicU64,
    reordered: AtomicU64,
    held_us: AtomicU64,
    /// Datagrams handed to the sender and not yet sent on.
    in_flight: AtomicU64,
    /// The most a datagram was sent behind a later arrival of its direction.
    max_behind: AtomicU64,
}

/// A copy of the relay's counters; subtract two for what happened between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Datagrams that arrived at the relay.
    pub received: u64,
    /// Datagrams sent on (duplicates included).
    pub forwarded: u64,
    /// Dropped by the loss setting.
    pub dropped_loss: u64,
    /// Dropped because the link was down.
    pub dropped_down: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Sent on at least a millisecond after they arrived.
    pub delayed: u64,
    /// Sent on after a datagram of the same direction that arrived later.
    pub reordered: u64,
    /// Time datagrams were held in all, microseconds.
    pub held_us: u64,
    /// The most arrivals a datagram was sent behind (0 in order; the
    /// largest reordering so far, not a difference when subtracted).
    pub max_behind: u64,
}

impl Counts {
    /// Mean time a forwarded datagram was held.
    pub fn mean_hold(&self) -> Duration {
        Duration::from_micros(self.held_us / self.forwarded.max(1))
    }
}

impl std::ops::Sub for Counts {
    type Output = Counts;
    fn sub(self, o: Counts) -> Counts {
        Counts {
            received: self.received - o.received,
            forwarded: self.forwarded - o.forwarded,
            dropped_loss: self.dropped_loss - o.dropped_loss,
            dropped_down: self.dropped_down - o.dropped_down,
            duplicated: self.duplicated - o.duplicated,
            delayed: self.delayed - o.delayed,
            reordered: self.reordered - o.reordered,
            held_us: self.held_us - o.held_us,
            max_behind: self.max_behind,
        }
    }
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "relay: {} in, {} out, {} lost, {} dropped while down, {} duplicated, {} delayed (mean hold {:.1} ms), {} reordered (at most {} behind)",
            self.received,
            self.forwarded,
            self.dropped_loss,
            self.dropped_down,
            self.duplicated,
            self.delayed,
            self.mean_hold().as_secs_f64() * 1000.0,
            self.reordered,
            self.max_behind
        )
    }
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
    /// Part of a reversed burst of this size (0: sent when due).
    burst: usize,
    due: Instant,
    arrived: Instant,
    /// Arrival order within its direction (duplicates share it).
    seq: u64,
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
        let counters = Arc::new(Counters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel::<Job>();
        let mut threads = Vec::new();
        // Receivers: decide each datagram's fate, hand survivors to the sender.
        for (sock, to_b, seed) in [
            (sock_a.try_clone()?, true, 0x9e37_79b9_7f4a_7c15u64),
            (sock_b.try_clone()?, false, 0xd1b5_4a32_d192_ed03),
        ] {
            let (setting, stop, tx, c) = (
                Arc::clone(&setting),
                Arc::clone(&stop),
                tx.clone(),
                Arc::clone(&counters),
            );
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(seed);
                let mut buf = vec![0u8; 65536];
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let arrived = Instant::now();
                    c.received.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    let s = setting.lock().map(|s| *s).unwrap_or_default();
                    if s.down {
                        c.dropped_down.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if rng.unit() < s.loss {
                        c.dropped_loss.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let copies = if rng.unit() < s.duplicate { 2 } else { 1 };
                    for _ in 0..copies {
                        let extra = s.jitter.mul_f64(rng.unit());
                        c.in_flight.fetch_add(1, Ordering::Relaxed);
                        let _ = tx.send(Job {
                            burst: s.reverse_burst,
                            due: arrived + s.delay + extra,
                            arrived,
                            seq,
                            data: buf[..n].to_vec(),
                            to_b,
                        });
                    }
                    if copies > 1 {
                        c.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        drop(tx);
        // Sender: releases datagrams when they are due (a heap by due time).
        {
            let (stop, c) = (Arc::clone(&stop), Arc::clone(&counters));
            threads.push(std::thread::spawn(move || {
                let mut queue: Vec<Job> = Vec::new();
                let mut bursts: [Vec<Job>; 2] = [Vec::new(), Vec::new()];
                // The latest arrival sent on so far, per direction (to A, to B).
                let mut latest = [0u64; 2];
                while !stop.load(Ordering::Relaxed) {
                    let wait = queue
                        .iter()
                        .map(|j| j.due.saturating_duration_since(Instant::now()))
                        .min()
                        .unwrap_or(Duration::from_millis(20))
                        .min(if bursts.iter().any(|b| !b.is_empty()) {
                            Duration::from_millis(5)
                        } else {
                            Duration::from_secs(1)
                        });
                    match rx.recv_timeout(wait) {
                        Ok(j) => queue.push(j),
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    let now = Instant::now();
                    let (mut due, later): (Vec<Job>, Vec<Job>) =
                        queue.drain(..).partition(|j| j.due <= now);
                    queue = later;
                    due.sort_by_key(|j| j.due);
                    // Reversed bursts: per direction, held until full (or
                    // BURST_WAIT after the first), then newest first.
                    let mut out = Vec::new();
                    for j in due {
                        if j.burst == 0 {
                            out.push(j);
                            continue;
                        }
                        let d = usize::from(j.to_b);
                        bursts[d].push(j);
                    }
                    for held in bursts.iter_mut() {
                        let full = held.first().is_some_and(|j| {
                            held.len() >= j.burst || j.arrived.elapsed() >= BURST_WAIT
                        });
                        if full {
                            out.extend(held.drain(..).rev());
                        }
                    }
                    for j in out {
                        let sent = if j.to_b {
                            sock_b.send_to(&j.data, b)
                        } else {
                            sock_a.send_to(&j.data, a)
                        };
                        c.in_flight.fetch_sub(1, Ordering::Relaxed);
                        if sent.is_err() {
                            continue;
                        }
                        let held = Instant::now() - j.arrived;
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                        c.held_us
                            .fetch_add(held.as_micros() as u64, Ordering::Relaxed);
                        if held >= Duration::from_millis(1) {
                            c.delayed.fetch_add(1, Ordering::Relaxed);
                        }
                        let last = &mut latest[usize::from(j.to_b)];
                        if j.seq < *last {
                            c.reordered.fetch_add(1, Ordering::Relaxed);
                            c.max_behind.fetch_max(*last - j.seq, Ordering::Relaxed);
                        }
                        *last = (*last).max(j.seq);
                    }
                }
            }));
        }
        Ok(Relay {
            a_side,
            b_side,
            setting,
            counters,
            stop,
            threads,
        })
    }

    /// What the relay has done so far.
    pub fn counts(&self) -> Counts {
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Counts {
            received: l(&c.received),
            forwarded: l(&c.forwarded),
            dropped_loss: l(&c.dropped_loss),
            dropped_down: l(&c.dropped_down),
            duplicated: l(&c.duplicated),
            delayed: l(&c.delayed),
            reordered: l(&c.reordered),
            held_us: l(&c.held_us),
            max_behind: l(&c.max_behind),
        }
    }

    /// Waits (up to `timeout`) until the relay holds no datagram, so that
    /// what it does next is counted apart from what it was still delaying.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        crate::netns::wait_for(timeout, || {
            (self.counters.in_flight.load(Ordering::Relaxed) == 0).then_some(())
        })
        .is_some()
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
