//! tunmesh on real nodes: containerd, kubelet and kube-proxy (built from
//! the pinned Kubernetes release) run the DaemonSet from deploy/, the
//! scheduler places the pods, containerd's CRI calls tunmesh-cni. One lab
//! walks through the DaemonSet's life: install, a rolling restart under a
//! continuous probe, a deleted router pod, a node joining, uninstall, and
//! a teardown that leaves nothing behind. Root only; CI runs it.

use std::collections::HashSet;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tunmesh_lab::lab::kubelet::{failed_paths, Join, KubePod, CNI_FILES};
use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::{self, wait_for};
use tunmesh_lab::{require_root, LabOptions};

fn web_pods(lab: &Lab, want: usize) -> Vec<KubePod> {
    wait_for(Duration::from_secs(120), || {
        let pods = lab.kube_pods("default", "app=web").ok()?;
        (pods.len() == want && pods.iter().all(|p| p.ips.len() == 2)).then_some(pods)
    })
    .unwrap_or_else(|| {
        panic!(
            "{want} running web pods with two addresses each; have:\n{}",
            lab.kubectl(&["get", "pods", "-o", "wide"])
                .unwrap_or_default()
        )
    })
}

/// Every pod's addresses lie in its own node's podCIDRs, and no two pods
/// share one.
fn addresses_from_own_node(lab: &Lab, pods: &[KubePod]) {
    let mut seen = HashSet::new();
    for p in pods {
        let n = lab.node(&p.node).expect("pod on a lab node");
        for ip in &p.ips {
            let cidr = if ip.is_ipv4() {
                &n.pod_cidr_v4
            } else {
                &n.pod_cidr_v6
            };
            let net: ipnetwork::IpNetwork = cidr.parse().unwrap();
            assert!(
                net.contains(*ip),
                "{} has {ip}, outside {}'s {cidr}",
                p.name,
                p.node
            );
            assert!(seen.insert(*ip), "{ip} given to two pods");
        }
    }
}

fn matrix_ok(lab: &Lab, pods: &[KubePod], when: &str) -> usize {
    let paths = lab.kube_matrix(pods).expect("matrix");
    assert!(!paths.is_empty());
    let bad = failed_paths(&paths);
    assert!(bad.is_empty(), "{when}: failed paths:\n{bad}");
    paths.len()
}

/// A continuous HTTP probe from one pod to another's address, through
/// the mesh, as `kubectl exec` of a shell loop: one timestamp per answer.
struct Probe {
    child: std::process::Child,
    out: std::thread::JoinHandle<String>,
}

impl Probe {
    fn start(lab: &Lab, from: &str, to: IpAddr) -> Probe {
        let cp = lab.control_plane().unwrap();
        let script = format!(
            "while true; do if curl -sf -m 0.5 -o /dev/null http://{to}:8080/echo?msg=x; then echo ok $(date +%s.%N); else echo fail $(date +%s.%N); fi; sleep 0.02; done"
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &cp.ns])
            .arg(cp.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", cp.admin_kubeconfig().display()))
            .args(["exec", from, "--", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("kubectl exec");
        let mut stdout = child.stdout.take().unwrap();
        let out = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            s
        });
        Probe { child, out }
    }

    /// Stops the probe; the times (seconds since the epoch) of the answers
    /// and of the requests that failed.
    fn stop(mut self) -> (Vec<f64>, Vec<f64>) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let text = self.out.join().unwrap_or_default();
        let times = |what: &str| -> Vec<f64> {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix(what)?.trim().parse().ok())
                .collect()
        };
        (times("ok"), times("fail"))
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The longest silence that covers or follows `fault`: from the last
/// answer before it to the next one. Fails unless answers came before
/// the fault and after `recovered`.
fn gap(times: &[f64], fault: f64, recovered: f64, what: &str) -> f64 {
    let before = times.iter().filter(|t| **t < fault).count();
    assert!(
        before > 0,
        "{what}: the probe got no answer before the fault"
    );
    assert!(
        times.iter().any(|t| *t > recovered),
        "{what}: no answer after recovery ({} answers in all)",
        times.len()
    );
    times[before - 1..]
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max)
}

fn tunmesh_pod_on(lab: &Lab, node: &str) -> Option<(String, String)> {
    let out = lab
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "tunmesh",
            "--field-selector",
            &format!("spec.nodeName={node}"),
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.status.containerStatuses[0].ready}{\"\\n\"}{end}",
        ])
        .ok()?;
    out.lines().find_map(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        (w.len() == 3 && w[2] == "true").then(|| (w[0].to_string(), w[1].to_string()))
    })
}

/// Limits a real node's tunmesh state can be checked against.
fn node_has_tunmesh(lab: &Lab, node: &str) -> Vec<String> {
    let mut left = Vec::new();
    // Every probe of the node must answer: an error is not "clean".
    let links = lab
        .node_exec(node, &["ip", "-o", "link"])
        .expect("listing the node's links");
    assert!(links.contains("lo"), "no links listed on {node}: {links:?}");
    if links.contains("tunmesh0") {
        left.push("the tunmesh0 device".to_string());
    }
    for fam in ["-4", "-6"] {
        let routes = lab
            .node_exec(node, &["ip", fam, "route", "show", "proto", "116"])
            .expect("listing the node's tunmesh routes");
        if !routes.trim().is_empty() {
            left.push(format!("routes: {}", routes.trim()));
        }
    }
    let annotations = lab
        .kubectl(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.metadata.annotations}",
        ])
        .expect("reading the Node's annotations");
    if annotations.contains("tunmesh.io/") {
        left.push(format!("annotations: {annotations}"));
    }
    let n = lab.node(node).unwrap();
    let root = &n.kubelet.as_ref().unwrap().root;
    for f in CNI_FILES {
        if root.join(f).exists() {
            left.push(f.to_string());
        }
    }
    left
}

/// The longest silence of the probe a rolling restart may cause, seconds
/// (the routers hand over: no request may fail, and the probe's answers
/// come as fast as it asks).
const ROLLOUT_SILENCE_LIMIT: f64 = 0.5;
/// The longest probe silence while a new version crashes after taking
/// over: one failed request (curl's 0.5 s timeout) and the next answer.
const CRASH_SILENCE_LIMIT: f64 = 1.0;

/// A pod for the node that joins with the CNI files but no router yet.
const LATE_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: early
  labels: {app: early}
spec:
  nodeSelector: {kubernetes.io/hostname: NODE}
  terminationGracePeriodSeconds: 2
  containers:
    - name: netexec
      image: registry.k8s.io/e2e-test-images/agnhost:2.66.1
      imagePullPolicy: IfNotPresent
      args: ["netexec", "--http-port=8080", "--udp-port=8081"]
"#;

/// A pod on node-1 with host ports (TCP and UDP, no hostIP: both
/// families), through the chained portmap.
const HOSTPORT_POD: &str = r#"apiVersion: v1
kind: Pod
metadata:
  name: hostport
  labels: {app: hostport}
spec:
  nodeSelector: {kubernetes.io/hostname: node-1}
  terminationGracePeriodSeconds: 2
  containers:
    - name: netexec
      image: registry.k8s.io/e2e-test-images/agnhost:2.66.1
      imagePullPolicy: IfNotPresent
      args: ["netexec", "--http-port=8080", "--udp-port=8081"]
      ports:
        - {containerPort: 8080, hostPort: 18090, protocol: TCP}
        - {containerPort: 8081, hostPort: 18090, protocol: UDP}
"#;

/// `script` in node `node`'s network namespace until it prints `want`
/// (30 s at most); what it printed last.
fn node_sh_until(lab: &Lab, node: &str, script: &str, want: &str) -> String {
    let ns = lab.node(node).unwrap().ns.clone();
    let mut last = String::new();
    wait_for(Duration::from_secs(30), || {
        last = netns::exec(&ns, "sh", &["-c", script]).unwrap_or_else(|e| e.to_string());
        (last.trim() == want).then_some(())
    });
    last.trim().to_string()
}

/// The hostPort pod answers on node-1's IPv4 and IPv6 addresses, over TCP
/// and UDP, from another node and from a pod on a third.
fn host_ports_work(lab: &Lab, pods: &[KubePod]) {
    lab.control_plane()
        .unwrap()
        .kubectl_stdin(&["apply", "-f", "-"], HOSTPORT_POD)
        .expect("the hostPort pod");
    lab.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod/hostport",
        "--timeout=120s",
    ])
    .expect("the hostPort pod Ready");
    let n1 = lab.node("node-1").unwrap();
    let v4 = n1.underlay_ip.to_string();
    let v6 = n1.kubelet.as_ref().unwrap().underlay_ip6.to_string();
    for (what, script) in [
        (
            "TCP, IPv4",
            format!("curl -s -m 3 http://{v4}:18090/hostname"),
        ),
        (
            "TCP, IPv6",
            format!("curl -s -m 3 -g 'http://[{v6}]:18090/hostname'"),
        ),
        (
            "UDP, IPv4",
            format!("echo hostname | socat -t 2 - UDP4:{v4}:18090"),
        ),
        (
            "UDP, IPv6",
            format!("echo hostname | socat -t 2 - 'UDP6:[{v6}]:18090'"),
        ),
    ] {
        let got = node_sh_until(lab, "node-2", &script, "hostport");
        assert_eq!(
            got, "hostport",
            "node-2 to node-1's hostPort, {what}: {script}"
        );
    }
    let from = pods
        .iter()
        .find(|p| p.node == "node-3")
        .expect("a pod on node-3");
    let got = wait_for(Duration::from_secs(30), || {
        lab.kube_exec(
            &from.name,
            &format!("curl -s -m 3 http://{v4}:18090/hostname"),
        )
        .ok()
        .filter(|o| o.trim() == "hostport")
    });
    assert!(got.is_some(), "a pod on node-3 to node-1's hostPort");
    lab.kubectl(&["delete", "pod", "hostport", "--wait=true"])
        .unwrap();
    eprintln!("hostPort: node-1's port 18090 answered over TCP and UDP on IPv4 and IPv6 from node-2, and from a pod on node-3");
}

/// The router pods of the DaemonSet: (node, name, uid, ready, image,
/// restarts).
fn router_pods(lab: &Lab) -> Vec<(String, String, String, bool, String, u32)> {
    let out = lab
        .kubectl(&["get", "pods", "-n", "tunmesh", "-o", "json"])
        .expect("listing the router pods");
    let v: serde_json::Value = serde_json::from_str(&out).expect("pod list");
    v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let c = &p["status"]["containerStatuses"][0];
            (
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["ready"].as_bool().unwrap_or(false),
                p["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                c["restartCount"].as_u64().unwrap_or(0) as u32,
            )
        })
        .collect()
}

/// Issue 24: a rollout to a version that crashes right after taking over
/// (the test build's fault, baked into an image) leaves every node served
/// by its old router; the rollout stops there (maxUnavailable 0), and
/// `kubectl rollout status`, the new pod's state and an Event on the Node
/// say why. Then `kubectl rollout undo` brings the DaemonSet back.
fn crash_rollout(lab: &Lab, pods: &[KubePod]) {
    let bin = lab.state.router_bin.parent().unwrap().to_path_buf();
    let crash_bin = lab.state.dir.join("crash-bin");
    std::fs::create_dir_all(&crash_bin).unwrap();
    for b in ["tunmesh-ctl", "tunmesh-cni", "tunmesh-keygen"] {
        std::fs::copy(bin.join(b), crash_bin.join(b)).unwrap();
    }
    std::fs::copy(lab.faults_bin(), crash_bin.join("tunmesh-router")).unwrap();
    let tag = "docker.io/library/tunmesh:crash";
    lab.add_tunmesh_image(tag, &crash_bin)
        .expect("the crashing image");
    let before = router_pods(lab);
    assert_eq!(before.len(), 3, "{before:?}");
    // Which node's surge pod comes first is the DaemonSet controller's
    // choice: probe around the ring, so that whichever node crashes, one
    // probe starts there and one ends there.
    assert!(pods.len() >= 2, "{pods:?}");
    let probes: Vec<(&KubePod, &KubePod, Probe)> = pods
        .iter()
        .zip(pods.iter().cycle().skip(1))
        .map(|(a, b)| {
            let target = b.ips.iter().copied().find(IpAddr::is_ipv4).unwrap();
            (a, b, Probe::start(lab, &a.name, target))
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let fault = now();
    let patch = serde_json::json!({"spec": {"template": {"spec": {"containers": [{
        "name": "router",
        "image": tag,
        "env": [{"name": "TUNMESH_TEST_FAULT", "value": "panic:after-workers"}],
    }]}}}});
    lab.kubectl(&[
        "patch",
        "-n",
        "tunmesh",
        "daemonset/tunmesh",
        "--type=strategic",
        "-p",
        &patch.to_string(),
    ])
    .expect("rolling out the crashing version");
    // The surge pod crashes, kubelet restarts it, it crashes again.
    let crashing = wait_for(Duration::from_secs(120), || {
        router_pods(lab)
            .into_iter()
            .find(|p| p.4 == tag && p.5 >= 1)
    })
    .unwrap_or_else(|| {
        panic!(
            "no crashing router pod restarted:
{}",
            lab.kubectl(&["get", "pods", "-n", "tunmesh", "-o", "wide"])
                .unwrap_or_default()
        )
    });
    let node = crashing.0.clone();
    let status = lab.kubectl(&[
        "rollout",
        "status",
        "-n",
        "tunmesh",
        "daemonset/tunmesh",
        "--timeout=5s",
    ]);
    assert!(status.is_err(), "the rollout went on: {status:?}");
    let state = lab
        .kubectl(&[
            "get",
            "pod",
            "-n",
            "tunmesh",
            &crashing.1,
            "-o",
            "jsonpath={.status.containerStatuses[0].lastState.terminated.exitCode} {.status.containerStatuses[0].state}",
        ])
        .unwrap();
    assert!(
        !state.starts_with("0 ") && !state.starts_with(' '),
        "the crashing pod's last exit: {state}"
    );
    let events = wait_for(Duration::from_secs(30), || {
        let e = lab
            .kubectl(&[
                "get",
                "events",
                "-A",
                "--field-selector",
                &format!("reason=HandoverFailed,involvedObject.name={node}"),
                "-o",
                "jsonpath={range .items[*]}{.message}{\"\\n\"}{end}",
            ])
            .unwrap_or_default();
        (!e.trim().is_empty()).then_some(e)
    })
    .unwrap_or_else(|| panic!("no HandoverFailed Event on Node {node}"));
    // status.json is rewritten on the failure's next tick.
    let read = || -> serde_json::Value {
        lab.node_exec(&node, &["cat", "/var/lib/tunmesh/status.json"])
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    };
    let failed = wait_for(Duration::from_secs(10), || {
        let st = read();
        (st["handovers"]["failed"].as_u64().unwrap_or(0) >= 1).then_some(())
    });
    assert!(
        failed.is_some(),
        "{node}'s router reports no failed handover: {}",
        read()["handovers"]
    );
    // Every old router pod is still there and ready.
    let during = router_pods(lab);
    for old in &before {
        assert!(
            during.iter().any(|p| p.2 == old.2 && p.3),
            "{}'s old router pod {} is gone or not ready: {during:?}",
            old.0,
            old.1
        );
    }
    // How many times the surge pod took over and crashed, so far.
    let crashes = router_pods(lab)
        .iter()
        .find(|p| p.1 == crashing.1)
        .map_or(crashing.5, |p| p.5)
        + 1;
    let undo_at = now();
    lab.kubectl(&["rollout", "undo", "-n", "tunmesh", "daemonset/tunmesh"])
        .expect("kubectl rollout undo");
    lab.rollout("tunmesh", "daemonset/tunmesh", Duration::from_secs(120))
        .expect("the rollout back");
    std::thread::sleep(Duration::from_secs(1));
    let mut worst = (0.0f64, 0usize);
    let mut seen = Vec::new();
    for (a, b, probe) in probes {
        let (times, failed) = probe.stop();
        let what = format!("a crashing version, probe from {} to {}", a.node, b.node);
        let g = gap(&times, fault, undo_at, &what);
        let failed_during = failed.iter().filter(|t| **t >= fault).count();
        seen.push(format!(
            "{} -> {}: longest silence {g:.2} s, {failed_during} failed requests",
            a.node, b.node
        ));
        worst = (worst.0.max(g), worst.1.max(failed_during));
    }
    // The crashing pod may still be terminating when the rollout is done.
    let gone = wait_for(Duration::from_secs(60), || {
        let pods = router_pods(lab);
        pods.iter().all(|p| p.4 != tag).then_some(())
    });
    let after = router_pods(lab);
    assert!(gone.is_some(), "a crashing pod is left: {after:?}");
    for old in &before {
        assert!(
            after.iter().any(|p| p.2 == old.2 && p.3),
            "{}'s old router pod did not survive the rollback: {after:?}",
            old.0
        );
    }
    // What each router dropped and why, for a failure to be read by.
    let drops: Vec<String> = before
        .iter()
        .map(|p| {
            let st: serde_json::Value = lab
                .node_exec(&p.0, &["cat", "/var/lib/tunmesh/status.json"])
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            let c = &st["counters"];
            let mut reasons: Vec<String> = c["drops"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(r, n)| format!("{r} {n}"))
                .collect();
            reasons.push(format!("cookie replies {}", c["cookie_replies"]));
            format!("{}: {}", p.0, reasons.join(", "))
        })
        .collect();
    seen.push(format!(
        "drops since each router started: {}",
        drops.join("; ")
    ));
    eprintln!(
        "a version crashing after taking over: {node}'s surge pod crashed {crashes} times, its old router resumed each time (Event: {}); the rollout stopped; rollback kept every old router; probes around the ring: {}",
        events.lines().next().unwrap_or_default(),
        seen.join("; "),
    );
    // A successor that dies while forwarding loses the packets in its
    // hands, and the peers' packets on the sessions it may have used are
    // refused until the fresh handshake completes: at most one probe
    // request (curl's 0.5 s timeout) per crash, never an outage.
    assert!(
        worst.1 <= crashes as usize,
        "{} failed probe requests for {crashes} crashes ({})",
        worst.1,
        seen.join("; ")
    );
    assert!(
        worst.0 < CRASH_SILENCE_LIMIT,
        "a probe was silent for {:.2} s while a version crashed ({})",
        worst.0,
        seen.join("; ")
    );
}

/// Issue 26: root on node-1 is no lever on any other node. The router
/// pod's own ServiceAccount token, read from node-1's kubelet directory as
/// an attacker with root there would, is refused by the API server (the
/// admission policy's message) for node-2's key, endpoint and labels, for
/// node-1's labels and operator annotations, for minting tokens and for
/// impersonation; it may set node-1's own key annotation. A token of the
/// same ServiceAccount not bound to a Pod (no node claim) may change no
/// Node. Pods on node-2 and node-3 lose no request meanwhile.
fn a_taken_over_node_reaches_no_further(lab: &Lab, pods: &[KubePod]) {
    let (pod, uid) = tunmesh_pod_on(lab, "node-1").expect("a ready tunmesh pod on node-1");
    let token = lab
        .node_exec(
            "node-1",
            &[
                "sh",
                "-c",
                &format!("cat /var/lib/kubelet/pods/{uid}/volumes/kubernetes.io~projected/*/token"),
            ],
        )
        .expect("the router pod's token on node-1");
    let token = token.trim().to_string();
    assert!(token.split('.').count() == 3, "not a JWT: {token:?}");
    let cp = lab.control_plane().unwrap();
    let kubectl = cp.bin.join("kubectl");
    let ca = cp.dir.join("ca.crt");
    // kubectl with `token`, from node-1's network: (succeeded, output).
    let with = |token: &str, args: &[&str]| -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.node("node-1").unwrap().ns])
            .arg(&kubectl)
            .arg(format!(
                "--server=https://{}:{}",
                tunmesh_lab::controlplane::API_IP,
                tunmesh_lab::controlplane::API_PORT
            ))
            .arg(format!("--certificate-authority={}", ca.display()))
            .arg(format!("--token={token}"))
            .args(args)
            .output()
            .expect("kubectl");
        netns::said(&out)
    };
    let (p2, p3) = (
        pods.iter()
            .find(|p| p.node == "node-2")
            .expect("a pod on node-2"),
        pods.iter()
            .find(|p| p.node == "node-3")
            .expect("a pod on node-3"),
    );
    let target = p3.ips.iter().copied().find(IpAddr::is_ipv4).unwrap();
    let probe = Probe::start(lab, &p2.name, target);
    assert!(
        wait_for(Duration::from_secs(20), || lab
            .kube_exec(
                &p2.name,
                &format!("curl -sf -m 1 http://{target}:8080/hostname")
            )
            .ok())
        .is_some(),
        "node-3's pod answers node-2's"
    );
    let start = now();
    let key2 = lab.annotation("node-2", "tunmesh.io/public-key").unwrap();
    let key1 = lab.annotation("node-1", "tunmesh.io/public-key").unwrap();
    let forged = tunmesh_router::PrivateKey::generate()
        .public_key()
        .to_base64();
    let own_node = "may change only its own Node, not Node node-2";
    let refused: &[(&[&str], &str)] = &[
        (
            &[
                "annotate",
                "--overwrite",
                "node",
                "node-2",
                &format!("tunmesh.io/public-key={forged}"),
            ],
            own_node,
        ),
        (
            &[
                "annotate",
                "--overwrite",
                "node",
                "node-2",
                "tunmesh.io/endpoint=172.28.0.11:51820",
            ],
            own_node,
        ),
        (
            &["label", "node", "node-2", "tunmesh.io/taken=yes"],
            own_node,
        ),
        (
            &[
                "patch",
                "node",
                "node-2",
                "-p",
                r#"{"spec":{"unschedulable":true}}"#,
            ],
            own_node,
        ),
        (
            &["label", "node", "node-1", "tunmesh.io/taken=yes"],
            "may not change a Node's labels",
        ),
        (
            &[
                "annotate",
                "--overwrite",
                "node",
                "node-1",
                "tunmesh.io/force-endpoint=172.28.0.11:51820",
            ],
            "not tunmesh.io/force-endpoint",
        ),
        (
            &[
                "annotate",
                "--overwrite",
                "node",
                "node-1",
                "tunmesh.io/accept-public-key=x",
            ],
            "not tunmesh.io/accept-public-key",
        ),
        (
            &["create", "token", "tunmesh", "-n", "tunmesh"],
            "cannot create resource \"serviceaccounts/token\"",
        ),
        (
            &["get", "node", "node-2", "--as=system:node:node-2"],
            "cannot impersonate",
        ),
        (
            &["delete", "node", "node-2", "--dry-run=server"],
            "cannot delete",
        ),
    ];
    for (args, why) in refused {
        let (ok, out) = with(&token, args);
        assert!(
            !ok && out.contains(why),
            "kubectl {args:?} with node-1's router token: {out}"
        );
    }
    // node-2's key is still its own.
    let after = lab.annotation("node-2", "tunmesh.io/public-key").unwrap();
    assert_eq!(after, key2);
    // Its own key annotation: allowed (the value it has).
    let (ok, out) = with(
        &token,
        &[
            "annotate",
            "--overwrite",
            "node",
            "node-1",
            &format!("tunmesh.io/public-key={key1}"),
        ],
    );
    assert!(ok, "node-1's router token may set node-1's own key: {out}");
    // A token of the same ServiceAccount without the node claim.
    let unbound = lab
        .kubectl(&[
            "create",
            "token",
            "tunmesh",
            "-n",
            "tunmesh",
            "--duration=10m",
        ])
        .unwrap();
    let (ok, out) = with(
        unbound.trim(),
        &[
            "annotate",
            "--overwrite",
            "node",
            "node-1",
            &format!("tunmesh.io/public-key={key1}"),
        ],
    );
    assert!(
        !ok && out.contains("not bound to a node"),
        "an unbound token: {out}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let end = now();
    let (times, failed) = probe.stop();
    let failed: Vec<f64> = failed
        .into_iter()
        .filter(|t| *t >= start && *t <= end)
        .collect();
    let answered = times.iter().filter(|t| **t >= start && **t <= end).count();
    assert!(
        answered > 0,
        "the probe from node-2 to node-3 answered nothing"
    );
    assert!(
        failed.is_empty(),
        "node-2 -> node-3 requests failed during the attempts: {failed:?}"
    );
    eprintln!(
        "taken-over node-1 (router pod {pod}'s token): {} writes refused with the policy's or RBAC's message, \
         its own key annotation allowed, an unbound token refused; node-2 -> node-3: {answered} answers, 0 failed",
        refused.len()
    );
}

/// What pod attachments a node holds: (veth devices other than the
/// node's own eth0 on the underlay, network namespaces under its
/// /run/netns, addresses allocated by tunmesh-cni).
fn node_attachments(lab: &Lab, node: &str) -> (usize, usize, usize) {
    let listed = lab
        .node_exec(node, &["ip", "-o", "link", "show", "type", "veth"])
        .expect("listing the node's veths");
    let is_eth0 = |l: &&str| {
        l.split(':')
            .nth(1)
            .is_some_and(|n| n.trim().starts_with("eth0@"))
    };
    // The node's own eth0 is a veth too: seeing it proves the list is real.
    assert!(
        listed.lines().any(|l| is_eth0(&l)),
        "{node}'s veth list lacks eth0: {listed:?}"
    );
    let veths = listed.lines().filter(|l| !is_eth0(l)).count();
    let root = lab
        .node(node)
        .unwrap()
        .kubelet
        .as_ref()
        .unwrap()
        .root
        .clone();
    let netns = std::fs::read_dir(root.join("run-netns"))
        .expect("the node's /run/netns")
        .count();
    let store = root.join("var-lib-tunmesh/cni/tunmesh/allocations.json");
    let allocations = match std::fs::read_to_string(&store) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => panic!("reading {}: {e}", store.display()),
        Ok(text) => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", store.display()));
            v["allocations"]
                .as_object()
                .unwrap_or_else(|| panic!("{} has no allocations map: {text}", store.display()))
                .len()
        }
    };
    (veths, netns, allocations)
}

#[test]
fn real_nodes_run_the_daemonset_through_its_life() {
    if !require_root("real_nodes_run_the_daemonset_through_its_life") {
        return;
    }
    let t0 = Instant::now();
    let mut lab = Lab::up(&LabOptions {
        nodes: 3,
        pods_per_node: 1,
        kubelet: true,
        ..Default::default()
    })
    .expect("kubelet lab up");
    eprintln!(
        "3 real nodes Ready, tunmesh and CoreDNS rolled out, 3 pods running after {:.0?}",
        t0.elapsed()
    );

    // Scheduled by the scheduler, one per node (spread), addresses from
    // their node's podCIDRs; every pod reaches every pod without NAT,
    // every node reaches every pod.
    let pods = web_pods(&lab, 3);
    let nodes: HashSet<&str> = pods.iter().map(|p| p.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "the scheduler spread the pods: {pods:?}");
    addresses_from_own_node(&lab, &pods);
    let n = matrix_ok(&lab, &pods, "after install");
    eprintln!("matrix after install: {n} paths answered, no NAT");
    // Cluster DNS and a Service through kube-proxy, from a pod.
    lab.kubectl(&[
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ])
    .unwrap();
    let host = lab
        .kube_exec(
            &pods[0].name,
            "for i in 1 2 3 4 5 6 7 8 9 10; do curl -sf -m 2 http://web.default.svc.cluster.local/hostname && break; sleep 1; done",
        )
        .expect("web Service by name");
    assert!(
        pods.iter().any(|p| p.name == host.trim()),
        "Service answered {host:?}"
    );
    host_ports_work(&lab, &pods);
    a_taken_over_node_reaches_no_further(&lab, &pods);
    // A key rotation under the policy: the router announces its next key
    // and makes it current on its own Node, which the policy allows.
    let ctl = tunmesh_lab::lab::find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN").unwrap();
    let out = lab
        .node_exec(
            "node-3",
            &[
                &ctl.to_string_lossy(),
                "--state-dir",
                "/var/lib/tunmesh",
                "rotate-key",
                "--wait",
                "90",
            ],
        )
        .expect("tunmesh-ctl rotate-key on node-3, under the admission policy");
    eprintln!("node-3: {}", out.trim().replace('\n', "; "));
    matrix_ok(&lab, &pods, "after node-3's key rotation");

    // A rolling restart of the DaemonSet: running pods keep their
    // addresses and connectivity; the probe (pod on one node to a pod on
    // another) measures the longest silence from the restart on.
    let (a, b) = (&pods[0], &pods[1]);
    let target = b.ips.iter().copied().find(IpAddr::is_ipv4).unwrap();
    let probe = Probe::start(&lab, &a.name, target);
    assert!(
        wait_for(Duration::from_secs(20), || lab
            .kube_exec(
                &a.name,
                &format!("curl -sf -m 1 http://{target}:8080/hostname")
            )
            .ok())
        .is_some(),
        "the probe's target answers"
    );
    std::thread::sleep(Duration::from_secs(1));
    let handshakes = |lab: &Lab| -> Vec<(String, String)> {
        (1..=3)
            .map(|i| {
                let node = format!("node-{i}");
                let out = lab
                    .node_exec(&node, &["wg", "show", "tunmesh0", "latest-handshakes"])
                    .expect("wg show on the node");
                (node, out)
            })
            .collect()
    };
    let before = handshakes(&lab);
    let fault = now();
    lab.kubectl(&["rollout", "restart", "-n", "tunmesh", "daemonset/tunmesh"])
        .unwrap();
    lab.rollout("tunmesh", "daemonset/tunmesh", Duration::from_secs(180))
        .expect("rollout after restart");
    let recovered = now();
    std::thread::sleep(Duration::from_secs(2));
    let after = handshakes(&lab);
    let (times, failed) = probe.stop();
    let g = gap(&times, fault, recovered, "rollout restart");
    let failed_during: Vec<f64> = failed
        .iter()
        .copied()
        .filter(|t| *t >= fault && *t <= recovered)
        .collect();
    eprintln!(
        "rollout restart of 3 routers took {:.1} s; longest probe silence {g:.2} s \
         ({} answers, {} failed requests during the rollout)",
        recovered - fault,
        times.len(),
        failed_during.len()
    );
    // Every new router took over from the old one (not a cold or warm start).
    let starts: Vec<(String, String)> = (1..=3)
        .map(|i| {
            let node = format!("node-{i}");
            let st = lab
                .node_exec(&node, &["cat", "/var/lib/tunmesh/status.json"])
                .expect("the node's status.json");
            let v: serde_json::Value = serde_json::from_str(&st).expect("status.json parses");
            (node, v["start"].to_string())
        })
        .collect();
    eprintln!("how each new router started: {starts:?}");
    if !failed_during.is_empty() {
        let logs = lab
            .kubectl(&[
                "logs",
                "-n",
                "tunmesh",
                "-l",
                "app.kubernetes.io/name=tunmesh",
                "--tail=30",
                "--prefix",
            ])
            .unwrap_or_default();
        eprintln!("failed requests at {failed_during:?}; the routers' logs:\n{logs}");
    }
    for (node, start) in &starts {
        assert!(start.contains("\"handover\""), "{node}: {start}");
    }
    assert!(
        failed_during.is_empty(),
        "{} probe requests failed during the rolling restart",
        failed_during.len()
    );
    // No session was replaced: each node's latest handshake with each peer
    // is the one from before, unless that one was old enough (100 s) for
    // WireGuard's own rekey (every 120 s) to fall into the rollout. The
    // time is rebuilt from the session's age in the new process, so it
    // may read a second apart (`wg show` prints whole seconds); a new
    // handshake would read the rollout's time, 10 s or more later.
    let parse = |l: &str| -> (String, f64) {
        let mut f = l.split_whitespace();
        let key = f.next().unwrap_or_default().to_string();
        (key, f.next().and_then(|t| t.parse().ok()).unwrap_or(0.0))
    };
    for ((node, b), (_, a)) in before.iter().zip(&after) {
        for (line_b, line_a) in b.lines().zip(a.lines()) {
            let ((key_b, t_b), (key_a, t_a)) = (parse(line_b), parse(line_a));
            if fault - t_b < 100.0 {
                assert!(
                    key_b == key_a && (t_a - t_b).abs() <= 2.0,
                    "{node}: a new handshake during the rolling restart: before {line_b:?}, after {line_a:?}"
                );
            }
        }
    }
    // 0.08 s here (the probe's own pace: a curl, then 20 ms); a rollout
    // that restarts routers instead of handing over gave about 2 s.
    assert!(
        g < ROLLOUT_SILENCE_LIMIT,
        "probe silent for {g:.2} s during the rolling restart (limit {ROLLOUT_SILENCE_LIMIT} s)"
    );
    let after = web_pods(&lab, 3);
    for p in &pods {
        let q = after
            .iter()
            .find(|q| q.name == p.name)
            .expect("same pod still running");
        assert_eq!(p.ips, q.ips, "{} kept its addresses", p.name);
    }
    matrix_ok(&lab, &after, "after the rolling restart");
    crash_rollout(&lab, &after);

    // A deleted router pod: the DaemonSet controller makes a new one,
    // kubelet starts it, the node heals.
    let (old, old_uid) = tunmesh_pod_on(&lab, "node-2").expect("a ready tunmesh pod on node-2");
    let t = Instant::now();
    lab.kubectl(&["delete", "pod", "-n", "tunmesh", &old, "--wait=false"])
        .unwrap();
    let new = wait_for(Duration::from_secs(120), || {
        tunmesh_pod_on(&lab, "node-2").filter(|(_, uid)| *uid != old_uid)
    })
    .expect("a new ready tunmesh pod on node-2");
    let back = wait_for(Duration::from_secs(60), || {
        let paths = lab.kube_matrix(&after).ok()?;
        failed_paths(&paths).is_empty().then_some(())
    });
    assert!(
        back.is_some(),
        "the mesh heals after {} is replaced by {}",
        old,
        new.0
    );
    eprintln!(
        "router pod deleted on node-2: replacement ready and every path answered after {:.1?}",
        t.elapsed()
    );

    // A fourth node joins: kubelet registers it, the DaemonSet runs
    // there, and its pod reaches and is reached by every pod.
    let t = Instant::now();
    lab.add_kubelet_node().expect("node-4 joins");
    lab.kubectl(&["scale", "deployment", "web", "--replicas=4"])
        .unwrap();
    let four = web_pods(&lab, 4);
    assert!(
        four.iter().any(|p| p.node == "node-4"),
        "a pod on node-4: {four:?}"
    );
    addresses_from_own_node(&lab, &four);
    let n = matrix_ok(&lab, &four, "after node-4 joined");
    eprintln!(
        "node-4 joined: Ready with its router, {n} paths answered {:.1?} after the join began",
        t.elapsed()
    );

    // A node made from another's disk image: tunmesh's CNI files are
    // there before its router can run (the router's image is not on the
    // node yet), so kubelet reports the network ready and the scheduler
    // places a pod there. The plugin answers "try again later" (CNI code
    // 11), kubelet retries, and nothing is left half-made; once the
    // router runs, the pod starts.
    let i = lab
        .join_kubelet_node(&Join {
            without_tunmesh_image: true,
            cni_files_from: Some("node-1"),
        })
        .expect("node-5 joins");
    let late_node = lab.state.nodes[i].name.clone();
    lab.wait_node_ready_condition(i, Duration::from_secs(120))
        .expect("node-5 Ready on the copied conflist");
    lab.control_plane()
        .unwrap()
        .kubectl_stdin(&["apply", "-f", "-"], &LATE_POD.replace("NODE", &late_node))
        .expect("the early pod");
    let sandbox_errors = || {
        let out = lab
            .kubectl(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=early,reason=FailedCreatePodSandBox",
                "-o",
                "jsonpath={range .items[*]}{.count} {.message}{\"\\n\"}{end}",
            ])
            .unwrap_or_default();
        let mut n = 0;
        for l in out.lines() {
            let (count, msg) = l.split_once(' ').unwrap_or((l, ""));
            assert!(
                msg.contains("try again later"),
                "the sandbox failed for another reason: {msg}"
            );
            n += count.parse::<u32>().unwrap_or(0);
        }
        n
    };
    let tries = wait_for(Duration::from_secs(90), || {
        let n = sandbox_errors();
        (n >= 2).then_some(n)
    })
    .unwrap_or_else(|| {
        panic!(
            "kubelet retried the sandbox: {} failures seen",
            sandbox_errors()
        )
    });
    let clean = wait_for(Duration::from_secs(10), || {
        let s = node_attachments(&lab, &late_node);
        (s == (0, 0, 0)).then_some(())
    });
    assert!(
        clean.is_some(),
        "{late_node} after {tries} refused sandboxes: (veths, netns, allocations) = {:?}, want none",
        node_attachments(&lab, &late_node)
    );
    let t = Instant::now();
    lab.import_tunmesh_image(&late_node).unwrap();
    let early = wait_for(Duration::from_secs(180), || {
        let p = lab.kube_pods("default", "app=early").ok()?;
        (p.len() == 1 && p[0].ips.len() == 2).then(|| p[0].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "the early pod did not start after the router's image arrived:\n{}",
            lab.kubectl(&["describe", "pod", "early"])
                .unwrap_or_default()
        )
    });
    eprintln!(
        "{late_node}: {} sandboxes refused with \"try again later\" and nothing left behind; the pod ran {:.1?} after the router's image arrived",
        sandbox_errors(),
        t.elapsed()
    );
    assert_eq!(
        node_attachments(&lab, &late_node),
        (1, 1, 1),
        "one attachment for one pod on {late_node}"
    );
    let mut five = four.clone();
    five.push(early);
    addresses_from_own_node(&lab, &five);
    let n = matrix_ok(&lab, &five, "after the early pod started");
    eprintln!("{n} paths answered with the early pod");

    // Uninstall as an operator does: delete what deploy/ made, then
    // tunmesh-ctl uninstall on every node; nothing of tunmesh is left.
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    lab.kubectl(&[
        "delete",
        "-k",
        &deploy.to_string_lossy(),
        "--wait=true",
        "--timeout=120s",
    ])
    .expect("kubectl delete -k deploy/");
    let ctl = tunmesh_lab::lab::find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN").unwrap();
    let names: Vec<String> = lab.state.nodes.iter().map(|n| n.name.clone()).collect();
    for node in &names {
        let out = lab
            .node_exec(
                node,
                &[
                    &ctl.to_string_lossy(),
                    "uninstall",
                    "--node-name",
                    node,
                    "--kubeconfig",
                    "/etc/kubernetes/kubelet.kubeconfig",
                    "--purge",
                ],
            )
            .expect("tunmesh-ctl uninstall");
        eprintln!("{node}: {}", out.trim().replace('\n', "; "));
        let left = node_has_tunmesh(&lab, node);
        assert!(left.is_empty(), "{node} still has {left:?}");
    }

    // Teardown leaves no process, cgroup, mount or namespace.
    let id = lab.state.id.clone();
    let cgroups: Vec<String> = lab
        .state
        .nodes
        .iter()
        .filter_map(|n| n.kubelet.as_ref().map(|k| k.cgroup.clone()))
        .collect();
    let dir = lab.state.dir.clone();
    lab.down().expect("down");
    for cg in &cgroups {
        for h in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let p = h.path().join(cg);
            assert!(!p.exists(), "{} left behind", p.display());
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.lines().any(|l| l.contains(&*dir.to_string_lossy())),
        "mounts under {} left behind",
        dir.display()
    );
    assert!(
        netns::list_netns(&format!("tm{id}-")).is_empty(),
        "namespaces left behind"
    );
    let procs = Command::new("ps").args(["-eo", "args"]).output().unwrap();
    let procs = String::from_utf8_lossy(&procs.stdout);
    assert!(
        !procs.lines().any(|l| l.contains(&format!("tm{id}"))),
        "processes left behind:\n{}",
        procs
            .lines()
            .filter(|l| l.contains(&format!("tm{id}")))
            .collect::<Vec<_>>()
            .join("\n")
    );
}
