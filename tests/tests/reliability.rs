//! Reliability in the lab on the real control plane: router restarts
//! (graceful and SIGKILL) measured with a continuous probe, an established
//! TCP connection across them, and the API server down for a minute. Each
//! prints what it measured. Root only; CI runs them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::{self, in_netns};
use tunmesh_lab::probe::{Probe, PERIOD};
use tunmesh_lab::require_root;

/// The longest silence the restart and outage tests accept, from the last
/// echo before the fault to the first one after it (docs/benchmarks.md states it).
/// Measured on this machine: 0.2-0.4 s for a restart.
const SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// Polls node `ns`'s /readyz (the ConfigMap's metrics address) until it
/// answers 200; returns when it did. On failure, the router's log says why.
fn wait_ready(ns: &str, log: &std::path::Path, what: &str) -> Instant {
    let addr: SocketAddr = "127.0.0.1:9475".parse().unwrap();
    let mut last = None;
    netns::wait_for(Duration::from_secs(30), || {
        let r = tunmesh_lab::checks::http_get(ns, addr, "/readyz");
        let ok = matches!(r, Ok((200, _)));
        last = Some(r);
        ok.then(Instant::now)
    })
    .unwrap_or_else(|| {
        panic!(
            "{what}: /readyz not 200 within 30 s (last answer {last:?}); the router's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: signalling a router this lab started.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Seconds between two instants, for printing.
fn secs(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64()
}

#[test]
fn router_restarts_keep_pods_addresses_and_connections() {
    if !require_root("router_restarts_keep_pods_addresses_and_connections") {
        return;
    }
    let mut lab = Lab::for_test(2, 1);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();

    // An established TCP connection, echoing, across both restarts.
    let listener = in_netns(&b.ns, || TcpListener::bind("0.0.0.0:0"))
        .unwrap()
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    });
    let dst = SocketAddr::new(b.ipv4.into(), port);
    let mut conn = in_netns(&a.ns, move || {
        TcpStream::connect_timeout(&dst, Duration::from_secs(5))
    })
    .unwrap()
    .unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut echo = |msg: &[u8]| {
        conn.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        conn.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    };
    echo(b"before any restart");

    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    probe.assert_flowing("before the restarts");
    let allocations = |lab: &Lab| {
        std::fs::read_to_string(
            lab.node("node-1")
                .unwrap()
                .state_dir
                .join("cni/tunmesh/allocations.json"),
        )
        .unwrap()
    };
    let before = allocations(&lab);
    let node1_ns = lab.node("node-1").unwrap().ns.clone();
    let node1_log = lab.node("node-1").unwrap().log.clone();

    for (how, kill) in [("graceful restart (SIGTERM)", false), ("SIGKILL", true)] {
        probe.assert_flowing(how);
        // The fault: the signal to node-1's router, then a restart at once
        // with its own command line, as kubelet would.
        let invocation = lab
            .router_invocation(0, &lab.state.router_args.clone())
            .unwrap();
        let signal = Instant::now();
        if kill {
            lab.kill_router(0).unwrap();
        } else {
            lab.stop_router(0).unwrap();
        }
        let gone = Instant::now();
        lab.spawn_router(0, &invocation).unwrap();
        let started = Instant::now();
        let ready = wait_ready(&node1_ns, &node1_log, how);
        let first = probe.wait_echo_after(started, how);
        let last = probe
            .last_before(signal)
            .expect("an echo before the signal (the probe was flowing)");
        let silence = probe
            .silence(signal, first)
            .expect("echoes before the signal");
        eprintln!(
            "{how}: pod-to-pod silence {:.2} s (last echo before the signal -> first after); \
             signal -> old router gone {:.2} s; new router started -> first echo {:.2} s, -> /readyz {:.2} s; \
             signal -> first echo {:.2} s",
            silence.as_secs_f64(),
            secs(signal, gone),
            secs(started, first),
            secs(started, ready),
            secs(signal, first),
        );
        assert!(
            signal - last < PERIOD * 10,
            "{how}: the probe was not flowing when the signal came ({:?} since the last echo)",
            signal - last
        );
        assert!(
            silence < SILENCE_LIMIT,
            "{how}: pod-to-pod traffic was silent for {silence:?} (limit {SILENCE_LIMIT:?})"
        );
        lab.wait_router(0).unwrap();
        lab.wait_node_ready(0).unwrap();
        echo(how.as_bytes());
        assert_eq!(allocations(&lab), before, "{how}: pod addresses changed");
        let addrs = netns::exec(&a.ns, "ip", &["addr", "show", "eth0"]).unwrap();
        assert!(addrs.contains(&format!("{}/32", a.ipv4)), "{how}: {addrs}");
    }

    // The API server down for 60 s: traffic does not notice, not even a
    // router killed and restarted meanwhile (warm start from its cache),
    // and a change made meanwhile (a new Node) converges when it is back.
    probe.assert_flowing("before the API server outage");
    // (The invocation reads the ConfigMap: before the outage.)
    let invocation = lab
        .router_invocation(0, &lab.state.router_args.clone())
        .unwrap();
    lab.control_plane_mut().unwrap().stop_apiserver();
    let down = Instant::now();
    let mut warm_restarted = false;
    while down.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        if !warm_restarted && down.elapsed() > Duration::from_secs(10) {
            warm_restarted = true;
            let how = "SIGKILL with the API server down (warm start)";
            probe.assert_flowing(how);
            let signal = Instant::now();
            lab.kill_router(0).unwrap();
            lab.spawn_router(0, &invocation).unwrap();
            let started = Instant::now();
            let first = probe.wait_echo_after(started, how);
            let silence = probe
                .silence(signal, first)
                .expect("echoes before the kill");
            eprintln!(
                "{how}: new router started -> first echo {:.3} s; pod-to-pod silence {:.3} s \
                 (last echo before the kill -> first after)",
                secs(started, first),
                silence.as_secs_f64()
            );
            let st = lab
                .wait_status("node-1", Duration::from_secs(10), |_| true)
                .expect("the restarted router writes its status");
            assert_eq!(st.start.kind, "warm", "{how}: {:?}", st.start);
            assert_eq!(st.start.peers, 1, "{how}: {:?}", st.start);
        }
        let silence = probe
            .silence(down, Instant::now())
            .expect("echoes before the outage");
        assert!(
            silence < SILENCE_LIMIT,
            "traffic stalled with the API server down: silent for {silence:?}"
        );
    }
    let silence = probe.silence(down, Instant::now()).unwrap();
    eprintln!(
        "API server down 60 s: longest pod-to-pod silence {:.2} s ({} echoes meanwhile)",
        silence.as_secs_f64(),
        probe.echoes().iter().filter(|e| **e > down).count()
    );
    assert!(warm_restarted, "the outage ended before the warm restart");
    echo(b"after the outage");
    lab.control_plane_mut().unwrap().start_apiserver().unwrap();
    let t0 = Instant::now();
    lab.add_node(1).expect("a node joins after the outage");
    let joined = t0.elapsed();
    let converged = netns::wait_for(Duration::from_secs(60), || {
        ["node-1", "node-2"]
            .iter()
            .all(|n| {
                lab.router_status(n)
                    .is_ok_and(|s| s.peers.iter().any(|p| p.name == "node-3"))
            })
            .then_some(())
    });
    assert!(
        converged.is_some(),
        "node-3 not picked up after the API server returned"
    );
    eprintln!(
        "after the outage: node-3 registered, given a podCIDR by kube-controller-manager and its router up {:.1} s after the API server was back; in every peer table after {:.1} s",
        joined.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );

    // A corrupt cache is reported, ignored, and the API's mesh used.
    let cache = lab
        .node("node-1")
        .unwrap()
        .state_dir
        .join(tunmesh_router::warm::CACHE_FILE);
    let text = std::fs::read_to_string(&cache).expect("node-1 keeps a warm-start cache");
    std::fs::write(&cache, text.replacen("/24", "/33", 1)).unwrap();
    lab.stop_router(0).unwrap();
    lab.spawn_router(0, &invocation).unwrap();
    let st = lab
        .wait_status("node-1", Duration::from_secs(10), |_| true)
        .expect("the restarted router writes its status");
    assert_eq!(st.start.kind, "cold: cache refused", "{:?}", st.start);
    let problem = st.start.problem.unwrap_or_default();
    assert!(
        problem.contains("mesh-cache.json is corrupt") && problem.contains("/33"),
        "{problem}"
    );
    probe.wait_echo_after(Instant::now(), "after a corrupt cache");
    echo(b"after a corrupt cache");

    // A router started while the old one still holds the port (stopped
    // here, as if dying) waits for it instead of failing: it asks the old
    // one to hand over (no answer: it is stopped), or waits for the port.
    let old = lab.state.nodes[0].router_pid.take().unwrap();
    signal(old, libc::SIGSTOP);
    let log = lab.node("node-1").unwrap().log.clone();
    let waits = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("still held") || l.contains("asking it to hand over"))
            .count()
    };
    let before = waits();
    lab.spawn_router(0, &invocation).unwrap();
    let new = lab.state.nodes[0].router_pid.unwrap();
    let waiting = netns::wait_for(Duration::from_secs(5), || (waits() > before).then_some(()));
    signal(old, libc::SIGKILL);
    assert!(
        waiting.is_some(),
        "the new router did not say it waits for the old one; its log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(netns::wait_exit(old, Duration::from_secs(5)).is_some());
    let ready = wait_ready(&node1_ns, &log, "after a dying predecessor");
    assert!(!netns::exited(new), "the new router exited");
    probe.wait_echo_after(ready, "after a dying predecessor");
    echo(b"after a dying predecessor");
    probe.stop();
    lab.down().unwrap();
}

#[test]
fn a_node_reinstalled_under_the_same_name_heals_the_mesh() {
    if !require_root("a_node_reinstalled_under_the_same_name_heals_the_mesh") {
        return;
    }
    let mut lab = Lab::for_test(3, 1);
    let old_key = lab.node("node-2").unwrap().public_key.clone();
    let t0 = Instant::now();
    lab.recreate_node(1).expect("node-2 reinstalled");
    let new_key = lab.node("node-2").unwrap().public_key.clone();
    assert_ne!(old_key, new_key, "a reinstalled node has a new key");
    let healed = netns::wait_for(Duration::from_secs(30), || {
        let results = tunmesh_lab::checks::matrix(&lab);
        results.iter().all(|r| r.ok()).then_some(())
    });
    assert!(
        healed.is_some(),
        "the mesh did not heal after node-2 was reinstalled"
    );
    eprintln!(
        "node-2 reinstalled (namespace, key and state new, same Node): every pair reachable again {:.1} s after teardown began",
        t0.elapsed().as_secs_f64()
    );
    // status.json is rewritten every second: poll it.
    for n in ["node-1", "node-3"] {
        let replaced = lab.wait_status(n, Duration::from_secs(10), |s| {
            let keys: Vec<&str> = s.peers.iter().map(|p| p.public_key.as_str()).collect();
            keys.contains(&new_key.as_str())
                && !keys.contains(&old_key.as_str())
                && s.peers.len() == 2
        });
        assert!(
            replaced.is_some(),
            "{n}: the old key stays or the new one is missing: {:?}",
            lab.router_status(n).map(|s| s
                .peers
                .into_iter()
                .map(|p| (p.name, p.public_key))
                .collect::<Vec<_>>())
        );
    }
    lab.down().unwrap();
}
