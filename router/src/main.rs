//! `tunmesh-router`: wiring only. Parses flags, builds the parts (the peer
//! source with the key it implies, the data plane's queues, the host side,
//! metrics and the WireGuard API, the reconciler) and hands them to the
//! library's main loop (`daemon::Daemon`).

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use ipnetwork::IpNetwork;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tunmesh_contract::PluginSettings;
use tunmesh_router::daemon::{self, Daemon};
use tunmesh_router::dataplane::tun::TunDevice;
use tunmesh_router::dataplane::udp::UdpSocket;
use tunmesh_router::dataplane::{Dataplane, Queue};
use tunmesh_router::hostnet::{self, HostNet, TunLink};
use tunmesh_router::metrics::{self, Health};
use tunmesh_router::model::OwnKeys;
use tunmesh_router::reconcile::{absolute, CniStateFiles, NodeIdentity, Reconciler};
use tunmesh_router::source::file::FileSource;
use tunmesh_router::source::kube::{self as kube_source, KubeSettings, KubeSource};
use tunmesh_router::source::{PeerSource, SharedStatus};
use tunmesh_router::status::RealQueue;
use tunmesh_router::{handover, rotation, uapi, warm, PrivateKey, PublicKey};

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
struct Args {
    /// Static mesh file (TOML): this node's key, port and pod CIDRs, and its
    /// peers, instead of the Kubernetes API. Re-read on SIGHUP; a bad file
    /// is refused and the last good mesh kept.
    #[arg(long, env = "TUNMESH_MESH_FILE")]
    mesh_file: Option<PathBuf>,
    /// This router's Node (Kubernetes mode; the DaemonSet passes
    /// spec.nodeName through the downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, then the
    /// in-cluster ServiceAccount).
    #[arg(long, env = "TUNMESH_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// UDP port for WireGuard (Kubernetes mode; a mesh file names its own).
    #[arg(long, env = "TUNMESH_LISTEN_PORT", default_value_t = DEFAULT_PORT)]
    listen_port: u16,
    /// Endpoint published for peers (`IP:port`); default: the Node's
    /// InternalIP and --listen-port. A `tunmesh.io/force-endpoint`
    /// annotation set on the Node by an operator wins over both.
    #[arg(long, env = "TUNMESH_ENDPOINT")]
    endpoint: Option<SocketAddr>,
    /// Private key file, created (mode 0600) if missing and kept across
    /// restarts (Kubernetes mode; default: <state-dir>/private.key).
    #[arg(long, env = "TUNMESH_PRIVATE_KEY_FILE")]
    private_key_file: Option<PathBuf>,
    /// The cluster's pod networks, comma-separated (Kubernetes mode):
    /// routed into the TUN even where no peer exists, so such traffic is
    /// dropped and counted instead of leaving the node in clear.
    #[arg(long, env = "TUNMESH_CLUSTER_CIDRS", value_delimiter = ',')]
    cluster_cidrs: Vec<IpNetwork>,
    /// Persistent keepalive for every peer, seconds (Kubernetes mode; 0 = off).
    #[arg(long, env = "TUNMESH_PERSISTENT_KEEPALIVE", default_value_t = 0)]
    persistent_keepalive: u16,
    /// Rebuild the mesh from the Node store this often even without a change.
    #[arg(long, env = "TUNMESH_RESYNC_SECONDS", default_value_t = 30)]
    resync_seconds: u64,
    /// Name of the TUN device the router creates.
    #[arg(long, env = "TUNMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// MTU of the TUN device and of pods. Default: derived from the
    /// underlay (its smallest link's MTU, less 60 for WireGuard over IPv4 or
    /// 80 over IPv6 only); each peer's path MTU is found either way, and a
    /// packet too big for it gets ICMP from the pod's gateway.
    #[arg(long, env = "TUNMESH_MTU")]
    mtu: Option<u16>,
    /// Use TUN offloads (virtio headers: TSO/USO super-packets are segmented
    /// by the router, received TCP segments are coalesced). Falls back to
    /// plain packets if the kernel refuses.
    #[arg(long, env = "TUNMESH_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set)]
    offload: bool,
    /// Data-plane queues: TUN queues (multi-queue device) and UDP sockets
    /// (SO_REUSEPORT), each with one worker thread for both directions.
    /// Peers are spread over them; one flow stays on one queue. 0: one per
    /// CPU, at most 4.
    #[arg(long, env = "TUNMESH_QUEUES", default_value_t = 0)]
    queues: usize,
    /// Directory for the router's state: key, status.json, node.json.
    #[arg(long, env = "TUNMESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Where to write the CNI network configuration list (10-tunmesh.conflist)
    /// once the node has a pod CIDR; empty: do not write one.
    #[arg(long, env = "TUNMESH_CNI_CONF_DIR", default_value = DEFAULT_CNI_CONF_DIR, value_parser = path_or_empty)]
    cni_conf_dir: PathBuf,
    /// Address for Prometheus metrics, /healthz and /readyz; empty: none.
    #[arg(long, env = "TUNMESH_METRICS_ADDRESS", default_value = DEFAULT_METRICS_ADDRESS)]
    metrics_address: String,
    /// Directory of the WireGuard userspace API socket (`wg show` looks in
    /// /var/run/wireguard); empty: no socket.
    #[arg(long, env = "TUNMESH_UAPI_DIR", default_value = tunmesh_router::uapi::SOCKET_DIR, value_parser = path_or_empty)]
    uapi_dir: PathBuf,
    /// Where the CNI plugin keeps its address allocations (default:
    /// <state-dir>/cni); must survive reboots.
    #[arg(long, env = "TUNMESH_CNI_DATA_DIR")]
    cni_data_dir: Option<PathBuf>,
    /// Where the host's /proc/sys is: forwarding and the TUN's rp_filter are
    /// set there at start and checked again every resync. In a container
    /// /proc/sys is read-only: mount the host's /proc/sys/net at <dir>/net
    /// and point this at <dir>.
    #[arg(long, env = "TUNMESH_PROC_SYS", default_value = hostnet::PROC_SYS)]
    proc_sys: PathBuf,
    /// Warm start (Kubernetes mode): the last applied mesh is kept in
    /// <state-dir>/mesh-cache.json and brought up at start, before the API
    /// server answers, if the API confirmed it less than this many seconds
    /// ago. 0: no cache (start cold, wait for the API).
    #[arg(long, env = "TUNMESH_WARM_START_MAX_AGE", default_value_t = warm::DEFAULT_MAX_AGE.as_secs())]
    warm_start_max_age: u64,
    /// Rotate the node's key when it is older than this (168h, 7d, 30m;
    /// off: only `tunmesh-ctl rotate-key` rotates it). Kubernetes mode.
    #[arg(long, env = "TUNMESH_KEY_ROTATION", default_value = "off", value_parser = duration_arg)]
    key_rotation: DurationArg,
    /// How long a key rotation waits for every peer to handshake with the
    /// new key before it completes anyway (peers that were down learn the
    /// new key from the Node when they come back).
    #[arg(long, env = "TUNMESH_KEY_ROTATION_GRACE", default_value = "10m", value_parser = duration_arg)]
    key_rotation_grace: DurationArg,
    /// What this router does after handing over to a new one started on
    /// the same node: exit, or wait (holding nothing) for SIGTERM, as a
    /// DaemonSet with maxSurge needs (an exited container is restarted).
    #[arg(
        long,
        env = "TUNMESH_AFTER_HANDOVER",
        value_enum,
        default_value = "exit"
    )]
    after_handover: handover::AfterHandover,
    /// Internal: the process a router becomes after a handover with
    /// `--after-handover wait`.
    #[arg(long = "parked-after-handover", hide = true)]
    parked: bool,
}

/// A path flag where an empty value means "none" (clap's own path parser
/// refuses empty values).
fn path_or_empty(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

fn main() -> ExitCode {
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
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tunmesh-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_key_mode(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "private key file is accessible by others; chmod 600 it");
        }
    }
}

/// The number of data-plane queues for `--queues` (0: one per CPU, at most 4).
fn queue_count(asked: usize) -> usize {
    match asked {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4),
        n => n,
    }
}

/// How long a starting router waits for a previous one on the node to let
/// go of its UDP port and TUN device (a router killed a moment ago, whose
/// sockets the kernel has not released yet).
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Whether `e` says another process still holds what we open.
fn busy(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE | libc::EBUSY))
}

/// Runs `open` until it stops failing with "address in use" or "busy", for
/// at most `BUSY_WAIT`; any other error, or the last one, is returned.
fn retry_busy<T>(what: &str, mut open: impl FnMut() -> std::io::Result<T>) -> std::io::Result<T> {
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match open() {
            Err(e) if busy(&e) && start.elapsed() < BUSY_WAIT => {
                if !std::mem::replace(&mut said, true) {
                    warn!(error = %e, "{what} still held (a previous router exiting?); retrying for up to {} s", BUSY_WAIT.as_secs());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(v) => {
                if said {
                    info!(
                        waited_ms = start.elapsed().as_millis() as u64,
                        "{what} free"
                    );
                }
                return Ok(v);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The data plane's queues, opened: a TUN queue and a UDP socket each.
struct Queues {
    /// tunmesh's own devices, for the status's per-queue counters.
    real: Vec<RealQueue>,
    /// What the workers read and write.
    io: Vec<Queue>,
    port: u16,
    rcvbuf: usize,
    sndbuf: usize,
    udp_gso: bool,
    udp_gro: bool,
    tun_offload: bool,
    io_kind: &'static str,
}

fn open_queues(args: &Args, port: u16, n: usize, buf_size: usize) -> anyhow::Result<Queues> {
    #[cfg(feature = "ab-crates")]
    if let Some(q) = ab_queues(args, port, n, buf_size)? {
        return Ok(q);
    }
    let _ = buf_size;
    let udps = retry_busy("UDP port", || UdpSocket::bind_group(port, args.offload, n))
        .with_context(|| format!("binding UDP port {port}"))?;
    let Some(udp) = udps.first() else {
        bail!("no UDP socket bound");
    };
    let (rcvbuf, sndbuf) = udp.buffer_sizes();
    let (udp_gso, udp_gro) = udp.offloads();
    let port = udp.port();
    let tuns = retry_busy("TUN device", || {
        TunDevice::create_queues(&args.interface, mtu(args), args.offload, n)
    })
    .with_context(|| {
        format!(
            "creating TUN device {} with {n} queue(s) (needs /dev/net/tun and CAP_NET_ADMIN)",
            args.interface
        )
    })?;
    let tun_offload = tuns.first().is_some_and(|t| t.offload());
    let real: Vec<RealQueue> = tuns
        .into_iter()
        .map(Arc::new)
        .zip(udps.into_iter().map(Arc::new))
        .collect();
    let io = tunmesh_router::status::queue_io(&real);
    Ok(Queues {
        real,
        io,
        port,
        rcvbuf,
        sndbuf,
        udp_gso,
        udp_gro,
        tun_offload,
        io_kind: "tunmesh",
    })
}

fn empty_queues() -> Queues {
    Queues {
        real: Vec::new(),
        io: Vec::new(),
        port: 0,
        rcvbuf: 0,
        sndbuf: 0,
        udp_gso: false,
        udp_gro: false,
        tun_offload: false,
        io_kind: "",
    }
}

/// The comparison harness (feature `ab-crates`): the crates' TUN and/or UDP
/// I/O in place of tunmesh's own, as `TUNMESH_AB_IO` says.
#[cfg(feature = "ab-crates")]
fn ab_queues(args: &Args, port: u16, n: usize, buf_size: usize) -> anyhow::Result<Option<Queues>> {
    use tunmesh_router::dataplane::ab_crates::{Choice, QuinnUdp, TunrsTun};
    use tunmesh_router::dataplane::{TunIo, UdpIo};
    let c = Choice::from_env();
    if !c.tunrs && !c.quinn {
        return Ok(None);
    }
    let tuns: Vec<Arc<dyn TunIo>> = if c.tunrs {
        TunrsTun::create_queues(&args.interface, mtu(args), n, buf_size)?
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TunIo>)
            .collect()
    } else {
        TunDevice::create_queues(&args.interface, mtu(args), args.offload, n)?
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TunIo>)
            .collect()
    };
    let udps: Vec<Arc<dyn UdpIo>> = if c.quinn {
        QuinnUdp::bind_group(port, n)?
            .into_iter()
            .map(|u| Arc::new(u) as Arc<dyn UdpIo>)
            .collect()
    } else {
        UdpSocket::bind_group(port, args.offload, n)?
            .into_iter()
            .map(|u| Arc::new(u) as Arc<dyn UdpIo>)
            .collect()
    };
    warn!(
        tun_rs = c.tunrs,
        quinn_udp = c.quinn,
        "I/O comparison harness in use (TUNMESH_AB_IO)"
    );
    Ok(Some(Queues {
        real: Vec::new(),
        io: tuns.into_iter().zip(udps).collect(),
        port,
        rcvbuf: 0,
        sndbuf: 0,
        udp_gso: c.quinn,
        udp_gro: c.quinn,
        tun_offload: c.tunrs,
        io_kind: "comparison harness",
    }))
}

/// What a handover gave this router: the running one's queues, mesh and
/// sessions. The old process has exited when this exists.
struct Taken {
    queues: Queues,
    snapshot: tunmesh_router::model::Snapshot,
    sessions: Vec<tunmesh_router::dataplane::PeerSession>,
    from_pid: u32,
    stopped_unix_nanos: u128,
}

/// How long a starting router keeps trying to reach a running one whose
/// handover socket is there but which handed over to someone else first
/// (two new routers at once: the second takes over from the first).
const HANDOVER_RETRY: Duration = Duration::from_secs(10);

/// Takes over from the router running on this node, if one is: `None` when
/// there is none (no socket, or nobody behind it). An error when one runs
/// but the handover failed (it goes on serving, or this router could not
/// be sure it stopped): this router must then not start.
fn take_over(args: &Args, public_key: &PublicKey, port: u16) -> anyhow::Result<Option<Taken>> {
    use tunmesh_router::handover::{self as h, Answer, HandoverError, Hello, Reply};
    let path = h::socket_path(&args.state_dir);
    let began = std::time::Instant::now();
    let (sock, state, fds) = loop {
        let sock = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // Nobody behind the socket: a router that crashed (start now),
            // or one that handed over and whose successor does not listen
            // yet while it holds the port (ask it, once it does).
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                if !h::port_busy(port) || began.elapsed() > HANDOVER_RETRY {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
        };
        info!(socket = %path.display(), "a router runs on this node; asking it to hand over");
        sock.set_read_timeout(Some(h::ACK_TIMEOUT))?;
        let hello = Hello {
            format: h::FORMAT,
            pid: std::process::id(),
        };
        let got = h::send(&sock, &hello, &[]).and_then(|()| h::recv::<Reply>(&sock));
        match got {
            Ok((Reply::State(state), fds)) => break (sock, state, fds),
            Ok((Reply::Refuse(why), _)) => return Err(HandoverError::Refused(why).into()),
            // Nothing was handed over: the one we reached went away (it
            // handed over to another new router, or died). Try again: the
            // winner listens on the same path once it runs.
            Err(HandoverError::Io(e)) if began.elapsed() < HANDOVER_RETRY => {
                info!(error = %e, "the running router went away before handing over; trying again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let nack = |why: String| {
        let _ = h::send(&sock, &Answer::Nack(why.clone()), &[]);
        anyhow::Error::from(HandoverError::Unusable(why))
    };
    if let Err(why) = h::check(&state, public_key, &args.interface) {
        return Err(nack(why));
    }
    if fds.len() != 2 * state.queues {
        return Err(nack(format!(
            "{} descriptors for {} queues",
            fds.len(),
            state.queues
        )));
    }
    let mesh = tunmesh_router::source::file::validate(&state.mesh)
        .map_err(|p| nack(format!("mesh: {}", p.join("; "))))?;
    let sessions = state
        .sessions
        .iter()
        .map(|s| s.to_session())
        .collect::<Result<Vec<_>, _>>()
        .map_err(nack)?;
    let mut fds = fds.into_iter();
    let mut tuns = Vec::new();
    for fd in fds.by_ref().take(state.queues) {
        tuns.push(Arc::new(
            TunDevice::adopt(fd, &args.interface, state.tun_offload)
                .map_err(|e| nack(e.to_string()))?,
        ));
    }
    let mut udps = Vec::new();
    for fd in fds {
        udps.push(Arc::new(
            UdpSocket::adopt(fd, state.udp_offload).map_err(|e| nack(e.to_string()))?,
        ));
    }
    let Some(udp0) = udps.first() else {
        return Err(nack("no UDP socket".into()));
    };
    let (rcvbuf, sndbuf) = udp0.buffer_sizes();
    let (udp_gso, udp_gro) = udp0.offloads();
    let real: Vec<RealQueue> = tuns.into_iter().zip(udps).collect();
    let io = tunmesh_router::status::queue_io(&real);
    h::send(&sock, &Answer::Ack, &[])?;
    // We seal nothing until the old router said it let go for good, or,
    // without a word from it, until it is gone (it may have given up on
    // our Ack and resumed: then it is still there and we must not start).
    sock.set_read_timeout(Some(h::EXIT_TIMEOUT))?;
    if let Err(e) = h::recv::<h::Released>(&sock) {
        let gone = std::time::Instant::now();
        while h::alive(state.pid) {
            if gone.elapsed() > h::EXIT_TIMEOUT {
                return Err(HandoverError::OldStayed(state.pid).into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        info!(error = %e, pid = state.pid, "no word from the previous router after our answer, but it is gone");
    }
    Ok(Some(Taken {
        queues: Queues {
            real,
            io,
            port: state.listen_port,
            rcvbuf,
            sndbuf,
            udp_gso,
            udp_gro,
            tun_offload: state.tun_offload,
            io_kind: "tunmesh (handed over)",
        },
        snapshot: tunmesh_router::model::Snapshot {
            mesh: mesh.mesh,
            pod_cidrs: mesh.node.pod_cidrs,
        },
        sessions,
        from_pid: state.pid,
        stopped_unix_nanos: state.stopped_unix_nanos,
    }))
}

/// A duration flag (`168h`, `30m`; `off` or `0`: none).
#[derive(Debug, Clone, Copy)]
struct DurationArg(Option<Duration>);

fn duration_arg(text: &str) -> Result<DurationArg, String> {
    tunmesh_router::rotation::parse_duration(text).map(DurationArg)
}

/// The peer source, and what only it knows at start.
struct SourceParts {
    source: Box<dyn PeerSource>,
    key: PrivateKey,
    /// The key a rotation under way goes to (its file is there).
    next_key: Option<PrivateKey>,
    /// Where key changes are announced (none: a mesh file, which cannot).
    announce: Option<tokio::sync::watch::Sender<OwnKeys>>,
    /// Where the key is (the warm-start cache names it, as a mesh file does).
    key_file: PathBuf,
    /// Whether a warm-start cache is kept (the Kubernetes source; a mesh
    /// file is at hand at every start anyway).
    warm_start: bool,
    port: u16,
    node_name: String,
    cluster_cidrs: Vec<IpNetwork>,
}

/// A mesh file's source: key, port and CIDRs from its `[node]` table.
fn file_source(args: &Args, path: &Path) -> anyhow::Result<SourceParts> {
    let f = FileSource::open(path)?;
    let node = f.node().clone();
    let key = PrivateKey::read_file(&node.private_key_file).context("node.private_key_file")?;
    check_key_mode(&node.private_key_file);
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        host.trim().to_string()
    });
    Ok(SourceParts {
        source: Box::new(f),
        key,
        next_key: None,
        announce: None,
        key_file: node.private_key_file.clone(),
        warm_start: false,
        port: node.listen_port,
        node_name,
        cluster_cidrs: node.cluster_cidrs,
    })
}

/// Node objects' source: the key from the state directory (made on first
/// start), the rest from the flags.
async fn kube_source(args: &Args, underlay_mtu: Option<u16>) -> anyhow::Result<SourceParts> {
    let Some(name) = args.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!("no peer source: give --node-name (or NODE_NAME) to use the Kubernetes API, or --mesh-file");
    };
    let key_path = args
        .private_key_file
        .clone()
        .unwrap_or_else(|| args.state_dir.join("private.key"));
    let (key, created) = PrivateKey::load_or_create(&key_path)
        .with_context(|| format!("private key {}", key_path.display()))?;
    check_key_mode(&key_path);
    if created {
        info!(path = %key_path.display(), "created a new private key");
    }
    let client = kube_source::client(args.kubeconfig.as_deref()).await?;
    let settings = KubeSettings {
        node_name: name.clone(),
        listen_port: args.listen_port,
        endpoint: args.endpoint,
        cluster_cidrs: args.cluster_cidrs.clone(),
        persistent_keepalive: Some(args.persistent_keepalive).filter(|k| *k > 0),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        underlay_mtu,
    };
    // A rotation that was under way when this router last stopped goes on.
    let next_key = match rotation::read_next(&rotation::next_key_file(&key_path)) {
        Ok(k) => k.filter(|k| k.public_key() != key.public_key()),
        Err(e) => {
            error!(error = %e, "the next key file is unreadable; no key rotation until it is fixed");
            None
        }
    };
    let (announce, keys) = tokio::sync::watch::channel(OwnKeys {
        current: key.public_key(),
        next: next_key.as_ref().map(PrivateKey::public_key),
        created_unix: rotation::key_created_unix(&key_path),
    });
    let source = Box::new(KubeSource::new(client, settings, keys));
    Ok(SourceParts {
        source,
        key,
        next_key,
        announce: Some(announce),
        key_file: key_path,
        warm_start: args.warm_start_max_age > 0,
        port: args.listen_port,
        node_name: name,
        cluster_cidrs: args.cluster_cidrs.clone(),
    })
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

/// The MTU in use (resolved at start: `--mtu` or the underlay's).
fn mtu(args: &Args) -> u16 {
    args.mtu.unwrap_or(DEFAULT_MTU)
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

async fn run(mut args: Args) -> anyhow::Result<()> {
    if args.parked {
        return parked().await;
    }
    let host = HostNet::connect()?;
    let (resolved, underlay_mtu) = resolve_mtu(&args, &host).await;
    args.mtu = Some(resolved);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;
    let src = match &args.mesh_file {
        Some(path) => file_source(&args, path)?,
        None => kube_source(&args, underlay_mtu).await?,
    };

    // The data plane: its queues (TUN queue + UDP socket each).
    let dp = Dataplane::new(&src.key, usize::from(mtu(&args)));
    if let Some(next) = &src.next_key {
        info!(next = %next.public_key(), "a key rotation is under way: answering handshakes to both keys");
        dp.set_next_key(Some(next));
    }
    let rotation = rotation::Rotation::new(
        src.key_file.clone(),
        src.announce,
        args.key_rotation.0,
        args.key_rotation_grace.0.unwrap_or(rotation::DEFAULT_GRACE),
    );
    let queues = queue_count(args.queues);
    // A router running here hands its queues and sessions over; else the
    // queues are opened (waiting for a dying predecessor to let go).
    let mut taken = take_over(&args, &dp.public_key(), src.port)
        .context("taking over from the running router")?;
    let q = match taken.as_mut() {
        Some(t) => std::mem::replace(&mut t.queues, empty_queues()),
        None => open_queues(&args, src.port, queues, dp.buf_size())?,
    };
    let queues = q.io.len();
    let port = q.port;
    let stop = Arc::new(AtomicBool::new(false));
    // Handed over: the peers with their live sessions and the workers at
    // once (the kernel holds what arrived meanwhile); the rest follows.
    let mut early_workers = None;
    let mut handover_gap_us = None;
    if let Some(t) = taken.as_mut() {
        dp.adopt_sessions(std::mem::take(&mut t.sessions));
        dp.apply(&t.snapshot.mesh);
        early_workers = Some(dp.spawn(&q.io, Arc::clone(&stop))?);
        let gap = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos().saturating_sub(t.stopped_unix_nanos))
            .unwrap_or(0);
        handover_gap_us = Some(u64::try_from(gap / 1000).unwrap_or(u64::MAX));
    }

    // The host side.
    let index = host.link_index(&args.interface).await?;
    let host_problems = hostnet::prepare_sysctls(&args.proc_sys, &args.interface, false);
    info!(
        interface = %args.interface, mtu = mtu(&args), port, queues, public_key = %dp.public_key(),
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
    if !args.metrics_address.is_empty() {
        let addr: SocketAddr = args.metrics_address.parse().with_context(|| {
            format!(
                "--metrics-address {:?} is not IP:port",
                args.metrics_address
            )
        })?;
        let waiting = std::time::Instant::now();
        let bound = loop {
            match metrics::serve(addr, Arc::clone(&health)).await {
                Err(e) if busy(&e) && waiting.elapsed() < BUSY_WAIT => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                r => break r,
            }
        }
        .with_context(|| format!("serving metrics on {addr}"))?;
        info!(address = %bound, "metrics on /metrics, health on /healthz and /readyz");
    }
    let (uapi_tx, uapi_changes) = tokio::sync::mpsc::unbounded_channel();
    let uapi_socket = if args.uapi_dir.as_os_str().is_empty() {
        None
    } else {
        let path = uapi::socket_path(&args.uapi_dir, &args.interface);
        let listener = uapi::bind(&args.uapi_dir, &args.interface)
            .with_context(|| format!("WireGuard API socket {}", path.display()))?;
        tokio::spawn(uapi::serve(listener, Arc::clone(&dp), port, uapi_tx));
        info!(socket = %path.display(), "WireGuard API for `wg show`");
        Some(path)
    };

    // The reconciler: data plane, TUN routes and addresses, CNI files.
    let cni = CniStateFiles {
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
    };
    let paths = host.clone();
    let link = TunLink {
        host,
        index,
        name: args.interface.clone(),
        mtu: u32::from(mtu(&args)),
    };
    let identity = NodeIdentity {
        node_name: src.node_name,
        interface: args.interface.clone(),
        mtu: mtu(&args),
        cluster_cidrs: src.cluster_cidrs,
    };
    let owner = warm::Owner::new(&identity.node_name, &dp.public_key(), &args.interface, port);
    let mut reconciler = Reconciler::new(Arc::clone(&dp), link, cni, identity);
    // A handed-over device is up with its gateways and routes: left as it
    // is (bringing it up "with no gateway" would take them away a moment).
    if taken.is_none() {
        reconciler.bring_up().await?;
    }

    // Handed over: the previous process's mesh and live sessions. Warm
    // start: the last applied mesh, at once, before the source answers.
    let (start, cache) = if let Some(t) = taken.take() {
        // The peers are in place already: this puts the host side and the
        // CNI files in line (normally a no-op: they are as the old left them).
        let applied = reconciler.apply(&t.snapshot).await;
        health.ready.store(true, Ordering::Relaxed);
        info!(from_pid = t.from_pid, peers = t.snapshot.mesh.peers.len(), gap_us = handover_gap_us,
              result = ?applied.as_ref().map(ToString::to_string), "took over from the running router");
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
    } else if src.warm_start {
        let loaded = warm::load(
            &args.state_dir,
            &owner,
            tunmesh_router::model::unix_now(),
            Duration::from_secs(args.warm_start_max_age),
        );
        let start = warm::StartStatus::from_load(&loaded);
        match loaded {
            Ok(Some(cached)) => match reconciler.apply(&cached.snapshot).await {
                Ok(applied) => {
                    health.ready.store(true, Ordering::Relaxed);
                    dp.first_tick_at_once.store(true, Ordering::Relaxed);
                    info!(peers = cached.snapshot.mesh.peers.len(), confirmed_seconds_ago = cached.age,
                          result = %applied, "warm start: the cached mesh is up; the source's mesh replaces it when it answers");
                }
                Err(e) => {
                    warn!(error = %e, "warm start: applying the cached mesh failed; the source's mesh is applied when it answers")
                }
            },
            Ok(None) => info!("cold start: no warm-start cache yet"),
            Err(e) => warn!(error = %e, "cold start: the cache is ignored; waiting for the source"),
        }
        let keeper = warm::Keeper::new(args.state_dir.clone(), owner, src.key_file.clone());
        (start, Some(keeper))
    } else {
        (
            warm::StartStatus {
                kind: "cold".into(),
                ..Default::default()
            },
            None,
        )
    };

    let workers = match early_workers {
        Some(w) => w,
        None => dp.spawn(&q.io, Arc::clone(&stop))?,
    };
    let handover_dir = args.state_dir.clone();
    let daemon = Daemon {
        dp,
        reconciler,
        health,
        source_status,
        queues: q.real,
        settings: daemon::Settings {
            interface: args.interface,
            listen_port: port,
            state_dir: args.state_dir,
            proc_sys: args.proc_sys,
            resync: Duration::from_secs(args.resync_seconds.max(1)),
            uapi_socket,
            start,
            key_file: src.key_file.clone(),
            mtu: resolved,
            after_handover: args.after_handover,
        },
        uapi_changes,
        host_problems,
        stop,
        workers,
        cache,
        rotation,
        paths,
        path_mtus: Default::default(),
        handover: match tunmesh_router::handover::listen(&handover_dir) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "no handover socket: an upgrade of this router will restart it cold");
                None
            }
        },
    };
    daemon.run(src.source).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(queue_count(0) >= 1 && queue_count(0) <= 4);
        assert_eq!(queue_count(3), 3);
    }
}
