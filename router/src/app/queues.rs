//! The data plane's queues as the router opens them: a TUN queue and a UDP
//! socket each (or, with the comparison harness, the crates' I/O), with
//! the wait for a predecessor that still holds the port or the device.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::{info, warn};

use crate::dataplane::tun::TunDevice;
use crate::dataplane::udp::UdpSocket;
use crate::dataplane::Queue;
use crate::status::RealQueue;

/// The number of data-plane queues for `--queues` (0: one per CPU, at most 4).
pub fn queue_count(asked: usize) -> usize {
    match asked {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4),
        n => n,
    }
}

/// The number of crypto workers for `--crypto-workers`, with `queues`
/// data-plane queues. 0: each queue's worker and a helper for every CPU
/// this process may use that no queue's worker has (none when there are
/// no more CPUs than queues). NB: on a node whose cores are all busy (two
/// cores, two queues, iperf3 on both) a helper only takes CPU time from
/// the rest: measured there, one helper cost 19% of a TCP stream's
/// throughput and 35% more CPU per Gbit (scripts/ab-routers.sh).
pub fn crypto_worker_count(asked: usize, queues: usize) -> usize {
    match asked {
        0 => {
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            1 + cpus.saturating_sub(queues)
        }
        n => n,
    }
}

/// How long a starting router waits for a previous one on the node to let
/// go of its UDP port, TUN device and metrics port (a router killed a
/// moment ago, whose sockets the kernel has not released yet).
pub const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Whether `e` says another process still holds what we open.
pub fn busy(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EADDRINUSE | libc::EBUSY))
}

/// Runs `open` until it stops failing with "address in use" or "busy", for
/// at most `BUSY_WAIT`; any other error, or the last one, is returned.
pub fn retry_busy<T>(
    what: &str,
    mut open: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    let start = Instant::now();
    let mut said = false;
    loop {
        match open() {
            Err(e) if busy(&e) && start.elapsed() < BUSY_WAIT => {
                if !std::mem::replace(&mut said, true) {
                    warn!(error = %e, "{what} still held (a previous router exiting?); retrying for up to {} s", BUSY_WAIT.as_secs());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(v) => {
                if said {
                    info!(
                        waited_ms = start.elapsed().as_millis() as u64,
                        "{what} free"
                    );
                }
                return Ok(v);
            }
            Err(e) => return Err(e),
        }
    }
}

/// The data plane's queues, opened: a TUN queue and a UDP socket each.
pub struct Queues {
    /// tunmesh's own devices, for the status's per-queue counters.
    pub real: Vec<RealQueue>,
    /// What the workers read and write.
    pub io: Vec<Queue>,
    pub port: u16,
    pub rcvbuf: usize,
    pub sndbuf: usize,
    pub udp_gso: bool,
    pub udp_gro: bool,
    pub tun_offload: bool,
    pub io_kind: &'static str,
}

impl Queues {
    /// Queues over tunmesh's own devices (opened here, or handed over).
    pub fn real(real: Vec<RealQueue>, tun_offload: bool, io_kind: &'static str) -> Queues {
        let io = crate::status::queue_io(&real);
        let (port, (rcvbuf, sndbuf), (udp_gso, udp_gro)) = real
            .first()
            .map(|(_, u)| (u.port(), u.buffer_sizes(), u.offloads()))
            .unwrap_or_default();
        Queues {
            real,
            io,
            port,
            rcvbuf,
            sndbuf,
            udp_gso,
            udp_gro,
            tun_offload,
            io_kind,
        }
    }
}

/// What the queues are opened with.
pub struct QueueSpec<'a> {
    pub interface: &'a str,
    pub mtu: u16,
    pub offload: bool,
    pub port: u16,
    pub count: usize,
    /// The data plane's buffer size (the comparison harness sizes its own).
    pub buf_size: usize,
}

/// Opens `spec.count` queues, waiting (`retry_busy`) for a predecessor to
/// let go of the port and the device.
pub fn open(spec: &QueueSpec) -> anyhow::Result<Queues> {
    #[cfg(feature = "ab-crates")]
    if let Some(q) = ab_queues(spec)? {
        return Ok(q);
    }
    // The harness sizes its buffers with it; tunmesh's own I/O needs none.
    let _ = spec.buf_size;
    let n = spec.count;
    let udps = retry_busy("UDP port", || {
        UdpSocket::bind_group(spec.port, spec.offload, n)
    })
    .with_context(|| format!("binding UDP port {}", spec.port))?;
    if udps.is_empty() {
        bail!("no UDP socket bound");
    }
    let tuns = retry_busy("TUN device", || {
        TunDevice::create_queues(spec.interface, spec.mtu, spec.offload, n)
    })
    .with_context(|| {
        format!(
            "creating TUN device {} with {n} queue(s) (needs /dev/net/tun and CAP_NET_ADMIN)",
            spec.interface
        )
    })?;
    let tun_offload = tuns.first().is_some_and(|t| t.offload());
    let real: Vec<RealQueue> = tuns
        .into_iter()
        .map(Arc::new)
        .zip(udps.into_iter().map(Arc::new))
        .collect();
    Ok(Queues::real(real, tun_offload, "tunmesh"))
}

/// The comparison harness (feature `ab-crates`): the crates' TUN and/or UDP
/// I/O in place of tunmesh's own, as `TUNMESH_AB_IO` says.
#[cfg(feature = "ab-crates")]
fn ab_queues(spec: &QueueSpec) -> anyhow::Result<Option<Queues>> {
    use crate::dataplane::ab_crates::{Choice, QuinnUdp, TunrsTun};
    use crate::dataplane::{TunIo, UdpIo};
    let c = Choice::from_env();
    if !c.tunrs && !c.quinn {
        return Ok(None);
    }
    let n = spec.count;
    let tuns: Vec<Arc<dyn TunIo>> = if c.tunrs {
        TunrsTun::create_queues(spec.interface, spec.mtu, n, spec.buf_size)?
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TunIo>)
            .collect()
    } else {
        TunDevice::create_queues(spec.interface, spec.mtu, spec.offload, n)?
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn TunIo>)
            .collect()
    };
    let udps: Vec<Arc<dyn UdpIo>> = if c.quinn {
        QuinnUdp::bind_group(spec.port, n)?
            .into_iter()
            .map(|u| Arc::new(u) as Arc<dyn UdpIo>)
            .collect()
    } else {
        UdpSocket::bind_group(spec.port, spec.offload, n)?
            .into_iter()
            .map(|u| Arc::new(u) as Arc<dyn UdpIo>)
            .collect()
    };
    warn!(
        tun_rs = c.tunrs,
        quinn_udp = c.quinn,
        "I/O comparison harness in use (TUNMESH_AB_IO)"
    );
    Ok(Some(Queues {
        real: Vec::new(),
        io: tuns.into_iter().zip(udps).collect(),
        port: spec.port,
        rcvbuf: 0,
        sndbuf: 0,
        udp_gso: c.quinn,
        udp_gro: c.quinn,
        tun_offload: c.tunrs,
        io_kind: "comparison harness",
    }))
}
