//! The `tunmesh-cni` binary run the way container runtimes run it, against
//! real namespaces and veths: a "node" namespace with a node.json such as
//! the router writes, pod namespaces, and the plugin executed inside the
//! node's namespace with the CNI environment and config on stdin. Then
//! upstream's `cnitool` (libcni) drives it. They need root; CI runs them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Output;

use serde_json::{json, Value};
use tunmesh_contract::nodestate::{
    write_conflist, Chain, NodeState, PluginSettings, CONFLIST_FILE, PORTMAP_TYPE,
};
use tunmesh_lab::lab::find_binary;
use tunmesh_lab::netns::{self, add_netns, exec, ip, run_cni, Cleanup};
use tunmesh_lab::require_root;

/// A node namespace with the router's state file, and pods to attach.
struct Node {
    ns: String,
    dir: PathBuf,
    plugin: PathBuf,
    version: String,
    _cleanup: Cleanup,
}

impl Node {
    fn new(tag: &str, cidrs: &[&str]) -> Node {
        let id = netns::run_id();
        let ns = format!("tc{id}-{tag}");
        let dir = std::env::temp_dir().join(format!("tunmesh-cni-{id}"));
        std::fs::create_dir_all(dir.join("state")).unwrap();
        let mut cleanup = Cleanup::default();
        cleanup.files.push(dir.clone());
        add_netns(&ns).unwrap();
        cleanup.netns.push(ns.clone());
        let node = Node {
            ns,
            dir,
            plugin: find_binary("tunmesh-cni", "TUNMESH_CNI_BIN").unwrap(),
            version: "1.1.0".into(),
            _cleanup: cleanup,
        };
        node.write_state(cidrs);
        node
    }

    fn write_state(&self, cidrs: &[&str]) {
        let pod_cidrs: Vec<ipnetwork::IpNetwork> =
            cidrs.iter().map(|c| c.parse().unwrap()).collect();
        NodeState {
            node_name: "n".into(),
            interface: "tunmesh0".into(),
            mtu: 1420,
            gateways: pod_cidrs
                .iter()
                .map(|c| tunmesh_contract::validate::first_host(*c))
                .collect(),
            pod_cidrs,
            cluster_cidrs: vec![],
        }
        .write(&self.dir.join("state"))
        .unwrap();
    }

    fn settings(&self) -> PluginSettings {
        PluginSettings {
            router_state_dir: self.dir.join("state"),
            data_dir: self.dir.join("data"),
            log_file: None,
        }
    }

    fn conf(&self) -> Value {
        json!({
            "cniVersion": self.version, "name": "tunmesh", "type": "tunmesh-cni",
            "routerStateDir": self.dir.join("state"), "dataDir": self.dir.join("data"),
            "runtimeConfig": {"portMappings": []}, "args": {"cni": {"labels": {"app": "x"}}},
        })
    }

    /// A pod namespace (removed with the node).
    fn pod(&mut self, n: usize) -> String {
        let ns = format!("{}-p{n}", self.ns);
        add_netns(&ns).unwrap();
        self._cleanup.netns.insert(0, ns.clone());
        ns
    }

    fn run_raw(&self, env: &[(&str, &str)], stdin: &str) -> Output {
        run_cni(&self.ns, &self.plugin, env, stdin).unwrap()
    }

    fn run(&self, cmd: &str, cid: &str, netns: &str, conf: &Value) -> Output {
        let netns_path = if netns.is_empty() || netns.starts_with('/') {
            netns.to_string()
        } else {
            format!("/var/run/netns/{netns}")
        };
        self.run_raw(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", cid),
                ("CNI_NETNS", &netns_path),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
                (
                    "CNI_ARGS",
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;SOMETHING_NEW=1",
                ),
            ],
            &conf.to_string(),
        )
    }

    fn ok(&self, cmd: &str, cid: &str, netns: &str, conf: &Value) -> Value {
        let out = self.run(cmd, cid, netns, conf);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{cmd} {cid} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{cmd}: stdout is not JSON ({e}): {stdout:?}"))
        }
    }

    /// The plugin's allocations, from its store on disk. A missing or
    /// unreadable store fails the test: "everything freed" must be read
    /// from a store that is there.
    fn allocations(&self) -> Value {
        let path = self.dir.join("data/tunmesh/allocations.json");
        let text = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("the allocation store {}: {e}", path.display()));
        let v: Value = serde_json::from_slice(&text).unwrap_or_else(|e| {
            panic!(
                "the allocation store {} is not JSON: {e}: {}",
                path.display(),
                String::from_utf8_lossy(&text)
            )
        });
        let a = &v["allocations"];
        assert!(
            a.is_object(),
            "the allocation store {} has no allocations object: {v}",
            path.display()
        );
        a.clone()
    }

    fn host_links(&self) -> Vec<String> {
        exec(&self.ns, "ip", &["-o", "link", "show"])
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            })
            .filter(|n| n.starts_with("tm") || n.starts_with("tp"))
            .collect()
    }
}

/// The spec's error object on stdout, non-zero exit; returns its code.
fn error_code(out: &Output) -> u64 {
    assert!(
        !out.status.success(),
        "expected a failure, got {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout must be only the error object ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert!(v["cniVersion"].is_string() && v["msg"].is_string(), "{v}");
    v["code"].as_u64().expect("code")
}

fn ip_of(result: &Value, v6: bool) -> String {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["address"].as_str().unwrap().to_string())
        .find(|a| a.contains(':') == v6)
        .unwrap()
}

#[test]
fn spec_edge_cases() {
    if !require_root("spec_edge_cases") {
        return;
    }
    let mut node = Node::new("spec", &["10.99.1.0/24", "fd00:99:1::/64"]);
    let pod = node.pod(1);
    let conf = node.conf();

    // Decoding failure, bad config, incompatible version, bad environment.
    assert_eq!(error_code(&node.run("ADD", "c1", &pod, &json!("{oops"))), 6);
    let out = node.run_raw(
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ],
        "{not json",
    );
    assert_eq!(error_code(&out), 6);
    let mut bad = conf.clone();
    bad["cniVersion"] = json!("0.2.0");
    assert_eq!(error_code(&node.run("ADD", "c1", &pod, &bad)), 1);
    bad = conf.clone();
    bad["dataDir"] = json!("relative/dir");
    assert_eq!(error_code(&node.run("ADD", "c1", &pod, &bad)), 7);
    for missing in tunmesh_cni::request::ADD_VARIABLES {
        let env: Vec<(&str, &str)> = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/x"),
        ]
        .into_iter()
        .filter(|(k, _)| *k != missing)
        .collect();
        let out = node.run_raw(&env, &conf.to_string());
        assert_eq!(error_code(&out), 4, "{missing}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(missing),
            "{missing} named"
        );
    }
    // A namespace that does not exist.
    assert_eq!(
        error_code(&node.run("ADD", "c1", "/var/run/netns/does-not-exist", &conf)),
        3
    );

    // VERSION, in every version asked.
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let out = node.run_raw(
            &[("CNI_COMMAND", "VERSION")],
            &json!({"cniVersion": v}).to_string(),
        );
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(r["cniVersion"], v);
        assert_eq!(r["supportedVersions"].as_array().unwrap().len(), 5);
    }

    // DEL without ADD, and twice; with and without a netns.
    assert_eq!(node.ok("DEL", "never-added", &pod, &conf), Value::Null);
    assert_eq!(node.ok("DEL", "never-added", "", &conf), Value::Null);

    // ADD, then ADD again for the same container: same addresses, one link.
    let first = node.ok("ADD", "c1", &pod, &conf);
    assert_eq!(ip_of(&first, false), "10.99.1.2/32");
    assert_eq!(ip_of(&first, true), "fd00:99:1::2/128");
    assert_eq!(
        first["interfaces"][1]["sandbox"],
        format!("/var/run/netns/{pod}")
    );
    assert_eq!(first["interfaces"][1]["mtu"], 1420);
    let again = node.ok("ADD", "c1", &pod, &conf);
    assert_eq!(ip_of(&again, false), ip_of(&first, false));
    assert_eq!(node.host_links().len(), 1, "{:?}", node.host_links());
    let addrs = exec(&pod, "ip", &["addr", "show", "eth0"]).unwrap();
    assert!(
        addrs.contains("10.99.1.2/32")
            && addrs.contains("fd00:99:1::2/128")
            && addrs.contains("mtu 1420"),
        "{addrs}"
    );
    let routes =
        exec(&pod, "ip", &["route"]).unwrap() + &exec(&pod, "ip", &["-6", "route"]).unwrap();
    assert!(
        routes.contains("default via 10.99.1.1 dev eth0")
            && routes.contains("default via fe80::1 dev eth0"),
        "{routes}"
    );
    let host_routes = exec(&node.ns, "ip", &["route"]).unwrap();
    assert!(host_routes.contains("10.99.1.2 dev tm"), "{host_routes}");

    // CHECK against prevResult: fine, then a mismatch once an address is gone.
    let mut check = conf.clone();
    check["prevResult"] = again.clone();
    assert_eq!(node.ok("CHECK", "c1", &pod, &check), Value::Null);
    ip(&["-n", &pod, "addr", "del", "10.99.1.2/32", "dev", "eth0"]).unwrap();
    let out = node.run("CHECK", "c1", &pod, &check);
    assert_eq!(error_code(&out), 101);
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.99.1.2"));
    let mut no_prev = conf.clone();
    no_prev["cniVersion"] = json!("1.0.0");
    assert_eq!(error_code(&node.run("CHECK", "c1", &pod, &no_prev)), 7);

    // DEL frees the address and the links; a second DEL is still fine.
    node.ok("DEL", "c1", &pod, &conf);
    node.ok("DEL", "c1", &pod, &conf);
    assert_eq!(node.allocations(), json!({}));
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());

    // Results shaped per version; /proc/PID/ns/net works as a netns path.
    let mut holder = std::process::Command::new("ip")
        .args(["netns", "exec", &pod, "sleep", "60"])
        .spawn()
        .unwrap();
    let proc_ns = format!("/proc/{}/ns/net", holder.id());
    for (n, v) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
        .iter()
        .enumerate()
    {
        let mut c = conf.clone();
        c["cniVersion"] = json!(v);
        let cid = format!("v{n}");
        let target = if n % 2 == 0 {
            proc_ns.clone()
        } else {
            pod.clone()
        };
        ip(&["-n", &pod, "link", "del", "eth0"]).ok();
        let r = node.ok("ADD", &cid, &target, &c);
        assert_eq!(r["cniVersion"], *v);
        assert_eq!(
            r["ips"][0].get("version").is_some(),
            v.starts_with("0."),
            "{v}: {r}"
        );
        assert_eq!(
            r["interfaces"][1].get("mtu").is_some(),
            *v == "1.1.0",
            "{v}: {r}"
        );
        node.ok("DEL", &cid, &target, &c);
    }
    let _ = holder.kill();
    let _ = holder.wait();

    // Rollback: an eth0 that is not ours in the pod makes ADD fail, and
    // nothing is left behind (no link, no allocation).
    ip(&[
        "-n", &pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0x",
    ])
    .unwrap();
    let out = node.run("ADD", "c2", &pod, &conf);
    assert_eq!(error_code(&out), 102);
    assert!(node.host_links().is_empty(), "{:?}", node.host_links());
    assert_eq!(node.allocations(), json!({}));
    ip(&["-n", &pod, "link", "del", "eth0"]).unwrap();

    // STATUS, and ADD while the router is not ready: try again later.
    assert_eq!(node.ok("STATUS", "", "", &conf), Value::Null);
    std::fs::remove_file(node.dir.join("state/node.json")).unwrap();
    assert_eq!(
        error_code(&node.run_raw(&[("CNI_COMMAND", "STATUS")], &conf.to_string())),
        50
    );
    assert_eq!(error_code(&node.run("ADD", "c3", &pod, &conf)), 11);
    node.write_state(&["10.99.1.0/24", "fd00:99:1::/64"]);

    // GC keeps what the runtime lists and frees the rest.
    let pod2 = node.pod(2);
    node.ok("ADD", "keep", &pod, &conf);
    node.ok("ADD", "stale", &pod2, &conf);
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    assert_eq!(node.ok("GC", "", "", &gc), Value::Null);
    let left: Vec<String> = node
        .allocations()
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(left, ["keep/eth0"]);
    assert_eq!(node.host_links().len(), 1);
    assert!(
        exec(&pod2, "ip", &["link", "show", "eth0"]).is_err(),
        "the stale pod's eth0 went with its pair"
    );
    node.ok("DEL", "keep", &pod, &conf);
}

#[test]
fn concurrent_adds_get_distinct_addresses_and_exhaustion_is_an_error() {
    if !require_root("concurrent_adds_get_distinct_addresses_and_exhaustion_is_an_error") {
        return;
    }
    let mut node = Node::new("conc", &["10.98.0.0/24", "fd00:98::/64"]);
    let conf = node.conf();
    let pods: Vec<String> = (0..64).map(|n| node.pod(n)).collect();
    let node = std::sync::Arc::new(node);
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(n, pod)| {
            let (node, pod, conf) = (std::sync::Arc::clone(&node), pod.clone(), conf.clone());
            std::thread::spawn(move || node.ok("ADD", &format!("c{n}"), &pod, &conf))
        })
        .collect();
    let results: Vec<Value> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let v4: BTreeSet<String> = results.iter().map(|r| ip_of(r, false)).collect();
    let v6: BTreeSet<String> = results.iter().map(|r| ip_of(r, true)).collect();
    assert_eq!((v4.len(), v6.len()), (64, 64), "addresses handed out twice");
    assert!(
        !v4.contains("10.98.0.0/32")
            && !v4.contains("10.98.0.1/32")
            && !v4.contains("10.98.0.255/32")
    );
    assert_eq!(node.allocations().as_object().unwrap().len(), 64);
    assert_eq!(node.host_links().len(), 64);
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(n, pod)| {
            let (node, pod, conf) = (std::sync::Arc::clone(&node), pod.clone(), conf.clone());
            std::thread::spawn(move || node.ok("DEL", &format!("c{n}"), &pod, &conf))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(node.allocations(), json!({}));
    assert!(node.host_links().is_empty());

    // A /28: 16 addresses minus network, gateway and broadcast.
    let mut small = Node::new("small", &["10.97.0.0/28"]);
    let conf = small.conf();
    for n in 0..13 {
        let pod = small.pod(n);
        small.ok("ADD", &format!("s{n}"), &pod, &conf);
    }
    let pod = small.pod(13);
    let out = small.run("ADD", "s13", &pod, &conf);
    assert_eq!(error_code(&out), 100);
    let msg = String::from_utf8_lossy(&out.stdout);
    assert!(
        msg.contains("no free address") && msg.contains("10.97.0.0/28"),
        "{msg}"
    );
    assert_eq!(small.allocations().as_object().unwrap().len(), 13);
}

/// Upstream's `cnitool` (libcni) runs the conflist the router writes: the
/// plugin, then the reference portmap plugin chained after it with the
/// pod's hostPorts as libcni passes a runtime's (`CAP_ARGS`); add, check,
/// delete, and the DNAT rules portmap made, there after ADD and gone
/// after DEL.
#[test]
fn cnitool_adds_checks_and_deletes() {
    if !require_root("cnitool_adds_checks_and_deletes") {
        return;
    }
    let bin = tunmesh_lab::controlplane::binaries().expect("cnitool (scripts/control-plane.sh)");
    let mut node = Node::new("tool", &["10.96.5.0/24", "fd00:96:5::/64"]);
    let pod = node.pod(1);
    let conf_dir = node.dir.join("net.d");
    write_conflist(&conf_dir, &node.settings(), Chain { portmap: true }).unwrap();
    assert!(conf_dir.join(CONFLIST_FILE).exists());
    // The plugin's directory, and one with portmap under tunmesh's name
    // for it, as the DaemonSet's init step installs it.
    let chained = node.dir.join("chained");
    std::fs::create_dir_all(&chained).unwrap();
    std::os::unix::fs::symlink(
        tunmesh_lab::portmap_bin().unwrap(),
        chained.join(PORTMAP_TYPE),
    )
    .unwrap();
    let cni_path = format!(
        "{}:{}",
        node.plugin.parent().unwrap().display(),
        chained.display()
    );
    let cap_args =
        r#"{"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}"#;
    let cnitool = |verb: &str| -> Output {
        std::process::Command::new("ip")
            .args(["netns", "exec", &node.ns])
            .arg(bin.join("cnitool"))
            .args([verb, "tunmesh", &format!("/var/run/netns/{pod}")])
            .env("NETCONFPATH", &conf_dir)
            .env("CNI_PATH", &cni_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=tool")
            .env("CAP_ARGS", cap_args)
            .output()
            .unwrap()
    };
    let dnat = |family: &str| -> String {
        let tool = if family == "6" {
            "ip6tables"
        } else {
            "iptables"
        };
        exec(&node.ns, tool, &["-t", "nat", "-S"]).unwrap_or_default()
    };
    let out = cnitool("add");
    assert!(
        out.status.success(),
        "cnitool add: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    // libcni negotiated the newest version every plugin of the chain knows.
    assert_eq!(result["cniVersion"], "1.1.0", "{result}");
    assert_eq!(ip_of(&result, false), "10.96.5.2/32");
    let addrs = exec(&pod, "ip", &["addr", "show", "eth0"]).unwrap();
    assert!(
        addrs.contains("10.96.5.2/32") && addrs.contains("fd00:96:5::2/128"),
        "{addrs}"
    );
    // portmap's DNAT from the host port to the pod, in both families.
    let (v4, v6) = (dnat("4"), dnat("6"));
    assert!(
        v4.contains("--dport 18080") && v4.contains("10.96.5.2:80"),
        "no IPv4 DNAT for the hostPort:\n{v4}"
    );
    assert!(
        v6.contains("--dport 18080") && v6.contains("[fd00:96:5::2]:80"),
        "no IPv6 DNAT for the hostPort:\n{v6}"
    );
    let out = cnitool("check");
    assert!(
        out.status.success(),
        "cnitool check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cnitool("del");
    assert!(
        out.status.success(),
        "cnitool del: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.allocations(), json!({}));
    assert!(exec(&pod, "ip", &["link", "show", "eth0"]).is_err());
    assert!(
        !dnat("4").contains("10.96.5.2:80") && !dnat("6").contains("fd00:96:5::2"),
        "portmap's rules outlived the pod"
    );
}
