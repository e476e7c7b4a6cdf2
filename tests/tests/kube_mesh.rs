//! The Kubernetes source against a real control plane in the lab: etcd,
//! kube-apiserver and kube-controller-manager built from the pinned Go
//! modules, routers authenticating with the shipped ServiceAccount and
//! ClusterRole. Each test builds its own lab and walks through a sequence
//! of cluster changes on it. They need root; CI runs them as root.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tunmesh_lab::checks::{self, ping};
use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::{self, ip};
use tunmesh_lab::require_root;
use tunmesh_router::status::Status;

fn lab(nodes: usize, pods: usize) -> Lab {
    Lab::for_test(nodes, pods)
}

fn pod_ns(lab: &Lab, name: &str) -> String {
    lab.pod(name).expect(name).ns.clone()
}

fn pod_v4(lab: &Lab, name: &str) -> IpAddr {
    lab.pod(name).expect(name).ipv4.into()
}

/// Every node's status, polled until `pred` holds for all of `nodes`.
fn wait_all(
    lab: &Lab,
    nodes: &[&str],
    timeout: Duration,
    what: &str,
    pred: impl Fn(&str, &Status) -> bool,
) {
    for n in nodes {
        let ok = lab.wait_status(n, timeout, |s| pred(n, s));
        assert!(
            ok.is_some(),
            "{what}: {n} never got there; its status: {:#?}",
            lab.router_status(n).map(|s| (s.peers, s.kubernetes))
        );
    }
}

fn peer_names(s: &Status) -> Vec<String> {
    let mut v: Vec<String> = s.peers.iter().map(|p| p.name.clone()).collect();
    v.sort();
    v
}

fn all_pairs_ok(lab: &Lab) {
    let results = checks::matrix(lab);
    assert!(
        results.iter().all(|r| r.ok()),
        "unreachable pairs:\n{}",
        checks::matrix_table(&results)
    );
}

/// Events recorded on Node `node` with `reason`.
fn events(lab: &Lab, node: &str, reason: &str) -> usize {
    lab.node_events(node, reason).map(|e| e.len()).unwrap_or(0)
}

fn router_alive(lab: &Lab, node: &str) -> bool {
    lab.node(node)
        .and_then(|n| n.router_pid)
        .is_some_and(netns::is_running)
}

#[test]
fn nodes_join_leave_rekey_and_move_endpoints() {
    if !require_root("nodes_join_leave_rekey_and_move_endpoints") {
        return;
    }
    let mut lab = lab(3, 1);

    // Every router published its key and endpoint; every pair is reachable.
    for n in ["node-1", "node-2", "node-3"] {
        let ann = lab
            .kubectl(&["get", "node", n, "-o", "jsonpath={.metadata.annotations}"])
            .unwrap();
        let ip = lab.node(n).unwrap().underlay_ip;
        assert!(
            ann.contains(&format!("\"tunmesh.io/endpoint\":\"{ip}:51820\"")),
            "{n}: {ann}"
        );
        assert!(ann.contains(&lab.node(n).unwrap().public_key), "{n}: {ann}");
    }
    all_pairs_ok(&lab);

    // Join: a fourth node comes up in the running cluster.
    let t0 = Instant::now();
    let i4 = lab.add_node(1).expect("node-4 joins");
    let joined = t0.elapsed();
    let p4 = "node-4-pod-1";
    for other in ["node-1-pod-1", "node-2-pod-1", "node-3-pod-1"] {
        assert!(
            ping(&pod_ns(&lab, other), pod_v4(&lab, p4), 10),
            "{other} -> {p4}"
        );
        assert!(
            ping(&pod_ns(&lab, p4), pod_v4(&lab, other), 10),
            "{p4} -> {other}"
        );
    }
    let converged = t0.elapsed();
    eprintln!(
        "join: node-4 registered and its router up after {:.1} s; reached by every pod after {:.1} s",
        joined.as_secs_f64(),
        converged.as_secs_f64()
    );
    all_pairs_ok(&lab);

    // Key change: node-2's router restarts with a fresh key. Peers replace
    // the old key (same Node, so the same peer), never keep both.
    let old_key = lab.node("node-2").unwrap().public_key.clone();
    lab.stop_router(1).unwrap();
    std::fs::remove_file(lab.node("node-2").unwrap().state_dir.join("private.key")).unwrap();
    lab.start_router(1).unwrap();
    lab.wait_router(1).unwrap();
    lab.wait_node_ready(1).unwrap();
    let new_key = lab.node("node-2").unwrap().public_key.clone();
    assert_ne!(old_key, new_key);
    wait_all(
        &lab,
        &["node-1", "node-3", "node-4"],
        Duration::from_secs(30),
        "key change",
        |_, s| {
            s.peers
                .iter()
                .any(|p| p.name == "node-2" && p.public_key == new_key)
                && s.peers.iter().all(|p| p.public_key != old_key)
                && s.peers.len() == 3
        },
    );
    assert!(ping(
        &pod_ns(&lab, "node-1-pod-1"),
        pod_v4(&lab, "node-2-pod-1"),
        10
    ));
    assert!(ping(
        &pod_ns(&lab, "node-2-pod-1"),
        pod_v4(&lab, "node-3-pod-1"),
        10
    ));

    // Endpoint change: node-3 gets a second underlay address that only
    // tunmesh.io/force-endpoint announces (its InternalIP stays the old
    // one). Peers must switch to it before any traffic; after traffic they
    // may roam to whichever address node-3 answers from.
    let n3 = lab.node("node-3").unwrap().clone();
    ip(&[
        "-n",
        &n3.ns,
        "addr",
        "add",
        "172.28.0.203/24",
        "dev",
        "eth0",
    ])
    .unwrap();
    lab.kubectl(&[
        "annotate",
        "node",
        "node-3",
        "tunmesh.io/force-endpoint=172.28.0.203:51820",
    ])
    .unwrap();
    wait_all(
        &lab,
        &["node-1", "node-2", "node-4"],
        Duration::from_secs(30),
        "force-endpoint",
        |_, s| {
            s.peers
                .iter()
                .any(|p| p.name == "node-3" && p.endpoint.as_deref() == Some("172.28.0.203:51820"))
        },
    );
    for other in ["node-1-pod-1", "node-2-pod-1", "node-4-pod-1"] {
        assert!(
            ping(&pod_ns(&lab, other), pod_v4(&lab, "node-3-pod-1"), 10),
            "{other} -> node-3 at its forced endpoint"
        );
    }

    // Leave: node-4's Node is deleted; its peer and routes go everywhere.
    let cidr4 = lab.state.nodes[i4].pod_cidr_v4.clone();
    lab.kubectl(&["delete", "node", "node-4"]).unwrap();
    wait_all(
        &lab,
        &["node-1", "node-2", "node-3"],
        Duration::from_secs(30),
        "leave",
        |me, s| {
            let want: Vec<String> = ["node-1", "node-2", "node-3"]
                .iter()
                .filter(|n| **n != me)
                .map(|n| n.to_string())
                .collect();
            peer_names(s) == want
        },
    );
    for n in ["node-1", "node-2", "node-3"] {
        let routes = lab
            .exec(n, "ip", &["route", "show", "proto", "116"])
            .unwrap();
        assert!(
            !routes.contains(&cidr4),
            "{n} still routes {cidr4}:\n{routes}"
        );
    }
    // node-4's pods are unreachable, and because node-1's router dropped
    // the pings as `no_peer` (the cluster CIDR still routes into the TUN),
    // not because of anything else.
    let no_peer = |s: &Status| s.counters.drops.get("no_peer").copied().unwrap_or(0);
    let before = no_peer(&lab.router_status("node-1").unwrap());
    assert!(!ping(
        &pod_ns(&lab, "node-1-pod-1"),
        pod_v4(&lab, "node-4-pod-1"),
        2
    ));
    let counted = lab.wait_status("node-1", Duration::from_secs(5), |s| {
        no_peer(s) >= before + 2
    });
    assert!(
        counted.is_some(),
        "the pings to the deleted node's pod were not dropped as no_peer by node-1 (before: {before})"
    );
    lab.down().unwrap();
}

#[test]
fn bad_annotations_outages_and_rbac_never_stop_the_mesh() {
    if !require_root("bad_annotations_outages_and_rbac_never_stop_the_mesh") {
        return;
    }
    let mut lab = lab(3, 1);
    let real = ["node-1", "node-2", "node-3"];
    let good = lab.node("node-1").unwrap().public_key.clone();
    let n1_cidr = lab.node("node-1").unwrap().pod_cidr_v4.clone();

    // The routers' ServiceAccount can do what deploy/rbac.yaml says and no more.
    let sa = "system:serviceaccount:tunmesh:tunmesh";
    for (verb, res, allowed) in [
        ("watch", "nodes", true),
        ("patch", "nodes", true),
        ("create", "events", true),
        ("delete", "nodes", false),
        ("create", "pods", false),
        ("get", "secrets", false),
        ("patch", "events", false),
        ("update", "nodes", false),
        ("patch", "nodes/status", false),
        ("create", "serviceaccounts/token", false),
        ("impersonate", "users", false),
        ("impersonate", "serviceaccounts", false),
    ] {
        // `can-i VERB a/b` would read b as an object's name: a
        // subresource is its own flag (else a flag that changes nothing).
        let (res, sub) = match res.split_once('/') {
            Some((r, s)) => (r, format!("--subresource={s}")),
            None => (res, "--all-namespaces=false".to_string()),
        };
        let out = tunmesh_lab::netns::exec_output(
            &lab.control_plane().unwrap().ns,
            &lab.control_plane()
                .unwrap()
                .bin
                .join("kubectl")
                .display()
                .to_string(),
            &[
                &format!(
                    "--kubeconfig={}",
                    lab.control_plane().unwrap().admin_kubeconfig().display()
                ),
                "auth",
                "can-i",
                verb,
                res,
                &sub,
                &format!("--as={sa}"),
            ],
        )
        .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert_eq!(said == "yes", allowed, "can-i {verb} {res}: {said}");
    }

    // Malformed input, one Node per kind (no router behind them).
    let bad = [
        (
            "bad-key",
            "InvalidPublicKey",
            serde_json::json!({"tunmesh.io/public-key": "not a key", "tunmesh.io/endpoint": "172.28.0.99:51820"}),
            None,
        ),
        (
            "bad-endpoint",
            "InvalidEndpoint",
            serde_json::json!({"tunmesh.io/public-key": tunmesh_keygen::PrivateKey::generate().public_key().to_base64(), "tunmesh.io/endpoint": "nowhere:51820"}),
            None,
        ),
        (
            "bad-force",
            "InvalidEndpoint",
            serde_json::json!({"tunmesh.io/public-key": tunmesh_keygen::PrivateKey::generate().public_key().to_base64(), "tunmesh.io/force-endpoint": "[::1"}),
            None,
        ),
        (
            "dup-key",
            "DuplicatePublicKey",
            serde_json::json!({"tunmesh.io/public-key": good, "tunmesh.io/endpoint": "172.28.0.97:51820"}),
            None,
        ),
        (
            "overlap",
            "PodCIDROverlap",
            serde_json::json!({"tunmesh.io/public-key": tunmesh_keygen::PrivateKey::generate().public_key().to_base64(), "tunmesh.io/endpoint": "172.28.0.96:51820"}),
            Some(n1_cidr.clone()),
        ),
    ];
    for (name, _, ann, cidr) in &bad {
        let mut node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "annotations": ann}});
        if let Some(c) = cidr {
            node["spec"] = serde_json::json!({"podCIDR": c, "podCIDRs": [c]});
        }
        lab.control_plane()
            .unwrap()
            .kubectl_stdin(&["create", "-f", "-"], &node.to_string())
            .unwrap();
    }
    for (name, reason, _, _) in &bad {
        let seen = netns::wait_for(Duration::from_secs(30), || {
            (events(&lab, name, reason) > 0).then_some(())
        });
        assert!(seen.is_some(), "no {reason} Event on {name}");
    }
    wait_all(
        &lab,
        &real,
        Duration::from_secs(30),
        "bad input reported",
        |_, s| {
            let k = s.kubernetes.as_ref();
            k.is_some_and(|k| {
                bad.iter().all(|(name, reason, _, _)| {
                    k.problems
                        .iter()
                        .any(|p| &p.node == name && &p.reason == reason)
                })
            })
        },
    );
    for n in real {
        assert!(router_alive(&lab, n), "{n}'s router died on bad input");
        let s = lab.router_status(n).unwrap();
        assert_eq!(
            s.peers.len(),
            2,
            "{n}: bad Nodes must not become peers: {:?}",
            peer_names(&s)
        );
    }
    all_pairs_ok(&lab);
    // A router's own annotation overwritten by hand is put back.
    lab.kubectl(&[
        "annotate",
        "--overwrite",
        "node",
        "node-1",
        "tunmesh.io/public-key=garbage",
    ])
    .unwrap();
    let restored = netns::wait_for(Duration::from_secs(30), || {
        let ann = lab
            .kubectl(&[
                "get",
                "node",
                "node-1",
                "-o",
                "jsonpath={.metadata.annotations.tunmesh\\.io/public-key}",
            ])
            .ok()?;
        (ann.trim() == good).then_some(())
    });
    assert!(
        restored.is_some(),
        "node-1 did not restore its public key annotation"
    );
    assert!(ping(
        &pod_ns(&lab, "node-2-pod-1"),
        pod_v4(&lab, "node-1-pod-1"),
        10
    ));
    for (name, _, _, _) in &bad {
        lab.kubectl(&["delete", "node", name]).unwrap();
    }

    // Outage, part 1: the API server is stopped. Pod traffic keeps flowing
    // on the last mesh, and the routers say they are disconnected.
    lab.control_plane_mut().unwrap().stop_apiserver();
    wait_all(
        &lab,
        &real,
        Duration::from_secs(60),
        "API down noticed",
        |_, s| s.kubernetes.as_ref().is_some_and(|k| !k.connected),
    );
    let data = checks::pattern(64 * 1024, 7);
    let got = checks::tcp_transfer(
        &pod_ns(&lab, "node-1-pod-1"),
        &pod_ns(&lab, "node-3-pod-1"),
        pod_v4(&lab, "node-3-pod-1"),
        data.clone(),
        Duration::from_secs(10),
    )
    .expect("TCP across the mesh while the API server is down");
    assert_eq!(got, checks::sha256(&data));
    all_pairs_ok(&lab);

    // Part 2: it comes back, but the routers still cannot reach it (the
    // control plane's underlay port is down), and a Node joins meanwhile.
    let ul = lab.state.underlay_ns.clone();
    ip(&["-n", &ul, "link", "set", "cp", "down"]).unwrap();
    lab.control_plane_mut().unwrap().start_apiserver().unwrap();
    let i4 = lab.add_node_namespace().unwrap();
    lab.start_router(i4).unwrap();
    lab.wait_router(i4).unwrap();
    assert!(ping(
        &pod_ns(&lab, "node-2-pod-1"),
        pod_v4(&lab, "node-3-pod-1"),
        10
    ));
    // The outage ends: everyone reconnects and picks up node-4.
    ip(&["-n", &ul, "link", "set", "cp", "up"]).unwrap();
    lab.wait_node_ready(i4).unwrap();
    lab.add_pod(i4 + 1, 1).unwrap();
    wait_all(
        &lab,
        &real,
        Duration::from_secs(90),
        "node-4 picked up after the outage",
        |_, s| {
            s.peers.iter().any(|p| p.name == "node-4")
                && s.kubernetes.as_ref().is_some_and(|k| k.connected)
        },
    );
    all_pairs_ok(&lab);

    // RBAC: a router bound to a role missing one verb fails with a message
    // that names the missing permission and the shipped role.
    for (verb_missing, verbs, expect) in [
        (
            "patch",
            r#"["get","list","watch"]"#,
            "annotating own Node failed",
        ),
        (
            "list",
            r#"["get","watch","patch"]"#,
            "listing Nodes: forbidden",
        ),
    ] {
        let role = format!("tunmesh-no-{verb_missing}");
        let yaml = format!(
            r#"{{"apiVersion":"v1","kind":"List","items":[
{{"apiVersion":"v1","kind":"ServiceAccount","metadata":{{"name":"{role}","namespace":"tunmesh"}}}},
{{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRole","metadata":{{"name":"{role}"}},
 "rules":[{{"apiGroups":[""],"resources":["nodes"],"verbs":{verbs}}},{{"apiGroups":[""],"resources":["events"],"verbs":["create"]}}]}},
{{"apiVersion":"rbac.authorization.k8s.io/v1","kind":"ClusterRoleBinding","metadata":{{"name":"{role}"}},
 "roleRef":{{"apiGroup":"rbac.authorization.k8s.io","kind":"ClusterRole","name":"{role}"}},
 "subjects":[{{"kind":"ServiceAccount","name":"{role}","namespace":"tunmesh"}}]}}]}}"#
        );
        lab.control_plane()
            .unwrap()
            .kubectl_stdin(&["apply", "-f", "-"], &yaml)
            .unwrap();
        let n3 = lab.node("node-3").unwrap().clone();
        let kc = n3.state_dir.with_file_name(format!("kubeconfig-{role}"));
        lab.control_plane()
            .unwrap()
            .router_kubeconfig(&role, "node-3", &kc)
            .unwrap();
        lab.stop_router(2).unwrap();
        // The Node must need a patch for the missing-patch case to show.
        lab.kubectl(&["annotate", "node", "node-3", "tunmesh.io/endpoint-"])
            .unwrap();
        let good_kc = n3.kubeconfig.clone();
        lab.state.nodes[2].kubeconfig = Some(kc);
        lab.start_router(2).unwrap();
        lab.state.nodes[2].kubeconfig = good_kc;
        let log = netns::wait_for(Duration::from_secs(30), || {
            let log = std::fs::read_to_string(&n3.log).ok()?;
            (log.contains(expect) && log.contains("forbidden") && log.contains("deploy/rbac.yaml"))
                .then_some(log)
        });
        assert!(
            log.is_some(),
            "missing {verb_missing}: no clear message in {}:\n{}",
            n3.log.display(),
            std::fs::read_to_string(&n3.log).unwrap_or_default()
        );
        assert!(
            router_alive(&lab, "node-3"),
            "the router must keep running and retrying"
        );
        // Back to the shipped role.
        lab.stop_router(2).unwrap();
        lab.start_router(2).unwrap();
        lab.wait_router(2).unwrap();
    }
    wait_all(
        &lab,
        &["node-1", "node-2", "node-4"],
        Duration::from_secs(30),
        "node-3 back",
        |_, s| {
            s.peers
                .iter()
                .any(|p| p.name == "node-3" && p.endpoint.is_some())
        },
    );
    all_pairs_ok(&lab);
    lab.down().unwrap();
}
