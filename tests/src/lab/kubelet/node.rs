//! A real node: its mount namespace, cgroups and daemons (containerd,
//! kubelet, kube-proxy), started, waited for, joined and stopped.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::images::import_image;
use super::*;
use crate::lab::*;
use crate::netns::{self, ip};

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
pub(super) fn node_run(ns: &str, kn: &KubeletNode, args: &[&str]) -> Result<String> {
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
    pub(in crate::lab) fn build_kubelet(&mut self, opts: &LabOptions) -> Result<()> {
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
}

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
