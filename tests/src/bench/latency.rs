//! The figures services feel, beside the bench's bulk throughput: the
//! round trip of a 64-byte request (UDP and TCP, idle and while a bulk
//! iperf3 stream crosses the same tunnel the other way), TCP connections
//! per second (open, a 64-byte request and reply, close; one client and
//! 8), and 64-byte UDP datagrams per second that arrive.
//!
//! Round trips come from sockperf's `ping-pong --full-rtt` (percentiles
//! of every exchange after its warm-up); connections per second from a
//! client and server here (the server closes first, so the client's
//! ephemeral ports are not held in TIME_WAIT); small packets from iperf3
//! at the receiver. Each is one figure of one repetition: the bench takes
//! its ratios inside a repetition, as it does for throughput.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::Spread;
use crate::netns;

/// The latency tests, in the order they run.
pub const LATENCY_TESTS: [&str; 7] = [
    "rr_udp",
    "rr_tcp",
    "rr_udp_load",
    "rr_tcp_load",
    "crr1",
    "crr8",
    "pps64",
];

const SOCKPERF_PORT: u16 = 11111;
const CRR_PORT: u16 = 11112;
/// sockperf's warm-up before it counts (its default, 400 ms).
const SOCKPERF_WARMUP: Duration = Duration::from_millis(400);
const MESSAGE: usize = 64;

pub fn is_latency(test: &str) -> bool {
    LATENCY_TESTS.contains(&test)
}

/// One latency figure of one repetition.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatRow {
    pub rep: u32,
    pub position: usize,
    pub config: String,
    pub test: String,
    /// Round-trip percentiles, microseconds (rr tests).
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    /// Exchanges, connections or datagrams per second.
    pub rate: Option<f64>,
    /// UDP loss at the receiver, percent (pps64).
    pub loss_pct: Option<f64>,
    /// Round-trip p50/p99 minus raw veth's of the same repetition.
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
}

/// Where a test runs: the client's namespace and address, the server's.
pub struct Ends<'a> {
    pub a: &'a str,
    pub b: &'a str,
    pub a_ip: IpAddr,
    pub b_ip: IpAddr,
}

/// Runs latency test `test` from `e.a` to `e.b` for `seconds`.
pub fn measure(test: &str, e: &Ends, seconds: u32) -> Result<LatRow> {
    let secs = seconds.max(1);
    match test {
        "rr_udp" => sockperf(e, secs, false),
        "rr_tcp" => sockperf(e, secs, true),
        "rr_udp_load" | "rr_tcp_load" => {
            // Bulk from b to a, for longer than the round trips take.
            let load = crate::checks::iperf3_in_background(e.b, e.a, e.a_ip, secs + 3);
            std::thread::sleep(Duration::from_secs(1));
            let r = sockperf(e, secs, test == "rr_tcp_load");
            let bulk = load
                .join()
                .map_err(|_| anyhow::anyhow!("the load's iperf3 thread panicked"))?;
            match (r, bulk) {
                (Ok(r), Ok(b)) if b.received_bytes > 0 => Ok(r),
                (Ok(_), Ok(_)) => bail!("the bulk stream carried nothing: no load"),
                (Ok(_), Err(e)) => Err(e.context("the bulk stream under the round trips")),
                (Err(e), _) => Err(e),
            }
        }
        "crr1" => crr(e, secs, 1),
        "crr8" => crr(e, secs, 8),
        "pps64" => {
            let r = crate::checks::iperf3(e.a, e.b, e.b_ip, secs, &["-u", "-l", "64", "-b", "0"])?;
            Ok(LatRow {
                rate: Some(r.received_bytes as f64 / MESSAGE as f64 / f64::from(secs)),
                loss_pct: Some(r.retr_or_loss),
                ..LatRow::default()
            })
        }
        other => bail!(
            "unknown latency test {other} (have: {})",
            LATENCY_TESTS.join(", ")
        ),
    }
}

/// A percentile line of sockperf's: `---> percentile 99.900 =   54.200`.
fn percentile(out: &str, which: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = l.split("percentile").nth(1)?;
        let (p, v) = rest.split_once('=')?;
        (p.trim() == which).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `Total N observations`, ANSI colours or not.
fn observations(out: &str) -> Option<u64> {
    out.lines().find_map(|l| {
        let rest = l.split("Total ").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The time the observations cover: `[Valid Duration] RunTime=0.550 sec`
/// (the run less its warm-up and the end), seconds.
fn valid_seconds(out: &str) -> Option<f64> {
    out.lines().find_map(|l| {
        let rest = l.split("[Valid Duration] RunTime=").nth(1)?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// sockperf's round trips of 64-byte messages from a to b.
fn sockperf(e: &Ends, seconds: u32, tcp: bool) -> Result<LatRow> {
    let port = SOCKPERF_PORT.to_string();
    let ip = e.b_ip.to_string();
    let mut srv_args = vec!["server", "-i", &ip, "-p", &port];
    if tcp {
        srv_args.push("--tcp");
    }
    let log = std::env::temp_dir().join(format!(
        "tunmesh-sockperf-{}-{}.log",
        std::process::id(),
        e.b
    ));
    let mut srv = netns::spawn(e.b, std::path::Path::new("sockperf"), &srv_args, &[], &log)
        .context("starting sockperf (apt-get install sockperf; scripts/install-deps.sh does)")?;
    let ss = if tcp { "-Hltn" } else { "-Hlun" };
    let listening = netns::wait_for(Duration::from_secs(10), || {
        let out = netns::exec_output(e.b, "ss", &[ss, "sport", "=", &format!(":{port}")]).ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    let result = (|| -> Result<LatRow> {
        if listening.is_none() {
            bail!("sockperf server did not start in {}", e.b);
        }
        let time = format!("{:.1}", f64::from(seconds) + SOCKPERF_WARMUP.as_secs_f64());
        let limit = (seconds + 20).to_string();
        let mut args = vec![
            limit.as_str(),
            "sockperf",
            "ping-pong",
            "-i",
            &ip,
            "-p",
            &port,
            "-t",
            &time,
            "-m",
            "64",
            "--full-rtt",
        ];
        if tcp {
            args.push("--tcp");
        }
        let out = netns::exec_output(e.a, "timeout", &args)?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let (p50, p99, p999) = (
            percentile(&text, "50.000"),
            percentile(&text, "99.000"),
            percentile(&text, "99.900"),
        );
        let n = observations(&text).unwrap_or(0);
        let valid = valid_seconds(&text).filter(|s| *s > 0.0);
        match (p50, p99, p999, valid) {
            (Some(a), Some(b), Some(c), Some(valid)) if n > 0 => Ok(LatRow {
                p50_us: Some(a),
                p99_us: Some(b),
                p999_us: Some(c),
                // Exchanges a second, over the time they were counted in.
                rate: Some(n as f64 / valid),
                ..LatRow::default()
            }),
            _ => bail!(
                "sockperf ping-pong gave no percentiles ({}): {}",
                out.status,
                // One line for the report: what sockperf said was wrong,
                // and how many messages went and came back.
                text.lines()
                    .filter(|l| l.contains("No valid") || l.contains("[Total Run]"))
                    .map(|l| l.trim_start_matches("sockperf:").trim())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    })();
    netns::stop_pid(srv.id(), Duration::from_secs(2));
    let _ = srv.wait();
    let _ = std::fs::remove_file(&log);
    result
}

/// A thread in namespace `ns` running `f`.
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let ns = ns.to_string();
    std::thread::spawn(move || netns::in_netns(&ns, f))
}

/// One exchange on a fresh connection: connect, 64 bytes, 64 back, the
/// server's close, ours.
fn one_connection(to: SocketAddr, buf: &mut [u8; MESSAGE]) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(&buf[..])?;
    s.read_exact(&mut buf[..])?;
    // The server closes first: wait for its FIN so our close leaves no
    // TIME_WAIT on this side.
    let mut rest = [0u8; 1];
    let _ = s.read(&mut rest)?;
    Ok(())
}

/// TCP connections per second from `parallel` clients in a to a server
/// in b.
fn crr(e: &Ends, seconds: u32, parallel: usize) -> Result<LatRow> {
    let to = SocketAddr::new(e.b_ip, CRR_PORT);
    let listener = netns::in_netns(e.b, move || TcpListener::bind(to))?
        .with_context(|| format!("listening on {to} in {}", e.b))?;
    let stop = Arc::new(AtomicBool::new(false));
    // Two server threads: each accepts, answers and closes.
    let mut servers = Vec::new();
    for _ in 0..2 {
        let l = listener.try_clone()?;
        let stop = stop.clone();
        servers.push(std::thread::spawn(move || {
            let mut buf = [0u8; MESSAGE];
            while !stop.load(Ordering::Relaxed) {
                let Ok((mut s, _)) = l.accept() else { continue };
                let _ = s.set_nodelay(true);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                if s.read_exact(&mut buf).is_ok() {
                    let _ = s.write_all(&buf);
                }
            }
        }));
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(u64::from(seconds));
    let started = Instant::now();
    let clients: Vec<_> = (0..parallel)
        .map(|_| {
            let (done, failed) = (done.clone(), failed.clone());
            spawn_in(e.a, move || {
                let mut buf = [7u8; MESSAGE];
                while Instant::now() < deadline {
                    match one_connection(to, &mut buf) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    let mut client_err = None;
    for c in clients {
        match c.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => client_err = Some(e),
            Err(_) => client_err = Some(anyhow::anyhow!("a client thread panicked")),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Wake each server thread from accept.
    for _ in &servers {
        let _ = netns::in_netns(e.a, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(1))
        });
    }
    for s in servers {
        let _ = s.join();
    }
    if let Some(e) = client_err {
        return Err(e);
    }
    let (n, bad) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    if n == 0 {
        bail!("no connection completed ({bad} failed)");
    }
    Ok(LatRow {
        rate: Some(n as f64 / elapsed),
        // Failed connections, percent of those tried.
        loss_pct: Some(100.0 * bad as f64 / (n + bad) as f64),
        ..LatRow::default()
    })
}

/// One latency test of one configuration over the repetitions.
#[derive(Debug, Clone, Serialize)]
pub struct LatSummary {
    pub config: String,
    pub test: String,
    pub reps: usize,
    pub p50_us: Option<Spread>,
    pub p99_us: Option<Spread>,
    pub p999_us: Option<Spread>,
    pub rate: Option<Spread>,
    pub loss_pct: Option<f64>,
    /// Round trip added over raw veth (same repetition), p50 and p99.
    pub added_p50_us: Option<Spread>,
    pub added_p99_us: Option<Spread>,
    /// Per-repetition ratios to the newer wireguard-go: round-trip p50 and
    /// p99 (lower is better), rate (higher is better).
    pub vs_peer_p50: Option<Spread>,
    pub vs_peer_p99: Option<Spread>,
    pub vs_peer_rate: Option<Spread>,
}

/// Fills each row's figures against raw veth and summarizes per config
/// and test, with ratios to `peer` taken inside each repetition.
pub fn summarize(
    rows: &mut [LatRow],
    configs: &[String],
    tests: &[String],
    peer: &str,
) -> Vec<LatSummary> {
    let find = |rows: &[LatRow], rep: u32, cfg: &str, test: &str| -> Option<LatRow> {
        rows.iter()
            .find(|r| r.rep == rep && r.config == cfg && r.test == test)
            .cloned()
    };
    let snapshot = rows.to_vec();
    for r in rows.iter_mut() {
        if let Some(raw) = find(&snapshot, r.rep, "raw", &r.test) {
            r.added_p50_us = r.p50_us.zip(raw.p50_us).map(|(a, b)| a - b);
            r.added_p99_us = r.p99_us.zip(raw.p99_us).map(|(a, b)| a - b);
        }
    }
    let mut out = Vec::new();
    for test in tests.iter().filter(|t| is_latency(t)) {
        for cfg in configs {
            let rs: Vec<&LatRow> = rows
                .iter()
                .filter(|r| &r.config == cfg && &r.test == test)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let sp = |f: &dyn Fn(&LatRow) -> Option<f64>| {
                Spread::of(&rs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
            };
            let vs = |f: &dyn Fn(&LatRow) -> Option<f64>| {
                Spread::of(
                    &rs.iter()
                        .filter_map(|r| {
                            let p = find(rows, r.rep, peer, test)?;
                            Some(f(r)? / f(&p)?)
                        })
                        .collect::<Vec<_>>(),
                )
            };
            out.push(LatSummary {
                config: cfg.clone(),
                test: test.clone(),
                reps: rs.len(),
                p50_us: sp(&|r| r.p50_us),
                p99_us: sp(&|r| r.p99_us),
                p999_us: sp(&|r| r.p999_us),
                rate: sp(&|r| r.rate),
                loss_pct: sp(&|r| r.loss_pct).map(|s| s.median),
                added_p50_us: sp(&|r| r.added_p50_us),
                added_p99_us: sp(&|r| r.added_p99_us),
                vs_peer_p50: vs(&|r| r.p50_us),
                vs_peer_p99: vs(&|r| r.p99_us),
                vs_peer_rate: vs(&|r| r.rate),
            });
        }
    }
    out
}

fn spread(x: Option<Spread>, digits: usize) -> String {
    x.map(|v| format!("{:.d$} [{:.d$}-{:.d$}]", v.median, v.min, v.max, d = digits))
        .unwrap_or_else(|| "-".into())
}

/// The latency table, beside the throughput one.
pub fn table(s: &[LatSummary], peer: &str) -> String {
    let mut t = format!(
        "Latency and small packets: rr = round trip of a 64-byte message (sockperf ping-pong --full-rtt), us,\n\
         median [min-max] over repetitions; _load = while iperf3 sends bulk the other way through the same tunnel;\n\
         added = round trip minus raw veth's in the same repetition; crr = TCP connections/s (open, 64 B each way,\n\
         close), 1 or 8 clients (loss % = connections that failed); pps64 = 64-byte UDP datagrams/s that arrived;\n\
         rate of an rr test = exchanges/s while counted; vs {peer} = per-repetition ratio\n\
         (round trip: lower is better; rate: higher is better)\n\n"
    );
    t += &format!(
        "{:10} {:12} {:>4} {:>22} {:>22} {:>10} {:>20} {:>20} {:>19} {:>19} {:>26} {:>8}\n",
        "config",
        "test",
        "reps",
        "p50 us",
        "p99 us",
        "p99.9 us",
        "added p50 us",
        "added p99 us",
        format!("p50 vs {peer}"),
        format!("p99 vs {peer}"),
        "rate /s",
        "loss %"
    );
    let mut last = String::new();
    for x in s {
        if x.test != last && !last.is_empty() {
            t += "\n";
        }
        last = x.test.clone();
        let rate = match (x.rate, x.vs_peer_rate) {
            (Some(r), Some(v)) if !x.test.starts_with("rr") => {
                format!("{:.0} ({:.2}x)", r.median, v.median)
            }
            (Some(r), _) => format!("{:.0}", r.median),
            _ => "-".into(),
        };
        t += &format!(
            "{:10} {:12} {:>4} {:>22} {:>22} {:>10} {:>20} {:>20} {:>19} {:>19} {:>26} {:>8}\n",
            x.config,
            x.test,
            x.reps,
            spread(x.p50_us, 1),
            spread(x.p99_us, 1),
            x.p999_us
                .map(|v| format!("{:.1}", v.median))
                .unwrap_or_else(|| "-".into()),
            spread(x.added_p50_us, 1),
            spread(x.added_p99_us, 1),
            spread(x.vs_peer_p50, 2),
            spread(x.vs_peer_p99, 2),
            rate,
            x.loss_pct
                .map(|v| format!("{v:.2}"))
                .unwrap_or_else(|| "-".into()),
        );
    }
    t
}

/// The lines a script reads, one per figure: tunmesh against `peer`
/// (named `peer_name`), the median of per-repetition ratios with min-max,
/// or n/a and why.
pub fn lines(
    s: &[LatSummary],
    missing: &std::collections::BTreeMap<String, String>,
    peer: &str,
    peer_name: &str,
) -> Vec<String> {
    let figure = |label: &str, test: &str, pick: &dyn Fn(&LatSummary) -> Option<Spread>| {
        let got = s
            .iter()
            .find(|x| x.config == "tunmesh" && x.test == test)
            .and_then(pick);
        match got {
            Some(v) => format!(
                "bench: {label} tunmesh/{peer_name} = {:.2} [{:.2}-{:.2}]",
                v.median, v.min, v.max
            ),
            None => {
                let why = [("tunmesh", "tunmesh"), (peer, peer_name)]
                    .iter()
                    .find_map(|(c, n)| missing.get(*c).map(|w| format!("{n} missing: {w}")))
                    .unwrap_or_else(|| format!("{test} not measured for both"));
                format!("bench: {label} tunmesh/{peer_name} = n/a ({why})")
            }
        }
    };
    vec![
        figure("rr-p50", "rr_udp", &|x| x.vs_peer_p50),
        figure("rr-p99", "rr_udp", &|x| x.vs_peer_p99),
        figure("crr", "crr1", &|x| x.vs_peer_rate),
        figure("pps64", "pps64", &|x| x.vs_peer_rate),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockperf_percentiles_are_read() {
        let out = "sockperf: [Valid Duration] RunTime=0.550 sec; SentMessages=15777; ReceivedMessages=15777\n\
                   sockperf: \x1b[2;35mTotal 15777 observations\x1b[0m; each percentile contains 157.77 observations\n\
                   sockperf: ---> percentile 99.900 = 3966.952\n\
                   sockperf: ---> percentile 99.000 =   54.200\n\
                   sockperf: ---> percentile 50.000 =   12.418\n";
        assert_eq!(percentile(out, "99.900"), Some(3966.952));
        assert_eq!(percentile(out, "99.000"), Some(54.2));
        assert_eq!(percentile(out, "50.000"), Some(12.418));
        assert_eq!(percentile(out, "90.000"), None);
        assert_eq!(observations(out), Some(15777));
        assert_eq!(valid_seconds(out), Some(0.55));
    }

    fn row(rep: u32, config: &str, test: &str, p50: f64, rate: f64) -> LatRow {
        LatRow {
            rep,
            config: config.into(),
            test: test.into(),
            p50_us: Some(p50),
            p99_us: Some(p50 * 2.0),
            p999_us: Some(p50 * 3.0),
            rate: Some(rate),
            ..LatRow::default()
        }
    }

    #[test]
    fn ratios_and_added_round_trips_are_taken_inside_each_repetition() {
        // Rep 2 is twice as slow for everyone: the ratios stay the same.
        let mut rows = vec![
            row(1, "raw", "rr_udp", 10.0, 1000.0),
            row(1, "tunmesh", "rr_udp", 30.0, 500.0),
            row(1, "wggo_new", "rr_udp", 40.0, 400.0),
            row(2, "raw", "rr_udp", 20.0, 500.0),
            row(2, "tunmesh", "rr_udp", 60.0, 250.0),
            row(2, "wggo_new", "rr_udp", 80.0, 200.0),
        ];
        let configs: Vec<String> = ["raw", "tunmesh", "wggo_new"].map(String::from).to_vec();
        let s = summarize(&mut rows, &configs, &["rr_udp".into()], "wggo_new");
        let t = s.iter().find(|x| x.config == "tunmesh").unwrap();
        let p50 = t.vs_peer_p50.unwrap();
        assert_eq!((p50.median, p50.min, p50.max), (0.75, 0.75, 0.75));
        let added = t.added_p50_us.unwrap();
        assert_eq!((added.min, added.max), (20.0, 40.0));
        let l = lines(&s, &Default::default(), "wggo_new", "wireguard-go");
        assert_eq!(
            l[0],
            "bench: rr-p50 tunmesh/wireguard-go = 0.75 [0.75-0.75]"
        );
        assert!(l[2].contains("n/a"), "{}", l[2]);
    }

    #[test]
    fn a_missing_peer_makes_its_lines_n_a() {
        let mut rows = vec![
            row(1, "raw", "crr1", 10.0, 1000.0),
            row(1, "tunmesh", "crr1", 30.0, 500.0),
        ];
        let configs: Vec<String> = ["raw", "tunmesh", "wggo_new"].map(String::from).to_vec();
        let s = summarize(&mut rows, &configs, &["crr1".into()], "wggo_new");
        let missing = [("wggo_new".to_string(), "not installed".to_string())].into();
        let l = lines(&s, &missing, "wggo_new", "wireguard-go");
        assert_eq!(
            l[2],
            "bench: crr tunmesh/wireguard-go = n/a (wireguard-go missing: not installed)"
        );
    }
}
