//! MTU without configuration (issue 18): a lab whose underlay has one
//! 1380-byte link (node-3's) among 1500-byte ones, and no MTU setting
//! anywhere. Every router derives its MTU from its underlay and each
//! peer's path MTU from the route and the peer's published link MTU; a
//! packet too big for its path gets ICMP from the pod's gateway instead of
//! vanishing. Root only; CI runs it.

use std::net::IpAddr;
use std::time::Duration;

use std::net::{SocketAddr, UdpSocket};

use tunmesh_lab::checks;
use tunmesh_lab::lab::{find_binary, Lab, LabOptions};
use tunmesh_lab::netns::{self, in_netns};
use tunmesh_lab::require_root;
use tunmesh_router::status::Status;

const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// 100 MiB per pair.
const TCP_BYTES: u64 = 100 << 20;
const UDP_SIZE: usize = 1400;
const UDP_ROUNDS: u32 = 20;

fn path_mtu(s: &Status, peer: &str) -> Option<u16> {
    s.peers
        .iter()
        .find(|p| p.name == peer)
        .and_then(|p| p.path_mtu)
}

fn counter(s: &Status, what: &str) -> u64 {
    match what {
        "icmp" => s.counters.icmp_too_big_sent,
        reason => s.counters.drops.get(reason).copied().unwrap_or(0),
    }
}

/// `n` UDP datagrams of `UDP_SIZE` bytes from a connected socket in `from`
/// to `dst` in `to`, one at a time. A send refused with EMSGSIZE (the
/// kernel passing on an ICMP too-big for an earlier one) is counted and
/// sent again, as an application would. Returns (intact arrivals,
/// EMSGSIZE refusals).
fn udp_datagrams(from: &str, to: &str, dst: IpAddr, n: u32) -> (u32, u32) {
    let any: IpAddr = if dst.is_ipv4() {
        std::net::Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let rx = in_netns(to, move || UdpSocket::bind(SocketAddr::new(any, 0)))
        .unwrap()
        .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let port = rx.local_addr().unwrap().port();
    let tx = in_netns(from, move || {
        let s = UdpSocket::bind(SocketAddr::new(any, 0))?;
        s.connect(SocketAddr::new(dst, port))?;
        Ok::<_, std::io::Error>(s)
    })
    .unwrap()
    .unwrap();
    let payload = |seq: u32| -> Vec<u8> {
        (0..UDP_SIZE)
            .map(|i| (seq as usize * 31 + i) as u8)
            .collect()
    };
    let (mut intact, mut refused) = (0, 0);
    let mut buf = vec![0u8; 2048];
    for seq in 0..n {
        let data = payload(seq);
        for _ in 0..3 {
            match tx.send(&data) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => refused += 1,
                Err(e) => panic!("UDP send to {dst}: {e}"),
            }
        }
        if let Ok(len) = rx.recv(&mut buf) {
            if buf[..len] == data[..] {
                intact += 1;
            }
        }
    }
    (intact, refused)
}

/// The MTU of `dev` in namespace `ns`.
fn link_mtu(ns: &str, dev: &str) -> u16 {
    let out = netns::exec(ns, "ip", &["-o", "link", "show", dev]).expect("ip link");
    out.split_whitespace()
        .skip_while(|w| *w != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out}"))
}

#[test]
fn a_narrow_link_gets_icmp_not_a_black_hole() {
    if !require_root("a_narrow_link_gets_icmp_not_a_black_hole") {
        return;
    }
    let lab = Lab::up(&LabOptions {
        nodes: 3,
        pods_per_node: 1,
        underlay_mtus: vec![("node-3".into(), 1380)],
        ..Default::default()
    })
    .expect("lab up");

    // The MTUs in use: the underlay's less 60 (WireGuard over IPv4).
    let want_mtu = |n: &str| if n == "node-3" { 1320 } else { 1440 };
    for n in NODES {
        let s = lab.router_status(n).unwrap();
        assert_eq!(s.mtu, want_mtu(n), "{n}'s MTU");
        let node = lab.node(n).unwrap();
        assert_eq!(
            link_mtu(&node.ns, &node.interface),
            want_mtu(n),
            "{n}'s TUN"
        );
        let pod = lab.pod(&format!("{n}-pod-1")).unwrap();
        assert_eq!(link_mtu(&pod.ns, "eth0"), want_mtu(n), "{n}'s pod");
    }
    // Path MTUs: anything to or from node-3 is 1320, the rest 1440.
    for n in NODES {
        let ok = lab.wait_status(n, Duration::from_secs(30), |s| {
            NODES.iter().filter(|p| **p != n).all(|p| {
                let want = if n == "node-3" || *p == "node-3" {
                    1320
                } else {
                    1440
                };
                path_mtu(s, p) == Some(want)
            })
        });
        assert!(
            ok.is_some(),
            "{n}'s path MTUs: {:?}",
            lab.router_status(n).map(|s| s
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.path_mtu))
                .collect::<Vec<_>>())
        );
    }

    // Every pair: 100 MiB over TCP, and 1400-byte UDP datagrams (over IPv4
    // and IPv6), which fit the MTU of the 1440 nodes' pods but not the
    // path to node-3.
    let before: Vec<Status> = NODES.iter().map(|n| lab.fresh_status(n).unwrap()).collect();
    for a in NODES {
        for b in NODES.iter().filter(|b| **b != a) {
            let (pa, pb) = (
                lab.pod(&format!("{a}-pod-1")).unwrap().clone(),
                lab.pod(&format!("{b}-pod-1")).unwrap().clone(),
            );
            let (sent, got, n) = checks::tcp_stream(
                &pa.ns,
                &pb.ns,
                pb.ipv4.into(),
                TCP_BYTES,
                7,
                Duration::from_secs(120),
            )
            .unwrap_or_else(|e| panic!("TCP {a} -> {b}: {e:#}"));
            assert_eq!((sent, n), (got, TCP_BYTES), "TCP {a} -> {b}");
            for dst in [IpAddr::V4(pb.ipv4), IpAddr::V6(pb.ipv6)] {
                let sent = UDP_ROUNDS;
                let (intact, refused) = udp_datagrams(&pa.ns, &pb.ns, dst, sent);
                let narrow = *b == "node-3" && a != "node-3";
                // Over the narrow path the first datagram is refused with
                // ICMP: the pod's kernel learns the path MTU, says so to
                // the application once (EMSGSIZE), and fragments from then
                // on. Everything else arrives.
                let (want, told) = if narrow {
                    (sent - 1, 1..=2)
                } else {
                    (sent, 0..=0)
                };
                assert!(
                    intact >= want && told.contains(&refused),
                    "UDP {a} -> {b} ({dst}): {intact} of {sent} intact, {refused} sends refused"
                );
                if narrow {
                    // The ICMP reached the pod: its kernel holds the path MTU.
                    let route =
                        netns::exec(&pa.ns, "ip", &["route", "get", &dst.to_string()]).unwrap();
                    assert!(
                        route.contains("mtu 1320"),
                        "{a}'s pod, route to {dst}: {route}"
                    );
                }
                eprintln!("{a} -> {b} {dst}: TCP 100 MiB intact; UDP {intact}/{sent} of {UDP_SIZE} bytes intact, {refused} EMSGSIZE");
            }
        }
    }
    // Counted where they happen: the routers of node-1 and node-2 refused
    // and answered (once per destination and family, at least); node-3's
    // pods never sent a packet too big.
    for (i, n) in NODES.iter().enumerate() {
        let after = lab.fresh_status(n).unwrap();
        let icmp = counter(&after, "icmp") - counter(&before[i], "icmp");
        let dropped = counter(&after, "too_big") - counter(&before[i], "too_big");
        eprintln!("{n}: {icmp} ICMP too-big sent, {dropped} packets refused as too_big");
        if *n == "node-3" {
            assert_eq!((icmp, dropped), (0, 0), "{n}");
        } else {
            assert!(
                icmp >= 2 && dropped == icmp,
                "{n}: icmp {icmp}, too_big {dropped}"
            );
        }
    }

    // tunmesh-ctl check on node-1 names the narrow path.
    let ctl = find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN").unwrap();
    let n1 = lab.node("node-1").unwrap();
    let out = netns::exec(
        &n1.ns,
        &ctl.display().to_string(),
        &["--state-dir", &n1.state_dir.display().to_string(), "check"],
    )
    .unwrap();
    let line = out
        .lines()
        .find(|l| {
            l.starts_with("node-3") && l.contains("path MTU 1320 is below the MTU in use (1440)")
        })
        .unwrap_or_else(|| panic!("tunmesh-ctl check:\n{out}"));
    assert!(line.contains("ok ("), "{line}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("node-2") && l.contains("path MTU")),
        "{out}"
    );
    lab.down().unwrap();
}
