//! `tunmesh-ctl`: what an operator runs on a node when something is wrong.
//!
//! - `status`: this node's key, endpoint, pod CIDRs, API connection and
//!   problems, and each peer with endpoint, handshake age, traffic, state;
//! - `graph`: the mesh as Graphviz dot from the Node objects, links from
//!   this node coloured by their handshake (`--svg` renders it with `dot`);
//! - `check`: pings every peer's gateway through the tunnel and says which
//!   links are broken and the likely reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams};
use socket2::{Domain, Protocol, Socket, Type};
use tunmesh_contract::validate::first_host;
use tunmesh_router::source::nodes::{ANN_ENDPOINT, ANN_FORCE_ENDPOINT, ANN_PUBLIC_KEY};
use tunmesh_router::status::{unix_now, PeerStatus, Status};

/// A session older than this is dead (WireGuard's REJECT_AFTER_TIME).
const STALE_AFTER: u64 = 180;

#[derive(Parser)]
#[command(
    name = "tunmesh-ctl",
    version,
    about = "Inspect and check a tunmesh node"
)]
struct Cli {
    /// The router's state directory (status.json, node.json).
    #[arg(
        long,
        env = "TUNMESH_STATE_DIR",
        default_value = "/var/lib/tunmesh",
        global = true
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This node and its peers, from the router's status.
    Status {
        /// Print the raw status JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// The mesh as Graphviz dot, from the Node objects.
    Graph {
        /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
        #[arg(long, env = "TUNMESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Render SVG with Graphviz's `dot` instead of printing dot.
        #[arg(long)]
        svg: bool,
    },
    /// Ping every peer's gateway through the tunnel; exit 1 if any fails.
    Check {
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// Remove what tunmesh left on this node after its router stopped
    /// (`kubectl delete -k deploy/` first): the TUN device and its routes
    /// if still there, the CNI conflist and binary, this Node's tunmesh.io
    /// annotations, and with --purge the state (key, allocations).
    Uninstall {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[arg(long, env = "TUNMESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        #[arg(long, env = "TUNMESH_INTERFACE", default_value = "tunmesh0")]
        interface: String,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// Also delete the state directory (private key, pod address
        /// allocations): only once no pod on this node uses tunmesh.
        #[arg(long)]
        purge: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Status { json } => status(&cli.state_dir, json),
        Cmd::Graph { kubeconfig, svg } => graph(&cli.state_dir, kubeconfig.as_deref(), svg),
        Cmd::Check { timeout } => check(&cli.state_dir, Duration::from_secs(timeout)),
        Cmd::Uninstall {
            node_name,
            kubeconfig,
            interface,
            cni_conf_dir,
            cni_bin_dir,
            purge,
        } => uninstall(
            &cli.state_dir,
            &node_name,
            kubeconfig.as_deref(),
            &interface,
            &cni_conf_dir,
            &cni_bin_dir,
            purge,
        ),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunmesh-ctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_status(dir: &Path) -> Result<Status> {
    let s = Status::read(dir)
        .with_context(|| format!("is the router running with --state-dir {}?", dir.display()))?;
    Ok(s)
}

/// up, stale or no handshake, with the age in seconds.
fn peer_state(p: &PeerStatus, now: u64) -> (&'static str, Option<u64>) {
    match p.latest_handshake_unix {
        None => ("no handshake", None),
        Some(t) => {
            let age = now.saturating_sub(t);
            (if age <= STALE_AFTER { "up" } else { "stale" }, Some(age))
        }
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn status(dir: &Path, json: bool) -> Result<ExitCode> {
    let s = read_status(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = unix_now();
    let k = s.kubernetes.as_ref();
    println!(
        "node:        {}",
        k.map(|k| k.node_name.as_str()).unwrap_or("(mesh file)")
    );
    println!("public key:  {}", s.public_key);
    println!("interface:   {} (UDP port {})", s.interface, s.listen_port);
    if !s.queues.is_empty() {
        let each: Vec<String> = s
            .queues
            .iter()
            .map(|q| format!("{}/{}", q.tun_packets_read, q.udp_datagrams_received))
            .collect();
        println!(
            "queues:      {} (packets out/in per queue: {})",
            s.queues.len(),
            each.join(", ")
        );
    }
    println!(
        "endpoint:    {}",
        k.and_then(|k| k.published_endpoint.clone())
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "pod CIDRs:   {}",
        if s.pod_cidrs.is_empty() {
            "none yet".to_string()
        } else {
            s.pod_cidrs.join(", ")
        }
    );
    if let Some(k) = k {
        println!(
            "kubernetes:  {}{}",
            if k.connected {
                "connected"
            } else {
                "DISCONNECTED (keeping the last mesh)"
            },
            k.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
        for p in &k.problems {
            println!(
                "  problem:   Node {} {}: {} ({})",
                p.node, p.field, p.message, p.reason
            );
        }
        for p in &k.pending {
            println!("  pending:   {p}");
        }
    }
    for p in &s.host_problems {
        println!("host:        PROBLEM: {p}");
    }
    for w in &s.workers {
        if let Some(why) = &w.failure {
            println!("worker:      PROBLEM: {} DEAD ({why}); /healthz fails, so the DaemonSet's liveness probe restarts the router", w.name);
        }
    }
    println!();
    println!(
        "{:<16} {:<24} {:<14} {:>10} {:>10}  state",
        "peer", "endpoint", "handshake", "received", "sent"
    );
    for p in &s.peers {
        let (state, age) = peer_state(p, now);
        println!(
            "{:<16} {:<24} {:<14} {:>10} {:>10}  {state}",
            p.name,
            p.endpoint.as_deref().unwrap_or("(none)"),
            age.map(|a| format!("{a} s ago"))
                .unwrap_or_else(|| "never".into()),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
        );
    }
    println!("\ndrops: {}", s.counters.drops_summary());
    Ok(ExitCode::SUCCESS)
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn graph(dir: &Path, kubeconfig: Option<&Path>, svg: bool) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nodes: Vec<Node> = rt.block_on(async {
        let client = tunmesh_router::source::kube::client(kubeconfig)
            .await
            .map_err(anyhow::Error::msg)?;
        let api: Api<Node> = Api::all(client);
        let list = api.list(&ListParams::default()).await.map_err(|e| {
            anyhow::anyhow!(
                "listing Nodes: {}",
                tunmesh_router::source::kube::explain(&e)
            )
        })?;
        Ok::<_, anyhow::Error>(list.items)
    })?;
    // This node's view of its links, if a router runs here.
    let local = Status::read(dir).ok();
    let me = local
        .as_ref()
        .and_then(|s| s.kubernetes.as_ref().map(|k| k.node_name.clone()));
    let now = unix_now();
    let mut out = String::from("graph tunmesh {\n  node [shape=box, fontname=\"monospace\"];\n");
    let mut meshed = Vec::new();
    for n in &nodes {
        let name = n.metadata.name.clone().unwrap_or_default();
        let ann = n.metadata.annotations.clone().unwrap_or_default();
        let cidrs = n
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidrs.clone())
            .unwrap_or_default()
            .join(", ");
        let endpoint = ann
            .get(ANN_FORCE_ENDPOINT)
            .or_else(|| ann.get(ANN_ENDPOINT))
            .cloned()
            .unwrap_or_else(|| "no endpoint".into());
        let has_key = ann.contains_key(ANN_PUBLIC_KEY);
        out += &format!(
            "  \"{}\" [label=\"{}\\n{}\\n{}\"{}];\n",
            dot_escape(&name),
            dot_escape(&name),
            dot_escape(&cidrs),
            dot_escape(&endpoint),
            if has_key {
                ""
            } else {
                ", style=dashed, color=gray"
            }
        );
        if has_key {
            meshed.push(name);
        }
    }
    for (i, a) in meshed.iter().enumerate() {
        for b in &meshed[i + 1..] {
            let from_me = me.as_deref() == Some(a.as_str()) || me.as_deref() == Some(b.as_str());
            let other = if me.as_deref() == Some(a.as_str()) {
                b
            } else {
                a
            };
            let style = match (from_me, local.as_ref()) {
                (true, Some(s)) => match s.peers.iter().find(|p| &p.name == other) {
                    Some(p) => match peer_state(p, now) {
                        ("up", Some(age)) => format!("color=green, label=\"{age}s\""),
                        ("stale", Some(age)) => format!("color=orange, label=\"{age}s\""),
                        _ => "color=red, label=\"no handshake\"".into(),
                    },
                    None => "color=red, label=\"not a peer\"".into(),
                },
                _ => "color=gray".into(),
            };
            out += &format!(
                "  \"{}\" -- \"{}\" [{style}];\n",
                dot_escape(a),
                dot_escape(b)
            );
        }
    }
    out += "}\n";
    if !svg {
        print!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running Graphviz's `dot` (install graphviz, or drop --svg for dot text)")?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, out.as_bytes())?;
    }
    let st = child.wait()?;
    Ok(if st.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The ICMP checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum = sum.wrapping_add(u32::from(w));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One ICMP echo to `dst`; the round trip time if it answered.
fn ping(dst: IpAddr, id: u16, timeout: Duration) -> Result<Option<Duration>> {
    let (domain, proto, req_type, reply_type) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto))
        .context("opening a raw ICMP socket (needs root or CAP_NET_RAW)")?;
    const PAYLOAD: &[u8] = b"tunmesh-ctl check";
    let mut pkt = [0u8; 8 + PAYLOAD.len()];
    pkt[0] = req_type;
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&1u16.to_be_bytes());
    pkt[8..].copy_from_slice(PAYLOAD);
    if dst.is_ipv4() {
        let c = checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    } // ICMPv6: the kernel fills the checksum in.
    let start = Instant::now();
    sock.send_to(&pkt, &SocketAddr::new(dst, 0).into())
        .with_context(|| format!("sending an ICMP echo to {dst}"))?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => return Err(e.into()),
        };
        // SAFETY: recv_from initialised the first n bytes.
        let data: Vec<u8> = buf[..n]
            .iter()
            .map(|b| unsafe { b.assume_init() })
            .collect();
        // IPv4 raw sockets include the IP header; IPv6 ones do not.
        let icmp = match dst {
            IpAddr::V4(_) => data.get(usize::from(data.first().copied().unwrap_or(0) & 0x0f) * 4..),
            IpAddr::V6(_) => Some(&data[..]),
        };
        let from_ip = from.as_socket().map(|s| s.ip());
        if let Some(icmp) = icmp {
            if icmp.len() >= 8
                && icmp[0] == reply_type
                && icmp[4..6] == id.to_be_bytes()
                && from_ip == Some(dst)
            {
                return Ok(Some(start.elapsed()));
            }
        }
    }
    Ok(None)
}

fn check(dir: &Path, timeout: Duration) -> Result<ExitCode> {
    let s = read_status(dir)?;
    if s.peers.is_empty() {
        bail!("this node has no peers (see `tunmesh-ctl status` for pending Nodes and problems)");
    }
    let now = unix_now();
    let mut broken = 0;
    for (n, p) in s.peers.iter().enumerate() {
        for cidr in &p.allowed_ips {
            let Ok(net) = cidr.parse::<IpNetwork>() else {
                continue;
            };
            let gw = first_host(net);
            let id =
                (std::process::id() as u16).wrapping_add(n as u16 * 2 + u16::from(gw.is_ipv6()));
            let (rtt, verdict) = match ping(gw, id, timeout) {
                Ok(rtt) => (rtt, None),
                Err(e) => (
                    None,
                    Some(format!(
                        "BROKEN: cannot send to {gw}: {e:#} (is there a route to it through {}?)",
                        s.interface
                    )),
                ),
            };
            let verdict = match (rtt, p.endpoint.as_deref(), peer_state(p, now)) {
                _ if verdict.is_some() => verdict.unwrap_or_default(),
                (Some(rtt), _, _) => format!("ok ({:.1} ms)", rtt.as_secs_f64() * 1000.0),
                (None, None, _) => "BROKEN: no endpoint (the peer published none and never reached this node)".into(),
                (None, Some(ep), ("no handshake", _)) => format!(
                    "BROKEN: no handshake with {ep}: UDP {} blocked between the nodes, or the peer's router is down or has another key",
                    ep.rsplit(':').next().unwrap_or("port")
                ),
                (None, Some(ep), ("stale", Some(age))) => format!(
                    "BROKEN: last handshake with {ep} {age} s ago: the peer's router is down or UDP is blocked now"
                ),
                (None, Some(ep), (_, age)) => format!(
                    "BROKEN: no answer through the tunnel although the last handshake with {ep} was {} s ago: \
                     the peer or the path to it went down since (the handshake turns stale after {STALE_AFTER} s), \
                     or the peer's forwarding, firewall or MTU drops it",
                    age.unwrap_or(0)
                ),
            };
            if rtt.is_none() {
                broken += 1;
            }
            println!("{:<16} {:<28} {verdict}", p.name, gw.to_string());
        }
    }
    if broken == 0 {
        println!("all {} links ok", s.peers.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{broken} link(s) broken");
        Ok(ExitCode::FAILURE)
    }
}

fn remove(path: &Path, what: &str) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => println!("removed {what} {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no {what} at {}", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}

fn uninstall(
    dir: &Path,
    node: &str,
    kubeconfig: Option<&Path>,
    interface: &str,
    conf_dir: &Path,
    bin_dir: &Path,
    purge: bool,
) -> Result<ExitCode> {
    if let Ok(s) = Status::read(dir) {
        let alive = std::fs::metadata(dir.join(tunmesh_router::status::STATUS_FILE))
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age < Duration::from_secs(5));
        if alive {
            bail!("the router on this node is still running ({} updated in the last 5 s); stop it first (kubectl delete -k deploy/)", s.interface);
        }
    }
    // The TUN device goes with the router's process; a leftover (persistent
    // device, or a crash mid-start) goes here, its routes with it.
    let out = std::process::Command::new("ip")
        .args(["link", "del", interface])
        .output();
    match out {
        Ok(o) if o.status.success() => println!("removed interface {interface} and its routes"),
        _ => println!("no interface {interface}"),
    }
    remove(
        &conf_dir.join(tunmesh_contract::nodestate::CONFLIST_FILE),
        "CNI conflist",
    )?;
    remove(
        &bin_dir.join(tunmesh_contract::nodestate::PLUGIN_TYPE),
        "CNI plugin",
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = tunmesh_router::source::kube::client(kubeconfig)
            .await
            .map_err(anyhow::Error::msg)?;
        let api: Api<Node> = Api::all(client);
        let patch = serde_json::json!({ "metadata": { "annotations": {
            ANN_PUBLIC_KEY: null, ANN_ENDPOINT: null,
        }}});
        api.patch(node, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
            .await
            .map_err(|e| anyhow::anyhow!("removing the annotations from Node {node}: {}", tunmesh_router::source::kube::explain(&e)))?;
        println!("removed {ANN_PUBLIC_KEY} and {ANN_ENDPOINT} from Node {node} (an operator's {ANN_FORCE_ENDPOINT} is left alone)");
        Ok::<_, anyhow::Error>(())
    })?;
    if purge {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => println!("removed the state directory {}", dir.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    } else {
        println!(
            "kept {} (key, pod address allocations); --purge removes it",
            dir.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
