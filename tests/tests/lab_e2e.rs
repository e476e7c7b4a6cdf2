//! End-to-end tests on a 3-node lab with real TUN devices in namespaces,
//! on static mesh files (the Kubernetes source has its own tests in
//! kube_mesh.rs). They need root; CI runs them as root.

use std::time::Duration;

use tunmesh_lab::checks::{self, ping, tcp_transfer};
use tunmesh_lab::netns::{exec, exec_output};
use tunmesh_lab::pcap::{self, Frame};
use tunmesh_lab::{require_root, Lab, LabOptions};

fn lab(nodes: usize, pods: usize) -> Lab {
    Lab::up(&LabOptions {
        nodes,
        pods_per_node: pods,
        mesh_file: true,
        ..Default::default()
    })
    .expect("lab up")
}

fn drops(lab: &Lab, node: &str, reason: &str) -> u64 {
    lab.router_status(node)
        .map(|s| s.counters.drops.get(reason).copied().unwrap_or(0))
        .unwrap_or(0)
}

#[test]
fn all_pairs_reachable_through_the_tunnels() {
    if !require_root("all_pairs_reachable_through_the_tunnels") {
        return;
    }
    let lab = lab(3, 2);
    let results = checks::matrix(&lab);
    let failed: Vec<_> = results.iter().filter(|r| !r.ok()).collect();
    assert!(
        failed.is_empty(),
        "unreachable pairs:\n{}",
        checks::matrix_table(&results)
    );
    assert_eq!(results.len(), 6 * 5 + 3 * 6);
    // Traffic between nodes went through the routers, with handshakes done
    // (the status snapshot is rewritten every second: poll for it).
    for n in ["node-1", "node-2", "node-3"] {
        let done = |s: &tunmesh_router::status::Status| {
            s.peers.len() == 2
                && s.peers
                    .iter()
                    .all(|p| p.latest_handshake_unix.is_some() && p.rx_bytes > 0 && p.tx_bytes > 0)
        };
        let seen = lab.wait_status(n, Duration::from_secs(10), done);
        assert!(
            seen.is_some(),
            "{n}: peers without handshake or traffic: {:#?}",
            lab.router_status(n).map(|s| s.peers)
        );
    }
}

fn capture(lab: &Lab, traffic: impl FnOnce(), done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    tunmesh_lab::pcap::capture_underlay(lab, traffic, done)
}

#[test]
fn underlay_carries_only_wireguard_and_never_the_marker() {
    if !require_root("underlay_carries_only_wireguard_and_never_the_marker") {
        return;
    }
    let lab = lab(3, 1);
    const MARKER: &[u8] = b"TUNMESH-PLAINTEXT-MARKER-7f3a";
    let data: Vec<u8> = MARKER.iter().copied().cycle().take(512 * 1024).collect();
    let want = checks::sha256(&data);
    let a = lab.pod("node-1-pod-1").unwrap().clone();
    let b = lab.pod("node-2-pod-1").unwrap().clone();
    let c = lab.pod("node-3-pod-1").unwrap().clone();
    let cap = capture(
        &lab,
        || {
            for (to, dst) in [
                (&b, b.ipv4.into()),
                (&b, b.ipv6.into()),
                (&c, c.ipv4.into()),
            ] {
                let got = tcp_transfer(&a.ns, &to.ns, dst, data.clone(), Duration::from_secs(20))
                    .expect("transfer");
                assert_eq!(got, want, "bytes arrived intact");
            }
            let pattern = "54554e4d4553482d504c41494e544558"; // "TUNMESH-PLAINTEX"
            exec(
                &a.ns,
                "ping",
                &["-c", "3", "-i", "0.2", "-p", pattern, &b.ipv4.to_string()],
            )
            .expect("ping with marker");
        },
        |_| false,
    );
    let frames = pcap::frames(&cap).unwrap();
    // Count WireGuard bytes, not frames: GSO super-datagrams cross the veth whole.
    let wg_bytes: usize = frames
        .iter()
        .map(|f| match f {
            Frame::Udp {
                src_port: 51820,
                dst_port: 51820,
                bytes,
            } => *bytes,
            _ => 0,
        })
        .sum();
    assert!(
        wg_bytes > 3 * 512 * 1024,
        "expected the transfers on the underlay as WireGuard UDP, saw {wg_bytes} bytes"
    );
    let other: Vec<_> = frames
        .iter()
        .filter(|f| {
            !matches!(
                f,
                Frame::Udp {
                    src_port: 51820,
                    dst_port: 51820,
                    ..
                } | Frame::Arp
                    | Frame::LinkHousekeeping
            )
        })
        .collect();
    assert!(
        other.is_empty(),
        "non-WireGuard IP traffic on the underlay: {other:?}"
    );
    assert!(
        !pcap::contains(&cap, MARKER),
        "the marker crossed the underlay in clear"
    );
    assert!(
        !pcap::contains(&cap, b"TUNMESH-PLAINTEX"),
        "the ping pattern crossed the underlay in clear"
    );

    // Control: the same check does see plaintext when it is there.
    let n1 = lab.node("node-1").unwrap().ns.clone();
    let n2 = lab.node("node-2").unwrap().underlay_ip.to_string();
    let clear = capture(
        &lab,
        || {
            let _ = exec_output(
                &n1,
                "bash",
                &[
                    "-c",
                    &format!(
                        "printf '%s' '{}' > /dev/udp/{n2}/9",
                        std::str::from_utf8(MARKER).unwrap()
                    ),
                ],
            );
        },
        |cap| pcap::contains(cap, MARKER),
    );
    assert!(
        pcap::contains(&clear, MARKER),
        "control capture should contain the marker sent in clear"
    );
}

#[test]
fn spoofed_inner_source_is_dropped_and_counted() {
    if !require_root("spoofed_inner_source_is_dropped_and_counted") {
        return;
    }
    let lab = lab(3, 1);
    let n2 = lab.node("node-2").unwrap().ns.clone();
    let target = lab.pod("node-1-pod-1").unwrap().ipv4.to_string();
    assert!(
        ping(&n2, target.parse().unwrap(), 5),
        "legitimate traffic first"
    );
    assert_eq!(drops(&lab, "node-1", "source_not_allowed"), 0);
    // node-2 sends with a source that belongs to node-3's pod CIDR.
    exec(&n2, "ip", &["addr", "add", "10.244.3.77/32", "dev", "lo"]).unwrap();
    let out = exec_output(
        &n2,
        "ping",
        &[
            "-n",
            "-c",
            "3",
            "-i",
            "0.2",
            "-w",
            "2",
            "-I",
            "10.244.3.77",
            &target,
        ],
    )
    .unwrap();
    assert!(!out.status.success(), "spoofed ping must not be answered");
    let s = lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.counters.drops["source_not_allowed"] >= 3
    });
    assert!(
        s.is_some(),
        "node-1 did not count the spoofed packets: {:?}",
        lab.router_status("node-1").map(|s| s.counters)
    );
    assert!(
        ping(&n2, target.parse().unwrap(), 5),
        "the mesh still works"
    );
}

#[test]
fn mesh_file_reload_keeps_last_good_mesh_and_applies_minimal_diffs() {
    if !require_root("mesh_file_reload_keeps_last_good_mesh_and_applies_minimal_diffs") {
        return;
    }
    let lab = lab(3, 1);
    let n1 = lab.node("node-1").unwrap().clone();
    let p1 = lab.pod("node-1-pod-1").unwrap().ns.clone();
    let p2 = lab.pod("node-2-pod-1").unwrap().ipv4;
    let p3 = lab.pod("node-3-pod-1").unwrap().ipv4;
    assert!(ping(&p1, p2.into(), 5) && ping(&p1, p3.into(), 5));
    let handshake = |s: &tunmesh_router::status::Status| {
        s.peers
            .iter()
            .find(|p| p.name == "node-2")
            .and_then(|p| p.latest_handshake_unix)
    };
    let s = lab
        .wait_status("node-1", Duration::from_secs(10), |s| {
            handshake(s).is_some()
        })
        .expect("handshake with node-2");
    let hs_before = handshake(&s);

    // 1. A bad file is refused; the mesh stays as it was.
    let good = lab.mesh_file_text(0, None);
    std::fs::write(
        &n1.mesh_file,
        good.replace(
            "endpoint = \"172.28.0.13:51820\"",
            "endpoint = \"172.28.0.13\"",
        ),
    )
    .unwrap();
    lab.reload("node-1").unwrap();
    let s = lab
        .wait_status("node-1", Duration::from_secs(10), |s| s.reloads == 1)
        .expect("reload seen");
    let r = s.last_reload.unwrap();
    assert!(
        !r.ok && r.message.contains("peer[1] (\"node-3\").endpoint"),
        "{}",
        r.message
    );
    assert_eq!(s.peers.len(), 2);
    assert!(ping(&p1, p3.into(), 5), "last good mesh kept");
    let log = std::fs::read_to_string(&n1.log).unwrap();
    assert!(log.contains("reload refused"), "the refusal is logged");

    // 2. Removing node-3: its routes go, node-2's session stays.
    std::fs::write(&n1.mesh_file, lab.mesh_file_text(0, Some(2))).unwrap();
    lab.reload("node-1").unwrap();
    let s = lab
        .wait_status("node-1", Duration::from_secs(10), |s| s.reloads == 2)
        .expect("reload seen");
    assert!(s.last_reload.as_ref().unwrap().ok, "{:?}", s.last_reload);
    assert_eq!(s.peers.len(), 1);
    // One route for the cluster CIDR, none per peer inside it: the
    // router's own table picks the peer, and drops what has none.
    let routes = exec(&n1.ns, "ip", &["route", "show", "proto", "116"]).unwrap();
    assert!(
        routes.contains(tunmesh_lab::lab::CLUSTER_V4)
            && !routes.contains("10.244.3.0/24")
            && !routes.contains("10.244.2.0/24"),
        "{routes}"
    );
    let no_peer = drops(&lab, "node-1", "no_peer");
    assert!(!ping(&p1, p3.into(), 2), "removed peer unreachable");
    let s = lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.counters.drops["no_peer"] > no_peer
    });
    assert!(
        s.is_some(),
        "traffic to the removed peer's CIDR is dropped by the router (cluster route), not sent"
    );
    let hs_after = handshake(&lab.router_status("node-1").unwrap());
    assert_eq!(hs_before, hs_after, "node-2's session was not disturbed");
    assert!(ping(&p1, p2.into(), 5));

    // 3. Restoring it brings node-3 back.
    std::fs::write(&n1.mesh_file, good).unwrap();
    lab.reload("node-1").unwrap();
    lab.wait_status("node-1", Duration::from_secs(10), |s| {
        s.reloads == 3 && s.peers.len() == 2
    })
    .expect("restored");
    assert!(ping(&p1, p3.into(), 5));
}
