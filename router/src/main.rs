//! `tunmesh-router`: wiring only. Parses flags, picks the peer source (Node
//! objects through the Kubernetes API, or a static mesh file), loads the
//! key, creates the TUN device and UDP socket, starts the data plane, and
//! applies every snapshot the source produces. Serves SIGHUP (reload the
//! mesh file) and SIGTERM/SIGINT (stop).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use ipnetwork::IpNetwork;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tunmesh_contract::validate::first_host;
use tunmesh_contract::{NodeState, PluginSettings};
use tunmesh_router::dataplane::tun::TunDevice;
use tunmesh_router::dataplane::udp::UdpSocket;
use tunmesh_router::dataplane::{Dataplane, Queue, TunIo, UdpIo};
use tunmesh_router::hostnet::{self, HostNet};
use tunmesh_router::metrics::{self, Health};
use tunmesh_router::model::{Nets, Snapshot};
use tunmesh_router::source::file::{self, NodeSettings};
use tunmesh_router::source::kube::{self as kube_source, KubeSettings, KubeStatus};
use tunmesh_router::status::{self, QueueStatus, ReloadStatus, Status};
use tunmesh_router::uapi;
use tunmesh_router::PrivateKey;

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
/// How often the status snapshot is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

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
    /// MTU of the TUN device and of pods (underlay MTU minus 80).
    #[arg(long, env = "TUNMESH_MTU", default_value_t = DEFAULT_MTU)]
    mtu: u16,
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

/// Where peers come from, and what only that source knows.
enum Source {
    File {
        path: PathBuf,
        node: NodeSettings,
    },
    Kube {
        rx: watch::Receiver<Option<Snapshot>>,
        status: Arc<Mutex<KubeStatus>>,
    },
}

/// Everything the main loop applies snapshots to.
struct Node {
    args: Args,
    node_name: String,
    cluster_cidrs: Vec<IpNetwork>,
    dp: Arc<Dataplane>,
    host: HostNet,
    index: u32,
    /// Pod CIDRs currently on the TUN (as gateways) and in node.json.
    pod_cidrs: Option<Vec<IpNetwork>>,
    /// The last snapshot applied (re-applied after a `wg set`).
    last: Option<Snapshot>,
    health: Arc<Health>,
}

impl Node {
    /// Applies one snapshot: peers as a minimal diff, routes, and (when
    /// they changed) the gateway addresses and the CNI plugin's node state.
    async fn apply(&mut self, snap: &Snapshot) -> Result<String, String> {
        let r = self.apply_inner(snap).await;
        let counter = if r.is_ok() {
            self.health.ready.store(true, Ordering::Relaxed);
            &self.health.reconciles
        } else {
            &self.health.reconcile_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.last = Some(snap.clone());
        r
    }

    async fn apply_inner(&mut self, snap: &Snapshot) -> Result<String, String> {
        let diff = self.dp.apply(&snap.mesh);
        let routes = self
            .host
            .sync_routes(self.index, &snap.mesh.routes())
            .await
            .map_err(|e| format!("peers applied, routes failed: {e}"))?;
        if !diff.is_empty() || !routes.added.is_empty() || !routes.removed.is_empty() {
            info!(added = ?diff.added, updated = ?diff.updated, replaced = ?diff.replaced,
                  removed = ?diff.removed, unchanged = diff.unchanged,
                  routes_added = %Nets(&routes.added), routes_removed = %Nets(&routes.removed), "mesh applied");
        }
        if self.pod_cidrs.as_ref() != Some(&snap.pod_cidrs) {
            self.set_pod_cidrs(&snap.pod_cidrs)
                .await
                .map_err(|e| format!("peers applied, pod CIDRs failed: {e:#}"))?;
        }
        Ok(format!(
            "{} added, {} updated, {} replaced, {} removed, {} unchanged",
            diff.added.len(),
            diff.updated.len(),
            diff.replaced.len(),
            diff.removed.len(),
            diff.unchanged
        ))
    }

    /// Puts the gateway of each pod CIDR on the TUN device and writes
    /// node.json for the CNI plugin (not while no CIDR is assigned: the
    /// plugin then answers "try again later").
    async fn set_pod_cidrs(&mut self, cidrs: &[IpNetwork]) -> anyhow::Result<()> {
        let gateways: Vec<IpAddr> = cidrs.iter().map(|c| first_host(*c)).collect();
        self.host
            .configure_link(
                self.index,
                &self.args.interface,
                u32::from(self.args.mtu),
                &gateways,
            )
            .await?;
        if !cidrs.is_empty() {
            NodeState {
                node_name: self.node_name.clone(),
                interface: self.args.interface.clone(),
                mtu: self.args.mtu,
                pod_cidrs: cidrs.to_vec(),
                gateways: gateways.clone(),
                cluster_cidrs: self.cluster_cidrs.clone(),
            }
            .write(&self.args.state_dir)
            .with_context(|| format!("writing node.json in {}", self.args.state_dir.display()))?;
            let conflist = if self.args.cni_conf_dir.as_os_str().is_empty() {
                None
            } else {
                let settings = PluginSettings {
                    router_state_dir: absolute(&self.args.state_dir),
                    data_dir: absolute(
                        &self
                            .args
                            .cni_data_dir
                            .clone()
                            .unwrap_or_else(|| self.args.state_dir.join("cni")),
                    ),
                    log_file: None,
                };
                Some(
                    tunmesh_contract::nodestate::write_conflist(&self.args.cni_conf_dir, &settings)
                        .with_context(|| {
                            format!(
                                "writing the CNI conflist in {}",
                                self.args.cni_conf_dir.display()
                            )
                        })?,
                )
            };
            info!(pod_cidrs = %Nets(cidrs), conflist = ?conflist, "pod CIDRs in place (gateways on the TUN device); node.json and the CNI conflist written");
        }
        self.pod_cidrs = Some(cidrs.to_vec());
        Ok(())
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

/// `p` made absolute against the working directory (the CNI plugin runs
/// elsewhere).
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Applies a snapshot from the Kubernetes source; on failure says so and
/// returns when to try again.
async fn apply_or_retry(node: &mut Node, snap: &Snapshot) -> Option<tokio::time::Instant> {
    match node.apply(snap).await {
        Ok(_) => None,
        Err(e) => {
            error!(error = %e, "applying the mesh from Node objects failed; retrying in 2 s");
            Some(tokio::time::Instant::now() + Duration::from_secs(2))
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;

    // The source, the key and the port, and the first snapshot if the
    // source has one at once (a mesh file does; the API is awaited below).
    let (mut source, key, port, node_name, cluster_cidrs, first) = match &args.mesh_file {
        Some(path) => {
            let f = file::load(path)?;
            let key =
                PrivateKey::read_file(&f.node.private_key_file).context("node.private_key_file")?;
            check_key_mode(&f.node.private_key_file);
            let name = args.node_name.clone().unwrap_or_else(|| {
                let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                host.trim().to_string()
            });
            let snap = Snapshot {
                mesh: f.mesh,
                pod_cidrs: f.node.pod_cidrs.clone(),
            };
            let port = f.node.listen_port;
            let cluster = f.node.cluster_cidrs.clone();
            let src = Source::File {
                path: path.clone(),
                node: f.node,
            };
            (src, key, port, name, cluster, Some(snap))
        }
        None => {
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
            let client = kube_source::client(args.kubeconfig.as_deref())
                .await
                .map_err(anyhow::Error::msg)?;
            let (tx, rx) = watch::channel(None);
            let status = Arc::new(Mutex::new(KubeStatus::default()));
            let settings = KubeSettings {
                node_name: name.clone(),
                listen_port: args.listen_port,
                endpoint: args.endpoint,
                cluster_cidrs: args.cluster_cidrs.clone(),
                persistent_keepalive: Some(args.persistent_keepalive).filter(|k| *k > 0),
                resync: Duration::from_secs(args.resync_seconds.max(1)),
            };
            tokio::spawn(kube_source::run(
                client,
                settings,
                key.public_key(),
                tx,
                Arc::clone(&status),
            ));
            let src = Source::Kube { rx, status };
            (
                src,
                key,
                args.listen_port,
                name,
                args.cluster_cidrs.clone(),
                None,
            )
        }
    };

    let dp = Dataplane::new(&key, usize::from(args.mtu));
    let queues = queue_count(args.queues);
    let udps = UdpSocket::bind_group(port, args.offload, queues)
        .with_context(|| format!("binding UDP port {port}"))?;
    let Some(udp) = udps.first() else {
        bail!("no UDP socket bound");
    };
    let (rcvbuf, sndbuf) = udp.buffer_sizes();
    let (udp_gso, udp_gro) = udp.offloads();
    let port = udp.port();
    let tuns = TunDevice::create_queues(&args.interface, args.mtu, args.offload, queues)
        .with_context(|| {
            format!(
                "creating TUN device {} with {queues} queue(s) (needs /dev/net/tun and CAP_NET_ADMIN)",
                args.interface
            )
        })?;
    let tun_offload = tuns.first().is_some_and(|t| t.offload());
    let host = HostNet::connect()?;
    let index = host.link_index(&args.interface).await?;
    let mut host_problems = hostnet::prepare_sysctls(&args.proc_sys, &args.interface, false);
    info!(
        interface = %args.interface, mtu = args.mtu, port, queues, public_key = %dp.public_key(),
        node = %node_name, source = if args.mesh_file.is_some() { "mesh file" } else { "kubernetes" },
        rcvbuf, sndbuf, tun_offload, udp_gso, udp_gro, "router up"
    );
    let health = Health::new(
        Arc::clone(&dp),
        match &source {
            Source::Kube { status, .. } => Some(Arc::clone(status)),
            Source::File { .. } => None,
        },
    );
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
        let bound = metrics::serve(addr, Arc::clone(&health))
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
        info!(address = %bound, "metrics on /metrics, health on /healthz and /readyz");
    }
    let (uapi_tx, mut uapi_rx) = tokio::sync::mpsc::unbounded_channel();
    if !args.uapi_dir.as_os_str().is_empty() {
        let listener = uapi::bind(&args.uapi_dir, &args.interface).with_context(|| {
            format!(
                "WireGuard API socket {}",
                uapi::socket_path(&args.uapi_dir, &args.interface).display()
            )
        })?;
        tokio::spawn(uapi::serve(listener, Arc::clone(&dp), port, uapi_tx));
        info!(socket = %uapi::socket_path(&args.uapi_dir, &args.interface).display(), "WireGuard API for `wg show`");
    }
    let resync = Duration::from_secs(args.resync_seconds.max(1));
    let mut node = Node {
        args,
        node_name,
        cluster_cidrs,
        dp,
        host,
        index,
        pod_cidrs: None,
        last: None,
        health: Arc::clone(&health),
    };
    match &first {
        Some(snap) => node.apply(snap).await.map_err(anyhow::Error::msg)?,
        // Link up with no gateway yet, so the device exists for routes.
        None => {
            node.set_pod_cidrs(&[]).await?;
            String::new()
        }
    };

    let stop = Arc::new(AtomicBool::new(false));
    let tuns: Vec<Arc<TunDevice>> = tuns.into_iter().map(Arc::new).collect();
    let udps: Vec<Arc<UdpSocket>> = udps.into_iter().map(Arc::new).collect();
    let pairs: Vec<Queue> = tuns
        .iter()
        .zip(&udps)
        .map(|(t, u)| {
            (
                Arc::clone(t) as Arc<dyn TunIo>,
                Arc::clone(u) as Arc<dyn UdpIo>,
            )
        })
        .collect();
    let handles = node.dp.spawn(&pairs, Arc::clone(&stop))?;

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    // Forwarding and the TUN's rp_filter are checked again every resync:
    // something else on the host (a firewall manager, a network agent) may
    // turn them back.
    let mut host_check = tokio::time::interval_at(tokio::time::Instant::now() + resync, resync);
    let mut reloads = 0u64;
    let mut last_reload: Option<ReloadStatus> = None;
    let mut status_failing = false;
    // After a failed apply (netlink refused a route, say), the latest
    // snapshot is applied again at this time.
    let mut retry_at: Option<tokio::time::Instant> = None;
    // After a `wg set`, the source's mesh is applied again at this time.
    let mut reapply_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let Source::File { path, node: settings } = &source else {
                    info!("SIGHUP: nothing to reload (Node objects are watched continuously)");
                    continue;
                };
                reloads += 1;
                let message = match file::load(path) {
                    Err(e) => {
                        error!(error = %e, "reload refused; keeping the last good mesh");
                        Err(e.to_string())
                    }
                    Ok(f) => {
                        if &f.node != settings {
                            warn!(file = %path.display(), "[node] settings changed; they take effect on restart (peers are applied now)");
                        }
                        let snap = Snapshot { mesh: f.mesh, pod_cidrs: settings.pod_cidrs.clone() };
                        let r = node.apply(&snap).await;
                        match &r {
                            Ok(m) => info!(result = %m, "mesh reloaded"),
                            Err(e) => error!(error = %e, "reload failed"),
                        }
                        r
                    }
                };
                last_reload = Some(ReloadStatus {
                    at_unix: status::unix_now(),
                    ok: message.is_ok(),
                    message: message.unwrap_or_else(|e| e),
                });
            }
            changed = async {
                match &mut source {
                    Source::Kube { rx, .. } => rx.changed().await,
                    Source::File { .. } => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    bail!("the Kubernetes source stopped");
                }
                let snap = match &mut source {
                    Source::Kube { rx, .. } => rx.borrow_and_update().clone(),
                    Source::File { .. } => None,
                };
                if let Some(snap) = snap {
                    retry_at = apply_or_retry(&mut node, &snap).await;
                }
            }
            _ = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let snap = match &source {
                    Source::Kube { rx, .. } => rx.borrow().clone(),
                    Source::File { .. } => None,
                };
                retry_at = match snap {
                    Some(snap) => apply_or_retry(&mut node, &snap).await,
                    None => None,
                };
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(()) = uapi_rx.recv() => {
                reapply_at.get_or_insert_with(|| tokio::time::Instant::now() + resync);
            }
            _ = async {
                match reapply_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                reapply_at = None;
                if let Some(snap) = node.last.clone() {
                    info!("re-applying the source's mesh over `wg set` changes");
                    retry_at = apply_or_retry(&mut node, &snap).await;
                }
            }
            _ = host_check.tick() => {
                host_problems = hostnet::prepare_sysctls(&node.args.proc_sys, &node.args.interface, true);
                health.host_problems.store(host_problems.len() as u64, Ordering::Relaxed);
            }
            _ = tick.tick() => {
                health.last_tick.store(status::unix_now(), Ordering::Relaxed);
                let queues: Vec<QueueStatus> = tuns
                    .iter()
                    .zip(&udps)
                    .map(|(t, u)| {
                        let (read, written) = t.packet_counts();
                        QueueStatus {
                            tun_packets_read: read,
                            tun_packets_written: written,
                            udp_datagrams_received: u.datagrams_received(),
                        }
                    })
                    .collect();
                if let Ok(mut q) = health.queues.lock() {
                    q.clone_from(&queues);
                }
                let s = Status {
                    interface: node.args.interface.clone(),
                    public_key: node.dp.public_key().to_base64(),
                    listen_port: port,
                    peers: status::peers(&node.dp),
                    counters: node.dp.counters.snapshot(),
                    offload: tuns.iter().map(|t| t.offload_stats()).sum(),
                    queues: queues.clone(),
                    reloads,
                    last_reload: last_reload.clone(),
                    kubernetes: match &source {
                        Source::Kube { status, .. } => status.lock().ok().map(|s| s.clone()),
                        Source::File { .. } => None,
                    },
                    pod_cidrs: node.pod_cidrs.iter().flatten().map(|c| c.to_string()).collect(),
                    host_problems: host_problems.clone(),
                    workers: node.dp.workers(),
                };
                match s.write(&node.args.state_dir) {
                    Ok(()) => status_failing = false,
                    Err(e) if !status_failing => {
                        warn!(error = %e, "writing status");
                        status_failing = true;
                    }
                    Err(_) => {}
                }
            }
        }
    }
    info!("stopping");
    if !node.args.uapi_dir.as_os_str().is_empty() {
        let _ = std::fs::remove_file(uapi::socket_path(&node.args.uapi_dir, &node.args.interface));
    }
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
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
