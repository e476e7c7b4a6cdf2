//! Data-plane workers are supervised: a queue whose worker dies makes
//! `/healthz` fail (so the DaemonSet's liveness probe restarts the router),
//! and `/metrics`, the status snapshot and `tunmesh-ctl status` name the
//! queue and why. The fault is a TUN fake that panics when the test says
//! so: only a test can trigger it. No root needed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tunmesh_router::dataplane::mem::{MemNet, MemTun};
use tunmesh_router::dataplane::{Batch, Dataplane, Queue, TunIo};
use tunmesh_router::metrics::{self, Health};
use tunmesh_router::status::Status;
use tunmesh_router::PrivateKey;

/// A TUN queue that reads nothing until `armed`, then panics on its next read.
struct FaultyTun {
    armed: AtomicBool,
}

impl TunIo for FaultyTun {
    fn recv_batch(&self, batch: &mut Batch, _timeout: Duration) -> std::io::Result<usize> {
        if self.armed.load(Ordering::Relaxed) {
            panic!("injected fault: the TUN read of queue 1");
        }
        batch.n = 0;
        std::thread::sleep(Duration::from_millis(1));
        Ok(0)
    }

    fn send_batch(&self, batch: &mut Batch) -> std::io::Result<usize> {
        Ok(batch.n)
    }
}

/// GET `path` from the metrics server: (status code, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

#[test]
fn a_dead_queue_fails_healthz_and_is_named_in_metrics_status_and_ctl() {
    let dp = Dataplane::new(&PrivateKey::generate(), 1420);
    let net = MemNet::new();
    let (tun0, _host0) = MemTun::pair();
    let faulty = Arc::new(FaultyTun {
        armed: AtomicBool::new(false),
    });
    let queues: Vec<Queue> = vec![
        (
            Arc::new(tun0),
            Arc::new(net.bind("192.0.2.1:51820".parse().unwrap())),
        ),
        (
            Arc::clone(&faulty) as Arc<dyn TunIo>,
            Arc::new(net.bind("192.0.2.1:51821".parse().unwrap())),
        ),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let handles = dp.spawn(&queues, Arc::clone(&stop)).unwrap();

    let health = Health::new(Arc::clone(&dp), Default::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt
        .block_on(metrics::serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&health),
        ))
        .unwrap();

    assert_eq!(get(addr, "/healthz").0, 200, "healthy before the fault");
    let workers = dp.workers();
    let names: Vec<&str> = workers.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["queue-0", "queue-1", "timers"]);
    assert!(workers.iter().all(|w| w.failure.is_none()), "{workers:?}");

    faulty.armed.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let r = get(addr, "/healthz");
        if r.0 != 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(code, 503, "/healthz after queue 1's worker died: {body}");
    assert!(
        body.contains("queue-1") && body.contains("injected fault"),
        "/healthz names the queue and the reason: {body}"
    );
    assert_eq!(get(addr, "/readyz").0, 503, "not ready either");

    let (_, m) = get(addr, "/metrics");
    for (worker, up) in [("queue-0", 1), ("queue-1", 0), ("timers", 1)] {
        let line = format!("tunmesh_worker_up{{worker=\"{worker}\"}} {up}");
        assert!(m.lines().any(|l| l == line), "{line} in\n{m}");
    }

    // The status snapshot the router writes, and what tunmesh-ctl makes of it.
    let dead: Vec<_> = dp
        .workers()
        .into_iter()
        .filter(|w| w.failure.is_some())
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].name, "queue-1");
    let dir = std::env::temp_dir().join(format!("tunmesh-supervision-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    Status {
        interface: "tm-test".into(),
        public_key: dp.public_key().to_base64(),
        listen_port: 51820,
        peers: vec![],
        counters: dp.counters.snapshot(),
        offload: Default::default(),
        queues: vec![],
        crypto: tunmesh_router::dataplane::crypto::PoolStats {
            workers: 2,
            parallel_batches: 10,
            chunks: 40,
            helper_chunks: 18,
            wait_us: 0,
        },
        reloads: 0,
        last_reload: None,
        kubernetes: None,
        pod_cidrs: vec![],
        host_problems: vec![],
        workers: dp.workers(),
        start: tunmesh_router::warm::StartStatus {
            kind: "cold: cache refused".into(),
            problem: Some("warm-start cache /x/mesh-cache.json is corrupt: bad".into()),
            ..Default::default()
        },
        key: Default::default(),
        rewritten_every_seconds: 30,
        mtu: 1420,
        handovers: tunmesh_router::status::HandoverStatus {
            failed: 2,
            last_failure: Some(tunmesh_router::status::HandoverFailureStatus {
                at_unix: tunmesh_router::status::unix_now(),
                message: "a new router took over and failed after its Ack: gone".into(),
            }),
        },
    }
    .write(&dir)
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tunmesh-ctl"))
        .args(["--state-dir"])
        .arg(&dir)
        .arg("status")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "start:       cold: cache refused: warm-start cache /x/mesh-cache.json is corrupt"
        ),
        "{text}"
    );
    assert!(text.contains("snapshot:    rewritten every 30 s"), "{text}");
    assert!(
        text.contains("crypto:      2 workers (each queue's and 1 helper); helpers ran 18 of 40 chunks of 10 split batches (45%)"),
        "{text}"
    );
    assert!(
        text.contains("handover:    2 failed, the last 0 s ago: a new router took over and failed after its Ack: gone"),
        "{text}"
    );
    let line = text
        .lines()
        .find(|l| l.contains("DEAD"))
        .unwrap_or_else(|| panic!("no DEAD line in tunmesh-ctl status:\n{text}"));
    assert!(
        line.contains("PROBLEM") && line.contains("queue-1") && line.contains("injected fault"),
        "{line}"
    );
    assert!(!text.contains("queue-0 DEAD"), "{text}");

    // A stop is not a death.
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    assert_eq!(
        dp.workers().iter().filter(|w| w.failure.is_some()).count(),
        1,
        "workers that stopped on request are not reported dead"
    );
}
