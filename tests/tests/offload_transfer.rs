//! 1 GiB of random data through the tunnel, hashed at both ends, with TUN
//! offloads on (TSO segmentation and GRO coalescing in the routers) and off.
//! Needs root; CI runs it.

use std::time::{Duration, Instant};

use tunmesh_lab::checks::{tcp_stream, udp_bursts};
use tunmesh_lab::{require_root, Lab, LabOptions};

const GIB: u64 = 1 << 30;

fn transfer(offload: bool) {
    let lab = Lab::up(&LabOptions {
        nodes: 2,
        pods_per_node: 1,
        router_args: vec![format!("--offload={offload}")],
        mesh_file: true,
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
    // UDP: datagrams of several sizes, including the largest that fits the
    // MTU, keep their boundaries and bytes (with offloads they cross the
    // tunnel coalesced and are cut apart again by the kernel).
    for (dst, sizes) in [
        (b.ipv4.into(), [1392usize, 1000, 77, 1200]),
        (b.ipv6.into(), [1372, 500, 9, 1300]),
    ] {
        let (sent, good, bad) = udp_bursts(&a.ns, &b.ns, dst, &sizes, 64, 40).expect("udp");
        eprintln!("offload={offload} UDP to {dst}: {sent} sent, {good} intact, {bad} damaged");
        assert_eq!(bad, 0, "no datagram damaged or merged");
        assert_eq!(good, sent, "every datagram arrived");
    }
    // The status counters show whether the offload paths ran (the snapshot
    // is rewritten every second: poll).
    let moved = |s: &tunmesh_router::status::Status| {
        let o = &s.offload;
        if offload {
            o.tcp_writes_coalesced > 0
                && o.udp_writes_coalesced > 0
                && o.packets_coalesced > o.tcp_writes_coalesced
        } else {
            o.packets_coalesced == 0
        }
    };
    let s = lab.wait_status("node-2", Duration::from_secs(10), moved);
    assert!(
        s.is_some(),
        "node-2 offload counters: {:?}",
        lab.router_status("node-2").map(|s| s.offload)
    );
    let sender = lab.wait_status("node-1", Duration::from_secs(10), |s| {
        (s.offload.super_packets_read > 0) == offload
    });
    assert!(
        sender.is_some(),
        "node-1 offload counters: {:?}",
        lab.router_status("node-1").map(|s| s.offload)
    );
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
