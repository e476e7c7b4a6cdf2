//! The data plane's threads: the I/O around the engine's steps.
//!
//! One worker per queue (a TUN queue and its UDP socket) runs both
//! directions to completion, plus one timer thread. Each owns the batches
//! it fills (allocated once at start, reused for every batch):
//!
//! ```text
//! worker  UDP recv_batch ─ open ─ TUN send_batch (packets), UDP send_batch
//!         (replies), then while flush_waiting fills a batch: UDP send_batch;
//!         TUN recv_batch ─ seal ─ UDP send_batch;
//!         until both are empty, then poll on both
//! timers  every TICK: tick ─ UDP send_batch; the load limiter reset every second
//! ```
//!
//! What a TUN write sets off in the kernel (the receiving TCP stack's ACK,
//! the sending stack's next segments) lands on the same queue and is picked
//! up by the same worker on its next turn, without waking another. The
//! kernel keeps a peer's datagrams on one socket (by its address and port)
//! and a flow on one TUN queue, so no flow is reordered and a peer's
//! traffic stays on one worker: queues spread peers over cores.
//!
//! Every thread is supervised: one that panics or returns while the router
//! runs is recorded with why (`Dataplane::workers`), which `/healthz`
//! reports, so the liveness probe restarts the router.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

use super::counters::Drop;
use super::engine::{Dataplane, Plan, WorkerSlot, TICK};
use super::io::{Batch, Queue, TunIo, UdpIo, BATCH};

/// How long a worker waits for I/O before checking whether to stop.
pub const POLL: Duration = Duration::from_millis(200);
/// How long a worker over in-memory fakes (no descriptor to poll) idles.
const FAKE_IDLE: Duration = Duration::from_micros(200);

impl Dataplane {
    /// Starts one worker thread per queue (a TUN queue and the UDP socket
    /// paired with it, both directions) and one timer thread. They run until
    /// `stop` is set (checked at least every `POLL`).
    pub fn spawn(
        self: &Arc<Self>,
        queues: &[Queue],
        stop: Arc<AtomicBool>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let Some((_, first_udp)) = queues.first() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the data plane needs at least one queue",
            ));
        };
        self.rearm();
        self.running.store(0, Ordering::Relaxed);
        // A new generation: the slots of workers stopped before are gone.
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut handles = Vec::new();
        for (q, (tun, udp)) in queues.iter().enumerate() {
            let (dp, tun, udp, run) = (
                Arc::clone(self),
                Arc::clone(tun),
                Arc::clone(udp),
                Arc::clone(&stop),
            );
            handles.push(self.supervised(format!("queue-{q}"), &stop, move || {
                dp.queue_loop(&*tun, &*udp, &run)
            })?);
        }
        {
            let (dp, udp, run) = (Arc::clone(self), Arc::clone(first_udp), Arc::clone(&stop));
            handles
                .push(self.supervised("timers".into(), &stop, move || dp.timer_loop(&*udp, &run))?);
        }
        info!(public_key = %self.public_key(), queues = queues.len(), "data plane running");
        Ok(handles)
    }

    /// Starts `body` on a thread named `tm-<name>` and records, in the
    /// worker list `workers()` reports, if it ends (returns or panics)
    /// while `stop` is not set.
    fn supervised(
        self: &Arc<Self>,
        name: String,
        stop: &Arc<AtomicBool>,
        body: impl FnOnce() + Send + 'static,
    ) -> io::Result<JoinHandle<()>> {
        let slot = {
            let mut w = self.workers.lock().unwrap_or_else(|p| p.into_inner());
            w.push(WorkerSlot {
                name: name.clone(),
                failure: None,
            });
            w.len() - 1
        };
        let (dp, stop) = (Arc::clone(self), Arc::clone(stop));
        std::thread::Builder::new()
            .name(format!("tm-{name}"))
            .spawn(move || {
                let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let why = match ended {
                    Ok(()) => "its loop returned".to_string(),
                    Err(p) => format!("panicked: {}", panic_message(p.as_ref())),
                };
                error!(worker = %name, reason = %why, "data-plane worker died; /healthz fails from now on so that the router is restarted");
                let mut w = dp.workers.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = w.get_mut(slot) {
                    s.failure = Some(why);
                }
            })
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.wake.as_ref().map(|w| w.as_raw_fd())
    }

    /// Wakes every worker from its poll, to see that `stop` is set: call
    /// after setting it. Until `rearm`, their polls return at once.
    pub fn wake_workers(&self) {
        if let Some(w) = self.wake_fd() {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writing 8 bytes from a live buffer to our eventfd.
            let _ = unsafe { libc::write(w, one.as_ptr().cast(), one.len()) };
        }
    }

    /// Clears the wake-up, before workers are started again.
    fn rearm(&self) {
        if let Some(w) = self.wake_fd() {
            let mut buf = [0u8; 8];
            // SAFETY: reading 8 bytes into a live buffer from our eventfd
            // (non-blocking: EAGAIN when it was not written).
            let _ = unsafe { libc::read(w, buf.as_mut_ptr().cast(), buf.len()) };
        }
    }

    /// Waits until every worker of the current generation (`spawn`'s
    /// queues and the timer thread) has entered its loop, for at most
    /// `timeout`; whether they all did.
    pub fn wait_running(&self, workers: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.running.load(Ordering::Relaxed) < workers {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }

    /// The data-plane threads and how each is doing.
    pub fn workers(&self) -> Vec<WorkerSlot> {
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The workers that died, `name: reason` each.
    pub fn dead_workers(&self) -> Vec<String> {
        self.workers()
            .into_iter()
            .filter_map(|w| Some(format!("{}: {}", w.name, w.failure?)))
            .collect()
    }

    /// Sends and empties `out`, counting what the kernel refused.
    fn send_udp(&self, out: &mut Batch, udp: &dyn UdpIo) {
        let sent = send(out, |b| udp.send_batch(b));
        self.account(sent, &self.counters.udp_tx_datagrams, Drop::SendFailed);
    }

    /// Writes and empties `out` to the TUN device, counting refusals.
    fn send_tun(&self, out: &mut Batch, tun: &dyn TunIo) {
        let sent = send(out, |b| tun.send_batch(b));
        self.account(sent, &self.counters.tun_tx_packets, Drop::TunWriteFailed);
    }

    fn account(&self, (sent, refused): (u64, u64), ok: &AtomicU64, why: Drop) {
        ok.fetch_add(sent, Ordering::Relaxed);
        self.counters.drop_n(why, refused);
    }

    /// One queue's worker, both directions, run to completion: datagrams
    /// are opened and written to the TUN queue, then packets waiting on the
    /// TUN queue are sealed and sent, until both are empty; only then does
    /// it sleep in `poll` on both.
    fn queue_loop(&self, tun: &dyn TunIo, udp: &dyn UdpIo, stop: &AtomicBool) {
        let size = self.buf_size();
        let mut from_tun = Batch::new(BATCH, size);
        let mut to_udp = Batch::new(BATCH, size);
        let mut from_udp = Batch::new(BATCH, size);
        let mut to_tun = Batch::with_offset(BATCH, size, tun.write_offset());
        let mut plan = Plan::new();
        let mut tun_errors = ErrorLog::new("reading the TUN device");
        let mut udp_errors = ErrorLog::new("receiving UDP");
        let mut poll_errors = ErrorLog::new("waiting for packets");
        let fds = tun.raw_fd().zip(udp.raw_fd());
        self.running.fetch_add(1, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            let mut busy = false;
            let got = udp.recv_batch(&mut from_udp, Duration::ZERO);
            self.counters.drop_n(Drop::Malformed, udp.take_malformed());
            if arrived(got, &mut udp_errors) {
                busy = true;
                let table = self.batch_table();
                let handshakes = self.open(&table, &from_udp, &mut to_tun, &mut to_udp, &mut plan);
                self.send_tun(&mut to_tun, tun);
                self.send_udp(&mut to_udp, udp);
                if handshakes {
                    while self.flush_waiting(&table, &mut to_udp) {
                        self.send_udp(&mut to_udp, udp);
                    }
                    self.send_udp(&mut to_udp, udp);
                }
            }
            let got = tun.recv_batch(&mut from_tun, Duration::ZERO);
            self.counters.drop_n(Drop::Malformed, tun.take_malformed());
            if arrived(got, &mut tun_errors) {
                busy = true;
                let table = self.batch_table();
                self.seal(&table, &from_tun, &mut to_udp, &mut to_tun, &mut plan);
                self.send_udp(&mut to_udp, udp);
                // ICMP replies to packets too big for their path.
                self.send_tun(&mut to_tun, tun);
            }
            if busy {
                continue;
            }
            let waited = match (fds, self.wake_fd()) {
                (Some((t, u)), Some(w)) => super::poll_any([t, u, w], POLL).map(|_| ()),
                (Some((t, u)), None) => super::poll_any([t, u], POLL).map(|_| ()),
                // In-memory fakes have nothing to poll: look again shortly.
                (None, _) => {
                    std::thread::sleep(FAKE_IDLE);
                    Ok(())
                }
            };
            if let Err(e) = waited {
                poll_errors.record(&e);
            }
        }
    }

    /// The timers: every peer's every `TICK`, sent from the first socket.
    fn timer_loop(&self, udp: &dyn UdpIo, stop: &AtomicBool) {
        let mut out = Batch::new(BATCH, self.buf_size());
        let mut last_reset = Instant::now();
        // After a warm start the first tick comes at once: its peers'
        // initiations go now, not a tick later. (Not on a cold start: nodes
        // starting together would cross their initiations for nothing.)
        let mut first = self.first_tick_at_once.load(Ordering::Relaxed);
        self.running.fetch_add(1, Ordering::Relaxed);
        while !stop.load(Ordering::Relaxed) {
            if !std::mem::take(&mut first) {
                match self.wake_fd() {
                    Some(w) => {
                        let _ = super::poll_any([w], TICK);
                    }
                    None => std::thread::sleep(TICK),
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            let mut from = 0;
            while let Some(next) = self.tick(&mut out, from) {
                self.send_udp(&mut out, udp);
                from = next;
            }
            self.send_udp(&mut out, udp);
            if last_reset.elapsed() >= Duration::from_secs(1) {
                self.reset_rate_limiter();
                last_reset = Instant::now();
            }
        }
    }
}

/// Hands `out` to `send` and empties it; returns (sent, refused).
fn send(out: &mut Batch, send: impl FnOnce(&mut Batch) -> io::Result<usize>) -> (u64, u64) {
    if out.n == 0 {
        return (0, 0);
    }
    let sent = match send(out) {
        Ok(sent) => sent.min(out.n),
        Err(e) => {
            debug!(error = %e, "batch send failed");
            0
        }
    };
    let refused = out.n - sent;
    out.n = 0;
    (sent as u64, refused as u64)
}

/// The text of a panic's payload (`panic!` with a literal or a format).
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Whether a receive brought packets; an error is logged (rate-limited).
fn arrived(got: io::Result<usize>, errors: &mut ErrorLog) -> bool {
    match got {
        Ok(n) => n > 0,
        Err(e) => {
            errors.record(&e);
            false
        }
    }
}

/// Logs a repeating I/O error at most once per second with a count, and
/// backs off briefly so a broken device does not spin a core.
struct ErrorLog {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn new(what: &'static str) -> Self {
        ErrorLog {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn record(&mut self, e: &io::Error) {
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            warn!(error = %e, repeated = self.suppressed, "{}", self.what);
            self.last = Some(Instant::now());
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
