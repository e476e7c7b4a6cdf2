//! The router's flags (`Args`): every one with its environment variable
//! and default; `tunmesh-router --help` prints them (and the docs'
//! configuration reference is that output).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use ipnetwork::IpNetwork;

use crate::{handover, hostnet, rotation, warm};

/// Name of the TUN device.
pub(super) const DEFAULT_INTERFACE: &str = "tunmesh0";
/// TUN MTU: a 1500-byte underlay minus WireGuard over IPv6 (80 bytes), so
/// nothing fragments whichever family the underlay uses.
pub(super) const DEFAULT_MTU: u16 = 1420;
/// Where the router keeps its key, status and the CNI plugin's node state.
pub(super) const DEFAULT_STATE_DIR: &str = "/var/lib/tunmesh";
/// Where container runtimes look for CNI configuration.
pub(super) const DEFAULT_CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// Metrics and health endpoints (all interfaces: the DaemonSet's probes
/// and Prometheus reach the node's address).
pub(super) const DEFAULT_METRICS_ADDRESS: &str = "0.0.0.0:9475";
/// WireGuard's usual port.
pub(super) const DEFAULT_PORT: u16 = 51820;

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
