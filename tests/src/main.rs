//! `tunmesh-lab`: a tunmesh cluster in network namespaces on one machine.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tunmesh_lab::lab::{self, Lab, LabOptions, DEFAULT_ROOT};
use tunmesh_lab::{bench, checks, conformance, netns, soak};

#[derive(Parser)]
#[command(
    name = "tunmesh-lab",
    version,
    about = "A tunmesh cluster in network namespaces (needs root)"
)]
struct Cli {
    /// Directory holding lab records.
    #[arg(long, env = "TUNMESH_LAB_ROOT", default_value = DEFAULT_ROOT, global = true)]
    root: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a cluster and leave it running; prints node and pod names.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// Static mesh files instead of a Kubernetes control plane.
        #[arg(long)]
        peers_file: bool,
        /// Real nodes: containerd, kubelet and kube-proxy on every node,
        /// tunmesh installed with `kubectl apply -k deploy/`.
        #[arg(long, conflicts_with = "peers_file")]
        kubelet: bool,
    },
    /// kubectl against the lab's cluster, as its admin: kubectl -- ARGS...
    Kubectl {
        #[arg(long, env = "TUNMESH_LAB")]
        lab: Option<String>,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Remove a lab (the newest, or --lab ID, or --all).
    Down {
        #[arg(long, env = "TUNMESH_LAB")]
        lab: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Run a command inside a node's or pod's namespace: exec NAME -- CMD...
    Exec {
        #[arg(long, env = "TUNMESH_LAB")]
        lab: Option<String>,
        /// node-N, node-N-pod-M, or underlay
        name: String,
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// List running labs.
    List,
    /// Throughput of tunmesh against raw veth, wireguard-go (both Debian
    /// packages) and boringtun-cli, side by side. Missing peers are
    /// installed first with scripts/install-anchors.sh (from the checkout
    /// this was built in); the last line compares tunmesh with the newer
    /// wireguard-go, or says n/a and why (exit status 1).
    Bench {
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        #[arg(long, default_value_t = 3)]
        reps: u32,
        /// Also write the rows and medians as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Comma-separated subset of raw,tunmesh,wggo,wggo_new,boringtun.
        #[arg(long, value_delimiter = ',', default_values_t = bench::ALL_CONFIGS.map(String::from))]
        configs: Vec<String>,
        /// Comma-separated subset of tcp1,tcp4,udp (throughput) and
        /// rr_udp,rr_tcp,rr_udp_load,rr_tcp_load,crr1,crr8,pps64 (latency,
        /// connections and small packets).
        #[arg(long, value_delimiter = ',', default_values_t = bench::default_tests())]
        tests: Vec<String>,
        /// Where scripts/install-anchors.sh put wireguard-go-new and boringtun-cli.
        #[arg(long, env = "TUNMESH_ANCHORS", default_value = bench::DEFAULT_ANCHORS)]
        anchors: PathBuf,
        /// Do not install missing peers; report them missing.
        #[arg(long)]
        no_install: bool,
    },
    /// One flow sealed and opened by the engine with 1 and with 2 crypto
    /// workers, over in-memory batches (no kernel, no root needed); ends
    /// with `engine: one flow 2/1 workers = S`, the median of the
    /// per-repetition ratios.
    EngineBench {
        #[arg(long, default_value_t = 5)]
        reps: u32,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Run only this many workers, once, for `--seconds` (to profile
        /// one configuration): prints its Gbit/s and no ratio.
        #[arg(long)]
        only: Option<usize>,
    },
    /// iperf3 through the mesh for minutes while nodes join and leave;
    /// reports router memory and fails on a dead router or stuck peer.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Seconds between a node joining and leaving.
        #[arg(long, default_value_t = 30)]
        every: u64,
        /// Resident memory a router may reach, MiB.
        #[arg(long, default_value_t = 64)]
        rss_bound_mib: u64,
    },
    /// A router's cost among thousands of Nodes: K real routers and N
    /// hollow Nodes in the lab's API server (realistic status, tunmesh's
    /// annotations), each N a lab of its own; prints one row per N (cold
    /// start to a full mesh, memory, CPU idle and under status reports,
    /// mesh change latency, API bytes, handover and warm start with N live
    /// sessions with --live, probes lost).
    Scale {
        /// Real routers (each with a pod).
        #[arg(long, default_value_t = 2)]
        routers: usize,
        /// Hollow Nodes, comma-separated sizes.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
        nodes: Vec<usize>,
        /// Images in each hollow Node's status (a kubelet reports up to 50).
        #[arg(long, default_value_t = 50)]
        images: usize,
        /// Seconds of each CPU window.
        #[arg(long, default_value_t = 20.0)]
        seconds: f64,
        /// Mesh changes to time (one a second).
        #[arg(long, default_value_t = 20)]
        changes: usize,
        /// Live sessions with every hollow Node (a WireGuard responder
        /// answers as each), then a handover and a warm start with them.
        #[arg(long)]
        live: bool,
        /// Also write the rows as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Kubernetes' own network e2e tests on a lab of real nodes: up
    /// --kubelet, e2e.test (the pinned release), down. By default every
    /// [sig-network] test the release tags [Conformance] and the rest of
    /// the network list. Ends with how many of the release's [sig-network]
    /// [Conformance] tests ran and `conformance: P passed, F failed, S
    /// skipped`; exit status 1 unless every selected test ran and passed.
    Conformance {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Only what CI runs: the four [Conformance] tests of "Networking
        /// Granular Checks: Pods" and the [Conformance] HostPort test.
        #[arg(long)]
        ci: bool,
        /// A regular expression of more tests to run (repeatable).
        #[arg(long)]
        focus: Vec<String>,
        /// Where e2e.test's log and reports go.
        #[arg(long, default_value = "target/conformance")]
        out: PathBuf,
        /// Leave the lab running afterwards (for a look at a failure).
        #[arg(long)]
        keep: bool,
    },
    /// Up, check every pod-to-pod and node-to-pod pair, iperf3, down.
    Demo {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods_per_node: usize,
        /// iperf3 duration in seconds.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Static mesh files instead of a Kubernetes control plane.
        #[arg(long)]
        peers_file: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM: remove the lab being built or demonstrated, then exit.
    let _ = ctrlc::set_handler(|| {
        if let Some(dir) = lab::current() {
            eprintln!("\ninterrupted: removing lab {}", dir.display());
            let _ = lab::teardown(&dir);
        }
        if let Some(prefix) = netns::purge_on_signal() {
            eprintln!("\ninterrupted: removing namespaces {prefix}*");
            netns::purge_prefix(&prefix);
        }
        std::process::exit(130);
    });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tunmesh-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn need_root() -> Result<()> {
    if !tunmesh_lab::is_root() {
        bail!("the lab creates network namespaces and needs root (try sudo)");
    }
    Ok(())
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Up {
            nodes,
            pods_per_node,
            peers_file,
            kubelet,
        } => {
            need_root()?;
            let mut lab = Lab::up(&LabOptions {
                nodes,
                pods_per_node,
                root: cli.root,
                mesh_file: peers_file,
                kubelet,
                ..Default::default()
            })?;
            lab.keep();
            lab::set_current(None);
            print_lab(&lab);
            println!("\nlab {} is up; `tunmesh-lab exec NAME -- CMD` to use it, `tunmesh-lab kubectl -- ARGS` for its cluster, `tunmesh-lab down` to remove it", lab.state.id);
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Down { lab, all } => {
            need_root()?;
            let ids: Vec<String> = if all {
                Lab::list(&cli.root)
            } else {
                vec![Lab::load(&cli.root, lab.as_deref())?.state.id.clone()]
            };
            for id in ids {
                lab::teardown(&cli.root.join(&id))?;
                println!("lab {id} removed");
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Exec { lab, name, cmd } => {
            need_root()?;
            let lab = Lab::load(&cli.root, lab.as_deref())?;
            let ns = lab.resolve(&name)?;
            let mut command = std::process::Command::new("ip");
            command.args(["netns", "exec", &ns]).args(&cmd);
            // In a node, tunmesh-ctl and friends find that node's router
            // without flags, as they would on a real node (a real node's
            // own mount namespace holds its /var/lib/tunmesh).
            if let Some(c) = lab.real_node_command(&name, &cmd) {
                command = c;
            } else if let Some(n) = lab.node(&name) {
                command
                    .env("TUNMESH_STATE_DIR", &n.state_dir)
                    .env("NODE_NAME", &n.name)
                    .env("TUNMESH_INTERFACE", &n.interface);
                if let Some(kc) = &n.kubeconfig {
                    command.env("TUNMESH_KUBECONFIG", kc);
                }
            }
            if let Some(dir) = lab.state.router_bin.parent() {
                let path = std::env::var("PATH").unwrap_or_default();
                command.env("PATH", format!("{}:{path}", dir.display()));
            }
            let status = command
                .status()
                .with_context(|| format!("running {} in {name}", cmd.join(" ")))?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
        Cmd::Kubectl { lab, args } => {
            need_root()?;
            let lab = Lab::load(&cli.root, lab.as_deref())?;
            let cp = lab.control_plane()?;
            let status = std::process::Command::new("ip")
                .args(["netns", "exec", &cp.ns])
                .arg(cp.bin.join("kubectl"))
                .arg(format!("--kubeconfig={}", cp.admin_kubeconfig().display()))
                .args(&args)
                .status()
                .context("running kubectl")?;
            Ok(ExitCode::from(
                status.code().unwrap_or(1).clamp(0, 255) as u8
            ))
        }
        Cmd::List => {
            for id in Lab::list(&cli.root) {
                let lab = Lab::load(&cli.root, Some(&id))?;
                println!(
                    "{id}: {} nodes, {} pods",
                    lab.state.nodes.len(),
                    lab.state.pods.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::EngineBench {
            reps,
            seconds,
            json,
            only,
        } => {
            if let Some(workers) = only {
                let g = bench::engine::run_one(workers, seconds)?;
                println!("engine: one flow, {workers} workers: {g:.2} Gbit/s");
                return Ok(ExitCode::SUCCESS);
            }
            let report = bench::engine::run(reps, seconds)?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            println!("{}", report.line());
            Ok(if report.speedup.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Bench {
            seconds,
            reps,
            json,
            configs,
            tests,
            anchors,
            no_install,
        } => {
            need_root()?;
            let report = bench::run(&bench::BenchOptions {
                seconds,
                reps,
                configs,
                tests,
                anchors,
                install: !no_install,
            })?;
            println!("\n{}", bench::table(&report));
            if !report.latency_summaries.is_empty() {
                println!(
                    "{}",
                    bench::latency::table(&report.latency_summaries, bench::HEADLINE_PEER)
                );
            }
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("JSON written to {}", path.display());
            }
            if report
                .latency_summaries
                .iter()
                .any(|s| s.config == "tunmesh")
            {
                for l in report.latency_lines() {
                    println!("{l}");
                }
            }
            println!("{}", report.headline.line());
            Ok(match report.headline {
                bench::Headline::Measured(_) => ExitCode::SUCCESS,
                bench::Headline::NotAvailable { .. } => ExitCode::FAILURE,
            })
        }
        Cmd::Soak {
            minutes,
            every,
            rss_bound_mib,
        } => {
            need_root()?;
            soak::run(&soak::SoakOptions {
                minutes,
                every: std::time::Duration::from_secs(every.max(5)),
                rss_bound_mib,
                root: cli.root,
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Scale {
            routers,
            nodes,
            images,
            seconds,
            changes,
            live,
            json,
        } => {
            need_root()?;
            if !(1..=20).contains(&routers) || routers < 2 {
                anyhow::bail!("--routers must be 2-20");
            }
            let rows = tunmesh_lab::scale::run(&tunmesh_lab::scale::Options {
                routers,
                sizes: nodes,
                images,
                seconds,
                changes,
                live,
                root: cli.root,
            })?;
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_vec_pretty(&rows)?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Conformance {
            nodes,
            ci,
            focus,
            out,
            keep,
        } => {
            need_root()?;
            let mut list: Vec<String> = if ci {
                conformance::CI.iter().map(|s| s.to_string()).collect()
            } else {
                std::iter::once(conformance::SIG_NETWORK_CONFORMANCE)
                    .chain(conformance::NETWORK.iter().copied())
                    .map(String::from)
                    .collect()
            };
            list.extend(focus);
            println!(
                "building a {nodes}-node lab of real nodes (containerd, kubelet, kube-proxy)..."
            );
            let mut lab = Lab::up(&LabOptions {
                nodes,
                pods_per_node: 0,
                root: cli.root,
                kubelet: true,
                ..Default::default()
            })?;
            print_lab(&lab);
            let out = std::path::absolute(&out)?;
            // What the focus selects, and the release's [sig-network]
            // [Conformance] tests, as ginkgo's dry run lists them.
            let selected = conformance::select(&lab, &list, &out);
            let release = conformance::select(
                &lab,
                &[conformance::SIG_NETWORK_CONFORMANCE.to_string()],
                &out,
            );
            println!("\nrunning e2e.test, focus:");
            for f in &list {
                println!("  {f}");
            }
            println!("(log: {})", out.join("e2e.log").display());
            let result = match (&selected, &release) {
                (Ok(sel), Ok(rel)) => {
                    println!(
                        "{} tests selected; the release tags {} [sig-network] tests [Conformance]",
                        sel.len(),
                        rel.len()
                    );
                    conformance::run(
                        &lab,
                        &conformance::Options {
                            focus: list,
                            out: out.clone(),
                        },
                    )
                }
                (Err(e), _) | (_, Err(e)) => Err(anyhow::anyhow!("listing the tests: {e:#}")),
            };
            if keep {
                lab.keep();
                lab::set_current(None);
                println!("lab {} kept; `tunmesh-lab down` removes it", lab.state.id);
            } else {
                lab.down()?;
            }
            let s = result?;
            let (selected, release) = (selected?, release?);
            for (re, why) in conformance::NOT_HERE {
                println!("not run here: /{re}/: {why}");
            }
            for n in &s.passed {
                println!("passed:  {n}");
            }
            for (n, why) in &s.skipped {
                println!("skipped: {n}: {why}");
            }
            for n in &s.failed {
                println!("FAILED:  {n}");
            }
            let not_run = s.missing(&selected);
            for n in &not_run {
                println!("NOT PASSED: {n}");
            }
            let conformant = release.len() - s.missing(&release).len();
            println!(
                "conformance: {conformant} of the release's {} [sig-network] [Conformance] tests passed",
                release.len()
            );
            // By default all of them must; with --ci, the CI set.
            let all = ci || conformant == release.len();
            println!("{}", s.line());
            Ok(
                if all && not_run.is_empty() && s.failed.is_empty() && s.skipped.is_empty() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        Cmd::Demo {
            nodes,
            pods_per_node,
            seconds,
            peers_file,
        } => {
            need_root()?;
            demo(&cli.root, nodes, pods_per_node, seconds, peers_file)
        }
    }
}

fn print_lab(lab: &Lab) {
    println!(
        "{:14} {:16} {:20} {:22}",
        "node", "underlay", "pod CIDR (IPv4)", "pod CIDR (IPv6)"
    );
    for n in &lab.state.nodes {
        println!(
            "{:14} {:16} {:20} {:22}",
            n.name,
            n.underlay_ip.to_string(),
            n.pod_cidr_v4,
            n.pod_cidr_v6
        );
    }
    if lab.state.nodes.iter().any(|n| n.kubelet.is_some()) {
        // Real nodes: the scheduler placed the pods; the API server lists them.
        match lab.kube_pods("default", "app=web") {
            Ok(pods) => {
                println!("\n{:28} {:10} addresses", "pod", "node");
                for p in pods {
                    let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
                    println!("{:28} {:10} {}", p.name, p.node, ips.join(" "));
                }
            }
            Err(e) => println!("\npods: {e:#}"),
        }
        return;
    }
    println!("\n{:14} {:16} {:22}", "pod", "IPv4", "IPv6");
    for p in &lab.state.pods {
        println!(
            "{:14} {:16} {:22}",
            p.name,
            p.ipv4.to_string(),
            p.ipv6.to_string()
        );
    }
}

fn demo(
    root: &std::path::Path,
    nodes: usize,
    pods_per_node: usize,
    seconds: u32,
    peers_file: bool,
) -> Result<ExitCode> {
    if nodes < 2 || pods_per_node < 1 {
        bail!("the demo needs at least 2 nodes with 1 pod each");
    }
    println!(
        "building a {nodes}-node lab with {pods_per_node} pods per node, peers from {}...",
        if peers_file {
            "static mesh files"
        } else {
            "Node objects (etcd, kube-apiserver, kube-controller-manager)"
        }
    );
    let lab = Lab::up(&LabOptions {
        nodes,
        pods_per_node,
        root: root.to_path_buf(),
        mesh_file: peers_file,
        ..Default::default()
    })?;
    println!("pods attached by tunmesh-cni (CNI ADD, run as a container runtime runs it):");
    print_lab(&lab);
    if let Ok(out) = lab.kubectl(&["get", "nodes", "-o", "custom-columns=NODE:.metadata.name,INTERNAL-IP:.status.addresses[0].address,POD-CIDRS:.spec.podCIDRs,ENDPOINT:.metadata.annotations.tunmesh\\.io/endpoint"]) {
        println!("\nkubectl get nodes:\n{}", out.trim_end());
    }
    println!("\nchecking every pod-to-pod and node-to-pod pair (ping and a {} KiB TCP transfer, IPv4 and IPv6)...", checks::TCP_CHECK_BYTES / 1024);
    let results = checks::matrix(&lab);
    print!("{}", checks::matrix_table(&results));
    let ok = results.iter().filter(|r| r.ok()).count();
    let (a, b) = (
        &lab.state.pods[0],
        lab.state
            .pods
            .iter()
            .find(|p| p.node != 0)
            .context("no pod on a second node")?,
    );
    println!(
        "\niperf3 {} -> {} ({}s, TCP, 1 stream)...",
        a.name, b.name, seconds
    );
    let gbps = match checks::iperf3(&a.ns, &b.ns, b.ipv4.into(), seconds, &[]) {
        Ok(r) => r.gbps,
        Err(e) => {
            eprintln!("iperf3 failed: {e:#}");
            0.0
        }
    };
    for n in &lab.state.nodes {
        if let Ok(s) = lab.router_status(&n.name) {
            println!(
                "{}: {} peers, drops: {}",
                n.name,
                s.peers.len(),
                s.counters.drops_summary()
            );
        }
    }
    lab.down()?;
    println!(
        "demo: {ok}/{} pairs reachable, iperf3 {gbps:.2} Gbit/s",
        results.len()
    );
    Ok(if ok == results.len() && gbps > 0.0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
