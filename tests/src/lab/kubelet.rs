//! Real nodes (`tunmesh-lab up --kubelet`): each node namespace also gets
//! a private mount namespace and cgroup root, and in them containerd,
//! kubelet and kube-proxy, built from the pinned Kubernetes release. tunmesh
//! is installed only as operators install it: its image imported into every
//! node's containerd and `kubectl apply -k deploy/`; kubelet starts the
//! DaemonSet, containerd's CRI calls `tunmesh-cni`, the scheduler places the
//! pods and kube-proxy programs Services.
//!
//! ```text
//!  tm<id>-node-N  (network namespace; eth0 172.28.0.1N, fd00:172:28::1N)
//!    holder: `unshare --mount` (keeps the node's mount namespace), in which
//!      /etc/cni/net.d, /opt/cni/bin, /var/lib/{kubelet,containerd,cni,tunmesh},
//!      /run/{containerd,wireguard,netns}, /var/log/{pods,containers},
//!      /etc/kubernetes are the node's own directories, bound from
//!      /run/tunmesh-lab/<id>/node-N/root/, and the sysctls kubelet rewrites
//!      (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops) are
//!      files of its own, so nodes do not fight over the shared kernel
//!    containerd, kubelet (cgroupfs, cgroup root /tm<id>-node-N), kube-proxy
//!    (iptables mode): processes tracked in the pids cgroup
//!    /tm<id>-node-N.daemons, so teardown finds shims and containers too
//! ```

use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::*;
use crate::controlplane;
use crate::netns::{self, ip};

/// The node's own directories: (name under the node's root, path in the node).
const BINDS: &[(&str, &str)] = &[
    ("etc-cni-net.d", "/etc/cni/net.d"),
    ("opt-cni-bin", "/opt/cni/bin"),
    ("var-lib-kubelet", "/var/lib/kubelet"),
    ("var-lib-containerd", "/var/lib/containerd"),
    ("var-lib-cni", "/var/lib/cni"),
    ("var-lib-tunmesh", "/var/lib/tunmesh"),
    ("run-containerd", "/run/containerd"),
    ("run-wireguard", "/run/wireguard"),
    ("run-netns", "/run/netns"),
    ("var-log-pods", "/var/log/pods"),
    ("var-log-containers", "/var/log/containers"),
    ("etc-kubernetes", "/etc/kubernetes"),
];

/// Sysctls kubelet sets on start, each given a file of the node's own:
/// (file name, path, initial value).
const SYSCTLS: &[(&str, &str, &str)] = &[
    ("overcommit_memory", "/proc/sys/vm/overcommit_memory", "1"),
    ("panic", "/proc/sys/kernel/panic", "10"),
    ("panic_on_oops", "/proc/sys/kernel/panic_on_oops", "1"),
];

/// The images every node holds (no registry is reachable): archive file
/// names in the set `scripts/node-images.sh` prints.
const NODE_IMAGES: &[&str] = &[
    "pause.tar",
    "busybox.tar",
    "agnhost.tar",
    "coredns.tar",
    "glibc-dns-testing.tar",
    "nginx.tar",
];

/// The tunmesh image's archive in the lab's directory.
const TUNMESH_IMAGE_FILE: &str = "tunmesh-image.tar";

/// What tunmesh's DaemonSet leaves on a node for the runtime: the
/// conflist and the plugin (paths under the node's root).
pub const CNI_FILES: &[&str] = &[
    "etc-cni-net.d/10-tunmesh.conflist",
    "opt-cni-bin/tunmesh-cni",
    "opt-cni-bin/tunmesh-portmap",
];

/// How a real node joins a running lab.
#[derive(Debug, Default)]
pub struct Join<'a> {
    /// Leave the tunmesh image out of the node's containerd, so its
    /// router cannot start until [`Lab::import_tunmesh_image`].
    pub without_tunmesh_image: bool,
    /// Copy tunmesh's CNI files from this node first, as a node made from
    /// another's disk image has them: kubelet then reports the network
    /// ready before the node's router is.
    pub cni_files_from: Option<&'a str>,
}

const CGROUP_FS: &str = "/sys/fs/cgroup";

/// What the lab keeps about a real node, for teardown and later joins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KubeletNode {
    /// Host directory holding the node's own directories.
    pub root: PathBuf,
    /// kubelet's cgroup root, made in every v1 hierarchy (`tm<id>-node-N`).
    pub cgroup: String,
    pub underlay_ip6: Ipv6Addr,
    pub holder_pid: Option<u32>,
    pub containerd_pid: Option<u32>,
    pub kubelet_pid: Option<u32>,
    pub proxy_pid: Option<u32>,
}

/// The underlay's IPv6 address of node `i` (and the control plane's, 2).
pub fn underlay_ip6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x172, 0x28, 0, 0, 0, 0, 10 + i as u16)
}

pub const API_IP6: &str = "fd00:172:28::2";

/// The tunmesh image's name as deploy/kustomization.yaml sets it, the way
/// containerd's CRI spells it (`tunmesh:0.1.0` → docker.io/library/...).
pub fn tunmesh_image() -> Result<String> {
    let text = std::fs::read_to_string(controlplane::deploy_dir().join("kustomization.yaml"))
        .context("reading deploy/kustomization.yaml")?;
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(k))
            .map(|v| v.trim().trim_matches('"').to_string())
    };
    let (name, tag) = field("newName:")
        .zip(field("newTag:"))
        .context("deploy/kustomization.yaml sets no newName/newTag for the tunmesh image")?;
    Ok(format!("docker.io/library/{name}:{tag}"))
}

fn hierarchies() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(CGROUP_FS)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n != "unified"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn daemons_cgroup(kn: &KubeletNode) -> PathBuf {
    Path::new(CGROUP_FS)
        .join("pids")
        .join(format!("{}.daemons", kn.cgroup))
}

/// Every process in a cgroup directory and below it.
fn cgroup_pids(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.path().is_dir() {
                cgroup_pids(&e.path(), out);
            }
        }
    }
}

/// Removes a cgroup directory tree, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(d) = std::fs::read_dir(dir) {
        for e in d.flatten() {
            if e.path().is_dir() {
                remove_cgroup(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Stops a real node: kubelet first (so it restarts nothing), then every
/// process of the node (daemons, shims, containers) until none is left,
/// then its cgroups. Its mount namespace goes with its last process.
pub fn stop_node(kn: &KubeletNode) {
    for pid in [kn.kubelet_pid, kn.proxy_pid].into_iter().flatten() {
        netns::stop_pid(pid, Duration::from_secs(3));
    }
    let roots: Vec<PathBuf> = [
        Path::new(CGROUP_FS).join("pids").join(&kn.cgroup),
        daemons_cgroup(kn),
    ]
    .into();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut pids = Vec::new();
        for r in &roots {
            cgroup_pids(r, &mut pids);
        }
        pids.extend(kn.holder_pid.filter(|p| netns::is_running(*p)));
        if pids.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a PID from the node's own cgroups.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every hierarchy, the unified one too (runc makes the pod's there).
    let all = std::fs::read_dir(CGROUP_FS)
        .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default();
    for h in all {
        remove_cgroup(&h.join(&kn.cgroup));
        remove_cgroup(&h.join(format!("{}.daemons", kn.cgroup)));
    }
}

/// Runs a command to completion in the node's namespaces.
fn node_run(ns: &str, kn: &KubeletNode, args: &[&str]) -> Result<String> {
    let holder = kn
        .holder_pid
        .context("the node has no mount namespace holder")?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns::netns_path(ns).display()))
        .arg(format!("--mount=/proc/{holder}/ns/mnt"))
        .arg("--")
        .args(args)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} in node {ns}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} in node {ns}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports an image archive into the node's containerd, where the CRI
/// finds it (namespace k8s.io).
fn import_image(ns: &str, kn: &KubeletNode, archive: &Path) -> Result<()> {
    let sock = "/run/containerd/containerd.sock";
    let archive = archive.to_string_lossy();
    node_run(
        ns,
        kn,
        &[
            "ctr", "-a", sock, "-n", "k8s.io", "images", "import", &archive,
        ],
    )?;
    Ok(())
}

/// Starts a daemon of the node in its own process group, in the node's
/// namespaces (or, for the holder, only its network namespace) and in
/// the node's daemons cgroup, output to `log`.
fn node_spawn(ns: &str, kn: &KubeletNode, args: &[&str], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(daemons_cgroup(kn).join("cgroup.procs"))
        .arg("nsenter")
        .arg(format!("--net={}", netns::netns_path(ns).display()));
    if let Some(holder) = kn.holder_pid {
        c.arg(format!("--mount=/proc/{holder}/ns/mnt"));
    }
    c.arg("--")
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOME", "/root")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    let child = c
        .spawn()
        .with_context(|| format!("starting {} in node {ns}", args.join(" ")))?;
    Ok(child.id())
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Lab {
    /// Builds the cluster of real nodes once the control plane runs:
    /// images, nodes with containerd, kubelet and kube-proxy, tunmesh from
    /// deploy/, CoreDNS, and the test pods.
    pub(super) fn build_kubelet(&mut self, opts: &LabOptions) -> Result<()> {
        let cp = self.control_plane()?.clone();
        netns::run(
            "ip",
            &[
                "-n",
                &cp.ns,
                "addr",
                "add",
                &format!("{API_IP6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        let images = self.build_images(&cp.bin)?;
        self.state.node_images = images.clone();
        self.save()?;
        for _ in 0..opts.nodes {
            let i = self.add_node_namespace()?;
            self.start_kubelet_node(i, &images)?;
        }
        for i in 0..opts.nodes {
            self.wait_kubelet_node(i)?;
        }
        self.install_tunmesh()?;
        self.install_coredns()?;
        for i in 0..opts.nodes {
            self.wait_node_ready_condition(i, Duration::from_secs(120))?;
        }
        self.rollout(
            "kube-system",
            "deployment/coredns",
            Duration::from_secs(180),
        )?;
        if opts.pods_per_node > 0 {
            self.start_web(opts.nodes * opts.pods_per_node)?;
        }
        self.save()
    }

    /// The node images (from `scripts/node-images.sh`) and the tunmesh
    /// image (from `scripts/build-image.sh`, with the binaries this lab
    /// runs), as archive paths.
    fn build_images(&self, bin: &Path) -> Result<Vec<PathBuf>> {
        let scripts = controlplane::deploy_dir().join("../scripts");
        let out = Command::new("bash")
            .arg(scripts.join("node-images.sh"))
            .arg(bin)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .context("running scripts/node-images.sh")?;
        if !out.status.success() {
            bail!("scripts/node-images.sh failed (see its messages above)");
        }
        let set = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let mut images: Vec<PathBuf> = NODE_IMAGES.iter().map(|n| set.join(n)).collect();
        let tunmesh = self.state.dir.join(TUNMESH_IMAGE_FILE);
        let bin_dir = self
            .state
            .router_bin
            .parent()
            .context("the router binary has no directory")?;
        let status = Command::new("bash")
            .arg(scripts.join("build-image.sh"))
            .args(["--tag", &tunmesh_image()?, "--output"])
            .arg(&tunmesh)
            .arg("--bin-dir")
            .arg(bin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .context("running scripts/build-image.sh")?;
        if !status.success() {
            bail!("scripts/build-image.sh failed (see its messages above)");
        }
        images.push(tunmesh);
        for p in &images {
            if !p.is_file() {
                bail!("image archive {} is missing", p.display());
            }
        }
        Ok(images)
    }

    /// Builds a tunmesh image named `tag` from the binaries in `bin_dir`
    /// (`scripts/build-image.sh`) and imports it into every real node's
    /// containerd: another version to roll out to.
    pub fn add_tunmesh_image(&self, tag: &str, bin_dir: &Path) -> Result<()> {
        let scripts = controlplane::deploy_dir().join("../scripts");
        let file = self.state.dir.join(format!(
            "tunmesh-image-{}.tar",
            tag.replace([':', '/'], "-")
        ));
        let status = Command::new("bash")
            .arg(scripts.join("build-image.sh"))
            .args(["--tag", tag, "--output"])
            .arg(&file)
            .arg("--bin-dir")
            .arg(bin_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .context("running scripts/build-image.sh")?;
        if !status.success() {
            bail!("scripts/build-image.sh --tag {tag} failed (see its messages above)");
        }
        for n in &self.state.nodes {
            if let Some(kn) = &n.kubelet {
                import_image(&n.ns, kn, &file)
                    .with_context(|| format!("importing {tag} into {}", n.name))?;
            }
        }
        Ok(())
    }

    /// The host directory holding node `i`'s own directories.
    fn node_root(&self, i: usize) -> PathBuf {
        self.state.dir.join(&self.state.nodes[i].name).join("root")
    }

    /// Node `i`'s mount namespace, cgroups, containerd with the images,
    /// kubelet and kube-proxy.
    pub fn start_kubelet_node(&mut self, i: usize, images: &[PathBuf]) -> Result<()> {
        let n = self.state.nodes[i].clone();
        let cp = self.control_plane()?.clone();
        let num = node_number(&n.name, i);
        let root = self.node_root(i);
        let mut kn = KubeletNode {
            root: root.clone(),
            cgroup: n.ns.clone(),
            underlay_ip6: underlay_ip6(num),
            holder_pid: None,
            containerd_pid: None,
            kubelet_pid: None,
            proxy_pid: None,
        };
        self.state.nodes[i].kubelet = Some(kn.clone());
        self.save()?;
        netns::run(
            "ip",
            &[
                "-n",
                &n.ns,
                "addr",
                "add",
                &format!("{}/64", kn.underlay_ip6),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        // Service addresses are translated by kube-proxy after routing:
        // locally sent packets need a route to reach its rules.
        ip(&[
            "-n",
            &n.ns,
            "route",
            "add",
            controlplane::SERVICE_CIDR,
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &n.ns,
            "route",
            "add",
            controlplane::SERVICE_CIDR_V6,
            "dev",
            "eth0",
        ])?;

        // cgroups: kubelet's root in every v1 hierarchy, the daemons' in pids.
        for h in hierarchies() {
            let dir = h.join(&kn.cgroup);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = std::fs::read_to_string(h.join(f))?;
                    std::fs::write(dir.join(f), v.trim())?;
                }
            }
        }
        std::fs::create_dir_all(daemons_cgroup(&kn))?;

        // The node's own directories and sysctl files.
        for (name, path) in BINDS {
            std::fs::create_dir_all(root.join(name))?;
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating {path} on the host"))?;
        }
        std::fs::create_dir_all(root.join("sys"))?;
        for (name, _, value) in SYSCTLS {
            std::fs::write(root.join("sys").join(name), value)?;
        }
        std::fs::copy("/usr/lib/cni/loopback", root.join("opt-cni-bin/loopback")).context(
            "copying /usr/lib/cni/loopback (apt-get install containernetworking-plugins)",
        )?;
        let etc = root.join("etc-kubernetes");
        let node_etc = Path::new("/etc/kubernetes");
        cp.kubelet_credentials(&n.name, &etc, node_etc)?;
        std::fs::write(etc.join("resolv.conf"), "nameserver 172.28.0.2\n")?;
        std::fs::write(etc.join("containerd.toml"), CONTAINERD_TOML)?;
        std::fs::write(
            etc.join("kubelet.json"),
            kubelet_config(&kn.cgroup).to_string(),
        )?;
        std::fs::write(
            etc.join("kube-proxy.json"),
            kube_proxy_config(&n.name).to_string(),
        )?;

        let ndir = self.state.dir.join(&n.name);
        kn.holder_pid = Some(node_spawn(
            &n.ns,
            &kn,
            &[
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sleep",
                "infinity",
            ],
            &ndir.join("holder.log"),
        )?);
        self.state.nodes[i].kubelet = Some(kn.clone());
        self.save()?;
        // The holder's mount namespace exists once it has unshared.
        let holder = kn.holder_pid.unwrap_or_default();
        let own = std::fs::read_link("/proc/self/ns/mnt")?;
        netns::wait_for(Duration::from_secs(5), || {
            let ns = std::fs::read_link(format!("/proc/{holder}/ns/mnt")).ok()?;
            (ns != own
                && std::fs::read_to_string(format!("/proc/{holder}/comm"))
                    .ok()?
                    .trim()
                    == "sleep")
                .then_some(())
        })
        .context("the node's mount namespace did not appear")?;
        for (name, path) in BINDS {
            let src = root.join(name);
            node_run(
                &n.ns,
                &kn,
                &["mount", "--bind", &src.to_string_lossy(), path],
            )?;
        }
        node_run(&n.ns, &kn, &["mount", "--make-rshared", "/var/lib/kubelet"])?;
        for (name, path, _) in SYSCTLS {
            let src = root.join("sys").join(name);
            node_run(
                &n.ns,
                &kn,
                &["mount", "--bind", &src.to_string_lossy(), path],
            )?;
        }

        let log = ndir.join("containerd.log");
        kn.containerd_pid = Some(node_spawn(
            &n.ns,
            &kn,
            &["containerd", "--config", "/etc/kubernetes/containerd.toml"],
            &log,
        )?);
        self.state.nodes[i].kubelet = Some(kn.clone());
        self.save()?;
        let sock = root.join("run-containerd/containerd.sock");
        let pid = kn.containerd_pid.unwrap_or_default();
        if netns::wait_for(Duration::from_secs(30), || {
            if !netns::is_running(pid) {
                return Some(false);
            }
            (sock.exists()
                && node_run(
                    &n.ns,
                    &kn,
                    &["ctr", "-a", "/run/containerd/containerd.sock", "version"],
                )
                .is_ok())
            .then_some(true)
        }) != Some(true)
        {
            bail!(
                "containerd on {} did not start; its log ends:\n{}",
                n.name,
                log_tail(&log)
            );
        }
        for img in images {
            import_image(&n.ns, &kn, img)
                .with_context(|| format!("importing {} into {}", img.display(), n.name))?;
        }

        let node_ip = format!("{},{}", n.underlay_ip, kn.underlay_ip6);
        let kubelet = cp.bin.join("kubelet");
        kn.kubelet_pid = Some(node_spawn(
            &n.ns,
            &kn,
            &[
                &kubelet.to_string_lossy(),
                "--config=/etc/kubernetes/kubelet.json",
                "--kubeconfig=/etc/kubernetes/kubelet.kubeconfig",
                &format!("--hostname-override={}", n.name),
                &format!("--node-ip={node_ip}"),
                "--v=1",
            ],
            &ndir.join("kubelet.log"),
        )?);
        let proxy = cp.bin.join("kube-proxy");
        kn.proxy_pid = Some(node_spawn(
            &n.ns,
            &kn,
            &[
                &proxy.to_string_lossy(),
                "--config=/etc/kubernetes/kube-proxy.json",
                "--v=1",
            ],
            &ndir.join("kube-proxy.log"),
        )?);
        self.state.nodes[i].kubelet = Some(kn);
        self.save()
    }

    /// Waits until node `i`'s kubelet registered its Node and the IPAM
    /// controller gave it podCIDRs; records them, and routes the control
    /// plane's traffic for them to the node (the API server and the e2e
    /// runner reach pods without NAT, as on any cluster's control plane).
    pub fn wait_kubelet_node(&mut self, i: usize) -> Result<()> {
        let n = self.state.nodes[i].clone();
        let cp = self.control_plane()?.clone();
        let log = self.state.dir.join(&n.name).join("kubelet.log");
        let cidrs = cp
            .wait_pod_cidrs(&n.name, Duration::from_secs(120))
            .with_context(|| format!("{}'s kubelet; its log ends:\n{}", n.name, log_tail(&log)))?;
        let node = &mut self.state.nodes[i];
        for c in cidrs {
            let net: ipnetwork::IpNetwork = c.parse().with_context(|| format!("podCIDR {c}"))?;
            match net {
                ipnetwork::IpNetwork::V4(v) => {
                    node.pod_cidr_v4 = c.clone();
                    node.gateway_v4 = std::net::Ipv4Addr::from(u32::from(v.network()) + 1);
                    ip(&[
                        "-n",
                        &cp.ns,
                        "route",
                        "replace",
                        &c,
                        "via",
                        &n.underlay_ip.to_string(),
                    ])?;
                }
                ipnetwork::IpNetwork::V6(v) => {
                    node.pod_cidr_v6 = c.clone();
                    node.gateway_v6 = Ipv6Addr::from(u128::from(v.network()) + 1);
                    let via = node
                        .kubelet
                        .as_ref()
                        .map(|k| k.underlay_ip6.to_string())
                        .context("not a kubelet node")?;
                    ip(&["-n", &cp.ns, "-6", "route", "replace", &c, "via", &via])?;
                }
            }
        }
        self.save()
    }

    /// Waits for node `i`'s Ready condition (kubelet reports it once the
    /// runtime's network is ready: tunmesh wrote the CNI config).
    pub fn wait_node_ready_condition(&self, i: usize, timeout: Duration) -> Result<()> {
        let n = &self.state.nodes[i];
        let path = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        netns::wait_for(timeout, || {
            let out = self.kubectl(&["get", "node", &n.name, "-o", path]).ok()?;
            (out.trim() == "True").then_some(())
        })
        .with_context(|| {
            let why = self
                .kubectl(&[
                    "get",
                    "node",
                    &n.name,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].message}",
                ])
                .unwrap_or_default();
            format!(
                "Node {} is not Ready after {timeout:?}: {why}; kubelet log: {}",
                n.name,
                self.state.dir.join(&n.name).join("kubelet.log").display()
            )
        })
    }

    /// `kubectl apply -k deploy/`, then the DaemonSet's rollout.
    pub fn install_tunmesh(&self) -> Result<()> {
        let deploy = controlplane::deploy_dir();
        self.kubectl(&["apply", "-k", &deploy.to_string_lossy()])?;
        self.rollout("tunmesh", "daemonset/tunmesh", Duration::from_secs(180))
    }

    fn install_coredns(&self) -> Result<()> {
        let cp = self.control_plane()?;
        cp.kubectl_stdin(&["apply", "-f", "-"], COREDNS_YAML)
            .context("applying tests/manifests/coredns.yaml")?;
        Ok(())
    }

    /// `kubectl rollout status` with a deadline; on failure, what the
    /// pods say.
    pub fn rollout(&self, namespace: &str, what: &str, timeout: Duration) -> Result<()> {
        let t = format!("--timeout={}s", timeout.as_secs());
        if let Err(e) = self.kubectl(&["rollout", "status", "-n", namespace, what, &t]) {
            let pods = self
                .kubectl(&["get", "pods", "-n", namespace, "-o", "wide"])
                .unwrap_or_default();
            let events = self
                .kubectl(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"])
                .unwrap_or_default();
            let tail: Vec<&str> = events.lines().rev().take(15).collect();
            bail!(
                "{what} in {namespace} did not roll out: {e}\n{pods}\nlast events:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    /// The test pods: `replicas` agnhost netexec pods spread over the nodes
    /// by the scheduler.
    pub fn start_web(&self, replicas: usize) -> Result<()> {
        let cp = self.control_plane()?;
        cp.kubectl_stdin(
            &["apply", "-f", "-"],
            &WEB_YAML.replace("REPLICAS", &replicas.to_string()),
        )
        .context("applying tests/manifests/web.yaml")?;
        self.rollout("default", "deployment/web", Duration::from_secs(180))
    }

    /// The running pods of label `selector` in `namespace`: (name, node,
    /// IPs).
    pub fn kube_pods(&self, namespace: &str, selector: &str) -> Result<Vec<KubePod>> {
        let out = self.kubectl(&["get", "pods", "-n", namespace, "-l", selector, "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("parsing kubectl's pod list")?;
        let mut pods = Vec::new();
        for p in v["items"].as_array().context("no items in the pod list")? {
            if p["status"]["phase"] != "Running" {
                continue;
            }
            pods.push(KubePod {
                name: p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                node: p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ips: p["status"]["podIPs"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|i| i["ip"].as_str()?.parse::<IpAddr>().ok())
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        }
        Ok(pods)
    }
}

/// A pod as the API server reports it.
#[derive(Debug, Clone)]
pub struct KubePod {
    pub name: String,
    pub node: String,
    pub ips: Vec<IpAddr>,
}

impl KubePod {
    /// The pod's address of the same family as `other`.
    pub fn ip_like(&self, other: &IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|i| i.is_ipv4() == other.is_ipv4())
    }
}

/// One HTTP request of the connectivity matrix: from a pod (by
/// `kubectl exec`) or a node (from its namespace) to a pod's address,
/// and the client address netexec saw (`None`: no answer).
#[derive(Debug, Clone)]
pub struct KubePath {
    pub from: String,
    /// The sender's own address of the target's family, for a pod sender.
    pub from_ip: Option<IpAddr>,
    pub to: String,
    pub ip: IpAddr,
    pub seen: Option<IpAddr>,
}

impl KubePath {
    /// Answered, and (from a pod) with the pod's own address: no NAT.
    pub fn ok(&self) -> bool {
        match (self.seen, self.from_ip) {
            (Some(seen), Some(own)) => seen == own,
            (Some(_), None) => true,
            (None, _) => false,
        }
    }
}

fn url(ip: &IpAddr, port: u16, path: &str) -> String {
    match ip {
        IpAddr::V4(a) => format!("http://{a}:{port}{path}"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}{path}"),
    }
}

/// A shell loop asking every address for `/clientip`: one line per
/// target, `TARGET SEEN` (SEEN empty when nothing answered).
fn clientip_script(targets: &[IpAddr]) -> String {
    let mut s = String::new();
    for t in targets {
        s += &format!(
            "printf '%s %s\\n' {t} \"$(curl -s -m 3 {})\"; ",
            url(t, 8080, "/clientip")
        );
    }
    s
}

/// Parses `TARGET SEEN` lines; SEEN is `ip:port` or `[ip]:port`.
fn parse_clientip(out: &str) -> Vec<(IpAddr, Option<IpAddr>)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let target: IpAddr = w.next()?.parse().ok()?;
            let seen = w.next().and_then(|s| {
                let host = s.rsplit_once(':')?.0;
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            });
            Some((target, seen))
        })
        .collect()
}

impl Lab {
    /// Runs a command in a real node's network and mount namespaces (what
    /// a process on that node sees: its /etc/cni/net.d, /var/lib/tunmesh...).
    pub fn node_exec(&self, node: &str, args: &[&str]) -> Result<String> {
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        let kn = n
            .kubelet
            .as_ref()
            .with_context(|| format!("{node} is not a real node"))?;
        node_run(&n.ns, kn, args)
    }

    /// `cmd` in a real node's network and mount namespaces, with what
    /// tunmesh-ctl reads on a node set (state directory, Node name,
    /// interface, kubelet's kubeconfig); `None` unless `node` is a real
    /// node.
    pub fn real_node_command(&self, node: &str, cmd: &[String]) -> Option<Command> {
        let n = self.node(node)?;
        let holder = n.kubelet.as_ref()?.holder_pid?;
        let mut c = Command::new("nsenter");
        c.arg(format!("--net={}", netns::netns_path(&n.ns).display()))
            .arg(format!("--mount=/proc/{holder}/ns/mnt"))
            .arg("--")
            .args(cmd)
            .env("TUNMESH_STATE_DIR", "/var/lib/tunmesh")
            .env("NODE_NAME", &n.name)
            .env("TUNMESH_INTERFACE", "tunmesh0")
            .env("TUNMESH_KUBECONFIG", "/etc/kubernetes/kubelet.kubeconfig");
        Some(c)
    }

    /// A real node joins a running lab: its namespace, containerd,
    /// kubelet and kube-proxy; returns once it is Ready and tunmesh's pod
    /// on it is ready.
    pub fn add_kubelet_node(&mut self) -> Result<usize> {
        let i = self.join_kubelet_node(&Join::default())?;
        self.wait_node_ready_condition(i, Duration::from_secs(120))?;
        self.rollout("tunmesh", "daemonset/tunmesh", Duration::from_secs(120))?;
        Ok(i)
    }

    /// A real node joins as `join` says; returns once kubelet registered
    /// it and it has its podCIDRs (not waiting for Ready).
    pub fn join_kubelet_node(&mut self, join: &Join) -> Result<usize> {
        let mut images = self.state.node_images.clone();
        if join.without_tunmesh_image {
            images.retain(|p| !p.ends_with(TUNMESH_IMAGE_FILE));
        }
        let i = self.add_node_namespace()?;
        if let Some(from) = join.cni_files_from {
            let src = self
                .node(from)
                .and_then(|n| n.kubelet.as_ref())
                .map(|k| k.root.clone())
                .with_context(|| format!("{from} is not a real node"))?;
            let dst = self.node_root(i);
            for f in CNI_FILES {
                let to = dst.join(f);
                std::fs::create_dir_all(to.parent().context("a CNI file's directory")?)?;
                std::fs::copy(src.join(f), &to)
                    .with_context(|| format!("copying {f} from {from}'s root"))?;
            }
        }
        self.start_kubelet_node(i, &images)?;
        self.wait_kubelet_node(i)?;
        Ok(i)
    }

    /// Imports the tunmesh image into a node's containerd (after a join
    /// without it).
    pub fn import_tunmesh_image(&self, node: &str) -> Result<()> {
        let img = self
            .state
            .node_images
            .iter()
            .find(|p| p.ends_with(TUNMESH_IMAGE_FILE))
            .context("the lab has no tunmesh image")?;
        let n = self.node(node).with_context(|| format!("no node {node}"))?;
        let kn = n
            .kubelet
            .as_ref()
            .with_context(|| format!("{node} is not a real node"))?;
        import_image(&n.ns, kn, img)
    }

    /// `kubectl exec POD -- sh -c SCRIPT` in the default namespace.
    pub fn kube_exec(&self, pod: &str, script: &str) -> Result<String> {
        self.kubectl(&["exec", pod, "--", "sh", "-c", script])
    }

    /// Every pod to every other pod's every address, and every node to
    /// every pod's every address, over HTTP.
    pub fn kube_matrix(&self, pods: &[KubePod]) -> Result<Vec<KubePath>> {
        let mut paths = Vec::new();
        let name_of = |ip: &IpAddr| {
            pods.iter()
                .find(|p| p.ips.contains(ip))
                .map(|p| p.name.clone())
                .unwrap_or_default()
        };
        for src in pods {
            let targets: Vec<IpAddr> = pods
                .iter()
                .filter(|p| p.name != src.name)
                .flat_map(|p| p.ips.clone())
                .collect();
            let out = self.kube_exec(&src.name, &clientip_script(&targets))?;
            let got = parse_clientip(&out);
            for t in targets {
                paths.push(KubePath {
                    from: src.name.clone(),
                    from_ip: src.ip_like(&t),
                    to: name_of(&t),
                    ip: t,
                    seen: got.iter().find(|(g, _)| *g == t).and_then(|(_, s)| *s),
                });
            }
        }
        let all: Vec<IpAddr> = pods.iter().flat_map(|p| p.ips.clone()).collect();
        for n in &self.state.nodes {
            let out = netns::exec(&n.ns, "sh", &["-c", &clientip_script(&all)])?;
            let got = parse_clientip(&out);
            for t in &all {
                paths.push(KubePath {
                    from: n.name.clone(),
                    from_ip: None,
                    to: name_of(t),
                    ip: *t,
                    seen: got.iter().find(|(g, _)| g == t).and_then(|(_, s)| *s),
                });
            }
        }
        Ok(paths)
    }
}

/// The failed paths of a matrix, one per line.
pub fn failed_paths(paths: &[KubePath]) -> String {
    paths
        .iter()
        .filter(|p| !p.ok())
        .map(|p| {
            format!(
                "{} -> {} {}: {}",
                p.from,
                p.to,
                p.ip,
                match p.seen {
                    None => "no answer".to_string(),
                    Some(s) => format!("seen from {s}, not {:?} (NAT)", p.from_ip),
                }
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const COREDNS_YAML: &str = include_str!("../../manifests/coredns.yaml");
const WEB_YAML: &str = include_str!("../../manifests/web.yaml");

/// containerd 1.6's configuration for a node. `restrict_oom_score_adj`:
/// this machine's root lacks CAP_SYS_RESOURCE, so containers may not get
/// a lower OOM score than containerd's own.
const CONTAINERD_TOML: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.2"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#;

fn kubelet_config(cgroup: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        // No systemd, hybrid cgroup v1.
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{cgroup}"),
        "failCgroupV1": false,
        "failSwapOn": false,
        "containerRuntimeEndpoint": "unix:///run/containerd/containerd.sock",
        "authentication": {
            "anonymous": {"enabled": false},
            "webhook": {"enabled": true},
            "x509": {"clientCAFile": "/etc/kubernetes/ca.crt"},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDNS": [controlplane::DNS_IP],
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/kubernetes/resolv.conf",
        "readOnlyPort": 0,
        // The disk is shared by every node and the build: evict late, and
        // never collect the imported images (no registry to pull them back).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": false,
        "maxPods": 110,
    })
}

fn kube_proxy_config(node: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": "/etc/kubernetes/kube-proxy.kubeconfig"},
        "hostnameOverride": node,
        "mode": "iptables",
        "clusterCIDR": format!("{CLUSTER_V4},{CLUSTER_V6}"),
        // nf_conntrack_max and the timeouts are the shared kernel's (read
        // only in a namespace): leave them.
        "conntrack": {"maxPerCore": 0, "min": 0,
                      "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "metricsBindAddress": "127.0.0.1:10249",
        "healthzBindAddress": "0.0.0.0:10256",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clientip_lines_parse_for_both_families_and_no_answer() {
        let out =
            "10.244.1.3 10.244.0.3:40112\nfd00:10:244:1::3 [fd00:10:244::3]:51000\n10.244.2.3 \n";
        let got = parse_clientip(out);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].1, Some("10.244.0.3".parse().unwrap()));
        assert_eq!(got[1].1, Some("fd00:10:244::3".parse().unwrap()));
        assert_eq!(got[2].1, None);
        let script = clientip_script(&["fd00::1".parse().unwrap()]);
        assert!(
            script.contains("http://[fd00::1]:8080/clientip"),
            "{script}"
        );
    }
}
