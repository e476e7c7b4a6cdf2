//! `tunmesh-lab soak`: iperf3 through the mesh for a long while as nodes
//! join and leave on a schedule; reports router memory at start, at the end
//! and at its peak (VmHWM), the mean rate and the slowest second at the
//! receiver, and fails on a dead router, a stuck peer, a second in which
//! nothing arrived, or a peak over the bound.
//! (Minutes long, so not part of CI; docs/testing.md names the command.)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::checks;
use crate::lab::{Lab, LabOptions};
use crate::netns;

pub struct SoakOptions {
    pub minutes: u64,
    pub every: Duration,
    /// Resident memory a router may reach, in MiB.
    pub rss_bound_mib: u64,
    pub root: std::path::PathBuf,
}

/// A `/proc/PID/status` field in KiB (`VmRSS`: resident now; `VmHWM`: the
/// peak resident set over the process's life).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

pub fn run(o: &SoakOptions) -> Result<()> {
    let mut lab = Lab::up(&LabOptions {
        nodes: 3,
        pods_per_node: 1,
        root: o.root.clone(),
        ..Default::default()
    })?;
    let (a, b) = (
        lab.pod("node-1-pod-1").context("pod")?.clone(),
        lab.pod("node-2-pod-1").context("pod")?.clone(),
    );
    // The three routers that stay for the whole soak.
    let steady = ["node-1", "node-2", "node-3"];
    let mem = |lab: &Lab, field: &str| -> Vec<(String, u64)> {
        lab.state
            .nodes
            .iter()
            .filter(|n| steady.contains(&n.name.as_str()))
            .filter_map(|n| Some((n.name.clone(), status_kib(n.router_pid?, field)?)))
            .collect()
    };
    let rss = |lab: &Lab| mem(lab, "VmRSS");
    let show = |v: &[(String, u64)]| {
        v.iter()
            .map(|(n, k)| format!("{n} {k} KiB"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let start_rss = rss(&lab);
    println!(
        "soak: {} min of iperf3 node-1-pod-1 -> node-2-pod-1, a node joining or leaving every {:?}",
        o.minutes, o.every
    );
    println!("router RSS at start: {}", show(&start_rss));
    let total = Duration::from_secs(o.minutes * 60);
    let seconds = u32::try_from(total.as_secs()).unwrap_or(u32::MAX);
    let (client, server, dst) = (a.ns.clone(), b.ns.clone(), b.ipv4);
    let iperf =
        std::thread::spawn(move || checks::iperf3(&client, &server, dst.into(), seconds, &[]));
    let t0 = Instant::now();
    let mut joined: Option<usize> = None;
    let mut events = 0;
    while t0.elapsed() + o.every < total {
        std::thread::sleep(o.every);
        match joined.take() {
            None => {
                let i = lab.add_node(1)?;
                println!(
                    "{:>5.0} s: {} joined",
                    t0.elapsed().as_secs_f64(),
                    lab.state.nodes[i].name
                );
                joined = Some(i);
            }
            Some(i) => {
                let name = lab.state.nodes[i].name.clone();
                lab.remove_node(i)?;
                println!("{:>5.0} s: {name} left", t0.elapsed().as_secs_f64());
            }
        }
        events += 1;
        for n in steady {
            let pid = lab.node(n).and_then(|n| n.router_pid).unwrap_or(0);
            if !netns::is_running(pid) {
                bail!(
                    "{n}'s router died (see {})",
                    lab.node(n)
                        .map(|n| n.log.display().to_string())
                        .unwrap_or_default()
                );
            }
        }
    }
    let result = iperf
        .join()
        .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))??;
    let end_rss = rss(&lab);
    let peak = mem(&lab, "VmHWM");
    println!("router RSS at end:   {}", show(&end_rss));
    println!("router RSS peak:     {} (VmHWM)", show(&peak));
    // No stuck peers: every remaining router reaches every remaining pod.
    let results = checks::matrix(&lab);
    let bad: Vec<_> = results.iter().filter(|r| !r.ok()).collect();
    let logs: Vec<String> = lab
        .state
        .nodes
        .iter()
        .map(|n| std::fs::read_to_string(&n.log).unwrap_or_default())
        .collect();
    let panicked = logs.iter().any(|l| l.contains("panicked"));
    let worst = result.worst_interval_gbps;
    println!(
        "soak: {events} joins/leaves, iperf3 {:.2} Gbit/s at the receiver over {} min (slowest second {}), {} of {} pairs reachable at the end, panics: {}",
        result.gbps,
        o.minutes,
        worst.map(|w| format!("{w:.2} Gbit/s")).unwrap_or_else(|| "unknown".into()),
        results.len() - bad.len(),
        results.len(),
        if panicked { "YES" } else { "none" }
    );
    let highest = peak.iter().map(|(_, k)| *k).max().unwrap_or(0);
    lab.down()?;
    if panicked || !bad.is_empty() {
        bail!(
            "soak failed: {} unreachable pairs, panics: {panicked}",
            bad.len()
        );
    }
    match worst {
        None => bail!("soak failed: iperf3 reported no intervals at the receiver"),
        Some(w) if w <= 0.0 => bail!("soak failed: a whole second passed with nothing arriving"),
        Some(_) => {}
    }
    if peak.len() != steady.len() {
        bail!("soak failed: could not read every router's peak memory: {peak:?}");
    }
    if highest > o.rss_bound_mib * 1024 {
        bail!(
            "a router's RSS peaked at {highest} KiB, over the {} MiB bound",
            o.rss_bound_mib
        );
    }
    println!(
        "soak: OK (router RSS peak at most {highest} KiB, bound {} MiB)",
        o.rss_bound_mib
    );
    Ok(())
}
