//! One input, one verdict: every source of keys, endpoints and CIDRs (the
//! mesh file, Node objects, the WireGuard API, the CNI plugin's node.json)
//! is fed the same bad values from `tunmesh_contract::validate::cases` and
//! must refuse each with the same reason, naming where it was; the good
//! values must pass everywhere. No root needed.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use tunmesh_contract::validate::cases::{
    BAD_CIDRS, BAD_ENDPOINTS, BAD_KEYS, GOOD_CIDRS, GOOD_ENDPOINTS,
};
use tunmesh_contract::NodeState;
use tunmesh_router::dataplane::Dataplane;
use tunmesh_router::source::nodes::{translate, TranslateSettings, ANN_ENDPOINT, ANN_PUBLIC_KEY};
use tunmesh_router::{uapi, PrivateKey};

const KEY: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

/// The mesh file with one peer whose `field` is `value` (TOML text).
fn mesh_file(key: &str, endpoint: &str, allowed: &str) -> Result<(), String> {
    let text = format!(
        "[node]\nprivate_key_file = \"/k\"\nlisten_port = 51820\npod_cidrs = [\"10.244.1.0/24\"]\n\n\
         [[peer]]\nname = \"node-2\"\npublic_key = \"{key}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [\"{allowed}\"]\n"
    );
    tunmesh_router::source::file::parse(&text, Path::new("m.toml"))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// A Node with the given key, endpoint and podCIDR, translated: the
/// problem's field and message, or `Ok` if it became a peer.
fn node(key: &str, endpoint: &str, cidr: &str) -> Result<(), String> {
    let ann: BTreeMap<String, String> = [
        (ANN_PUBLIC_KEY.to_string(), key.to_string()),
        (ANN_ENDPOINT.to_string(), endpoint.to_string()),
    ]
    .into();
    let n = Node {
        metadata: ObjectMeta {
            name: Some("node-2".into()),
            annotations: Some(ann),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidrs: Some(vec![cidr.to_string()]),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "172.28.0.12".into(),
            }]),
            ..Default::default()
        }),
    };
    let own = PrivateKey::from_bytes([9; 32]).public_key();
    let t = translate(
        [&n],
        &TranslateSettings {
            own_name: "node-1",
            own_key: &own,
            own_next_key: None,
            cluster_cidrs: &[],
            persistent_keepalive: None,
        },
    );
    match (t.problems.first(), t.mesh.peers.len()) {
        (Some(p), _) => Err(format!("{}: {}", p.field, p.message)),
        (None, 1) => Ok(()),
        (None, _) => Err(format!("not a peer and no problem: {:?}", t.pending)),
    }
}

/// `wg set` for one peer.
fn uapi_set(key_hex: &str, endpoint: &str, allowed: &str) -> Result<(), String> {
    let dp = Dataplane::new(&PrivateKey::from_bytes([9; 32]), 1420);
    let lines: Vec<String> = [
        format!("public_key={key_hex}"),
        format!("endpoint={endpoint}"),
        format!("allowed_ip={allowed}"),
    ]
    .into();
    uapi::set(&dp, 51820, &lines)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// node.json with the given pod CIDR, as the CNI plugin reads it.
fn node_json(cidr: &str) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!(
        "tunmesh-validators-{}-{}",
        std::process::id(),
        cidr.replace(['/', ':', '.'], "_")
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = serde_json::json!({
        "node_name": "node-1", "interface": "tunmesh0", "mtu": 1420,
        "pod_cidrs": [cidr], "gateways": ["10.244.2.1"], "cluster_cidrs": [],
    });
    std::fs::write(dir.join("node.json"), json.to_string()).unwrap();
    let r = NodeState::read(&dir).map(|_| ()).map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn hex(key: &str) -> String {
    tunmesh_router::PublicKey::from_base64(key)
        .map(|k| k.as_bytes().iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_else(|_| key.to_string())
}

/// Asserts a refusal with `why`, naming `where_` (each source its own way).
fn refused(source: &str, r: Result<(), String>, value: &str, why: &str, where_: &str) {
    match r {
        Ok(()) => panic!("{source} accepted {value:?}, which must be refused: {why}"),
        Err(e) => assert!(
            e.contains(why) && e.contains(where_),
            "{source} refused {value:?} with {e:?}; expected {why:?} at {where_:?}"
        ),
    }
}

#[test]
fn every_source_refuses_the_same_endpoints_for_the_same_reason() {
    for (bad, why) in BAD_ENDPOINTS {
        refused(
            "mesh file",
            mesh_file(KEY, bad, "10.244.2.0/24"),
            bad,
            why,
            "peer[0] (\"node-2\").endpoint",
        );
        refused(
            "Node",
            node(KEY, bad, "10.244.2.0/24"),
            bad,
            why,
            "metadata.annotations[tunmesh.io/endpoint]",
        );
        refused(
            "wg set",
            uapi_set(&hex(KEY), bad, "10.244.2.0/24"),
            bad,
            why,
            "endpoint:",
        );
    }
    for good in GOOD_ENDPOINTS {
        mesh_file(KEY, good, "10.244.2.0/24").unwrap();
        node(KEY, good, "10.244.2.0/24").unwrap();
        uapi_set(&hex(KEY), good, "10.244.2.0/24").unwrap();
    }
}

#[test]
fn every_source_refuses_the_same_cidrs_for_the_same_reason() {
    for (bad, why) in BAD_CIDRS {
        refused(
            "mesh file",
            mesh_file(KEY, "172.28.0.12:51820", bad),
            bad,
            why,
            "peer[0] (\"node-2\").allowed_ips[0]",
        );
        refused(
            "Node",
            node(KEY, "172.28.0.12:51820", bad),
            bad,
            why,
            "spec.podCIDRs[0]",
        );
        refused(
            "wg set",
            uapi_set(&hex(KEY), "172.28.0.12:51820", bad),
            bad,
            why,
            "allowed_ip:",
        );
        refused("CNI node.json", node_json(bad), bad, why, "node.json");
    }
    for good in GOOD_CIDRS {
        mesh_file(KEY, "172.28.0.12:51820", good).unwrap();
        node(KEY, "172.28.0.12:51820", good).unwrap();
        uapi_set(&hex(KEY), "172.28.0.12:51820", good).unwrap();
    }
    node_json("10.244.2.0/24").unwrap();
}

#[test]
fn every_source_refuses_the_same_keys_for_the_same_reason() {
    for (bad, why) in BAD_KEYS {
        refused(
            "mesh file",
            mesh_file(bad, "172.28.0.12:51820", "10.244.2.0/24"),
            bad,
            why,
            "peer[0] (\"node-2\").public_key",
        );
        refused(
            "Node",
            node(bad, "172.28.0.12:51820", "10.244.2.0/24"),
            bad,
            why,
            "metadata.annotations[tunmesh.io/public-key]",
        );
    }
    // The WireGuard API speaks hex: the same keys, as `wg` would send them.
    refused(
        "wg set",
        uapi_set("not-a-key", "172.28.0.12:51820", "10.244.2.0/24"),
        "not-a-key",
        "is not a key",
        "public_key:",
    );
    refused(
        "wg set",
        uapi_set(&"0".repeat(64), "172.28.0.12:51820", "10.244.2.0/24"),
        "zero",
        "is the all-zero key",
        "public_key:",
    );
}
