//! Seeing the mesh with the tools operators know: `wg show` / `wg showconf`
//! / `wg set` from wireguard-tools against the router's WireGuard API
//! socket, and a Prometheus scrape of /metrics plus the health endpoints.
//! Root only; CI runs them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use tunmesh_lab::checks::{self, http_get};
use tunmesh_lab::lab::{find_binary, Lab};
use tunmesh_lab::netns::{exec, exec_output, wait_for};
use tunmesh_lab::{require_root, LabOptions};

fn wg(lab: &Lab, node: &str, args: &[&str]) -> String {
    let n = lab.node(node).unwrap();
    let mut all = vec![args[0], n.interface.as_str()];
    all.extend(&args[1..]);
    exec(&n.ns, "wg", &all).unwrap()
}

#[test]
fn wg_show_and_metrics_show_the_live_mesh() {
    if !require_root("wg_show_and_metrics_show_the_live_mesh") {
        return;
    }
    let lab = Lab::up(&LabOptions {
        nodes: 3,
        pods_per_node: 1,
        // So that the `wg set` override is undone within the test.
        router_args: vec!["--resync-seconds=3".into()],
        ..Default::default()
    })
    .expect("lab up");
    let (a, b) = (
        lab.pod("node-1-pod-1").unwrap().clone(),
        lab.pod("node-2-pod-1").unwrap().clone(),
    );
    assert!(checks::tcp_ok(&a.ns, &b.ns, b.ipv4.into(), 100_000));
    // Sessions are made on first traffic: node-1's with node-3 too.
    let c = lab.pod("node-3-pod-1").unwrap().clone();
    assert!(checks::tcp_ok(&a.ns, &c.ns, c.ipv4.into(), 10_000));
    let status = lab.router_status("node-1").unwrap();
    let n2_key = lab.node("node-2").unwrap().public_key.clone();

    // `wg show dump`: our key and port, every peer with endpoint, allowed
    // IPs, a real handshake time and the transfer.
    let now = tunmesh_router::status::unix_now();
    let dump = wg(&lab, "node-1", &["show", "dump"]);
    let mut lines = dump.lines();
    let iface: Vec<&str> = lines.next().unwrap().split('\t').collect();
    assert_eq!(iface[1], status.public_key, "{dump}");
    assert_eq!(iface[2], "51820");
    let peers: BTreeMap<String, Vec<String>> = lines
        .map(|l| {
            let f: Vec<String> = l.split('\t').map(str::to_string).collect();
            (f[0].clone(), f)
        })
        .collect();
    assert_eq!(peers.len(), 2, "{dump}");
    let p2 = &peers[&n2_key];
    assert_eq!(
        p2[2],
        format!("{}:51820", lab.node("node-2").unwrap().underlay_ip)
    );
    assert!(
        p2[3].contains(&lab.node("node-2").unwrap().pod_cidr_v4),
        "{dump}"
    );
    let hs: u64 = p2[4].parse().unwrap();
    assert!(
        hs > 1_600_000_000 && hs <= now + 1,
        "latest handshake {hs} is not a recent Unix time"
    );
    let (rx, tx): (u64, u64) = (p2[5].parse().unwrap(), p2[6].parse().unwrap());
    assert!(rx > 0 && tx > 100_000, "transfer rx={rx} tx={tx}");
    let conf = wg(&lab, "node-1", &["showconf"]);
    assert!(
        conf.contains("PrivateKey = ")
            && conf.contains("ListenPort = 51820")
            && conf.contains(&n2_key),
        "{conf}"
    );

    // `wg set`: a peer is added at once; the router's source puts its own
    // mesh back at the next resync. The key and port cannot be changed.
    let extra = tunmesh_keygen::PrivateKey::generate()
        .public_key()
        .to_base64();
    wg(
        &lab,
        "node-1",
        &[
            "set",
            "peer",
            &extra,
            "allowed-ips",
            "10.250.0.0/24",
            "endpoint",
            "172.28.0.99:51820",
        ],
    );
    assert!(wg(&lab, "node-1", &["show", "peers"]).contains(&extra));
    let gone = wait_for(Duration::from_secs(20), || {
        (!wg(&lab, "node-1", &["show", "peers"]).contains(&extra)).then_some(())
    });
    assert!(gone.is_some(), "the wg set peer was never reconciled away");
    let n1 = lab.node("node-1").unwrap();
    let out = exec_output(&n1.ns, "wg", &["set", &n1.interface, "listen-port", "1234"]).unwrap();
    assert!(
        !out.status.success(),
        "changing the listen port must be refused"
    );
    assert_eq!(wg(&lab, "node-1", &["show", "listen-port"]).trim(), "51820");

    // The scrape: parse the text format.
    let addr: SocketAddr = "127.0.0.1:9475".parse().unwrap();
    let (code, body) = http_get(&n1.ns, addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    let mut samples: BTreeMap<String, f64> = BTreeMap::new();
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (name, value) = l
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {l:?}"));
        samples.insert(
            name.to_string(),
            value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}")),
        );
    }
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    assert_eq!(samples["tunmesh_peers"], 2.0);
    assert_eq!(samples["tunmesh_host_problems"], 0.0, "{body}");
    assert!(
        samples[r#"tunmesh_peer_tx_bytes_total{peer="node-2"}"#] > 100_000.0,
        "{body}"
    );
    assert!(samples[r#"tunmesh_peer_rx_packets_total{peer="node-2"}"#] > 0.0);
    let age = samples[r#"tunmesh_peer_last_handshake_seconds{peer="node-2"}"#];
    assert!((0.0..180.0).contains(&age), "handshake age {age}");
    for reason in [
        "no_peer",
        "source_not_allowed",
        "decrypt_failed",
        "queue_full",
        "malformed",
    ] {
        assert!(
            samples.contains_key(&format!("tunmesh_drops_total{{reason=\"{reason}\"}}")),
            "{reason} missing"
        );
    }
    for name in [
        "queue_tun_rx_packets",
        "queue_tun_tx_packets",
        "queue_udp_rx_datagrams",
    ] {
        assert!(
            samples.contains_key(&format!("tunmesh_{name}_total{{queue=\"0\"}}")),
            "{name} missing for queue 0: {body}"
        );
    }
    // Every data-plane thread is up: each queue's worker and the timers.
    let workers: Vec<(&String, &f64)> = samples
        .iter()
        .filter(|(k, _)| k.starts_with("tunmesh_worker_up{"))
        .collect();
    assert!(
        workers
            .iter()
            .any(|(k, _)| k.contains("worker=\"queue-0\""))
            && workers.iter().any(|(k, _)| k.contains("worker=\"timers\"")),
        "{workers:?}"
    );
    assert!(workers.iter().all(|(_, v)| **v == 1.0), "{workers:?}");
    assert!(samples["tunmesh_reconciles_total"] >= 1.0);
    assert_eq!(samples["tunmesh_reconcile_errors_total"], 0.0);
    assert_eq!(samples["tunmesh_kubernetes_connected"], 1.0);
    assert_eq!(samples["tunmesh_ready"], 1.0);
    assert!(samples.keys().any(|k| k.starts_with("tunmesh_build_info{")));
    assert_eq!(http_get(&n1.ns, addr, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(&n1.ns, addr, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(&n1.ns, addr, "/nope").unwrap().0, 404);

    // The manifests: the API server accepts all of deploy/ (server-side
    // dry run, so schema, RBAC and DaemonSet validation all apply), and the
    // routers here run with its ServiceAccount and ConfigMap settings.
    let deploy = tunmesh_lab::controlplane::deploy_dir();
    let out = lab
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-k",
            &deploy.display().to_string(),
        ])
        .expect("kubectl apply --dry-run=server -k deploy/");
    for kind in [
        "namespace/tunmesh",
        "serviceaccount/tunmesh",
        "clusterrole.rbac.authorization.k8s.io/tunmesh-router",
        "clusterrolebinding.rbac.authorization.k8s.io/tunmesh-router",
        "configmap/tunmesh-config",
        "daemonset.apps/tunmesh",
    ] {
        assert!(
            out.contains(kind),
            "{kind} missing from the dry run:\n{out}"
        );
    }
    let ds = lab
        .kubectl(&["kustomize", &deploy.display().to_string()])
        .unwrap();
    assert!(
        ds.contains("image: tunmesh:0.1.0") && ds.contains("NET_ADMIN") && ds.contains("/readyz"),
        "{ds}"
    );
    let mtu = exec(&n1.ns, "ip", &["link", "show", &n1.interface]).unwrap();
    // No TUNMESH_MTU in the ConfigMap: the underlay's 1500 less 60
    // (WireGuard over IPv4).
    assert!(
        mtu.contains("mtu 1440"),
        "MTU derived from the underlay: {mtu}"
    );
    let log = std::fs::read_to_string(&n1.log).unwrap();
    assert!(
        log.contains("source=\"kubernetes\""),
        "NODE_NAME from the environment selects Kubernetes"
    );

    // tunmesh-ctl on node-1: status, graph and check, then with a link cut.
    // (It reads status.json, rewritten every second: wait until that too
    // has dropped the `wg set` peer.)
    assert!(lab
        .wait_status("node-1", Duration::from_secs(5), |s| s.peers.len() == 2)
        .is_some());
    let ctl = find_binary("tunmesh-ctl", "TUNMESH_CTL_BIN")
        .unwrap()
        .display()
        .to_string();
    let state = n1.state_dir.display().to_string();
    let run = |args: &[&str]| {
        exec_output(&n1.ns, &ctl, &[&["--state-dir", &state], args].concat()).unwrap()
    };
    let out = run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&status.public_key)
            && text.contains(&n1.pod_cidr_v4)
            && text.contains("connected"),
        "{text}"
    );
    for peer in ["node-2", "node-3"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(peer) && l.trim_end().ends_with("up")),
            "{peer} not up:\n{text}"
        );
    }
    let kc = n1.kubeconfig.clone().unwrap().display().to_string();
    let out = run(&["graph", "--kubeconfig", &kc]);
    let dot = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dot.starts_with("graph tunmesh {"),
        "{dot}"
    );
    assert!(
        dot.contains("\"node-1\" -- \"node-2\" [color=green"),
        "{dot}"
    );
    assert!(
        dot.contains(&lab.node("node-3").unwrap().pod_cidr_v4),
        "{dot}"
    );
    let out = run(&["check", "--timeout", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("all 2 links ok"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let n3 = lab.node("node-3").unwrap();
    exec(&n3.ns, "ip", &["link", "set", "eth0", "down"]).unwrap();
    let out = run(&["check", "--timeout", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "check must fail with node-3 cut off:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("node-3") && l.contains("BROKEN")),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("node-2"))
            .all(|l| l.contains("ok")),
        "{text}"
    );

    // Uninstall: refused while the router runs; after it stops, the
    // interface, routes, conflist, plugin binary and annotations go.
    let mut lab = lab;
    let n2 = lab.node("node-2").unwrap().clone();
    let bin_dir = n2.state_dir.with_file_name("opt-cni-bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::write(bin_dir.join("tunmesh-cni"), b"binary").unwrap();
    std::fs::write(bin_dir.join("tunmesh-portmap"), b"binary").unwrap();
    let uninstall = |n: &tunmesh_lab::lab::NodeInfo| {
        exec_output(
            &n.ns,
            &ctl,
            &[
                "--state-dir",
                &n.state_dir.display().to_string(),
                "uninstall",
                "--node-name",
                &n.name,
                "--kubeconfig",
                &n.kubeconfig.clone().unwrap().display().to_string(),
                "--interface",
                &n.interface,
                "--cni-conf-dir",
                &n.state_dir.with_file_name("cni-conf").display().to_string(),
                "--cni-bin-dir",
                &bin_dir.display().to_string(),
            ],
        )
        .unwrap()
    };
    let out = uninstall(&n2);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("still running"),
        "{out:?}"
    );
    lab.stop_router(1).unwrap();
    // A device left behind under the router's name (a persistent one, or a
    // crash mid-start), with a tunmesh route: uninstall removes both.
    exec(
        &n2.ns,
        "ip",
        &["tuntap", "add", "dev", &n2.interface, "mode", "tun"],
    )
    .unwrap();
    exec(&n2.ns, "ip", &["link", "set", &n2.interface, "up"]).unwrap();
    exec(
        &n2.ns,
        "ip",
        &[
            "route",
            "add",
            "10.244.99.0/24",
            "dev",
            &n2.interface,
            "proto",
            "116",
        ],
    )
    .unwrap();
    // status.json has to age past "running" first.
    let stopped = wait_for(Duration::from_secs(10), || {
        let out = uninstall(&n2);
        out.status.success().then_some(out)
    })
    .expect("uninstall after the router stopped");
    let text = String::from_utf8_lossy(&stopped.stdout);
    assert!(
        text.contains("removed CNI conflist")
            && text.contains("removed CNI plugin")
            && text.contains(&format!(
                "removed interface {} and its routes",
                n2.interface
            )),
        "{text}"
    );
    assert!(!n2
        .state_dir
        .with_file_name("cni-conf")
        .join("10-tunmesh.conflist")
        .exists());
    assert!(!bin_dir.join("tunmesh-cni").exists());
    assert!(!bin_dir.join("tunmesh-portmap").exists());
    assert!(
        exec(&n2.ns, "ip", &["link", "show", &n2.interface]).is_err(),
        "interface left behind"
    );
    assert!(exec(&n2.ns, "ip", &["route", "show", "proto", "116"])
        .unwrap()
        .trim()
        .is_empty());
    let ann = lab
        .kubectl(&[
            "get",
            "node",
            "node-2",
            "-o",
            "jsonpath={.metadata.annotations}",
        ])
        .unwrap();
    assert!(
        !ann.contains("tunmesh.io/public-key") && !ann.contains("tunmesh.io/endpoint"),
        "{ann}"
    );
    lab.down().unwrap();
}
