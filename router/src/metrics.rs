//! Prometheus metrics and health endpoints over HTTP:
//! - `/metrics`: per-peer traffic and handshake age, drops by reason, peers,
//!   the node's and each peer's key age, key rotations, reconciles and
//!   their errors, the Kubernetes connection, build info
//!   (OpenMetrics text, built fresh from the live counters on each scrape);
//! - `/healthz`: the main loop is turning (it ticks every second) and every
//!   data-plane worker is running;
//! - `/readyz`: the TUN device, routes and the first mesh are in place.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{debug, warn};

use crate::dataplane::Dataplane;
use crate::source::SharedStatus;

/// What the endpoints report, shared with the router's main loop.
pub struct Health {
    pub dp: Arc<Dataplane>,
    /// Set once the TUN device, routes and the first mesh are in place.
    pub ready: AtomicBool,
    /// Unix seconds of the main loop's last tick.
    pub last_tick: AtomicU64,
    /// Meshes applied, and applies that failed.
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    /// The peer source's status (the Kubernetes gauges come from it).
    pub source: SharedStatus,
    /// Per data-plane queue, as of the main loop's last tick.
    pub queues: Mutex<Vec<crate::status::QueueStatus>>,
    /// Host settings the router needs and could not make (status.json has
    /// each one and why).
    pub host_problems: AtomicU64,
    /// The node's key, as of the main loop's last tick.
    pub key: Mutex<crate::rotation::KeyStatus>,
    /// Handovers to a new router that failed (this one resumed).
    pub handover_failures: AtomicU64,
}

/// The main loop is considered stuck after this long without a tick.
const STALL: u64 = 10;

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

impl Health {
    pub fn new(dp: Arc<Dataplane>, source: SharedStatus) -> Arc<Health> {
        Arc::new(Health {
            dp,
            ready: AtomicBool::new(false),
            last_tick: AtomicU64::new(crate::status::unix_now()),
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            source,
            queues: Mutex::new(Vec::new()),
            host_problems: AtomicU64::new(0),
            key: Mutex::new(Default::default()),
            handover_failures: AtomicU64::new(0),
        })
    }

    pub fn alive(&self) -> bool {
        self.unhealthy().is_none()
    }

    /// Why the router is not healthy, if it is not: its main loop stopped
    /// ticking, or a data-plane worker died (a queue that no longer moves
    /// packets: the liveness probe restarts the router).
    pub fn unhealthy(&self) -> Option<String> {
        let idle = crate::status::unix_now().saturating_sub(self.last_tick.load(Ordering::Relaxed));
        if idle > STALL {
            return Some(format!(
                "the router's main loop has not ticked for {idle} s"
            ));
        }
        let dead = self.dp.dead_workers();
        (!dead.is_empty()).then(|| format!("data-plane worker dead: {}", dead.join("; ")))
    }

    /// The metrics in OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut reg = Registry::with_prefix("tunmesh");
        let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
            let c: Counter = Counter::default();
            c.inc_by(v);
            reg.register(name, help, c);
        };
        let gauge = |reg: &mut Registry, name: &str, help: &str, v: i64| {
            let g: Gauge = Gauge::default();
            g.set(v);
            reg.register(name, help, g);
        };
        let info: Family<Labels, Gauge> = Family::default();
        info.get_or_create(&label("version", env!("CARGO_PKG_VERSION")))
            .set(1);
        reg.register("build_info", "The router's version", info);

        gauge(
            &mut reg,
            "host_problems",
            "Host settings the router needs and could not make: forwarding, the TUN's rp_filter (tunmesh-ctl status says which and why)",
            self.host_problems.load(Ordering::Relaxed) as i64,
        );
        let up: Family<Labels, Gauge> = Family::default();
        for w in self.dp.workers() {
            up.get_or_create(&label("worker", &w.name))
                .set(i64::from(w.failure.is_none()));
        }
        reg.register(
            "worker_up",
            "1 while the data-plane thread runs (queue-N, timers); 0 once it died (tunmesh-ctl status says why)",
            up,
        );
        let table = self.dp.table();
        gauge(
            &mut reg,
            "peers",
            "Peers in the mesh",
            table.peers.len() as i64,
        );
        let tx_b: Family<Labels, Counter> = Family::default();
        let rx_b: Family<Labels, Counter> = Family::default();
        let tx_p: Family<Labels, Counter> = Family::default();
        let rx_p: Family<Labels, Counter> = Family::default();
        let hs: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
        let key_age: Family<Labels, Gauge> = Family::default();
        let path_mtu: Family<Labels, Gauge> = Family::default();
        let now = crate::status::unix_now();
        for p in &table.peers {
            let l = label("peer", &p.name);
            tx_b.get_or_create(&l)
                .inc_by(p.counters.tx_bytes.load(Ordering::Relaxed));
            rx_b.get_or_create(&l)
                .inc_by(p.counters.rx_bytes.load(Ordering::Relaxed));
            tx_p.get_or_create(&l)
                .inc_by(p.counters.tx_packets.load(Ordering::Relaxed));
            rx_p.get_or_create(&l)
                .inc_by(p.counters.rx_packets.load(Ordering::Relaxed));
            let (since, path): (Option<Duration>, u16) = {
                let st = p.lock();
                (
                    st.last_handshake()
                        .and_then(|t| std::time::SystemTime::now().duration_since(t).ok()),
                    st.path_mtu,
                )
            };
            path_mtu.get_or_create(&l).set(i64::from(path));
            // -1: no handshake yet (a gauge cannot be absent per peer and
            // still say so).
            hs.get_or_create(&l)
                .set(since.map(|d| d.as_secs_f64()).unwrap_or(-1.0));
            key_age.get_or_create(&l).set(
                p.key_created_unix
                    .map(|c| now.saturating_sub(c) as i64)
                    .unwrap_or(-1),
            );
        }
        reg.register(
            "peer_path_mtu_bytes",
            "The largest inner packet the path to the peer carries (0: unknown); bigger ones get ICMP too-big",
            path_mtu,
        );
        reg.register(
            "peer_key_age_seconds",
            "Seconds since the peer made its key, as its Node says (-1: unknown, or rotating)",
            key_age,
        );
        let key = self.key.lock().map(|k| k.clone()).unwrap_or_default();
        gauge(
            &mut reg,
            "key_age_seconds",
            "Seconds since this node's key was made (-1: unknown)",
            key.key_age_seconds.map(|a| a as i64).unwrap_or(-1),
        );
        gauge(
            &mut reg,
            "key_rotation_in_progress",
            "1 while this node rotates its key",
            i64::from(key.rotation.is_some()),
        );
        counter(
            &mut reg,
            "key_rotations",
            "Key rotations this router completed",
            key.rotations,
        );
        counter(
            &mut reg,
            "handover_failures",
            "Handovers to a new router on this node that failed: this router resumed (tunmesh-ctl status says at which step and why)",
            self.handover_failures.load(Ordering::Relaxed),
        );
        reg.register(
            "peer_tx_bytes",
            "Bytes sent to the peer through the tunnel (inner packets)",
            tx_b,
        );
        reg.register(
            "peer_rx_bytes",
            "Bytes received from the peer and delivered (inner packets)",
            rx_b,
        );
        reg.register("peer_tx_packets", "Packets sent to the peer", tx_p);
        reg.register(
            "peer_rx_packets",
            "Packets received from the peer and delivered",
            rx_p,
        );
        reg.register(
            "peer_last_handshake_seconds",
            "Seconds since the last completed handshake with the peer (-1: none yet)",
            hs,
        );

        let snap = self.dp.counters.snapshot();
        let drops: Family<Labels, Counter> = Family::default();
        for (reason, n) in &snap.drops {
            drops.get_or_create(&label("reason", reason)).inc_by(*n);
        }
        reg.register("drops", "Packets dropped, by reason", drops);
        counter(
            &mut reg,
            "tun_rx_packets",
            "Packets read from the TUN device",
            snap.tun_rx_packets,
        );
        counter(
            &mut reg,
            "tun_tx_packets",
            "Packets written to the TUN device",
            snap.tun_tx_packets,
        );
        counter(
            &mut reg,
            "udp_rx_datagrams",
            "WireGuard datagrams received",
            snap.udp_rx_datagrams,
        );
        counter(
            &mut reg,
            "udp_tx_datagrams",
            "WireGuard datagrams sent",
            snap.udp_tx_datagrams,
        );
        let queues = self.queues.lock().map(|q| q.clone()).unwrap_or_default();
        let q_read: Family<Labels, Counter> = Family::default();
        let q_written: Family<Labels, Counter> = Family::default();
        let q_udp: Family<Labels, Counter> = Family::default();
        for (i, q) in queues.iter().enumerate() {
            let l = label("queue", &i.to_string());
            q_read.get_or_create(&l).inc_by(q.tun_packets_read);
            q_written.get_or_create(&l).inc_by(q.tun_packets_written);
            q_udp.get_or_create(&l).inc_by(q.udp_datagrams_received);
        }
        reg.register(
            "queue_tun_rx_packets",
            "Packets read from the TUN device, by data-plane queue",
            q_read,
        );
        reg.register(
            "queue_tun_tx_packets",
            "Packets written to the TUN device, by data-plane queue",
            q_written,
        );
        reg.register(
            "queue_udp_rx_datagrams",
            "WireGuard datagrams received, by data-plane queue (socket)",
            q_udp,
        );
        counter(
            &mut reg,
            "reconciles",
            "Meshes applied from the peer source",
            self.reconciles.load(Ordering::Relaxed),
        );
        counter(
            &mut reg,
            "reconcile_errors",
            "Meshes the router failed to apply (routes, addresses)",
            self.reconcile_errors.load(Ordering::Relaxed),
        );
        gauge(
            &mut reg,
            "ready",
            "1 once the TUN device, routes and first mesh are in place",
            i64::from(self.ready.load(Ordering::Relaxed)),
        );
        let kube = self.source.lock().ok().and_then(|s| s.kubernetes.clone());
        if let Some(k) = kube {
            gauge(
                &mut reg,
                "kubernetes_connected",
                "1 while the Node watch is up",
                i64::from(k.connected),
            );
            gauge(
                &mut reg,
                "kubernetes_problems",
                "Malformed or conflicting Node fields skipped",
                k.problems.len() as i64,
            );
            gauge(
                &mut reg,
                "kubernetes_held_keys",
                "Nodes whose key changed unannounced: the mesh keeps their previous key (tunmesh-ctl status; tunmesh-ctl accept-key NODE)",
                k.held_keys.len() as i64,
            );
            counter(
                &mut reg,
                "kubernetes_key_holds",
                "Unannounced key changes held back since the router started",
                k.key_holds,
            );
            gauge(
                &mut reg,
                "kubernetes_pending_nodes",
                "Nodes not peers yet (no key, endpoint or podCIDR)",
                k.pending.len() as i64,
            );
            gauge(
                &mut reg,
                "kubernetes_nodes",
                "Nodes in the directory",
                k.nodes as i64,
            );
            counter(
                &mut reg,
                "kubernetes_watch_events",
                "Events from the API server about Nodes (and listings)",
                k.watch_events,
            );
            counter(
                &mut reg,
                "kubernetes_watch_events_changed",
                "Of those, the events that changed something the mesh reads (a kubelet's status report changes nothing)",
                k.watch_events_changed,
            );
            counter(
                &mut reg,
                "kubernetes_received_bytes",
                "Bytes the API server sent this router (response bodies: listings, watch events, reads)",
                crate::source::apibytes::received(),
            );
            counter(
                &mut reg,
                "mesh_updates",
                "Updates the Kubernetes source handed the router (a whole mesh, or the peers that changed)",
                k.mesh_updates,
            );
        }
        let crypto = self.dp.crypto_stats();
        gauge(
            &mut reg,
            "crypto_workers",
            "Threads that encrypt and decrypt a batch together (the queue worker that read it and helpers)",
            crypto.workers as i64,
        );
        counter(
            &mut reg,
            "crypto_parallel_batches",
            "Batches whose encryption or decryption was cut into chunks for the crypto workers",
            crypto.parallel_batches,
        );
        counter(
            &mut reg,
            "crypto_chunks",
            "Chunks of those batches",
            crypto.chunks,
        );
        counter(
            &mut reg,
            "crypto_helper_chunks",
            "Chunks a helper thread ran (the rest ran on the queue worker that read the batch)",
            crypto.helper_chunks,
        );
        counter(
            &mut reg,
            "peer_table_builds",
            "Peer tables the data plane built (one per applied change)",
            self.dp.table_builds(),
        );
        gauge(
            &mut reg,
            "timed_peers",
            "Peers with WireGuard state, ticked by the timers (the others cost nothing)",
            self.dp.timed_peers() as i64,
        );
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &reg) {
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

fn respond(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(
    req: Request<Incoming>,
    h: Arc<Health>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let ok = |good: bool, what: &str| {
        if good {
            respond(StatusCode::OK, "text/plain", "ok\n".into())
        } else {
            respond(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{what}\n"),
            )
        }
    };
    Ok(match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            h.render(),
        ),
        "/healthz" => match h.unhealthy() {
            None => ok(true, ""),
            Some(why) => ok(false, &why),
        },
        "/readyz" => match h.unhealthy() {
            Some(why) => ok(false, &why),
            None => ok(
                h.ready.load(Ordering::Relaxed),
                "not ready: the TUN device, routes or the first mesh are not in place yet",
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /healthz or /readyz\n".into(),
        ),
    })
}

/// Binds `addr` now (so a taken port fails the start), then serves in the
/// background.
pub async fn serve(addr: SocketAddr, h: Arc<Health>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "metrics listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let h = Arc::clone(&h);
            tokio::spawn(async move {
                let svc = service_fn(move |req| route(req, Arc::clone(&h)));
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await
                {
                    debug!(error = %e, "metrics connection");
                }
            });
        }
    });
    Ok(bound)
}
