//! The instruments of the restart and handover tests: a numbered UDP probe
//! between two namespaces (every send and every echo kept, with its time),
//! and the longest silence in a list of moments.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::netns::{self, in_netns};

/// Probe period.
pub const PERIOD: Duration = Duration::from_millis(10);

/// The longest time without a point in `[from, to]`, counted from the last
/// point at or before `from` and up to `to` itself (so something that
/// stopped and never came back is silent to the end of the window). `None`
/// when no point came before `from`: there is nothing to measure from.
pub fn longest_silence(points: &[Instant], from: Instant, to: Instant) -> Option<Duration> {
    let start = *points.iter().rev().find(|x| **x <= from)?;
    let mut p: Vec<Instant> = vec![start];
    p.extend(points.iter().copied().filter(|x| *x > from && *x <= to));
    p.push(to.max(start));
    Some(p.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default())
}

/// A numbered UDP datagram every `PERIOD` from one namespace to an echo
/// server in another, for the whole test (nothing is cleared, so an outage
/// is measured from the last echo before the fault, and a lost probe is a
/// number that never came back).
pub struct Probe {
    stop: Arc<AtomicBool>,
    /// While set, nothing is sent (a CPU measurement without traffic).
    paused: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<Instant>>>,
    /// Echoes by number, with when each came back (the first copy).
    echoes: Arc<Mutex<BTreeMap<u64, Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    /// Starts the echo server in `to` and the probe in `from`, to `dst`.
    pub fn start(from: &str, to: &str, dst: Ipv4Addr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let server = in_netns(to, || UdpSocket::bind("0.0.0.0:0"))
            .expect("entering the echo server's namespace")
            .expect("binding the echo server");
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("echo server timeout");
        let port = server.local_addr().expect("echo server address").port();
        let client = in_netns(from, || UdpSocket::bind("0.0.0.0:0"))
            .expect("entering the probe's namespace")
            .expect("binding the probe");
        client
            .set_read_timeout(Some(Duration::from_millis(2)))
            .expect("probe timeout");
        let sent: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let echoes: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
        let mut threads = Vec::new();
        let s = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        }));
        let paused = Arc::new(AtomicBool::new(false));
        let (s, sent2, echoes2, p) = (
            Arc::clone(&stop),
            Arc::clone(&sent),
            Arc::clone(&echoes),
            Arc::clone(&paused),
        );
        threads.push(std::thread::spawn(move || {
            let dst = SocketAddr::new(dst.into(), port);
            let mut next = Instant::now();
            let mut buf = [0u8; 64];
            while !s.load(Ordering::Relaxed) {
                if Instant::now() >= next && p.load(Ordering::Relaxed) {
                    next += PERIOD;
                } else if Instant::now() >= next {
                    if let Ok(mut sent) = sent2.lock() {
                        let seq = sent.len() as u64;
                        let _ = client.send_to(&seq.to_be_bytes(), dst);
                        sent.push(Instant::now());
                    }
                    next += PERIOD;
                }
                if let Ok(8) = client.recv(&mut buf) {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&buf[..8]);
                    if let Ok(mut e) = echoes2.lock() {
                        e.entry(u64::from_be_bytes(n)).or_insert_with(Instant::now);
                    }
                }
            }
        }));
        Probe {
            stop,
            paused,
            sent,
            echoes,
            threads,
        }
    }

    /// Stops sending (until `resume`), for a measurement without traffic.
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
    }

    /// When each echo came back, in order.
    pub fn echoes(&self) -> Vec<Instant> {
        let mut e: Vec<Instant> = self
            .echoes
            .lock()
            .map(|e| e.values().copied().collect())
            .unwrap_or_default();
        e.sort();
        e
    }

    /// The last echo at or before `t`.
    pub fn last_before(&self, t: Instant) -> Option<Instant> {
        self.echoes().into_iter().rev().find(|e| *e <= t)
    }

    /// The first echo after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.echoes().into_iter().find(|e| *e > t)
    }

    /// The longest silence between `from` and `to` (see `longest_silence`).
    pub fn silence(&self, from: Instant, to: Instant) -> Option<Duration> {
        longest_silence(&self.echoes(), from, to)
    }

    /// Waits until an echo arrives after `t`; returns it.
    pub fn wait_echo_after(&self, t: Instant, what: &str) -> Instant {
        netns::wait_for(Duration::from_secs(30), || self.first_after(t))
            .unwrap_or_else(|| panic!("{what}: pod-to-pod traffic did not come back within 30 s"))
    }

    /// Asserts the probe is flowing right now: an echo within the last 10
    /// probe periods.
    pub fn assert_flowing(&self, what: &str) {
        let now = Instant::now();
        let recent = netns::wait_for(Duration::from_secs(30), || {
            self.last_before(Instant::now())
                .filter(|e| e.elapsed() < PERIOD * 10)
                .map(|_| ())
        });
        assert!(
            recent.is_some(),
            "{what}: the probe is not flowing (last echo {:?} before {now:?})",
            self.last_before(now)
        );
    }

    /// The numbers sent in `[from, to]` that never came back (late ones are
    /// waited for, up to 2 s).
    pub fn lost(&self, from: Instant, to: Instant) -> Vec<u64> {
        let window: Vec<u64> = self
            .sent
            .lock()
            .map(|sent| {
                (0..sent.len())
                    .filter(|i| sent[*i] >= from && sent[*i] <= to)
                    .map(|i| i as u64)
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            window.len() > 10,
            "the probe sent {} in the window",
            window.len()
        );
        let missing = || -> Vec<u64> {
            let e = self.echoes.lock().map(|e| e.clone()).unwrap_or_default();
            window
                .iter()
                .copied()
                .filter(|s| !e.contains_key(s))
                .collect()
        };
        netns::wait_for(Duration::from_secs(2), || {
            missing().is_empty().then_some(())
        });
        missing()
    }

    /// When the first probe went.
    pub fn first_sent(&self) -> Option<Instant> {
        self.sent.lock().ok()?.first().copied()
    }

    /// The probes sent in `[from, to]`: (number, when).
    pub fn sent_between(&self, from: Instant, to: Instant) -> Vec<(u64, Instant)> {
        self.sent
            .lock()
            .map(|s| {
                s.iter()
                    .enumerate()
                    .filter(|(_, t)| **t >= from && **t <= to)
                    .map(|(i, t)| (i as u64, *t))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Of `sent`, those that never came back (late ones are waited for,
    /// up to 2 s).
    pub fn lost_of(&self, sent: &[(u64, Instant)]) -> Vec<(u64, Instant)> {
        let missing = || -> Vec<(u64, Instant)> {
            let e = self.echoes.lock().map(|e| e.clone()).unwrap_or_default();
            sent.iter()
                .copied()
                .filter(|(n, _)| !e.contains_key(n))
                .collect()
        };
        netns::wait_for(Duration::from_secs(2), || {
            missing().is_empty().then_some(())
        });
        missing()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_measured_from_the_last_point_before_the_fault() {
        // Points at 0, 10, 20 ms, then nothing until 500 ms.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let p = [t0, t0 + ms(10), t0 + ms(20), t0 + ms(500), t0 + ms(510)];
        // A fault at 25 ms: silent from the point at 20 to the one at 500.
        assert_eq!(
            longest_silence(&p, t0 + ms(25), t0 + ms(510)),
            Some(ms(480))
        );
        // Traffic that never came back: silent to the end of the window.
        assert_eq!(
            longest_silence(&p, t0 + ms(600), t0 + ms(2600)),
            Some(ms(2090))
        );
        // Nothing before the fault: nothing to measure from.
        assert_eq!(longest_silence(&p, t0 - ms(1), t0 + ms(600)), None);
    }
}
