//! Interop with an independent WireGuard implementation: a tunmesh router
//! and Debian's wireguard-go (configured with `wg`) handshake and carry ping
//! and iperf3 in both directions, over an IPv4 and over an IPv6 underlay.
//! Needs root, wireguard-go, wireguard-tools and iperf3 (CI installs them).

use std::path::Path;
use std::time::Duration;

use tunmesh_keygen::PrivateKey;
use tunmesh_lab::checks::{iperf3, ping};
use tunmesh_lab::lab::find_binary;
use tunmesh_lab::netns::{self, add_netns, exec, ip, veth, Cleanup};
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

    // Side B: wireguard-go, configured with wg, as an operator would.
    let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
    let kb_file = dir.join("b.key");
    kb.write_file(&kb_file).unwrap();
    let wggo = netns::spawn(
        &b,
        Path::new("wireguard-go"),
        &["-f", &wg_if],
        &[("LOG_LEVEL", "verbose")],
        &dir.join("wggo.log"),
    )
    .expect("wireguard-go (apt-get install wireguard-go)");
    clean.children.push(wggo);
    let sock = Path::new("/var/run/wireguard").join(format!("{wg_if}.sock"));
    assert!(
        netns::wait_for(Duration::from_secs(10), || sock.exists().then_some(())).is_some(),
        "wireguard-go did not start"
    );
    exec(
        &b,
        "wg",
        &[
            "set",
            &wg_if,
            "listen-port",
            "51820",
            "private-key",
            &kb_file.display().to_string(),
            "peer",
            &ka.public_key().to_base64(),
            "allowed-ips",
            "10.99.1.0/24",
            "endpoint",
            &ep(ua),
        ],
    )
    .unwrap();
    ip(&["-n", &b, "addr", "add", "10.99.2.1/24", "dev", &wg_if]).unwrap();
    ip(&["-n", &b, "link", "set", &wg_if, "mtu", "1420", "up"]).unwrap();
    ip(&["-n", &b, "route", "add", "10.99.1.0/24", "dev", &wg_if]).unwrap();

    // Side A: tunmesh with a mesh file naming the wireguard-go peer.
    let ka_file = dir.join("a.key");
    ka.write_file(&ka_file).unwrap();
    let mesh = dir.join("mesh.toml");
    std::fs::write(
        &mesh,
        format!(
            "[node]\nprivate_key_file = \"{}\"\nlisten_port = 51820\npod_cidrs = [\"10.99.1.0/24\"]\n\n\
             [[peer]]\nname = \"wireguard-go\"\npublic_key = \"{}\"\nendpoint = \"{}\"\nallowed_ips = [\"10.99.2.0/24\"]\n",
            ka_file.display(),
            kb.public_key(),
            ep(ub)
        ),
    )
    .unwrap();
    let state = dir.join("state");
    let router = netns::spawn(
        &a,
        &find_binary("tunmesh-router", "TUNMESH_ROUTER_BIN").unwrap(),
        &[
            "--mesh-file",
            &mesh.display().to_string(),
            "--state-dir",
            &state.display().to_string(),
        ],
        &[("RUST_LOG", "info")],
        &dir.join("router.log"),
    )
    .unwrap();
    clean.children.push(router);
    let up = netns::wait_for(Duration::from_secs(10), || Status::read(&state).ok());
    assert!(
        up.is_some(),
        "router did not start: {}",
        std::fs::read_to_string(dir.join("router.log")).unwrap_or_default()
    );

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
    eprintln!("interop ({} underlay): tunmesh -> wireguard-go {fwd:.2} Gbit/s, wireguard-go -> tunmesh {rev:.2} Gbit/s", if v6_underlay { "IPv6" } else { "IPv4" });
    assert!(fwd > 0.0 && rev > 0.0);
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
    assert_eq!(s.peers[0].endpoint.as_deref(), Some(ep(ub).as_str()));
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
