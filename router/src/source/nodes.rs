//! Node objects to the desired mesh, incrementally: a `Directory` keeps,
//! for each Node, only what the mesh reads from it (`NodeFacts`: a few
//! annotations, the pod CIDRs, the InternalIPs), what that translates to,
//! and indices of the pod CIDRs and keys every Node claims. A change to one
//! Node is translated alone and compared with what it gave before; only
//! the Nodes whose claims overlap its old or new ones are looked at again.
//! An update that changes nothing the mesh reads (a kubelet's status
//! report, 17 a second in a 5,000-node cluster) costs a comparison of
//! facts and nothing else. No client, no I/O: the Kubernetes source feeds
//! it, and the unit tests call it with hand-built Nodes (`translate` is the
//! whole-store view of it).
//!
//! Rules (DESIGN.md, "Control plane"):
//! - one peer per other Node with a valid `tunmesh.io/public-key` and an
//!   endpoint (`tunmesh.io/force-endpoint` if set and valid, else
//!   `tunmesh.io/endpoint`);
//! - allowed IPs = the Node's `spec.podCIDRs` (all families; `spec.podCIDR`
//!   or the `tunmesh.io/pod-cidr` annotation when the list is empty). Each
//!   Node's gateway addresses are the first host of each pod CIDR, so they
//!   are inside these prefixes already;
//! - Nodes are ordered oldest first (creation time, then name). Every pod
//!   CIDR and key that parses is a Node's claim; a pod CIDR overlapping an
//!   older Node's claim, or a key an older Node claims (or this router's
//!   own), is refused for the later Node. Claims do not depend on whether
//!   the older Node became a peer, so a refusal never cascades;
//! - a Node that has not published a key or endpoint yet, or has no pod CIDR
//!   yet, is simply not a peer yet (it is joining); anything malformed is a
//!   `Problem` naming the Node and the field.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use tunmesh_contract::validate;

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
/// The Node's InternalIPs, as its router read them from its status
/// (comma-separated): peers accept them as inner sources without reading
/// every Node's status.
pub const ANN_NODE_ADDRESSES: &str = "tunmesh.io/node-addresses";
pub const ANN_FORCE_ENDPOINT: &str = "tunmesh.io/force-endpoint";
pub const ANN_POD_CIDR: &str = "tunmesh.io/pod-cidr";
/// Every annotation the router writes on its own Node (and `tunmesh-ctl
/// uninstall` removes); the operator's `ANN_FORCE_ENDPOINT` and
/// `ANN_POD_CIDR` are not among them.
pub const ROUTER_ANNOTATIONS: &[&str] = &[
    ANN_PUBLIC_KEY,
    ANN_ENDPOINT,
    ANN_NEXT_PUBLIC_KEY,
    ANN_KEY_CREATED,
    ANN_UNDERLAY_MTU,
    ANN_NODE_ADDRESSES,
];
/// The annotations tunmesh reads all start so; the others are not kept.
pub const ANN_PREFIX: &str = "tunmesh.io/";
/// Set by an operator (`tunmesh-ctl accept-key NODE`): the key this Node
/// shows is to be used although it was not announced as the Node's next
/// key first. No router may write it (deploy/node-policy.yaml).
pub const ANN_ACCEPT_PUBLIC_KEY: &str = "tunmesh.io/accept-public-key";
/// The reason of the problem (and Event) of a key change held back.
pub const REASON_HELD_KEY: &str = "UnannouncedKeyChange";

/// A Node whose key changed without being announced: the mesh goes on
/// with the key it had (`using`), not the one it shows now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldKey {
    pub node: String,
    pub using: PublicKey,
    pub shown: PublicKey,
}

/// The keys one Node object is known by, to tell a rotation (announced in
/// `tunmesh.io/next-public-key` first) from an overwrite. Kept while the
/// Node's UID stays the same; a new Node object starts afresh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Pin {
    uid: Option<String>,
    /// The current key last taken (none seen yet: the first one is taken).
    key: Option<PublicKey>,
    /// The next key it announces now.
    next: Option<PublicKey>,
    /// The key it shows but did not announce: not taken.
    held: Option<PublicKey>,
    /// When the taken key was made (`tunmesh.io/public-key-created`, Unix
    /// seconds), to recognise a rotation that ended in a gap.
    created: Option<i64>,
}

/// A Node's `tunmesh.io/public-key-created`, Unix seconds.
fn key_created(f: &NodeFacts) -> Option<i64> {
    f.ann(ANN_KEY_CREATED)?
        .parse::<k8s_openapi::jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}

/// The pin after Node `f` (viewed as `v`) came, `old` the one before. A
/// key is taken when it is the first, the same, announced as the next key
/// before or in this same object, or accepted by the operator; else it is
/// held and the pinned key stays.
///
/// `gap`: `f` comes from a relisting after the watch lost events, so an
/// announcement may have come and gone unseen (a whole rotation while this
/// router was cut off from the API server). Then a key made later than the
/// pinned one (`tunmesh.io/public-key-created`) is taken too, unless it is
/// the one already held back.
fn repin(old: Option<&Pin>, f: &NodeFacts, v: &View, gap: bool) -> Pin {
    let parsed =
        |k: &Option<Result<PublicKey, Problem>>| k.as_ref().and_then(|r| r.as_ref().ok()).copied();
    let (key, next) = (parsed(&v.key), parsed(&v.next));
    let created = key_created(f);
    let Some(p) = old.filter(|p| p.uid == f.uid) else {
        return Pin {
            uid: f.uid.clone(),
            key,
            next,
            held: None,
            created,
        };
    };
    let rotated_unseen = |k: PublicKey| {
        gap && p.held != Some(k) && created.zip(p.created).is_some_and(|(new, old)| new > old)
    };
    let accepted = |k: PublicKey| {
        p.key.is_none_or(|pk| pk == k)
            || p.next == Some(k)
            || next == Some(k)
            || f.ann(ANN_ACCEPT_PUBLIC_KEY)
                .and_then(|a| validate::public_key(a).ok())
                == Some(k)
            || rotated_unseen(k)
    };
    match key {
        Some(k) if !accepted(k) => Pin {
            uid: f.uid.clone(),
            key: p.key,
            next,
            held: Some(k),
            created: p.created,
        },
        // Taken, or no key shown (removed or malformed): the pinned one
        // is what a later key is compared with.
        Some(k) => Pin {
            uid: f.uid.clone(),
            key,
            next,
            held: None,
            created: if p.key == Some(k) {
                created.or(p.created)
            } else {
                created
            },
        },
        None => Pin {
            uid: f.uid.clone(),
            key: p.key,
            next,
            held: None,
            created: p.created,
        },
    }
}

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
    /// Every InternalIP in `status.addresses`.
    pub internal_ips: Vec<IpAddr>,
    /// The annotations as they are now, to decide whether to patch.
    pub public_key: Option<String>,
    pub next_public_key: Option<String>,
    pub key_created: Option<String>,
    pub underlay_mtu: Option<String>,
    pub endpoint: Option<String>,
    pub node_addresses: Option<String>,
    /// A valid `tunmesh.io/force-endpoint` set by the operator.
    pub force_endpoint: Option<SocketAddr>,
}

impl OwnNode {
    /// The first InternalIP.
    pub fn internal_ip(&self) -> Option<IpAddr> {
        self.internal_ips.first().copied()
    }
}

/// The result of one translation of the whole store.
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

fn ann_field(key: &str) -> String {
    format!("metadata.annotations[{key}]")
}

/// A Node's creation time, for "oldest first": (seconds, nanoseconds).
type Created = Option<(i64, i32)>;

/// Where a Node stands among the others: oldest first, then by name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Order {
    created: Created,
    name: String,
}

/// Everything the mesh reads from one Node, and nothing else: no status
/// conditions, images or managed fields. Two facts that are equal
/// translate the same.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub uid: Option<String>,
    pub created: Created,
    /// The `tunmesh.io/` annotations.
    pub annotations: BTreeMap<String, String>,
    /// `spec.podCIDRs` (or `spec.podCIDR`), each with its field. Set once
    /// and never changed by Kubernetes: read from a whole Node, kept while
    /// only metadata comes.
    pub spec_cidrs: Vec<(String, String)>,
    /// Whether `spec` was read at all (a Node seen only through its
    /// metadata has not been yet).
    pub spec_read: bool,
    /// The InternalIPs of `status.addresses`, from the last whole read.
    pub status_ips: Vec<IpAddr>,
}

fn tunmesh_annotations(meta: &ObjectMeta) -> BTreeMap<String, String> {
    meta.annotations
        .iter()
        .flatten()
        .filter(|(k, _)| k.starts_with(ANN_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn created(meta: &ObjectMeta) -> Created {
    meta.creation_timestamp.as_ref().map(|t| {
        let s = t.0.as_second();
        (s, t.0.subsec_nanosecond())
    })
}

impl NodeFacts {
    /// The facts of a whole Node.
    pub fn from_node(node: &Node) -> NodeFacts {
        let spec = node.spec.as_ref();
        let spec_cidrs = match spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .filter(|l| !l.is_empty())
        {
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.clone()))
                .collect(),
            None => spec
                .and_then(|s| s.pod_cidr.as_ref())
                .filter(|c| !c.is_empty())
                .map(|c| vec![("spec.podCIDR".to_string(), c.clone())])
                .unwrap_or_default(),
        };
        let status_ips = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        NodeFacts {
            name: node.metadata.name.clone().unwrap_or_default(),
            uid: node.metadata.uid.clone(),
            created: created(&node.metadata),
            annotations: tunmesh_annotations(&node.metadata),
            spec_cidrs,
            spec_read: true,
            status_ips,
        }
    }

    /// The facts of a Node seen through its metadata alone (a metadata
    /// watch): spec and status as `known` had them (a Node not known yet
    /// has them unread).
    pub fn from_metadata(meta: &ObjectMeta, known: Option<&NodeFacts>) -> NodeFacts {
        NodeFacts {
            name: meta.name.clone().unwrap_or_default(),
            uid: meta.uid.clone(),
            created: created(meta),
            annotations: tunmesh_annotations(meta),
            spec_cidrs: known.map(|k| k.spec_cidrs.clone()).unwrap_or_default(),
            spec_read: known.is_some_and(|k| k.spec_read),
            status_ips: known.map(|k| k.status_ips.clone()).unwrap_or_default(),
        }
    }

    /// Whether the mesh needs this Node's spec read again: it was never
    /// read, or it had no pod CIDR yet and the Node has none from the
    /// annotation either (the IPAM controller sets it after the Node
    /// registers).
    pub fn needs_spec(&self) -> bool {
        !self.spec_read
            || (self.spec_cidrs.is_empty() && !self.annotations.contains_key(ANN_POD_CIDR))
    }

    fn ann(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(|v| v.trim())
    }

    fn order(&self) -> Order {
        Order {
            created: self.created,
            name: self.name.clone(),
        }
    }

    /// The pod CIDRs the Node declares, with the field each came from.
    fn declared_cidrs(&self) -> Vec<(String, String)> {
        if !self.spec_cidrs.is_empty() {
            return self.spec_cidrs.clone();
        }
        match self.ann(ANN_POD_CIDR) {
            Some(v) if !v.is_empty() => v
                .split(',')
                .map(|c| (ann_field(ANN_POD_CIDR), c.trim().to_string()))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// The InternalIPs: what its router publishes (current, read without
    /// the status), else what the last whole read of the status said.
    fn internal_ips(&self) -> Vec<IpAddr> {
        match self.ann(ANN_NODE_ADDRESSES) {
            Some(v) if !v.is_empty() => {
                let ips: Vec<IpAddr> = v.split(',').filter_map(|a| a.trim().parse().ok()).collect();
                if ips.is_empty() {
                    self.status_ips.clone()
                } else {
                    ips
                }
            }
            _ => self.status_ips.clone(),
        }
    }
}

/// A pod CIDR as a sortable key: family, network, prefix length.
type CidrKey = (bool, u128, u8);

fn cidr_key(c: &IpNetwork) -> CidrKey {
    match c {
        IpNetwork::V4(n) => (false, u128::from(u32::from(n.network())), n.prefix()),
        IpNetwork::V6(n) => (true, u128::from(n.network()), n.prefix()),
    }
}

/// The last address of `c`, as a key's network part.
fn cidr_last(c: &IpNetwork) -> u128 {
    match c {
        IpNetwork::V4(n) => u128::from(u32::from(n.broadcast())),
        IpNetwork::V6(n) => u128::from(n.broadcast()),
    }
}

fn mask(v6: bool, network: u128, prefix: u8) -> u128 {
    let width: u32 = if v6 { 128 } else { 32 };
    let host = width - u32::from(prefix);
    if host >= 128 {
        0
    } else {
        (network >> host) << host
    }
}

/// A key's claim: its bytes.
type KeyBytes = [u8; 32];

/// What one Node says, translated on its own (no other Node looked at).
#[derive(Debug, Clone, Default)]
struct View {
    order: Option<Order>,
    /// Its pod CIDRs that parse (claims), each with its field, and the
    /// problems of those that do not, in the order declared.
    cidrs: Vec<(String, Result<IpNetwork, Problem>)>,
    declared_any: bool,
    force: Option<SocketAddr>,
    force_problem: Option<Problem>,
    /// The current key: none, or parsed, or why not.
    key: Option<Result<PublicKey, Problem>>,
    next: Option<Result<PublicKey, Problem>>,
}

impl View {
    /// The keys this Node claims (current and next, where they parse).
    fn keys(&self) -> Vec<PublicKey> {
        let mut k: Vec<PublicKey> = self.key.iter().flatten().copied().collect();
        if let Some(Ok(n)) = &self.next {
            if !k.contains(n) {
                k.push(*n);
            }
        }
        k
    }

    fn claimed_cidrs(&self) -> impl Iterator<Item = &IpNetwork> {
        self.cidrs.iter().filter_map(|(_, c)| c.as_ref().ok())
    }
}

fn problem(node: &str, field: String, reason: &'static str, message: String) -> Problem {
    Problem {
        node: node.to_string(),
        field,
        reason,
        message,
    }
}

fn view(f: &NodeFacts, own: bool) -> View {
    let name = f.name.as_str();
    let declared = f.declared_cidrs();
    let cidrs = declared
        .iter()
        .map(|(field, text)| {
            let parsed = validate::cidr(text)
                .map_err(|m| problem(name, field.clone(), "InvalidPodCIDR", m.to_string()));
            (field.clone(), parsed)
        })
        .collect();
    let (force, force_problem) = match f.ann(ANN_FORCE_ENDPOINT) {
        None | Some("") => (None, None),
        Some(v) => match validate::endpoint(v) {
            Ok(a) => (Some(a), None),
            Err(m) => (
                None,
                Some(problem(
                    name,
                    ann_field(ANN_FORCE_ENDPOINT),
                    "InvalidEndpoint",
                    format!("{m}; using {ANN_ENDPOINT} instead"),
                )),
            ),
        },
    };
    let parse_key = |ann: &str| -> Option<Result<PublicKey, Problem>> {
        match f.ann(ann) {
            None | Some("") => None,
            Some(v) => Some(
                validate::public_key(v)
                    .map_err(|e| problem(name, ann_field(ann), "InvalidPublicKey", e.to_string())),
            ),
        }
    };
    // This router's own annotations are not claims: its keys are its own.
    let (key, next) = if own {
        (None, None)
    } else {
        (parse_key(ANN_PUBLIC_KEY), parse_key(ANN_NEXT_PUBLIC_KEY))
    };
    View {
        order: Some(f.order()),
        cidrs,
        declared_any: !declared.is_empty(),
        force,
        force_problem,
        key,
        next,
    }
}

/// What one Node comes to, all Nodes considered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Outcome {
    peer: Option<PeerSpec>,
    own: Option<OwnNode>,
    problems: Vec<Problem>,
    pending: Option<&'static str>,
}

struct Entry {
    facts: NodeFacts,
    view: View,
    outcome: Outcome,
    pin: Pin,
}

/// What a change did to the desired mesh and the reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Peers that came, changed (`Some`) or went (`None`), by name.
    pub peers: Vec<(String, Option<PeerSpec>)>,
    /// This router's own Node changed (its pod CIDRs, or what it shows).
    pub own: bool,
    /// Problems that appeared, and those that went away.
    pub new_problems: Vec<Problem>,
    pub gone_problems: Vec<Problem>,
    /// Nodes whose facts were looked at again (0 when nothing the mesh
    /// reads changed).
    pub translated: usize,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
            && !self.own
            && self.new_problems.is_empty()
            && self.gone_problems.is_empty()
    }
}

/// The router's settings, owned (a `Directory` outlives a call).
#[derive(Debug, Clone)]
pub struct DirectorySettings {
    pub own_name: String,
    pub own_key: PublicKey,
    pub own_next_key: Option<PublicKey>,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub persistent_keepalive: Option<u16>,
}

/// Every Node's facts and translation, with the indices that make a change
/// to one Node cost what it touches, not the size of the cluster.
pub struct Directory {
    settings: DirectorySettings,
    entries: HashMap<String, Entry>,
    /// Pod CIDR claims, by CIDR: the Nodes claiming it, oldest first.
    cidrs: BTreeMap<CidrKey, BTreeSet<Order>>,
    /// How many claims of each prefix length there are, per family (false:
    /// IPv4): a CIDR is looked for inside the shorter ones present.
    lengths: [BTreeMap<u8, usize>; 2],
    /// Key claims: the Nodes claiming each key, oldest first.
    keys: HashMap<KeyBytes, BTreeSet<Order>>,
    /// The desired peers, by name.
    peers: BTreeMap<String, PeerSpec>,
    /// Nodes with problems, and Nodes pending, by name.
    problems: BTreeMap<String, Vec<Problem>>,
    pending: BTreeMap<String, &'static str>,
    /// Nodes whose key change is held back, by name.
    held: BTreeMap<String, HeldKey>,
    /// Key changes held back since the start (each hold counted once).
    holds: u64,
    /// A relisting is being applied (the watch lost events): see `repin`.
    relisting: bool,
}

impl Directory {
    pub fn new(settings: DirectorySettings) -> Directory {
        Directory {
            settings,
            entries: HashMap::new(),
            cidrs: BTreeMap::new(),
            lengths: [BTreeMap::new(), BTreeMap::new()],
            keys: HashMap::new(),
            peers: BTreeMap::new(),
            problems: BTreeMap::new(),
            pending: BTreeMap::new(),
            held: BTreeMap::new(),
            holds: 0,
            relisting: false,
        }
    }

    /// Nodes whose key change is held back now.
    pub fn held(&self) -> impl Iterator<Item = &HeldKey> {
        self.held.values()
    }

    /// Key changes held back since the start.
    pub fn holds(&self) -> u64 {
        self.holds
    }

    /// How many Nodes are known.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The facts known of Node `name`.
    pub fn facts(&self, name: &str) -> Option<&NodeFacts> {
        self.entries.get(name).map(|e| &e.facts)
    }

    /// Every Node's name.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// This router's own Node, as translated (`None` while it does not exist).
    pub fn own(&self) -> Option<&OwnNode> {
        self.entries
            .get(&self.settings.own_name)
            .and_then(|e| e.outcome.own.as_ref())
    }

    /// The desired peers.
    pub fn peers(&self) -> &BTreeMap<String, PeerSpec> {
        &self.peers
    }

    /// The desired mesh, whole (a listing's or a resync's: O(peers)).
    pub fn mesh(&self) -> DesiredMesh {
        DesiredMesh {
            peers: self.peers.values().cloned().collect(),
            blackhole_cidrs: self.settings.cluster_cidrs.clone(),
        }
    }

    /// Every problem now, oldest Node first.
    pub fn problems(&self) -> Vec<Problem> {
        let mut nodes: Vec<(&Order, &Vec<Problem>)> = self
            .problems
            .iter()
            .filter_map(|(n, p)| Some((self.entries.get(n)?.view.order.as_ref()?, p)))
            .collect();
        nodes.sort();
        nodes
            .into_iter()
            .flat_map(|(_, p)| p.iter().cloned())
            .collect()
    }

    /// Nodes that are not peers yet, with why, oldest first.
    pub fn pending(&self) -> Vec<(String, &'static str)> {
        let mut v: Vec<(&Order, &String, &&'static str)> = self
            .pending
            .iter()
            .filter_map(|(n, r)| Some((self.entries.get(n)?.view.order.as_ref()?, n, r)))
            .collect();
        v.sort();
        v.into_iter().map(|(_, n, r)| (n.clone(), *r)).collect()
    }

    /// This router's keys changed (a rotation): the Nodes claiming the old
    /// or new ones are looked at again.
    pub fn set_own_keys(&mut self, key: PublicKey, next: Option<PublicKey>) -> Changes {
        let mut touched: BTreeSet<String> = BTreeSet::new();
        for k in [
            Some(self.settings.own_key),
            self.settings.own_next_key,
            Some(key),
            next,
        ]
        .into_iter()
        .flatten()
        {
            for o in self.keys.get(k.as_bytes()).into_iter().flatten() {
                touched.insert(o.name.clone());
            }
        }
        self.settings.own_key = key;
        self.settings.own_next_key = next;
        self.resolve(touched)
    }

    /// Node `facts.name` is as `facts` says (new or changed). When nothing
    /// the mesh reads changed, this is a comparison and nothing more.
    pub fn upsert(&mut self, facts: NodeFacts) -> Changes {
        if facts.name.is_empty() {
            return Changes::default();
        }
        if self
            .entries
            .get(&facts.name)
            .is_some_and(|e| e.facts == facts)
        {
            return Changes::default();
        }
        let own = facts.name == self.settings.own_name;
        let mut new_view = view(&facts, own);
        let old_pin = self.entries.get(&facts.name).map(|e| &e.pin);
        let pin = repin(old_pin, &facts, &new_view, self.relisting);
        match (&pin.held, pin.key) {
            (Some(shown), Some(using)) => {
                // A held key claims nothing: the pinned one stays the claim.
                new_view.key = Some(Ok(using));
                if old_pin.and_then(|p| p.held.as_ref()) != Some(shown) {
                    self.holds += 1;
                }
                self.held.insert(
                    facts.name.clone(),
                    HeldKey {
                        node: facts.name.clone(),
                        using,
                        shown: *shown,
                    },
                );
            }
            _ => {
                self.held.remove(&facts.name);
            }
        }
        let mut touched = BTreeSet::new();
        touched.insert(facts.name.clone());
        let outcome = match self.entries.remove(&facts.name) {
            Some(old) => {
                self.unclaim(&old.view, &mut touched);
                old.outcome
            }
            None => Outcome::default(),
        };
        self.entries.insert(
            facts.name.clone(),
            Entry {
                facts,
                view: new_view.clone(),
                outcome,
                pin,
            },
        );
        self.claim(&new_view, &mut touched);
        self.resolve(touched)
    }

    /// Node `name` is gone.
    pub fn remove(&mut self, name: &str) -> Changes {
        let Some(old) = self.entries.remove(name) else {
            return Changes::default();
        };
        let mut touched = BTreeSet::new();
        self.unclaim(&old.view, &mut touched);
        touched.remove(name);
        let mut changes = self.resolve(touched);
        if old.outcome.peer.is_some() {
            self.peers.remove(name);
            changes.peers.push((name.to_string(), None));
        }
        if old.outcome.own.is_some() {
            changes.own = true;
        }
        if let Some(p) = self.problems.remove(name) {
            changes.gone_problems.extend(p);
        }
        self.pending.remove(name);
        self.held.remove(name);
        changes
    }

    /// A whole listing: Nodes not in it are gone, the others as given.
    pub fn replace_all(&mut self, all: Vec<NodeFacts>) -> Changes {
        let listed: BTreeSet<&str> = all.iter().map(|f| f.name.as_str()).collect();
        let gone: Vec<String> = self
            .entries
            .keys()
            .filter(|n| !listed.contains(n.as_str()))
            .cloned()
            .collect();
        let mut changes = Changes::default();
        for n in gone {
            changes.merge(self.remove(&n));
        }
        self.relisting = true;
        for f in all {
            changes.merge(self.upsert(f));
        }
        self.relisting = false;
        changes
    }

    /// Adds `v`'s claims to the indices; the Nodes whose claims they
    /// overlap go into `touched`.
    fn claim(&mut self, v: &View, touched: &mut BTreeSet<String>) {
        let Some(order) = v.order.clone() else {
            return;
        };
        let cidrs: Vec<IpNetwork> = v.claimed_cidrs().copied().collect();
        for c in &cidrs {
            for o in self.overlapping(c) {
                touched.insert(o.name);
            }
            let k = cidr_key(c);
            self.cidrs.entry(k).or_default().insert(order.clone());
            *self.lengths[usize::from(k.0)].entry(k.2).or_default() += 1;
        }
        for k in v.keys() {
            let set = self.keys.entry(*k.as_bytes()).or_default();
            for o in set.iter() {
                touched.insert(o.name.clone());
            }
            set.insert(order.clone());
        }
    }

    /// Takes `v`'s claims out of the indices; the Nodes whose claims they
    /// overlapped go into `touched`.
    fn unclaim(&mut self, v: &View, touched: &mut BTreeSet<String>) {
        let Some(order) = v.order.clone() else {
            return;
        };
        let cidrs: Vec<IpNetwork> = v.claimed_cidrs().copied().collect();
        for c in &cidrs {
            let k = cidr_key(c);
            if let Some(set) = self.cidrs.get_mut(&k) {
                set.remove(&order);
                if set.is_empty() {
                    self.cidrs.remove(&k);
                }
            }
            let lengths = &mut self.lengths[usize::from(k.0)];
            if let Some(n) = lengths.get_mut(&k.2) {
                *n -= 1;
                if *n == 0 {
                    lengths.remove(&k.2);
                }
            }
            for o in self.overlapping(c) {
                touched.insert(o.name);
            }
        }
        for k in v.keys() {
            if let Some(set) = self.keys.get_mut(k.as_bytes()) {
                set.remove(&order);
                for o in set.iter() {
                    touched.insert(o.name.clone());
                }
                if set.is_empty() {
                    self.keys.remove(k.as_bytes());
                }
            }
        }
    }

    /// Every claim overlapping `c` (a CIDR inside it, or one holding it),
    /// with the claiming Node and the claimed CIDR.
    fn overlapping_claims(&self, c: &IpNetwork) -> Vec<(Order, IpNetwork)> {
        let (v6, net, prefix) = cidr_key(c);
        let to_net = |k: &CidrKey| -> Option<IpNetwork> {
            if k.0 {
                ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::from(k.1), k.2)
                    .ok()
                    .map(IpNetwork::V6)
            } else {
                ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::from(k.1 as u32), k.2)
                    .ok()
                    .map(IpNetwork::V4)
            }
        };
        let mut out = Vec::new();
        // Claims whose network lies inside `c`: each overlaps it.
        for (k, set) in self.cidrs.range((v6, net, 0)..=(v6, cidr_last(c), u8::MAX)) {
            if let Some(n) = to_net(k) {
                out.extend(set.iter().map(|o| (o.clone(), n)));
            }
        }
        // Claims holding `c` from before its network: one per shorter length.
        for (&q, _) in self.lengths[usize::from(v6)].range(..prefix) {
            let k = (v6, mask(v6, net, q), q);
            if k.1 == net {
                continue; // in the range above already
            }
            if let (Some(set), Some(n)) = (self.cidrs.get(&k), to_net(&k)) {
                out.extend(set.iter().map(|o| (o.clone(), n)));
            }
        }
        out
    }

    fn overlapping(&self, c: &IpNetwork) -> Vec<Order> {
        self.overlapping_claims(c)
            .into_iter()
            .map(|(o, _)| o)
            .collect()
    }

    /// Translates each Node of `names` again, with every claim considered,
    /// and records what changed.
    fn resolve(&mut self, names: BTreeSet<String>) -> Changes {
        let mut changes = Changes::default();
        for name in names {
            let Some(entry) = self.entries.get(&name) else {
                continue;
            };
            let outcome = self.outcome(entry);
            changes.translated += 1;
            let Some(entry) = self.entries.get_mut(&name) else {
                continue;
            };
            if entry.outcome == outcome {
                continue;
            }
            let old = std::mem::replace(&mut entry.outcome, outcome.clone());
            if old.peer != outcome.peer {
                match &outcome.peer {
                    Some(p) => {
                        self.peers.insert(name.clone(), p.clone());
                    }
                    None => {
                        self.peers.remove(&name);
                    }
                }
                changes.peers.push((name.clone(), outcome.peer.clone()));
            }
            if old.own != outcome.own {
                changes.own = true;
            }
            if old.problems != outcome.problems {
                for p in &outcome.problems {
                    if !old.problems.contains(p) {
                        changes.new_problems.push(p.clone());
                    }
                }
                for p in &old.problems {
                    if !outcome.problems.contains(p) {
                        changes.gone_problems.push(p.clone());
                    }
                }
                if outcome.problems.is_empty() {
                    self.problems.remove(&name);
                } else {
                    self.problems.insert(name.clone(), outcome.problems.clone());
                }
            }
            match outcome.pending {
                Some(r) => {
                    self.pending.insert(name.clone(), r);
                }
                None => {
                    self.pending.remove(&name);
                }
            }
        }
        changes
    }

    /// What `entry` comes to with every other claim considered.
    fn outcome(&self, entry: &Entry) -> Outcome {
        let f = &entry.facts;
        let v = &entry.view;
        let name = f.name.as_str();
        let own = name == self.settings.own_name;
        let order = v.order.clone().unwrap_or_else(|| f.order());
        let mut out = Outcome::default();
        let mut cidrs = Vec::new();
        for (field, parsed) in &v.cidrs {
            match parsed {
                Err(p) => out.problems.push(p.clone()),
                Ok(c) => {
                    let older = self
                        .overlapping_claims(c)
                        .into_iter()
                        .filter(|(o, _)| *o < order)
                        .min();
                    match older {
                        Some((o, t)) => out.problems.push(problem(
                            name,
                            field.clone(),
                            "PodCIDROverlap",
                            format!(
                                "{c} overlaps {t} of Node {}, which was there first; refused",
                                o.name
                            ),
                        )),
                        None => cidrs.push(*c),
                    }
                }
            }
        }
        if let Some(p) = &v.force_problem {
            out.problems.push(p.clone());
        }
        if own {
            out.own = Some(OwnNode {
                pod_cidrs: cidrs,
                internal_ips: f.status_ips.clone(),
                public_key: f.ann(ANN_PUBLIC_KEY).map(str::to_string),
                key_created: f.ann(ANN_KEY_CREATED).map(str::to_string),
                underlay_mtu: f.ann(ANN_UNDERLAY_MTU).map(str::to_string),
                next_public_key: f
                    .ann(ANN_NEXT_PUBLIC_KEY)
                    .filter(|v| !v.is_empty())
                    .map(str::to_string),
                endpoint: f.ann(ANN_ENDPOINT).map(str::to_string),
                node_addresses: f.ann(ANN_NODE_ADDRESSES).map(str::to_string),
                force_endpoint: v.force,
            });
            return out;
        }
        let key = match &v.key {
            None => {
                out.pending = Some("no tunmesh.io/public-key yet");
                return out;
            }
            Some(Err(p)) => {
                out.problems.push(p.clone());
                return out;
            }
            Some(Ok(k)) => *k,
        };
        if let Some(shown) = &entry.pin.held {
            out.problems.push(problem(
                name,
                ann_field(ANN_PUBLIC_KEY),
                REASON_HELD_KEY,
                format!(
                    "changed to {} without being announced in {ANN_NEXT_PUBLIC_KEY} first \
                     (same Node object); still using {}. If the node was reinstalled or its \
                     key replaced on purpose: tunmesh-ctl accept-key {name}",
                    shown.to_base64(),
                    key.to_base64()
                ),
            ));
        }
        if let Some(whose) = self.key_taken(&key, &order) {
            out.problems.push(problem(
                name,
                ann_field(ANN_PUBLIC_KEY),
                "DuplicatePublicKey",
                format!("{} is {whose}; refused", key.to_base64()),
            ));
            return out;
        }
        let endpoint = match v.force {
            Some(a) => a,
            None => match f.ann(ANN_ENDPOINT) {
                None | Some("") => {
                    out.pending = Some("no tunmesh.io/endpoint yet");
                    return out;
                }
                Some(e) => match validate::endpoint(e) {
                    Ok(a) => a,
                    Err(m) => {
                        out.problems.push(problem(
                            name,
                            ann_field(ANN_ENDPOINT),
                            "InvalidEndpoint",
                            m.to_string(),
                        ));
                        return out;
                    }
                },
            },
        };
        if cidrs.is_empty() {
            if !v.declared_any {
                out.pending = Some("no podCIDR yet");
            }
            return out;
        }
        // A key rotation under way: the next key is the one to use (the
        // Node answers both). A bad one is reported and the current key
        // used, so the peer stays reachable.
        let next = match &v.next {
            None => None,
            Some(Err(p)) => {
                let mut p = p.clone();
                p.message = format!("{}; using {ANN_PUBLIC_KEY}", p.message);
                out.problems.push(p);
                None
            }
            Some(Ok(k)) if *k == key => None,
            Some(Ok(k)) => match self.key_taken(k, &order) {
                Some(whose) => {
                    out.problems.push(problem(
                        name,
                        ann_field(ANN_NEXT_PUBLIC_KEY),
                        "DuplicatePublicKey",
                        format!("{} is {whose}; using {ANN_PUBLIC_KEY}", k.to_base64()),
                    ));
                    None
                }
                None => Some(*k),
            },
        };
        // The key's age is reporting only: a bad timestamp is named and
        // otherwise ignored.
        let created = match f.ann(ANN_KEY_CREATED) {
            None | Some("") => None,
            Some(t) => match t.parse::<k8s_openapi::jiff::Timestamp>() {
                Ok(t) => u64::try_from(t.as_second()).ok(),
                Err(e) => {
                    out.problems.push(problem(
                        name,
                        ann_field(ANN_KEY_CREATED),
                        "InvalidTimestamp",
                        format!("{t:?} is not an RFC 3339 time: {e}"),
                    ));
                    None
                }
            },
        };
        // A bad MTU is named and ignored (the route's MTU still applies).
        let underlay_mtu = match f.ann(ANN_UNDERLAY_MTU) {
            None | Some("") => None,
            Some(m) => match m.parse::<u16>() {
                Ok(m) if m >= 576 => Some(m),
                _ => {
                    out.problems.push(problem(
                        name,
                        ann_field(ANN_UNDERLAY_MTU),
                        "InvalidMTU",
                        format!("{m:?} is not an MTU (576-65535); ignored"),
                    ));
                    None
                }
            },
        };
        out.peer = Some(PeerSpec {
            name: name.to_string(),
            public_key: next.unwrap_or(key),
            endpoint: Some(endpoint),
            allowed_ips: cidrs,
            node_addresses: f.internal_ips(),
            persistent_keepalive: self.settings.persistent_keepalive,
            rotated_from: next.map(|_| key),
            // The next key is being made now.
            key_created_unix: if next.is_some() { None } else { created },
            underlay_mtu,
        });
        out
    }

    /// Whose `key` is, if not the Node at `order`'s to take: this router's,
    /// or an older Node's.
    fn key_taken(&self, key: &PublicKey, order: &Order) -> Option<String> {
        if *key == self.settings.own_key || Some(*key) == self.settings.own_next_key {
            return Some("this router's own key".into());
        }
        self.keys
            .get(key.as_bytes())
            .and_then(|set| set.iter().find(|o| *o < order))
            .map(|o| format!("already the key of Node {}", o.name))
    }
}

impl Changes {
    /// Folds `other` (a later change) into this one.
    pub fn merge(&mut self, other: Changes) {
        for (name, spec) in other.peers {
            self.peers.retain(|(n, _)| *n != name);
            self.peers.push((name, spec));
        }
        self.own |= other.own;
        self.new_problems.extend(other.new_problems);
        self.gone_problems.extend(other.gone_problems);
        self.translated += other.translated;
    }
}

/// Translates the Nodes into the desired mesh, all at once. Deterministic:
/// the same Nodes in any order give the same result (the `Directory` a
/// source keeps gives the same, a change at a time).
pub fn translate<'n>(
    nodes: impl IntoIterator<Item = &'n Node>,
    s: &TranslateSettings<'_>,
) -> Translation {
    let mut d = Directory::new(DirectorySettings {
        own_name: s.own_name.to_string(),
        own_key: *s.own_key,
        own_next_key: s.own_next_key.copied(),
        cluster_cidrs: s.cluster_cidrs.to_vec(),
        persistent_keepalive: s.persistent_keepalive,
    });
    for n in nodes {
        if n.metadata.name.is_some() {
            d.upsert(NodeFacts::from_node(n));
        }
    }
    Translation {
        mesh: d.mesh(),
        own: d.own().cloned(),
        problems: d.problems(),
        pending: d.pending(),
    }
}

/// The endpoint this router publishes: the `--endpoint` flag, else its
/// Node's InternalIP and listen port. (`tunmesh.io/force-endpoint`, set by
/// the operator, is read by the peers themselves and wins over this.)
pub fn own_endpoint(
    flag: Option<SocketAddr>,
    own: &OwnNode,
    listen_port: u16,
) -> Option<SocketAddr> {
    flag.or_else(|| own.internal_ip().map(|ip| SocketAddr::new(ip, listen_port)))
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

    fn settings() -> DirectorySettings {
        DirectorySettings {
            own_name: "a".into(),
            own_key: key(1),
            own_next_key: None,
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            persistent_keepalive: None,
        }
    }

    /// The directory's view, in the shape `translate` gives.
    fn whole(d: &Directory) -> Translation {
        Translation {
            mesh: d.mesh(),
            own: d.own().cloned(),
            problems: d.problems(),
            pending: d.pending(),
        }
    }

    /// A small deterministic generator (no dependency for a test).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// A change at a time gives what the whole store gives: random Nodes
    /// (overlapping and duplicate CIDRs and keys, bad values, this router's
    /// own key) added, changed and removed, compared after every step, and
    /// the changes reported are exactly the peers that differ.
    #[test]
    fn a_change_at_a_time_equals_the_whole_store() {
        let keys: Vec<String> = (1..7).map(|i| key(i).to_base64()).collect();
        let cidrs = [
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.244.2.0/23",
            "10.244.3.0/24",
            "10.244.0.0/20",
            "fd00:10:244:2::/64",
            "10.244.4.7/24",
        ];
        let mut rng = Lcg(7);
        let mut d = Directory::new(settings());
        let mut live: BTreeMap<String, Node> = BTreeMap::new();
        for step in 0..3000 {
            let name = ["a", "b", "c", "d", "e", "f", "g"][rng.next(7) as usize].to_string();
            if rng.next(5) == 0 {
                live.remove(&name);
                let before = d.peers().clone();
                let ch = d.remove(&name);
                check_changes(&before, d.peers(), &ch, step);
            } else {
                let mut ann: Vec<(&'static str, &'static str)> = Vec::new();
                let k = Box::leak(keys[rng.next(6) as usize].clone().into_boxed_str());
                if rng.next(6) != 0 {
                    ann.push((ANN_PUBLIC_KEY, if rng.next(10) == 0 { "bad" } else { k }));
                }
                if rng.next(4) == 0 {
                    let n = Box::leak(keys[rng.next(6) as usize].clone().into_boxed_str());
                    ann.push((ANN_NEXT_PUBLIC_KEY, n));
                }
                if rng.next(6) != 0 {
                    ann.push((ANN_ENDPOINT, "172.28.0.9:51820"));
                }
                let n_cidrs = rng.next(3) as usize;
                let cs: Vec<&'static str> =
                    (0..n_cidrs).map(|_| cidrs[rng.next(7) as usize]).collect();
                let n = node(&N {
                    name: Box::leak(name.clone().into_boxed_str()),
                    age: rng.next(4) as i64,
                    cidrs: Box::leak(cs.into_boxed_slice()),
                    ann: leak(&ann),
                    ip: Some("172.28.0.9"),
                });
                live.insert(name, n.clone());
                let before = d.peers().clone();
                // Each a new Node object: a key pin (history) would make
                // the store's translation differ from a fresh one.
                let mut f = NodeFacts::from_node(&n);
                f.uid = Some(format!("uid-{step}"));
                let ch = d.upsert(f);
                check_changes(&before, d.peers(), &ch, step);
            }
            assert_eq!(
                whole(&d),
                run(&live.values().cloned().collect::<Vec<_>>()),
                "step {step}"
            );
        }
    }

    fn check_changes(
        before: &BTreeMap<String, PeerSpec>,
        after: &BTreeMap<String, PeerSpec>,
        ch: &Changes,
        step: usize,
    ) {
        let mut names: BTreeSet<&String> = before.keys().collect();
        names.extend(after.keys());
        let differ: BTreeSet<String> = names
            .into_iter()
            .filter(|n| before.get(*n) != after.get(*n))
            .cloned()
            .collect();
        let reported: BTreeSet<String> = ch.peers.iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(reported, differ, "step {step}: changes reported");
        for (n, spec) in &ch.peers {
            assert_eq!(spec.as_ref(), after.get(n), "step {step}: {n}");
        }
    }

    /// A kubelet's status report changes nothing the mesh reads: no Node is
    /// translated again, nothing changes. A metadata-only view keeps the
    /// pod CIDRs the whole Node gave.
    #[test]
    fn status_and_foreign_metadata_changes_cost_a_comparison() {
        let k2 = key(2).to_base64();
        let mut n = node(&N {
            name: "b",
            age: 1,
            cidrs: &["10.244.2.0/24"],
            ann: &[(ANN_PUBLIC_KEY, &k2), (ANN_ENDPOINT, "172.28.0.12:51820")],
            ip: Some("172.28.0.12"),
        });
        let mut d = Directory::new(settings());
        let ch = d.upsert(NodeFacts::from_node(&n));
        assert_eq!(ch.peers.len(), 1);
        // Status, labels, other annotations: nothing.
        n.status.as_mut().unwrap().conditions = Some(vec![Default::default()]);
        n.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        n.metadata.resource_version = Some("99".into());
        let ch = d.upsert(NodeFacts::from_node(&n));
        assert!(ch.is_empty() && ch.translated == 0, "{ch:?}");
        // Seen through its metadata alone: the CIDRs stay.
        let known = d.facts("b").cloned();
        let meta = NodeFacts::from_metadata(&n.metadata, known.as_ref());
        assert!(!meta.needs_spec());
        let ch = d.upsert(meta.clone());
        assert!(ch.is_empty() && ch.translated == 0, "{ch:?}");
        // A Node never read whole needs its spec.
        assert!(NodeFacts::from_metadata(&n.metadata, None).needs_spec());
        // An endpoint change: that peer, and only it.
        n.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(ANN_ENDPOINT.into(), "172.28.0.99:51820".into());
        let ch = d.upsert(NodeFacts::from_metadata(&n.metadata, known.as_ref()));
        assert_eq!(ch.translated, 1);
        assert_eq!(ch.peers.len(), 1);
        assert_eq!(
            ch.peers[0].1.as_ref().unwrap().endpoint,
            Some("172.28.0.99:51820".parse().unwrap())
        );
    }

    /// The older of two overlapping Nodes goes: the newer one becomes a
    /// peer, with its problem gone; and node-addresses annotations win over
    /// a stale status.
    #[test]
    fn a_removed_claim_lets_the_next_node_in() {
        let (k2, k3) = (key(2).to_base64(), key(3).to_base64());
        let b = node(&N {
            name: "b",
            age: 1,
            cidrs: &["10.244.2.0/23"],
            ann: &[(ANN_PUBLIC_KEY, &k2), (ANN_ENDPOINT, "172.28.0.12:51820")],
            ip: None,
        });
        let c = node(&N {
            name: "c",
            age: 2,
            cidrs: &["10.244.3.0/24"],
            ann: &[
                (ANN_PUBLIC_KEY, &k3),
                (ANN_ENDPOINT, "172.28.0.13:51820"),
                (ANN_NODE_ADDRESSES, "172.28.0.13, fd00::13"),
            ],
            ip: Some("172.28.0.99"),
        });
        let mut d = Directory::new(settings());
        d.upsert(NodeFacts::from_node(&b));
        let ch = d.upsert(NodeFacts::from_node(&c));
        assert!(ch.peers.is_empty());
        assert_eq!(ch.new_problems[0].reason, "PodCIDROverlap");
        let ch = d.remove("b");
        assert_eq!(ch.peers.len(), 2, "{ch:?}");
        assert_eq!(ch.gone_problems.len(), 1);
        let c_spec = d.peers().get("c").unwrap();
        assert_eq!(
            c_spec.node_addresses,
            vec![
                "172.28.0.13".parse::<IpAddr>().unwrap(),
                "fd00::13".parse().unwrap()
            ]
        );
        assert!(d.problems().is_empty());
    }

    /// Node "b" with key `key`, next key `next` and more annotations, as
    /// the Node object `uid`.
    fn keyed(uid: &str, key: &str, next: Option<&str>, more: &[(&'static str, &str)]) -> NodeFacts {
        let mut ann = vec![(ANN_PUBLIC_KEY, key), (ANN_ENDPOINT, "172.28.0.12:51820")];
        ann.extend(next.map(|n| (ANN_NEXT_PUBLIC_KEY, n)));
        ann.extend(more.iter().copied());
        let mut f = NodeFacts::from_node(&node(&N {
            name: "b",
            age: 1,
            cidrs: &["10.244.2.0/24"],
            ann: &ann,
            ip: None,
        }));
        f.uid = Some(uid.to_string());
        f
    }

    /// The key the mesh uses for Node "b".
    fn used(d: &Directory) -> Option<String> {
        d.peers().get("b").map(|p| p.public_key.to_base64())
    }

    #[test]
    fn an_unannounced_key_change_is_held_until_confirmed() {
        let [k1, k2, k3, k4] = [11, 12, 13, 14].map(|s| key(s).to_base64());
        let mut d = Directory::new(settings());
        d.upsert(keyed("u1", &k1, None, &[]));
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));

        // Overwritten: the mesh stays on k1, and says so once.
        let ch = d.upsert(keyed("u1", &k2, None, &[]));
        assert!(ch.peers.is_empty(), "{ch:?}");
        assert_eq!(ch.new_problems.len(), 1, "{ch:?}");
        assert_eq!(ch.new_problems[0].reason, REASON_HELD_KEY);
        assert!(
            ch.new_problems[0].message.contains(&k2),
            "{:?}",
            ch.new_problems
        );
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));
        let held: Vec<&HeldKey> = d.held().collect();
        assert_eq!(held.len(), 1);
        assert_eq!(
            (held[0].using.to_base64(), held[0].shown.to_base64()),
            (k1.clone(), k2.clone())
        );
        assert_eq!(d.holds(), 1);
        // The same state again counts no second hold.
        d.upsert(keyed("u1", &k2, None, &[(ANN_UNDERLAY_MTU, "1500")]));
        assert_eq!(d.holds(), 1);

        // The operator accepts it: taken, the problem goes.
        let ch = d.upsert(keyed("u1", &k2, None, &[(ANN_ACCEPT_PUBLIC_KEY, &k2)]));
        assert_eq!(used(&d).as_deref(), Some(k2.as_str()));
        assert_eq!(ch.gone_problems.len(), 1, "{ch:?}");
        assert_eq!(d.held().count(), 0);

        // A rotation: announced, then current; nothing held.
        d.upsert(keyed("u1", &k2, Some(&k3), &[]));
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));
        let ch = d.upsert(keyed("u1", &k3, None, &[]));
        assert!(ch.new_problems.is_empty(), "{ch:?}");
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));

        // Overwritten, then set back: the hold ends by itself.
        d.upsert(keyed("u1", &k4, None, &[]));
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));
        let ch = d.upsert(keyed("u1", &k3, None, &[]));
        assert_eq!(ch.gone_problems.len(), 1, "{ch:?}");
        assert_eq!(d.held().count(), 0);

        // Removed and shown again unannounced: still held (the pin is the
        // Node object's, not the annotation's).
        let mut bare = keyed("u1", &k3, None, &[]);
        bare.annotations.remove(ANN_PUBLIC_KEY);
        d.upsert(bare);
        d.upsert(keyed("u1", &k4, None, &[]));
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));
        assert_eq!(d.held().count(), 1);

        // A new Node object (deleted and registered again): its key is new.
        let ch = d.upsert(keyed("u2", &k4, None, &[]));
        assert_eq!(used(&d).as_deref(), Some(k4.as_str()));
        assert_eq!(ch.gone_problems.len(), 1, "{ch:?}");
        assert_eq!(d.holds(), 3);

        // Announced and made current in one write: taken.
        d.upsert(keyed("u2", &k1, Some(&k1), &[]));
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));
        assert_eq!(d.held().count(), 0);
        // An accept naming another key accepts nothing.
        d.upsert(keyed("u2", &k2, None, &[(ANN_ACCEPT_PUBLIC_KEY, &k3)]));
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));
    }

    #[test]
    fn a_rotation_missed_in_a_watch_gap_is_taken_from_the_relisting() {
        let [k1, k2, k3] = [31, 32, 33].map(|s| key(s).to_base64());
        let (t1, t2, t3) = (
            "2026-12-01T00:00:00Z",
            "2026-12-02T00:00:00Z",
            "2026-12-03T00:00:00Z",
        );
        let mut d = Directory::new(settings());
        d.upsert(keyed("u1", &k1, None, &[(ANN_KEY_CREATED, t1)]));
        // A newer key with a newer time, seen by the watch: still held
        // (nothing was missed, so nothing excuses the missing announcement).
        d.upsert(keyed("u1", &k2, None, &[(ANN_KEY_CREATED, t2)]));
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));
        // A relisting keeps holding the key it held.
        d.replace_all(vec![keyed("u1", &k2, None, &[(ANN_KEY_CREATED, t3)])]);
        assert_eq!(used(&d).as_deref(), Some(k1.as_str()));
        assert_eq!(d.held().count(), 1);
        // Set back; then a rotation to k3 happens while the watch is down:
        // the relisting shows k3, made later, and takes it.
        d.upsert(keyed("u1", &k1, None, &[(ANN_KEY_CREATED, t1)]));
        d.replace_all(vec![keyed("u1", &k3, None, &[(ANN_KEY_CREATED, t3)])]);
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));
        assert_eq!(d.held().count(), 0);
        // In a relisting, a key made no later than the one taken is held.
        d.replace_all(vec![keyed("u1", &k2, None, &[(ANN_KEY_CREATED, t2)])]);
        assert_eq!(used(&d).as_deref(), Some(k3.as_str()));
        assert_eq!(d.held().count(), 1);
    }

    #[test]
    fn a_held_key_claims_nothing() {
        // b overwrites its key with c's: c (younger) keeps its key and its
        // place in the mesh, b stays on its own.
        let (k1, k3) = (key(21).to_base64(), key(23).to_base64());
        let c = node(&N {
            name: "c",
            age: 2,
            cidrs: &["10.244.3.0/24"],
            ann: &[(ANN_PUBLIC_KEY, &k3), (ANN_ENDPOINT, "172.28.0.13:51820")],
            ip: None,
        });
        let mut d = Directory::new(settings());
        d.upsert(keyed("u1", &k1, None, &[]));
        d.upsert(NodeFacts::from_node(&c));
        let ch = d.upsert(keyed("u1", &k3, None, &[]));
        assert!(ch.peers.is_empty(), "{ch:?}");
        assert_eq!(d.peers().get("c").unwrap().public_key.to_base64(), k3);
        assert_eq!(d.peers().get("b").unwrap().public_key.to_base64(), k1);
        let reasons: Vec<&str> = d.problems().iter().map(|p| p.reason).collect();
        assert_eq!(reasons, vec![REASON_HELD_KEY]);
    }

    #[test]
    fn the_admission_policy_lets_the_router_write_its_own_annotations() {
        // deploy/node-policy.yaml's list of owned annotations is
        // ROUTER_ANNOTATIONS, and names none of the operator's.
        let text = include_str!("../../../deploy/node-policy.yaml");
        let block = text
            .split("- name: owned")
            .nth(1)
            .and_then(|rest| rest.split("- name:").next())
            .expect("node-policy.yaml has an `owned` variable");
        let listed: BTreeSet<&str> = block
            .split('\'')
            .filter(|s| s.starts_with(ANN_PREFIX))
            .collect();
        let ours: BTreeSet<&str> = ROUTER_ANNOTATIONS.iter().copied().collect();
        assert_eq!(listed, ours);
        for operator in [ANN_FORCE_ENDPOINT, ANN_POD_CIDR, ANN_ACCEPT_PUBLIC_KEY] {
            assert!(!listed.contains(operator), "{operator}");
        }
    }
}
