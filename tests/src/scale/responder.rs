//! WireGuard for hollow Nodes: one process on the lab's underlay, at the
//! address every hollow Node's endpoint names, a UDP port and a boringtun
//! session per hollow Node and real router. It answers the routers'
//! handshakes as each hollow Node would, so that a router holds live
//! sessions with thousands of peers (for the handover and warm-start
//! figures with that many), and counts what it did.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey as XPublic, StaticSecret};
use tunmesh_keygen::{PrivateKey, PublicKey};

use crate::netns;

/// What the responder did, so far.
#[derive(Default)]
pub struct Counts {
    /// Handshake messages it answered.
    pub answered: AtomicU64,
    /// Data packets that decrypted.
    pub data: AtomicU64,
}

pub struct Responder {
    stop: Arc<AtomicBool>,
    pub counts: Arc<Counts>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Responder {
    /// Starts answering in namespace `ns`: hollow Node `i` (its key
    /// `keys[i]`) on port `port(i)`, for each router in `routers`
    /// (its underlay address and public key).
    pub fn start(
        ns: &str,
        keys: Vec<(usize, PrivateKey)>,
        port: fn(usize) -> u16,
        routers: Vec<(IpAddr, PublicKey)>,
    ) -> Result<Responder> {
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (s, c, ns) = (Arc::clone(&stop), Arc::clone(&counts), ns.to_string());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || -> Result<()> {
            netns::in_netns(&ns, move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(serve(keys, port, routers, s, c, ready_tx))
            })?
        });
        ready_rx
            .recv_timeout(Duration::from_secs(120))
            .context("the responder did not bind its ports")??;
        Ok(Responder {
            stop,
            counts,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the responder panicked"),
            None => Ok(()),
        }
    }
}

async fn serve(
    keys: Vec<(usize, PrivateKey)>,
    port: fn(usize) -> u16,
    routers: Vec<(IpAddr, PublicKey)>,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    ready: std::sync::mpsc::Sender<Result<()>>,
) -> Result<()> {
    let mut tasks = Vec::new();
    let mut index = 1u32;
    for (i, key) in keys {
        let sock = match tokio::net::UdpSocket::bind(("0.0.0.0", port(i))).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(anyhow::anyhow!("binding port {}: {e}", port(i))));
                return Ok(());
            }
        };
        // A session per router, by the router's address.
        let mut tunns: HashMap<IpAddr, Tunn> = HashMap::new();
        for (ip, public) in &routers {
            tunns.insert(
                *ip,
                Tunn::new(
                    StaticSecret::from(*key.as_bytes()),
                    XPublic::from(*public.as_bytes()),
                    None,
                    None,
                    index,
                    None,
                ),
            );
            index += 1;
        }
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let mut out = vec![0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                let got =
                    tokio::time::timeout(Duration::from_millis(200), sock.recv_from(&mut buf))
                        .await;
                let Ok(Ok((n, from))) = got else {
                    continue;
                };
                let Some(t) = tunns.get_mut(&from.ip()) else {
                    continue;
                };
                answer(t, &sock, from, &buf[..n], &mut out, &counts).await;
            }
        }));
    }
    let _ = ready.send(Ok(()));
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn answer(
    t: &mut Tunn,
    sock: &tokio::net::UdpSocket,
    from: SocketAddr,
    datagram: &[u8],
    out: &mut [u8],
    counts: &Counts,
) {
    match t.decapsulate(Some(from.ip()), datagram, out) {
        TunnResult::WriteToNetwork(reply) => {
            let _ = sock.send_to(reply, from).await;
            counts.answered.fetch_add(1, Ordering::Relaxed);
            // What waited for the handshake follows.
            while let TunnResult::WriteToNetwork(more) = t.decapsulate(None, &[], out) {
                let _ = sock.send_to(more, from).await;
            }
        }
        TunnResult::WriteToTunnelV4(..) | TunnResult::WriteToTunnelV6(..) => {
            counts.data.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
}
