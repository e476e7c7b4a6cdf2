//! `tunmesh-lab scale`: what a router costs in a cluster of thousands of
//! Nodes. A lab of K real routers (and a pod each) plus N hollow Nodes in
//! the same API server (`hollow`), then, for each N:
//!
//! - the hollow Nodes created, and the routers' data planes (their
//!   WireGuard API) listing every one;
//! - node-1's router restarted cold (no warm-start cache): the time to a
//!   full mesh in its data plane, and the CPU it took;
//! - resident memory and its peak per router;
//! - CPU per router idle, and under status reports at a kubelet's rate
//!   (N/300 a second) and at the scalability precondition's 20 a second;
//!   the bytes and events each router received from the API server then,
//!   and the API server's own figures per watcher;
//! - mesh changes at one a second under 17 status reports a second
//!   (endpoint moved, next key announced, Node deleted, Node added), each
//!   timed from the API server's answer to the change showing in every
//!   router's data plane;
//! - with `--live`, live sessions with every hollow Node (`responder`
//!   answers as them): a handover to a new router on node-1 and a warm
//!   start after a SIGKILL, with that many sessions;
//! - a numbered probe between the real routers' pods all along: what it
//!   lost outside the deliberate restarts.
//!
//! It prints one row per N. A benchmark, not a test: figures, not verdicts.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::lab::{Lab, LabOptions};
use crate::netns::{self, in_netns};
use crate::probe::Probe;

pub mod hollow;
pub mod responder;

use hollow::{Admin, Change, Hollow};

/// What `tunmesh-lab scale` is asked.
#[derive(Debug, Clone)]
pub struct Options {
    pub routers: usize,
    pub sizes: Vec<usize>,
    /// Images in each hollow Node's status (a kubelet reports up to 50).
    pub images: usize,
    /// Length of each CPU window.
    pub seconds: f64,
    /// Mesh changes to time.
    pub changes: usize,
    /// Live sessions with every hollow Node, and the handover and warm
    /// start with them.
    pub live: bool,
    pub root: PathBuf,
}

/// One row: the figures for one N.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Row {
    pub nodes: usize,
    pub routers: usize,
    pub create_s: f64,
    /// From the first create to every router listing every peer.
    pub initial_mesh_s: f64,
    /// node-1's router, cold: start to every peer in its data plane.
    pub cold_mesh_s: f64,
    pub cold_cpu_s: f64,
    pub rss_mib: Vec<f64>,
    pub peak_rss_mib: Vec<f64>,
    pub cpu_idle_pct: Vec<f64>,
    /// With the probe's 100 packets a second each way and nothing else.
    pub cpu_probe_pct: Vec<f64>,
    pub kubelet_rate: f64,
    pub cpu_kubelet_pct: Vec<f64>,
    pub cpu_20_pct: Vec<f64>,
    /// Per router at 20 status reports a second.
    pub api_bytes_per_s: Vec<f64>,
    pub api_events_per_s: Vec<f64>,
    /// The API server's bytes per watch event for Nodes (all watchers).
    pub apiserver_bytes_per_event: f64,
    pub apiserver_node_watchers: f64,
    /// A hollow Node as a whole-object watch would send it.
    pub object_bytes: usize,
    /// Mesh changes: from the API's answer to every router's data plane.
    pub change_ms: Vec<f64>,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub change_max_ms: f64,
    pub deletes_max_ms: f64,
    pub changes_lost: usize,
    /// Table builds and mesh updates per router during the status churn
    /// (both 0 when a status report costs nothing).
    pub churn_mesh_updates: Vec<f64>,
    pub live_sessions: usize,
    pub handover_gap_ms: Option<f64>,
    pub warm_start_ms: Option<f64>,
    pub probes_sent: usize,
    pub probes_lost: usize,
    /// The lost probes by the phase they were sent in.
    pub probes_lost_by_phase: std::collections::BTreeMap<String, usize>,
}

/// CPU seconds and memory of a process.
fn proc_cpu(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime: fields 14 and 15, 12 and 13 after the name.
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no memory arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks / hz
}

fn proc_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// One peer as a router's WireGuard API tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UapiPeer {
    pub endpoint: String,
    /// Unix seconds of the last handshake (0: none).
    pub handshake: u64,
    pub allowed_ips: Vec<String>,
}

/// A router's data plane as its WireGuard API tells it, by peer (hex key).
pub fn uapi_peers(iface: &str) -> Result<BTreeMap<String, UapiPeer>> {
    let path = tunmesh_router::uapi::socket_path(
        std::path::Path::new(tunmesh_router::uapi::SOCKET_DIR),
        iface,
    );
    let mut s = std::os::unix::net::UnixStream::connect(&path)
        .with_context(|| format!("connecting to {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"get=1\n\n")?;
    let mut text = String::new();
    let mut buf = vec![0u8; 1 << 16];
    while !text.ends_with("\n\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let mut peers = BTreeMap::new();
    let mut cur: Option<String> = None;
    for l in text.lines() {
        let Some((k, v)) = l.split_once('=') else {
            continue;
        };
        match k {
            "public_key" => {
                cur = Some(v.to_string());
                peers.insert(v.to_string(), UapiPeer::default());
            }
            "endpoint" | "last_handshake_time_sec" | "allowed_ip" => {
                if let Some(p) = cur.as_ref().and_then(|c| peers.get_mut(c)) {
                    match k {
                        "endpoint" => p.endpoint = v.to_string(),
                        "allowed_ip" => p.allowed_ips.push(v.to_string()),
                        _ => p.handshake = v.parse().unwrap_or(0),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(peers)
}

/// A key as the WireGuard API writes it.
pub fn hex(k: &tunmesh_keygen::PublicKey) -> String {
    k.as_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A router's counters from its `/metrics` (those without labels).
pub fn router_metrics(ns: &str) -> Result<BTreeMap<String, f64>> {
    let text = in_netns(ns, || -> Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", 9475))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })??;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

pub fn metric(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.get(name).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until every router lists `want` peers; how long from `from`.
fn wait_peers(lab: &Lab, want: usize, from: Instant, timeout: Duration) -> Result<f64> {
    let ifaces: Vec<String> = lab
        .state
        .nodes
        .iter()
        .map(|n| n.interface.clone())
        .collect();
    let done = netns::wait_for(timeout, || {
        ifaces
            .iter()
            .all(|i| uapi_peers(i).map(|p| p.len() >= want).unwrap_or(false))
            .then(|| from.elapsed())
    });
    match done {
        Some(t) => Ok(t.as_secs_f64()),
        None => {
            let have: Vec<usize> = ifaces
                .iter()
                .map(|i| uapi_peers(i).map(|p| p.len()).unwrap_or(0))
                .collect();
            bail!("the routers list {have:?} peers after {timeout:?}, not {want}")
        }
    }
}

/// CPU per router (percent of a core) over `seconds`, while `during` runs
/// on its own thread (none: idle).
fn cpu_over(
    lab: &Lab,
    seconds: f64,
    during: Option<std::thread::JoinHandle<Result<u64>>>,
) -> Result<Vec<f64>> {
    let pids: Vec<u32> = lab
        .state
        .nodes
        .iter()
        .filter_map(|n| n.router_pid)
        .collect();
    let before: Vec<f64> = pids.iter().map(|p| proc_cpu(*p)).collect();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let after: Vec<f64> = pids.iter().map(|p| proc_cpu(*p)).collect();
    let el = t.elapsed().as_secs_f64();
    if let Some(h) = during {
        h.join()
            .map_err(|_| anyhow::anyhow!("the status reports panicked"))??;
    }
    Ok(before
        .iter()
        .zip(after)
        .map(|(b, a)| 100.0 * (a - b) / el)
        .collect())
}

/// Status reports at `rate` a second for `seconds`, in the background.
fn churn(
    admin: &Admin,
    names: Vec<String>,
    rate: f64,
    seconds: f64,
) -> std::thread::JoinHandle<Result<u64>> {
    let admin = admin.clone();
    std::thread::spawn(move || {
        admin.run(move |api| hollow::status_churn(api, names, rate, seconds))
    })
}

/// Runs the harness for every size; prints each row as it is done.
pub fn run(opts: &Options) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &n in &opts.sizes {
        println!("\n== {n} hollow Nodes, {} routers ==", opts.routers);
        let row = one(opts, n)?;
        print_rows(std::slice::from_ref(&row));
        rows.push(row);
    }
    println!("\n== summary ==");
    print_rows(&rows);
    Ok(rows)
}

/// A lab of `routers` real routers (a pod each) whose cluster CIDRs hold
/// the hollow Nodes' pod CIDRs too.
pub fn lab_options(routers: usize, root: PathBuf) -> LabOptions {
    let cluster = format!(
        "{},{},{}",
        crate::lab::CLUSTER_V4,
        hollow::CLUSTER_V4,
        crate::lab::CLUSTER_V6
    );
    LabOptions {
        nodes: routers,
        pods_per_node: 1,
        root,
        router_args: vec!["--cluster-cidrs".into(), cluster],
        ..Default::default()
    }
}

fn one(opts: &Options, n: usize) -> Result<Row> {
    let mut lab = Lab::up(&lab_options(opts.routers, opts.root.clone()))?;
    let result = measure(opts, &mut lab, n);
    let down = lab.down();
    let row = result?;
    down?;
    Ok(row)
}

fn measure(opts: &Options, lab: &mut Lab, n: usize) -> Result<Row> {
    let k = opts.routers;
    let mut row = Row {
        nodes: n,
        routers: k,
        kubelet_rate: n as f64 / 300.0,
        ..Default::default()
    };
    let cp = lab.control_plane()?.clone();
    let admin = Admin::new(&cp);
    let hollow_ns = lab.add_underlay_namespace("hollow", hollow::ENDPOINT_IP)?;
    let a = lab.pod("node-1-pod-1").context("node-1's pod")?.clone();
    let b = lab.pod("node-2-pod-1").context("node-2's pod")?.clone();
    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    probe.wait_echo_after(Instant::now(), "before the hollow Nodes");
    // Deliberate disruptions, left out of the probe's loss; the phases,
    // by when each began, to say where a probe was lost.
    let mut disrupted: Vec<(Instant, Instant)> = Vec::new();
    let mut phases: Phases = vec![("create", Instant::now())];

    let mut hollows: Vec<Hollow> = (0..n).map(Hollow::new).collect();
    let objects: Vec<_> = hollows.iter().map(|h| h.object(opts.images)).collect();
    println!("creating {n} hollow Nodes ({} images each)...", opts.images);
    let t = Instant::now();
    row.create_s = admin
        .run(move |api| hollow::create_all(api, objects))?
        .as_secs_f64();
    row.initial_mesh_s = wait_peers(lab, n + k - 1, t, Duration::from_secs(600))?;
    row.object_bytes = hollow::object_bytes(&cp, 0)?;
    println!(
        "created in {:.1} s; every router lists every peer {:.1} s after the first create",
        row.create_s, row.initial_mesh_s
    );

    // node-1's router, cold.
    phases.push(("cold start", Instant::now()));
    let cache = lab.state.nodes[0]
        .state_dir
        .join(tunmesh_router::warm::CACHE_FILE);
    let down_at = Instant::now();
    lab.stop_router(0)?;
    let _ = std::fs::remove_file(&cache);
    let t = Instant::now();
    lab.start_router(0)?;
    let iface = lab.state.nodes[0].interface.clone();
    let pid = lab.state.nodes[0].router_pid.context("node-1's router")?;
    let cold = netns::wait_for(Duration::from_secs(300), || {
        uapi_peers(&iface)
            .ok()
            .filter(|p| p.len() >= n + k - 1)
            .map(|_| t.elapsed())
    })
    .context("node-1's router did not list every peer after a cold start")?;
    row.cold_mesh_s = cold.as_secs_f64();
    row.cold_cpu_s = proc_cpu(pid);
    probe.wait_echo_after(Instant::now(), "after the cold start");
    disrupted.push((down_at, Instant::now()));
    println!(
        "cold start: every peer in node-1's data plane {:.2} s after its start ({:.2} CPU seconds)",
        row.cold_mesh_s, row.cold_cpu_s
    );
    std::thread::sleep(Duration::from_secs(3));
    for node in &lab.state.nodes {
        let p = node.router_pid.unwrap_or(0);
        row.rss_mib.push(proc_mib(p, "VmRSS:"));
        row.peak_rss_mib.push(proc_mib(p, "VmHWM:"));
    }

    // CPU: idle, then status reports at a kubelet's rate and at 20/s; the
    // probe pauses meanwhile (100 packets a second each way cost more than
    // the cluster does), and its own cost is taken apart.
    let names: Vec<String> = (0..n).map(hollow::name).collect();
    phases.push(("status churn", Instant::now()));
    row.cpu_probe_pct = cpu_over(lab, opts.seconds, None)?;
    probe.pause();
    std::thread::sleep(Duration::from_millis(500));
    row.cpu_idle_pct = cpu_over(lab, opts.seconds, None)?;
    let before: Vec<_> = lab
        .state
        .nodes
        .iter()
        .map(|n| router_metrics(&n.ns))
        .collect::<Result<_>>()?;
    row.cpu_kubelet_pct = cpu_over(
        lab,
        opts.seconds,
        Some(churn(&admin, names.clone(), row.kubelet_rate, opts.seconds)),
    )?;
    let mid: Vec<_> = lab
        .state
        .nodes
        .iter()
        .map(|n| router_metrics(&n.ns))
        .collect::<Result<_>>()?;
    let api_before = hollow::watch_cost(&cp)?;
    let t = Instant::now();
    row.cpu_20_pct = cpu_over(
        lab,
        opts.seconds,
        Some(churn(&admin, names.clone(), 20.0, opts.seconds)),
    )?;
    let el = t.elapsed().as_secs_f64();
    let api_after = hollow::watch_cost(&cp)?;
    probe.resume();
    let after: Vec<_> = lab
        .state
        .nodes
        .iter()
        .map(|n| router_metrics(&n.ns))
        .collect::<Result<_>>()?;
    for ((b, m), a) in before.iter().zip(&mid).zip(&after) {
        row.api_bytes_per_s.push(
            (metric(a, "tunmesh_kubernetes_received_bytes_total")
                - metric(m, "tunmesh_kubernetes_received_bytes_total"))
                / el,
        );
        row.api_events_per_s.push(
            (metric(a, "tunmesh_kubernetes_watch_events_total")
                - metric(m, "tunmesh_kubernetes_watch_events_total"))
                / el,
        );
        row.churn_mesh_updates.push(
            metric(a, "tunmesh_mesh_updates_total") - metric(b, "tunmesh_mesh_updates_total")
                + metric(a, "tunmesh_peer_table_builds_total")
                - metric(b, "tunmesh_peer_table_builds_total"),
        );
    }
    let ev = (api_after.events - api_before.events).max(1.0);
    row.apiserver_bytes_per_event = (api_after.bytes - api_before.bytes) / ev;
    row.apiserver_node_watchers = api_after.watchers;
    println!(
        "CPU per router: the probe's traffic alone {:?} %; idle {:?} %, {:.1} status reports/s {:?} %, 20/s {:?} %",
        round(&row.cpu_probe_pct),
        round(&row.cpu_idle_pct),
        row.kubelet_rate,
        round(&row.cpu_kubelet_pct),
        round(&row.cpu_20_pct)
    );

    // Mesh changes at 1/s under 17 status reports a second.
    phases.push(("mesh changes", Instant::now()));
    let changes = opts.changes;
    let bg = churn(&admin, names, 17.0, changes as f64 + 15.0);
    let ifaces: Vec<String> = lab
        .state
        .nodes
        .iter()
        .map(|n| n.interface.clone())
        .collect();
    let mut next_new = n;
    let mut used = std::collections::HashSet::new();
    for c in 0..changes {
        let tick = Instant::now();
        // A Node not changed yet (each once: a deleted one is gone).
        let Some(i) = (0..n)
            .map(|d| (c * 7919 + d) % n)
            .find(|i| !used.contains(i))
        else {
            break;
        };
        used.insert(i);
        let change = match c % 4 {
            0 => Change::EndpointMoved {
                index: i,
                port: 40000 + (c as u16),
            },
            1 => Change::KeyAnnounced {
                index: i,
                next: tunmesh_keygen::PrivateKey::generate()
                    .public_key()
                    .to_base64(),
            },
            2 => Change::Deleted { index: i },
            _ => {
                let h = Hollow::new(next_new);
                next_new += 1;
                let node = Box::new(h.object(opts.images));
                hollows.push(h);
                Change::Added { node }
            }
        };
        let landed = hollow::landed(&change, &hollows)?;
        let ch = change.clone();
        let accepted = admin.run(move |api| async move { hollow::apply(&api, &ch).await })?;
        for iface in &ifaces {
            let seen = netns::wait_for(Duration::from_secs(10), || {
                uapi_peers(iface)
                    .ok()
                    .filter(|p| landed(p))
                    .map(|_| accepted.elapsed())
            });
            match seen {
                Some(d) => {
                    let ms = d.as_secs_f64() * 1e3;
                    row.change_ms.push(ms);
                    if matches!(change, Change::Deleted { .. }) {
                        row.deletes_max_ms = row.deletes_max_ms.max(ms);
                    }
                }
                None => {
                    row.changes_lost += 1;
                    println!("{}: not in {iface}'s data plane after 10 s", change.kind());
                }
            }
        }
        if let Some(rest) = Duration::from_secs(1).checked_sub(tick.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    let _ = bg.join();
    let mut sorted = row.change_ms.clone();
    sorted.sort_by(f64::total_cmp);
    row.change_p50_ms = percentile(&sorted, 0.5);
    row.change_p99_ms = percentile(&sorted, 0.99);
    row.change_max_ms = sorted.last().copied().unwrap_or(0.0);
    println!(
        "{changes} mesh changes under 17 status reports/s: API to data plane p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} not landed)",
        row.change_p50_ms, row.change_p99_ms, row.change_max_ms, row.changes_lost
    );

    if opts.live {
        live(
            lab,
            &hollow_ns,
            &hollows,
            &mut row,
            &probe,
            (&mut disrupted, &mut phases),
        )?;
    }

    // The probe, outside the deliberate restarts.
    let end = Instant::now() - Duration::from_millis(200);
    let sent = probe.sent_between(probe_start(&probe), end);
    row.probes_sent = sent.len();
    let lost = probe.lost_of(&sent);
    for (_, at) in lost
        .into_iter()
        .filter(|(_, at)| !disrupted.iter().any(|(a, b)| at >= a && at <= b))
    {
        row.probes_lost += 1;
        let phase = phases
            .iter()
            .rev()
            .find(|(_, began)| *began <= at)
            .map_or("before", |(name, _)| name);
        *row.probes_lost_by_phase
            .entry(phase.to_string())
            .or_default() += 1;
    }
    probe.stop();
    Ok(row)
}

fn probe_start(p: &Probe) -> Instant {
    p.first_sent().unwrap_or_else(Instant::now)
}

/// The run's phases in order, each with the moment it began.
type Phases = Vec<(&'static str, Instant)>;

/// Live sessions with every hollow Node, then the handover and the warm
/// start with them.
fn live(
    lab: &mut Lab,
    ns: &str,
    hollows: &[Hollow],
    row: &mut Row,
    probe: &Probe,
    (disrupted, phases): (&mut Vec<(Instant, Instant)>, &mut Phases),
) -> Result<()> {
    phases.push(("live sessions", Instant::now()));
    let routers: Vec<(IpAddr, tunmesh_keygen::PublicKey)> = lab
        .state
        .nodes
        .iter()
        .map(|n| {
            Ok((
                IpAddr::V4(n.underlay_ip),
                tunmesh_keygen::PublicKey::from_base64(&n.public_key)?,
            ))
        })
        .collect::<Result<_>>()?;
    let keys: Vec<(usize, tunmesh_keygen::PrivateKey)> = hollows
        .iter()
        .map(|h| {
            (
                h.index,
                tunmesh_keygen::PrivateKey::from_bytes(*h.key.as_bytes()),
            )
        })
        .collect();
    let responder = responder::Responder::start(ns, keys, hollow::endpoint_port, routers)?;
    // Datagrams from node-1's pod to each hollow Node's pod network, as
    // an application that talks to every node would send them: 1,000 a
    // second, and again every 10 s to a Node with no session yet (a burst
    // of thousands at once overflows the veth's backlog, 1,000 packets,
    // before any router sees them). node-1's router handshakes with each.
    let a = lab.pod("node-1-pod-1").context("node-1's pod")?.clone();
    let targets: Vec<(String, Ipv4Addr)> = hollows
        .iter()
        .map(|h| (hex(&h.key.public_key()), hollow::gateway_v4(h.index)))
        .collect();
    let iface = lab.state.nodes[0].interface.clone();
    // Those the mesh changes moved, rotated or deleted have no responder.
    let want = hollows.len().saturating_sub(2 + row.change_ms.len());
    let sock = in_netns(&a.ns, || std::net::UdpSocket::bind("0.0.0.0:0"))??;
    let mut sent: Vec<Option<Instant>> = vec![None; targets.len()];
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut sessions = None;
    while Instant::now() < deadline {
        let live: std::collections::BTreeSet<String> = uapi_peers(&iface)?
            .into_iter()
            .filter(|(_, e)| e.handshake > 0)
            .map(|(k, _)| k)
            .collect();
        if live.len() >= want {
            sessions = Some(live.len());
            break;
        }
        let mut batch = 0;
        for (i, (key, ip)) in targets.iter().enumerate() {
            if batch == 100 {
                break;
            }
            let due = sent[i].is_none_or(|t| t.elapsed() > Duration::from_secs(10));
            if due && !live.contains(key) {
                let _ = sock.send_to(b"hello", (*ip, 9));
                sent[i] = Some(Instant::now());
                batch += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    row.live_sessions = uapi_peers(&iface)?
        .values()
        .filter(|e| e.handshake > 0)
        .count();
    println!(
        "live sessions on node-1's router: {} (the responder answered {} handshakes){}",
        row.live_sessions,
        responder
            .counts
            .answered
            .load(std::sync::atomic::Ordering::Relaxed),
        if sessions.is_none() {
            "; not all within 180 s"
        } else {
            ""
        }
    );

    // A handover to a new router on node-1, with those sessions.
    phases.push(("handover", Instant::now()));
    let invocation = lab.router_invocation(0, &lab.state.router_args.clone())?;
    let old = lab.state.nodes[0].router_pid.context("node-1's router")?;
    lab.spawn_router(0, &invocation)?;
    if netns::wait_exit(old, Duration::from_secs(30)).is_none() {
        bail!("node-1's router did not hand over within 30 s");
    }
    let st = lab
        .wait_status("node-1", Duration::from_secs(30), |s| {
            s.start.kind == "handover"
        })
        .context("the new router's status")?;
    row.handover_gap_ms = st.start.handover_gap_us.map(|us| us as f64 / 1e3);
    println!(
        "handover with {} sessions: {:?} ms from the old workers' stop to the new ones' start",
        st.peers.len(),
        row.handover_gap_ms
    );

    // A warm start after a SIGKILL.
    phases.push(("warm start", Instant::now()));
    let kill = Instant::now();
    lab.kill_router(0)?;
    let t = Instant::now();
    lab.spawn_router(0, &invocation)?;
    let echo = probe.wait_echo_after(t, "after the warm start");
    row.warm_start_ms = Some((echo - t).as_secs_f64() * 1e3);
    disrupted.push((kill, echo));
    let st = lab
        .wait_status("node-1", Duration::from_secs(30), |s| {
            !s.start.kind.is_empty()
        })
        .context("the restarted router's status")?;
    println!(
        "warm start ({}) after a SIGKILL: the pods talk again {:.1} ms after the new process started",
        st.start.kind,
        row.warm_start_ms.unwrap_or(0.0)
    );
    responder.stop()
}

fn round(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 100.0).round() / 100.0).collect()
}

/// The table, one row per N.
pub fn print_rows(rows: &[Row]) {
    println!(
        "{:>6} {:>8} {:>9} {:>12} {:>14} {:>10} {:>13} {:>10} {:>18} {:>12} {:>9} {:>9} {:>6}",
        "nodes",
        "create s",
        "cold s",
        "RSS MiB",
        "peak MiB",
        "idle %",
        "kubelet-rate %",
        "20/s %",
        "change p50/p99/max",
        "API B/s@20",
        "handover",
        "warm",
        "lost"
    );
    for r in rows {
        let j = |v: &[f64], p: usize| {
            v.iter()
                .map(|x| format!("{x:.p$}"))
                .collect::<Vec<_>>()
                .join("/")
        };
        println!(
            "{:>6} {:>8.1} {:>9.2} {:>12} {:>14} {:>10} {:>13} {:>10} {:>18} {:>12} {:>9} {:>9} {:>6}",
            r.nodes,
            r.create_s,
            r.cold_mesh_s,
            j(&r.rss_mib, 1),
            j(&r.peak_rss_mib, 1),
            j(&r.cpu_idle_pct, 2),
            j(&r.cpu_kubelet_pct, 2),
            j(&r.cpu_20_pct, 2),
            format!("{:.0}/{:.0}/{:.0} ms", r.change_p50_ms, r.change_p99_ms, r.change_max_ms),
            j(&r.api_bytes_per_s, 0),
            r.handover_gap_ms.map(|g| format!("{g:.1} ms")).unwrap_or_else(|| "-".into()),
            r.warm_start_ms.map(|g| format!("{g:.0} ms")).unwrap_or_else(|| "-".into()),
            format!("{}/{}", r.probes_lost, r.probes_sent),
        );
    }
    for r in rows {
        println!(
            "scale: {} nodes: cold start to full mesh {:.2} s ({:.2} CPU s); RSS {:?} MiB, peak {:?}; CPU idle {:?} %, at {:.1}/s {:?} %, at 20/s {:?} %; \
             mesh change p50 {:.0} ms p99 {:.0} ms max {:.0} ms, deletes max {:.0} ms, {} not landed; \
             per router at 20/s: {:?} B/s and {:?} events/s from the API server (status reports changed the mesh {:?} times); \
             the API server sends {:.0} B per Node watch event to {} watchers (a whole Node is {} B); \
             {} live sessions, handover gap {:?} ms, warm start {:?} ms; probes lost {} of {} {:?}",
            r.nodes,
            r.cold_mesh_s,
            r.cold_cpu_s,
            round(&r.rss_mib),
            round(&r.peak_rss_mib),
            round(&r.cpu_idle_pct),
            r.kubelet_rate,
            round(&r.cpu_kubelet_pct),
            round(&r.cpu_20_pct),
            r.change_p50_ms,
            r.change_p99_ms,
            r.change_max_ms,
            r.deletes_max_ms,
            r.changes_lost,
            round(&r.api_bytes_per_s),
            round(&r.api_events_per_s),
            r.churn_mesh_updates,
            r.apiserver_bytes_per_event,
            r.apiserver_node_watchers,
            r.object_bytes,
            r.live_sessions,
            r.handover_gap_ms,
            r.warm_start_ms,
            r.probes_lost,
            r.probes_sent,
            r.probes_lost_by_phase,
        );
    }
}
