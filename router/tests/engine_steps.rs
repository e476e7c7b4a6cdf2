//! Two engines driven against each other packet by packet, with no thread,
//! socket or timer: each step is called by hand and what it puts in its
//! output batches is carried to the other side. Deterministic, no root.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tunmesh_router::dataplane::packet::icmpv4_echo;
use tunmesh_router::dataplane::{Batch, Dataplane, Drop, Plan, BATCH};
use tunmesh_router::model::{DesiredMesh, PeerSpec};
use tunmesh_router::PrivateKey;

const A_EP: &str = "192.0.2.1:51820";
const B_EP: &str = "192.0.2.2:51820";

/// One side: its engine and where it is on the (imaginary) underlay.
struct Side {
    dp: Arc<Dataplane>,
    at: SocketAddr,
}

/// What a step put out, copied: (packets for the TUN, datagrams with
/// their destination).
#[derive(Default, Debug)]
struct Out {
    tun: Vec<Vec<u8>>,
    udp: Vec<(SocketAddr, Vec<u8>)>,
}

fn batch(dp: &Dataplane) -> Batch {
    Batch::new(BATCH, dp.buf_size())
}

fn drain(b: &mut Batch) -> Vec<Vec<u8>> {
    let v = (0..b.n).map(|i| b.packet(i).to_vec()).collect();
    b.n = 0;
    v
}

fn drain_udp(b: &mut Batch) -> Vec<(SocketAddr, Vec<u8>)> {
    let v = (0..b.n)
        .map(|i| (b.addrs[i], b.packet(i).to_vec()))
        .collect();
    b.n = 0;
    v
}

fn fill(b: &mut Batch, items: &[(SocketAddr, Vec<u8>)]) {
    b.n = 0;
    for (from, data) in items {
        b.bufs[b.n][..data.len()].copy_from_slice(data);
        assert!(b.commit(data.len(), *from));
    }
}

impl Side {
    fn new(key: &PrivateKey, at: &str) -> Side {
        Side {
            dp: Dataplane::new(key, 1420),
            at: at.parse().unwrap(),
        }
    }

    fn peers(&self, peers: Vec<PeerSpec>) {
        self.dp.apply(&DesiredMesh {
            peers,
            blackhole_cidrs: vec![],
        });
    }

    /// Packets from the TUN: sealed.
    fn seal(&self, packets: &[Vec<u8>]) -> Out {
        let mut input = batch(&self.dp);
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        fill(
            &mut input,
            &packets.iter().map(|p| (any, p.clone())).collect::<Vec<_>>(),
        );
        let mut out = batch(&self.dp);
        let mut tun = batch(&self.dp);
        self.dp.seal(
            &self.dp.table(),
            &input,
            &mut out,
            &mut tun,
            &mut Plan::new(),
        );
        Out {
            tun: drain(&mut tun),
            udp: drain_udp(&mut out),
        }
    }

    /// Datagrams from `from`: opened, and what waited for a handshake
    /// flushed after it.
    fn open(&self, from: SocketAddr, datagrams: &[Vec<u8>]) -> Out {
        let mut input = batch(&self.dp);
        fill(
            &mut input,
            &datagrams
                .iter()
                .map(|d| (from, d.clone()))
                .collect::<Vec<_>>(),
        );
        let (mut tun, mut udp) = (batch(&self.dp), batch(&self.dp));
        let table = self.dp.table();
        let handshakes = self
            .dp
            .open(&table, &input, &mut tun, &mut udp, &mut Plan::new());
        let mut out = Out {
            tun: drain(&mut tun),
            udp: drain_udp(&mut udp),
        };
        if handshakes {
            while self.dp.flush_waiting(&table, &mut udp) {
                out.udp.extend(drain_udp(&mut udp));
            }
            out.udp.extend(drain_udp(&mut udp));
        }
        out
    }

    /// One timer tick.
    fn tick(&self) -> Out {
        let mut out = batch(&self.dp);
        assert_eq!(self.dp.tick(&mut out, 0), None);
        Out {
            tun: vec![],
            udp: drain_udp(&mut out),
        }
    }

    fn drops(&self, why: Drop) -> u64 {
        self.dp.counters.drops(why)
    }

    fn tx(&self) -> (u64, u64) {
        let c = &self.dp.table().peers[0].counters;
        (c.tx_packets.load(Relaxed), c.tx_bytes.load(Relaxed))
    }

    fn rx_packets(&self) -> u64 {
        self.dp.table().peers[0].counters.rx_packets.load(Relaxed)
    }
}

/// Carries datagrams from `a` (to `b`) and back until neither has
/// anything to send; returns what `a`'s TUN got and what `b`'s got.
fn exchange(
    a: &Side,
    b: &Side,
    mut from_a: Vec<(SocketAddr, Vec<u8>)>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut to_a_tun, mut to_b_tun) = (vec![], vec![]);
    let mut from_b: Vec<(SocketAddr, Vec<u8>)> = vec![];
    for _ in 0..16 {
        if from_a.is_empty() && from_b.is_empty() {
            return (to_a_tun, to_b_tun);
        }
        for (to, _) in &from_a {
            assert_eq!(*to, b.at, "A sends to B's endpoint");
        }
        let datagrams: Vec<Vec<u8>> = from_a.drain(..).map(|(_, d)| d).collect();
        let out = b.open(a.at, &datagrams);
        to_b_tun.extend(out.tun);
        from_b.extend(out.udp);
        let datagrams: Vec<Vec<u8>> = from_b.drain(..).map(|(_, d)| d).collect();
        let out = a.open(b.at, &datagrams);
        to_a_tun.extend(out.tun);
        from_a.extend(out.udp);
    }
    panic!("the two engines never went quiet");
}

fn ping(src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut b = vec![0u8; 200];
    let n = icmpv4_echo(
        &mut b,
        Ipv4Addr::from(src),
        Ipv4Addr::from(dst),
        9,
        seq,
        b"engine steps",
    )
    .unwrap();
    b.truncate(n);
    b
}

fn spec(name: &str, key: &PrivateKey, ep: &str, cidr: &str) -> PeerSpec {
    PeerSpec {
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(ep.parse().unwrap()),
        allowed_ips: vec![cidr.parse().unwrap()],
        node_addresses: vec![],
        persistent_keepalive: None,
        rotated_from: None,
        key_created_unix: None,
        underlay_mtu: None,
    }
}

/// A and B, each knowing the other, no session yet.
fn pair() -> (Side, Side, PrivateKey, PrivateKey) {
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (a, b) = (Side::new(&ka, A_EP), Side::new(&kb, B_EP));
    a.peers(vec![spec("b", &kb, B_EP, "10.244.2.0/24")]);
    b.peers(vec![spec("a", &ka, A_EP, "10.244.1.0/24")]);
    (a, b, ka, kb)
}

fn a_to_b(seq: u16) -> Vec<u8> {
    ping([10, 244, 1, 5], [10, 244, 2, 5], seq)
}

fn b_to_a(seq: u16) -> Vec<u8> {
    ping([10, 244, 2, 5], [10, 244, 1, 5], seq)
}

/// The receiver index of a WireGuard data message (which session sealed it).
fn receiver_index(datagram: &[u8]) -> u32 {
    assert_eq!(datagram[0], 4, "a data message");
    u32::from_le_bytes(datagram[4..8].try_into().unwrap())
}

#[test]
fn handshake_then_data_both_ways() {
    let (a, b, _, _) = pair();
    let p = a_to_b(1);
    let out = a.seal(std::slice::from_ref(&p));
    assert_eq!(out.udp.len(), 1, "the initiation");
    assert_eq!(out.udp[0].1[0], 1, "handshake initiation message");
    let (_, at_b) = exchange(&a, &b, out.udp);
    assert_eq!(
        at_b,
        vec![p.clone()],
        "the packet that waited arrives whole"
    );
    let back = b_to_a(2);
    let out = b.seal(std::slice::from_ref(&back));
    assert_eq!(out.udp.len(), 1, "sealed at once: the session exists");
    let (_, at_a) = exchange(&b, &a, out.udp);
    assert_eq!(at_a, vec![back.clone()]);
    assert_eq!(a.tx(), (1, p.len() as u64));
    assert_eq!(b.tx(), (1, back.len() as u64));
    assert_eq!((a.rx_packets(), b.rx_packets()), (1, 1));
}

#[test]
fn packets_queued_before_the_handshake_are_sent_and_counted_after_it() {
    let (a, b, _, _) = pair();
    let packets: Vec<Vec<u8>> = (1..=3).map(a_to_b).collect();
    let out = a.seal(&packets);
    assert_eq!(out.udp.len(), 1, "one initiation for three packets");
    assert_eq!(a.tx(), (0, 0), "nothing sealed yet");
    let (_, at_b) = exchange(&a, &b, out.udp);
    assert_eq!(at_b, packets, "all three, in order");
    let bytes: usize = packets.iter().map(Vec::len).sum();
    assert_eq!(a.tx(), (3, bytes as u64));
    assert_eq!(b.rx_packets(), 3);
}

#[test]
fn a_rekey_keeps_traffic_flowing_and_in_flight_packets_decrypt() {
    let (a, b, _, _) = pair();
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    assert_eq!(at_b.len(), 1);
    let old = a.seal(&[a_to_b(2)]).udp;
    let old_index = receiver_index(&old[0].1);
    // A new handshake on the live session (what REKEY_AFTER_TIME does).
    a.dp.table().peers[0].lock().initiate = true;
    let init = a.tick();
    assert_eq!(init.udp.len(), 1);
    assert_eq!(init.udp[0].1[0], 1, "a handshake initiation");
    let (_, at_b) = exchange(&a, &b, init.udp);
    assert!(at_b.is_empty());
    // The packet sealed before the rekey, delivered after it, still opens.
    let out = b.open(a.at, &[old[0].1.clone()]);
    assert_eq!(out.tun, vec![a_to_b(2)], "sealed with the old session");
    // New packets use the new session.
    let new = a.seal(&[a_to_b(3)]).udp;
    assert_ne!(receiver_index(&new[0].1), old_index, "a new session");
    let out = b.open(a.at, &[new[0].1.clone()]);
    assert_eq!(out.tun, vec![a_to_b(3)]);
    assert_eq!(b.drops(Drop::DecryptFailed), 0);
}

#[test]
fn a_peer_replaced_mid_stream_takes_over_and_the_old_one_is_refused() {
    let (a, b, _, _) = pair();
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    assert_eq!(at_b.len(), 1);
    let stale = b.seal(&[b_to_a(2)]).udp;
    // Node b is reinstalled: a new key, same name and address.
    let kb2 = PrivateKey::generate();
    let b2 = Side::new(&kb2, B_EP);
    b2.peers(vec![PeerSpec {
        public_key: a.dp.public_key(),
        ..spec("a", &kb2, A_EP, "10.244.1.0/24")
    }]);
    let diff = a.dp.apply(&DesiredMesh {
        peers: vec![spec("b", &kb2, B_EP, "10.244.2.0/24")],
        blackhole_cidrs: vec![],
    });
    assert_eq!(diff.replaced, vec!["b".to_string()]);
    // The old incarnation's packet no longer opens: its session is gone.
    let out = a.open(b.at, &[stale[0].1.clone()]);
    assert!(out.tun.is_empty());
    assert_eq!(a.drops(Drop::DecryptFailed), 1);
    // Under a new key the far side is a new incarnation with no session of
    // this node's: no handshake until traffic asks for one...
    assert!(a.tick().udp.is_empty(), "no handshake without traffic");
    // ...and the first packet to it starts one.
    let (_, at_b2) = exchange(&a, &b2, a.seal(&[a_to_b(3)]).udp);
    assert_eq!(at_b2, vec![a_to_b(3)]);
    let (_, at_a) = exchange(&b2, &a, b2.seal(&[b_to_a(4)]).udp);
    assert_eq!(at_a, vec![b_to_a(4)]);
}

#[test]
fn a_key_rotation_keeps_the_session_and_retires_the_old_key() {
    let (a, b, ka, kb) = pair();
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    assert_eq!(at_b.len(), 1);
    let first = receiver_index(&a.seal(&[a_to_b(2)]).udp[0].1);
    // b starts rotating to kb2: it answers handshakes to both keys.
    let kb2 = PrivateKey::generate();
    b.dp.set_next_key(Some(&kb2));
    assert_eq!(
        b.dp.rotation_progress(),
        Some((vec![], vec!["a".to_string()]))
    );
    // a sees b's next key announced: the change is in place, the live
    // session carries on (no packet waits for a handshake)...
    let diff = a.dp.apply(&DesiredMesh {
        peers: vec![PeerSpec {
            rotated_from: Some(kb.public_key()),
            ..spec("b", &kb2, B_EP, "10.244.2.0/24")
        }],
        blackhole_cidrs: vec![],
    });
    assert_eq!(diff.updated, vec!["b".to_string()]);
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(3)]).udp);
    assert_eq!(at_b, vec![a_to_b(3)]);
    let (_, at_a) = exchange(&b, &a, b.seal(&[b_to_a(4)]).udp);
    assert_eq!(at_a, vec![b_to_a(4)]);
    // ...and a handshakes with the next key at its next tick; b answers
    // with it, so it knows a has it.
    let init = a.tick();
    assert_eq!(init.udp.len(), 1);
    let (_, at_b) = exchange(&a, &b, init.udp);
    assert!(at_b.is_empty());
    assert_eq!(
        b.dp.rotation_progress(),
        Some((vec!["a".to_string()], vec![]))
    );
    // The new session carries traffic both ways.
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(5)]).udp);
    assert_eq!(at_b, vec![a_to_b(5)]);
    let sealed = b.seal(&[b_to_a(6)]).udp;
    assert_ne!(receiver_index(&sealed[0].1), first, "a new session");
    let (_, at_a) = exchange(&b, &a, sealed);
    assert_eq!(at_a, vec![b_to_a(6)]);
    // b completes the rotation: its key is kb2, and b initiates with it.
    assert!(b.dp.commit_next_key());
    assert_eq!(b.dp.public_key(), kb2.public_key());
    assert_eq!(b.dp.next_public_key(), None);
    assert_eq!(b.drops(Drop::HandshakeRejected), 0);
    // A node that still has b's old key is refused, and counted as such.
    let kc = PrivateKey::generate();
    let c = Side::new(&kc, "192.0.2.3:51820");
    c.peers(vec![spec("b", &kb, B_EP, "10.244.2.0/24")]);
    b.peers(vec![
        spec("a", &ka, A_EP, "10.244.1.0/24"),
        spec("c", &kc, "192.0.2.3:51820", "10.244.3.0/24"),
    ]);
    let old = c.seal(&[ping([10, 244, 3, 5], [10, 244, 2, 5], 7)]).udp;
    assert_eq!(old[0].1[0], 1, "an initiation");
    let out = b.open(c.at, &[old[0].1.clone()]);
    assert!(out.udp.is_empty(), "no answer to the retired key");
    assert_eq!(b.drops(Drop::RetiredKey), 1);
    assert_eq!(b.drops(Drop::HandshakeRejected), 0);
}

#[test]
fn a_burst_reordered_by_thousands_passes_the_replay_window() {
    // 3000 datagrams delivered last first: each but the first is older than
    // the newest seen, by up to 2999. The window (8192, as the kernel's and
    // wireguard-go's; boringtun's own is 1024) takes them all.
    let (a, b, _, _) = pair();
    exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    let sealed: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| a.seal(&[a_to_b((i % 60000) as u16)]).udp[0].1.clone())
        .collect();
    let reversed: Vec<Vec<u8>> = sealed.iter().rev().cloned().collect();
    let mut delivered = 0;
    for chunk in reversed.chunks(100) {
        delivered += b.open(a.at, chunk).tun.len();
    }
    assert_eq!(delivered, 3000, "replay drops: {}", b.drops(Drop::Replay));
    assert_eq!(b.drops(Drop::Replay), 0);
    // Beyond the window: 9000 ahead, then the oldest of the burst again.
    let newest: Vec<Vec<u8>> = (0..9000u32)
        .map(|i| a.seal(&[a_to_b((i % 60000) as u16)]).udp[0].1.clone())
        .collect();
    let held = newest[0].clone();
    for chunk in newest[1..].chunks(100) {
        b.open(a.at, chunk);
    }
    assert!(b.open(a.at, &[held]).tun.is_empty());
    assert_eq!(b.drops(Drop::Replay), 1);
}

#[test]
fn replayed_and_garbage_datagrams_are_dropped_and_counted() {
    let (a, b, _, _) = pair();
    exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    let d = a.seal(&[a_to_b(2)]).udp;
    assert_eq!(b.open(a.at, &[d[0].1.clone()]).tun, vec![a_to_b(2)]);
    // The same datagram again: WireGuard's replay window refuses it.
    let again = b.open(a.at, &[d[0].1.clone()]);
    assert!(again.tun.is_empty() && again.udp.is_empty());
    assert_eq!(b.drops(Drop::Replay), 1);
    assert_eq!(b.drops(Drop::DecryptFailed), 0);
    // Garbage: not WireGuard at all, and a data message for no session.
    let before = b.drops(Drop::Malformed);
    let out = b.open(a.at, &[vec![0xff; 40]]);
    assert!(out.tun.is_empty() && out.udp.is_empty());
    assert_eq!(b.drops(Drop::Malformed), before + 1);
    let mut forged = vec![0u8; 48];
    forged[0] = 4;
    forged[4..8].copy_from_slice(&0x00ab_cd00u32.to_le_bytes());
    let out = b.open(a.at, &[forged]);
    assert!(out.tun.is_empty());
    assert_eq!(b.drops(Drop::DecryptFailed), 1);
    // The session still works.
    let d = a.seal(&[a_to_b(3)]).udp;
    assert_eq!(b.open(a.at, &[d[0].1.clone()]).tun, vec![a_to_b(3)]);
}

#[test]
fn a_packet_from_outside_the_peers_allowed_ips_is_dropped() {
    let (a, b, _, _) = pair();
    exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    // B seals a packet claiming a source A does not route to B.
    let spoofed = ping([10, 244, 9, 9], [10, 244, 1, 5], 4);
    let d = b.seal(&[spoofed]).udp;
    assert_eq!(d.len(), 1);
    let out = a.open(b.at, &[d[0].1.clone()]);
    assert!(out.tun.is_empty());
    assert_eq!(a.drops(Drop::SourceNotAllowed), 1);
}

/// A handover from `from` (node A, one peer B): its session exported, a
/// new engine with A's key builds its peer with `from`'s index and is
/// given it.
fn take_over(from: &Side, ka: &PrivateKey, kb: &PrivateKey) -> Side {
    let sessions = from.dp.export_sessions(1 << 16);
    assert_eq!(sessions.len(), 1);
    let indices: Vec<(String, u32)> = from
        .dp
        .table()
        .peers
        .iter()
        .map(|p| (p.name.clone(), p.index))
        .collect();
    let to = Side::new(ka, A_EP);
    to.dp.adopt_indices(&indices);
    to.peers(vec![spec("b", kb, B_EP, "10.244.2.0/24")]);
    assert_eq!(to.dp.install_sessions(sessions), 1);
    to
}

/// A handover, packet by packet: `a`'s sessions exported, a new engine
/// with `a`'s key builds its peers with `a`'s indices and is given them;
/// traffic goes on both ways with no handshake, and the counters have
/// moved past the margin (no nonce of `a`'s reused).
#[test]
fn a_handed_over_session_carries_on_without_a_handshake() {
    let (a, b, ka, kb) = pair();
    let (_, at_b) = exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    assert_eq!(at_b, vec![a_to_b(1)]);
    let (_, at_a) = exchange(&b, &a, b.seal(&[b_to_a(2)]).udp);
    assert_eq!(at_a, vec![b_to_a(2)]);
    let a2 = take_over(&a, &ka, &kb);
    // No handshake: the first packet each way is data on the old session.
    let out = a2.seal(&[a_to_b(3)]).udp;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1[0], 4, "a data message, not an initiation");
    let (_, at_b) = exchange(&a2, &b, out);
    assert_eq!(at_b, vec![a_to_b(3)]);
    let (_, at_a) = exchange(&b, &a2, b.seal(&[b_to_a(4)]).udp);
    assert_eq!(at_a, vec![b_to_a(4)]);
    assert!(a2.tick().udp.is_empty(), "no handshake at the tick either");
    assert_eq!(b.drops(Drop::Replay), 0);
}

/// A handover that fails after its Ack, on a router that was itself
/// handed its sessions and has not used one yet: the successor may have
/// sealed with that session (it is exported as it came), so resuming with
/// fresh sessions must drop it too. The first packet after is an
/// initiation, never data on the old key (whose counters the successor
/// used past the margin: the peer would refuse them as replays, and later
/// ones would reuse its nonces).
#[test]
fn a_fresh_start_drops_a_handed_over_session_never_used() {
    let (a, b, ka, kb) = pair();
    exchange(&a, &b, a.seal(&[a_to_b(1)]).udp);
    exchange(&b, &a, b.seal(&[b_to_a(2)]).udp);
    // a2 took over and has not sealed or opened anything since.
    let a2 = take_over(&a, &ka, &kb);
    // It hands over to a3, which seals with the session and dies.
    let a3 = take_over(&a2, &ka, &kb);
    let (_, at_b) = exchange(&a3, &b, a3.seal(&[a_to_b(3)]).udp);
    assert_eq!(at_b, vec![a_to_b(3)]);
    drop(a3);
    // a2 resumes afresh.
    assert_eq!(
        a2.dp.fresh_sessions(),
        1,
        "the unused handed-over session counts"
    );
    let out = a2.seal(&[a_to_b(4)]).udp;
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].1[0], 1,
        "a handshake initiation, not data on the old session"
    );
    // The handshake completes and the packet that waited for it arrives.
    let (_, at_b) = exchange(&a2, &b, out);
    assert_eq!(at_b, vec![a_to_b(4)]);
    let (_, at_a) = exchange(&b, &a2, b.seal(&[b_to_a(5)]).udp);
    assert_eq!(at_a, vec![b_to_a(5)]);
    assert_eq!(b.drops(Drop::Replay), 0);
}

/// One flow on two crypto workers a side: full batches sealed and opened
/// chunk by chunk on both threads arrive whole and in their order, with
/// no replay drop; a batch that also carries the flow's handshake and a
/// replay and a forged message in the middle keeps everything else in
/// place. The helpers did run chunks (polled with a deadline).
#[test]
fn one_flow_over_two_crypto_workers_arrives_whole_and_in_order() {
    let (a, b, _, _) = pair();
    assert!(a.dp.start_crypto_workers(2) && b.dp.start_crypto_workers(2));
    assert!(!a.dp.start_crypto_workers(3), "set once");
    // A batch from before the session: held for the handshake, then sent.
    // (Fewer than a batch: the keepalive that completes the handshake
    // goes with them.)
    let first: Vec<Vec<u8>> = (0..100).map(big_a_to_b).collect();
    let (_, at_b) = exchange(&a, &b, a.seal(&first).udp);
    assert_eq!(at_b, first, "the batch that waited for the handshake");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut round = 1u16;
    while a.dp.crypto_stats().helper_chunks == 0 || b.dp.crypto_stats().helper_chunks == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no helper ran a chunk: {:?} {:?}",
            a.dp.crypto_stats(),
            b.dp.crypto_stats()
        );
        let packets: Vec<Vec<u8>> = (0..BATCH as u16)
            .map(|i| big_a_to_b(round.wrapping_mul(BATCH as u16).wrapping_add(i)))
            .collect();
        let out = a.seal(&packets);
        assert_eq!(out.udp.len(), BATCH, "one datagram a packet");
        let counters: Vec<u64> = out.udp.iter().map(|(_, d)| counter(d)).collect();
        assert!(
            counters.windows(2).all(|w| w[1] == w[0] + 1),
            "send counters in the batch's order"
        );
        let got = b.open(
            a.at,
            &out.udp.into_iter().map(|(_, d)| d).collect::<Vec<_>>(),
        );
        assert_eq!(got.tun, packets, "round {round}: whole, in order");
        round += 1;
    }
    assert!(a.dp.crypto_stats().parallel_batches > 0);
    // A replay and a forgery in the middle of a batch: dropped and
    // counted, the rest delivered in order.
    let packets: Vec<Vec<u8>> = (0..64).map(big_a_to_b).collect();
    let mut datagrams: Vec<Vec<u8>> = a.seal(&packets).udp.into_iter().map(|(_, d)| d).collect();
    let replayed = datagrams[10].clone();
    let mut forged = datagrams[20].clone();
    forged[40] ^= 0xff;
    datagrams.insert(30, replayed);
    datagrams[20] = forged;
    let (replays, failed) = (b.drops(Drop::Replay), b.drops(Drop::DecryptFailed));
    let got = b.open(a.at, &datagrams);
    let mut want = packets.clone();
    want.remove(20);
    assert_eq!(got.tun, want);
    assert_eq!(b.drops(Drop::Replay), replays + 1);
    assert_eq!(b.drops(Drop::DecryptFailed), failed + 1);
}

/// A 1400-byte IPv4 packet of one flow, A's pod to B's, numbered.
fn big_a_to_b(seq: u16) -> Vec<u8> {
    let mut p = vec![0x5au8; 1400];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1400u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&[10, 244, 1, 5]);
    p[16..20].copy_from_slice(&[10, 244, 2, 5]);
    p[28..30].copy_from_slice(&seq.to_be_bytes());
    p
}

/// The send counter of a WireGuard data message.
fn counter(datagram: &[u8]) -> u64 {
    assert_eq!(datagram[0], 4, "a data message");
    u64::from_le_bytes(datagram[8..16].try_into().unwrap())
}
