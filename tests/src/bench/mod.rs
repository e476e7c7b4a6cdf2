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

use anyhow::{bail, Result};
use serde::Serialize;

mod anchors;
pub mod engine;
pub mod latency;
mod report;
mod testbed;

use anchors::*;
pub use latency::{LatRow, LatSummary, LATENCY_TESTS};
pub use report::{report, table};
use testbed::*;

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
