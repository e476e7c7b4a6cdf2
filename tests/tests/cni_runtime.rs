//! A real container runtime: Debian's podman (CNI network backend, runc)
//! starts containers on two lab nodes, calling `tunmesh-cni` through libcni
//! with the conflist the node's router wrote. The containers' root file
//! system is a directory tree built here around Debian's static busybox (no
//! registry is reachable). A container on node-1 fetches a page over HTTP
//! from a container on node-2 and pings it, through the mesh; node-1 fetches
//! it through node-2's published host port (portmap, chained). Root only;
//! CI runs it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tunmesh_lab::lab::Lab;
use tunmesh_lab::netns;
use tunmesh_lab::podman::Podman;
use tunmesh_lab::require_root;

/// A root file system: static busybox, its applets, and a web page.
fn rootfs(dir: &Path, page: &str) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "www"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
    for applet in [
        "sh", "ip", "ping", "sleep", "wget", "httpd", "cat", "timeout",
    ] {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    std::fs::write(root.join("www/index.html"), page).unwrap();
    root
}

#[test]
fn podman_containers_on_two_nodes_reach_each_other() {
    if !require_root("podman_containers_on_two_nodes_reach_each_other") {
        return;
    }
    let lab = Lab::for_test(2, 0);
    let page = format!("served by tunmesh lab {}", lab.state.id);
    let root = rootfs(&lab.state.dir, &page);
    let root = root.display().to_string();
    let (n1, n2) = (lab.state.nodes[0].clone(), lab.state.nodes[1].clone());
    let (p1, p2) = (Podman::new(&lab, &n1), Podman::new(&lab, &n2));

    // A web server on node-2.
    p2.ok(&[
        "run",
        "--detach",
        "--name",
        "web",
        "--network",
        "tunmesh",
        "--publish",
        "18082:8080",
        "--rootfs",
        &root,
        "/bin/httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let ip = p2.ok(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.Networks.tunmesh.IPAddress}}",
        "web",
    ]);
    let ip: std::net::Ipv4Addr = ip
        .parse()
        .unwrap_or_else(|_| panic!("web's address: {ip:?}"));
    let cidr: ipnetwork::IpNetwork = n2.pod_cidr_v4.parse().unwrap();
    assert!(
        cidr.contains(ip.into()),
        "{ip} is not in node-2's podCIDR {cidr}"
    );
    let allocs =
        std::fs::read_to_string(n2.state_dir.join("cni/tunmesh/allocations.json")).unwrap();
    assert!(allocs.contains(&ip.to_string()), "{allocs}");

    // A client on node-1: the page comes back whole, and pings answer.
    let url = format!("http://{ip}:8080/index.html");
    let got = netns::wait_for(Duration::from_secs(20), || {
        // (busybox 1.35's `wget -T` crashes; `timeout` bounds it instead.)
        let out = p1.run_once(
            &root,
            &["/bin/timeout", "5", "/bin/wget", "-q", "-O", "-", &url],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).to_string())
    });
    assert_eq!(
        got.as_deref().map(str::trim),
        Some(page.as_str()),
        "wget {url} from node-1"
    );
    let ping = p1.run_once(&root, &["/bin/ping", "-c", "3", "-W", "2", &ip.to_string()]);
    assert!(
        ping.status.success(),
        "ping from node-1: {}",
        String::from_utf8_lossy(&ping.stdout)
    );

    // The host port (portmap, chained after tunmesh-cni): node-1 reaches
    // node-2's address, port 18082, and gets the container's page.
    let published = format!("http://{}:18082/index.html", n2.underlay_ip);
    let got = netns::wait_for(Duration::from_secs(20), || {
        netns::exec(
            &n1.ns,
            "timeout",
            &["5", "busybox", "wget", "-q", "-O", "-", &published],
        )
        .ok()
    });
    assert_eq!(
        got.as_deref().map(str::trim),
        Some(page.as_str()),
        "wget {published} from node-1 (node-2's host port)"
    );

    // Removing the containers runs DEL: node-1's store is empty again (its
    // containers ran with --rm), node-2's after the server goes.
    p2.ok(&["rm", "--force", "--time", "0", "web"]);
    for n in [&n1, &n2] {
        let text =
            std::fs::read_to_string(n.state_dir.join("cni/tunmesh/allocations.json")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["allocations"],
            serde_json::json!({}),
            "{}: {text}",
            n.name
        );
    }
    drop((p1, p2));
    lab.down().unwrap();
}
