//! Two data planes joined by in-memory TUN and UDP fakes exchange real
//! WireGuard traffic, without root.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tunmesh_router::dataplane::mem::{MemNet, MemTun, MemTunHost};
use tunmesh_router::dataplane::packet::icmpv4_echo;
use tunmesh_router::dataplane::{Dataplane, Drop, Queue};
use tunmesh_router::model::{DesiredMesh, PeerSpec};
use tunmesh_router::PrivateKey;

struct Node {
    dp: Arc<Dataplane>,
    host: MemTunHost,
    stop: Arc<AtomicBool>,
}

impl std::ops::Drop for Node {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn ep(i: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, i], 51820))
}

fn spec(name: &str, key: &PrivateKey, i: u8, cidrs: &[&str]) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(ep(i)),
        allowed_ips: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
        node_addresses: vec![],
        persistent_keepalive: None,
        rotated_from: None,
        key_created_unix: None,
        underlay_mtu: None,
    }
}

fn start(net: &Arc<MemNet>, key: &PrivateKey, i: u8, peers: Vec<PeerSpec>) -> Node {
    start_with(net, key, i, peers, &[])
}

/// As `start`, with `waiting` already written to the TUN before the data
/// plane's worker runs (so they all arrive in its first batch).
fn start_with(
    net: &Arc<MemNet>,
    key: &PrivateKey,
    i: u8,
    peers: Vec<PeerSpec>,
    waiting: &[Vec<u8>],
) -> Node {
    let dp = Dataplane::new(key, 1420);
    dp.apply(&DesiredMesh {
        peers,
        blackhole_cidrs: vec![],
    });
    let (tun, host) = MemTun::pair();
    for p in waiting {
        host.to_router.send(p.clone()).unwrap();
    }
    let udp = net.bind(ep(i));
    let stop = Arc::new(AtomicBool::new(false));
    let queue: Queue = (Arc::new(tun), Arc::new(udp));
    dp.spawn(&[queue], Arc::clone(&stop)).unwrap();
    Node { dp, host, stop }
}

fn tx(n: &Node) -> (u64, u64) {
    let c = &n.dp.table().peers[0].counters;
    (
        c.tx_packets.load(std::sync::atomic::Ordering::Relaxed),
        c.tx_bytes.load(std::sync::atomic::Ordering::Relaxed),
    )
}

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut b = vec![0u8; 200];
    let n = icmpv4_echo(
        &mut b,
        Ipv4Addr::from(src),
        Ipv4Addr::from(dst),
        7,
        seq,
        b"tunmesh in memory",
    )
    .unwrap();
    b.truncate(n);
    b
}

fn v6_packet(src: &str, dst: &str) -> Vec<u8> {
    let mut p = vec![0u8; 48];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&8u16.to_be_bytes());
    p[6] = 59; // no next header
    p[7] = 64;
    p[8..24].copy_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[24..40].copy_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    p[40..].copy_from_slice(b"v6-inner");
    p
}

fn expect(host: &MemTunHost, want: &[u8]) {
    let got = host
        .from_router
        .recv_timeout(Duration::from_secs(10))
        .expect("packet did not arrive");
    assert_eq!(got, want);
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pair() -> (Node, Node, PrivateKey, PrivateKey) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let net = MemNet::new();
    let a = start(
        &net,
        &ka,
        1,
        vec![spec("b", &kb, 2, &["10.244.2.0/24", "fd00:10:244:2::/64"])],
    );
    let b = start(
        &net,
        &kb,
        2,
        vec![spec("a", &ka, 1, &["10.244.1.0/24", "fd00:10:244:1::/64"])],
    );
    (a, b, ka, kb)
}

#[test]
fn packets_cross_in_both_directions_v4_and_v6() {
    let (a, b, _, _) = pair();
    let p = ping([10, 244, 1, 1], [10, 244, 2, 5], 1);
    a.host.to_router.send(p.clone()).unwrap();
    expect(&b.host, &p);
    let back = ping([10, 244, 2, 5], [10, 244, 1, 1], 2);
    b.host.to_router.send(back.clone()).unwrap();
    expect(&a.host, &back);
    let v6 = v6_packet("fd00:10:244:1::1", "fd00:10:244:2::5");
    a.host.to_router.send(v6.clone()).unwrap();
    expect(&b.host, &v6);
    // The first packet waited for the handshake; both count once sent.
    assert_eq!(tx(&a), (2, (p.len() + v6.len()) as u64));
    assert!(a.dp.table().peers[0].lock().last_handshake().is_some());
}

#[test]
fn packets_sent_before_the_first_handshake_count_once_sealed() {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let net = MemNet::new();
    let b = start(&net, &kb, 2, vec![spec("a", &ka, 1, &["10.244.1.0/24"])]);
    // Three packets in A's TUN before A has any session: the first starts
    // the handshake, all three wait for it and are sealed after it.
    let packets: Vec<Vec<u8>> = (1..=3)
        .map(|seq| ping([10, 244, 1, 1], [10, 244, 2, 5], seq))
        .collect();
    let a = start_with(
        &net,
        &ka,
        1,
        vec![spec("b", &kb, 2, &["10.244.2.0/24"])],
        &packets,
    );
    for p in &packets {
        expect(&b.host, p);
    }
    let bytes: usize = packets.iter().map(Vec::len).sum();
    wait_for("3 packets counted as sent", || tx(&a) == (3, bytes as u64));
    let rx = &b.dp.table().peers[0].counters;
    assert_eq!(rx.rx_packets.load(std::sync::atomic::Ordering::Relaxed), 3);
    let drops = a.dp.counters.snapshot();
    assert_eq!(drops.drops_summary(), "none", "{drops:?}");
}

#[test]
fn drops_are_counted_by_reason_and_the_mesh_keeps_working() {
    let (a, b, _, _) = pair();
    // Establish the session.
    let p = ping([10, 244, 1, 1], [10, 244, 2, 5], 1);
    a.host.to_router.send(p.clone()).unwrap();
    expect(&b.host, &p);

    // B's host sends with a source in nobody's allowed IPs: B encrypts it
    // (outbound checks only the destination); A must drop it.
    b.host
        .to_router
        .send(ping([10, 244, 3, 9], [10, 244, 1, 7], 3))
        .unwrap();
    wait_for("source_not_allowed", || {
        a.dp.counters.drops(Drop::SourceNotAllowed) == 1
    });

    // No peer for the destination: dropped, never sent.
    a.host
        .to_router
        .send(ping([10, 244, 1, 1], [10, 99, 0, 1], 4))
        .unwrap();
    wait_for("no_peer", || a.dp.counters.drops(Drop::NoPeer) == 1);

    // Not an IP packet.
    a.host.to_router.send(vec![0xff; 30]).unwrap();
    wait_for("malformed", || a.dp.counters.drops(Drop::Malformed) == 1);

    // The mesh still works, and nothing dropped reached A's host.
    let p2 = ping([10, 244, 2, 5], [10, 244, 1, 1], 5);
    b.host.to_router.send(p2.clone()).unwrap();
    expect(&a.host, &p2);
}

#[test]
fn reapplying_keeps_sessions_and_removing_drops_routes() {
    let (a, b, _, kb) = pair();
    let p = ping([10, 244, 1, 1], [10, 244, 2, 5], 1);
    a.host.to_router.send(p.clone()).unwrap();
    expect(&b.host, &p);
    let before = Arc::as_ptr(&a.dp.table().peers[0]);
    let mesh = DesiredMesh {
        peers: vec![spec("b", &kb, 2, &["10.244.2.0/24", "fd00:10:244:2::/64"])],
        blackhole_cidrs: vec![],
    };
    let diff = a.dp.apply(&mesh);
    assert!(diff.is_empty(), "{diff:?}");
    assert_eq!(
        Arc::as_ptr(&a.dp.table().peers[0]),
        before,
        "unchanged peer kept"
    );

    // Widening allowed IPs keeps the session (no new handshake needed).
    let mut wider = mesh.clone();
    wider.peers[0]
        .allowed_ips
        .push("10.250.0.0/16".parse().unwrap());
    let diff = a.dp.apply(&wider);
    assert_eq!(diff.updated, vec!["b".to_string()]);
    assert!(a.dp.table().peers[0].lock().last_handshake().is_some());

    let diff = a.dp.apply(&DesiredMesh::default());
    assert_eq!(diff.removed, vec!["b".to_string()]);
    a.host
        .to_router
        .send(ping([10, 244, 1, 1], [10, 244, 2, 5], 2))
        .unwrap();
    wait_for("no_peer after removal", || {
        a.dp.counters.drops(Drop::NoPeer) == 1
    });
}

#[test]
fn endpoint_roams_to_where_authenticated_packets_come_from() {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let net = MemNet::new();
    let a = start(&net, &ka, 1, vec![spec("b", &kb, 2, &["10.244.2.0/24"])]);
    // B comes up at another address than A was told (ep 3, not ep 2) and talks first.
    let b = start(&net, &kb, 3, vec![spec("a", &ka, 1, &["10.244.1.0/24"])]);
    let p = ping([10, 244, 2, 5], [10, 244, 1, 1], 1);
    b.host.to_router.send(p.clone()).unwrap();
    expect(&a.host, &p);
    assert_eq!(
        a.dp.table().peers[0].lock().endpoint,
        Some(ep(3)),
        "A follows B to its new address"
    );
    let back = ping([10, 244, 1, 1], [10, 244, 2, 5], 2);
    a.host.to_router.send(back.clone()).unwrap();
    expect(&b.host, &back);

    // Garbage from a third address does not move the endpoint.
    assert!(net.deliver(
        ep(9),
        ep(1),
        vec![
            4, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
            9, 9, 9, 9, 9, 9, 9
        ]
    ));
    wait_for("decrypt_failed", || {
        a.dp.counters.drops(Drop::DecryptFailed) >= 1
    });
    assert_eq!(a.dp.table().peers[0].lock().endpoint, Some(ep(3)));
}

#[test]
fn persistent_keepalive_is_sent_without_traffic() {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let net = MemNet::new();
    let mut to_b = spec("b", &kb, 2, &["10.244.2.0/24"]);
    to_b.persistent_keepalive = Some(1);
    let a = start(&net, &ka, 1, vec![to_b]);
    let b = start(&net, &kb, 2, vec![spec("a", &ka, 1, &["10.244.1.0/24"])]);
    // No packet is sent by anyone: the keepalive alone makes A handshake
    // with B and then keep sending empty data packets.
    let rx = |n: &Node| n.dp.counters.snapshot().udp_rx_datagrams;
    wait_for("handshake from keepalive", || {
        b.dp.table().peers[0].lock().last_handshake().is_some()
    });
    let before = rx(&b);
    wait_for("two more keepalives", || rx(&b) >= before + 2);
    assert_eq!(
        b.dp.table().peers[0]
            .counters
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "keepalives carry no inner packet"
    );
    assert_eq!(b.dp.counters.drops(Drop::DecryptFailed), 0);
    drop(a);
}
