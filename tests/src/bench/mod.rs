//! `tunmesh-lab bench`: tunmesh against raw veth, both wireguard-go
//! packages and boringtun-cli, measured side by side in one run, the way
//! `shared/bench/anchors.sh` does it: two namespaces joined by a veth, a
//! tunnel between them, iperf3 from one to the other.
//!
//! The machine is shared and noisy, so every comparison is made inside one
//! repetition: each repetition measures every configuration (raw veth too),
//! in an order rotated by one place per repetition; a ratio (to raw veth,
//! or tunmesh to the newer wireguard-go) is taken between figures of the
//! same repetition and test, and the headline is the median of those
//! ratios with their spread. A peer that is missing or fails is reported
//! missing and its ratios are absent: never replaced by another.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use tunmesh_keygen::PrivateKey;

use crate::netns::{self, add_netns, exec, veth, Cleanup};
use crate::peers::{self, Side};

pub mod engine;
pub mod latency;
pub use latency::{LatRow, LatSummary, LATENCY_TESTS};

/// Every test the bench runs unless told otherwise: throughput, then
/// latency and small packets.
pub fn default_tests() -> Vec<String> {
    ALL_TESTS
        .iter()
        .chain(LATENCY_TESTS.iter())
        .map(|s| s.to_string())
        .collect()
}

/// Where `scripts/install-anchors.sh` puts the peers we compare against.
pub const DEFAULT_ANCHORS: &str = "/var/cache/tunmesh/anchors";
pub const ALL_CONFIGS: [&str; 5] = ["raw", "tunmesh", "wggo", "wggo_new", "boringtun"];
pub const ALL_TESTS: [&str; 3] = ["tcp1", "tcp4", "udp"];
/// What the headline compares tunmesh against: the newer, offload-capable
/// wireguard-go (the strongest userspace WireGuard here), on one TCP stream.
pub const HEADLINE_PEER: &str = "wggo_new";
pub const HEADLINE_TEST: &str = "tcp1";
/// The command that installs the peers (from a checkout, as root).
pub const INSTALL_COMMAND: &str = "scripts/install-anchors.sh";

const UNDERLAY_A: &str = "172.30.0.1";
const UNDERLAY_B: &str = "172.30.0.2";
/// The underlay addresses with the WireGuard port (`peers::WG_PORT`).
const ENDPOINT_A: &str = "172.30.0.1:51820";
const ENDPOINT_B: &str = "172.30.0.2:51820";
const MTU: &str = "1420";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub seconds: u32,
    pub reps: u32,
    pub configs: Vec<String>,
    pub tests: Vec<String>,
    pub anchors: PathBuf,
    /// Run `scripts/install-anchors.sh` first when a peer is missing.
    pub install: bool,
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub rep: u32,
    /// Place of this configuration in its repetition's order (0-based).
    pub position: usize,
    pub config: String,
    pub test: String,
    /// Receiver goodput (UDP too: what arrived).
    pub gbps: f64,
    /// The sender's rate.
    pub sent_gbps: f64,
    /// Against raw veth of the same repetition and test.
    pub ratio: Option<f64>,
    /// Against the newer wireguard-go of the same repetition and test.
    pub vs_wggo_new: Option<f64>,
    /// Both tunnel daemons together, percent of one core.
    pub daemon_cpu: f64,
    /// Daemon CPU seconds per Gbit that arrived.
    pub cpu_s_per_gbit: Option<f64>,
    /// The whole machine's idle time during the test, percent of all its
    /// CPUs (headroom no process used: iperf3 and the daemons share them).
    pub machine_idle: f64,
    /// TCP retransmits, or UDP receiver loss in percent.
    pub retr_or_loss: f64,
    pub udp_rcvbuf_errors: u64,
    pub tun_drops: u64,
}

/// Median and spread of a figure over the repetitions.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Spread {
    pub fn of(v: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let m = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[m]
        } else {
            (v[m - 1] + v[m]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// One config and test over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: String,
    pub test: String,
    pub reps: usize,
    pub gbps: Spread,
    /// Per-repetition ratios to raw veth.
    pub ratio: Option<Spread>,
    /// Per-repetition ratios to the newer wireguard-go.
    pub vs_wggo_new: Option<Spread>,
    pub daemon_cpu: f64,
    pub cpu_s_per_gbit: Option<f64>,
    pub machine_idle: f64,
    pub retr_or_loss: f64,
    pub udp_rcvbuf_errors: u64,
    pub tun_drops: u64,
}

/// The headline: tunmesh against the newer wireguard-go on one TCP stream.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Headline {
    Measured(Spread),
    /// Why there is no figure (a missing peer, a test not run).
    NotAvailable {
        why: String,
    },
}

impl Headline {
    /// The line the bench ends with.
    pub fn line(&self) -> String {
        match self {
            Headline::Measured(s) => format!(
                "bench: tunmesh/wireguard-go = {:.2} ({HEADLINE_TEST} median of {} per-repetition ratios against the newer wireguard-go, min {:.2}, max {:.2})",
                s.median, s.n, s.min, s.max
            ),
            Headline::NotAvailable { why } => format!("bench: tunmesh/wireguard-go = n/a ({why})"),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub summaries: Vec<Summary>,
    /// Configs that could not run (or not in every repetition), and why.
    pub missing: BTreeMap<String, String>,
    /// The configuration order of each repetition.
    pub orders: Vec<Vec<String>>,
    pub headline: Headline,
    pub versions: BTreeMap<String, String>,
    /// Latency, connection rate and small packets (`latency`).
    pub latency: Vec<LatRow>,
    pub latency_summaries: Vec<LatSummary>,
}

impl Report {
    /// The latency lines a script reads (before the headline).
    pub fn latency_lines(&self) -> Vec<String> {
        latency::lines(
            &self.latency_summaries,
            &self.missing,
            HEADLINE_PEER,
            "wireguard-go",
        )
    }
}

struct Testbed {
    a: String,
    b: String,
    id: String,
    dir: PathBuf,
    clean: Cleanup,
}

impl Drop for Testbed {
    /// Whatever still runs in the testbed's namespaces goes with them.
    fn drop(&mut self) {
        netns::purge_prefix(&format!("tm{}-", self.id));
        netns::set_purge_on_signal(None);
    }
}

/// A running tunnel: its daemons, the address iperf3 targets (B's) and
/// A's own, its TUN names.
struct Tunnel {
    children: Vec<std::process::Child>,
    target: String,
    source: String,
    tuns: [String; 2],
}

impl Testbed {
    fn new() -> Result<Self> {
        let id = netns::run_id();
        let mut clean = Cleanup::default();
        let (a, b) = (format!("tm{id}-ba"), format!("tm{id}-bb"));
        netns::set_purge_on_signal(Some(format!("tm{id}-")));
        let dir = std::env::temp_dir().join(format!("tunmesh-bench-{id}"));
        std::fs::create_dir_all(&dir)?;
        clean.files.push(dir.clone());
        for ns in [&a, &b] {
            add_netns(ns)?;
            clean.netns.push(ns.clone());
        }
        veth(&a, "eth0", &b, "eth0")?;
        for (ns, addr) in [(&a, UNDERLAY_A), (&b, UNDERLAY_B)] {
            netns::addr_up(ns, "eth0", &format!("{addr}/24"))?;
        }
        Ok(Testbed {
            a,
            b,
            id,
            dir,
            clean,
        })
    }

    fn keys(&self) -> Result<[(PrivateKey, PathBuf); 2]> {
        let mk = |n: &str| -> Result<(PrivateKey, PathBuf)> {
            let k = PrivateKey::generate();
            let p = self.dir.join(format!("{n}.key"));
            k.write_file(&p)?;
            Ok((k, p))
        };
        Ok([mk("a")?, mk("b")?])
    }

    /// The two sides of a tunnel: (A, B) with fresh keys; `a_own`/`b_own`
    /// are each side's address, `a_peer`/`b_peer` what each routes to the other.
    fn sides<'a>(
        &'a self,
        keys: &'a [(PrivateKey, PathBuf); 2],
        own: [&'a str; 2],
        peer: [&'a str; 2],
    ) -> [Side<'a>; 2] {
        let [(ka, pa), (kb, pb)] = keys;
        [
            Side {
                ns: &self.a,
                key_file: pa,
                own: own[0],
                peer_key: kb.public_key(),
                peer_endpoint: ENDPOINT_B,
                peer_cidr: peer[0],
            },
            Side {
                ns: &self.b,
                key_file: pb,
                own: own[1],
                peer_key: ka.public_key(),
                peer_endpoint: ENDPOINT_A,
                peer_cidr: peer[1],
            },
        ]
    }

    fn start_tunmesh(&mut self) -> Result<Tunnel> {
        let keys = self.keys()?;
        let sides = self.sides(
            &keys,
            ["10.99.1.0/24", "10.99.2.0/24"],
            ["10.99.2.0/24", "10.99.1.0/24"],
        );
        let dir = self.dir.clone();
        let tuns = ["tunmesh0".into(), "tunmesh0".into()];
        self.start_pair(&sides, ["10.99.1.1", "10.99.2.1"], tuns, |i, side| {
            peers::start_router(side, &dir, ["a", "b"][i], &["--mtu", MTU]).map(|(child, _)| child)
        })
    }

    /// wireguard-go or boringtun-cli in both namespaces, configured with `wg`.
    fn start_wg(&mut self, bin: &Path, extra: &[&str]) -> Result<Tunnel> {
        let keys = self.keys()?;
        let ifs = [format!("tmw{}a", self.id), format!("tmw{}b", self.id)];
        for ifn in &ifs {
            self.clean
                .files
                .push(Path::new("/var/run/wireguard").join(format!("{ifn}.sock")));
        }
        let sides = self.sides(
            &keys,
            ["10.99.0.1/24", "10.99.0.2/24"],
            ["10.99.0.2/32", "10.99.0.1/32"],
        );
        let dir = self.dir.clone();
        let names = ifs.clone();
        self.start_pair(&sides, ["10.99.0.1", "10.99.0.2"], ifs, |i, side| {
            peers::start_wg(
                side,
                bin,
                extra,
                &names[i],
                &dir.join(format!("{}.log", names[i])),
            )
        })
    }

    /// Starts both ends with `start`, then checks that traffic crosses the
    /// tunnel (which also completes the handshake). Whatever was started is
    /// stopped again if any step fails.
    fn start_pair(
        &self,
        sides: &[Side; 2],
        [source, target]: [&str; 2],
        tuns: [String; 2],
        mut start: impl FnMut(usize, &Side) -> Result<std::process::Child>,
    ) -> Result<Tunnel> {
        let mut t = Tunnel {
            children: Vec::new(),
            target: target.into(),
            source: source.into(),
            tuns,
        };
        for (i, side) in sides.iter().enumerate() {
            match start(i, side) {
                Ok(child) => t.children.push(child),
                Err(e) => {
                    stop(t);
                    return Err(e);
                }
            }
        }
        match self.handshake(&t) {
            Ok(()) => Ok(t),
            Err(e) => {
                stop(t);
                Err(e)
            }
        }
    }

    fn handshake(&self, t: &Tunnel) -> Result<()> {
        if !crate::checks::ping(&self.a, t.target.parse()?, 10) {
            bail!("no traffic through the tunnel to {}", t.target);
        }
        Ok(())
    }

    /// (UDP RcvbufErrors of both namespaces, TUN tx_dropped of both).
    fn drops(&self, tuns: &[String; 2]) -> (u64, u64) {
        let mut rcv = 0;
        let mut tun = 0;
        for (ns, ifn) in [(&self.a, &tuns[0]), (&self.b, &tuns[1])] {
            if let Ok(snmp) = exec(ns, "cat", &["/proc/net/snmp"]) {
                let udp: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
                if let [names, values] = udp[..] {
                    let col = names.split_whitespace().position(|n| n == "RcvbufErrors");
                    rcv += col
                        .and_then(|c| values.split_whitespace().nth(c))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            if !ifn.is_empty() {
                tun += exec(
                    ns,
                    "cat",
                    &[&format!("/sys/class/net/{ifn}/statistics/tx_dropped")],
                )
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
            }
        }
        (rcv, tun)
    }
}

/// Stops a tunnel's daemons.
fn stop(t: Tunnel) {
    for mut c in t.children {
        netns::stop_pid(c.id(), Duration::from_secs(3));
        let _ = c.wait();
    }
}

fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// (idle, total) jiffies of all CPUs from /proc/stat; idle counts iowait.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is
    // already inside user and nice).
    let total = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, total)
}

/// Percent of `(idle, total)` between two `machine_ticks` readings.
fn idle_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * after.0.saturating_sub(before.0) as f64 / total as f64
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The iperf3 client arguments of a test.
fn test_args(test: &str) -> Result<&'static [&'static str]> {
    Ok(match test {
        "tcp1" => &[],
        "tcp4" => &["-P", "4"],
        "udp" => &["-u", "-b", "0", "-l", "1392"],
        other => bail!("unknown test {other} (have: {})", ALL_TESTS.join(", ")),
    })
}

/// The first line a command prints, or "" if it cannot run.
fn first_line(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// The installed Debian package's version (`dpkg-query`), or "".
fn deb_version(package: &str) -> String {
    first_line("dpkg-query", &["-W", "-f", "${Version}", package])
}

/// What to say about each peer's version: the package a binary came from,
/// not what it prints of itself (wireguard-go says v0.0.20230223 for code
/// of 2023-12).
fn versions(anchors: &Path, bins: &BTreeMap<&str, PathBuf>) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    let or_unknown = |s: String, what: &str| {
        if s.is_empty() {
            format!("unknown ({what})")
        } else {
            s
        }
    };
    v.insert(
        "iperf3".into(),
        or_unknown(
            format!(
                "Debian package {} ({})",
                deb_version("iperf3"),
                first_line("iperf3", &["--version"])
            ),
            "iperf3",
        ),
    );
    v.insert(
        "wggo".into(),
        match deb_version("wireguard-go") {
            s if s.is_empty() => "unknown (no Debian package wireguard-go)".into(),
            s => format!("Debian package wireguard-go {s}"),
        },
    );
    if bins.get("wggo_new").is_some_and(|b| b.exists()) {
        let recorded =
            std::fs::read_to_string(anchors.join("wireguard-go-new.version")).unwrap_or_default();
        v.insert(
            "wggo_new".into(),
            match recorded.trim() {
                "" => format!(
                    "unknown (no {}; reinstall with {INSTALL_COMMAND})",
                    anchors.join("wireguard-go-new.version").display()
                ),
                s => format!("Debian package wireguard-go {s} (trixie)"),
            },
        );
    }
    if bins.get("boringtun").is_some_and(|b| b.exists()) {
        // cargo install's own record of what it installed.
        let crates =
            std::fs::read_to_string(anchors.join("boringtun/.crates.toml")).unwrap_or_default();
        let crate_version = crates
            .lines()
            .find_map(|l| l.trim().strip_prefix("\"boringtun-cli "))
            .and_then(|r| r.split_whitespace().next())
            .map(|s| format!("crate boringtun-cli {s}"));
        v.insert(
            "boringtun".into(),
            crate_version.unwrap_or_else(|| "unknown (no cargo install record)".into()),
        );
    }
    v.insert(
        "tunmesh".into(),
        format!("tunmesh-router {}", env!("CARGO_PKG_VERSION")),
    );
    v
}

/// The peers' binaries, by config.
fn peer_bins(anchors: &Path) -> BTreeMap<&'static str, PathBuf> {
    [
        ("wggo", PathBuf::from("/usr/bin/wireguard-go")),
        ("wggo_new", anchors.join("wireguard-go-new")),
        ("boringtun", anchors.join("boringtun-cli")),
    ]
    .into_iter()
    .collect()
}

/// The requested peers whose binaries are not there.
fn absent<'a>(configs: &'a [String], bins: &BTreeMap<&str, PathBuf>) -> Vec<&'a str> {
    configs
        .iter()
        .map(String::as_str)
        .filter(|c| bins.get(c).is_some_and(|b| !b.exists()))
        .collect()
}

/// The checkout's install script, if this binary was built from one.
fn install_script() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()?
        .join(INSTALL_COMMAND);
    p.is_file().then_some(p)
}

/// Installs missing peers with the checkout's script (when asked and it is
/// there); what is still missing afterwards is returned with why.
fn resolve_peers(opts: &BenchOptions) -> BTreeMap<String, String> {
    let bins = peer_bins(&opts.anchors);
    let mut need = absent(&opts.configs, &bins);
    if !need.is_empty() && opts.install {
        match install_script() {
            Some(script) => {
                eprintln!(
                    "bench: {} missing; installing with {}",
                    need.join(", "),
                    script.display()
                );
                let ok = std::process::Command::new(&script)
                    .env("TUNMESH_ANCHORS", &opts.anchors)
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!("bench: {} failed", script.display());
                }
            }
            None => eprintln!(
                "bench: {} missing and no checkout to install from: run {INSTALL_COMMAND} from a tunmesh checkout (as root)",
                need.join(", ")
            ),
        }
        need = absent(&opts.configs, &bins);
    }
    need.into_iter()
        .map(|c| {
            (
                c.to_string(),
                format!(
                    "{} not found; install with `{INSTALL_COMMAND}` (as root, from the tunmesh checkout){}",
                    bins[c].display(),
                    if opts.install { "" } else { ", or drop --no-install" }
                ),
            )
        })
        .collect()
}

/// The configuration order of repetition `rep` (1-based): `configs`
/// rotated left by `rep - 1`, so no configuration always follows another.
pub fn order(configs: &[String], rep: u32) -> Vec<String> {
    let mut o = configs.to_vec();
    if !o.is_empty() {
        let k = (rep.saturating_sub(1) as usize) % o.len();
        o.rotate_left(k);
    }
    o
}

/// Runs the benchmark. Progress goes to stderr.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    for t in opts.tests.iter().filter(|t| !latency::is_latency(t)) {
        test_args(t)?;
    }
    if let Some(bad) = opts
        .configs
        .iter()
        .find(|c| !ALL_CONFIGS.contains(&c.as_str()))
    {
        bail!("unknown config {bad} (have: {})", ALL_CONFIGS.join(", "));
    }
    let mut missing = resolve_peers(opts);
    for (cfg, why) in &missing {
        eprintln!("bench: {cfg} missing: {why}");
    }
    let bins = peer_bins(&opts.anchors);
    let versions = versions(&opts.anchors, &bins);
    let mut bed = Testbed::new()?;
    let hz = clk_tck();
    let mut rows: Vec<Row> = Vec::new();
    let mut lat_rows: Vec<LatRow> = Vec::new();
    let mut orders = Vec::new();
    for rep in 1..=opts.reps {
        let order = order(&opts.configs, rep);
        orders.push(order.clone());
        for (position, cfg) in order.iter().enumerate() {
            if missing.contains_key(cfg) && bins.get(cfg.as_str()).is_some_and(|b| !b.exists()) {
                continue;
            }
            let tunnel = match cfg.as_str() {
                "raw" => Ok(Tunnel {
                    children: vec![],
                    target: UNDERLAY_B.into(),
                    source: UNDERLAY_A.into(),
                    tuns: [String::new(), String::new()],
                }),
                "tunmesh" => bed.start_tunmesh(),
                "wggo" | "wggo_new" => bed.start_wg(&bins[cfg.as_str()], &["-f"]),
                "boringtun" => bed.start_wg(
                    &bins["boringtun"],
                    &["-f", "--disable-drop-privileges", "-t", "1"],
                ),
                other => Err(anyhow::anyhow!("unknown config {other}")),
            };
            let tunnel = match tunnel {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("bench: rep {rep}: {cfg} did not start: {e:#}");
                    missing
                        .entry(cfg.clone())
                        .or_insert_with(|| format!("rep {rep}: did not start: {e:#}"));
                    continue;
                }
            };
            let pids: Vec<u32> = tunnel.children.iter().map(|c| c.id()).collect();
            for test in opts.tests.iter().filter(|t| latency::is_latency(t)) {
                let ends = latency::Ends {
                    a: &bed.a,
                    b: &bed.b,
                    a_ip: tunnel.source.parse()?,
                    b_ip: tunnel.target.parse()?,
                };
                match latency::measure(test, &ends, opts.seconds) {
                    Ok(mut r) => {
                        r.rep = rep;
                        r.position = position;
                        r.config = cfg.clone();
                        r.test = test.clone();
                        eprintln!(
                            "rep {rep} {cfg:9} {test:11} p50 {} us  p99 {} us  rate {} /s",
                            r.p50_us.map_or("-".into(), |v| format!("{v:.1}")),
                            r.p99_us.map_or("-".into(), |v| format!("{v:.1}")),
                            r.rate.map_or("-".into(), |v| format!("{v:.0}")),
                        );
                        lat_rows.push(r);
                    }
                    Err(e) => {
                        eprintln!("bench: rep {rep} {cfg} {test}: {e:#}");
                        missing
                            .entry(cfg.clone())
                            .or_insert_with(|| format!("rep {rep} {test}: {e:#}"));
                    }
                }
            }
            for test in opts.tests.iter().filter(|t| !latency::is_latency(t)) {
                let (t0, d0) = (cpu_ticks(&pids), bed.drops(&tunnel.tuns));
                let m0 = machine_ticks();
                let started = std::time::Instant::now();
                let res = test_args(test).and_then(|args| {
                    crate::checks::iperf3(
                        &bed.a,
                        &bed.b,
                        tunnel.target.parse()?,
                        opts.seconds,
                        args,
                    )
                });
                let secs = started.elapsed().as_secs_f64();
                let (t1, d1) = (cpu_ticks(&pids), bed.drops(&tunnel.tuns));
                let idle = idle_percent(m0, machine_ticks());
                match res {
                    Ok(r) => {
                        let cpu_s = t1.saturating_sub(t0) as f64 / hz;
                        let gbit = r.received_bytes as f64 * 8.0 / 1e9;
                        let row = Row {
                            rep,
                            position,
                            config: cfg.clone(),
                            test: test.clone(),
                            gbps: r.gbps,
                            sent_gbps: r.sent_gbps,
                            ratio: None,
                            vs_wggo_new: None,
                            daemon_cpu: 100.0 * cpu_s / secs,
                            cpu_s_per_gbit: (!pids.is_empty() && gbit > 0.0).then(|| cpu_s / gbit),
                            machine_idle: idle,
                            retr_or_loss: r.retr_or_loss,
                            udp_rcvbuf_errors: d1.0.saturating_sub(d0.0),
                            tun_drops: d1.1.saturating_sub(d0.1),
                        };
                        eprintln!(
                            "rep {rep} {cfg:9} {test:5} {:7.2} Gbit/s arrived ({:.2} sent)  daemons {:4.0}%  idle {:3.0}%  rcvbuf {}  tundrop {}",
                            row.gbps, row.sent_gbps, row.daemon_cpu, row.machine_idle, row.udp_rcvbuf_errors, row.tun_drops
                        );
                        rows.push(row);
                    }
                    Err(e) => {
                        eprintln!("bench: rep {rep} {cfg} {test}: {e:#}");
                        missing
                            .entry(cfg.clone())
                            .or_insert_with(|| format!("rep {rep} {test}: {e:#}"));
                    }
                }
            }
            stop(tunnel);
        }
    }
    drop(bed);
    let mut r = report(rows, missing, orders, versions, &opts.configs, &opts.tests);
    r.latency_summaries =
        latency::summarize(&mut lat_rows, &opts.configs, &opts.tests, HEADLINE_PEER);
    r.latency = lat_rows;
    Ok(r)
}

/// Ratios inside each repetition, summaries over them, and the headline.
pub fn report(
    mut rows: Vec<Row>,
    missing: BTreeMap<String, String>,
    orders: Vec<Vec<String>>,
    versions: BTreeMap<String, String>,
    configs: &[String],
    tests: &[String],
) -> Report {
    let of = |rows: &[Row], cfg: &str| -> BTreeMap<(u32, String), f64> {
        rows.iter()
            .filter(|r| r.config == cfg && r.gbps > 0.0)
            .map(|r| ((r.rep, r.test.clone()), r.gbps))
            .collect()
    };
    let raw = of(&rows, "raw");
    let wggo_new = of(&rows, HEADLINE_PEER);
    for r in &mut rows {
        let key = (r.rep, r.test.clone());
        r.ratio = raw.get(&key).map(|v| r.gbps / v);
        r.vs_wggo_new = wggo_new.get(&key).map(|v| r.gbps / v);
    }
    let mut summaries = Vec::new();
    for test in tests {
        for cfg in configs {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| &r.config == cfg && &r.test == test)
                .collect();
            let Some(gbps) = Spread::of(&rs.iter().map(|r| r.gbps).collect::<Vec<_>>()) else {
                continue;
            };
            let med = |f: &dyn Fn(&Row) -> f64| {
                Spread::of(&rs.iter().map(|r| f(r)).collect::<Vec<_>>())
                    .map(|s| s.median)
                    .unwrap_or(0.0)
            };
            let opt = |f: &dyn Fn(&Row) -> Option<f64>| {
                Spread::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            summaries.push(Summary {
                config: cfg.clone(),
                test: test.clone(),
                reps: rs.len(),
                gbps,
                ratio: opt(&|r| r.ratio),
                vs_wggo_new: opt(&|r| r.vs_wggo_new),
                daemon_cpu: med(&|r| r.daemon_cpu),
                cpu_s_per_gbit: opt(&|r| r.cpu_s_per_gbit).map(|s| s.median),
                machine_idle: med(&|r| r.machine_idle),
                retr_or_loss: med(&|r| r.retr_or_loss),
                udp_rcvbuf_errors: med(&|r| r.udp_rcvbuf_errors as f64) as u64,
                tun_drops: med(&|r| r.tun_drops as f64) as u64,
            });
        }
    }
    let headline = headline(&summaries, &missing, configs, tests);
    Report {
        rows,
        summaries,
        missing,
        orders,
        headline,
        versions,
        latency: Vec::new(),
        latency_summaries: Vec::new(),
    }
}

/// tunmesh against the newer wireguard-go on tcp1, or why not.
fn headline(
    summaries: &[Summary],
    missing: &BTreeMap<String, String>,
    configs: &[String],
    tests: &[String],
) -> Headline {
    let na = |why: &str| Headline::NotAvailable { why: why.into() };
    if !tests.iter().any(|t| t == HEADLINE_TEST) {
        return na(&format!("{HEADLINE_TEST} not measured"));
    }
    for (cfg, name) in [
        (HEADLINE_PEER, "newer wireguard-go"),
        ("tunmesh", "tunmesh"),
    ] {
        if !configs.iter().any(|c| c == cfg) {
            return na(&format!("{name} not measured"));
        }
        let measured = summaries
            .iter()
            .any(|s| s.config == cfg && s.test == HEADLINE_TEST);
        if missing.contains_key(cfg) && !measured {
            return na(&format!("{name} missing"));
        }
    }
    summaries
        .iter()
        .find(|s| s.config == "tunmesh" && s.test == HEADLINE_TEST)
        .and_then(|s| s.vs_wggo_new)
        .map(Headline::Measured)
        .unwrap_or_else(|| na("no repetition measured both tunmesh and the newer wireguard-go"))
}

/// The readable table.
pub fn table(r: &Report) -> String {
    let mut s = String::from(
        "Gbit/s = receiver goodput (UDP too), median over repetitions\n\
         ratio = Gbit/s / raw veth, and vs wggo_new = Gbit/s / the newer wireguard-go, each taken inside one\n\
         repetition: median [min-max] of those per-repetition ratios; configuration order rotated every repetition\n\
         daemons = both tunnel daemons' CPU, % of one core; CPU s/Gbit = daemon CPU seconds per Gbit that arrived\n\
         idle = the machine's idle CPU during the test, % of all its CPUs\n\
         retr|loss = TCP retransmits or UDP loss % at the receiver; rcvbuf = UDP receive-buffer errors; tundrop = TUN tx_dropped\n\n",
    );
    let spread = |x: Option<Spread>| {
        x.map(|v| format!("{:.3} [{:.3}-{:.3}]", v.median, v.min, v.max))
            .unwrap_or_else(|| "-".into())
    };
    s += &format!(
        "{:10} {:5} {:>4} {:>8} {:>21} {:>21} {:>8} {:>10} {:>5} {:>10} {:>7} {:>8}\n",
        "config",
        "test",
        "reps",
        "Gbit/s",
        "ratio",
        "vs wggo_new",
        "daemons",
        "CPU s/Gbit",
        "idle",
        "retr|loss",
        "rcvbuf",
        "tundrop"
    );
    let mut last = String::new();
    for x in &r.summaries {
        if x.test != last && !last.is_empty() {
            s += "\n";
        }
        last = x.test.clone();
        s += &format!(
            "{:10} {:5} {:>4} {:>8.2} {:>21} {:>21} {:>7.0}% {:>10} {:>4.0}% {:>10.1} {:>7} {:>8}\n",
            x.config,
            x.test,
            x.reps,
            x.gbps.median,
            spread(x.ratio),
            spread(x.vs_wggo_new),
            x.daemon_cpu,
            x.cpu_s_per_gbit
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            x.machine_idle,
            x.retr_or_loss,
            x.udp_rcvbuf_errors,
            x.tun_drops
        );
    }
    for (cfg, why) in &r.missing {
        s += &format!("\nmissing: {cfg}: {why}");
    }
    if !r.missing.is_empty() {
        s += "\n";
    }
    s += "\norders: ";
    s += &r
        .orders
        .iter()
        .map(|o| o.join(","))
        .collect::<Vec<_>>()
        .join(" | ");
    s += "\nversions: ";
    s += &r
        .versions
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join("; ");
    s += "\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_is_a_share_of_the_ticks_between_readings() {
        assert_eq!(idle_percent((10, 100), (40, 200)), 30.0);
        assert_eq!(idle_percent((10, 100), (10, 100)), 0.0, "no time passed");
        assert_eq!(
            idle_percent((50, 200), (10, 100)),
            0.0,
            "counters never go back"
        );
        let (idle, total) = machine_ticks();
        assert!(
            total > 0 && idle <= total,
            "read /proc/stat: {idle}/{total}"
        );
    }

    fn row(rep: u32, config: &str, test: &str, gbps: f64) -> Row {
        Row {
            rep,
            position: 0,
            config: config.into(),
            test: test.into(),
            gbps,
            sent_gbps: gbps,
            ratio: None,
            vs_wggo_new: None,
            daemon_cpu: 150.0,
            cpu_s_per_gbit: Some(0.3),
            machine_idle: 10.0,
            retr_or_loss: 0.0,
            udp_rcvbuf_errors: 0,
            tun_drops: 0,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// The headline is the median of ratios taken inside each repetition,
    /// not a ratio of medians: here the machine was twice as fast in rep 2
    /// for both, and tunmesh was 2x in every repetition.
    #[test]
    fn ratios_are_taken_inside_each_repetition() {
        let rows = vec![
            row(1, "raw", "tcp1", 10.0),
            row(1, "tunmesh", "tcp1", 4.0),
            row(1, "wggo_new", "tcp1", 2.0),
            row(2, "raw", "tcp1", 20.0),
            row(2, "tunmesh", "tcp1", 8.0),
            row(2, "wggo_new", "tcp1", 4.0),
            row(3, "raw", "tcp1", 10.0),
            row(3, "tunmesh", "tcp1", 3.0),
            row(3, "wggo_new", "tcp1", 1.0),
        ];
        let configs = strings(&["raw", "tunmesh", "wggo_new"]);
        let r = report(
            rows,
            BTreeMap::new(),
            vec![],
            BTreeMap::new(),
            &configs,
            &strings(&["tcp1"]),
        );
        let h = match &r.headline {
            Headline::Measured(s) => *s,
            other => panic!("{other:?}"),
        };
        assert_eq!((h.median, h.min, h.max, h.n), (2.0, 2.0, 3.0, 3));
        let t = r.summaries.iter().find(|s| s.config == "tunmesh").unwrap();
        assert_eq!(t.ratio.unwrap().median, 0.4);
        assert!(r
            .headline
            .line()
            .starts_with("bench: tunmesh/wireguard-go = 2.00 (tcp1 median of 3"));
        assert!(table(&r).contains("2.000 [2.000-3.000]"), "{}", table(&r));
    }

    #[test]
    fn a_missing_newer_wireguard_go_is_never_replaced_by_another() {
        let rows = vec![
            row(1, "raw", "tcp1", 10.0),
            row(1, "tunmesh", "tcp1", 4.0),
            row(1, "wggo", "tcp1", 0.5),
        ];
        let missing: BTreeMap<String, String> =
            [("wggo_new".to_string(), "not found".to_string())].into();
        let configs = strings(&["raw", "tunmesh", "wggo", "wggo_new"]);
        let r = report(
            rows,
            missing,
            vec![],
            BTreeMap::new(),
            &configs,
            &strings(&["tcp1"]),
        );
        assert_eq!(
            r.headline.line(),
            "bench: tunmesh/wireguard-go = n/a (newer wireguard-go missing)"
        );
        assert!(table(&r).contains("missing: wggo_new: not found"));
        // Not asked for at all is not "missing", but still no figure.
        let r = report(
            vec![],
            BTreeMap::new(),
            vec![],
            BTreeMap::new(),
            &strings(&["raw", "tunmesh"]),
            &strings(&["tcp1"]),
        );
        assert_eq!(
            r.headline.line(),
            "bench: tunmesh/wireguard-go = n/a (newer wireguard-go not measured)"
        );
    }

    #[test]
    fn the_order_rotates_every_repetition() {
        let c = strings(&["raw", "tunmesh", "wggo"]);
        assert_eq!(order(&c, 1), c);
        assert_eq!(order(&c, 2), strings(&["tunmesh", "wggo", "raw"]));
        assert_eq!(order(&c, 3), strings(&["wggo", "raw", "tunmesh"]));
        assert_eq!(order(&c, 4), c);
    }
}
