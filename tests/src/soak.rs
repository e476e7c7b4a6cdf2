//! `tunmesh-lab soak`: iperf3 through the mesh for a long while as nodes
//! join and leave on a schedule; reports router memory at start and end,
//! and fails on a dead router, a stuck peer or memory over the bound.
//! (Minutes long, so not part of CI; the README documents the command.)

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

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
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
    let rss = |lab: &Lab| -> Vec<(String, u64)> {
        lab.state
            .nodes
            .iter()
            .filter_map(|n| Some((n.name.clone(), rss_kib(n.router_pid?)?)))
            .collect()
    };
    let start_rss = rss(&lab);
    println!(
        "soak: {} min of iperf3 node-1-pod-1 -> node-2-pod-1, a node joining or leaving every {:?}",
        o.minutes, o.every
    );
    println!(
        "router RSS at start: {}",
        start_rss
            .iter()
            .map(|(n, k)| format!("{n} {} KiB", k))
            .collect::<Vec<_>>()
            .join(", ")
    );
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
        for n in ["node-1", "node-2", "node-3"] {
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
    println!(
        "router RSS at end:   {}",
        end_rss
            .iter()
            .map(|(n, k)| format!("{n} {} KiB", k))
            .collect::<Vec<_>>()
            .join(", ")
    );
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
    println!(
        "soak: {events} joins/leaves, iperf3 {:.2} Gbit/s over {} min, {} of {} pairs reachable at the end, panics: {}",
        result.gbps,
        o.minutes,
        results.len() - bad.len(),
        results.len(),
        if panicked { "YES" } else { "none" }
    );
    let worst = end_rss.iter().map(|(_, k)| *k).max().unwrap_or(0);
    lab.down()?;
    if panicked || !bad.is_empty() {
        bail!(
            "soak failed: {} unreachable pairs, panics: {panicked}",
            bad.len()
        );
    }
    if worst > o.rss_bound_mib * 1024 {
        bail!(
            "a router's RSS reached {worst} KiB, over the {} MiB bound",
            o.rss_bound_mib
        );
    }
    println!(
        "soak: OK (router RSS at most {worst} KiB, bound {} MiB)",
        o.rss_bound_mib
    );
    Ok(())
}
