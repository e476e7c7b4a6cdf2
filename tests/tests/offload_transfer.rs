//! 1 GiB of random data through the tunnel, hashed at both ends, with TUN
//! offloads on (TSO segmentation and GRO coalescing in the routers, two
//! data-plane queues) and off (one queue); and flows spread over the queues
//! of a multi-queue TUN. Needs root; CI runs it.

use std::time::{Duration, Instant};

use tunmesh_lab::checks::{big_receive_buffer, ping, tcp_stream, udp_bursts};
use tunmesh_lab::netns::in_netns;
use tunmesh_lab::{require_root, Lab, LabOptions};

const GIB: u64 = 1 << 30;

fn transfer(offload: bool, queues: usize) {
    let lab = Lab::up(&LabOptions {
        nodes: 2,
        pods_per_node: 1,
        router_args: vec![format!("--offload={offload}"), format!("--queues={queues}")],
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
    assert_eq!(s.queues.len(), queues, "queues in status: {:?}", s.queues);
}

#[test]
fn one_gib_intact_with_offloads() {
    if require_root("one_gib_intact_with_offloads") {
        transfer(true, 2);
    }
}

#[test]
fn one_gib_intact_without_offloads() {
    if require_root("one_gib_intact_without_offloads") {
        transfer(false, 1);
    }
}

/// With two queues, flows leaving a node are spread over both TUN queues by
/// the kernel (one flow stays on one queue), every datagram and every byte
/// arrives, and each queue's counters show its share.
#[test]
fn flows_spread_over_queues() {
    if !require_root("flows_spread_over_queues") {
        return;
    }
    let lab = Lab::up(&LabOptions {
        nodes: 2,
        pods_per_node: 1,
        router_args: vec!["--queues=2".into()],
        mesh_file: true,
        ..Default::default()
    })
    .expect("lab up");
    let (a, b) = (
        lab.pod("node-1-pod-1").unwrap(),
        lab.pod("node-2-pod-1").unwrap(),
    );
    // Neighbours resolved first: packets waiting on one are queued (and
    // dropped past a small limit) by the kernel, not by the routers.
    assert!(ping(&a.ns, b.ipv4.into(), 10), "pod to pod");
    // One-way UDP from 64 source ports: nothing comes back to tie a flow to
    // a queue, so the kernel picks each flow's queue by its hash.
    let (sent, got) = udp_from_ports(&a.ns, &b.ns, b.ipv4.into(), 64, 4).expect("udp flows");
    assert_eq!(got, sent, "every datagram of every flow arrived");
    let spread = lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.queues.len() == 2 && s.queues.iter().all(|q| q.tun_packets_read > 0)
    });
    assert!(
        spread.is_some(),
        "both TUN queues of node-1 carried flows: {:?}",
        lab.router_status("node-1").map(|s| s.queues)
    );
    // Eight TCP streams at once, in both families: all intact.
    let streams: Vec<_> = (0..8u64)
        .map(|i| {
            let (from, to) = (a.ns.clone(), b.ns.clone());
            let dst: std::net::IpAddr = if i % 2 == 0 {
                b.ipv4.into()
            } else {
                b.ipv6.into()
            };
            std::thread::spawn(move || {
                tcp_stream(&from, &to, dst, 32 << 20, i, Duration::from_secs(60))
            })
        })
        .collect();
    for (i, t) in streams.into_iter().enumerate() {
        let (sent, got, n) = t.join().expect("stream thread").expect("stream");
        assert_eq!(n, 32 << 20, "stream {i} length");
        assert_eq!(sent, got, "stream {i} arrived intact");
    }
    let s = lab.router_status("node-2").unwrap();
    assert_eq!(s.counters.drops["malformed"], 0);
    assert_eq!(s.counters.drops["decrypt_failed"], 0);
}

/// Sends `per` datagrams from each of `ports` sockets (each its own source
/// port) in `from` to one receiver on `dst` in `to`. Returns (sent, received).
fn udp_from_ports(
    from: &str,
    to: &str,
    dst: std::net::IpAddr,
    ports: usize,
    per: usize,
) -> anyhow::Result<(usize, usize)> {
    use std::net::{SocketAddr, UdpSocket};
    let rx = in_netns(to, move || UdpSocket::bind(SocketAddr::new(dst, 0)))??;
    let addr = rx.local_addr()?;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    big_receive_buffer(&rx);
    let total = ports * per;
    let receiver = std::thread::spawn(move || {
        let mut got = 0;
        let mut buf = [0u8; 512];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got < total && Instant::now() < deadline {
            if rx.recv(&mut buf).is_ok() {
                got += 1;
            }
        }
        got
    });
    let senders = in_netns(from, move || -> std::io::Result<Vec<UdpSocket>> {
        (0..ports)
            .map(|_| {
                let s = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?;
                s.connect(addr)?;
                Ok(s)
            })
            .collect()
    })??;
    let mut sent = 0;
    for k in 0..per {
        for s in &senders {
            s.send(&[k as u8; 200])?;
            sent += 1;
        }
    }
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    Ok((sent, got))
}
