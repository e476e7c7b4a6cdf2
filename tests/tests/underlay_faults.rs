//! Underlay faults between two nodes: loss, delay, reordering, duplication,
//! and the link going down while a handshake is due. This kernel has no
//! `netem`, so the two routers' WireGuard traffic is steered (with
//! `tunmesh.io/force-endpoint`) through a userspace impairment relay on the
//! underlay (`tunmesh_lab::impair`). Each phase moves 2 MiB through the
//! mesh and compares hashes, asserts from the relay's own counters that the
//! traffic went through it and that the impairment happened, and prints
//! how long it took. Root only.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tunmesh_lab::checks::{self, ping};
use tunmesh_lab::impair::{Counts, Impairment, Relay};
use tunmesh_lab::lab::{Lab, PodInfo};
use tunmesh_lab::netns::{in_netns, ip};
use tunmesh_lab::require_root;

const BYTES: usize = 2 << 20;

/// Moves 2 MiB from node-1's pod to node-2's through the relay and checks
/// the bytes; returns what the relay did meanwhile.
fn transfer(lab: &Lab, relay: &Relay, what: &str, seed: u64) -> Counts {
    let (a, b) = (
        lab.pod("node-1-pod-1").unwrap(),
        lab.pod("node-2-pod-1").unwrap(),
    );
    let data = checks::pattern(BYTES, seed);
    // What the previous phase still held is not this phase's.
    assert!(
        relay.wait_idle(Duration::from_secs(5)),
        "{what}: the relay never drained"
    );
    let before = relay.counts();
    let t0 = Instant::now();
    let got = checks::tcp_transfer(
        &a.ns,
        &b.ns,
        b.ipv4.into(),
        data.clone(),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{what}: transfer failed: {e:#}"));
    assert_eq!(got, checks::sha256(&data), "{what}: bytes differ");
    let s = t0.elapsed().as_secs_f64();
    let d = relay.counts() - before;
    eprintln!(
        "{what}: 2 MiB intact in {s:.2} s ({:.2} Mbit/s); {d}",
        BYTES as f64 * 8.0 / s / 1e6
    );
    // 2 MiB in datagrams of at most 1420 inner bytes: at least ~1500 of
    // them crossed the relay (the data; the ACKs come on top).
    assert!(
        d.forwarded >= (BYTES / 1420) as u64,
        "{what}: the transfer did not go through the relay: {d}"
    );
    d
}

/// 3000 UDP datagrams from pod `a` to pod `b` through 1500-datagram bursts
/// sent newest first: no `replay` drop on node-2, and they arrive.
fn reordered_bursts(lab: &Lab, relay: &Relay, a: &PodInfo, b: &PodInfo) {
    const N: usize = 3000;
    relay.set(Impairment {
        reverse_burst: 1500,
        ..Default::default()
    });
    assert!(relay.wait_idle(Duration::from_secs(5)));
    let replay =
        |s: &tunmesh_router::status::Status| s.counters.drops.get("replay").copied().unwrap_or(0);
    let replay_before = replay(&lab.fresh_status("node-2").unwrap());
    let counts_before = relay.counts();
    let receiver = in_netns(&b.ns, || std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    // Room for a whole burst arriving at once: the drops this phase is
    // about are the routers', not the receiving socket's.
    let size: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on a socket we own, with a c_int value.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&receiver),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let port = receiver.local_addr().unwrap().port();
    let counter = std::thread::spawn(move || {
        let mut got = std::collections::BTreeSet::new();
        let mut buf = [0u8; 64];
        while let Ok(n) = receiver.recv(&mut buf) {
            if n >= 4 {
                got.insert(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]));
            }
        }
        got.len()
    });
    let sender = in_netns(&a.ns, || std::net::UdpSocket::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    let dst = SocketAddr::new(b.ipv4.into(), port);
    for i in 0..N as u32 {
        let mut d = [0u8; 32];
        d[..4].copy_from_slice(&i.to_be_bytes());
        let _ = sender.send_to(&d, dst);
        // A little pacing, so the pods' and routers' queues keep up; the
        // reordering is the relay's.
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    assert!(
        relay.wait_idle(Duration::from_secs(5)),
        "the relay never drained"
    );
    let arrived = counter.join().unwrap();
    let d = relay.counts() - counts_before;
    relay.set(Impairment::default());
    let replays = replay(&lab.fresh_status("node-2").unwrap()) - replay_before;
    eprintln!(
        "bursts of 1500 sent newest first: {arrived} of {N} datagrams arrived; {replays} replay drops at node-2; {d}"
    );
    assert!(
        d.max_behind > 1024,
        "the relay did not reorder beyond 1024: {d}"
    );
    assert_eq!(replays, 0, "node-2 dropped reordered datagrams as replays");
    assert!(
        arrived >= N * 9 / 10,
        "only {arrived} of {N} reordered datagrams arrived"
    );
}

/// An impairment phase: its name, the setting, and how the relay's counts
/// show it happened.
type Phase = (&'static str, Impairment, fn(&Counts) -> bool);

#[test]
fn transfers_survive_loss_delay_reordering_duplication_and_a_link_outage() {
    if !require_root("transfers_survive_loss_delay_reordering_duplication_and_a_link_outage") {
        return;
    }
    let mut lab = Lab::for_test(2, 1);
    let ul = lab.state.underlay_ns.clone();
    ip(&["-n", &ul, "addr", "add", "172.28.0.3/24", "dev", "br0"]).unwrap();
    let (n1, n2) = (
        lab.node("node-1").unwrap().clone(),
        lab.node("node-2").unwrap().clone(),
    );
    let relay = Relay::start(
        &ul,
        "172.28.0.3".parse().unwrap(),
        SocketAddr::new(IpAddr::V4(n1.underlay_ip), 51820),
        SocketAddr::new(IpAddr::V4(n2.underlay_ip), 51820),
    )
    .unwrap();
    // node-1 reaches node-2 at the relay's A side, node-2 reaches node-1 at its B side.
    lab.kubectl(&[
        "annotate",
        "node",
        "node-2",
        &format!("tunmesh.io/force-endpoint={}", relay.a_side),
    ])
    .unwrap();
    lab.kubectl(&[
        "annotate",
        "node",
        "node-1",
        &format!("tunmesh.io/force-endpoint={}", relay.b_side),
    ])
    .unwrap();
    let steered = |lab: &Lab, node: &str, peer: &str, ep: SocketAddr| {
        lab.wait_status(node, Duration::from_secs(20), |s| {
            s.peers
                .iter()
                .any(|p| p.name == peer && p.endpoint == Some(ep.to_string()))
        })
        .is_some()
    };
    assert!(
        steered(&lab, "node-1", "node-2", relay.a_side)
            && steered(&lab, "node-2", "node-1", relay.b_side)
    );
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    assert!(
        ping(&a.ns, b.ipv4.into(), 10),
        "no traffic through the relay"
    );
    let clean = transfer(&lab, &relay, "through the relay, no impairment", 1);
    assert_eq!(
        (clean.dropped_loss, clean.duplicated, clean.reordered),
        (0, 0, 0),
        "an unimpaired relay impairs nothing: {clean}"
    );

    let ms = Duration::from_millis;
    let phases: [Phase; 5] = [
        (
            "5% loss",
            Impairment {
                loss: 0.05,
                ..Default::default()
            },
            // 5% of at least 1500 datagrams: dozens lost; allow 2-10%.
            |d| {
                let share = d.dropped_loss as f64 / d.received.max(1) as f64;
                (0.02..0.10).contains(&share)
            },
        ),
        (
            "100 ms delay each way",
            Impairment {
                delay: ms(100),
                ..Default::default()
            },
            |d| d.delayed == d.forwarded && d.mean_hold() >= Duration::from_millis(100),
        ),
        (
            "reordering (0-20 ms jitter)",
            Impairment {
                jitter: ms(20),
                ..Default::default()
            },
            |d| d.reordered > 0 && d.delayed > 0,
        ),
        (
            "20% duplication",
            Impairment {
                duplicate: 0.2,
                ..Default::default()
            },
            |d| {
                let share = d.duplicated as f64 / d.received.max(1) as f64;
                (0.10..0.30).contains(&share)
            },
        ),
        (
            "all at once (2% loss, 20 ms delay, 10 ms jitter, 5% duplicates)",
            Impairment {
                loss: 0.02,
                delay: ms(20),
                jitter: ms(10),
                duplicate: 0.05,
                down: false,
                reverse_burst: 0,
            },
            |d| {
                d.dropped_loss > 0
                    && d.duplicated > 0
                    && d.reordered > 0
                    && d.mean_hold() >= Duration::from_millis(20)
            },
        ),
    ];
    for (what, imp, happened) in phases {
        relay.set(imp);
        let d = transfer(&lab, &relay, what, what.len() as u64);
        assert!(
            happened(&d),
            "{what}: the relay did not impair as asked: {d}"
        );
    }
    relay.set(Impairment::default());

    // Bursts reordered by more than boringtun's own replay window (1024):
    // the relay sends 1500-datagram bursts newest first. The routers'
    // window (8192, as the kernel's and wireguard-go's) takes them all.
    reordered_bursts(&lab, &relay, &a, &b);

    // Link down while a new handshake is due: node-2's router restarts (a
    // fresh session is needed) with the relay dropping everything for 8 s;
    // the initiations are retried until the link is back.
    relay.set(Impairment {
        down: true,
        ..Default::default()
    });
    let down = Instant::now();
    lab.stop_router(1).unwrap();
    lab.start_router(1).unwrap();
    lab.wait_router(1).unwrap();
    lab.wait_node_ready(1).unwrap();
    // Nothing crosses a link that is down, and the relay says it dropped
    // what was tried (the pings or the handshakes before them).
    let tried = relay.counts();
    assert!(
        !ping(&a.ns, b.ipv4.into(), 2),
        "traffic crossed a link that is down"
    );
    let d = relay.counts() - tried;
    assert!(
        d.dropped_down > 0 && d.forwarded == 0,
        "the failed ping must be the relay's doing: {d}"
    );
    while down.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(ms(100));
    }
    let up = Instant::now();
    relay.set(Impairment::default());
    let back = tunmesh_lab::netns::wait_for(Duration::from_secs(30), || {
        ping(&a.ns, b.ipv4.into(), 1).then_some(())
    });
    assert!(
        back.is_some(),
        "the mesh did not recover after the link came back"
    );
    let up_unix = tunmesh_router::status::unix_now() - up.elapsed().as_secs();
    let hs = lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.peers.iter().any(|p| {
            p.name == "node-2" && p.latest_handshake_unix.is_some_and(|t| t + 1 >= up_unix)
        })
    });
    assert!(hs.is_some(), "no new handshake after the link came back");
    eprintln!(
        "link down 8 s during a re-handshake: traffic back {:.2} s after the link came up",
        up.elapsed().as_secs_f64()
    );
    transfer(&lab, &relay, "after the outage", 7);
    drop(relay);
    lab.down().unwrap();
}
