//! Handover (issue 17): a new router on a node takes the running one's TUN
//! queues, UDP sockets and live WireGuard sessions, under a numbered 10 ms
//! probe, a TCP stream whose every read is timed, and iperf3, between pods
//! on two nodes. Then the bad cases: a successor that dies mid-transfer, one
//! that speaks another format, and two successors at once. Root only; CI
//! runs it.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::{self, in_netns};
use tunmesh_lab::probe::{longest_silence, Probe};
use tunmesh_lab::require_root;
use tunmesh_router::handover::{self, Hello, Reply};

/// How long iperf3 runs: across the graceful restart and the handover.
const IPERF_SECONDS: u32 = 10;

/// A TCP stream from `from` to `to` whose receiver times every read: the
/// longest time between two reads in a window is the stream's stall.
struct TimedStream {
    stop: Arc<AtomicBool>,
    reads: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl TimedStream {
    fn start(from: &str, to: &str, dst: Ipv4Addr) -> TimedStream {
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(Mutex::new(Vec::new()));
        let listener = in_netns(to, || TcpListener::bind("0.0.0.0:0"))
            .unwrap()
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut threads = Vec::new();
        let r = Arc::clone(&reads);
        threads.push(std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    r.lock().unwrap().push(Instant::now());
                }
            }
        }));
        let dst = SocketAddr::new(dst.into(), port);
        let mut conn = in_netns(from, move || {
            TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        })
        .unwrap()
        .unwrap();
        let s = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            // About 40 MB/s: a steady stream, not a saturating one (iperf3
            // is the load).
            let chunk = vec![7u8; 16384];
            let mut next = Instant::now();
            while !s.load(Ordering::Relaxed) {
                if conn.write_all(&chunk).is_err() {
                    break;
                }
                next += Duration::from_micros(400);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        }));
        TimedStream {
            stop,
            reads,
            threads,
        }
    }

    /// The longest time without a read in `[from, to]`, counted from the
    /// last read before `from` and up to `to`.
    fn stall(&self, from: Instant, to: Instant) -> Duration {
        let r = self.reads.lock().unwrap();
        longest_silence(&r, from, to).expect("reads before the window")
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `wg show IFACE latest-handshakes` of node `ns`: (key, unix time) lines.
fn handshakes(ns: &str, iface: &str) -> String {
    netns::exec(ns, "wg", &["show", iface, "latest-handshakes"]).expect("wg show")
}

fn pid_alive(pid: u32) -> bool {
    handover::alive(pid)
}

#[test]
fn a_new_router_takes_over_without_losing_a_packet() {
    if !require_root("a_new_router_takes_over_without_losing_a_packet") {
        return;
    }
    let mut lab = Lab::for_test(2, 1);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let node1 = lab.node("node-1").unwrap().clone();
    let node2 = lab.node("node-2").unwrap().clone();
    let invocation = lab
        .router_invocation(0, &lab.state.router_args.clone())
        .unwrap();
    // The first successor parks after its own handover, as in the DaemonSet.
    let mut parking = lab.state.router_args.clone();
    parking.extend(["--after-handover".to_string(), "wait".to_string()]);
    let invocation_wait = lab.router_invocation(0, &parking).unwrap();

    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    let stream = TimedStream::start(&a.ns, &b.ns, b.ipv4);
    probe.wait_echo_after(Instant::now(), "before the handover");
    let iperf =
        tunmesh_lab::checks::iperf3_in_background(&a.ns, &b.ns, b.ipv4.into(), IPERF_SECONDS);
    // Until iperf3 runs.
    std::thread::sleep(Duration::from_secs(2));

    // For comparison, a graceful restart (SIGTERM, then a new router):
    // the TUN device goes with the old process, so this one loses what
    // was in flight; the new one starts warm and handshakes anew.
    let tg = Instant::now();
    lab.stop_router(0).unwrap();
    lab.spawn_router(0, &invocation).unwrap();
    probe.wait_echo_after(Instant::now(), "after a graceful restart");
    lab.wait_router(0).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let tg1 = Instant::now();
    let restart_lost = probe.lost(
        tg - Duration::from_millis(500),
        tg1 - Duration::from_millis(100),
    );
    let restart_stall = stream.stall(tg, tg1);
    eprintln!(
        "graceful restart (for comparison): {} probes lost; longest TCP stall {:.1} ms",
        restart_lost.len(),
        restart_stall.as_secs_f64() * 1e3
    );
    assert!(
        restart_stall < Duration::from_secs(2),
        "the TCP stream stalled for {restart_stall:?} across a graceful restart"
    );
    let before = handshakes(&node2.ns, &node2.interface);

    // The handover: a second router on node-1 while the first runs.
    let old = lab.state.nodes[0].router_pid.unwrap();
    let t0 = Instant::now();
    lab.spawn_router(0, &invocation_wait).unwrap();
    let new = lab.state.nodes[0].router_pid.unwrap();
    assert!(
        netns::wait_exit(old, Duration::from_secs(10)).is_some(),
        "the old router did not exit; the new one's log:\n{}",
        std::fs::read_to_string(&node1.log).unwrap_or_default()
    );
    let st = lab
        .wait_status("node-1", Duration::from_secs(10), |_| true)
        .expect("the new router writes its status");
    assert_eq!(st.start.kind, "handover", "{:?}", st.start);
    assert!(pid_alive(new), "the new router exited");
    probe.wait_echo_after(Instant::now(), "after the handover");
    std::thread::sleep(Duration::from_secs(1));
    let t1 = Instant::now();
    let lost = probe.lost(t0 - Duration::from_secs(1), t1 - Duration::from_millis(100));
    let stall = stream.stall(t0, t1);
    let result = iperf.join().unwrap().expect("iperf3 across the handover");
    let after = handshakes(&node2.ns, &node2.interface);
    eprintln!(
        "handover: {} probes lost of those sent from 1 s before to 1 s after; longest TCP stall {:.1} ms; \
         {} us from the old workers' stop to the new workers' start; iperf3 {:.2} Gbit/s over {IPERF_SECONDS} s \
         (both restarts inside; {} retransmits)",
        lost.len(),
        stall.as_secs_f64() * 1e3,
        st.start.handover_gap_us.unwrap_or(0),
        result.gbps,
        result.retr_or_loss
    );
    assert!(lost.is_empty(), "probes lost across the handover: {lost:?}");
    assert!(
        stall < Duration::from_millis(100),
        "the TCP stream stalled for {stall:?}"
    );
    assert_eq!(
        before, after,
        "node-2 saw a new handshake with node-1 (wg show latest-handshakes)"
    );

    // A successor that dies mid-transfer: it takes the state and the
    // descriptors and goes away without an answer. The router goes on.
    let sock_path = handover::socket_path(&node1.state_dir);
    let t2 = Instant::now();
    {
        let s = UnixStream::connect(&sock_path).unwrap();
        handover::send(
            &s,
            &Hello {
                format: handover::FORMAT,
                pid: std::process::id(),
            },
            &[],
        )
        .unwrap();
        let (reply, fds) = handover::recv::<Reply>(&s).unwrap();
        assert!(matches!(reply, Reply::State(_)), "{reply:?}");
        assert!(!fds.is_empty());
    }
    probe.wait_echo_after(Instant::now(), "after a successor died mid-transfer");
    assert!(pid_alive(new), "the router exited after a failed handover");
    std::thread::sleep(Duration::from_millis(500));
    let t3 = Instant::now();
    let lost = probe.lost(
        t2 - Duration::from_millis(500),
        t3 - Duration::from_millis(100),
    );
    eprintln!(
        "a successor that died mid-transfer: the router went on, {} probes lost",
        lost.len()
    );
    assert!(lost.is_empty(), "probes lost: {lost:?}");

    // A successor that speaks another format is refused; nothing stops.
    {
        let s = UnixStream::connect(&sock_path).unwrap();
        handover::send(
            &s,
            &Hello {
                format: 99,
                pid: std::process::id(),
            },
            &[],
        )
        .unwrap();
        let (reply, fds) = handover::recv::<Reply>(&s).unwrap();
        match reply {
            Reply::Refuse(why) => assert!(why.contains("format 99"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(fds.is_empty());
    }
    assert!(pid_alive(new));

    // Two successors at once: whichever reaches the socket first takes
    // over, then the other from it; one router is left, and traffic flows.
    // The one they replaced parks: alive, holding nothing of the data
    // plane, until SIGTERM.
    let t4 = Instant::now();
    lab.spawn_router(0, &invocation).unwrap();
    let first = lab.state.nodes[0].router_pid.unwrap();
    lab.spawn_router(0, &invocation).unwrap();
    let second = lab.state.nodes[0].router_pid.unwrap();
    let settled = netns::wait_for(Duration::from_secs(20), || {
        let alive: Vec<u32> = [first, second]
            .into_iter()
            .filter(|p| pid_alive(*p))
            .collect();
        (alive.len() == 1).then_some(alive)
    });
    assert!(
        settled.is_some(),
        "not exactly one successor left on node-1 (first alive: {}, second alive: {})",
        pid_alive(first),
        pid_alive(second)
    );
    assert!(pid_alive(new), "the parked router exited before SIGTERM");
    for entry in std::fs::read_dir(format!("/proc/{new}/fd")).unwrap() {
        let entry = entry.unwrap();
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        let t = target.display().to_string();
        assert!(
            !t.contains("/dev/net/tun") && !t.contains("handover") && !t.contains("wireguard"),
            "the parked router holds fd {:?} -> {t}",
            entry.file_name()
        );
    }
    let udp = netns::exec(&node1.ns, "ss", &["-Hunap"]).unwrap_or_default();
    assert!(
        !udp.contains(&format!("pid={new},")),
        "the parked router holds a UDP socket: {udp}"
    );
    netns::stop_pid(new, Duration::from_secs(5));
    assert!(!pid_alive(new), "the parked router did not stop on SIGTERM");
    probe.wait_echo_after(Instant::now(), "after two successors at once");
    std::thread::sleep(Duration::from_millis(500));
    let lost = probe.lost(t4, Instant::now() - Duration::from_millis(100));
    eprintln!(
        "two successors at once: router {:?} left, {} probes lost",
        settled,
        lost.len()
    );
    assert_eq!(
        handshakes(&node2.ns, &node2.interface),
        before,
        "a handshake happened"
    );
    assert!(lost.is_empty(), "probes lost: {lost:?}");
    lab.state.nodes[0].router_pid = settled.and_then(|v| v.first().copied());

    stream.stop();
    probe.stop();
    lab.down().unwrap();
}

/// The state letter of process `pid` (`T` when stopped), if it is there.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Node `node`'s `replay` drops (a data message whose counter was seen
/// already: what a reused nonce looks like at the receiver).
fn replays(lab: &Lab, node: &str) -> u64 {
    let st = lab.fresh_status(node).expect("status");
    st.counters.drops.get("replay").copied().unwrap_or(0)
}

/// The routers holding node `ns`'s UDP port, by pid (`ss`).
fn port_holders(ns: &str) -> Vec<u32> {
    let out = netns::exec(ns, "ss", &["-Hunap", "sport", "=", ":51820"]).unwrap_or_default();
    let mut pids: Vec<u32> = out
        .split("pid=")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect();
    pids.sort();
    pids.dedup();
    pids
}

/// Issue 24: the handover commits only once the successor forwards. A
/// successor killed at each step of the handover (it stops itself there,
/// a test-build fault, and the test SIGKILLs it), one that panics right
/// after taking over, and one silent past the timeout: every time the old
/// router goes on serving, pods on two nodes keep talking with at most
/// 100 ms of silence, node-2 sees no replayed counter (no (key, counter)
/// pair used twice), and node-1 ends with one router, holding the port.
#[test]
fn a_successor_that_dies_at_any_step_leaves_the_old_router_serving() {
    if !require_root("a_successor_that_dies_at_any_step_leaves_the_old_router_serving") {
        return;
    }
    let mut lab = Lab::for_test(2, 1);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let node1 = lab.node("node-1").unwrap().clone();
    let faults = lab.faults_bin();
    assert!(faults.is_file(), "{} is missing", faults.display());
    let invocation = lab
        .router_invocation(0, &lab.state.router_args.clone())
        .unwrap();
    let old = lab.state.nodes[0].router_pid.unwrap();
    let probe = Probe::start(&a.ns, &b.ns, b.ipv4);
    probe.wait_echo_after(Instant::now(), "before the first handover");
    // Traffic both ways besides the probe, so that a successor that ran its
    // workers has sealed with the handed-over sessions.
    let (an, bn, bip) = (a.ns.clone(), b.ns.clone(), b.ipv4);
    let iperf = std::thread::spawn(move || {
        tunmesh_lab::checks::iperf3(&an, &bn, bip.into(), 40, &["-b", "300M"])
    });
    std::thread::sleep(Duration::from_secs(1));

    let mut failures = 0;
    let mut longest = Duration::ZERO;
    let cases: Vec<(String, bool)> = handover::Step::ALL
        .iter()
        .map(|s| (format!("stop:{s}"), true))
        .chain([("panic:after-workers".to_string(), false)])
        .collect();
    for (fault, stops) in &cases {
        let replays_before = replays(&lab, "node-2");
        let t0 = Instant::now();
        lab.spawn_router_as(0, &faults, &invocation, &[("TUNMESH_TEST_FAULT", fault)])
            .unwrap();
        let successor = lab.state.nodes[0].router_pid.unwrap();
        if *stops {
            let stopped = netns::wait_for(Duration::from_secs(20), || {
                (proc_state(successor) == Some('T')).then_some(())
            });
            assert!(
                stopped.is_some(),
                "{fault}: the successor never reached its step (state {:?}); node-1's log:\n{}",
                proc_state(successor),
                std::fs::read_to_string(&node1.log).unwrap_or_default()
            );
            // SAFETY: killing the successor this test started.
            unsafe { libc::kill(successor as i32, libc::SIGKILL) };
        }
        assert!(
            netns::wait_exit(successor, Duration::from_secs(10)).is_some(),
            "{fault}: the successor is still there"
        );
        probe.wait_echo_after(Instant::now(), fault);
        std::thread::sleep(Duration::from_millis(500));
        let silence = probe.silence(t0, Instant::now()).unwrap();
        longest = longest.max(silence);
        failures += 1;
        let st = lab
            .wait_status("node-1", Duration::from_secs(5), |s| {
                s.handovers.failed == failures
            })
            .unwrap_or_else(|| {
                panic!("{fault}: node-1's router does not report the failed handover")
            });
        let why = st.handovers.last_failure.clone().unwrap().message;
        let replayed = replays(&lab, "node-2") - replays_before;
        eprintln!(
            "{fault}: the old router resumed; longest silence {:.1} ms; node-2 replay drops +{replayed}; {why}",
            silence.as_secs_f64() * 1e3
        );
        assert!(netns::is_running(old), "{fault}: the old router exited");
        assert_eq!(
            port_holders(&node1.ns),
            vec![old],
            "{fault}: not the old router alone holding node-1's port"
        );
        assert!(
            silence <= Duration::from_millis(100),
            "{fault}: pods were silent for {silence:?}"
        );
        assert_eq!(replayed, 0, "{fault}: node-2 saw replayed counters");
        let after_ack = !matches!(
            fault.as_str(),
            "stop:after-hello" | "stop:after-state" | "stop:after-sessions"
        );
        assert_eq!(
            why.contains("fresh handshakes"),
            after_ack,
            "{fault}: resumed the wrong way: {why}"
        );
    }
    lab.state.nodes[0].router_pid = Some(old);

    // Silent past the timeout: stopped after its Ack and not killed. The
    // old router resumes by itself after FORWARD_TIMEOUT; the successor,
    // continued afterwards, hears that it resumed and exits without
    // taking the node.
    let replays_before = replays(&lab, "node-2");
    lab.spawn_router_as(
        0,
        &faults,
        &invocation,
        &[("TUNMESH_TEST_FAULT", "stop:after-ack")],
    )
    .unwrap();
    let successor = lab.state.nodes[0].router_pid.unwrap();
    netns::wait_for(Duration::from_secs(20), || {
        (proc_state(successor) == Some('T')).then_some(())
    })
    .expect("the successor stops after its Ack");
    failures += 1;
    lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.handovers.failed == failures
    })
    .expect("the old router resumes by itself once the successor is silent past the timeout");
    let resumed = Instant::now();
    // SAFETY: continuing the successor this test stopped.
    unsafe { libc::kill(successor as i32, libc::SIGCONT) };
    assert!(
        netns::wait_exit(successor, Duration::from_secs(10)).is_some(),
        "the continued successor did not give up"
    );
    let log = std::fs::read_to_string(&node1.log).unwrap_or_default();
    assert!(
        log.contains("took the node back"),
        "the continued successor's log does not say why it stopped"
    );
    probe.wait_echo_after(resumed, "after the silent successor");
    lab.state.nodes[0].router_pid = Some(old);
    assert_eq!(port_holders(&node1.ns), vec![old]);
    assert_eq!(
        replays(&lab, "node-2") - replays_before,
        0,
        "node-2 saw replayed counters"
    );
    eprintln!(
        "a successor silent past the timeout: the old router resumed by itself; the successor, continued, stopped"
    );

    // And a good successor still takes over, with the old router parked.
    let t = Instant::now();
    lab.spawn_router(0, &invocation).unwrap();
    let new = lab.state.nodes[0].router_pid.unwrap();
    assert!(netns::wait_exit(old, Duration::from_secs(10)).is_some());
    let st = lab
        .wait_status("node-1", Duration::from_secs(10), |s| {
            s.start.kind == "handover"
        })
        .expect("the new router took over");
    probe.wait_echo_after(Instant::now(), "after the good handover");
    std::thread::sleep(Duration::from_millis(500));
    let silence = probe.silence(t, Instant::now()).unwrap();
    assert!(silence <= Duration::from_millis(100), "{silence:?}");
    assert_eq!(port_holders(&node1.ns), vec![new]);
    eprintln!(
        "successors killed at {} steps and one panicking: the old router resumed each time, longest silence {:.1} ms; \
         then a good successor took over ({} us gap)",
        handover::Step::ALL.len(),
        longest.as_secs_f64() * 1e3,
        st.start.handover_gap_us.unwrap_or(0)
    );
    let _ = iperf.join();
    probe.stop();
    lab.down().unwrap();
}
