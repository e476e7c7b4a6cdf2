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

/// Sends a numbered UDP datagram every 10 ms from `from` to an echo server
/// in `to`, and records when each echo came back; `gap()` is the longest
/// time without an echo so far.
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
            .set_read_timeout(Some(Duration::from_millis(5)))
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
                        next += Duration::from_millis(10);
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

    fn echoes(&self) -> usize {
        self.echoes.lock().map(|e| e.len()).unwrap_or(0)
    }

    /// The longest silence between two echoes (or since the last one).
    fn gap(&self) -> Duration {
        let e = self.echoes.lock().unwrap();
        let mut worst = Duration::ZERO;
        for w in e.windows(2) {
            worst = worst.max(w[1] - w[0]);
        }
        if let Some(last) = e.last() {
            worst = worst.max(last.elapsed());
        }
        worst
    }

    fn reset(&self) {
        self.echoes.lock().unwrap().clear();
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Waits until the probe has had echoes for a while again.
fn wait_recovered(p: &Probe, since: usize, what: &str) {
    let ok = netns::wait_for(Duration::from_secs(30), || {
        (p.echoes() > since + 50).then_some(())
    });
    assert!(
        ok.is_some(),
        "{what}: pod-to-pod traffic did not come back within 30 s"
    );
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
    wait_recovered(&probe, 0, "start");
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

    for (how, kill) in [("graceful restart (SIGTERM)", false), ("SIGKILL", true)] {
        probe.reset();
        let seen = probe.echoes();
        if kill {
            let pid = lab.node("node-1").unwrap().router_pid.unwrap();
            // SAFETY: killing the router this lab started.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let gone = netns::wait_for(Duration::from_secs(5), || {
                (!netns::is_running(pid)).then_some(())
            });
            assert!(gone.is_some());
            netns::reap(pid);
            lab.state.nodes[0].router_pid = None;
        } else {
            lab.stop_router(0).unwrap();
        }
        let t0 = Instant::now();
        lab.start_router(0).unwrap();
        lab.wait_router(0).unwrap();
        lab.wait_node_ready(0).unwrap();
        wait_recovered(&probe, seen, how);
        let gap = probe.gap();
        eprintln!(
            "{how}: longest pod-to-pod silence {:.2} s (router restarted and ready after {:.2} s)",
            gap.as_secs_f64(),
            t0.elapsed().as_secs_f64()
        );
        assert!(
            gap < Duration::from_secs(5),
            "{how}: traffic gap {gap:?} exceeds 5 s"
        );
        echo(how.as_bytes());
        assert_eq!(allocations(&lab), before, "{how}: pod addresses changed");
        let addrs = netns::exec(&a.ns, "ip", &["addr", "show", "eth0"]).unwrap();
        assert!(addrs.contains(&format!("{}/32", a.ipv4)), "{how}: {addrs}");
    }

    // The API server down for 60 s: traffic does not notice, and a change
    // made meanwhile (a new Node) converges when it is back.
    probe.reset();
    lab.control_plane_mut().unwrap().stop_apiserver();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            probe.gap() < Duration::from_secs(2),
            "traffic stalled with the API server down: {:?}",
            probe.gap()
        );
    }
    let gap = probe.gap();
    eprintln!(
        "API server down 60 s: longest pod-to-pod silence {:.2} s",
        gap.as_secs_f64()
    );
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
