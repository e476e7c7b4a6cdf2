//! Pods attached by `tunmesh-cni` in a 3-node lab on the real control
//! plane: every pair reachable, no NAT anywhere on the pod network, a
//! NodePort-style DNAT on one node to a pod on another, and a router
//! restart that changes no allocated address. Root only; CI runs them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tunmesh_lab::checks::{self, tcp_seen_source};
use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns::exec;
use tunmesh_lab::require_root;

fn allocations(lab: &Lab, node: &str) -> serde_json::Value {
    let n = lab.node(node).unwrap();
    let path = n.state_dir.join("cni/tunmesh/allocations.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["allocations"].clone()
}

#[test]
fn pods_reach_each_other_without_nat_and_through_nodeport_dnat() {
    if !require_root("pods_reach_each_other_without_nat_and_through_nodeport_dnat") {
        return;
    }
    let mut lab = Lab::for_test(3, 2);

    // Every pod was attached by the plugin and has distinct addresses from
    // its node's podCIDR.
    for p in &lab.state.pods {
        let n = &lab.state.nodes[p.node];
        let cidr: ipnetwork::IpNetwork = n.pod_cidr_v4.parse().unwrap();
        assert!(
            cidr.contains(IpAddr::V4(p.ipv4)),
            "{} {} outside {}",
            p.name,
            p.ipv4,
            cidr
        );
        let cidr6: ipnetwork::IpNetwork = n.pod_cidr_v6.parse().unwrap();
        assert!(
            cidr6.contains(IpAddr::V6(p.ipv6)),
            "{} {} outside {}",
            p.name,
            p.ipv6,
            cidr6
        );
    }
    let mut seen: Vec<_> = lab.state.pods.iter().map(|p| p.ipv4).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6);
    let results = checks::matrix(&lab);
    assert!(
        results.iter().all(|r| r.ok()),
        "unreachable pairs:\n{}",
        checks::matrix_table(&results)
    );

    let pod = |lab: &Lab, name: &str| lab.pod(name).unwrap().clone();
    let node = |name: &str| lab.node(name).unwrap().clone();
    let (a, b) = (pod(&lab, "node-1-pod-1"), pod(&lab, "node-2-pod-1"));
    let (n1, n2, n3) = (node("node-1"), node("node-2"), node("node-3"));

    // Pod to pod across nodes, both families: the receiver sees the
    // sender's own address.
    let saw = tcp_seen_source(&a.ns, &b.ns, 0, SocketAddr::new(b.ipv4.into(), 0)).unwrap();
    assert_eq!(saw, IpAddr::V4(a.ipv4));
    let saw = tcp_seen_source(&a.ns, &b.ns, 0, SocketAddr::new(b.ipv6.into(), 0)).unwrap();
    assert_eq!(saw, IpAddr::V6(a.ipv6));
    // Node to pod: the node's own (gateway) address.
    let saw = tcp_seen_source(&n1.ns, &b.ns, 0, SocketAddr::new(b.ipv4.into(), 0)).unwrap();
    assert!(
        saw == IpAddr::V4(n1.gateway_v4) || saw == IpAddr::V4(n1.underlay_ip),
        "node-1 seen as {saw}"
    );
    // Pod to another node, at its gateway address (through the mesh) and at
    // its underlay address (out over the underlay, reply through the mesh):
    // the node sees the pod's address.
    let saw = tcp_seen_source(&a.ns, &n2.ns, 0, SocketAddr::new(n2.gateway_v4.into(), 0)).unwrap();
    assert_eq!(saw, IpAddr::V4(a.ipv4));
    let saw = tcp_seen_source(&a.ns, &n2.ns, 0, SocketAddr::new(n2.underlay_ip.into(), 0)).unwrap();
    assert_eq!(saw, IpAddr::V4(a.ipv4));

    // NodePort: node-1 DNATs :30080 to a pod on node-2 (and masquerades it,
    // as kube-proxy does for externalTrafficPolicy: Cluster); a client on
    // node-3 connects to node-1.
    let nat = |args: &[&str]| exec(&n1.ns, "iptables", &[&["-t", "nat"], args].concat()).unwrap();
    let target = format!("{}:8080", b.ipv4);
    nat(&[
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "--dport",
        "30080",
        "-j",
        "DNAT",
        "--to-destination",
        &target,
    ]);
    nat(&[
        "-A",
        "POSTROUTING",
        "-d",
        &b.ipv4.to_string(),
        "-p",
        "tcp",
        "--dport",
        "8080",
        "-j",
        "MASQUERADE",
    ]);
    let saw = tcp_seen_source(
        &n3.ns,
        &b.ns,
        8080,
        SocketAddr::new(n1.underlay_ip.into(), 30080),
    )
    .expect("NodePort on node-1 reaches the pod on node-2");
    assert!(
        saw == IpAddr::V4(n1.gateway_v4),
        "the pod sees node-1 (masqueraded), saw {saw}"
    );
    // A router restart changes no allocated address and no pod address.
    let before = allocations(&lab, "node-1");
    assert_eq!(before.as_object().unwrap().len(), 2, "{before}");
    lab.stop_router(0).unwrap();
    lab.start_router(0).unwrap();
    lab.wait_router(0).unwrap();
    lab.wait_node_ready(0).unwrap();
    assert_eq!(allocations(&lab, "node-1"), before);
    let addrs = exec(&a.ns, "ip", &["addr", "show", "eth0"]).unwrap();
    assert!(addrs.contains(&format!("{}/32", a.ipv4)), "{addrs}");
    // The mesh comes back for the restarted node's pods.
    let back = tunmesh_lab::netns::wait_for(Duration::from_secs(20), || {
        checks::ping(&a.ns, b.ipv4.into(), 1).then_some(())
    });
    assert!(
        back.is_some(),
        "node-1's pod unreachable after the router restart"
    );
    // A pod added after the restart gets a new address, not a taken one.
    lab.add_pod(1, 3).unwrap();
    let c = pod(&lab, "node-1-pod-3");
    assert!(c.ipv4 != a.ipv4 && c.ipv4 != pod(&lab, "node-1-pod-2").ipv4);
    assert!(checks::ping(&c.ns, b.ipv4.into(), 10));
    lab.down().unwrap();
}
