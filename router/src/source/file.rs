//! The static mesh file: a TOML file naming this node's settings and its
//! peers, for clusters without Kubernetes and for the lab.
//!
//! ```toml
//! [node]
//! private_key_file = "/var/lib/tunmesh/private.key"
//! listen_port = 51820
//! pod_cidrs = ["10.244.1.0/24", "fd00:10:244:1::/64"]   # gateway = first address of each
//! cluster_cidrs = ["10.244.0.0/16", "fd00:10:244::/56"]  # routed into the TUN even without a peer
//!
//! [[peer]]
//! name = "node-2"                      # optional, defaults to the public key
//! public_key = "base64, as `wg pubkey` prints it"
//! endpoint = "172.30.0.12:51820"       # optional; IPv6 as "[fd00::2]:51820"
//! allowed_ips = ["10.244.2.0/24", "fd00:10:244:2::/64"]
//! node_addresses = ["172.30.0.12"]     # optional: the peer node's own addresses,
//!                                      # accepted as sources, never routed
//! persistent_keepalive = 25            # optional, seconds, 0 = off
//! ```
//!
//! Every field is checked and every problem is reported at once, each naming
//! the file, the peer and the field, so an operator fixes the file in one go.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use tunmesh_contract::validate::{self, overlaps, PrefixIndex};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{publish, set_status, PeerSource, Request, SharedStatus, SourceTask, Updates};
use crate::model::{unix_now, DesiredMesh, PeerSpec, ReloadStatus, Snapshot};

/// What is wrong with a mesh file: its path and one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("mesh file {path}: {}", describe(problems))]
pub struct MeshFileError {
    pub path: String,
    pub problems: Vec<Problem>,
}

/// One thing wrong with a mesh file: the field (`peer[1] ("node-3").
/// allowed_ips[0]`, `node.listen_port`; `file` for the file as a whole)
/// and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub what: String,
}

impl Problem {
    pub fn at(field: impl Into<String>, what: impl std::fmt::Display) -> Problem {
        Problem {
            field: field.into(),
            what: what.to_string(),
        }
    }
}

/// Problems as one line, `; ` between them.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.what)
    }
}

/// This node's own settings from the `[node]` table. They take effect at
/// start; a reload that changes them is refused (restart to change them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    pub pod_cidrs: Vec<IpNetwork>,
    pub cluster_cidrs: Vec<IpNetwork>,
}

impl NodeSettings {
    /// Gateway addresses: the first host address of each pod CIDR.
    pub fn gateways(&self) -> Vec<IpAddr> {
        self.pod_cidrs
            .iter()
            .map(|c| validate::first_host(*c))
            .collect()
    }
}

/// A parsed and validated mesh file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshFile {
    pub node: NodeSettings,
    pub mesh: DesiredMesh,
}

/// A mesh file as written, before validation. The warm-start cache
/// (`crate::warm`) stores the same shape (as JSON), so that a cached mesh
/// is checked by exactly the validation a mesh file gets.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub node: RawNode,
    #[serde(default)]
    pub peer: Vec<RawPeer>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawNode {
    pub private_key_file: String,
    pub listen_port: i64,
    #[serde(default)]
    pub pod_cidrs: Vec<String>,
    #[serde(default)]
    pub cluster_cidrs: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawPeer {
    pub name: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub node_addresses: Vec<String>,
    pub persistent_keepalive: Option<i64>,
}

impl RawFile {
    /// The text form of a validated mesh: what `validate` turns back into
    /// the same `DesiredMesh` and pod CIDRs.
    pub fn from_snapshot(snap: &Snapshot, private_key_file: &Path, listen_port: u16) -> RawFile {
        let strings = |v: &[IpNetwork]| v.iter().map(ToString::to_string).collect();
        RawFile {
            node: RawNode {
                private_key_file: private_key_file.display().to_string(),
                listen_port: i64::from(listen_port),
                pod_cidrs: strings(&snap.pod_cidrs),
                cluster_cidrs: strings(&snap.mesh.blackhole_cidrs),
            },
            peer: snap
                .mesh
                .peers
                .iter()
                .map(|p| RawPeer {
                    name: Some(p.name.clone()),
                    public_key: p.public_key.to_base64(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: strings(&p.allowed_ips),
                    node_addresses: p.node_addresses.iter().map(ToString::to_string).collect(),
                    persistent_keepalive: p.persistent_keepalive.map(i64::from),
                })
                .collect(),
        }
    }
}

fn cidr_list(raw: &[String], what: &str, problems: &mut Vec<Problem>) -> Vec<IpNetwork> {
    raw.iter()
        .enumerate()
        .filter_map(|(i, t)| match validate::cidr(t) {
            Ok(n) => Some(n),
            Err(e) => {
                problems.push(Problem::at(format!("{what}[{i}]"), e));
                None
            }
        })
        .collect()
}

/// The mesh file as a peer source: the snapshot read at start, then a
/// fresh read on every reload request (SIGHUP). A bad file at a reload is
/// refused, logged and recorded in the status; the last good mesh stays.
/// `[node]` settings take effect at start only.
pub struct FileSource {
    path: PathBuf,
    file: MeshFile,
}

impl FileSource {
    /// Reads and validates the file; a bad one is an error (a router must
    /// not come up on a file it cannot use).
    pub fn open(path: &Path) -> Result<FileSource, MeshFileError> {
        Ok(FileSource {
            path: path.to_path_buf(),
            file: load(path)?,
        })
    }

    /// This node's settings from `[node]`, as read at start.
    pub fn node(&self) -> &NodeSettings {
        &self.file.node
    }

    fn snapshot(&self, mesh: DesiredMesh) -> Snapshot {
        Snapshot {
            mesh,
            pod_cidrs: self.file.node.pod_cidrs.clone(),
        }
    }

    /// One reload: the new snapshot, or why the file was refused.
    fn reload(&self) -> Result<(Snapshot, String), MeshFileError> {
        let f = load(&self.path)?;
        if f.node != self.file.node {
            warn!(file = %self.path.display(), "[node] settings changed; they take effect on restart (peers are applied now)");
        }
        let n = f.mesh.peers.len();
        Ok((self.snapshot(f.mesh), format!("{n} peers read")))
    }
}

impl PeerSource for FileSource {
    fn kind(&self) -> &'static str {
        "mesh file"
    }

    fn run(
        self: Box<Self>,
        updates: Updates,
        mut requests: mpsc::UnboundedReceiver<Request>,
        status: SharedStatus,
    ) -> SourceTask {
        Box::pin(async move {
            publish(&updates, self.snapshot(self.file.mesh.clone()));
            while let Some(req) = requests.recv().await {
                if let Request::Event { reason, message } = req {
                    // No API to record it in: the log holds it.
                    warn!(reason, "{message}");
                    continue;
                }
                let (ok, message) = match self.reload() {
                    Ok((snap, message)) => {
                        info!(file = %self.path.display(), result = %message, "mesh file reloaded");
                        publish(&updates, snap);
                        (true, message)
                    }
                    Err(e) => {
                        error!(error = %e, "reload refused; keeping the last good mesh");
                        (false, e.to_string())
                    }
                };
                set_status(&status, |s| {
                    s.reloads += 1;
                    s.last_reload = Some(ReloadStatus {
                        at_unix: unix_now(),
                        ok,
                        message,
                    });
                });
            }
        })
    }
}

/// Reads and validates a mesh file.
pub fn load(path: &Path) -> Result<MeshFile, MeshFileError> {
    let text = std::fs::read_to_string(path).map_err(|e| MeshFileError {
        path: path.display().to_string(),
        problems: vec![Problem::at("file", format!("cannot read: {e}"))],
    })?;
    parse(&text, path)
}

/// Parses and validates mesh-file text; `path` only names it in errors.
pub fn parse(text: &str, path: &Path) -> Result<MeshFile, MeshFileError> {
    let fail = |problems: Vec<Problem>| MeshFileError {
        path: path.display().to_string(),
        problems,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        fail(vec![Problem::at(
            "file",
            e.to_string().trim().replace('\n', " "),
        )])
    })?;
    validate(&raw).map_err(fail)
}

/// Validates a mesh as written; every problem at once, each naming its
/// field (`peer[1] ("node-3").allowed_ips[0]: ...`).
pub fn validate(raw: &RawFile) -> Result<MeshFile, Vec<Problem>> {
    let mut problems = Vec::new();

    let n = &raw.node;
    if n.private_key_file.trim().is_empty() {
        problems.push(Problem::at("node.private_key_file", "empty"));
    }
    let listen_port = match u16::try_from(n.listen_port) {
        Ok(p) if p != 0 => p,
        _ => {
            problems.push(Problem::at(
                "node.listen_port",
                format!("{} is not a port (1-65535)", n.listen_port),
            ));
            0
        }
    };
    let pod_cidrs = cidr_list(&n.pod_cidrs, "node.pod_cidrs", &mut problems);
    let cluster_cidrs = cidr_list(&n.cluster_cidrs, "node.cluster_cidrs", &mut problems);
    if pod_cidrs.iter().filter(|c| c.is_ipv4()).count() > 1
        || pod_cidrs.iter().filter(|c| c.is_ipv6()).count() > 1
    {
        problems.push(Problem::at(
            "node.pod_cidrs",
            "at most one IPv4 and one IPv6 prefix",
        ));
    }

    let mut peers: Vec<PeerSpec> = Vec::new();
    // The accepted peers' allowed IPs, with the peer's name.
    let mut claimed: PrefixIndex<String> = PrefixIndex::default();
    let mut names = BTreeMap::new();
    let mut keys = BTreeMap::new();
    for (i, p) in raw.peer.iter().enumerate() {
        let label = match &p.name {
            Some(n) => format!("peer[{i}] ({n:?})"),
            None => format!("peer[{i}]"),
        };
        let before = problems.len();
        let key = match validate::public_key(&p.public_key) {
            Ok(k) => Some(k),
            Err(e) => {
                problems.push(Problem::at(format!("{label}.public_key"), e));
                None
            }
        };
        let endpoint = match p.endpoint.as_deref().map(validate::endpoint).transpose() {
            Ok(ep) => ep,
            Err(e) => {
                problems.push(Problem::at(format!("{label}.endpoint"), e));
                None
            }
        };
        let allowed_ips = cidr_list(
            &p.allowed_ips,
            &format!("{label}.allowed_ips"),
            &mut problems,
        );
        let mut node_addresses = Vec::new();
        for (a, text) in p.node_addresses.iter().enumerate() {
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => node_addresses.push(ip),
                Err(_) => problems.push(Problem::at(
                    format!("{label}.node_addresses[{a}]"),
                    format!("{text:?} is not an IP address"),
                )),
            }
        }
        let persistent_keepalive = match p.persistent_keepalive {
            None | Some(0) => None,
            Some(s) => match u16::try_from(s) {
                Ok(s) => Some(s),
                Err(_) => {
                    problems.push(Problem::at(
                        format!("{label}.persistent_keepalive"),
                        format!("{s} is not 0-65535 seconds"),
                    ));
                    None
                }
            },
        };
        let name = p
            .name
            .clone()
            .unwrap_or_else(|| p.public_key.trim().to_string());
        if name.trim().is_empty() {
            problems.push(Problem::at(format!("{label}.name"), "empty"));
        }
        if let Some(j) = names.insert(name.clone(), i) {
            problems.push(Problem::at(
                format!("{label}.name"),
                format!("{name:?} is also peer[{j}]"),
            ));
        }
        if let Some(k) = key {
            if let Some(j) = keys.insert(k, i) {
                problems.push(Problem::at(
                    format!("{label}.public_key"),
                    format!("same key as peer[{j}]"),
                ));
            }
        }
        for (a, net) in allowed_ips.iter().enumerate() {
            for own in &pod_cidrs {
                if overlaps(net, own) {
                    problems.push(Problem::at(
                        format!("{label}.allowed_ips[{a}]"),
                        format!("{net} overlaps this node's pod CIDR {own}"),
                    ));
                }
            }
            if let Some((o, other)) = claimed.overlapping(net) {
                problems.push(Problem::at(
                    format!("{label}.allowed_ips[{a}]"),
                    format!("{net} overlaps {o} of peer {other:?}"),
                ));
            }
        }
        if let (Some(public_key), true) = (key, problems.len() == before) {
            for net in &allowed_ips {
                claimed.insert(*net, name.clone());
            }
            peers.push(PeerSpec {
                name,
                public_key,
                endpoint,
                allowed_ips,
                node_addresses,
                persistent_keepalive,
                rotated_from: None,
                key_created_unix: None,
                underlay_mtu: None,
            });
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(MeshFile {
        node: NodeSettings {
            private_key_file: PathBuf::from(n.private_key_file.trim()),
            listen_port,
            pod_cidrs,
            cluster_cidrs: cluster_cidrs.clone(),
        },
        mesh: DesiredMesh {
            peers,
            blackhole_cidrs: cluster_cidrs,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_A: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    const KEY_B: &str = "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=";

    fn good() -> String {
        format!(
            r#"
[node]
private_key_file = "/tmp/k"
listen_port = 51820
pod_cidrs = ["10.244.1.0/24", "fd00:10:244:1::/64"]
cluster_cidrs = ["10.244.0.0/16"]

[[peer]]
name = "node-2"
public_key = "{KEY_A}"
endpoint = "172.30.0.12:51820"
allowed_ips = ["10.244.2.0/24", "fd00:10:244:2::/64"]
persistent_keepalive = 25

[[peer]]
name = "node-3"
public_key = "{KEY_B}"
endpoint = "[fd00::3]:51820"
allowed_ips = ["10.244.3.0/24"]
"#
        )
    }

    fn err(text: &str) -> String {
        parse(text, Path::new("mesh.toml")).unwrap_err().to_string()
    }

    #[test]
    fn good_file_parses() {
        let f = parse(&good(), Path::new("mesh.toml")).unwrap();
        assert_eq!(f.node.listen_port, 51820);
        assert_eq!(f.node.gateways()[0].to_string(), "10.244.1.1");
        assert_eq!(f.node.gateways()[1].to_string(), "fd00:10:244:1::1");
        assert_eq!(f.mesh.peers.len(), 2);
        assert_eq!(f.mesh.peers[0].persistent_keepalive, Some(25));
        assert_eq!(
            f.mesh.peers[1].endpoint.unwrap().to_string(),
            "[fd00::3]:51820"
        );
        // The cluster CIDR covers the peers' IPv4 prefixes (no route each);
        // the IPv6 one, outside it, gets its own.
        let routes: Vec<String> = f.mesh.routes().iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, ["10.244.0.0/16", "fd00:10:244:2::/64"]);
    }

    /// Each kind of bad field: (replace this, with that, the message must contain).
    #[test]
    fn each_bad_field_is_named() {
        let cases: &[(&str, &str, &[&str])] = &[
            (
                KEY_A,
                "not-a-key",
                &["peer[0] (\"node-2\").public_key", "44"],
            ),
            (
                "172.30.0.12:51820",
                "172.30.0.12",
                &["peer[0] (\"node-2\").endpoint", "IP:PORT"],
            ),
            (
                "172.30.0.12:51820",
                "node2.example:51820",
                &["endpoint", "host names"],
            ),
            (
                "172.30.0.12:51820",
                "172.30.0.12:0",
                &["endpoint", "port 0"],
            ),
            (
                "\"10.244.2.0/24\"",
                "\"10.244.2.0/33\"",
                &["allowed_ips[0]", "not a CIDR"],
            ),
            (
                "\"10.244.2.0/24\"",
                "\"10.244.2.1/24\"",
                &["allowed_ips[0]", "host bits", "10.244.2.0/24"],
            ),
            (
                "\"10.244.3.0/24\"",
                "\"10.244.2.128/25\"",
                &["peer[1] (\"node-3\").allowed_ips[0]", "overlaps", "node-2"],
            ),
            (
                "\"10.244.3.0/24\"",
                "\"10.244.1.0/24\"",
                &["overlaps this node's pod CIDR"],
            ),
            (
                "persistent_keepalive = 25",
                "persistent_keepalive = 70000",
                &["persistent_keepalive", "70000"],
            ),
            (
                "listen_port = 51820",
                "listen_port = 0",
                &["node.listen_port"],
            ),
            (
                "listen_port = 51820",
                "listen_port = 99999",
                &["node.listen_port", "99999"],
            ),
            (
                "name = \"node-3\"",
                "name = \"node-2\"",
                &["peer[1]", "also peer[0]"],
            ),
            (KEY_B, KEY_A, &["same key as peer[0]"]),
            (
                "cluster_cidrs = [\"10.244.0.0/16\"]",
                "cluster_cidrs = [\"10.244.0.0\"]",
                &["node.cluster_cidrs[0]", "no prefix length"],
            ),
            (
                "persistent_keepalive = 25",
                "keepalive = 25",
                &["unknown field", "keepalive"],
            ),
            (
                "listen_port = 51820",
                "listen_port = \"51820\"",
                &["listen_port", "line"],
            ),
            ("[node]", "[nod]", &["nod"]),
        ];
        for (from, to, want) in cases {
            let text = good().replacen(from, to, 1);
            assert_ne!(text, good(), "case {from} -> {to} changed nothing");
            let e = err(&text);
            assert!(e.starts_with("mesh file mesh.toml: "), "{e}");
            for w in *want {
                assert!(e.contains(w), "{from} -> {to}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = good()
            .replacen(KEY_A, "bad", 1)
            .replacen("\"10.244.3.0/24\"", "\"x\"", 1);
        let e = parse(&text, Path::new("m")).unwrap_err();
        assert_eq!(e.problems.len(), 2, "{e}");
    }

    #[test]
    fn not_toml_is_an_error_with_position() {
        let e = err("[node\nprivate_key_file=");
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = load(Path::new("/nonexistent/mesh.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/nonexistent/mesh.toml") && e.contains("cannot read"),
            "{e}"
        );
    }
}
