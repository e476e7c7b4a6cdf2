//! Key rotation (issue 18) against the real control plane in the lab:
//! `tunmesh-ctl rotate-key` under a numbered 10 ms probe and iperf3, then
//! a rotation that a peer never sees (its router down), and a router
//! killed at each step of a rotation. Root only; CI runs it.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use tunmesh_lab::checks::ping;
use tunmesh_lab::lab::{find_binary, Lab};
use tunmesh_lab::netns::{self, in_netns};
use tunmesh_lab::probe::Probe;
use tunmesh_lab::require_root;
use tunmesh_router::rotation::next_key_file;
use tunmesh_router::status::Status;
use tunmesh_router::{PrivateKey, PublicKey};

const IPERF_SECONDS: u32 = 10;

fn ctl(state_dir: &Path, args: &[&str]) -> (bool, String) {
    let bin = find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN").expect("tunmesh-ctl built");
    let out = std::process::Command::new(bin)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .output()
        .expect("running tunmesh-ctl");
    netns::said(&out)
}

fn wg_peers(lab: &Lab, node: &str) -> String {
    lab.wg_peers(node).expect("wg show")
}

fn annotation(lab: &Lab, node: &str, key: &str) -> String {
    lab.annotation(node, key).unwrap()
}

fn key_file(lab: &Lab, node: &str) -> PathBuf {
    lab.node(node).unwrap().state_dir.join("private.key")
}

fn file_key(path: &Path) -> PublicKey {
    PrivateKey::read_file(path).expect("key file").public_key()
}

/// Starts node `i`'s router with `args` and waits for its first status.
fn start(lab: &mut Lab, i: usize, args: &[String]) {
    lab.start_router_with(i, args).unwrap();
    lab.wait_router(i).unwrap();
}

/// Pods on `a` and `b` reach each other (both ways) within `secs`.
fn pods_talk(lab: &Lab, a: &str, b: &str, secs: u32) -> bool {
    let (pa, pb) = (
        lab.pod(&format!("{a}-pod-1")).unwrap().clone(),
        lab.pod(&format!("{b}-pod-1")).unwrap().clone(),
    );
    ping(&pa.ns, pb.ipv4.into(), secs) && ping(&pb.ns, pa.ipv4.into(), secs)
}

fn assert_mesh_whole(lab: &Lab, what: &str) {
    for (a, b) in [
        ("node-1", "node-2"),
        ("node-2", "node-3"),
        ("node-1", "node-3"),
    ] {
        assert!(pods_talk(lab, a, b, 30), "{what}: {a} <-> {b}");
    }
}

/// Waits until node `node` has `key` as its own and no rotation under way.
fn wait_key(lab: &Lab, node: &str, key: &PublicKey, secs: u64, what: &str) -> Status {
    lab.wait_status(node, Duration::from_secs(secs), |s| {
        s.public_key == key.to_base64() && s.key.rotation.is_none()
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: {node} never got to key {key}; its key status: {:#?}",
            lab.router_status(node).map(|s| s.key)
        )
    })
}

/// A handshake initiation addressed to `to`, from a key nobody knows,
/// sent from namespace `ns` to `at`.
fn initiate_to(ns: &str, to: &PublicKey, at: SocketAddr) {
    let mut t = Tunn::new(
        boringtun::x25519::StaticSecret::from(*PrivateKey::generate().as_bytes()),
        boringtun::x25519::PublicKey::from(*to.as_bytes()),
        None,
        None,
        7,
        None,
    );
    let mut buf = [0u8; 256];
    let TunnResult::WriteToNetwork(init) = t.format_handshake_initiation(&mut buf, false) else {
        panic!("no initiation");
    };
    let init = init.to_vec();
    in_netns(ns, move || {
        UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.send_to(&init, at))
            .expect("sending the initiation")
    })
    .unwrap();
}

#[test]
fn a_key_rotates_under_load_without_losing_a_packet() {
    if !require_root("a_key_rotates_under_load_without_losing_a_packet") {
        return;
    }
    let lab = Lab::for_test(3, 1);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let c = lab.pod("node-3-pod-1").unwrap().clone();
    let node2 = lab.node("node-2").unwrap().clone();
    let old = file_key(&key_file(&lab, "node-2"));
    assert_eq!(
        lab.router_status("node-2").unwrap().public_key,
        old.to_base64()
    );

    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    let probe_c = Probe::start(&c.ns, &b.ns, b.ipv4);
    probe.wait_echo_after(Instant::now(), "before the rotation");
    probe_c.wait_echo_after(Instant::now(), "before the rotation (node-3)");
    let iperf =
        tunmesh_lab::checks::iperf3_in_background(&a.ns, &b.ns, b.ipv4.into(), IPERF_SECONDS);
    std::thread::sleep(Duration::from_secs(2));

    let t0 = Instant::now();
    let (ok, out) = ctl(&node2.state_dir, &["rotate-key", "--wait", "60"]);
    let took = t0.elapsed();
    assert!(ok, "tunmesh-ctl rotate-key:\n{out}");
    let new = file_key(&key_file(&lab, "node-2"));
    assert_ne!(new, old, "the key file holds a new key");
    assert!(out.contains(&new.to_base64()), "{out}");
    assert!(!next_key_file(&key_file(&lab, "node-2")).exists());
    let s = wait_key(&lab, "node-2", &new, 10, "after rotate-key");
    let last = s.key.last_rotation.clone().expect("last rotation");
    assert!(last.peers_not_seen.is_empty(), "{last:?}");
    let iperf = iperf.join().unwrap().expect("iperf3 across the rotation");
    let t1 = Instant::now();
    let lost = probe.lost(t0 - Duration::from_secs(1), t1);
    let lost_c = probe_c.lost(t0 - Duration::from_secs(1), t1);
    let silence = probe.silence(t0, t1).unwrap();
    eprintln!(
        "rotation: {} s to complete; probes lost node-1->node-2 {}, node-3->node-2 {}; \
         longest silence {:.3} s; iperf3 {:.2} Gbit/s, {} retransmits",
        took.as_secs_f64(),
        lost.len(),
        lost_c.len(),
        silence.as_secs_f64(),
        iperf.gbps,
        iperf.retr_or_loss
    );
    assert!(lost.is_empty(), "probes lost across the rotation: {lost:?}");
    assert!(lost_c.is_empty(), "node-3's probes lost: {lost_c:?}");
    assert!(iperf.received_bytes > 0);
    probe.stop();
    probe_c.stop();

    // Every peer shows the new key, none the old one; so does the Node.
    for n in ["node-1", "node-3"] {
        let peers = wg_peers(&lab, n);
        assert!(
            peers.contains(&new.to_base64()),
            "{n}: wg show peers:\n{peers}"
        );
        assert!(
            !peers.contains(&old.to_base64()),
            "{n}: wg show peers:\n{peers}"
        );
    }
    assert_eq!(
        annotation(&lab, "node-2", "tunmesh.io/public-key"),
        new.to_base64()
    );
    assert_eq!(annotation(&lab, "node-2", "tunmesh.io/next-public-key"), "");

    // A handshake with the old key is refused, and counted as such.
    let retired = |s: &Status| s.counters.drops.get("retired_key").copied().unwrap_or(0);
    let before = retired(&lab.fresh_status("node-2").unwrap());
    let node1 = lab.node("node-1").unwrap().clone();
    let at = SocketAddr::new(IpAddr::V4(node2.underlay_ip), 51820);
    initiate_to(&node1.ns, &old, at);
    let counted = lab.wait_status("node-2", Duration::from_secs(5), |s| retired(s) > before);
    assert!(
        counted.is_some(),
        "the old key's handshake was not counted as retired_key"
    );
    let ctl_status = ctl(&node2.state_dir, &["status"]).1;
    assert!(ctl_status.contains("last rotation took"), "{ctl_status}");

    // The key's age: node-2's own, and node-2's as its peers know it (from
    // the Node), in status and metrics.
    let s2 = lab.fresh_status("node-2").unwrap();
    assert!(
        s2.key.key_age_seconds.is_some_and(|a| a < 120),
        "{:?}",
        s2.key
    );
    let peer_age = lab.wait_status("node-1", Duration::from_secs(30), |s| {
        s.peers
            .iter()
            .any(|p| p.name == "node-2" && p.key_age_seconds.is_some_and(|a| a < 120))
    });
    assert!(
        peer_age.is_some(),
        "node-1 never showed node-2's new key's age"
    );
    let metrics = |ns: &str| {
        tunmesh_lab::checks::http_get(ns, "127.0.0.1:9475".parse().unwrap(), "/metrics")
            .expect("metrics")
            .1
    };
    let m2 = metrics(&node2.ns);
    assert!(m2.contains("tunmesh_key_rotations_total 1"), "{m2}");
    assert!(
        m2.contains("tunmesh_drops_total{reason=\"retired_key\"}"),
        "{m2}"
    );
    let m1 = metrics(&node1.ns);
    let line = m1
        .lines()
        .find(|l| l.starts_with("tunmesh_peer_key_age_seconds{peer=\"node-2\"}"))
        .unwrap_or_else(|| panic!("no key age for node-2 in node-1's metrics:\n{m1}"));
    let age: i64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((0..120).contains(&age), "{line}");
    assert_mesh_whole(&lab, "after the rotation");
    lab.down().unwrap();
}

#[test]
fn a_rotation_heals_a_peer_that_was_down_and_survives_a_kill_at_each_step() {
    if !require_root("a_rotation_heals_a_peer_that_was_down_and_survives_a_kill_at_each_step") {
        return;
    }
    let mut lab = Lab::for_test(3, 1);
    let node2 = lab.node("node-2").unwrap().clone();
    let kf = key_file(&lab, "node-2");
    let next = next_key_file(&kf);
    let base = lab.state.router_args.clone();
    let grace = |secs: u32| {
        let mut a = base.clone();
        a.extend(["--key-rotation-grace".to_string(), format!("{secs}s")]);
        a
    };

    // 1. node-3's router is down for a whole rotation of node-2's key: the
    // rotation completes after the grace window, and node-3 learns the new
    // key from the Node when it comes back.
    let short = grace(5);
    lab.stop_router(1).unwrap();
    start(&mut lab, 1, &short);
    lab.stop_router(2).unwrap();
    let k1 = file_key(&kf);
    let (ok, out) = ctl(&node2.state_dir, &["rotate-key", "--wait", "60"]);
    assert!(ok, "{out}");
    let k2 = file_key(&kf);
    assert_ne!(k1, k2);
    let s = wait_key(&lab, "node-2", &k2, 10, "peer down");
    assert_eq!(
        s.key.last_rotation.unwrap().peers_not_seen,
        vec!["node-3".to_string()]
    );
    assert!(
        pods_talk(&lab, "node-1", "node-2", 10),
        "node-1 <-> node-2 after the rotation"
    );
    start(&mut lab, 2, &base);
    assert_mesh_whole(&lab, "node-3 back after a rotation it never saw");
    eprintln!("step 1: a rotation node-3 never saw healed when it came back");

    // 2. Killed right after the next key was written (before the router
    // read it): the next start picks the rotation up and completes it.
    lab.kill_router(1).unwrap();
    let k3 = PrivateKey::generate();
    k3.write_file(&next).unwrap();
    start(&mut lab, 1, &short);
    wait_key(
        &lab,
        "node-2",
        &k3.public_key(),
        60,
        "killed after the next key was written",
    );
    assert_mesh_whole(&lab, "killed after the next key was written");
    eprintln!("step 2: killed before the router read the next key: completed after the restart");

    // 3. Killed inside the grace window, with node-1 on the next key and
    // node-3 not yet (its router down): the restarted router holds both
    // keys, reaches node-1 (which has only the next key now) and node-3
    // (only the current one) once it is back, and completes.
    let long = grace(300);
    lab.stop_router(1).unwrap();
    start(&mut lab, 1, &long);
    lab.stop_router(2).unwrap();
    let (ok, out) = ctl(&node2.state_dir, &["rotate-key", "--wait", "0"]);
    assert!(ok, "{out}");
    let k4 = PrivateKey::read_file(&next).unwrap().public_key();
    let mid = lab.wait_status("node-2", Duration::from_secs(30), |s| {
        s.key
            .rotation
            .as_ref()
            .is_some_and(|r| r.peers_done == ["node-1"] && r.announced)
    });
    assert!(
        mid.is_some(),
        "node-1 never moved to the next key: {:#?}",
        lab.router_status("node-2").map(|s| s.key)
    );
    let killed = Instant::now();
    lab.kill_router(1).unwrap();
    start(&mut lab, 1, &long);
    let up = Instant::now();
    // Within 10 s: the restarted router's initiation to node-1 with the
    // current key goes unanswered, and is tried with the next key after
    // 4 s (without that, node-1 would only initiate itself after 15 s
    // without replies). Pings go every 0.2 s.
    assert!(
        pods_talk(&lab, "node-1", "node-2", 10),
        "killed in the window: node-1 <-> node-2"
    );
    eprintln!(
        "step 3: killed in the window: pings node-1 <-> node-2 answered {:.1} s after the kill, \
         {:.1} s after the new router was up",
        killed.elapsed().as_secs_f64(),
        up.elapsed().as_secs_f64()
    );
    start(&mut lab, 2, &base);
    wait_key(&lab, "node-2", &k4, 60, "killed in the window, node-3 back");
    assert_mesh_whole(&lab, "killed in the window");

    // 4. Killed after the next key replaced the key file but before the
    // Node said so: the Node still names the old key as current and the
    // next one as next. The restarted router sets it right.
    lab.kill_router(1).unwrap();
    let k5 = PrivateKey::generate();
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "node-2",
        &format!("tunmesh.io/next-public-key={}", k5.public_key()),
    ])
    .unwrap();
    k5.write_file(&kf).unwrap();
    start(&mut lab, 1, &short);
    wait_key(
        &lab,
        "node-2",
        &k5.public_key(),
        30,
        "killed after the key file was replaced",
    );
    assert_mesh_whole(&lab, "killed after the key file was replaced");
    let settled = netns::wait_for(Duration::from_secs(30), || {
        (annotation(&lab, "node-2", "tunmesh.io/public-key") == k5.public_key().to_base64()
            && annotation(&lab, "node-2", "tunmesh.io/next-public-key").is_empty())
        .then_some(())
    });
    assert!(
        settled.is_some(),
        "node-2's annotations never named the new key alone"
    );
    eprintln!("step 4: killed after the key file was replaced: the Node set right, mesh whole");

    // 5. Periodic rotation: a key older than --key-rotation is rotated by
    // the router itself.
    lab.stop_router(1).unwrap();
    let two_hours_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&kf)
        .and_then(|f| f.set_modified(two_hours_ago))
        .unwrap();
    let mut periodic = grace(30);
    periodic.extend(["--key-rotation".to_string(), "1h".to_string()]);
    start(&mut lab, 1, &periodic);
    let rotated = lab.wait_status("node-2", Duration::from_secs(60), |s| {
        s.key.rotations == 1 && s.key.rotation.is_none()
    });
    let rotated = rotated.unwrap_or_else(|| {
        panic!(
            "no periodic rotation: {:#?}",
            lab.router_status("node-2").map(|s| s.key)
        )
    });
    assert_ne!(rotated.public_key, k5.public_key().to_base64());
    assert_eq!(rotated.key.rotation_period_seconds, Some(3600));
    assert!(rotated.key.key_age_seconds.is_some_and(|a| a < 120));
    assert_mesh_whole(&lab, "after a periodic rotation");
    eprintln!("step 5: a key older than the rotation period was rotated by the router");

    // A next key file that is not a key: a clear problem, nothing lost.
    std::fs::write(&next, "not a key\n").unwrap();
    let s = lab.wait_status("node-2", Duration::from_secs(10), |s| {
        s.key.problem.is_some()
    });
    let problem = s.and_then(|s| s.key.problem).expect("a problem reported");
    assert!(problem.contains("private.key.next"), "{problem}");
    assert!(pods_talk(&lab, "node-1", "node-2", 10));
    lab.down().unwrap();
}
