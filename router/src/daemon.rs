//! The router's main loop. It selects on three kinds of thing only: the
//! peer source's snapshot channel, signals, and timers.
//!
//! - a snapshot: the reconciler applies it (on failure: again in 2 s);
//! - SIGHUP: passed to the source as a reload request; SIGTERM/SIGINT: stop;
//! - a `wg set` through the WireGuard API: the source's mesh is applied
//!   again one resync later (until then the change stands);
//! - every resync: forwarding and the TUN's rp_filter checked and set back;
//! - every second: the status snapshot written and the health tick.
//!
//! On stop it removes the API socket, stops the data-plane workers and
//! waits for them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::dataplane::Dataplane;
use crate::handover::{self, Answer, HandoverError, Reply};
use crate::hostnet;
use crate::hostnet::HostApplier;
use crate::metrics::Health;
use crate::model::unix_now;
use crate::reconcile::{CniFiles, Reconciler};
use crate::source::file::RawFile;
use crate::source::{PeerSource, Request, SharedStatus};
use crate::status::{self, RealQueue, Status};

/// How often the status snapshot is rewritten and the health tick given.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// The longest the status snapshot goes unwritten (thousands of peers).
pub const STATUS_INTERVAL_MAX: Duration = Duration::from_secs(60);
/// Early enough that a once-a-second write falls on every tick.
const STATUS_SLACK: Duration = Duration::from_millis(100);
/// How often each peer's path MTU is looked up again.
pub const PATH_MTU_INTERVAL: Duration = Duration::from_secs(5);
/// The most addresses one round of path MTU lookups asks the kernel about.
pub const PATH_LOOKUPS: usize = 256;
/// How long after a failed apply the last snapshot is applied again.
pub const RETRY: Duration = Duration::from_secs(2);

/// What the loop needs besides the reconciler.
pub struct Settings {
    pub interface: String,
    pub listen_port: u16,
    pub state_dir: PathBuf,
    /// Where the host's /proc/sys is (sysctls).
    pub proc_sys: PathBuf,
    /// How often host settings are checked again (and the source resyncs).
    pub resync: Duration,
    /// The WireGuard API socket to remove on stop, if one was made.
    pub uapi_socket: Option<PathBuf>,
    /// How this router started (warm from the cache, or cold and why).
    pub start: crate::warm::StartStatus,
    /// The private key's file (named in the handed-over mesh).
    pub key_file: PathBuf,
    /// The TUN device's and pods' MTU.
    pub mtu: u16,
    /// What this process does once it has handed over.
    pub after_handover: handover::AfterHandover,
}

/// Why the loop ended other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("installing the {0} handler: {1}")]
    Signal(&'static str, #[source] std::io::Error),
    #[error("the {0} source stopped")]
    SourceStopped(&'static str),
}

pub struct Daemon<H, C> {
    pub dp: Arc<Dataplane>,
    pub reconciler: Reconciler<Arc<Dataplane>, H, C>,
    pub health: Arc<Health>,
    pub source_status: SharedStatus,
    pub queues: Vec<RealQueue>,
    pub settings: Settings,
    /// Fires after each `wg set` that changed something.
    pub uapi_changes: mpsc::UnboundedReceiver<()>,
    /// Host settings the router could not make (forwarding, rp_filter).
    pub host_problems: Vec<String>,
    /// Set to stop the data-plane workers, which are joined on stop.
    pub stop: Arc<AtomicBool>,
    pub workers: Vec<JoinHandle<()>>,
    /// The warm-start cache, kept current (none: not kept).
    pub cache: Option<crate::warm::Keeper>,
    /// Where a successor asks to take over (none: no handover).
    pub handover: Option<tokio::net::UnixListener>,
    /// Key rotation, stepped every second.
    pub rotation: crate::rotation::Rotation,
    /// Where routes are looked up for each peer's path MTU.
    pub paths: hostnet::HostNet,
    /// The path MTUs last found, by peer.
    pub path_mtus: std::collections::BTreeMap<String, u16>,
    /// Where the next round of path MTU lookups goes on among the peers
    /// not in use.
    pub path_cursor: usize,
    /// Handovers to a successor that failed, and the last one's why.
    pub handovers: crate::status::HandoverStatus,
    /// When the status snapshot is written next, and how long it waits
    /// between writes.
    pub status_at: Instant,
    pub status_every: Duration,
}

async fn accept(l: &Option<tokio::net::UnixListener>) -> std::io::Result<tokio::net::UnixStream> {
    match l {
        Some(l) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<H: HostApplier, C: CniFiles> Daemon<H, C> {
    /// Runs `source` and the loop until SIGTERM or SIGINT, then stops the
    /// data plane.
    pub async fn run(mut self, source: Box<dyn PeerSource>) -> Result<(), DaemonError> {
        let kind = source.kind();
        let (updates, mut from_source) = mpsc::unbounded_channel();
        let (requests, source_requests) = mpsc::unbounded_channel();
        tokio::spawn(source.run(updates, source_requests, Arc::clone(&self.source_status)));
        let sig = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|e| DaemonError::Signal(name, e))
        };
        let mut hup = sig(SignalKind::hangup(), "SIGHUP")?;
        let mut term = sig(SignalKind::terminate(), "SIGTERM")?;
        let mut int = sig(SignalKind::interrupt(), "SIGINT")?;
        let mut tick = tokio::time::interval(STATUS_INTERVAL);
        let resync = self.settings.resync;
        let mut host_check = tokio::time::interval_at(Instant::now() + resync, resync);
        let mut path_check = tokio::time::interval(PATH_MTU_INTERVAL);
        let mut status_failing = false;
        // After a failed apply, the latest snapshot is applied again then.
        let mut retry_at: Option<Instant> = None;
        // After a `wg set`, the source's mesh is applied again then.
        let mut reapply_at: Option<Instant> = None;
        let result = loop {
            tokio::select! {
                update = from_source.recv() => {
                    let Some(first) = update else {
                        break Err(DaemonError::SourceStopped(kind));
                    };
                    // Whatever queued up meanwhile goes in one apply.
                    let mut batch = vec![first];
                    while let Ok(more) = from_source.try_recv() {
                        batch.push(more);
                    }
                    if let Some(u) = crate::source::fold(batch) {
                        let r = self.reconciler.apply_update(&u).await;
                        retry_at = self.applied(r, kind).await;
                    }
                }
                _ = sleep_until(retry_at) => {
                    retry_at = self.reapply(kind).await;
                }
                _ = hup.recv() => {
                    let _ = requests.send(Request::Reload);
                }
                _ = term.recv() => break Ok(()),
                _ = int.recv() => break Ok(()),
                Some(()) = self.uapi_changes.recv() => {
                    reapply_at.get_or_insert_with(|| Instant::now() + resync);
                }
                _ = sleep_until(reapply_at) => {
                    reapply_at = None;
                    info!("re-applying the source's mesh over `wg set` changes");
                    retry_at = self.reapply(kind).await;
                }
                _ = host_check.tick() => {
                    self.confirm_cache();
                    self.host_problems = hostnet::prepare_sysctls(
                        &self.settings.proc_sys, &self.settings.interface, true);
                    self.health.host_problems.store(self.host_problems.len() as u64, Ordering::Relaxed);
                }
                _ = tick.tick() => self.report(&mut status_failing),
                _ = path_check.tick() => self.check_paths().await,
                conn = accept(&self.handover) => match conn {
                    Ok(conn) => {
                        if let Err(f) = self.hand_over(conn) {
                            self.report_handover(&f, &requests);
                        }
                    }
                    Err(e) => warn!(error = %e, "handover socket"),
                },
            }
        };
        self.shutdown();
        result
    }

    /// After an apply: on failure says so and returns when to try again.
    async fn applied(
        &mut self,
        r: Result<crate::reconcile::Applied, crate::reconcile::ReconcileError>,
        kind: &str,
    ) -> Option<Instant> {
        match r {
            Ok(applied) => {
                self.health.ready.store(true, Ordering::Relaxed);
                self.health.reconciles.fetch_add(1, Ordering::Relaxed);
                // New peers in use get their path MTU now, not at the next
                // check.
                if !applied.peers.added.is_empty() || !applied.peers.replaced.is_empty() {
                    self.check_paths().await;
                }
                if let Some(c) = &mut self.cache {
                    c.changed();
                }
                None
            }
            Err(e) => {
                self.health.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                error!(source = kind, error = %e, "applying the mesh failed; retrying in 2 s");
                Some(Instant::now() + RETRY)
            }
        }
    }

    /// The whole desired mesh again.
    async fn reapply(&mut self, kind: &str) -> Option<Instant> {
        let r = self.reconciler.reapply().await?;
        self.applied(r, kind).await
    }

    /// Writes the warm-start cache: the desired mesh and the peers in use.
    fn save_cache(&mut self) {
        let (Some(c), Some(snap)) = (&mut self.cache, self.reconciler.snapshot()) else {
            return;
        };
        c.save(&snap, &self.dp.active_peers());
    }

    /// Every resync: the cached mesh is confirmed if the source is in touch
    /// with what it reads (a mesh file always is; the API while connected).
    fn confirm_cache(&mut self) {
        let healthy = self
            .source_status
            .lock()
            .map(|s| !matches!(&s.kubernetes, Some(k) if !k.connected))
            .unwrap_or(false);
        if healthy && self.cache.as_ref().is_some_and(|c| c.written()) {
            self.save_cache();
        }
    }

    /// Serves one successor (see `handover`). When the successor forwards,
    /// this process exits here (or parks), leaving device, routes, sockets
    /// and sessions to it. On any failure the workers run again: with the
    /// same sessions while the successor cannot have sealed (no Ack yet),
    /// with fresh handshakes once it may have; the failure says at which
    /// step and why.
    fn hand_over(&mut self, conn: tokio::net::UnixStream) -> Result<(), HandoverFailure> {
        use handover::{Outcome, Progress, Released, LEGACY_FORMAT};
        let early = |why: String| HandoverFailure {
            step: "before the state was sent",
            why,
            resumed: Resumed::NotStopped,
        };
        let sock = conn
            .into_std()
            .and_then(|s| s.set_nonblocking(false).map(|()| s))
            .map_err(|e| early(e.to_string()))?;
        let hello = handover::read_hello(&sock).map_err(|e| early(e.to_string()))?;
        let refuse = |why: String| {
            let _ = handover::send(&sock, &Reply::Refuse(why.clone()), &[]);
            early(format!("refused: {why}"))
        };
        if hello.format != handover::FORMAT && hello.format != LEGACY_FORMAT {
            return Err(refuse(format!(
                "the new router speaks handover format {}, this one {} (or {LEGACY_FORMAT})",
                hello.format,
                handover::FORMAT
            )));
        }
        let legacy = hello.format == LEGACY_FORMAT;
        let Some(snap) = self.reconciler.snapshot() else {
            return Err(refuse("no mesh applied yet".into()));
        };
        let Some((tun0, udp0)) = self.queues.first() else {
            return Err(refuse("this router's queues cannot be handed over".into()));
        };
        let (tun_offload, udp_offload) = (tun0.offload(), udp0.offloads().1);
        info!(
            pid = hello.pid,
            format = hello.format,
            "handing over to a new router"
        );
        let mut state = handover::State {
            format: hello.format,
            pid: std::process::id(),
            stopped_unix_nanos: 0,
            public_key: self.dp.public_key().to_base64(),
            interface: self.settings.interface.clone(),
            listen_port: self.settings.listen_port,
            tun_offload,
            udp_offload,
            queues: self.queues.len(),
            mesh: RawFile::from_snapshot(&snap, &self.settings.key_file, self.settings.listen_port),
            sessions: Vec::new(),
            indices: self
                .dp
                .table()
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.index))
                .collect(),
        };
        let queues = self.queues.clone();
        let fds = handover::queue_fds(&queues);
        let answer = |sock: &std::os::unix::net::UnixStream| -> Result<(), HandoverError> {
            sock.set_read_timeout(Some(handover::ACK_TIMEOUT))?;
            match handover::recv::<Answer>(sock)?.0 {
                Answer::Ack | Answer::Ready => Ok(()),
                Answer::Nack(why) => Err(HandoverError::Nack(why)),
            }
        };
        let (count, sent) = if legacy {
            // Format 1: stop first, the sessions in the state.
            self.stop_workers();
            let (at, sessions) = self.export();
            state.stopped_unix_nanos = at;
            state.sessions = sessions.iter().map(handover::WireSession::from).collect();
            state.indices.clear();
            let sent = handover::send(&sock, &Reply::State(Box::new(state)), &fds)
                .and_then(|()| answer(&sock));
            (sessions.len(), sent)
        } else {
            // The state and descriptors while still forwarding; the new
            // router builds its peers; only then the stop.
            let ready = handover::send(&sock, &Reply::State(Box::new(state)), &fds)
                .and_then(|()| answer(&sock));
            if let Err(e) = ready {
                return Err(HandoverFailure {
                    step: "before it was ready",
                    why: silence(&e, handover::ACK_TIMEOUT),
                    resumed: Resumed::NotStopped,
                });
            }
            self.stop_workers();
            let (at, sessions) = self.export();
            let bytes = handover::wire::encode(&sessions);
            let sent = handover::send(
                &sock,
                &handover::Sessions {
                    stopped_unix_nanos: at,
                    count: sessions.len(),
                },
                &[],
            )
            .and_then(|()| handover::send_bytes(&sock, &bytes))
            .and_then(|()| answer(&sock));
            (sessions.len(), sent)
        };
        if let Err(e) = sent {
            // The successor sealed nothing: the sessions go on as they were.
            self.resume(false);
            return Err(HandoverFailure {
                step: "before its Ack",
                why: silence(&e, handover::ACK_TIMEOUT),
                resumed: Resumed::SameSessions,
            });
        }
        let released = handover::send(
            &sock,
            &Released {
                pid: std::process::id(),
            },
            &[],
        );
        if legacy {
            // That version starts its workers at Released: committed now.
            warn!(
                pid = hello.pid,
                "the new router speaks the legacy handover format: committing at its Ack"
            );
            self.commit(hello.pid, count);
        }
        // From Released on the successor may seal: a failure now means
        // fresh sessions. Until Forwarding, everything to resume is here.
        let forwarding = released
            .and_then(|()| {
                sock.set_read_timeout(Some(handover::FORWARD_TIMEOUT))?;
                handover::recv::<Progress>(&sock)
            })
            .map(|(p, _)| p);
        match forwarding {
            Ok(Progress::Forwarding) => {
                let _ = handover::send(&sock, &Outcome::Committed, &[]);
                self.commit(hello.pid, count)
            }
            Err(e) => {
                let why = silence(&e, handover::FORWARD_TIMEOUT);
                let _ = handover::send(&sock, &Outcome::Resuming(why.clone()), &[]);
                drop(sock);
                self.resume(true);
                Err(HandoverFailure {
                    step: "after its Ack, before it was forwarding",
                    why,
                    resumed: Resumed::FreshSessions,
                })
            }
        }
    }

    /// With the workers stopped: when they stopped, and every live session.
    fn export(&self) -> (u128, Vec<crate::dataplane::PeerSession>) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        (at, self.dp.export_sessions(handover::COUNTER_MARGIN))
    }

    /// The handover is committed: this process never seals again. Not
    /// `shutdown`: the device, the routes, the API socket's path and the
    /// sockets are the new router's now.
    fn commit(&self, pid: u32, peers: usize) -> ! {
        info!(pid, peers, after = ?self.settings.after_handover, "handed over");
        if self.settings.after_handover == handover::AfterHandover::Wait {
            // Every descriptor is close-on-exec: the parked image holds
            // none of them.
            let e = handover::park();
            error!(error = %e, "could not park after the handover; exiting");
        }
        std::process::exit(0);
    }

    /// Stops the data-plane workers and waits for them.
    fn stop_workers(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.dp.wake_workers();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }

    /// Starts the workers again on the same queues (a handover that
    /// failed). `fresh`: every session is dropped first and every peer
    /// handshaken with at once, because the successor may have sealed with
    /// those keys.
    fn resume(&mut self, fresh: bool) {
        if fresh {
            let peers = self.dp.fresh_sessions();
            self.dp.first_tick_at_once.store(true, Ordering::Relaxed);
            info!(
                peers,
                "sessions dropped: handshaking afresh with every peer"
            );
        }
        let io = status::queue_io(&self.queues);
        self.stop = Arc::new(AtomicBool::new(false));
        match self.dp.spawn(&io, Arc::clone(&self.stop)) {
            Ok(w) => {
                self.workers = w;
                info!("workers running again");
            }
            Err(e) => error!(error = %e, "starting the workers again failed; /healthz fails"),
        }
    }

    /// A failed handover: in the log, status, metrics and an Event on
    /// this router's Node.
    fn report_handover(&mut self, f: &HandoverFailure, requests: &mpsc::UnboundedSender<Request>) {
        warn!(step = f.step, reason = %f.why, resumed = f.resumed.text(), "handover failed; this router goes on serving");
        let reason = if f.resumed == Resumed::NotStopped {
            "HandoverRefused"
        } else {
            "HandoverFailed"
        };
        self.health
            .handover_failures
            .fetch_add(1, Ordering::Relaxed);
        let message = f.to_string();
        self.handovers.failed += 1;
        self.handovers.last_failure = Some(crate::status::HandoverFailureStatus {
            at_unix: unix_now(),
            message: message.clone(),
        });
        let _ = requests.send(Request::Event { reason, message });
        // status.json says so at once, as the Event does.
        self.status_at = Instant::now();
    }

    /// Each peer's path MTU: the MTU of the route to its endpoint (a path
    /// MTU the kernel learned included) and of the peer's own underlay
    /// link (its Node says), less WireGuard's overhead for the endpoint's
    /// family. The data plane answers packets over it with ICMP. Every
    /// round looks up the peers in use and, in turn, the others, at most
    /// `PATH_LOOKUPS` addresses: with thousands of peers every one is
    /// known within minutes, and one that comes into use is looked up at
    /// the next round.
    async fn check_paths(&mut self) {
        let active: std::collections::HashSet<String> =
            self.dp.active_peers().into_iter().collect();
        let all: Vec<(String, std::net::SocketAddr)> = self
            .dp
            .peer_endpoints()
            .into_iter()
            .filter_map(|(name, ep)| Some((name, ep?)))
            .collect();
        let known: std::collections::HashSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        self.path_mtus.retain(|n, _| known.contains(n.as_str()));
        let start = self.path_cursor % all.len().max(1);
        let rest = all[start..]
            .iter()
            .chain(&all[..start])
            .filter(|(n, _)| !active.contains(n));
        let mut peers: Vec<(String, std::net::SocketAddr)> = Vec::new();
        let mut ips: Vec<std::net::IpAddr> = Vec::new();
        let mut taken = 0;
        for (name, ep) in all.iter().filter(|(n, _)| active.contains(n)).chain(rest) {
            if !ips.contains(&ep.ip()) {
                if ips.len() >= PATH_LOOKUPS {
                    break;
                }
                ips.push(ep.ip());
            }
            peers.push((name.clone(), *ep));
            if !active.contains(name) {
                taken += 1;
            }
        }
        self.path_cursor = start + taken;
        let routes = match self.paths.route_mtus(&ips).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "looking up path MTUs");
                vec![None; ips.len()]
            }
        };
        let route_of = |ip: &std::net::IpAddr| {
            ips.iter()
                .position(|i| i == ip)
                .and_then(|k| routes.get(k).copied().flatten())
        };
        let mut found = Vec::new();
        for (name, ep) in peers {
            let theirs = self
                .reconciler
                .desired()
                .and_then(|d| d.peers.get(&name))
                .and_then(|p| p.underlay_mtu)
                .map(u32::from);
            let Some(m) = route_of(&ep.ip()).into_iter().chain(theirs).min() else {
                continue;
            };
            let path = hostnet::inner_mtu(m, ep.is_ipv4());
            if self.path_mtus.get(&name) != Some(&path) {
                if path < self.settings.mtu {
                    warn!(peer = %name, path_mtu = path, mtu = self.settings.mtu,
                          "the path to this peer is narrower than the MTU in use: bigger packets to it get ICMP too-big from the gateway");
                } else {
                    debug!(peer = %name, path_mtu = path, "path MTU");
                }
            }
            self.path_mtus.insert(name.clone(), path);
            found.push((name, path));
        }
        self.dp.set_path_mtus(&found);
    }

    /// The next key the API shows on this router's Node.
    fn announced_next_key(&self) -> Option<String> {
        self.source_status
            .lock()
            .ok()
            .and_then(|s| s.kubernetes.as_ref()?.announced_next_key.clone())
    }

    /// A key rotation's step; a new current key goes into the warm-start
    /// cache's header too.
    fn rotate(&mut self) {
        let announced = self.announced_next_key();
        if let Some(key) = self.rotation.tick(&self.dp, announced.as_deref()) {
            if let Some(c) = &mut self.cache {
                c.owner.public_key = key.to_base64();
            }
            self.save_cache();
        }
    }

    /// The health tick and the status snapshot.
    fn report(&mut self, failing: &mut bool) {
        self.rotate();
        self.health.last_tick.store(unix_now(), Ordering::Relaxed);
        let queues = status::queues(&self.queues);
        if let Ok(mut q) = self.health.queues.lock() {
            q.clone_from(&queues);
        }
        let key = self
            .rotation
            .status(&self.dp, self.announced_next_key().as_deref());
        if let Ok(mut k) = self.health.key.lock() {
            k.clone_from(&key);
        }
        if self.cache.as_ref().is_some_and(|c| c.due()) {
            self.save_cache();
        }
        if Instant::now() < self.status_at {
            return;
        }
        // The snapshot lists every peer: with thousands of them it is
        // written less often, so that writing it costs at most a
        // quarter of a percent of a core.
        // NB: the cost is this thread's CPU time, not the wall clock: on a
        // busy machine a write preempted for 15 ms would otherwise stretch
        // the next one's wait past 5 s for a 300-peer snapshot.
        let began = thread_cpu_time();
        let source = self
            .source_status
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        let s = Status::collect(
            &self.dp,
            status::Context {
                interface: &self.settings.interface,
                listen_port: self.settings.listen_port,
                offload: self.queues.iter().map(|(t, _)| t.offload_stats()).sum(),
                queues,
                source,
                pod_cidrs: self.reconciler.pod_cidrs(),
                host_problems: &self.host_problems,
                start: &self.settings.start,
                key,
                mtu: self.settings.mtu,
                handovers: self.handovers.clone(),
                rewritten_every: self.status_every,
            },
        );
        match s.write(&self.settings.state_dir) {
            Ok(()) => *failing = false,
            Err(e) if !*failing => {
                warn!(error = %e, "writing status");
                *failing = true;
            }
            Err(_) => {}
        }
        let cost = thread_cpu_time().saturating_sub(began);
        let every = (cost * 400).clamp(STATUS_INTERVAL, STATUS_INTERVAL_MAX);
        self.status_every = every;
        self.status_at = Instant::now() + every - STATUS_SLACK;
    }

    fn shutdown(&mut self) {
        info!("stopping");
        if let Some(sock) = &self.settings.uapi_socket {
            let _ = std::fs::remove_file(sock);
        }
        self.stop_workers();
    }
}

/// How a failed handover left this router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resumed {
    /// It had not stopped yet (a refused or broken Hello).
    NotStopped,
    /// It resumed with its sessions: the successor sealed nothing.
    SameSessions,
    /// It resumed with fresh handshakes: the successor may have sealed.
    FreshSessions,
}

impl Resumed {
    pub fn text(self) -> &'static str {
        match self {
            Resumed::NotStopped => "never stopped",
            Resumed::SameSessions => "resumed with its sessions",
            Resumed::FreshSessions => "resumed with fresh handshakes with every peer",
        }
    }
}

/// A handover that did not happen, and where it broke off.
#[derive(Debug, Clone, thiserror::Error)]
#[error("a new router took over and failed {step}: {why}; this router {}", .resumed.text())]
pub struct HandoverFailure {
    pub step: &'static str,
    pub why: String,
    pub resumed: Resumed,
}

/// What a successor's failure to answer says: silent for the whole
/// timeout, gone, or something else.
fn silence(e: &HandoverError, timeout: Duration) -> String {
    match e {
        HandoverError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!("it said nothing for {} s", timeout.as_secs_f32())
        }
        HandoverError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            "it closed the handover socket (it exited or died)".into()
        }
        other => other.to_string(),
    }
}

/// CPU time this thread has used.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the live `t`.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if r != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}
