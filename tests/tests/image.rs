//! The container image, run the way deploy/daemonset.yaml runs it.
//! `scripts/build-image.sh` builds it from Debian's packages and the
//! binaries under test (no registry is reachable); podman with runc loads
//! it in a Kubernetes lab of two nodes with a pod each, then:
//! - the init container's script, taken from the manifest, runs in it
//!   (privileged, as there): forwarding on, the CNI plugin installed;
//! - the router runs in it in place of node-1's, with the DaemonSet's
//!   security context (every capability dropped but NET_ADMIN, read-only
//!   root, no privilege escalation), environment (the ConfigMap, NODE_NAME)
//!   and mounts (the TUN device, state, CNI configuration, WireGuard
//!   sockets, the host's /proc/sys/net); the pods reach each other through
//!   it, `wg show` and `tunmesh-ctl status` work inside it, and the TUN's
//!   rp_filter is set through the mounted /proc/sys/net (and set back, with
//!   forwarding, after something on the host changes them);
//! - without that mount the router still runs, and its status names what it
//!   could not set and why.
//!
//! Root only; CI runs it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tunmesh_lab::checks::{self, ping};
use tunmesh_lab::lab::{find_binary, Lab};
use tunmesh_lab::netns::{self, exec_output};
use tunmesh_lab::podman::Podman;
use tunmesh_lab::require_root;
use tunmesh_router::status::{Status, STATUS_FILE};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The `prepare-host` init container's shell script, as the manifest has it.
fn init_script() -> String {
    let yaml = std::fs::read_to_string(repo().join("deploy/daemonset.yaml")).unwrap();
    let mut lines = yaml
        .lines()
        .skip_while(|l| !l.contains("name: prepare-host"));
    let start = lines
        .by_ref()
        .find(|l| l.trim() == "- |")
        .expect("the init container's `- |` script");
    let indent = start.len() - start.trim_start().len();
    lines
        .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

fn sysctl(ns: &str, key: &str) -> String {
    let out = exec_output(ns, "sysctl", &["-n", key]).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Waits for the router in container `name` to write a status that
/// satisfies `ready` (statuses are written every second), or fails with the
/// container's log.
fn wait_status(
    podman: &Podman,
    name: &str,
    state_dir: &Path,
    ready: impl Fn(&Status) -> bool,
) -> Status {
    let path = state_dir.join(STATUS_FILE);
    let got = netns::wait_for(Duration::from_secs(30), || {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Status>(&b).ok())
            .filter(|s| ready(s))
    });
    got.unwrap_or_else(|| {
        let logs = podman.run(&["logs", name]);
        panic!(
            "the router in container {name} wrote no status; its log:\n{}{}",
            String::from_utf8_lossy(&logs.stdout),
            String::from_utf8_lossy(&logs.stderr)
        )
    })
}

#[test]
fn the_image_runs_as_the_daemonset_runs_it() {
    if !require_root("the_image_runs_as_the_daemonset_runs_it") {
        return;
    }
    let mut lab = Lab::for_test(2, 1);
    let dir = lab.state.dir.clone();
    let dir_s = dir.display().to_string();
    let (n1, n2) = (lab.state.nodes[0].clone(), lab.state.nodes[1].clone());
    let (pod1, pod2) = (lab.state.pods[0].clone(), lab.state.pods[1].clone());
    assert_eq!((pod1.node, pod2.node), (0, 1), "one pod per node");

    // Build the image from the binaries under test, and load it.
    let bins = find_binary("tunmesh-router", "TUNMESH_ROUTER_BIN").unwrap();
    let bins = bins.parent().unwrap();
    let tag = format!("localhost/tunmesh:{}", lab.state.id);
    let archive = dir.join("image.tar");
    let out = Command::new(repo().join("scripts/build-image.sh"))
        .args(["--bin-dir", &bins.display().to_string(), "--tag", &tag])
        .args(["--output", &archive.display().to_string()])
        .output()
        .expect("running scripts/build-image.sh");
    assert!(
        out.status.success(),
        "scripts/build-image.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let podman = Podman::new(&lab, &n1);
    podman.ok(&["load", "--quiet", "--input", &archive.display().to_string()]);
    let version = podman.ok(&["run", "--rm", "--network", "none", &tag, "--version"]);
    assert!(version.starts_with("tunmesh-router "), "{version}");

    // The init container: privileged, the host's CNI bin directory mounted.
    exec_output(&n1.ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=0"]).unwrap();
    let cni_bin = dir.join("host-cni-bin");
    std::fs::create_dir_all(&cni_bin).unwrap();
    let mount = format!("{}:/host/opt/cni/bin", cni_bin.display());
    let script = init_script();
    podman.ok(&[
        "run",
        "--rm",
        "--network",
        "host",
        "--privileged",
        "--volume",
        &mount,
        "--entrypoint",
        "/bin/sh",
        &tag,
        "-c",
        &script,
    ]);
    assert_eq!(
        sysctl(&n1.ns, "net.ipv4.ip_forward"),
        "1",
        "set by:\n{script}"
    );
    let version = Command::new(cni_bin.join("tunmesh-cni"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("the installed tunmesh-cni runs");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(version.contains("supportedVersions"), "{version}");
    // The reference portmap plugin, chained for hostPort, under tunmesh's
    // name: it speaks every version the conflist offers.
    let portmap = Command::new(cni_bin.join("tunmesh-portmap"))
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("the installed tunmesh-portmap runs");
    let portmap = String::from_utf8_lossy(&portmap.stdout);
    for v in tunmesh_contract::nodestate::CONFLIST_VERSIONS {
        assert!(
            portmap.contains(&format!("\"{v}\"")),
            "{v} missing: {portmap}"
        );
    }

    // The router, in place of node-1's. New interfaces on node-1 start with
    // strict reverse-path filtering, so the loose setting on the TUN shows
    // that the router set it through the mount.
    lab.stop_router(0).unwrap();
    exec_output(
        &n1.ns,
        "sysctl",
        &["-q", "-w", "net.ipv4.conf.default.rp_filter=1"],
    )
    .unwrap();
    // A short resync, so the re-check of host settings below comes soon.
    let resync = ["--resync-seconds".to_string(), "3".to_string()];
    let (args, env) = lab.router_invocation(0, &resync).unwrap();
    let run = |name: &str, proc_sys: bool| {
        let _ = std::fs::remove_file(n1.state_dir.join(STATUS_FILE));
        let lab_mount = format!("{dir_s}:{dir_s}");
        let mut cmd: Vec<String> = [
            "run",
            "--detach",
            "--name",
            name,
            "--network",
            "host",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_ADMIN",
            "--read-only",
            "--security-opt",
            "no-new-privileges",
            "--device",
            "/dev/net/tun",
            "--volume",
            &lab_mount,
            "--volume",
            "/var/run/wireguard:/var/run/wireguard",
        ]
        .map(String::from)
        .to_vec();
        if proc_sys {
            cmd.extend(["--volume", "/proc/sys/net:/host/proc/sys/net"].map(String::from));
            cmd.extend(["--env", "TUNMESH_PROC_SYS=/host/proc/sys"].map(String::from));
        }
        for (k, v) in &env {
            cmd.extend(["--env".into(), format!("{k}={v}")]);
        }
        cmd.push(tag.clone());
        cmd.extend(args.iter().cloned());
        let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
        podman.ok(&cmd);
    };
    run("router", true);
    let status = wait_status(&podman, "router", &n1.state_dir, |s| {
        !s.pod_cidrs.is_empty() && s.peers.iter().any(|p| p.name == n2.name)
    });
    assert!(
        status.host_problems.is_empty(),
        "{:?}",
        status.host_problems
    );
    let rp = format!("net.ipv4.conf.{}.rp_filter", n1.interface);
    assert_eq!(sysctl(&n1.ns, &rp), "2", "{rp} on node-1");

    // Pods on the two nodes reach each other through it, both ways, over
    // both families, and a transfer arrives whole.
    for (from, to) in [(&pod1, &pod2), (&pod2, &pod1)] {
        for dst in [to.ipv4.into(), to.ipv6.into()] {
            assert!(
                ping(&from.ns, dst, 20),
                "{} -> {} ({dst})",
                from.name,
                to.name
            );
        }
    }
    let data = checks::pattern(4 << 20, 7);
    let want = checks::sha256(&data);
    let got = checks::tcp_transfer(
        &pod1.ns,
        &pod2.ns,
        pod2.ipv4.into(),
        data,
        Duration::from_secs(30),
    )
    .expect("4 MiB from node-1's pod to node-2's");
    assert_eq!(got, want, "the bytes that arrived");

    // Something on the host turns forwarding off and the TUN's reverse-path
    // filter strict: the router sets them back at its next resync.
    exec_output(&n1.ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=0"]).unwrap();
    exec_output(&n1.ns, "sysctl", &["-q", "-w", &format!("{rp}=1")]).unwrap();
    let restored = netns::wait_for(Duration::from_secs(15), || {
        (sysctl(&n1.ns, "net.ipv4.ip_forward") == "1" && sysctl(&n1.ns, &rp) == "2").then_some(())
    });
    assert!(
        restored.is_some(),
        "forwarding and {rp} set back within a resync or two"
    );

    // The operator's tools, inside the container, once the status shows the
    // handshake.
    wait_status(&podman, "router", &n1.state_dir, |s| {
        s.peers.iter().any(|p| p.latest_handshake_unix.is_some())
    });
    let wg = podman.ok(&["exec", "router", "wg", "show", &n1.interface]);
    assert!(wg.contains(&n2.public_key), "wg show:\n{wg}");
    assert!(wg.contains("latest handshake"), "wg show:\n{wg}");
    let state = n1.state_dir.display().to_string();
    let ctl = podman.ok(&[
        "exec",
        "router",
        "tunmesh-ctl",
        "--state-dir",
        &state,
        "status",
    ]);
    assert!(
        ctl.contains(&n2.name) && !ctl.contains("PROBLEM"),
        "tunmesh-ctl status:\n{ctl}"
    );
    podman.ok(&["rm", "--force", "--time", "10", "router"]);

    // Without the host's /proc/sys/net the router runs, and says what it
    // could not set and why.
    // Each of the four settings it needs is off beforehand (the new TUN
    // takes the default strict rp_filter and accept_local 0), so it must
    // name exactly these.
    for off in [
        "net.ipv4.ip_forward=0",
        "net.ipv6.conf.all.forwarding=0",
        "net.ipv4.conf.default.rp_filter=1",
        "net.ipv4.conf.default.accept_local=0",
    ] {
        exec_output(&n1.ns, "sysctl", &["-q", "-w", off]).unwrap();
    }
    let expected = [
        "net.ipv4.ip_forward".to_string(),
        "net.ipv6.conf.all.forwarding".to_string(),
        rp.clone(),
        rp.replace("rp_filter", "accept_local"),
    ];
    run("router-no-proc", false);
    let status = wait_status(&podman, "router-no-proc", &n1.state_dir, |s| {
        !s.pod_cidrs.is_empty()
    });
    let problems = status.host_problems.join("\n");
    assert_eq!(
        status.host_problems.len(),
        expected.len(),
        "one problem per setting it could not make:\n{problems}"
    );
    for (key, line) in expected.iter().zip(&status.host_problems) {
        assert!(
            line.contains(key.as_str()) && line.contains("read-only"),
            "{key} named, with the reason: {line}"
        );
    }
    let ctl = podman.ok(&[
        "exec",
        "router-no-proc",
        "tunmesh-ctl",
        "--state-dir",
        &state,
        "status",
    ]);
    assert!(
        ctl.contains("PROBLEM") && ctl.contains("TUNMESH_PROC_SYS"),
        "{ctl}"
    );
    let metrics = netns::wait_for(Duration::from_secs(10), || {
        checks::http_get(&n1.ns, "127.0.0.1:9475".parse().ok()?, "/metrics").ok()
    })
    .expect("the router's /metrics on port 9475 (the ConfigMap's address)");
    // The gauge says four: the settings that were off, not the length of
    // the list it is computed from.
    let gauge = format!("tunmesh_host_problems {}", expected.len());
    assert!(
        metrics.1.lines().any(|l| l == gauge),
        "{gauge}?\n{}",
        metrics.1
    );
    println!("what the router could not set without /proc/sys/net:\n{problems}");
    drop(podman);
    lab.down().unwrap();
}
