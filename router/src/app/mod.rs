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
use ipnetwork::IpNetwork;
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
use crate::{rotation, uapi, warm};

mod queues;
mod sources;

use queues::{crypto_worker_count, QueueSpec, Queues};
use sources::SourceParts;

/// Name of the TUN device.
const DEFAULT_INTERFACE: &str = "tunmesh0";
/// TUN MTU: a 1500-byte underlay minus WireGuard over IPv6 (80 bytes), so
/// nothing fragments whichever family the underlay uses.
const DEFAULT_MTU: u16 = 1420;
/// Where the router keeps its key, status and the CNI plugin's node state.
const DEFAULT_STATE_DIR: &str = "/var/lib/tunmesh";
/// Where container runtimes look for CNI configuration.
const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Metrics and health endpoints (all interfaces: the DaemonSet's probes
/// and Prometheus reach the node's address).
const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9475";
/// WireGuard's usual port.
const DEFAULT_PORT: u16 = 51820;

#[derive(Parser, Debug)]
#[command(
    name = "tunmesh-router",
    version,
    about = "tunmesh node agent: encrypted pod networking over a userspace WireGuard mesh",
    long_about = "tunmesh node agent: encrypted pod networking over a userspace WireGuard mesh.\n\n\
        By default peers come from Node objects (Kubernetes API, in-cluster or --kubeconfig): \
        one peer per other Node, its spec.podCIDRs routed to it. With --mesh-file they come \
        from a static TOML file instead."
)]
pub struct Args {
    /// Static mesh file (TOML): this node's key, port and pod CIDRs, and its
    /// peers, instead of the Kubernetes API. Re-read on SIGHUP; a bad file
    /// is refused and the last good mesh kept.
    #[arg(long, env = "TUNMESH_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,
    /// This router's Node (Kubernetes mode; the DaemonSet passes
    /// spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then the
    /// in-cluster ServiceAccount).
    #[arg(long, env = "TUNMESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// UDP port for WireGuard (Kubernetes mode; a mesh file names its own).
    #[arg(long, env = "TUNMESH_LISTEN_PORT", default_value_t = DEFAULT_PORT)]
    pub listen_port: u16,
    /// Endpoint published for peers (`IP:port`); default: the Node's
    /// InternalIP and --listen-port. A `tunmesh.io/force-endpoint`
    /// annotation set on the Node by an operator wins over both.
    #[arg(long, env = "TUNMESH_ENDPOINT")]
    pub endpoint: Option<SocketAddr>,
    /// Private key file, created (mode 0600) if missing and kept across
    /// restarts (Kubernetes mode; default: <state-dir>/private.key).
    #[arg(long, env = "TUNMESH_PRIVATE_KEY_FILE")]
    pub private_key_file: Option<PathBuf>,
    /// The cluster's pod networks, comma-separated (Kubernetes mode):
    /// routed into the TUN even where no peer exists, so such traffic is
    /// dropped and counted instead of leaving the node in clear.
    #[arg(long, env = "TUNMESH_CLUSTER_CIDRS", value_delimiter = ',')]
    pub cluster_cidrs: Vec<IpNetwork>,
    /// Persistent keepalive for every peer, seconds (Kubernetes mode; 0 = off).
    #[arg(long, env = "TUNMESH_PERSISTENT_KEEPALIVE", default_value_t = 0)]
    pub persistent_keepalive: u16,
    /// Rebuild the mesh from the Node store this often even without a change.
    #[arg(long, env = "TUNMESH_RESYNC_SECONDS", default_value_t = 30)]
    pub resync_seconds: u64,
    /// Name of the TUN device the router creates.
    #[arg(long, env = "TUNMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    pub interface: String,
    /// MTU of the TUN device and of pods. Default: derived from the
    /// underlay (its smallest link's MTU, less 60 for WireGuard over IPv4 or
    /// 80 over IPv6 only); each peer's path MTU is found either way, and a
    /// packet too big for it gets ICMP from the pod's gateway.
    #[arg(long, env = "TUNMESH_MTU")]
    pub mtu: Option<u16>,
    /// Use TUN offloads (virtio headers: TSO/USO super-packets are segmented
    /// by the router, received TCP segments are coalesced). Falls back to
    /// plain packets if the kernel refuses.
    #[arg(long, env = "TUNMESH_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set)]
    pub offload: bool,
    /// Data-plane queues: TUN queues (multi-queue device) and UDP sockets
    /// (SO_REUSEPORT), each with one worker thread for both directions.
    /// Peers are spread over them; one flow stays on one queue. 0: one per
    /// CPU, at most 4.
    #[arg(long, env = "TUNMESH_QUEUES", default_value_t = 0)]
    pub queues: usize,
    /// Crypto workers: the threads that encrypt and decrypt a batch
    /// together, so that one flow (one peer on one queue) can use more
    /// than one core while its packets leave in order. The queue worker
    /// that read a batch is one of them; the others are helper threads
    /// that take a share of its packets when they are free. 0: a helper
    /// for every CPU that no queue's worker has (none with as many queues
    /// as CPUs); 1: no helpers.
    #[arg(long, env = "TUNMESH_CRYPTO_WORKERS", default_value_t = 0)]
    pub crypto_workers: usize,
    /// Directory for the router's state: key, status.json, node.json.
    #[arg(long, env = "TUNMESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Where to write the CNI network configuration list (10-tunmesh.conflist)
    /// once the node has a pod CIDR; empty: do not write one.
    #[arg(long, env = "TUNMESH_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR, value_parser = path_or_empty)]
    pub cni_conf_dir: PathBuf,
    /// Address for Prometheus metrics, /healthz and /readyz; empty: none.
    #[arg(long, env = "TUNMESH_METRICS_ADDRESS", default_value = DEFAULT_METRICS_ADDRESS)]
    pub metrics_address: String,
    /// Directory of the WireGuard userspace API socket (`wg show` looks in
    /// /var/run/wireguard); empty: no socket.
    #[arg(long, env = "TUNMESH_UAPI_DIR", default_value = crate::uapi::SOCKET_DIR, value_parser = path_or_empty)]
    pub uapi_dir: PathBuf,
    /// Chain the reference portmap plugin after tunmesh-cni in the conflist
    /// (as `tunmesh-portmap`, which the DaemonSet's init step installs), so
    /// that pods' hostPorts work (IPv4 and IPv6).
    #[arg(long, env = "TUNMESH_HOST_PORTS", default_value_t = true, action = clap::ArgAction::Set)]
    pub host_ports: bool,
    /// Where the CNI plugin keeps its address allocations (default:
    /// <state-dir>/cni); must survive reboots.
    #[arg(long, env = "TUNMESH_CNI_DATA_DIR")]
    pub cni_data_dir: Option<PathBuf>,
    /// Where the host's /proc/sys is: forwarding and the TUN's rp_filter are
    /// set there at start and checked again every resync. In a container
    /// /proc/sys is read-only: mount the host's /proc/sys/net at <dir>/net
    /// and point this at <dir>.
    #[arg(long, env = "TUNMESH_PROC_SYS", default_value = hostnet::PROC_SYS)]
    pub proc_sys: PathBuf,
    /// Warm start (Kubernetes mode): the last applied mesh is kept in
    /// <state-dir>/mesh-cache.json and brought up at start, before the API
    /// server answers, if the API confirmed it less than this many seconds
    /// ago. 0: no cache (start cold, wait for the API).
    #[arg(long, env = "TUNMESH_WARM_START_MAX_AGE", default_value_t = warm::DEFAULT_MAX_AGE.as_secs())]
    pub warm_start_max_age: u64,
    /// Rotate the node's key when it is older than this (168h, 7d, 30m;
    /// off: only `tunmesh-ctl rotate-key` rotates it). Kubernetes mode.
    #[arg(long, env = "TUNMESH_KEY_ROTATION", default_value = "off", value_parser = duration_arg)]
    pub key_rotation: DurationArg,
    /// How long a key rotation waits for every peer to handshake with the
    /// new key before it completes anyway (peers that were down learn the
    /// new key from the Node when they come back).
    #[arg(long, env = "TUNMESH_KEY_ROTATION_GRACE", default_value = "10m", value_parser = duration_arg)]
    pub key_rotation_grace: DurationArg,
    /// What this router does after handing over to a new one started on
    /// the same node: exit, or wait (holding nothing) for SIGTERM, as a
    /// DaemonSet with maxSurge needs (an exited container is restarted).
    #[arg(
        long,
        env = "TUNMESH_AFTER_HANDOVER",
        value_enum,
        default_value = "exit"
    )]
    pub after_handover: handover::AfterHandover,
    /// Internal: the process a router becomes after a handover with
    /// `--after-handover wait`.
    #[arg(long = "parked-after-handover", hide = true)]
    pub parked: bool,
}

/// A path flag where an empty value means "none" (clap's own path parser
/// refuses empty values).
fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// A duration flag (`168h`, `30m`; `off` or `0`: none).
#[derive(Debug, Clone, Copy)]
pub struct DurationArg(pub Option<Duration>);

fn duration_arg(text: &str) -> Result<DurationArg, rotation::RotationError> {
    rotation::parse_duration(text).map(DurationArg)
}

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
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let src = sources::open(&args, underlay_mtu).await?;
    let dp = data_plane(&src, mtu, &args);
    let rotation = rotation::Rotation::new(
        src.key_file.clone(),
        src.announce,
        args.key_rotation.0,
        args.key_rotation_grace.0.unwrap_or(rotation::DEFAULT_GRACE),
    );

    // A router running here hands its queues and sessions over; else the
    // queues are opened (waiting for a dying predecessor to let go).
    let me = successor::Me {
        state_dir: &args.state_dir,
        public_key: &dp.public_key(),
        interface: &args.interface,
        port: src.port,
    };
    let mut taken = successor::take_over(&me, faults, &mut Adopt(&dp))
        .context("taking over from the running router")?;
    let q = match taken.as_mut() {
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
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Handed over: the peers with their live sessions and the workers at
    // once (the kernel holds what arrived meanwhile); the rest follows.
    let (early_workers, handover_gap_us) = match taken.as_mut() {
        Some(t) => {
            let (w, gap) = run_handed_over(&dp, t, &q.io, &stop, faults)?;
            (Some(w), Some(gap))
        }
        None => (None, None),
    };

    // The host side.
    let index = host.link_index(&args.interface).await?;
    let host_problems = hostnet::prepare_sysctls(&args.proc_sys, &args.interface, false);
    info!(
        interface = %args.interface, mtu, port = q.port, queues = q.io.len(), public_key = %dp.public_key(),
        node = %src.node_name, source = src.source.kind(),
        rcvbuf = q.rcvbuf, sndbuf = q.sndbuf, tun_offload = q.tun_offload,
        udp_gso = q.udp_gso, udp_gro = q.udp_gro, io = q.io_kind, "router up"
    );

    // What the router serves: metrics and health, the WireGuard API.
    let source_status: SharedStatus = Arc::default();
    let health = Health::new(Arc::clone(&dp), Arc::clone(&source_status));
    health
        .host_problems
        .store(host_problems.len() as u64, Ordering::Relaxed);
    serve_metrics(&args.metrics_address, &health).await?;
    let (uapi_tx, uapi_changes) = tokio::sync::mpsc::unbounded_channel();
    let uapi_socket = if args.uapi_dir.as_os_str().is_empty() {
        None
    } else {
        let path = uapi::socket_path(&args.uapi_dir, &args.interface);
        let listener = uapi::bind(&args.uapi_dir, &args.interface)
            .with_context(|| format!("WireGuard API socket {}", path.display()))?;
        tokio::spawn(uapi::serve(listener, Arc::clone(&dp), q.port, uapi_tx));
        info!(socket = %path.display(), "WireGuard API for `wg show`");
        Some(path)
    };

    // The reconciler: data plane, TUN routes and addresses, CNI files.
    let mut reconciler = Reconciler::new(
        Arc::clone(&dp),
        TunLink {
            host: host.clone(),
            index,
            name: args.interface.clone(),
            mtu: u32::from(mtu),
        },
        cni_files(&args),
        NodeIdentity {
            node_name: src.node_name.clone(),
            interface: args.interface.clone(),
            mtu,
            cluster_cidrs: src.cluster_cidrs.clone(),
        },
    );
    // A handed-over device is up with its gateways and routes: left as it
    // is (bringing it up "with no gateway" would take them away a moment).
    if taken.is_none() {
        reconciler.bring_up().await?;
    }

    // Handed over: the previous process's mesh and live sessions. Warm
    // start: the last applied mesh, at once, before the source answers.
    let owner = warm::Owner::new(&src.node_name, &dp.public_key(), &args.interface, q.port);
    let (start, cache) = match taken.take() {
        Some(t) => {
            // The peers are in place already: this puts the host side and
            // the CNI files in line (normally a no-op: they are as the old
            // left them).
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
            let keeper = src.warm_start.then(|| {
                warm::Keeper::new(args.state_dir.clone(), owner.clone(), src.key_file.clone())
            });
            (start, keeper)
        }
        None if src.warm_start => {
            let start = warm_start(&args, &owner, &mut reconciler, &health, &dp).await;
            let keeper = warm::Keeper::new(args.state_dir.clone(), owner, src.key_file.clone());
            (start, Some(keeper))
        }
        None => (
            warm::StartStatus {
                kind: "cold".into(),
                ..Default::default()
            },
            None,
        ),
    };

    let workers = match early_workers {
        Some(w) => w,
        None => dp.spawn(&q.io, Arc::clone(&stop))?,
    };
    let handover = match handover::listen(&args.state_dir) {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "no handover socket: an upgrade of this router will restart it cold");
            None
        }
    };
    let daemon = Daemon {
        dp,
        reconciler,
        health,
        source_status,
        queues: q.real,
        settings: daemon::Settings {
            interface: args.interface,
            listen_port: q.port,
            state_dir: args.state_dir,
            proc_sys: args.proc_sys,
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            uapi_socket,
            start,
            key_file: src.key_file,
            mtu,
            after_handover: args.after_handover,
        },
        uapi_changes,
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

/// Warm start: the cached mesh, applied before the source answers; how
/// the start went (or why the cache was refused).
async fn warm_start<H, C>(
    args: &Args,
    owner: &warm::Owner,
    reconciler: &mut Reconciler<Arc<Dataplane>, H, C>,
    health: &Health,
    dp: &Dataplane,
) -> warm::StartStatus
where
    H: crate::hostnet::HostApplier,
    C: crate::reconcile::CniFiles,
{
    let loaded = warm::load(
        &args.state_dir,
        owner,
        crate::model::unix_now(),
        Duration::from_secs(args.warm_start_max_age),
    );
    let start = warm::StartStatus::from_load(&loaded);
    match loaded {
        Ok(Some(cached)) => {
            // Only the peers that had a session handshake at once.
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
        Ok(None) => info!("cold start: no warm-start cache yet"),
        Err(e) => warn!(error = %e, "cold start: the cache is ignored; waiting for the source"),
    }
    start
}

#[cfg(test)]
mod tests {
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
