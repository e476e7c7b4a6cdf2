//! A real Kubernetes control plane for the lab, in its own namespace on the
//! underlay: etcd, kube-apiserver (TLS from a per-lab CA, RBAC,
//! ServiceAccount tokens) and kube-controller-manager running only the node
//! IPAM controller, so podCIDRs reach Nodes the way they do in a cluster.
//! The binaries are built from pinned Go modules by
//! `scripts/control-plane.sh` and cached.
//!
//! ```text
//!  tm<id>-cp: eth0 172.28.0.2 ── underlay bridge
//!    etcd                    127.0.0.1:2379 (only inside this namespace)
//!    kube-apiserver          https://172.28.0.2:6443
//!    kube-controller-manager --controllers=node-ipam-controller
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::netns::{self, exec_output};

/// The API server's address on the underlay.
pub const API_IP: &str = "172.28.0.2";
pub const API_PORT: u16 = 6443;
/// The IPv4 service network (the routers-only lab uses none, but the API
/// server requires one; the real-node lab's Services come from it).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
/// The IPv6 service network of a cluster with real nodes (dual-stack).
pub const SERVICE_CIDR_V6: &str = "fd00:10:96::/112";
/// The cluster DNS Service's address (kubelet's clusterDNS).
pub const DNS_IP: &str = "10.96.0.10";
/// Namespace and name of the routers' ServiceAccount (deploy/rbac.yaml).
pub const SA_NAMESPACE: &str = "tunmesh";
pub const SA_NAME: &str = "tunmesh";
/// The RBAC objects the routers run with: exactly what deploy/ ships.
pub const RBAC_YAML: &str = include_str!("../../deploy/rbac.yaml");
/// The namespace and the router settings from deploy/, applied as they are.
pub const NODE_POLICY_YAML: &str = include_str!("../../deploy/node-policy.yaml");
pub const NAMESPACE_YAML: &str = include_str!("../../deploy/namespace.yaml");
pub const CONFIG_YAML: &str = include_str!("../../deploy/configmap.yaml");
/// The ConfigMap holding the routers' settings.
pub const CONFIG_NAME: &str = "tunmesh-config";
/// The manifests directory (for `kubectl apply -k`).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The directory with kube-apiserver, kube-controller-manager, kubectl and
/// etcd: `$TUNMESH_CONTROL_PLANE_BIN`, else what `scripts/control-plane.sh`
/// builds (once; later calls find it cached). Its progress goes to stderr.
pub fn binaries() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TUNMESH_CONTROL_PLANE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/control-plane.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} failed (see its messages above); the lab needs the control plane it builds",
            script.display()
        );
    }
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    for b in [
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
        "etcd",
        "cnitool",
    ] {
        if !dir.join(b).is_file() {
            bail!(
                "{} did not produce {b} in {}",
                script.display(),
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// The control plane's record, kept in the lab's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlPlane {
    pub ns: String,
    /// Certificates, kubeconfigs, etcd data and logs.
    pub dir: PathBuf,
    pub bin: PathBuf,
    pub cluster_cidrs: Vec<String>,
    pub etcd_pid: Option<u32>,
    pub apiserver_pid: Option<u32>,
    pub controller_manager_pid: Option<u32>,
    /// A cluster for real nodes (kubelets): Node authorization and
    /// NodeRestriction, every controller, kube-scheduler, dual-stack
    /// Services. Otherwise only what the routers need.
    #[serde(default)]
    pub kubelets: bool,
    #[serde(default)]
    pub scheduler_pid: Option<u32>,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Issues `name.crt`/`name.key` signed by the lab CA.
fn issue(dir: &Path, name: &str, subject: &str, ext: &str) -> Result<()> {
    let extfile = format!("{name}.ext");
    std::fs::write(dir.join(&extfile), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            subject,
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "7",
            "-out",
            &format!("{name}.crt"),
            "-extfile",
            &extfile,
        ],
    )
}

/// A kubeconfig for the lab's API server with either a client certificate
/// (`name.crt`/`name.key`) or a bearer token.
pub fn kubeconfig(ca: &Path, user: KubeUser<'_>) -> String {
    let creds = match user {
        KubeUser::Cert { crt, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            crt.display(),
            key.display()
        ),
        KubeUser::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{API_IP}:{API_PORT}\n\
         \x20   certificate-authority: {ca}\nusers:\n- name: user\n  user:\n{creds}contexts:\n- name: lab\n  context:\n\
         \x20   cluster: lab\n    user: user\ncurrent-context: lab\n",
        ca = ca.display()
    )
}

pub enum KubeUser<'a> {
    Cert { crt: &'a Path, key: &'a Path },
    Token(&'a str),
}

impl ControlPlane {
    /// Creates the PKI and starts etcd, the API server and the controller
    /// manager in namespace `ns` (which must exist, on the underlay at
    /// `API_IP`); applies the routers' RBAC. `cluster_cidrs` (one per
    /// family) are split into /24 and /64 node podCIDRs.
    pub fn start(
        ns: &str,
        dir: &Path,
        bin: &Path,
        cluster_cidrs: &[&str],
        kubelets: bool,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut cp = ControlPlane {
            ns: ns.to_string(),
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            cluster_cidrs: cluster_cidrs.iter().map(|s| s.to_string()).collect(),
            etcd_pid: None,
            apiserver_pid: None,
            controller_manager_pid: None,
            kubelets,
            scheduler_pid: None,
        };
        cp.pki()?;
        cp.start_etcd()?;
        cp.start_apiserver()?;
        cp.start_controller_manager()?;
        if kubelets {
            cp.start_scheduler()?;
        }
        for (file, yaml) in [
            ("namespace.yaml", NAMESPACE_YAML),
            ("rbac.yaml", RBAC_YAML),
            ("node-policy.yaml", NODE_POLICY_YAML),
            ("configmap.yaml", CONFIG_YAML),
        ] {
            cp.kubectl_stdin(&["apply", "-f", "-"], yaml)
                .with_context(|| format!("applying deploy/{file}"))?;
        }
        Ok(cp)
    }

    fn pki(&self) -> Result<()> {
        let d = &self.dir;
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "7",
                "-subj",
                "/CN=tunmesh-lab-ca",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )?;
        issue(
            d,
            "apiserver",
            "/CN=kube-apiserver",
            &format!(
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=IP:{API_IP},IP:127.0.0.1,IP:10.96.0.1,\
                 DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:localhost\n"
            ),
        )?;
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
        issue(
            d,
            "admin",
            "/O=system:masters/CN=tunmesh-lab-admin",
            client_ext,
        )?;
        issue(
            d,
            "controller-manager",
            "/CN=system:kube-controller-manager",
            client_ext,
        )?;
        let mut users = vec!["admin", "controller-manager"];
        if self.kubelets {
            // The API server's client identity towards kubelets (logs,
            // exec, port-forward), the scheduler's and kube-proxy's, with
            // the names their bootstrap RBAC roles are bound to.
            issue(
                d,
                "apiserver-kubelet-client",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
                client_ext,
            )?;
            issue(d, "scheduler", "/CN=system:kube-scheduler", client_ext)?;
            issue(d, "kube-proxy", "/CN=system:kube-proxy", client_ext)?;
            users.extend(["scheduler", "kube-proxy"]);
        }
        // ServiceAccount token signing key.
        openssl(
            d,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "sa.key",
            ],
        )?;
        openssl(d, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let ca = d.join("ca.crt");
        for user in users {
            let text = kubeconfig(
                &ca,
                KubeUser::Cert {
                    crt: &d.join(format!("{user}.crt")),
                    key: &d.join(format!("{user}.key")),
                },
            );
            std::fs::write(d.join(format!("{user}.kubeconfig")), text)?;
        }
        Ok(())
    }

    fn spawn(&self, name: &str, args: &[String]) -> Result<u32> {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = netns::spawn(
            &self.ns,
            &self.bin.join(name),
            &args,
            &[],
            &self.dir.join(format!("{name}.log")),
        )?;
        Ok(child.id())
    }

    fn log_tail(&self, name: &str) -> String {
        let text =
            std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    pub fn start_etcd(&mut self) -> Result<()> {
        let data = self.dir.join("etcd-data");
        let pid = self.spawn(
            "etcd",
            &[
                "--name=lab".into(),
                format!("--data-dir={}", data.display()),
                "--listen-client-urls=http://127.0.0.1:2379".into(),
                "--advertise-client-urls=http://127.0.0.1:2379".into(),
                "--listen-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".into(),
                "--initial-cluster=lab=http://127.0.0.1:2380".into(),
                // A throwaway store on tmpfs: durability buys nothing here.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?;
        self.etcd_pid = Some(pid);
        self.wait_up("etcd", pid, Duration::from_secs(30), || {
            exec_output(&self.ns, "bash", &["-c", "exec 3<>/dev/tcp/127.0.0.1/2379"])
                .is_ok_and(|out| out.status.success())
        })
    }

    /// Waits until `ready` holds for the process `name` just started, or
    /// fails with the end of its log if it exits or `timeout` passes.
    fn wait_up(
        &self,
        name: &str,
        pid: u32,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let up = netns::wait_for(timeout, || {
            if !netns::is_running(pid) {
                return Some(false);
            }
            ready().then_some(true)
        });
        if up != Some(true) {
            bail!(
                "{name} did not become ready; its log ends:\n{}",
                self.log_tail(name)
            );
        }
        Ok(())
    }

    /// Starts the API server and waits until /readyz answers ok.
    pub fn start_apiserver(&mut self) -> Result<()> {
        let d = self.dir.display();
        let pid = self.spawn(
            "kube-apiserver",
            &[
                "--etcd-servers=http://127.0.0.1:2379".into(),
                format!("--advertise-address={API_IP}"),
                "--bind-address=0.0.0.0".into(),
                format!("--secure-port={API_PORT}"),
                format!("--tls-cert-file={d}/apiserver.crt"),
                format!("--tls-private-key-file={d}/apiserver.key"),
                format!("--client-ca-file={d}/ca.crt"),
                format!("--cert-dir={d}/apiserver-certs"),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={d}/sa.pub"),
                format!("--service-account-signing-key-file={d}/sa.key"),
                // As kubeadm and most distributions run it: network plugins'
                // DaemonSets need a privileged init step.
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                "--enable-priority-and-fairness=false".into(),
            ]
            .into_iter()
            .chain(self.apiserver_mode_args())
            .collect::<Vec<_>>(),
        )?;
        self.apiserver_pid = Some(pid);
        self.wait_up("kube-apiserver", pid, Duration::from_secs(120), || {
            self.kubectl_output(&["get", "--raw", "/readyz"])
                .is_ok_and(|out| {
                    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok"
                })
        })
    }

    /// What differs between a routers-only control plane and one for kubelets.
    fn apiserver_mode_args(&self) -> Vec<String> {
        let d = self.dir.display();
        if !self.kubelets {
            return vec![
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
                "--authorization-mode=RBAC".into(),
            ];
        }
        vec![
            format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}"),
            "--authorization-mode=Node,RBAC".into(),
            "--enable-admission-plugins=NodeRestriction".into(),
            format!("--kubelet-client-certificate={d}/apiserver-kubelet-client.crt"),
            format!("--kubelet-client-key={d}/apiserver-kubelet-client.key"),
            // Nodes are reached on their underlay address, not by a name
            // nobody resolves.
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--service-node-port-range=30000-32767".into(),
        ]
    }

    /// kube-scheduler (kubelet labs): places the pods.
    pub fn start_scheduler(&mut self) -> Result<()> {
        let d = self.dir.display();
        let pid = self.spawn(
            "kube-scheduler",
            &[
                format!("--kubeconfig={d}/scheduler.kubeconfig"),
                format!("--authentication-kubeconfig={d}/scheduler.kubeconfig"),
                format!("--authorization-kubeconfig={d}/scheduler.kubeconfig"),
                "--leader-elect=false".into(),
                "--secure-port=10259".into(),
                "--bind-address=127.0.0.1".into(),
            ],
        )?;
        self.scheduler_pid = Some(pid);
        self.wait_up("kube-scheduler", pid, Duration::from_secs(60), || {
            exec_output(
                &self.ns,
                "bash",
                &["-c", "exec 3<>/dev/tcp/127.0.0.1/10259"],
            )
            .is_ok_and(|out| out.status.success())
        })
    }

    /// Issues a kubelet's client certificate (system:node:NAME in
    /// system:nodes, what Node authorization expects) and writes its
    /// kubeconfig, with paths as the node sees them under `node_dir`
    /// (the node's /etc/kubernetes). Copies the CA beside it.
    pub fn kubelet_credentials(&self, name: &str, host_dir: &Path, node_dir: &Path) -> Result<()> {
        let client_ext = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n";
        let cert = format!("kubelet-{name}");
        issue(
            &self.dir,
            &cert,
            &format!("/O=system:nodes/CN=system:node:{name}"),
            client_ext,
        )?;
        for (from, to) in [
            (format!("{cert}.crt"), "kubelet.crt"),
            (format!("{cert}.key"), "kubelet.key"),
            ("ca.crt".into(), "ca.crt"),
            ("kube-proxy.crt".into(), "kube-proxy.crt"),
            ("kube-proxy.key".into(), "kube-proxy.key"),
        ] {
            std::fs::copy(self.dir.join(&from), host_dir.join(to))
                .with_context(|| format!("copying {from} to {}", host_dir.display()))?;
        }
        let ca = node_dir.join("ca.crt");
        for (user, file) in [
            ("kubelet", "kubelet.kubeconfig"),
            ("kube-proxy", "kube-proxy.kubeconfig"),
        ] {
            let text = kubeconfig(
                &ca,
                KubeUser::Cert {
                    crt: &node_dir.join(format!("{user}.crt")),
                    key: &node_dir.join(format!("{user}.key")),
                },
            );
            std::fs::write(host_dir.join(file), text)?;
        }
        Ok(())
    }

    /// Stops the API server (an outage); `start_apiserver` brings it back
    /// with the same state, which lives in etcd.
    pub fn stop_apiserver(&mut self) {
        if let Some(pid) = self.apiserver_pid.take() {
            netns::stop_pid(pid, Duration::from_secs(5));
        }
    }

    pub fn start_controller_manager(&mut self) -> Result<()> {
        let d = self.dir.display();
        let mut args = vec![
            format!("--kubeconfig={d}/controller-manager.kubeconfig"),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={}", self.cluster_cidrs.join(",")),
            "--leader-elect=false".into(),
            "--secure-port=0".into(),
            // Each controller acts as its own ServiceAccount with its
            // bootstrap ClusterRole, as kubeadm clusters run it.
            "--use-service-account-credentials=true".into(),
        ];
        if self.kubelets {
            // Every controller, as in a cluster: ServiceAccounts and their
            // tokens, Deployments, DaemonSets, EndpointSlices, garbage
            // collection, node lifecycle.
            args.extend([
                "--controllers=*".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR},{SERVICE_CIDR_V6}"),
                format!("--service-account-private-key-file={d}/sa.key"),
                format!("--root-ca-file={d}/ca.crt"),
                format!("--cluster-signing-cert-file={d}/ca.crt"),
                format!("--cluster-signing-key-file={d}/ca.key"),
            ]);
        } else {
            args.extend([
                "--controllers=node-ipam-controller".into(),
                format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            ]);
        }
        for c in &self.cluster_cidrs {
            if c.contains(':') {
                args.push("--node-cidr-mask-size-ipv6=64".into());
            } else {
                args.push("--node-cidr-mask-size-ipv4=24".into());
            }
        }
        let pid = self.spawn("kube-controller-manager", &args)?;
        self.controller_manager_pid = Some(pid);
        // It has no health endpoint here (--secure-port=0): check it stays up.
        std::thread::sleep(Duration::from_millis(500));
        if !netns::is_running(pid) {
            bail!(
                "kube-controller-manager exited; its log ends:\n{}",
                self.log_tail("kube-controller-manager")
            );
        }
        Ok(())
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns])
            .arg(self.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.admin_kubeconfig().display()
            ))
            .args(args);
        c
    }

    /// kubectl as the lab's admin, any exit status.
    pub fn kubectl_output(&self, args: &[&str]) -> Result<std::process::Output> {
        self.kubectl_command(args)
            .stdin(Stdio::null())
            .output()
            .context("running kubectl")
    }

    /// kubectl as the lab's admin, failing with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let out = self.kubectl_output(args)?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// kubectl with `input` on stdin.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write;
        let mut child = self
            .kubectl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl")?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A kubeconfig for the router on Node `node`: a token of
    /// ServiceAccount `sa` (in the tunmesh namespace) bound to a Pod on
    /// that Node, as the DaemonSet's Pod gets from its kubelet, so it
    /// carries the node claim deploy/node-policy.yaml checks. No kubelet
    /// runs the Pod (this lab has none): it is an object on `node`, with
    /// every taint tolerated so that no controller evicts it (which would
    /// void the token). Written to `path`.
    pub fn router_kubeconfig(&self, sa: &str, node: &str, path: &Path) -> Result<()> {
        let pod = format!("router-token-{sa}-{node}");
        let manifest = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": pod, "namespace": SA_NAMESPACE,
                          "labels": { "tunmesh.io/lab": "router-token" } },
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "tolerations": [{ "operator": "Exists" }],
                "containers": [{ "name": "router", "image": "tunmesh-lab/no-kubelet-runs-this" }],
            },
        });
        self.kubectl_stdin(&["apply", "-f", "-"], &manifest.to_string())
            .with_context(|| format!("creating Pod {pod} for the router's token"))?;
        let token = self.kubectl(&[
            "create",
            "token",
            sa,
            "-n",
            SA_NAMESPACE,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            &pod,
            "--duration=48h",
        ])?;
        std::fs::write(
            path,
            kubeconfig(&self.dir.join("ca.crt"), KubeUser::Token(token.trim())),
        )
        .with_context(|| format!("writing {}", path.display()))
    }

    /// The routers' settings: the ConfigMap from deploy/configmap.yaml as
    /// the API server holds it, as environment variables (what the
    /// DaemonSet's `envFrom` gives the router).
    pub fn router_env(&self) -> Result<Vec<(String, String)>> {
        let out = self.kubectl(&[
            "get",
            "configmap",
            CONFIG_NAME,
            "-n",
            SA_NAMESPACE,
            "-o",
            "json",
        ])?;
        let v: serde_json::Value = serde_json::from_str(&out).context("parsing the ConfigMap")?;
        Ok(v["data"]
            .as_object()
            .context("the ConfigMap has no data")?
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect())
    }

    /// Registers a Node the way kubelet does: the object, then its
    /// InternalIP and hostname in `status.addresses`.
    pub fn register_node(&self, name: &str, internal_ip: &str) -> Result<()> {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        });
        self.kubectl_stdin(&["create", "-f", "-"], &node.to_string())?;
        let status = serde_json::json!({ "status": { "addresses": [
            { "type": "InternalIP", "address": internal_ip },
            { "type": "Hostname", "address": name },
        ]}});
        self.kubectl(&[
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])?;
        Ok(())
    }

    /// Waits until the node IPAM controller has given `name` a podCIDR per
    /// cluster CIDR; returns them.
    pub fn wait_pod_cidrs(&self, name: &str, timeout: Duration) -> Result<Vec<String>> {
        let want = self.cluster_cidrs.len();
        netns::wait_for(timeout, || {
            let out = self
                .kubectl(&["get", "node", name, "-o", "jsonpath={.spec.podCIDRs}"])
                .ok()?;
            let v: Vec<String> = serde_json::from_str(out.trim()).ok()?;
            (v.len() == want).then_some(v)
        })
        .with_context(|| {
            format!(
                "Node {name} got no podCIDR in {timeout:?} (kube-controller-manager {}); its log ends:\n{}",
                if self.controller_manager_pid.is_some_and(netns::is_running) { "running" } else { "NOT running" },
                self.log_tail("kube-controller-manager")
            )
        })
    }
}
