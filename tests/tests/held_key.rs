//! A key change nobody announced (issue 26, item 4), against the real
//! control plane in the lab: a Node's `tunmesh.io/public-key` overwritten
//! by a writer that got past the admission policy (here the lab's admin)
//! is held back by every other router, which goes on with the key it had
//! and says so in `tunmesh-ctl status`, a metric and an Event; an
//! operator's `tunmesh-ctl accept-key` takes it; a reinstalled node (new
//! key, same Node object) gets in by itself, announcing its key first.
//! Root only; CI runs it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tunmesh_lab::checks::ping;
use tunmesh_lab::lab::{find_binary, Lab};
use tunmesh_lab::netns;
use tunmesh_lab::probe::Probe;
use tunmesh_lab::require_root;
use tunmesh_router::status::Status;
use tunmesh_router::PrivateKey;

fn ctl_bin() -> PathBuf {
    find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN").expect("tunmesh-ctl built")
}

/// `tunmesh-ctl ARGS` in namespace `ns`: success and what it printed.
fn ctl(ns: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(ctl_bin())
        .args(args)
        .output()
        .expect("running tunmesh-ctl");
    netns::said(&out)
}

fn annotation(lab: &Lab, node: &str, key: &str) -> String {
    lab.annotation(node, key).unwrap()
}

fn wg_peers(lab: &Lab, node: &str) -> String {
    lab.wg_peers(node).expect("wg show")
}

fn events(lab: &Lab, node: &str, reason: &str) -> Vec<String> {
    lab.node_events(node, reason).unwrap_or_default()
}

fn metrics(ns: &str) -> String {
    tunmesh_lab::checks::http_get(ns, "127.0.0.1:9475".parse().unwrap(), "/metrics")
        .expect("metrics")
        .1
}

fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn key_file(lab: &Lab, node: &str) -> PathBuf {
    lab.node(node).unwrap().state_dir.join("private.key")
}

fn held(s: &Status) -> Vec<(String, String, String)> {
    s.kubernetes
        .iter()
        .flat_map(|k| &k.held_keys)
        .map(|h| (h.node.clone(), h.using.clone(), h.shown.clone()))
        .collect()
}

fn holds(s: &Status) -> u64 {
    s.kubernetes.as_ref().map_or(0, |k| k.key_holds)
}

/// Pods on `a` and `b` reach each other (both ways) within `secs`.
fn pods_talk(lab: &Lab, a: &str, b: &str, secs: u32) -> bool {
    let (pa, pb) = (
        lab.pod(&format!("{a}-pod-1")).unwrap().clone(),
        lab.pod(&format!("{b}-pod-1")).unwrap().clone(),
    );
    ping(&pa.ns, pb.ipv4.into(), secs) && ping(&pb.ns, pa.ipv4.into(), secs)
}

#[test]
fn an_unannounced_key_change_is_held_until_an_operator_accepts_it() {
    if !require_root("an_unannounced_key_change_is_held_until_an_operator_accepts_it") {
        return;
    }
    let mut lab = Lab::for_test(3, 1);
    let admin = lab.control_plane().unwrap().admin_kubeconfig();
    let admin = admin.to_string_lossy().to_string();
    let cp_ns = lab.control_plane().unwrap().ns.clone();
    let n1 = lab.node("node-1").unwrap().clone();
    let k2 = PrivateKey::read_file(&key_file(&lab, "node-2"))
        .unwrap()
        .public_key()
        .to_base64();
    assert!(pods_talk(&lab, "node-1", "node-2", 10), "before");

    // 1. Overwritten while node-2's router runs: the peers hold it back,
    // node-2's router sets its key again (announcing it first), and the
    // traffic between node-1 and node-2 never moves: a numbered probe
    // loses nothing.
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    probe.wait_echo_after(Instant::now(), "before the overwrite");
    let forged = PrivateKey::generate().public_key().to_base64();
    let t0 = Instant::now();
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "node-2",
        &format!("tunmesh.io/public-key={forged}"),
    ])
    .unwrap();
    let restored = netns::wait_for(Duration::from_secs(20), || {
        (annotation(&lab, "node-2", "tunmesh.io/public-key") == k2).then_some(t0.elapsed())
    });
    let restored = restored.expect("node-2's router never set its key back");
    let counted = lab.wait_status("node-1", Duration::from_secs(20), |s| holds(s) >= 1);
    assert!(
        counted.is_some(),
        "node-1 never counted a held key change: {:?}",
        lab.router_status("node-1").ok().and_then(|s| s.kubernetes)
    );
    let cleared = lab.wait_status("node-1", Duration::from_secs(20), |s| held(s).is_empty());
    assert!(cleared.is_some(), "node-1 still holds a key change");
    probe.wait_echo_after(Instant::now(), "after the overwrite");
    let lost = probe.lost(t0, Instant::now() - Duration::from_millis(500));
    probe.stop();
    assert!(
        lost.is_empty(),
        "probes lost around the overwrite: {lost:?}"
    );
    assert!(!wg_peers(&lab, "node-1").contains(&forged));
    eprintln!(
        "step 1: overwritten while its router runs: node-1 held it, node-2's router set its key \
         back (seen on the Node {:.2} s after the overwrite), 0 probes lost",
        restored.as_secs_f64()
    );

    // 2. A key replaced by hand while node-2's router is down (its key file
    // and its Node, without an announcement): held by every peer, which
    // keeps the old key; status line, metric and Event say so.
    lab.stop_router(1).unwrap();
    let new = PrivateKey::generate();
    new.write_file(&key_file(&lab, "node-2")).unwrap();
    let newk = new.public_key().to_base64();
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "node-2",
        &format!("tunmesh.io/public-key={newk}"),
    ])
    .unwrap();
    let want = ("node-2".to_string(), k2.clone(), newk.clone());
    for n in ["node-1", "node-3"] {
        let s = lab.wait_status(n, Duration::from_secs(20), |s| {
            held(s) == vec![want.clone()]
        });
        assert!(
            s.is_some(),
            "{n} does not hold node-2's change: {:?}",
            lab.router_status(n).ok().and_then(|s| s.kubernetes)
        );
        let peers = wg_peers(&lab, n);
        assert!(
            peers.contains(&k2) && !peers.contains(&newk),
            "{n}: {peers}"
        );
    }
    lab.start_router(1).unwrap();
    lab.wait_router(1).unwrap();
    let (ok, status) = ctl(
        &n1.ns,
        &["--state-dir", &n1.state_dir.to_string_lossy(), "status"],
    );
    assert!(ok, "{status}");
    let line = status
        .lines()
        .find(|l| l.contains("held key:"))
        .unwrap_or_else(|| panic!("no held key line:\n{status}"));
    assert!(
        line.contains("node-2") && line.contains(&newk) && line.contains("accept-key"),
        "{line}"
    );
    let m = metrics(&n1.ns);
    assert_eq!(metric(&m, "tunmesh_kubernetes_held_keys"), Some(1), "{m}");
    assert!(
        metric(&m, "tunmesh_kubernetes_key_holds_total").unwrap_or(0) >= 2,
        "{m}"
    );
    let ev = netns::wait_for(Duration::from_secs(20), || {
        let e = events(&lab, "node-2", "UnannouncedKeyChange");
        e.iter().any(|m| m.contains(&newk)).then_some(e)
    });
    assert!(
        ev.is_some(),
        "no UnannouncedKeyChange Event naming {newk}: {:?}",
        events(&lab, "node-2", "UnannouncedKeyChange")
    );
    eprintln!("step 2: replaced by hand: held on node-1 and node-3, {line}");

    // 3. The operator accepts it, with the key checked: every peer takes
    // it and node-2 is reachable again.
    let (ok, out) = ctl(
        &cp_ns,
        &[
            "accept-key",
            "node-2",
            "--key",
            &forged,
            "--kubeconfig",
            &admin,
        ],
    );
    assert!(
        !ok && out.contains("not"),
        "a wrong --key was accepted: {out}"
    );
    let (ok, out) = ctl(
        &cp_ns,
        &[
            "accept-key",
            "node-2",
            "--key",
            &newk,
            "--kubeconfig",
            &admin,
        ],
    );
    assert!(ok, "{out}");
    for n in ["node-1", "node-3"] {
        let s = lab.wait_status(n, Duration::from_secs(20), |s| held(s).is_empty());
        assert!(s.is_some(), "{n} still holds node-2's key after accept-key");
        assert!(
            pods_talk(&lab, n, "node-2", 10),
            "{n} <-> node-2 after accept-key"
        );
    }
    eprintln!("step 3: {}", out.trim());

    // 4. Reinstalled: node-2's state is gone and its router makes a new key
    // on the same Node object. It announces it before making it current,
    // so no peer holds it back.
    let before = holds(&lab.router_status("node-1").unwrap());
    lab.stop_router(1).unwrap();
    std::fs::remove_file(key_file(&lab, "node-2")).unwrap();
    lab.start_router(1).unwrap();
    lab.wait_router(1).unwrap();
    let k_re = PrivateKey::read_file(&key_file(&lab, "node-2"))
        .unwrap()
        .public_key()
        .to_base64();
    assert_ne!(k_re, newk);
    let current = netns::wait_for(Duration::from_secs(30), || {
        (annotation(&lab, "node-2", "tunmesh.io/public-key") == k_re
            && annotation(&lab, "node-2", "tunmesh.io/next-public-key").is_empty())
        .then_some(())
    });
    assert!(current.is_some(), "node-2 never showed its new key alone");
    for n in ["node-1", "node-3"] {
        assert!(
            pods_talk(&lab, n, "node-2", 10),
            "{n} <-> node-2 after the reinstall"
        );
        let s = lab.router_status(n).unwrap();
        assert!(held(&s).is_empty(), "{n}: {:?}", held(&s));
    }
    assert_eq!(holds(&lab.router_status("node-1").unwrap()), before);
    eprintln!("step 4: reinstalled with a new key: announced first, no peer held it");
}
