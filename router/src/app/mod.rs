//! The router as a program: its flags (`Args`) and the startup, step by
//! step: the peer source and the key, then either the running router's
//! queues and sessions (a handover) or new queues, the host side, what the
//! router serves (metrics, the WireGuard API), the reconciler with a warm
//! start from the cache, and the main loop (`daemon::Daemon`).
//!
//! `tunmesh-router`'s `main` is `app::main(&NoFaults)`. A test build
//! passes its own `handover::Faults` to fail a handover at a chosen step;
//! nothing in the router can.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tunmesh_contract::PluginSettings;

use crate::daemon::{self, Daemon};
use crate::dataplane::Dataplane;
use crate::handover::successor::{self, Taken};
use crate::handover::{self, Faults, Step};
use crate::hostnet::{self, HostNet, TunLink};
use crate::metrics::{self, Health};
use crate::reconcile::{absolute, CniStateFiles, NodeIdentity, Reconciler};
use crate::source::SharedStatus;
use crate::{rotation, startup, uapi, warm};

mod args;
mod queues;
mod sources;

use args::DEFAULT_MTU;
pub use args::{Args, DurationArg};

use queues::{crypto_worker_count, QueueSpec, Queues};
use sources::SourceParts;

/// The router's `main`: logging, flags, a runtime, `run`.
pub fn main(faults: &dyn Faults) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            // kube's client logs every failed request at ERROR; the source
            // reports API failures itself, once, with what to do about them.
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,kube_client::client::builder=off")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunmesh-router: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, faults)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tunmesh-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A router that handed over with `--after-handover wait`: nothing but a
/// process for kubelet to stop.
async fn parked() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    info!("handed over to a new router on this node; holding nothing, waiting for SIGTERM");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// `--mtu`, or the underlay's smallest link less WireGuard's overhead; and
/// the underlay MTU to publish for the peers.
async fn resolve_mtu(args: &Args, host: &HostNet) -> (u16, Option<u16>) {
    let underlay = match host.underlay_mtu(&args.interface).await {
        Ok(u) => u,
        Err(e) => {
            warn!(error = %e, "cannot read the underlay's MTU");
            None
        }
    };
    let published = underlay.and_then(|(m, _)| u16::try_from(m).ok());
    if let Some(m) = args.mtu {
        return (m, published);
    }
    match underlay {
        Some((m, v4)) => {
            let mtu = hostnet::inner_mtu(m, v4);
            info!(
                underlay_mtu = m,
                mtu, "MTU derived from the underlay (--mtu not set)"
            );
            (mtu, published)
        }
        None => {
            warn!(
                mtu = DEFAULT_MTU,
                "no underlay link with an address found; MTU {DEFAULT_MTU}"
            );
            (DEFAULT_MTU, published)
        }
    }
}

/// The data plane with the node's key (and a rotation's next key).
fn data_plane(src: &SourceParts, mtu: u16, args: &Args) -> Arc<Dataplane> {
    let dp = Dataplane::new(&src.key, usize::from(mtu));
    dp.start_crypto_workers(crypto_worker_count(
        args.crypto_workers,
        queues::queue_count(args.queues),
    ));
    if let Some(next) = &src.next_key {
        info!(next = %next.public_key(), "a key rotation is under way: answering handshakes to both keys");
        dp.set_next_key(Some(next));
    }
    dp
}

/// What a handover builds in this router's data plane: the peers from the
/// mesh (before the old router stops), then their sessions.
struct Adopt<'a>(&'a Dataplane);

impl successor::Prepare for Adopt<'_> {
    fn peers(&mut self, snapshot: &crate::model::Snapshot, indices: &[(String, u32)]) {
        self.0.adopt_indices(indices);
        self.0.apply(&snapshot.mesh);
    }

    fn sessions(&mut self, sessions: Vec<crate::dataplane::PeerSession>) -> usize {
        self.0.install_sessions(sessions)
    }
}

/// The data plane running on a handed-over router's queues (its peers and
/// sessions in place): the workers started, and the old router told (the
/// handover commits then). Returns the workers and the gap from the old
/// workers' stop to the new ones' start.
fn run_handed_over(
    dp: &Arc<Dataplane>,
    t: &mut Taken,
    io: &[crate::dataplane::Queue],
    stop: &Arc<AtomicBool>,
    faults: &dyn Faults,
) -> anyhow::Result<(Vec<std::thread::JoinHandle<()>>, u64)> {
    faults.at(Step::BeforeWorkers);
    let workers = dp.spawn(io, Arc::clone(stop))?;
    let gap = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos().saturating_sub(t.stopped_unix_nanos))
        .unwrap_or(0);
    if !dp.wait_running(io.len() + 1, handover::FORWARD_TIMEOUT) {
        warn!("not every data-plane worker is running yet; telling the previous router anyway");
    }
    faults.at(Step::AfterWorkers);
    if let Err(e) = t.confirm() {
        // It serves again: stop sealing at once.
        stop.store(true, Ordering::Relaxed);
        dp.wake_workers();
        return Err(e).context("the previous router took the node back");
    }
    Ok((workers, u64::try_from(gap / 1000).unwrap_or(u64::MAX)))
}

/// The router: every step from the flags to the main loop.
pub async fn run(mut args: Args, faults: &dyn Faults) -> anyhow::Result<()> {
    if args.parked {
        return parked().await;
    }
    let host = HostNet::connect()?;
    let (mtu, underlay_mtu) = resolve_mtu(&args, &host).await;
    args.mtu = Some(mtu);
    create_state_dir(&args)?;
    let mut src = sources::open(&args, underlay_mtu).await?;
    let dp = data_plane(&src, mtu, &args);
    let rotation = key_rotation(&mut src, &args);
    let mut taken = take_over(&args, &src, &dp, faults)?;
    let q = open_queues(&args, &src, &dp, mtu, taken.as_mut())?;
    let stop = Arc::new(AtomicBool::new(false));
    let handed = match taken.as_mut() {
        Some(t) => Some(run_handed_over(&dp, t, &q.io, &stop, faults)?),
        None => None,
    };
    let (index, host_problems) = host_side(&args, &host, &src, &dp, &q, mtu).await?;
    let served = serve(&args, &dp, &q, host_problems.len()).await?;
    let mut reconciler = reconciler(&args, &src, &dp, &host, index, mtu);
    let (start, cache) = first_mesh(
        &args,
        &src,
        &dp,
        &q,
        &mut reconciler,
        &served.health,
        taken.take(),
        handed.as_ref().map(|h| h.1),
    )
    .await?;
    let workers = match handed {
        Some((w, _)) => w,
        None => dp.spawn(&q.io, Arc::clone(&stop))?,
    };
    let handover = listen_for_successor(&args);
    let daemon = Daemon {
        dp,
        reconciler,
        health: served.health,
        source_status: served.source_status,
        queues: q.real,
        settings: daemon::Settings {
            interface: args.interface,
            listen_port: q.port,
            state_dir: args.state_dir,
            proc_sys: args.proc_sys,
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            uapi_socket: served.uapi_socket,
            start,
            key_file: src.key_file,
            mtu,
            after_handover: args.after_handover,
        },
        uapi_changes: served.uapi_changes,
        host_problems,
        stop,
        workers,
        cache,
        rotation,
        paths: host,
        path_mtus: Default::default(),
        path_cursor: 0,
        handover,
        handovers: Default::default(),
        status_at: tokio::time::Instant::now(),
        status_every: crate::daemon::STATUS_INTERVAL,
    };
    daemon.run(src.source).await?;
    Ok(())
}

/// The state directory (key, status, CNI state), owner-only.
fn create_state_dir(args: &Args) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))
}

/// The key rotation's state machine, from the flags and the key file (it
/// takes the source's channel for announcing keys).
fn key_rotation(src: &mut SourceParts, args: &Args) -> rotation::Rotation {
    rotation::Rotation::new(
        src.key_file.clone(),
        src.announce.take(),
        args.key_rotation.0,
        args.key_rotation_grace.0.unwrap_or(rotation::DEFAULT_GRACE),
    )
}

/// A router running on this node hands its queues and sessions over, if
/// one does (`startup::decide` says whether to take over, wait for one, or
/// start without one).
fn take_over(
    args: &Args,
    src: &SourceParts,
    dp: &Dataplane,
    faults: &dyn Faults,
) -> anyhow::Result<Option<Taken>> {
    let me = successor::Me {
        state_dir: &args.state_dir,
        public_key: &dp.public_key(),
        interface: &args.interface,
        port: src.port,
    };
    successor::take_over(&me, faults, &mut Adopt(dp)).context("taking over from the running router")
}

/// The data plane's queues: the ones handed over, else new ones (waiting
/// for a dying predecessor to let go of the port and the TUN device).
fn open_queues(
    args: &Args,
    src: &SourceParts,
    dp: &Dataplane,
    mtu: u16,
    taken: Option<&mut Taken>,
) -> anyhow::Result<Queues> {
    Ok(match taken {
        Some(t) => Queues::real(
            std::mem::take(&mut t.queues),
            t.tun_offload,
            "tunmesh (handed over)",
        ),
        None => queues::open(&QueueSpec {
            interface: &args.interface,
            mtu,
            offload: args.offload,
            port: src.port,
            count: queues::queue_count(args.queues),
            buf_size: dp.buf_size(),
        })?,
    })
}

/// The host side: the TUN's link index, and the sysctls the router needs
/// (each it could not set is a problem for the status).
async fn host_side(
    args: &Args,
    host: &HostNet,
    src: &SourceParts,
    dp: &Dataplane,
    q: &Queues,
    mtu: u16,
) -> anyhow::Result<(u32, Vec<String>)> {
    let index = host.link_index(&args.interface).await?;
    let host_problems = hostnet::prepare_sysctls(&args.proc_sys, &args.interface, false);
    info!(
        interface = %args.interface, mtu, port = q.port, queues = q.io.len(), public_key = %dp.public_key(),
        node = %src.node_name, source = src.source.kind(),
        rcvbuf = q.rcvbuf, sndbuf = q.sndbuf, tun_offload = q.tun_offload,
        udp_gso = q.udp_gso, udp_gro = q.udp_gro, io = q.io_kind,
        crypto_workers = dp.crypto_stats().workers, "router up"
    );
    Ok((index, host_problems))
}

/// What the router serves: metrics and health, the WireGuard API.
struct Served {
    health: Arc<Health>,
    source_status: SharedStatus,
    uapi_socket: Option<PathBuf>,
    uapi_changes: tokio::sync::mpsc::UnboundedReceiver<()>,
}

async fn serve(
    args: &Args,
    dp: &Arc<Dataplane>,
    q: &Queues,
    host_problems: usize,
) -> anyhow::Result<Served> {
    let source_status: SharedStatus = Arc::default();
    let health = Health::new(Arc::clone(dp), Arc::clone(&source_status));
    health
        .host_problems
        .store(host_problems as u64, Ordering::Relaxed);
    serve_metrics(&args.metrics_address, &health).await?;
    let (uapi_tx, uapi_changes) = tokio::sync::mpsc::unbounded_channel();
    let uapi_socket = if args.uapi_dir.as_os_str().is_empty() {
        None
    } else {
        let path = uapi::socket_path(&args.uapi_dir, &args.interface);
        let listener = uapi::bind(&args.uapi_dir, &args.interface)
            .with_context(|| format!("WireGuard API socket {}", path.display()))?;
        tokio::spawn(uapi::serve(listener, Arc::clone(dp), q.port, uapi_tx));
        info!(socket = %path.display(), "WireGuard API for `wg show`");
        Some(path)
    };
    Ok(Served {
        health,
        source_status,
        uapi_socket,
        uapi_changes,
    })
}

/// The reconciler: data plane, TUN routes and addresses, CNI files.
fn reconciler(
    args: &Args,
    src: &SourceParts,
    dp: &Arc<Dataplane>,
    host: &HostNet,
    index: u32,
    mtu: u16,
) -> Reconciler<Arc<Dataplane>, TunLink, CniStateFiles> {
    Reconciler::new(
        Arc::clone(dp),
        TunLink {
            host: host.clone(),
            index,
            name: args.interface.clone(),
            mtu: u32::from(mtu),
        },
        cni_files(args),
        NodeIdentity {
            node_name: src.node_name.clone(),
            interface: args.interface.clone(),
            mtu,
            cluster_cidrs: src.cluster_cidrs.clone(),
        },
    )
}

/// The first mesh, before the source answers: the previous process's
/// (handed over, with live sessions), the cached one (a warm start), or
/// none (cold). Returns how the router started and the cache's keeper.
#[allow(clippy::too_many_arguments)]
async fn first_mesh(
    args: &Args,
    src: &SourceParts,
    dp: &Dataplane,
    q: &Queues,
    reconciler: &mut Reconciler<Arc<Dataplane>, TunLink, CniStateFiles>,
    health: &Health,
    taken: Option<Taken>,
    handover_gap_us: Option<u64>,
) -> anyhow::Result<(warm::StartStatus, Option<warm::Keeper>)> {
    let owner = warm::Owner::new(&src.node_name, &dp.public_key(), &args.interface, q.port);
    let keeper = || warm::Keeper::new(args.state_dir.clone(), owner.clone(), src.key_file.clone());
    if let Some(t) = taken {
        // A handed-over device is up with its gateways and routes, the
        // peers in place: this puts the host side and the CNI files in
        // line (normally a no-op: they are as the old router left them).
        let applied = reconciler.apply(&t.snapshot).await;
        health.ready.store(true, Ordering::Relaxed);
        info!(from_pid = t.from_pid, peers = t.snapshot.mesh.peers.len(), sessions = t.sessions,
              gap_us = handover_gap_us, result = ?applied.as_ref().map(ToString::to_string),
              "took over from the running router");
        let start = warm::StartStatus {
            kind: "handover".into(),
            peers: t.snapshot.mesh.peers.len(),
            handover_gap_us,
            ..Default::default()
        };
        return Ok((start, src.warm_start.then(keeper)));
    }
    reconciler.bring_up().await?;
    let loaded = if src.warm_start {
        Some(warm::load(
            &args.state_dir,
            &owner,
            crate::model::unix_now(),
            Duration::from_secs(args.warm_start_max_age),
        ))
    } else {
        None
    };
    let cache = match &loaded {
        None => startup::Cache::Off,
        Some(Ok(Some(_))) => startup::Cache::Usable,
        Some(Ok(None)) => startup::Cache::Missing,
        Some(Err(_)) => startup::Cache::Refused,
    };
    let seen = startup::Observed {
        predecessor: startup::Predecessor::Absent,
        port_busy: false,
        waited: Duration::ZERO,
        cache,
    };
    let start = match &loaded {
        Some(l) => warm::StartStatus::from_load(l),
        None => warm::StartStatus {
            kind: "cold".into(),
            ..Default::default()
        },
    };
    match (startup::decide(&seen), loaded) {
        (startup::Start::Warm, Some(Ok(Some(cached)))) => {
            warm_start(&cached, reconciler, health, dp).await
        }
        (_, Some(Ok(None))) => info!("cold start: no warm-start cache yet"),
        (_, Some(Err(e))) => {
            warn!(error = %e, "cold start: the cache is ignored; waiting for the source")
        }
        _ => info!("cold start: waiting for the source"),
    }
    Ok((start, src.warm_start.then(keeper)))
}

/// The socket a successor asks this router to hand over on (none: an
/// upgrade restarts the router cold).
fn listen_for_successor(args: &Args) -> Option<tokio::net::UnixListener> {
    match handover::listen(&args.state_dir) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no handover socket: an upgrade of this router will restart it cold");
            None
        }
    }
}

/// Serves metrics and health on `address` (empty: none), waiting for a
/// predecessor that still holds the port.
async fn serve_metrics(address: &str, health: &Arc<Health>) -> anyhow::Result<()> {
    if address.is_empty() {
        return Ok(());
    }
    let addr: SocketAddr = address
        .parse()
        .with_context(|| format!("--metrics-address {address:?} is not IP:port"))?;
    let waiting = std::time::Instant::now();
    let bound = loop {
        match metrics::serve(addr, Arc::clone(health)).await {
            Err(e) if queues::busy(&e) && waiting.elapsed() < queues::BUSY_WAIT => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            r => break r,
        }
    }
    .with_context(|| format!("serving metrics on {addr}"))?;
    info!(address = %bound, "metrics on /metrics, health on /healthz and /readyz");
    Ok(())
}

/// The CNI plugin's files: node.json in the state directory, the conflist
/// in `--cni-conf-dir` (none when it is empty).
fn cni_files(args: &Args) -> CniStateFiles {
    CniStateFiles {
        state_dir: args.state_dir.clone(),
        conf_dir: (!args.cni_conf_dir.as_os_str().is_empty()).then(|| args.cni_conf_dir.clone()),
        plugin: PluginSettings {
            router_state_dir: absolute(&args.state_dir),
            data_dir: absolute(
                &args
                    .cni_data_dir
                    .clone()
                    .unwrap_or_else(|| args.state_dir.join("cni")),
            ),
            log_file: None,
        },
        chain: tunmesh_contract::Chain {
            portmap: args.host_ports,
        },
    }
}

/// A warm start: the cached mesh up now; the peers that had a session
/// handshake at once.
async fn warm_start<H, C>(
    cached: &warm::Cached,
    reconciler: &mut Reconciler<Arc<Dataplane>, H, C>,
    health: &Health,
    dp: &Dataplane,
) where
    H: crate::hostnet::HostApplier,
    C: crate::reconcile::CniFiles,
{
    dp.initiate_on_first_load(cached.active.iter().cloned());
    match reconciler.apply(&cached.snapshot).await {
        Ok(applied) => {
            health.ready.store(true, Ordering::Relaxed);
            dp.first_tick_at_once.store(true, Ordering::Relaxed);
            info!(peers = cached.snapshot.mesh.peers.len(), confirmed_seconds_ago = cached.age,
                  result = %applied, "warm start: the cached mesh is up; the source's mesh replaces it when it answers");
        }
        Err(e) => {
            warn!(error = %e, "warm start: applying the cached mesh failed; the source's mesh is applied when it answers")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::args::*;
    use super::*;
    use std::path::Path;

    /// "Empty: none" works on the command line for the path flags that
    /// document it (the bench and the A/B script rely on it to keep the
    /// host's /etc/cni/net.d untouched).
    #[test]
    fn empty_path_flags_mean_none() {
        let a = Args::try_parse_from(["tunmesh-router", "--cni-conf-dir", "", "--uapi-dir", ""])
            .expect("empty values accepted");
        assert!(a.cni_conf_dir.as_os_str().is_empty());
        assert!(a.uapi_dir.as_os_str().is_empty());
        let d = Args::try_parse_from(["tunmesh-router"]).expect("defaults");
        assert_eq!(d.cni_conf_dir, Path::new(DEFAULT_CNI_CONF_DIR));
        assert_eq!(d.queues, 0);
        assert!(queues::queue_count(0) >= 1 && queues::queue_count(0) <= 4);
        assert_eq!(queues::queue_count(3), 3);
        assert_eq!(queues::crypto_worker_count(3, 2), 3);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        assert_eq!(
            queues::crypto_worker_count(0, cpus),
            1,
            "no CPU left for a helper"
        );
        assert_eq!(queues::crypto_worker_count(0, 1), cpus);
    }
}
