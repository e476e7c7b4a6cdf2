//! 1 GiB of random data through the tunnel, hashed at both ends, with TUN
//! offloads on (TSO segmentation and GRO coalescing in the routers) and off.
//! Needs root; CI runs it.

use std::time::{Duration, Instant};

use tunmesh_lab::checks::tcp_stream;
use tunmesh_lab::{require_root, Lab, LabOptions};

const GIB: u64 = 1 << 30;

fn transfer(offload: bool) {
    let lab = Lab::up(&LabOptions {
        nodes: 2,
        pods_per_node: 1,
        router_args: vec![format!("--offload={offload}")],
        ..Default::default()
    })
    .expect("lab up");
    let log = std::fs::read_to_string(&lab.node("node-1").unwrap().log).unwrap();
    assert!(
        log.contains(&format!("tun_offload={offload}")),
        "router runs with offload={offload}: {log}"
    );
    let (a, b) = (
        lab.pod("node-1-pod-1").unwrap(),
        lab.pod("node-2-pod-1").unwrap(),
    );
    for (dst, family) in [(b.ipv4.into(), "IPv4"), (b.ipv6.into(), "IPv6")] {
        let size = if family == "IPv4" { GIB } else { GIB / 4 };
        let t = Instant::now();
        let (sent, got, n) =
            tcp_stream(&a.ns, &b.ns, dst, size, 0x5eed, Duration::from_secs(60)).expect("transfer");
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "offload={offload} {family}: {n} bytes in {secs:.1} s ({:.2} Gbit/s), hashes match: {}",
            n as f64 * 8.0 / secs / 1e9,
            sent == got
        );
        assert_eq!(n, size);
        assert_eq!(sent, got, "bytes arrived intact");
    }
    let s = lab.router_status("node-2").unwrap();
    assert_eq!(s.counters.drops["malformed"], 0);
    assert_eq!(s.counters.drops["tun_write_failed"], 0);
}

#[test]
fn one_gib_intact_with_offloads() {
    if require_root("one_gib_intact_with_offloads") {
        transfer(true);
    }
}

#[test]
fn one_gib_intact_without_offloads() {
    if require_root("one_gib_intact_without_offloads") {
        transfer(false);
    }
}
