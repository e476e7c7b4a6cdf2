//! Node objects to the desired mesh: a pure function from the Nodes the
//! reflector holds to the peers this router wants, its own pod CIDRs, and
//! every problem found on the way. No client, no I/O: the Kubernetes source
//! calls it on every change and on resync, and the unit tests call it with
//! hand-built Nodes.
//!
//! Rules (DESIGN.md, "Control plane"):
//! - one peer per other Node with a valid `tunmesh.io/public-key` and an
//!   endpoint (`tunmesh.io/force-endpoint` if set and valid, else
//!   `tunmesh.io/endpoint`);
//! - allowed IPs = the Node's `spec.podCIDRs` (all families; `spec.podCIDR`
//!   or the `tunmesh.io/pod-cidr` annotation when the list is empty). Each
//!   Node's gateway addresses are the first host of each pod CIDR, so they
//!   are inside these prefixes already;
//! - Nodes are taken oldest first (creation time, then name): a pod CIDR
//!   overlapping one already taken, or a public key already taken, is
//!   refused for the later Node;
//! - a Node that has not published a key or endpoint yet, or has no pod CIDR
//!   yet, is simply not a peer yet (it is joining); anything malformed is a
//!   `Problem` naming the Node and the field.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;

use tunmesh_contract::validate::{self, overlaps};

use crate::model::{DesiredMesh, PeerSpec};
use crate::PublicKey;

pub const ANN_PUBLIC_KEY: &str = "tunmesh.io/public-key";
/// The key a Node is rotating to. While it is there the Node answers
/// handshakes addressed to either key; peers use this one.
pub const ANN_NEXT_PUBLIC_KEY: &str = "tunmesh.io/next-public-key";
pub const ANN_ENDPOINT: &str = "tunmesh.io/endpoint";
/// The MTU of the Node's underlay link (its router measures it).
pub const ANN_UNDERLAY_MTU: &str = "tunmesh.io/underlay-mtu";
/// When the Node's current key was made (RFC 3339), for key-age reporting.
pub const ANN_KEY_CREATED: &str = "tunmesh.io/public-key-created";
pub const ANN_FORCE_ENDPOINT: &str = "tunmesh.io/force-endpoint";
pub const ANN_POD_CIDR: &str = "tunmesh.io/pod-cidr";

/// Something wrong with one field of one Node. Reported as a log warning
/// and as a Kubernetes Event on that Node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Problem {
    pub node: String,
    /// Where: `metadata.annotations[tunmesh.io/endpoint]`, `spec.podCIDRs[1]`...
    pub field: String,
    /// Event reason, CamelCase as Kubernetes reasons are.
    pub reason: &'static str,
    pub message: String,
}

/// What this router's own Node says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNode {
    /// Pod CIDRs accepted for this node (empty: none assigned yet).
    pub pod_cidrs: Vec<IpNetwork>,
    /// The first InternalIP in `status.addresses`.
    pub internal_ip: Option<IpAddr>,
    /// The annotations as they are now, to decide whether to patch.
    pub public_key: Option<String>,
    pub next_public_key: Option<String>,
    pub key_created: Option<String>,
    pub underlay_mtu: Option<String>,
    pub endpoint: Option<String>,
    /// A valid `tunmesh.io/force-endpoint` set by the operator.
    pub force_endpoint: Option<SocketAddr>,
}

/// The result of one translation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    pub mesh: DesiredMesh,
    /// `None` while this router's Node does not exist.
    pub own: Option<OwnNode>,
    pub problems: Vec<Problem>,
    /// Nodes that are not peers yet for an ordinary reason (joining), with why.
    pub pending: Vec<(String, &'static str)>,
}

/// Settings the translation needs from the router.
#[derive(Debug, Clone)]
pub struct TranslateSettings<'a> {
    pub own_name: &'a str,
    pub own_key: &'a PublicKey,
    /// The key this router is rotating to, if it is.
    pub own_next_key: Option<&'a PublicKey>,
    /// Routed into the TUN even without a peer (blackholed and counted).
    pub cluster_cidrs: &'a [IpNetwork],
    pub persistent_keepalive: Option<u16>,
}

fn annotation<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(|v| v.trim())
}

fn ann_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

/// The pod CIDRs a Node declares, with the field each came from.
fn declared_cidrs(node: &Node) -> Vec<(String, String)> {
    let spec = node.spec.as_ref();
    if let Some(list) = spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .filter(|l| !l.is_empty())
    {
        return list
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.clone()))
            .collect();
    }
    if let Some(c) = spec
        .and_then(|s| s.pod_cidr.as_ref())
        .filter(|c| !c.is_empty())
    {
        return vec![("spec.podCIDR".into(), c.clone())];
    }
    match annotation(node, ANN_POD_CIDR) {
        Some(v) if !v.is_empty() => v
            .split(',')
            .map(|c| (ann_field(ANN_POD_CIDR), c.trim().to_string()))
            .collect(),
        _ => Vec::new(),
    }
}

/// Every InternalIP in `status.addresses` (dual-stack Nodes have two).
fn internal_ips(node: &Node) -> Vec<IpAddr> {
    node.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

fn internal_ip(node: &Node) -> Option<IpAddr> {
    internal_ips(node).into_iter().next()
}

/// Translates the Nodes into the desired mesh. Deterministic: the same
/// Nodes in any order give the same result.
pub fn translate<'n>(
    nodes: impl IntoIterator<Item = &'n Node>,
    s: &TranslateSettings<'_>,
) -> Translation {
    let mut nodes: Vec<&Node> = nodes
        .into_iter()
        .filter(|n| n.metadata.name.is_some())
        .collect();
    nodes.sort_by(|a, b| {
        let key = |n: &Node| {
            (
                n.metadata.creation_timestamp.as_ref().map(|t| t.0),
                n.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });

    let mut out = Translation {
        mesh: DesiredMesh {
            peers: Vec::new(),
            blackhole_cidrs: s.cluster_cidrs.to_vec(),
        },
        ..Default::default()
    };
    // Pod CIDRs and keys taken so far, by the Node that took them.
    let mut taken_cidrs: Vec<(IpNetwork, String)> = Vec::new();
    let mut taken_keys: HashMap<[u8; 32], String> = HashMap::new();
    taken_keys.insert(*s.own_key.as_bytes(), s.own_name.to_string());
    if let Some(k) = s.own_next_key {
        taken_keys.insert(*k.as_bytes(), s.own_name.to_string());
    }

    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        let own = name == s.own_name;
        let mut problem = |field: String, reason: &'static str, message: String| {
            out.problems.push(Problem {
                node: name.clone(),
                field,
                reason,
                message,
            });
        };

        let mut cidrs = Vec::new();
        for (field, text) in declared_cidrs(node) {
            match validate::cidr(&text) {
                Err(m) => problem(field, "InvalidPodCIDR", m.to_string()),
                Ok(c) => match taken_cidrs.iter().find(|(t, _)| overlaps(t, &c)) {
                    Some((t, other)) => problem(
                        field,
                        "PodCIDROverlap",
                        format!("{c} overlaps {t} of Node {other}, which was there first; refused"),
                    ),
                    None => {
                        taken_cidrs.push((c, name.clone()));
                        cidrs.push(c);
                    }
                },
            }
        }

        let force = match annotation(node, ANN_FORCE_ENDPOINT) {
            None | Some("") => None,
            Some(v) => match validate::endpoint(v) {
                Ok(a) => Some(a),
                Err(m) => {
                    problem(
                        ann_field(ANN_FORCE_ENDPOINT),
                        "InvalidEndpoint",
                        format!("{m}; using {ANN_ENDPOINT} instead"),
                    );
                    None
                }
            },
        };

        if own {
            out.own = Some(OwnNode {
                pod_cidrs: cidrs,
                internal_ip: internal_ip(node),
                public_key: annotation(node, ANN_PUBLIC_KEY).map(str::to_string),
                key_created: annotation(node, ANN_KEY_CREATED).map(str::to_string),
                underlay_mtu: annotation(node, ANN_UNDERLAY_MTU).map(str::to_string),
                next_public_key: annotation(node, ANN_NEXT_PUBLIC_KEY)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string),
                endpoint: annotation(node, ANN_ENDPOINT).map(str::to_string),
                force_endpoint: force,
            });
            continue;
        }

        let key = match annotation(node, ANN_PUBLIC_KEY) {
            None | Some("") => {
                out.pending.push((name, "no tunmesh.io/public-key yet"));
                continue;
            }
            Some(v) => match validate::public_key(v) {
                Ok(k) => k,
                Err(e) => {
                    problem(ann_field(ANN_PUBLIC_KEY), "InvalidPublicKey", e.to_string());
                    continue;
                }
            },
        };
        if let Some(other) = taken_keys.get(key.as_bytes()) {
            let whose = if other == s.own_name {
                "this router's own key".to_string()
            } else {
                format!("already the key of Node {other}")
            };
            problem(
                ann_field(ANN_PUBLIC_KEY),
                "DuplicatePublicKey",
                format!("{} is {whose}; refused", key.to_base64()),
            );
            continue;
        }
        let endpoint = match force {
            Some(a) => a,
            None => match annotation(node, ANN_ENDPOINT) {
                None | Some("") => {
                    out.pending.push((name, "no tunmesh.io/endpoint yet"));
                    continue;
                }
                Some(v) => match validate::endpoint(v) {
                    Ok(a) => a,
                    Err(m) => {
                        problem(ann_field(ANN_ENDPOINT), "InvalidEndpoint", m.to_string());
                        continue;
                    }
                },
            },
        };
        if cidrs.is_empty() {
            if declared_cidrs(node).is_empty() {
                out.pending.push((name, "no podCIDR yet"));
            }
            continue;
        }
        // A key rotation under way: the next key is the one to use (the
        // Node answers both). A bad one is reported and the current key
        // used, so the peer stays reachable.
        let next = match annotation(node, ANN_NEXT_PUBLIC_KEY) {
            None | Some("") => None,
            Some(v) => match validate::public_key(v) {
                Err(e) => {
                    problem(
                        ann_field(ANN_NEXT_PUBLIC_KEY),
                        "InvalidPublicKey",
                        format!("{e}; using {ANN_PUBLIC_KEY}"),
                    );
                    None
                }
                Ok(k) if k == key => None,
                Ok(k) => match taken_keys.get(k.as_bytes()) {
                    Some(other) => {
                        problem(
                            ann_field(ANN_NEXT_PUBLIC_KEY),
                            "DuplicatePublicKey",
                            format!(
                                "{} is already the key of Node {other}; using {ANN_PUBLIC_KEY}",
                                k.to_base64()
                            ),
                        );
                        None
                    }
                    None => Some(k),
                },
            },
        };
        // The key's age is reporting only: a bad timestamp is named and
        // otherwise ignored.
        let created = match annotation(node, ANN_KEY_CREATED) {
            None | Some("") => None,
            Some(v) => match v.parse::<k8s_openapi::jiff::Timestamp>() {
                Ok(t) => u64::try_from(t.as_second()).ok(),
                Err(e) => {
                    problem(
                        ann_field(ANN_KEY_CREATED),
                        "InvalidTimestamp",
                        format!("{v:?} is not an RFC 3339 time: {e}"),
                    );
                    None
                }
            },
        };
        // A bad MTU is named and ignored (the route's MTU still applies).
        let underlay_mtu = match annotation(node, ANN_UNDERLAY_MTU) {
            None | Some("") => None,
            Some(v) => match v.parse::<u16>() {
                Ok(m) if m >= 576 => Some(m),
                _ => {
                    problem(
                        ann_field(ANN_UNDERLAY_MTU),
                        "InvalidMTU",
                        format!("{v:?} is not an MTU (576-65535); ignored"),
                    );
                    None
                }
            },
        };
        taken_keys.insert(*key.as_bytes(), name.clone());
        if let Some(k) = next {
            taken_keys.insert(*k.as_bytes(), name.clone());
        }
        out.mesh.peers.push(PeerSpec {
            name,
            public_key: next.unwrap_or(key),
            endpoint: Some(endpoint),
            allowed_ips: cidrs,
            node_addresses: internal_ips(node),
            persistent_keepalive: s.persistent_keepalive,
            rotated_from: next.map(|_| key),
            // The next key is being made now.
            key_created_unix: if next.is_some() { None } else { created },
            underlay_mtu,
        });
    }
    out.mesh.peers.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The endpoint this router publishes: the `--endpoint` flag, else its
/// Node's InternalIP and listen port. (`tunmesh.io/force-endpoint`, set by
/// the operator, is read by the peers themselves and wins over this.)
pub fn own_endpoint(
    flag: Option<SocketAddr>,
    own: &OwnNode,
    listen_port: u16,
) -> Option<SocketAddr> {
    flag.or_else(|| own.internal_ip.map(|ip| SocketAddr::new(ip, listen_port)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use std::collections::BTreeMap;

    use crate::PrivateKey;

    struct N<'a> {
        name: &'a str,
        age: i64,
        cidrs: &'a [&'a str],
        ann: &'a [(&'a str, &'a str)],
        ip: Option<&'a str>,
    }

    fn node(n: &N) -> Node {
        let ann: BTreeMap<String, String> = n
            .ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Node {
            metadata: ObjectMeta {
                name: Some(n.name.into()),
                annotations: Some(ann),
                creation_timestamp: Some(Time(
                    k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + n.age).unwrap(),
                )),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidrs: Some(n.cidrs.iter().map(|c| c.to_string()).collect()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: n.ip.map(|ip| {
                    vec![NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.into(),
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn leak(v: &[(&'static str, &'static str)]) -> &'static [(&'static str, &'static str)] {
        Box::leak(v.to_vec().into_boxed_slice())
    }

    fn key(seed: u8) -> PublicKey {
        PrivateKey::from_bytes([seed; 32]).public_key()
    }

    fn run(nodes: &[Node]) -> Translation {
        let own = key(1);
        let cluster = ["10.244.0.0/16".parse().unwrap()];
        translate(
            nodes,
            &TranslateSettings {
                own_name: "a",
                own_key: &own,
                own_next_key: None,
                cluster_cidrs: &cluster,
                persistent_keepalive: None,
            },
        )
    }

    #[test]
    fn table() {
        let k2 = key(2).to_base64();
        let k3 = key(3).to_base64();
        let own = key(1).to_base64();
        let good = |name: &'static str, age, cidr: &'static str, k: &'static str| N {
            name,
            age,
            cidrs: Box::leak(Box::new([cidr])),
            ann: Box::leak(Box::new([
                (ANN_PUBLIC_KEY, k),
                (ANN_ENDPOINT, "172.28.0.12:51820"),
            ])),
            ip: Some("172.28.0.12"),
        };
        let k2: &'static str = Box::leak(k2.into_boxed_str());
        let k3: &'static str = Box::leak(k3.into_boxed_str());
        let own: &'static str = Box::leak(own.into_boxed_str());

        struct Case {
            what: &'static str,
            nodes: Vec<N<'static>>,
            peers: Vec<(&'static str, &'static str, Vec<&'static str>)>,
            problems: Vec<(&'static str, &'static str, &'static str)>,
            pending: Vec<&'static str>,
        }
        let cases = vec![
            Case {
                what: "one good peer, own node skipped",
                nodes: vec![
                    good("a", 0, "10.244.1.0/24", own),
                    good("b", 1, "10.244.2.0/24", k2),
                ],
                peers: vec![("b", "172.28.0.12:51820", vec!["10.244.2.0/24"])],
                problems: vec![],
                pending: vec![],
            },
            Case {
                what: "dual-stack podCIDRs all become allowed IPs",
                nodes: vec![N {
                    cidrs: &["10.244.2.0/24", "fd00:10:244:2::/64"],
                    ..good("b", 1, "", k2)
                }],
                peers: vec![(
                    "b",
                    "172.28.0.12:51820",
                    vec!["10.244.2.0/24", "fd00:10:244:2::/64"],
                )],
                problems: vec![],
                pending: vec![],
            },
            Case {
                what: "no key yet: pending, no problem",
                nodes: vec![N {
                    ann: leak(&[]),
                    ..good("b", 1, "10.244.2.0/24", k2)
                }],
                peers: vec![],
                problems: vec![],
                pending: vec!["b"],
            },
            Case {
                what: "no podCIDR yet: pending",
                nodes: vec![N {
                    cidrs: &[],
                    ..good("b", 1, "", k2)
                }],
                peers: vec![],
                problems: vec![],
                pending: vec!["b"],
            },
            Case {
                what: "malformed key",
                nodes: vec![
                    N {
                        ann: leak(&[(ANN_PUBLIC_KEY, "not-base64!"), (ANN_ENDPOINT, "1.2.3.4:5")]),
                        ..good("b", 1, "10.244.2.0/24", k2)
                    },
                    good("c", 2, "10.244.3.0/24", k3),
                ],
                peers: vec![("c", "172.28.0.12:51820", vec!["10.244.3.0/24"])],
                problems: vec![(
                    "b",
                    "metadata.annotations[tunmesh.io/public-key]",
                    "InvalidPublicKey",
                )],
                pending: vec![],
            },
            Case {
                what: "malformed endpoint",
                nodes: vec![N {
                    ann: leak(&[(ANN_PUBLIC_KEY, k2), (ANN_ENDPOINT, "nowhere")]),
                    ..good("b", 1, "10.244.2.0/24", k2)
                }],
                peers: vec![],
                problems: vec![(
                    "b",
                    "metadata.annotations[tunmesh.io/endpoint]",
                    "InvalidEndpoint",
                )],
                pending: vec![],
            },
            Case {
                what: "port 0 is malformed",
                nodes: vec![N {
                    ann: leak(&[(ANN_PUBLIC_KEY, k2), (ANN_ENDPOINT, "172.28.0.12:0")]),
                    ..good("b", 1, "10.244.2.0/24", k2)
                }],
                peers: vec![],
                problems: vec![(
                    "b",
                    "metadata.annotations[tunmesh.io/endpoint]",
                    "InvalidEndpoint",
                )],
                pending: vec![],
            },
            Case {
                what: "force-endpoint wins",
                nodes: vec![N {
                    ann: leak(&[
                        (ANN_PUBLIC_KEY, k2),
                        (ANN_ENDPOINT, "172.28.0.12:51820"),
                        (ANN_FORCE_ENDPOINT, "[fd00::12]:4000"),
                    ]),
                    ..good("b", 1, "10.244.2.0/24", k2)
                }],
                peers: vec![("b", "[fd00::12]:4000", vec!["10.244.2.0/24"])],
                problems: vec![],
                pending: vec![],
            },
            Case {
                what: "malformed force-endpoint falls back to endpoint, with a problem",
                nodes: vec![N {
                    ann: leak(&[
                        (ANN_PUBLIC_KEY, k2),
                        (ANN_ENDPOINT, "172.28.0.12:51820"),
                        (ANN_FORCE_ENDPOINT, "999.1.1.1:1"),
                    ]),
                    ..good("b", 1, "10.244.2.0/24", k2)
                }],
                peers: vec![("b", "172.28.0.12:51820", vec!["10.244.2.0/24"])],
                problems: vec![(
                    "b",
                    "metadata.annotations[tunmesh.io/force-endpoint]",
                    "InvalidEndpoint",
                )],
                pending: vec![],
            },
            Case {
                what: "malformed CIDR skipped, the other family kept",
                nodes: vec![N {
                    cidrs: &["10.244.2.0/33", "fd00:10:244:2::/64"],
                    ..good("b", 1, "", k2)
                }],
                peers: vec![("b", "172.28.0.12:51820", vec!["fd00:10:244:2::/64"])],
                problems: vec![("b", "spec.podCIDRs[0]", "InvalidPodCIDR")],
                pending: vec![],
            },
            Case {
                what: "host bits set is malformed",
                nodes: vec![good("b", 1, "10.244.2.7/24", k2)],
                peers: vec![],
                problems: vec![("b", "spec.podCIDRs[0]", "InvalidPodCIDR")],
                pending: vec![],
            },
            Case {
                what: "overlap: the later Node is refused, whatever the order given",
                nodes: vec![
                    good("c", 2, "10.244.2.0/23", k3),
                    good("b", 1, "10.244.2.0/24", k2),
                ],
                peers: vec![("b", "172.28.0.12:51820", vec!["10.244.2.0/24"])],
                problems: vec![("c", "spec.podCIDRs[0]", "PodCIDROverlap")],
                pending: vec![],
            },
            Case {
                what: "overlap with this node's own podCIDR",
                nodes: vec![
                    good("a", 0, "10.244.1.0/24", own),
                    good("b", 1, "10.244.1.0/25", k2),
                ],
                peers: vec![],
                problems: vec![("b", "spec.podCIDRs[0]", "PodCIDROverlap")],
                pending: vec![],
            },
            Case {
                what: "duplicate key: the later Node is refused",
                nodes: vec![
                    good("b", 1, "10.244.2.0/24", k2),
                    good("c", 2, "10.244.3.0/24", k2),
                ],
                peers: vec![("b", "172.28.0.12:51820", vec!["10.244.2.0/24"])],
                problems: vec![(
                    "c",
                    "metadata.annotations[tunmesh.io/public-key]",
                    "DuplicatePublicKey",
                )],
                pending: vec![],
            },
            Case {
                what: "a peer claiming this router's key is refused",
                nodes: vec![good("b", 1, "10.244.2.0/24", own)],
                peers: vec![],
                problems: vec![(
                    "b",
                    "metadata.annotations[tunmesh.io/public-key]",
                    "DuplicatePublicKey",
                )],
                pending: vec![],
            },
            Case {
                what: "pod-cidr annotation when spec has none",
                nodes: vec![N {
                    cidrs: &[],
                    ann: leak(&[
                        (ANN_PUBLIC_KEY, k2),
                        (ANN_ENDPOINT, "172.28.0.12:51820"),
                        (ANN_POD_CIDR, "10.244.9.0/24, fd00:9::/64"),
                    ]),
                    ..good("b", 1, "", k2)
                }],
                peers: vec![(
                    "b",
                    "172.28.0.12:51820",
                    vec!["10.244.9.0/24", "fd00:9::/64"],
                )],
                problems: vec![],
                pending: vec![],
            },
        ];
        for c in cases {
            let nodes: Vec<Node> = c.nodes.iter().map(node).collect();
            let t = run(&nodes);
            let peers: Vec<(String, String, Vec<String>)> = t
                .mesh
                .peers
                .iter()
                .map(|p| {
                    (
                        p.name.clone(),
                        p.endpoint.map(|e| e.to_string()).unwrap_or_default(),
                        p.allowed_ips.iter().map(|n| n.to_string()).collect(),
                    )
                })
                .collect();
            let want: Vec<(String, String, Vec<String>)> = c
                .peers
                .iter()
                .map(|(n, e, a)| {
                    (
                        n.to_string(),
                        e.to_string(),
                        a.iter().map(|s| s.to_string()).collect(),
                    )
                })
                .collect();
            assert_eq!(peers, want, "{}: peers", c.what);
            let problems: Vec<(&str, &str, &str)> = t
                .problems
                .iter()
                .map(|p| (p.node.as_str(), p.field.as_str(), p.reason))
                .collect();
            assert_eq!(
                problems, c.problems,
                "{}: problems {:?}",
                c.what, t.problems
            );
            let pending: Vec<&str> = t.pending.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(pending, c.pending, "{}: pending", c.what);
            assert_eq!(
                t.mesh.blackhole_cidrs,
                vec!["10.244.0.0/16".parse::<IpNetwork>().unwrap()]
            );
        }
    }

    #[test]
    fn a_next_key_is_used_as_a_rotation_from_the_current_one() {
        let (cur, next) = (key(2), key(3));
        let b = |next_ann: &'static str| {
            node(&N {
                name: "b",
                age: 1,
                cidrs: &["10.244.2.0/24"],
                ann: leak(&[
                    (ANN_PUBLIC_KEY, Box::leak(cur.to_base64().into_boxed_str())),
                    (ANN_NEXT_PUBLIC_KEY, next_ann),
                    (ANN_ENDPOINT, "172.28.0.12:51820"),
                ]),
                ip: None,
            })
        };
        let t = run(&[b(Box::leak(next.to_base64().into_boxed_str()))]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.mesh.peers[0].public_key, next);
        assert_eq!(t.mesh.peers[0].rotated_from, Some(cur));
        // A bad next key: named, and the current key still used.
        let t = run(&[b("not-a-key")]);
        assert_eq!(t.problems.len(), 1);
        assert_eq!(t.problems[0].field, ann_field(ANN_NEXT_PUBLIC_KEY));
        assert!(t.problems[0]
            .message
            .contains("using tunmesh.io/public-key"));
        assert_eq!(t.mesh.peers[0].public_key, cur);
        assert_eq!(t.mesh.peers[0].rotated_from, None);
        // This router's own key as another Node's next key: refused.
        let t = run(&[b(Box::leak(key(1).to_base64().into_boxed_str()))]);
        assert_eq!(t.problems[0].reason, "DuplicatePublicKey");
        assert_eq!(t.mesh.peers[0].public_key, cur);
        // Empty: no rotation.
        let t = run(&[b("")]);
        assert!(t.problems.is_empty());
        assert_eq!(t.mesh.peers[0].rotated_from, None);
    }

    #[test]
    fn key_age_and_underlay_mtu_annotations_are_read_and_bad_ones_named() {
        let k = Box::leak(key(2).to_base64().into_boxed_str());
        let b = |created: &'static str, mtu: &'static str| {
            node(&N {
                name: "b",
                age: 1,
                cidrs: &["10.244.2.0/24"],
                ann: leak(&[
                    (ANN_PUBLIC_KEY, k),
                    (ANN_ENDPOINT, "172.28.0.12:51820"),
                    (ANN_KEY_CREATED, created),
                    (ANN_UNDERLAY_MTU, mtu),
                ]),
                ip: None,
            })
        };
        let t = run(&[b("2026-12-01T00:00:00Z", "1380")]);
        assert!(t.problems.is_empty(), "{:?}", t.problems);
        assert_eq!(t.mesh.peers[0].key_created_unix, Some(1_796_083_200));
        assert_eq!(t.mesh.peers[0].underlay_mtu, Some(1380));
        // Bad values: each named with its field, ignored, the peer kept.
        let t = run(&[b("yesterday", "9")]);
        let fields: Vec<&str> = t.problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [ann_field(ANN_KEY_CREATED), ann_field(ANN_UNDERLAY_MTU)],
            "{:?}",
            t.problems
        );
        assert_eq!(t.problems[1].reason, "InvalidMTU");
        assert_eq!(t.mesh.peers.len(), 1);
        assert_eq!(t.mesh.peers[0].key_created_unix, None);
        assert_eq!(t.mesh.peers[0].underlay_mtu, None);
    }

    #[test]
    fn own_node_and_endpoint() {
        let own = key(1).to_base64();
        let nodes = vec![node(&N {
            name: "a",
            age: 0,
            cidrs: &["10.244.1.0/24", "fd00:10:244:1::/64"],
            ann: &[(ANN_PUBLIC_KEY, &own), (ANN_FORCE_ENDPOINT, "10.0.0.1:999")],
            ip: Some("172.28.0.11"),
        })];
        let t = run(&nodes);
        let me = t.own.expect("own node found");
        assert_eq!(me.pod_cidrs.len(), 2);
        assert_eq!(me.public_key.as_deref(), Some(own.as_str()));
        assert_eq!(me.endpoint, None);
        assert_eq!(me.force_endpoint, Some("10.0.0.1:999".parse().unwrap()));
        assert_eq!(
            own_endpoint(None, &me, 51820),
            Some("172.28.0.11:51820".parse().unwrap())
        );
        let flag = Some("192.0.2.1:7".parse().unwrap());
        assert_eq!(own_endpoint(flag, &me, 51820), flag);
        assert!(t.mesh.peers.is_empty());
        assert!(run(&[]).own.is_none());
    }

    #[test]
    fn node_addresses_are_the_internal_ips() {
        let k2 = key(2).to_base64();
        let mut n = node(&N {
            name: "b",
            age: 1,
            cidrs: &["10.244.2.0/24"],
            ann: &[(ANN_PUBLIC_KEY, &k2), (ANN_ENDPOINT, "172.28.0.12:51820")],
            ip: Some("172.28.0.12"),
        });
        if let Some(a) = n.status.as_mut().and_then(|s| s.addresses.as_mut()) {
            a.push(NodeAddress {
                type_: "InternalIP".into(),
                address: "fd00::12".into(),
            });
            a.push(NodeAddress {
                type_: "Hostname".into(),
                address: "b".into(),
            });
        }
        let t = run(&[n]);
        let want: Vec<IpAddr> = vec!["172.28.0.12".parse().unwrap(), "fd00::12".parse().unwrap()];
        assert_eq!(t.mesh.peers[0].node_addresses, want);
        // Never routed: only the pod CIDRs and the cluster CIDR are routes.
        assert!(t.mesh.routes().iter().all(|r| !r.contains(want[0])));
    }

    #[test]
    fn order_does_not_matter() {
        let k: Vec<String> = (2..6).map(|i| key(i).to_base64()).collect();
        let mk = |i: usize| {
            node(&N {
                name: ["b", "c", "d", "e"][i],
                age: i as i64,
                cidrs: &[[
                    "10.244.2.0/24",
                    "10.244.3.0/24",
                    "10.244.2.0/23",
                    "10.244.5.0/24",
                ][i]],
                ann: &[(ANN_PUBLIC_KEY, &k[i]), (ANN_ENDPOINT, "172.28.0.1:1")],
                ip: None,
            })
        };
        let fwd: Vec<Node> = (0..4).map(mk).collect();
        let rev: Vec<Node> = (0..4).rev().map(mk).collect();
        assert_eq!(run(&fwd), run(&rev));
    }
}
