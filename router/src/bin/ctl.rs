//! `tunmesh-ctl`: what an operator runs on a node when something is wrong.
//! Argument parsing and printing only; the work is `tunmesh_router::ctl`.
//!
//! - `status`: this node's key, endpoint, pod CIDRs, API connection and
//!   problems, and each peer with endpoint, handshake age, traffic, state;
//! - `graph`: the mesh as Graphviz dot from the Node objects, links from
//!   this node coloured by their handshake (`--svg` renders it with `dot`);
//! - `check`: pings every peer's gateway through the tunnel and says which
//!   links are broken and the likely reason;
//! - `rotate-key`: replaces the node's key without losing a packet, and
//!   waits until every peer uses the new one.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tunmesh_router::ctl::{self, Uninstall};
use tunmesh_router::source::kube::chain;
use tunmesh_router::status::{unix_now, Status};

#[derive(Parser)]
#[command(
    name = "tunmesh-ctl",
    version,
    about = "Inspect and check a tunmesh node"
)]
struct Cli {
    /// The router's state directory (status.json, node.json).
    #[arg(
        long,
        env = "TUNMESH_STATE_DIR",
        default_value = "/var/lib/tunmesh",
        global = true
    )]
    state_dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// This node and its peers, from the router's status.
    Status {
        /// Print the raw status JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// The mesh as Graphviz dot, from the Node objects.
    Graph {
        /// Kubeconfig (default: $KUBECONFIG, ~/.kube/config, in-cluster).
        #[arg(long, env = "TUNMESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Render SVG with Graphviz's `dot` instead of printing dot.
        #[arg(long)]
        svg: bool,
    },
    /// Ping every peer's gateway through the tunnel; exit 1 if any fails.
    Check {
        /// Seconds to wait for each reply.
        #[arg(long, default_value_t = 2)]
        timeout: u64,
    },
    /// Rotate this node's key: the router announces the next key on its
    /// Node, answers handshakes to both while the peers move over, then
    /// drops the old one. Waits until it is done (exit 1 if it is not
    /// within --wait; the rotation goes on in the router).
    RotateKey {
        /// Seconds to wait for the rotation to complete (0: do not wait).
        #[arg(long, default_value_t = 120)]
        wait: u64,
    },
    /// Accept the key Node NODE shows although it was not announced first
    /// (a reinstalled node, a key replaced by hand): routers hold back such
    /// a change and keep the previous key (`tunmesh-ctl status`: "held
    /// key"). Run as an operator: a router's own token may not.
    AcceptKey {
        /// The Node whose key to accept.
        node: String,
        /// Accept only if the Node shows this key (base64).
        #[arg(long)]
        key: Option<String>,
        #[arg(long, env = "TUNMESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove what tunmesh left on this node after its router stopped
    /// (`kubectl delete -k deploy/` first): the TUN device and its routes
    /// if still there, the CNI conflist and binary, this Node's tunmesh.io
    /// annotations, and with --purge the state (key, allocations).
    Uninstall {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node_name: String,
        #[arg(long, env = "TUNMESH_KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        #[arg(long, env = "TUNMESH_INTERFACE", default_value = "tunmesh0")]
        interface: String,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        /// Also delete the state directory (private key, pod address
        /// allocations): only once no pod on this node uses tunmesh.
        #[arg(long)]
        purge: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Status { json } => status(&cli.state_dir, json),
        Cmd::Graph { kubeconfig, svg } => graph(&cli.state_dir, kubeconfig.as_deref(), svg),
        Cmd::Check { timeout } => check(&cli.state_dir, Duration::from_secs(timeout)),
        Cmd::RotateKey { wait } => rotate_key(&cli.state_dir, Duration::from_secs(wait)),
        Cmd::AcceptKey {
            node,
            key,
            kubeconfig,
        } => runtime().and_then(|rt| {
            let line = rt.block_on(ctl::accept_key(
                kubeconfig.as_deref(),
                &node,
                key.as_deref(),
            ))?;
            println!("{line}");
            Ok(ExitCode::SUCCESS)
        }),
        Cmd::Uninstall {
            node_name,
            kubeconfig,
            interface,
            cni_conf_dir,
            cni_bin_dir,
            purge,
        } => runtime().and_then(|rt| {
            let lines = rt.block_on(ctl::uninstall(&Uninstall {
                state_dir: cli.state_dir,
                node_name,
                kubeconfig,
                interface,
                cni_conf_dir,
                cni_bin_dir,
                purge,
            }))?;
            for l in lines {
                println!("{l}");
            }
            Ok(ExitCode::SUCCESS)
        }),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunmesh-ctl: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn read_status(dir: &Path) -> Result<Status> {
    Status::read(dir)
        .with_context(|| format!("is the router running with --state-dir {}?", dir.display()))
}

fn status(dir: &Path, json: bool) -> Result<ExitCode> {
    let s = read_status(dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!("{}", ctl::render_status(&s, unix_now()));
    }
    Ok(ExitCode::SUCCESS)
}

fn graph(dir: &Path, kubeconfig: Option<&Path>, svg: bool) -> Result<ExitCode> {
    let nodes = runtime()?.block_on(ctl::list_nodes(kubeconfig))?;
    // This node's view of its links, if a router runs here.
    let local = Status::read(dir).ok();
    let out = ctl::graph_dot(&nodes, local.as_ref(), unix_now());
    if !svg {
        print!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    let mut child = std::process::Command::new("dot")
        .arg("-Tsvg")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("running Graphviz's `dot` (install graphviz, or drop --svg for dot text)")?;
    if let Some(mut stdin) = child.stdin.take() {
        std::io::Write::write_all(&mut stdin, out.as_bytes())?;
    }
    Ok(if child.wait()?.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn check(dir: &Path, timeout: Duration) -> Result<ExitCode> {
    let s = read_status(dir)?;
    let links = ctl::check(&s, timeout, unix_now())?;
    for l in &links {
        println!("{:<16} {:<28} {}", l.peer, l.gateway.to_string(), l.verdict);
    }
    let broken = links.iter().filter(|l| l.rtt.is_none()).count();
    if broken == 0 {
        println!("all {} links ok", s.peers.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{broken} link(s) broken");
        Ok(ExitCode::FAILURE)
    }
}

fn rotate_key(dir: &Path, wait: Duration) -> Result<ExitCode> {
    let s = read_status(dir)?;
    if s.kubernetes.is_none() {
        anyhow::bail!(
            "this router's peers come from a mesh file, which cannot announce a new key: \
             change the key in every mesh file instead"
        );
    }
    if let Some(r) = &s.key.rotation {
        anyhow::bail!(
            "a rotation to {} is under way already ({} of {} peers on it)",
            r.next_public_key,
            r.peers_done.len(),
            r.peers_done.len() + r.peers_waiting.len()
        );
    }
    let key_file = PathBuf::from(&s.key.key_file);
    let next_file = tunmesh_router::rotation::next_key_file(&key_file);
    if next_file.exists() {
        anyhow::bail!(
            "{} exists: a rotation was asked for already (the router picks it up within a second)",
            next_file.display()
        );
    }
    let next = tunmesh_router::PrivateKey::generate();
    next.write_file(&next_file)?;
    let from = s.public_key.clone();
    let to = next.public_key().to_base64();
    println!("rotating {from} -> {to}");
    if wait.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = std::time::Instant::now() + wait;
    let mut said = String::new();
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let Ok(s) = Status::read(dir) else { continue };
        if s.public_key == to {
            println!("done: {}", ctl::key_line(&s.key));
            return Ok(ExitCode::SUCCESS);
        }
        // Progress, when it changes (not the key's age, every second).
        let progress = format!(
            "{:?}",
            s.key
                .rotation
                .as_ref()
                .map(|r| (&r.peers_done, r.announced))
        );
        if progress != said {
            println!("{}", ctl::key_line(&s.key));
            said = progress;
        }
    }
    println!(
        "not done after {} s; the router goes on with it (tunmesh-ctl status)",
        wait.as_secs()
    );
    Ok(ExitCode::FAILURE)
}
