//! What `tunmesh-ctl` does, as library functions: the binary parses its
//! arguments and prints what these return.
//!
//! - `render_status`: this node's key, endpoint, pod CIDRs, API connection
//!   and problems, and each peer with endpoint, handshake age, traffic;
//! - `graph_dot`: the mesh as Graphviz dot from the Node objects, links
//!   from this node coloured by their handshake;
//! - `check`: pings every peer's gateway through the tunnel and says which
//!   links are broken and the likely reason;
//! - `uninstall`: what tunmesh left on a node after its router stopped;
//! - `accept_key`: an operator takes a Node's unannounced key change.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use socket2::{Domain, Protocol, Socket, Type};
use tunmesh_contract::nodestate::{CONFLIST_FILE, PLUGIN_TYPE, PORTMAP_TYPE};
use tunmesh_contract::validate::first_host;

use crate::dataplane::offload::{fold, sum16};
use crate::hostnet::HostNet;
use crate::source::kube::{client, explain, ClientError};
use crate::source::nodes::{
    ANN_ACCEPT_PUBLIC_KEY, ANN_ENDPOINT, ANN_FORCE_ENDPOINT, ANN_PUBLIC_KEY, ROUTER_ANNOTATIONS,
};
use crate::status::{PeerStatus, Status};

/// A session older than this is dead (WireGuard's REJECT_AFTER_TIME).
pub const STALE_AFTER: u64 = 180;

/// What `tunmesh-ctl` could not do, and why.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{doing}: {source}")]
    Io {
        doing: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{doing}: {message}")]
    Api { doing: String, message: String },
    #[error(transparent)]
    Router(#[from] crate::Error),
    #[error("Node {node} shows no {ANN_PUBLIC_KEY}; nothing to accept")]
    NoKeyShown { node: String },
    #[error("Node {node}'s {ANN_PUBLIC_KEY} is not a key ({why}); nothing to accept")]
    NotAKey { node: String, why: String },
    #[error("Node {node} shows {shown}, not {want}; nothing accepted")]
    OtherKeyShown {
        node: String,
        shown: String,
        want: String,
    },
    #[error("this node has no peers (see `tunmesh-ctl status` for pending Nodes and problems)")]
    NoPeers,
    #[error("the router on this node is still running (it holds {0}'s UDP port {1}); stop it first (kubectl delete -k deploy/)")]
    RouterRunning(String, u16),
}

/// up, stale or no handshake, with the age in seconds.
pub fn peer_state(p: &PeerStatus, now: u64) -> (&'static str, Option<u64>) {
    match p.latest_handshake_unix {
        None => ("no handshake", None),
        Some(t) => {
            let age = now.saturating_sub(t);
            (if age <= STALE_AFTER { "up" } else { "stale" }, Some(age))
        }
    }
}

/// A byte count for people: `1.5 MiB`.
pub fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// Every Node, from the API server.
pub async fn list_nodes(kubeconfig: Option<&Path>) -> Result<Vec<Node>, CtlError> {
    let api: Api<Node> = Api::all(client(kubeconfig).await?);
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| CtlError::Api {
            doing: "listing Nodes".into(),
            message: explain(&e),
        })?;
    Ok(list.items)
}

/// `tunmesh-ctl status` as text: this node, its source, problems, and a
/// line per peer.
/// Seconds as the largest whole unit (`3d`, `5h`, `12m`, `40s`).
pub fn age(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d", s / 86400),
        s if s >= 3600 => format!("{}h", s / 3600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// The key's age, a rotation under way or the last one.
pub fn key_line(k: &crate::rotation::KeyStatus) -> String {
    let mut line = match k.key_age_seconds {
        Some(a) => format!("made {} ago", age(a)),
        None => "age unknown".to_string(),
    };
    match k.rotation_period_seconds {
        Some(p) => line.push_str(&format!(", rotated every {}", age(p))),
        None => line.push_str(", no periodic rotation"),
    }
    if let Some(r) = &k.rotation {
        line.push_str(&format!(
            "; rotating to {} ({} of {} peers on it{})",
            r.next_public_key,
            r.peers_done.len(),
            r.peers_done.len() + r.peers_waiting.len(),
            if r.announced {
                ""
            } else {
                ", not announced yet"
            }
        ));
    } else if let Some(l) = &k.last_rotation {
        line.push_str(&format!("; last rotation took {} s", l.took_seconds));
        if !l.peers_not_seen.is_empty() {
            line.push_str(&format!(
                " (not seen by {}: they learn the key from the Node)",
                l.peers_not_seen.join(", ")
            ));
        }
    }
    line
}

pub fn render_status(s: &Status, now: u64) -> String {
    let mut out = String::new();
    let k = s.kubernetes.as_ref();
    let _ = writeln!(
        out,
        "node:        {}",
        k.map(|k| k.node_name.as_str()).unwrap_or("(mesh file)")
    );
    let _ = writeln!(out, "public key:  {}", s.public_key);
    let _ = writeln!(out, "key:         {}", key_line(&s.key));
    if let Some(p) = &s.key.problem {
        let _ = writeln!(out, "key problem: {p}");
    }
    let _ = writeln!(
        out,
        "interface:   {} (UDP port {}, MTU {})",
        s.interface, s.listen_port, s.mtu
    );
    if !s.queues.is_empty() {
        let each: Vec<String> = s
            .queues
            .iter()
            .map(|q| format!("{}/{}", q.tun_packets_read, q.udp_datagrams_received))
            .collect();
        let _ = writeln!(
            out,
            "queues:      {} (packets out/in per queue: {})",
            s.queues.len(),
            each.join(", ")
        );
    }
    if s.crypto.workers > 1 {
        let c = &s.crypto;
        let share = if c.chunks > 0 {
            format!(
                "; helpers ran {} of {} chunks of {} split batches ({:.0}%)",
                c.helper_chunks,
                c.chunks,
                c.parallel_batches,
                100.0 * c.helper_chunks as f64 / c.chunks as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "crypto:      {} workers (each queue's and {} helper{}){share}",
            c.workers,
            c.workers - 1,
            if c.workers == 2 { "" } else { "s" }
        );
    }
    let _ = writeln!(
        out,
        "endpoint:    {}",
        k.and_then(|k| k.published_endpoint.clone())
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        out,
        "pod CIDRs:   {}",
        if s.pod_cidrs.is_empty() {
            "none yet".to_string()
        } else {
            s.pod_cidrs.join(", ")
        }
    );
    if let Some(k) = k {
        let _ = writeln!(
            out,
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
            let _ = writeln!(
                out,
                "  problem:   Node {} {}: {} ({})",
                p.node, p.field, p.message, p.reason
            );
        }
        for h in &k.held_keys {
            let _ = writeln!(
                out,
                "  held key:  Node {} shows {} unannounced; still using {} (accept: tunmesh-ctl accept-key {})",
                h.node, h.shown, h.using, h.node
            );
        }
        for p in &k.pending {
            let _ = writeln!(out, "  pending:   {p}");
        }
    }
    let st = &s.start;
    let detail = match st.kind.as_str() {
        "handover" => Some(format!(
            "{} peers and their sessions taken from the previous router ({} us without a worker)",
            st.peers,
            st.handover_gap_us.unwrap_or(0)
        )),
        "warm" => Some(format!(
            "{} peers from the cache (confirmed {} s before the start)",
            st.peers,
            st.cache_age_seconds.unwrap_or(0)
        )),
        _ => st.problem.clone(),
    };
    match (st.kind.as_str(), detail) {
        ("", _) => {}
        (kind, Some(d)) => {
            let _ = writeln!(out, "start:       {kind}: {d}");
        }
        (kind, None) => {
            let _ = writeln!(out, "start:       {kind}");
        }
    }
    // With thousands of peers the snapshot is rewritten less often: say
    // so, lest an old snapshot look like a hung router.
    if s.rewritten_every_seconds > 1 {
        let _ = writeln!(
            out,
            "snapshot:    rewritten every {} s (it lists every peer)",
            s.rewritten_every_seconds
        );
    }
    if let Some(f) = &s.handovers.last_failure {
        let _ = writeln!(
            out,
            "handover:    {} failed, the last {} s ago: {}",
            s.handovers.failed,
            crate::model::unix_now().saturating_sub(f.at_unix),
            f.message
        );
    }
    for p in &s.host_problems {
        let _ = writeln!(out, "host:        PROBLEM: {p}");
    }
    for w in &s.workers {
        if let Some(why) = &w.failure {
            let _ = writeln!(out, "worker:      PROBLEM: {} DEAD ({why}); /healthz fails, so the DaemonSet's liveness probe restarts the router", w.name);
        }
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<16} {:<24} {:<14} {:>10} {:>10} {:>8} {:>8}  state",
        "peer", "endpoint", "handshake", "received", "sent", "key age", "path MTU"
    );
    for p in &s.peers {
        let (state, age) = peer_state(p, now);
        let _ = writeln!(
            out,
            "{:<16} {:<24} {:<14} {:>10} {:>10} {:>8} {:>8}  {state}",
            p.name,
            p.endpoint.as_deref().unwrap_or("(none)"),
            age.map(|a| format!("{a} s ago"))
                .unwrap_or_else(|| "never".into()),
            bytes(p.rx_bytes),
            bytes(p.tx_bytes),
            p.key_age_seconds
                .map(self::age)
                .unwrap_or_else(|| "-".into()),
            p.path_mtu
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
        );
    }
    let _ = writeln!(out, "\ndrops: {}", s.counters.drops_summary());
    out
}

/// The mesh as Graphviz dot, from the Node objects; the links of this node
/// (`local`, its status, if a router runs here) coloured by handshake.
pub fn graph_dot(nodes: &[Node], local: Option<&Status>, now: u64) -> String {
    let me = local.and_then(|s| s.kubernetes.as_ref().map(|k| k.node_name.clone()));
    let mut out = String::from("graph tunmesh {\n  node [shape=box, fontname=\"monospace\"];\n");
    let mut meshed = Vec::new();
    for n in nodes {
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
            let style = match (from_me, local) {
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
    out
}

/// One ICMP echo to `dst`; the round trip time if it answered.
pub fn ping(dst: IpAddr, id: u16, timeout: Duration) -> Result<Option<Duration>, CtlError> {
    let (domain, proto, req_type, reply_type) = match dst {
        IpAddr::V4(_) => (Domain::IPV4, Protocol::ICMPV4, 8u8, 0u8),
        IpAddr::V6(_) => (Domain::IPV6, Protocol::ICMPV6, 128u8, 129u8),
    };
    let sock = Socket::new(domain, Type::RAW, Some(proto)).map_err(|source| CtlError::Io {
        doing: "opening a raw ICMP socket (needs root or CAP_NET_RAW)".into(),
        source,
    })?;
    const PAYLOAD: &[u8] = b"tunmesh-ctl check";
    let mut pkt = [0u8; 8 + PAYLOAD.len()];
    pkt[0] = req_type;
    pkt[4..6].copy_from_slice(&id.to_be_bytes());
    pkt[6..8].copy_from_slice(&1u16.to_be_bytes());
    pkt[8..].copy_from_slice(PAYLOAD);
    if dst.is_ipv4() {
        let c = !fold(sum16(&pkt, 0));
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
    } // ICMPv6: the kernel fills the checksum in.
    let start = Instant::now();
    sock.send_to(&pkt, &SocketAddr::new(dst, 0).into())
        .map_err(|source| CtlError::Io {
            doing: format!("sending an ICMP echo to {dst}"),
            source,
        })?;
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1500];
    while let Some(left) = timeout.checked_sub(start.elapsed()) {
        let io = |source| CtlError::Io {
            doing: format!("waiting for an ICMP echo reply from {dst}"),
            source,
        };
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(io)?;
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
            Err(e) => return Err(io(e)),
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

/// `; path MTU ...` when the path to `p` is narrower than `mtu` (packets
/// between the two get ICMP too-big), else nothing.
pub fn narrow_path(p: &PeerStatus, mtu: u16) -> String {
    match p.path_mtu {
        Some(path) if path < mtu => format!(
            "; path MTU {path} is below the MTU in use ({mtu}): packets over {path} bytes to it get \
             ICMP too-big from the gateway (counted as too_big)"
        ),
        _ => String::new(),
    }
}

/// One link checked: a peer's gateway pinged through the tunnel.
#[derive(Debug, Clone)]
pub struct LinkCheck {
    pub peer: String,
    pub gateway: IpAddr,
    pub rtt: Option<Duration>,
    /// `ok (1.2 ms)` or `BROKEN: ...` with the likely reason.
    pub verdict: String,
}

/// Pings every peer's gateway (each of its pod CIDRs) through the tunnel
/// and says, for each that does not answer, the likely reason.
pub fn check(s: &Status, timeout: Duration, now: u64) -> Result<Vec<LinkCheck>, CtlError> {
    if s.peers.is_empty() {
        return Err(CtlError::NoPeers);
    }
    let mut links = Vec::new();
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
                (Some(rtt), _, _) => format!(
                    "ok ({:.1} ms){}",
                    rtt.as_secs_f64() * 1000.0,
                    narrow_path(p, s.mtu)
                ),
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
            links.push(LinkCheck {
                peer: p.name.clone(),
                gateway: gw,
                rtt,
                verdict,
            });
        }
    }
    Ok(links)
}

/// What `uninstall` removes.
#[derive(Debug, Clone)]
pub struct Uninstall {
    pub state_dir: PathBuf,
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub interface: String,
    pub cni_conf_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    /// Also the state directory (key, address allocations).
    pub purge: bool,
}

/// Removes a file; says what it did.
fn remove(path: &Path, what: &str) -> Result<String, CtlError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(format!("removed {what} {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Ok(format!("no {what} at {}", path.display()))
        }
        Err(source) => Err(CtlError::Io {
            doing: format!("removing {}", path.display()),
            source,
        }),
    }
}

/// Removes the state directory, or only what is in it when the directory
/// is a mount point (a hostPath or bind mount cannot be removed).
fn purge_dir(dir: &Path) -> Result<String, CtlError> {
    let io = |doing: String| move |source| CtlError::Io { doing, source };
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(format!("no state directory {}", dir.display()))
        }
        Err(e) => return Err(io(format!("reading {}", dir.display()))(e)),
    };
    for e in entries {
        let path = e.map_err(io(format!("reading {}", dir.display())))?.path();
        let gone = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        gone.map_err(io(format!("removing {}", path.display())))?;
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(format!("removed the state directory {}", dir.display())),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(format!(
            "emptied the state directory {} (a mount point, so the directory stays)",
            dir.display()
        )),
        Err(e) => Err(io(format!("removing {}", dir.display()))(e)),
    }
}

/// Removes what tunmesh left on this node once its router stopped: a
/// leftover TUN device and its routes, the CNI conflist and plugin, this
/// Node's annotations, and with `purge` the state directory. Refuses while
/// the router still writes its status. Returns a line per step.
pub async fn uninstall(u: &Uninstall) -> Result<Vec<String>, CtlError> {
    // A running router holds its UDP port (both routers do during a
    // handover); one that stopped, or was killed, holds nothing.
    if let Ok(s) = Status::read(&u.state_dir) {
        let held = |ip: IpAddr| {
            std::net::UdpSocket::bind((ip, s.listen_port))
                .is_err_and(|e| e.kind() == std::io::ErrorKind::AddrInUse)
        };
        if held(Ipv6Addr::UNSPECIFIED.into()) || held(Ipv4Addr::UNSPECIFIED.into()) {
            return Err(CtlError::RouterRunning(s.interface, s.listen_port));
        }
    }
    let mut done = Vec::new();
    // The TUN device goes with the router's process; a leftover (persistent
    // device, or a crash mid-start) goes here, its routes with it.
    let host = HostNet::connect()?;
    done.push(if host.delete_link(&u.interface).await? {
        format!("removed interface {} and its routes", u.interface)
    } else {
        format!("no interface {}", u.interface)
    });
    done.push(remove(&u.cni_conf_dir.join(CONFLIST_FILE), "CNI conflist")?);
    done.push(remove(&u.cni_bin_dir.join(PLUGIN_TYPE), "CNI plugin")?);
    done.push(remove(
        &u.cni_bin_dir.join(PORTMAP_TYPE),
        "chained portmap plugin",
    )?);
    let api: Api<Node> = Api::all(client(u.kubeconfig.as_deref()).await?);
    let nulls: serde_json::Map<String, serde_json::Value> = ROUTER_ANNOTATIONS
        .iter()
        .map(|a| (a.to_string(), serde_json::Value::Null))
        .collect();
    let patch = serde_json::json!({ "metadata": { "annotations": nulls }});
    api.patch(&u.node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| CtlError::Api {
            doing: format!("removing the annotations from Node {}", u.node_name),
            message: explain(&e),
        })?;
    done.push(format!(
        "removed {} from Node {} (an operator's {ANN_FORCE_ENDPOINT} is left alone)",
        ROUTER_ANNOTATIONS.join(", "),
        u.node_name
    ));
    if u.purge {
        done.push(purge_dir(&u.state_dir)?);
    } else {
        done.push(format!(
            "kept {} (key, pod address allocations); --purge removes it",
            u.state_dir.display()
        ));
    }
    Ok(done)
}

/// `tunmesh-ctl accept-key NODE`: the key Node `node` shows now is to be
/// used although it was not announced first (a reinstalled node, a key
/// replaced by hand). Sets `tunmesh.io/accept-public-key` to that key, as
/// the operator (a router's token may not: deploy/node-policy.yaml); every
/// router takes it from the Node's next event. `expect`, when given, must
/// be the key shown, so that what was checked is what gets accepted.
pub async fn accept_key(
    kubeconfig: Option<&Path>,
    node: &str,
    expect: Option<&str>,
) -> Result<String, CtlError> {
    let api: Api<Node> = Api::all(client(kubeconfig).await?);
    let api_err = |doing: String| {
        move |e: kube::Error| CtlError::Api {
            doing,
            message: explain(&e),
        }
    };
    let n = api
        .get(node)
        .await
        .map_err(api_err(format!("reading Node {node}")))?;
    let shown = n
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANN_PUBLIC_KEY))
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| CtlError::NoKeyShown {
            node: node.to_string(),
        })?;
    tunmesh_contract::validate::public_key(&shown).map_err(|e| CtlError::NotAKey {
        node: node.to_string(),
        why: e.to_string(),
    })?;
    if let Some(want) = expect.filter(|w| *w != shown) {
        return Err(CtlError::OtherKeyShown {
            node: node.to_string(),
            shown,
            want: want.to_string(),
        });
    }
    let patch =
        serde_json::json!({ "metadata": { "annotations": { ANN_ACCEPT_PUBLIC_KEY: shown } } });
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(api_err(format!("annotating Node {node}")))?;
    Ok(format!(
        "accepted {shown} for Node {node} ({ANN_ACCEPT_PUBLIC_KEY}); every router uses it from now on"
    ))
}
