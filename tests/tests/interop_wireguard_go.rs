//! Interop with an independent WireGuard implementation: a tunmesh router
//! and Debian's wireguard-go (configured with `wg`) handshake and carry ping
//! and iperf3 in both directions, over an IPv4 and over an IPv6 underlay.
//! Needs root, wireguard-go, wireguard-tools and iperf3 (CI installs them).

use std::path::Path;
use std::time::Duration;

use tunmesh_keygen::PrivateKey;
use tunmesh_lab::checks::{iperf3, ping};
use tunmesh_lab::netns::{self, add_netns, exec, ip, veth, Cleanup};
use tunmesh_lab::peers::{self, Side};
use tunmesh_lab::require_root;
use tunmesh_router::status::Status;

fn interop(v6_underlay: bool) {
    let id = netns::run_id();
    let mut clean = Cleanup::default();
    let (a, b) = (format!("tm{id}-wga"), format!("tm{id}-wgb"));
    let wg_if = format!("tmwg{id}");
    let dir = std::env::temp_dir().join(format!("tunmesh-interop-{id}"));
    std::fs::create_dir_all(&dir).unwrap();
    clean.files.push(dir.clone());
    clean
        .files
        .push(Path::new("/var/run/wireguard").join(format!("{wg_if}.sock")));
    for ns in [&a, &b] {
        add_netns(ns).unwrap();
        clean.netns.push(ns.clone());
    }
    veth(&a, "eth0", &b, "eth0").unwrap();
    let (ua, ub) = if v6_underlay {
        ("fd77::1", "fd77::2")
    } else {
        ("172.29.0.1", "172.29.0.2")
    };
    for (ns, addr) in [(&a, ua), (&b, ub)] {
        let plen = if v6_underlay { "/64" } else { "/24" };
        let mut args = vec!["-n", ns.as_str(), "addr", "add"];
        let cidr = format!("{addr}{plen}");
        args.extend([cidr.as_str(), "dev", "eth0"]);
        if v6_underlay {
            args.push("nodad");
        }
        ip(&args).unwrap();
        ip(&["-n", ns, "link", "set", "eth0", "up"]).unwrap();
    }
    let ep = |addr: &str| {
        if v6_underlay {
            format!("[{addr}]:51820")
        } else {
            format!("{addr}:51820")
        }
    };

    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let (ka_file, kb_file) = (dir.join("a.key"), dir.join("b.key"));
    ka.write_file(&ka_file).unwrap();
    kb.write_file(&kb_file).unwrap();
    let (ep_a, ep_b) = (ep(ua), ep(ub));

    // Side B: wireguard-go, configured with wg, as an operator would.
    let wg_side = Side {
        ns: &b,
        key_file: &kb_file,
        own: "10.99.2.1/24",
        peer_key: ka.public_key(),
        peer_endpoint: &ep_a,
        peer_cidr: "10.99.1.0/24",
    };
    let wggo = peers::start_wg(
        &wg_side,
        Path::new("wireguard-go"),
        &["-f"],
        &wg_if,
        &dir.join("wggo.log"),
    )
    .expect("wireguard-go (apt-get install wireguard-go)");
    clean.children.push(wggo);

    // Side A: tunmesh with a mesh file naming the wireguard-go peer.
    let tm_side = Side {
        ns: &a,
        key_file: &ka_file,
        own: "10.99.1.0/24",
        peer_key: kb.public_key(),
        peer_endpoint: &ep_b,
        peer_cidr: "10.99.2.0/24",
    };
    let (router, state) =
        peers::start_router(&tm_side, &dir, "tunmesh", &[]).expect("tunmesh router");
    clean.children.push(router);

    assert!(
        ping(&a, "10.99.2.1".parse().unwrap(), 10),
        "tunmesh -> wireguard-go ping"
    );
    assert!(
        ping(&b, "10.99.1.1".parse().unwrap(), 10),
        "wireguard-go -> tunmesh ping"
    );
    let hs = exec(&b, "wg", &["show", &wg_if, "latest-handshakes"]).unwrap();
    let t: u64 = hs
        .split_whitespace()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    assert!(
        t > 1_600_000_000,
        "wg show reports a real handshake time: {hs:?}"
    );

    let fwd = iperf3(&a, &b, "10.99.2.1".parse().unwrap(), 3, &[])
        .expect("iperf3 tunmesh -> wireguard-go");
    let rev = iperf3(&a, &b, "10.99.2.1".parse().unwrap(), 3, &["-R"])
        .expect("iperf3 wireguard-go -> tunmesh");
    eprintln!(
        "interop ({} underlay): tunmesh -> wireguard-go {:.2} Gbit/s, wireguard-go -> tunmesh {:.2} Gbit/s (at the receiver)",
        if v6_underlay { "IPv6" } else { "IPv4" },
        fwd.gbps,
        rev.gbps
    );
    // Whatever the speed, data arrived both ways: at least 1 MiB in 3 s.
    for (what, r) in [
        ("tunmesh -> wireguard-go", fwd),
        ("wireguard-go -> tunmesh", rev),
    ] {
        assert!(
            r.received_bytes >= 1 << 20,
            "{what}: only {} bytes arrived",
            r.received_bytes
        );
    }
    // The status snapshot is rewritten every second: poll for the traffic.
    let counted = |s: &Status| s.peers[0].tx_bytes > 1_000_000 && s.peers[0].rx_bytes > 1_000_000;
    let s = netns::wait_for(Duration::from_secs(10), || {
        Status::read(&state).ok().filter(counted)
    });
    let s = s.unwrap_or_else(|| {
        panic!(
            "router did not count the iperf3 traffic: {:?}",
            Status::read(&state)
        )
    });
    assert_eq!(s.peers[0].endpoint.as_deref(), Some(ep_b.as_str()));
}

#[test]
fn tunmesh_and_wireguard_go_over_ipv4() {
    if require_root("tunmesh_and_wireguard_go_over_ipv4") {
        interop(false);
    }
}

#[test]
fn tunmesh_and_wireguard_go_over_ipv6() {
    if require_root("tunmesh_and_wireguard_go_over_ipv6") {
        interop(true);
    }
}
