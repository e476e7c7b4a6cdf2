//! `tunmesh-lab bench`: tunmesh against raw veth, both wireguard-go
//! packages and boringtun-cli, measured side by side in one run, the way
//! `shared/bench/anchors.sh` does it: two namespaces joined by a veth, a
//! tunnel between them, iperf3 from one to the other. Raw veth is measured
//! again in every repetition and each figure is given as a ratio to the raw
//! figure of the same repetition and test, because the machine is shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;
use tunmesh_keygen::PrivateKey;

use crate::netns::{self, add_netns, exec, veth, Cleanup};
use crate::peers::{self, Side};

/// Where `scripts/install-anchors.sh` puts the peers we compare against.
pub const DEFAULT_ANCHORS: &str = "/var/cache/tunmesh/anchors";
pub const ALL_CONFIGS: [&str; 5] = ["raw", "tunmesh", "wggo", "wggo_new", "boringtun"];
pub const ALL_TESTS: [&str; 3] = ["tcp1", "tcp4", "udp"];

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
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub rep: u32,
    pub config: String,
    pub test: String,
    pub gbps: f64,
    /// Against raw veth of the same repetition and test.
    pub ratio: Option<f64>,
    /// Both tunnel daemons together, percent of one core.
    pub daemon_cpu: f64,
    /// The whole machine's idle time during the test, percent of all its
    /// CPUs (headroom no process used: iperf3 and the daemons share them).
    pub machine_idle: f64,
    /// TCP retransmits, or UDP receiver loss in percent.
    pub retr_or_loss: f64,
    pub udp_rcvbuf_errors: u64,
    pub tun_drops: u64,
}

/// Medians of one config and test over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub config: String,
    pub test: String,
    pub reps: usize,
    pub gbps: f64,
    pub ratio: Option<f64>,
    pub daemon_cpu: f64,
    pub machine_idle: f64,
    /// Gbit/s per core of daemon CPU.
    pub gbps_per_daemon_core: Option<f64>,
    pub retr_or_loss: f64,
    pub udp_rcvbuf_errors: u64,
    pub tun_drops: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    pub summaries: Vec<Summary>,
    /// Configs that could not run, and why.
    pub missing: BTreeMap<String, String>,
    pub tunmesh_vs_wireguard_go_tcp1: Option<f64>,
    pub versions: BTreeMap<String, String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
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

/// A running tunnel: its daemons, the address iperf3 targets, its TUN names.
struct Tunnel {
    children: Vec<std::process::Child>,
    target: String,
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
        self.start_pair(&sides, "10.99.2.1", tuns, |i, side| {
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
        self.start_pair(&sides, "10.99.0.2", ifs, |i, side| {
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
        target: &str,
        tuns: [String; 2],
        mut start: impl FnMut(usize, &Side) -> Result<std::process::Child>,
    ) -> Result<Tunnel> {
        let mut t = Tunnel {
            children: Vec::new(),
            target: target.into(),
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

fn version(bin: &Path, arg: &str) -> String {
    std::process::Command::new(bin)
        .arg(arg)
        .output()
        .ok()
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

/// Runs the benchmark. Progress goes to stderr.
pub fn run(opts: &BenchOptions) -> Result<Report> {
    let mut bed = Testbed::new()?;
    let mut missing = BTreeMap::new();
    let mut versions = BTreeMap::new();
    let bins: BTreeMap<&str, PathBuf> = [
        ("wggo", PathBuf::from("/usr/bin/wireguard-go")),
        ("wggo_new", opts.anchors.join("wireguard-go-new")),
        ("boringtun", opts.anchors.join("boringtun-cli")),
    ]
    .into_iter()
    .collect();
    for (cfg, bin) in &bins {
        if opts.configs.iter().any(|c| c == cfg) {
            if bin.exists() {
                versions.insert(cfg.to_string(), version(bin, "--version"));
            } else {
                missing.insert(
                    cfg.to_string(),
                    format!(
                        "{} not found (scripts/install-anchors.sh installs it)",
                        bin.display()
                    ),
                );
            }
        }
    }
    versions.insert("iperf3".into(), version(Path::new("iperf3"), "--version"));
    let hz = clk_tck();
    let mut rows: Vec<Row> = Vec::new();
    for rep in 1..=opts.reps {
        for cfg in &opts.configs {
            if missing.contains_key(cfg) {
                continue;
            }
            let tunnel = match cfg.as_str() {
                "raw" => Ok(Tunnel {
                    children: vec![],
                    target: UNDERLAY_B.into(),
                    tuns: [String::new(), String::new()],
                }),
                "tunmesh" => bed.start_tunmesh(),
                "wggo" | "wggo_new" => bed.start_wg(&bins[cfg.as_str()], &["-f"]),
                "boringtun" => bed.start_wg(
                    &bins["boringtun"],
                    &["-f", "--disable-drop-privileges", "-t", "1"],
                ),
                other => Err(anyhow::anyhow!(
                    "unknown config {other} (have: {})",
                    ALL_CONFIGS.join(", ")
                )),
            };
            let tunnel = match tunnel {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("bench: {cfg} unavailable: {e:#}");
                    missing.insert(cfg.clone(), format!("{e:#}"));
                    continue;
                }
            };
            let pids: Vec<u32> = tunnel.children.iter().map(|c| c.id()).collect();
            for test in &opts.tests {
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
                    Ok(crate::checks::Iperf { gbps, retr_or_loss }) => {
                        let row = Row {
                            rep,
                            config: cfg.clone(),
                            test: test.clone(),
                            gbps,
                            ratio: None,
                            daemon_cpu: 100.0 * (t1.saturating_sub(t0)) as f64 / hz / secs,
                            machine_idle: idle,
                            retr_or_loss,
                            udp_rcvbuf_errors: d1.0.saturating_sub(d0.0),
                            tun_drops: d1.1.saturating_sub(d0.1),
                        };
                        eprintln!(
                            "rep {rep} {cfg:9} {test:5} {gbps:7.2} Gbit/s  daemons {:4.0}%  idle {:3.0}%  rcvbuf {}  tundrop {}",
                            row.daemon_cpu, row.machine_idle, row.udp_rcvbuf_errors, row.tun_drops
                        );
                        rows.push(row);
                    }
                    Err(e) => eprintln!("rep {rep} {cfg} {test}: {e:#}"),
                }
            }
            stop(tunnel);
        }
    }
    // Ratios against raw of the same rep and test.
    let raw: BTreeMap<(u32, String), f64> = rows
        .iter()
        .filter(|r| r.config == "raw")
        .map(|r| ((r.rep, r.test.clone()), r.gbps))
        .collect();
    for r in &mut rows {
        r.ratio = raw
            .get(&(r.rep, r.test.clone()))
            .filter(|v| **v > 0.0)
            .map(|v| r.gbps / v);
    }
    let mut summaries = Vec::new();
    for test in &opts.tests {
        for cfg in &opts.configs {
            let rs: Vec<&Row> = rows
                .iter()
                .filter(|r| &r.config == cfg && &r.test == test)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&Row) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let ratios: Vec<f64> = rs.iter().filter_map(|r| r.ratio).collect();
            let cpu = med(&|r| r.daemon_cpu);
            let gbps = med(&|r| r.gbps);
            summaries.push(Summary {
                config: cfg.clone(),
                test: test.clone(),
                reps: rs.len(),
                gbps,
                ratio: (!ratios.is_empty()).then(|| median(ratios)),
                daemon_cpu: cpu,
                machine_idle: med(&|r| r.machine_idle),
                gbps_per_daemon_core: (cpu > 1.0).then(|| gbps / (cpu / 100.0)),
                retr_or_loss: med(&|r| r.retr_or_loss),
                udp_rcvbuf_errors: med(&|r| r.udp_rcvbuf_errors as f64) as u64,
                tun_drops: med(&|r| r.tun_drops as f64) as u64,
            });
        }
    }
    let tcp1 = |cfg: &str| {
        summaries
            .iter()
            .find(|s| s.config == cfg && s.test == "tcp1")
            .map(|s| s.gbps)
    };
    let best_wggo = [tcp1("wggo"), tcp1("wggo_new")]
        .into_iter()
        .flatten()
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let vs = match (tcp1("tunmesh"), best_wggo) {
        (Some(t), Some(w)) if w > 0.0 => Some(t / w),
        _ => None,
    };
    drop(bed);
    Ok(Report {
        rows,
        summaries,
        missing,
        tunmesh_vs_wireguard_go_tcp1: vs,
        versions,
    })
}

/// The readable table.
pub fn table(r: &Report) -> String {
    let mut s = String::from(
        "medians over repetitions; ratio = Gbit/s / raw veth of the same repetition and test\n",
    );
    s += "daemons = both tunnel daemons' CPU, % of one core; Gb/core = Gbit/s per daemon core\n";
    s += "idle = the machine's idle CPU during the test, % of all its CPUs\n";
    s += "retr|loss = TCP retransmits or UDP loss %; rcvbuf = UDP receive-buffer errors; tundrop = TUN tx_dropped\n\n";
    s += &format!(
        "{:10} {:5} {:>4} {:>8} {:>7} {:>8} {:>8} {:>5} {:>10} {:>7} {:>8}\n",
        "config",
        "test",
        "reps",
        "Gbit/s",
        "ratio",
        "daemons",
        "Gb/core",
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
            "{:10} {:5} {:>4} {:>8.2} {:>7} {:>7.0}% {:>8} {:>4.0}% {:>10.1} {:>7} {:>8}\n",
            x.config,
            x.test,
            x.reps,
            x.gbps,
            x.ratio
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "-".into()),
            x.daemon_cpu,
            x.gbps_per_daemon_core
                .map(|v| format!("{v:.2}"))
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
    s += "\nversions: ";
    s += &r
        .versions
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
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
}
