//! Reliability in the lab on the real control plane: router restarts
//! (graceful and SIGKILL) measured with a continuous probe, an established
//! TCP connection across them, and the API server down for a minute. Each
//! prints what it measured. Root only; CI runs them.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::{self, in_netns};
use tunmesh_lab::require_root;

/// The longest silence the restart and outage tests accept, from the last
/// echo before the fault to the first one after it (the README states it).
/// Measured on this machine: 0.2-0.4 s for a restart.
const SILENCE_LIMIT: Duration = Duration::from_secs(2);
/// Probe period.
const PERIOD: Duration = Duration::from_millis(10);

/// Sends a numbered UDP datagram every 10 ms from `from` to an echo server
/// in `to`, and records when each echo came back, for the whole test (the
/// record is never cleared, so an outage is measured from the last echo
/// before the fault).
struct Probe {
    stop: Arc<AtomicBool>,
    echoes: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Probe {
    fn start(from: &str, to: &str, dst: std::net::Ipv4Addr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let echoes = Arc::new(Mutex::new(Vec::new()));
        let server = in_netns(to, || UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        server
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        let client = in_netns(from, || UdpSocket::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(2)))
            .unwrap();
        let mut threads = Vec::new();
        {
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = server.recv_from(&mut buf) {
                        let _ = server.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        {
            let (stop, echoes) = (Arc::clone(&stop), Arc::clone(&echoes));
            let dst = SocketAddr::new(dst.into(), port);
            threads.push(std::thread::spawn(move || {
                let mut seq = 0u64;
                let mut buf = [0u8; 64];
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if Instant::now() >= next {
                        let _ = client.send_to(&seq.to_be_bytes(), dst);
                        seq += 1;
                        next += PERIOD;
                    }
                    if client.recv_from(&mut buf).is_ok() {
                        if let Ok(mut e) = echoes.lock() {
                            e.push(Instant::now());
                        }
                    }
                }
            }));
        }
        Probe {
            stop,
            echoes,
            threads,
        }
    }

    fn echoes(&self) -> Vec<Instant> {
        self.echoes.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// The last echo at or before `t`.
    fn last_before(&self, t: Instant) -> Option<Instant> {
        self.echoes().into_iter().rev().find(|e| *e <= t)
    }

    /// The first echo after `t`.
    fn first_after(&self, t: Instant) -> Option<Instant> {
        self.echoes().into_iter().find(|e| *e > t)
    }

    /// The longest silence between `from` and `to`, counted from the last
    /// echo at or before `from` and up to `to` itself (so traffic that
    /// stopped and never came back is a silence as long as the window).
    /// `None` when no echo came before `from`: there was nothing to lose,
    /// and no outage can be measured.
    fn silence(&self, from: Instant, to: Instant) -> Option<Duration> {
        let e = self.echoes();
        let start = *e.iter().rev().find(|x| **x <= from)?;
        let mut points: Vec<Instant> = vec![start];
        points.extend(e.iter().copied().filter(|x| *x > from && *x <= to));
        points.push(to.max(start));
        Some(
            points
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default(),
        )
    }

    /// Waits until an echo arrives after `t`; returns it.
    fn wait_echo_after(&self, t: Instant, what: &str) -> Instant {
        netns::wait_for(Duration::from_secs(30), || self.first_after(t))
            .unwrap_or_else(|| panic!("{what}: pod-to-pod traffic did not come back within 30 s"))
    }

    /// Asserts the probe is flowing right now: an echo within the last
    /// 10 probe periods.
    fn assert_flowing(&self, what: &str) {
        let now = Instant::now();
        let recent = netns::wait_for(Duration::from_secs(30), || {
            self.last_before(Instant::now())
                .filter(|e| e.elapsed() < PERIOD * 10)
                .map(|_| ())
        });
        assert!(
            recent.is_some(),
            "{what}: the probe is not flowing (last echo {:?} before {now:?})",
            self.last_before(now)
        );
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

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

/// SIGKILLs node `i`'s router and waits until it is gone.
fn kill_router(lab: &mut Lab, i: usize) {
    let pid = lab.state.nodes[i].router_pid.take().unwrap();
    signal(pid, libc::SIGKILL);
    assert!(netns::wait_exit(pid, Duration::from_secs(5)).is_some());
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
            kill_router(&mut lab, 0);
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
            kill_router(&mut lab, 0);
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
    // here, as if dying) waits for it instead of failing.
    let old = lab.state.nodes[0].router_pid.take().unwrap();
    signal(old, libc::SIGSTOP);
    let log = lab.node("node-1").unwrap().log.clone();
    let waits = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("still held")
            .count()
    };
    let before = waits();
    lab.spawn_router(0, &invocation).unwrap();
    let new = lab.state.nodes[0].router_pid.unwrap();
    let waiting = netns::wait_for(Duration::from_secs(5), || (waits() > before).then_some(()));
    signal(old, libc::SIGKILL);
    assert!(
        waiting.is_some(),
        "the new router did not say it waits for the port; its log:\n{}",
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
fn the_probe_measures_silence_from_the_last_echo_before_the_fault() {
    // The instrument itself, on made-up echoes: 0, 10, 20 ms, then nothing
    // until 500 ms.
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let p = Probe {
        stop: Arc::new(AtomicBool::new(true)),
        echoes: Arc::new(Mutex::new(vec![
            t0,
            t0 + ms(10),
            t0 + ms(20),
            t0 + ms(500),
            t0 + ms(510),
        ])),
        threads: vec![],
    };
    // A fault at 25 ms: silent from the echo at 20 to the one at 500.
    assert_eq!(p.silence(t0 + ms(25), t0 + ms(510)), Some(ms(480)));
    // Traffic that never came back: silent to the end of the window.
    assert_eq!(p.silence(t0 + ms(600), t0 + ms(2600)), Some(ms(2090)));
    // No echo before the fault: nothing to measure from.
    assert_eq!(p.silence(t0 - ms(1), t0 + ms(600)), None);
    assert_eq!(p.first_after(t0 + ms(25)), Some(t0 + ms(500)));
    assert_eq!(p.last_before(t0 + ms(25)), Some(t0 + ms(20)));
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
