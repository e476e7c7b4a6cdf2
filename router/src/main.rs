//! `tunmesh-router`: wiring only. Parses flags, loads the mesh file and key,
//! creates the TUN device and UDP socket, starts the data plane, and serves
//! SIGHUP (reload the mesh file) and SIGTERM/SIGINT (stop).

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};
use tracing_subscriber::EnvFilter;
use tunmesh_router::dataplane::tun::TunDevice;
use tunmesh_router::dataplane::udp::UdpSocket;
use tunmesh_router::dataplane::Dataplane;
use tunmesh_router::hostnet::{self, HostNet};
use tunmesh_router::source::file::{self, NodeSettings};
use tunmesh_router::status::{self, ReloadStatus, Status};
use tunmesh_router::PrivateKey;

/// Name of the TUN device.
const DEFAULT_INTERFACE: &str = "tunmesh0";
/// TUN MTU: a 1500-byte underlay minus WireGuard over IPv6 (80 bytes), so
/// nothing fragments whichever family the underlay uses.
const DEFAULT_MTU: u16 = 1420;
/// Where the router keeps its status (and, later, its key and CNI state).
const DEFAULT_STATE_DIR: &str = "/var/lib/tunmesh";
/// How often the status snapshot is rewritten.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "tunmesh-router",
    version,
    about = "tunmesh node agent: encrypted pod networking over a userspace WireGuard mesh"
)]
struct Args {
    /// Static mesh file (TOML): this node's key, port and pod CIDRs, and its
    /// peers. Re-read on SIGHUP; a bad file is refused and the last good mesh kept.
    #[arg(long, env = "TUNMESH_MESH_FILE")]
    mesh_file: PathBuf,
    /// Name of the TUN device the router creates.
    #[arg(long, env = "TUNMESH_INTERFACE", default_value = DEFAULT_INTERFACE)]
    interface: String,
    /// MTU of the TUN device (underlay MTU minus 80).
    #[arg(long, env = "TUNMESH_MTU", default_value_t = DEFAULT_MTU)]
    mtu: u16,
    /// Use TUN offloads (virtio headers: TSO/USO super-packets are segmented
    /// by the router, received TCP segments are coalesced). Falls back to
    /// plain packets if the kernel refuses.
    #[arg(long, env = "TUNMESH_OFFLOAD", default_value_t = true, action = clap::ArgAction::Set)]
    offload: bool,
    /// Directory for the router's state (status.json).
    #[arg(long, env = "TUNMESH_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunmesh-router: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("tunmesh-router: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_key_mode(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "private key file is accessible by others; chmod 600 it");
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mesh_file = file::load(&args.mesh_file)?;
    let node: NodeSettings = mesh_file.node.clone();
    let key = PrivateKey::read_file(&node.private_key_file).context("node.private_key_file")?;
    check_key_mode(&node.private_key_file);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.state_dir)
        .with_context(|| format!("creating state directory {}", args.state_dir.display()))?;

    let dp = Dataplane::new(&key, usize::from(args.mtu));
    let udp = UdpSocket::bind(node.listen_port, args.offload)
        .with_context(|| format!("binding UDP port {}", node.listen_port))?;
    let (rcvbuf, sndbuf) = udp.buffer_sizes();
    let (udp_gso, udp_gro) = udp.offloads();
    let tun = TunDevice::create(&args.interface, args.mtu, args.offload).with_context(|| {
        format!(
            "creating TUN device {} (needs /dev/net/tun and CAP_NET_ADMIN)",
            args.interface
        )
    })?;
    let tun_offload = tun.offload();
    let host = HostNet::connect()?;
    let index = host.link_index(&args.interface).await?;
    host.configure_link(
        index,
        &args.interface,
        u32::from(args.mtu),
        &node.gateways(),
    )
    .await?;
    hostnet::prepare_sysctls(&args.interface);

    let diff = dp.apply(&mesh_file.mesh);
    let routes = host.sync_routes(index, &mesh_file.mesh.routes()).await?;
    info!(
        interface = %args.interface, mtu = args.mtu, port = udp.port(), public_key = %dp.public_key(),
        peers = ?diff.added, routes = ?routes.added, rcvbuf, sndbuf, tun_offload, udp_gso, udp_gro, "router up"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let port = udp.port();
    let tun = Arc::new(tun);
    let handles = dp.spawn(
        Arc::clone(&tun) as Arc<dyn tunmesh_router::dataplane::TunIo>,
        Arc::new(udp),
        Arc::clone(&stop),
    )?;

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(STATUS_INTERVAL);
    let mut reloads = 0u64;
    let mut last_reload: Option<ReloadStatus> = None;
    let mut status_failing = false;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                reloads += 1;
                let message = match file::load(&args.mesh_file) {
                    Err(e) => {
                        error!(error = %e, "reload refused; keeping the last good mesh");
                        Err(e.to_string())
                    }
                    Ok(f) => {
                        if f.node != node {
                            warn!(file = %args.mesh_file.display(), "[node] settings changed; they take effect on restart (peers are applied now)");
                        }
                        let diff = dp.apply(&f.mesh);
                        match host.sync_routes(index, &f.mesh.routes()).await {
                            Ok(r) => {
                                info!(added = ?diff.added, updated = ?diff.updated, replaced = ?diff.replaced,
                                      removed = ?diff.removed, unchanged = diff.unchanged,
                                      routes_added = ?r.added, routes_removed = ?r.removed, "mesh reloaded");
                                Ok(format!("{} added, {} updated, {} replaced, {} removed, {} unchanged",
                                    diff.added.len(), diff.updated.len(), diff.replaced.len(), diff.removed.len(), diff.unchanged))
                            }
                            Err(e) => {
                                error!(error = %e, "reload: syncing routes failed");
                                Err(format!("peers applied, routes failed: {e}"))
                            }
                        }
                    }
                };
                last_reload = Some(ReloadStatus {
                    at_unix: status::unix_now(),
                    ok: message.is_ok(),
                    message: message.unwrap_or_else(|e| e),
                });
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let s = Status {
                    interface: args.interface.clone(),
                    public_key: dp.public_key().to_base64(),
                    listen_port: port,
                    peers: status::peers(&dp),
                    counters: dp.counters.snapshot(),
                    offload: tun.offload_stats(),
                    reloads,
                    last_reload: last_reload.clone(),
                };
                match s.write(&args.state_dir) {
                    Ok(()) => status_failing = false,
                    Err(e) if !status_failing => {
                        warn!(error = %e, "writing status");
                        status_failing = true;
                    }
                    Err(_) => {}
                }
            }
        }
    }
    info!("stopping");
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}
