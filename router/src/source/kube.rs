//! The Kubernetes source: Node objects are the directory.
//!
//! What it reads, and how, so that its cost follows what changed:
//! - every Node's metadata, from one paginated list of whole Nodes (their
//!   spec and addresses read once; `NodeFacts` keeps only what the mesh
//!   needs) and then a metadata-only watch from that list's version, with
//!   bookmarks; a relist only when the API server says the version is gone;
//! - a Node's spec (its pod CIDRs, which never change once set) read again
//!   with a GET only when a Node appears or still has none;
//! - this router's own Node, whole, through a watch of that one object (its
//!   InternalIPs, which it publishes for the others as
//!   `tunmesh.io/node-addresses`).
//!
//! Each event goes into the `nodes::Directory`, which translates that Node
//! alone and says which peers changed; only then is the router told
//! (`Update::Changes`). A kubelet's status report changes nothing the
//! mesh reads and costs a comparison. When the API server goes away the
//! directory keeps the last listing, so the mesh stays; the watch
//! reconnects with backoff from the last version it saw.
//!
//! On the way it keeps this router's own Node annotated with its public
//! key and endpoint, and turns every new problem it finds into a log
//! warning and a Kubernetes Event on the Node at fault.
//!
//! Verbs used, and nothing more (deploy/rbac.yaml): nodes get, list, watch,
//! patch; events create. An Event is created once per distinct problem, by
//! the router on the Node at fault and by one cluster-wide reporter (no
//! patching of event series, which would need another verb).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use futures_util::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::nodes::{
    self, Directory, DirectorySettings, NodeFacts, Problem, ANN_ENDPOINT, ANN_KEY_CREATED,
    ANN_NEXT_PUBLIC_KEY, ANN_NODE_ADDRESSES, ANN_PUBLIC_KEY, ANN_UNDERLAY_MTU,
};
use super::{set_status, PeerSource, Request, SharedStatus, SourceTask, Update, Updates};
use crate::model::{unix_now, HeldKeyStatus, KubeStatus, Nets, OwnKeys, ProblemStatus, Snapshot};

/// Namespace Events about (cluster-scoped) Nodes go to, as kubelet does.
const EVENT_NAMESPACE: &str = "default";
/// The API server ends each watch after this long and the watcher starts
/// a new one; together with `READ_TIMEOUT` this bounds how long a silently
/// dead connection (a half-open TCP stream) can hide changes.
const WATCH_TIMEOUT_SECS: u32 = 60;
const READ_TIMEOUT: Duration = Duration::from_secs(90);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Shortest and longest wait between attempts to annotate the own Node.
const PUBLISH_RETRY_MIN: Duration = Duration::from_secs(1);
const PUBLISH_RETRY_MAX: Duration = Duration::from_secs(30);
/// How long the store may lag behind a successful patch of the own Node.
const PATCH_SETTLE: Duration = Duration::from_secs(5);
/// Whole Nodes per page of a listing: a relist of thousands of Nodes
/// (15 KB each with a kubelet's status) never holds more than a page.
const LIST_PAGE: u32 = 250;
/// Shortest and longest wait before listing or watching again after a
/// failure.
const FEED_RETRY_MIN: Duration = Duration::from_millis(500);
const FEED_RETRY_MAX: Duration = Duration::from_secs(30);

/// What the router tells the Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// This router's Node (`NODE_NAME` from the downward API).
    pub node_name: String,
    pub listen_port: u16,
    /// Published endpoint; default: the Node's InternalIP and `listen_port`.
    pub endpoint: Option<SocketAddr>,
    pub cluster_cidrs: Vec<IpNetwork>,
    pub persistent_keepalive: Option<u16>,
    /// Rebuild from the store this often even without a change.
    pub resync: Duration,
    /// This node's underlay MTU, published for the peers' path MTU.
    pub underlay_mtu: Option<u16>,
}

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("kubeconfig {path}: {source}")]
    Config {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes configuration (not in a pod, no $KUBECONFIG, no ~/.kube/config; give --kubeconfig, on a node kubelet's will do): {0}")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("building the Kubernetes client: {0}")]
    Build(#[source] kube::Error),
}

/// A client from `kubeconfig`, else from `$KUBECONFIG`/`~/.kube/config`,
/// else the in-cluster ServiceAccount.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let p = || path.display().to_string();
            let kc = Kubeconfig::read_from(path)
                .map_err(|source| ClientError::Read { path: p(), source })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Config { path: p(), source })?
        }
        None => Config::infer().await.map_err(ClientError::Infer)?,
    };
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(READ_TIMEOUT);
    // Every response body counted (`apibytes`): what the API server sends.
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(ClientError::Build)?
        .with_layer(&super::apibytes::CountLayer)
        .build())
}

/// An API error with what an operator needs to act on it: a missing verb
/// names the ClusterRole the router must be bound to.
pub fn explain(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "forbidden: {} (the router's ServiceAccount must be bound to the ClusterRole in \
             deploy/rbac.yaml: nodes get, list, watch, patch; events create)",
            s.message
        ),
        kube::Error::Api(s) => format!("{} ({} {})", s.message, s.code, s.reason),
        other => chain(other),
    }
}

/// An error and its causes, `a: b: c` ("client error (Connect): tcp
/// connect error: Connection refused"), so the root cause is in the log;
/// a cause whose text its parent already holds is not repeated.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = c.source();
    }
    out
}

fn explain_watch(e: &watcher::Error) -> String {
    match e {
        watcher::Error::InitialListFailed(k) => format!("listing Nodes: {}", explain(k)),
        watcher::Error::WatchStartFailed(k) => format!("watching Nodes: {}", explain(k)),
        watcher::Error::WatchFailed(k) => format!("watch of Nodes failed: {}", explain(k)),
        other => chain(other),
    }
}

/// Node objects as a peer source.
pub struct KubeSource {
    client: Client,
    settings: KubeSettings,
    keys: watch::Receiver<OwnKeys>,
}

impl KubeSource {
    /// A source for this router: `keys` are published on its Node (and
    /// published again whenever they change: a key rotation).
    pub fn new(client: Client, settings: KubeSettings, keys: watch::Receiver<OwnKeys>) -> Self {
        KubeSource {
            client,
            settings,
            keys,
        }
    }
}

impl PeerSource for KubeSource {
    fn kind(&self) -> &'static str {
        "kubernetes"
    }

    fn run(
        self: Box<Self>,
        updates: Updates,
        requests: mpsc::UnboundedReceiver<Request>,
        status: SharedStatus,
    ) -> SourceTask {
        let s = *self;
        Box::pin(run(s.client, s.settings, s.keys, updates, requests, status))
    }
}

/// What the directory feed tells the source's loop.
enum Feed {
    /// A whole listing (the first, or a relist after the version expired).
    Listed(Vec<NodeFacts>),
    /// A Node's metadata changed (or it appeared).
    Meta(Box<ObjectMeta>),
    /// A Node went.
    Deleted(String),
    /// A Node read whole (its spec was needed).
    Fetched(Box<NodeFacts>),
    /// The API server answered again.
    Reachable,
    /// Listing or watching failed: why (the feed retries by itself).
    Failed(String),
}

/// The directory feed: a paginated listing of whole Nodes (kept as facts),
/// then a metadata-only watch from its version, restarted from the last
/// version seen when it ends, and a relist only when that version is gone.
async fn feed(api: Api<Node>, tx: mpsc::UnboundedSender<Feed>) {
    let mut backoff = FEED_RETRY_MIN;
    'list: loop {
        let (facts, mut version) = match list_all(&api).await {
            Ok(l) => l,
            Err(e) => {
                if tx
                    .send(Feed::Failed(format!("listing Nodes: {}", explain(&e))))
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(FEED_RETRY_MAX);
                continue;
            }
        };
        backoff = FEED_RETRY_MIN;
        if tx.send(Feed::Listed(facts)).is_err() {
            return;
        }
        loop {
            let wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
            let stream = match api.watch_metadata(&wp, &version).await {
                Ok(s) => s,
                Err(e) => {
                    let gone = matches!(&e, kube::Error::Api(s) if s.code == 410);
                    if tx
                        .send(Feed::Failed(format!("watching Nodes: {}", explain(&e))))
                        .is_err()
                    {
                        return;
                    }
                    if gone {
                        continue 'list;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(FEED_RETRY_MAX);
                    continue;
                }
            };
            let mut stream = std::pin::pin!(stream);
            // The API server answered the watch.
            if tx.send(Feed::Reachable).is_err() {
                return;
            }
            let mut events = false;
            while let Some(ev) = stream.next().await {
                let sent = match ev {
                    Ok(WatchEvent::Added(m)) | Ok(WatchEvent::Modified(m)) => {
                        version = m.metadata.resource_version.clone().unwrap_or(version);
                        tx.send(Feed::Meta(Box::new(m.metadata)))
                    }
                    Ok(WatchEvent::Deleted(m)) => {
                        version = m.metadata.resource_version.clone().unwrap_or(version);
                        tx.send(Feed::Deleted(m.metadata.name.unwrap_or_default()))
                    }
                    Ok(WatchEvent::Bookmark(b)) => {
                        version = b.metadata.resource_version;
                        Ok(())
                    }
                    Ok(WatchEvent::Error(e)) if e.code == 410 => {
                        debug!("the watch's version expired; relisting Nodes");
                        continue 'list;
                    }
                    Ok(WatchEvent::Error(e)) => {
                        let _ = tx.send(Feed::Failed(format!(
                            "watch of Nodes: {} ({})",
                            e.message, e.code
                        )));
                        break;
                    }
                    Err(kube::Error::Api(s)) if s.code == 410 => {
                        debug!("the watch's version expired; relisting Nodes");
                        continue 'list;
                    }
                    Err(e) => {
                        let _ = tx.send(Feed::Failed(format!(
                            "watch of Nodes failed: {}",
                            explain(&e)
                        )));
                        break;
                    }
                };
                if sent.is_err() {
                    return;
                }
                events = true;
                backoff = FEED_RETRY_MIN;
            }
            // The server ended the watch (its timeout) or it broke: again
            // from the last version seen, after a breath if it broke.
            if !events {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(FEED_RETRY_MAX);
            }
        }
    }
}

/// Every Node, whole, a page at a time, kept only as facts; and the
/// listing's version, to watch from.
async fn list_all(api: &Api<Node>) -> Result<(Vec<NodeFacts>, String), kube::Error> {
    let mut facts = Vec::new();
    let mut lp = ListParams::default().limit(LIST_PAGE);
    let mut version = None;
    loop {
        let page = api.list(&lp).await?;
        version.get_or_insert_with(|| page.metadata.resource_version.clone().unwrap_or_default());
        facts.extend(page.items.iter().map(NodeFacts::from_node));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => lp = lp.continue_token(&c),
            None => break,
        }
    }
    Ok((facts, version.unwrap_or_default()))
}

/// Runs the source until the router is gone. Never returns an error: every
/// failure is logged, shown in `status`, and retried.
async fn run(
    client: Client,
    settings: KubeSettings,
    mut keys: watch::Receiver<OwnKeys>,
    tx: Updates,
    mut requests: mpsc::UnboundedReceiver<Request>,
    status: SharedStatus,
) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let events_api: Api<Event> = Api::namespaced(client, EVENT_NAMESPACE);
    let (feed_tx, mut feed_rx) = mpsc::unbounded_channel();
    tokio::spawn(feed(nodes_api.clone(), feed_tx.clone()));
    // This router's own Node, whole (one object: its status is needed).
    let own_stream = watcher(
        nodes_api.clone(),
        watcher::Config::default()
            .fields(&format!("metadata.name={}", settings.node_name))
            .timeout(WATCH_TIMEOUT_SECS),
    )
    .default_backoff();
    let mut own_stream = std::pin::pin!(own_stream);
    let mut resync = tokio::time::interval(settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let current = *keys.borrow_and_update();
    let mut st = SourceState {
        dir: Directory::new(DirectorySettings {
            own_name: settings.node_name.clone(),
            own_key: current.current,
            own_next_key: current.next,
            cluster_cidrs: settings.cluster_cidrs.clone(),
            persistent_keepalive: settings.persistent_keepalive,
        }),
        settings,
        keys: current,
        nodes_api,
        events_api,
        publish_at: None,
        publish_backoff: PUBLISH_RETRY_MIN,
        last_patch: None,
        said_missing: false,
        said_no_cidr: false,
        status,
        listed: false,
        pod_cidrs: None,
        fetching: HashSet::new(),
        feed: feed_tx,
        own_seen: false,
    };
    let name = st.settings.node_name.clone();
    st.set_status(|s| s.node_name = name);
    let mut failing = false;
    loop {
        let retry = st.publish_at;
        tokio::select! {
            ev = feed_rx.recv() => match ev {
                None => return,
                Some(Feed::Failed(msg)) => {
                    if !failing {
                        warn!(error = %msg, "Kubernetes API unreachable or refusing; keeping the last mesh, retrying with backoff");
                    }
                    failing = true;
                    st.set_status(|s| {
                        s.connected = false;
                        s.last_error = Some(msg);
                    });
                }
                Some(ev) => {
                    if std::mem::replace(&mut failing, false) {
                        info!("Kubernetes API reachable again");
                    }
                    st.set_status(|s| {
                        s.connected = true;
                        s.last_error = None;
                    });
                    st.on_feed(ev, &tx).await;
                }
            },
            ev = own_stream.next() => match ev {
                None => {
                    error!("the watch of this router's Node ended; no further updates of it");
                    return;
                }
                // Its version expired (an outage): the watcher lists it
                // again by itself.
                Some(Err(watcher::Error::WatchError(s))) if s.code == 410 => {
                    debug!("the own Node's watch version expired; relisting it");
                }
                Some(Err(e)) => {
                    let msg = explain_watch(&e);
                    if !failing {
                        warn!(error = %msg, "Kubernetes API unreachable or refusing; keeping the last mesh, retrying with backoff");
                    }
                    failing = true;
                    st.set_status(|s| {
                        s.connected = false;
                        s.last_error = Some(msg);
                    });
                }
                Some(Ok(ev)) => {
                    if std::mem::replace(&mut failing, false) {
                        info!("Kubernetes API reachable again");
                    }
                    st.set_status(|s| {
                        s.connected = true;
                        s.last_error = None;
                    });
                    st.on_own(ev, &tx).await
                }
            },
            _ = resync.tick() => st.publish_own().await,
            changed = keys.changed() => {
                if changed.is_err() {
                    // The router is gone.
                    return;
                }
                st.keys = *keys.borrow_and_update();
                let ch = st.dir.set_own_keys(st.keys.current, st.keys.next);
                st.changed(ch, &tx);
                // Published at once, not at the next resync.
                st.last_patch = None;
                st.publish_at = None;
                st.publish_own().await;
            }
            _ = sleep_until(retry) => st.publish_own().await,
            req = requests.recv() => match req {
                Some(Request::Reload) => {
                    info!("reload asked for: nothing to reload (Node objects are watched continuously)");
                }
                Some(Request::Event { reason, message }) => {
                    let own = st.settings.node_name.clone();
                    let uid = st.dir.facts(&own).and_then(|f| f.uid.clone());
                    st.emit(&own, uid, None, reason, message);
                }
                // The router is gone.
                None => return,
            },
        }
        if tx.is_closed() {
            return;
        }
    }
}

/// FNV-1a over `parts` (an Event's name from what it says).
fn fnv(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

struct SourceState {
    settings: KubeSettings,
    keys: OwnKeys,
    nodes_api: Api<Node>,
    events_api: Api<Event>,
    /// Every Node's facts and translation.
    dir: Directory,
    /// When to try annotating the own Node again after a failure.
    publish_at: Option<Instant>,
    publish_backoff: Duration,
    /// The annotations last patched successfully, and when: the store may
    /// not show them yet on the next check, so the same patch is not
    /// repeated until it had time to catch up.
    last_patch: Option<(BTreeMap<&'static str, Option<String>>, Instant)>,
    said_missing: bool,
    said_no_cidr: bool,
    status: SharedStatus,
    /// Whether a whole listing came yet (before it, nothing is published).
    listed: bool,
    /// This node's pod CIDRs as last handed to the router.
    pod_cidrs: Option<Vec<IpNetwork>>,
    /// Nodes being read whole right now.
    fetching: HashSet<String>,
    /// Where a read of a whole Node reports back.
    feed: mpsc::UnboundedSender<Feed>,
    /// Whether the own Node's watch has listed it (or found it missing).
    own_seen: bool,
}

impl SourceState {
    fn set_status(&self, f: impl FnOnce(&mut KubeStatus)) {
        set_status(&self.status, |s| {
            let k = s.kubernetes.get_or_insert_with(Default::default);
            k.received_bytes = super::apibytes::received();
            f(k)
        });
    }

    /// One event of the directory feed.
    async fn on_feed(&mut self, ev: Feed, tx: &Updates) {
        let own = self.settings.node_name.clone();
        match ev {
            Feed::Listed(all) => {
                let ch = self.dir.replace_all(all);
                self.listed = true;
                self.set_status(|s| {
                    s.watch_events += 1;
                    s.last_sync_unix = Some(unix_now());
                });
                info!(
                    nodes = self.dir.len(),
                    peers = self.dir.peers().len(),
                    "Nodes listed"
                );
                self.report(&ch);
                self.publish_full(tx);
                self.fetch_missing_specs();
                self.publish_own().await;
            }
            Feed::Meta(meta) => {
                let name = meta.name.clone().unwrap_or_default();
                // The own Node comes whole, through its own watch.
                if name == own {
                    self.set_status(|s| s.watch_events += 1);
                    return;
                }
                let facts = NodeFacts::from_metadata(&meta, self.dir.facts(&name));
                if facts.needs_spec() {
                    self.fetch(&name);
                }
                let ch = self.dir.upsert(facts);
                self.counted(ch, tx);
            }
            Feed::Deleted(name) => {
                if name == own {
                    self.set_status(|s| s.watch_events += 1);
                    return;
                }
                let ch = self.dir.remove(&name);
                self.counted(ch, tx);
            }
            Feed::Fetched(facts) => {
                self.fetching.remove(&facts.name);
                let ch = self.dir.upsert(*facts);
                self.changed(ch, tx);
            }
            Feed::Reachable | Feed::Failed(_) => {}
        }
    }

    /// A watch event's changes, counted (events, and events that changed
    /// something the mesh reads).
    fn counted(&mut self, ch: nodes::Changes, tx: &Updates) {
        let effect = !ch.is_empty() || ch.translated > 0;
        self.set_status(|s| {
            s.watch_events += 1;
            if effect {
                s.watch_events_changed += 1;
            }
        });
        self.changed(ch, tx);
    }

    /// One event of the own Node's watch.
    async fn on_own(&mut self, ev: watcher::Event<Node>, tx: &Updates) {
        match ev {
            watcher::Event::Init => self.own_seen = false,
            watcher::Event::InitApply(n) | watcher::Event::Apply(n) => {
                self.own_seen = true;
                let ch = self.dir.upsert(NodeFacts::from_node(&n));
                self.changed(ch, tx);
            }
            watcher::Event::InitDone => {
                if !std::mem::replace(&mut self.own_seen, true) {
                    let ch = self.dir.remove(&self.settings.node_name.clone());
                    self.changed(ch, tx);
                }
            }
            watcher::Event::Delete(_) => {
                let ch = self.dir.remove(&self.settings.node_name.clone());
                self.changed(ch, tx);
            }
        }
        self.set_status(|s| s.watch_events += 1);
        self.publish_own().await;
    }

    /// Reads Node `name` whole, in the background (its spec is needed).
    fn fetch(&mut self, name: &str) {
        if !self.fetching.insert(name.to_string()) {
            return;
        }
        let (api, tx, name) = (self.nodes_api.clone(), self.feed.clone(), name.to_string());
        tokio::spawn(async move {
            match api.get_opt(&name).await {
                Ok(Some(n)) => {
                    let _ = tx.send(Feed::Fetched(Box::new(NodeFacts::from_node(&n))));
                }
                // Gone meanwhile: its Deleted event follows.
                Ok(None) => {}
                Err(e) => {
                    warn!(node = %name, error = %explain(&e), "reading a Node's spec failed; again at its next change or the next listing");
                    let _ = tx.send(Feed::Failed(format!(
                        "reading Node {name}: {}",
                        explain(&e)
                    )));
                }
            }
        });
    }

    /// After a listing: every Node still missing its spec is read whole.
    fn fetch_missing_specs(&mut self) {
        let missing: Vec<String> = self
            .dir
            .names()
            .filter(|n| self.dir.facts(n).is_some_and(|f| !f.spec_read))
            .cloned()
            .collect();
        for n in missing {
            self.fetch(&n);
        }
    }

    /// Hands the router what changed, and reports new and gone problems.
    fn changed(&mut self, ch: nodes::Changes, tx: &Updates) {
        if ch.is_empty() {
            return;
        }
        self.report(&ch);
        if !self.listed {
            return;
        }
        let pod_cidrs = self.own_pod_cidrs();
        let pod_cidrs = (self.pod_cidrs.as_ref() != Some(&pod_cidrs)).then_some(pod_cidrs);
        if ch.peers.is_empty() && pod_cidrs.is_none() {
            return;
        }
        if let Some(c) = &pod_cidrs {
            self.pod_cidrs = Some(c.clone());
        }
        self.set_status(|s| s.mesh_updates += 1);
        let _ = tx.send(Update::Changes {
            peers: ch.peers,
            pod_cidrs,
        });
    }

    /// The whole mesh, to the router (after a listing).
    fn publish_full(&mut self, tx: &Updates) {
        let pod_cidrs = self.own_pod_cidrs();
        self.pod_cidrs = Some(pod_cidrs.clone());
        self.set_status(|s| s.mesh_updates += 1);
        let _ = tx.send(Update::Full(Snapshot {
            mesh: self.dir.mesh(),
            pod_cidrs,
        }));
    }

    /// This node's pod CIDRs, saying once when there are none.
    fn own_pod_cidrs(&mut self) -> Vec<IpNetwork> {
        match self.dir.own() {
            None => {
                if !self.said_missing {
                    warn!(node = %self.settings.node_name, "this router's Node does not exist (yet); serving the other Nodes and waiting for it");
                    self.said_missing = true;
                }
                Vec::new()
            }
            Some(own) => {
                self.said_missing = false;
                if own.pod_cidrs.is_empty() && !self.said_no_cidr {
                    warn!(node = %self.settings.node_name, "this Node has no podCIDR yet; pods cannot be attached until it is allocated (kube-controller-manager --allocate-node-cidrs)");
                    self.said_no_cidr = true;
                } else if !own.pod_cidrs.is_empty() && self.said_no_cidr {
                    info!(node = %self.settings.node_name, pod_cidrs = %Nets(&own.pod_cidrs), "podCIDR assigned");
                    self.said_no_cidr = false;
                }
                own.pod_cidrs.clone()
            }
        }
    }

    /// New problems: a warning in every router's log and an Event, from
    /// the router on the Node at fault and from one reporter for the
    /// whole cluster (the first name among the healthy Nodes), so a bad
    /// Node gets at most two Events, not one per node in the cluster. And
    /// the status's lists.
    fn report(&mut self, ch: &nodes::Changes) {
        let own = self.settings.node_name.clone();
        let reporter = self
            .dir
            .peers()
            .keys()
            .next()
            .map(String::as_str)
            .filter(|p| *p < own.as_str())
            .unwrap_or(own.as_str())
            .to_string();
        let gone: BTreeSet<&Problem> = ch.gone_problems.iter().collect();
        for p in &ch.new_problems {
            if gone.contains(p) {
                continue;
            }
            warn!(node = %p.node, field = %p.field, reason = p.reason, "{}; skipped, the rest of the mesh is unaffected", p.message);
            if p.node == own || reporter == own {
                let uid = self.dir.facts(&p.node).and_then(|f| f.uid.clone());
                self.emit(
                    &p.node,
                    uid,
                    Some(p.field.clone()),
                    p.reason,
                    format!("{}: {}", p.field, p.message),
                );
            }
        }
        let new: BTreeSet<&Problem> = ch.new_problems.iter().collect();
        for p in &ch.gone_problems {
            if !new.contains(p) {
                info!(node = %p.node, field = %p.field, reason = p.reason, "problem resolved");
            }
        }
        let problems = self.dir.problems();
        let pending = self.dir.pending();
        let nodes = self.dir.len();
        let announced = self.dir.own().and_then(|o| o.next_public_key.clone());
        let held: Vec<HeldKeyStatus> = self
            .dir
            .held()
            .map(|h| HeldKeyStatus {
                node: h.node.clone(),
                using: h.using.to_base64(),
                shown: h.shown.to_base64(),
            })
            .collect();
        let holds = self.dir.holds();
        self.set_status(|s| {
            s.announced_next_key = announced;
            s.nodes = nodes;
            s.held_keys = held;
            s.key_holds = holds;
            s.problems = problems
                .iter()
                .map(|p| ProblemStatus {
                    node: p.node.clone(),
                    field: p.field.clone(),
                    reason: p.reason.to_string(),
                    message: p.message.clone(),
                })
                .collect();
            s.pending = pending
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
        });
    }

    /// Keeps the own Node's annotations what this router wants, once it
    /// has seen its Node.
    async fn publish_own(&mut self) {
        if let Some(own) = self.dir.own().cloned() {
            self.publish(&own).await;
        }
    }

    /// Keeps the own Node's `tunmesh.io/public-key` and `tunmesh.io/endpoint`
    /// what this router wants. Patches only when they differ, so a resync
    /// costs nothing; on failure retries with backoff.
    async fn publish(&mut self, own: &nodes::OwnNode) {
        if self.publish_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let key = self.keys.current.to_base64();
        let next = self.keys.next.map(|k| k.to_base64());
        let endpoint = nodes::own_endpoint(self.settings.endpoint, own, self.settings.listen_port);
        // `None` removes the annotation (a JSON merge patch's null).
        let mut want: BTreeMap<&'static str, Option<String>> = BTreeMap::new();
        // A key the Node does not show yet is announced as its next key
        // first, and made current once the API shows the announcement:
        // peers hold back a key that replaces another unannounced (see
        // nodes::repin), and a reinstalled node's new key is no exception.
        let mut next = next;
        if own.public_key.as_deref() != Some(key.as_str()) {
            if own.next_public_key.as_deref() == Some(key.as_str()) {
                want.insert(ANN_PUBLIC_KEY, Some(key));
            } else {
                next = Some(key);
            }
        }
        if own.next_public_key != next {
            want.insert(ANN_NEXT_PUBLIC_KEY, next);
        }
        let created = self
            .keys
            .created_unix
            .and_then(|t| k8s_openapi::jiff::Timestamp::from_second(t as i64).ok())
            .map(|t| t.to_string());
        if created.is_some() && own.key_created != created {
            want.insert(ANN_KEY_CREATED, created);
        }
        let mtu = self.settings.underlay_mtu.map(|m| m.to_string());
        if mtu.is_some() && own.underlay_mtu != mtu {
            want.insert(ANN_UNDERLAY_MTU, mtu);
        }
        // Its InternalIPs, for the peers (who read no Node's status).
        let ips: Vec<String> = own.internal_ips.iter().map(|ip| ip.to_string()).collect();
        let ips = (!ips.is_empty()).then(|| ips.join(","));
        if ips.is_some() && own.node_addresses != ips {
            want.insert(ANN_NODE_ADDRESSES, ips);
        }
        match endpoint {
            Some(e) if own.endpoint.as_deref() != Some(e.to_string().as_str()) => {
                want.insert(ANN_ENDPOINT, Some(e.to_string()));
            }
            Some(_) => {}
            None if own.force_endpoint.is_none() => {
                warn!(node = %self.settings.node_name, "no endpoint to publish: the Node has no InternalIP in status.addresses; set --endpoint or the tunmesh.io/force-endpoint annotation");
            }
            None => {}
        }
        self.set_status(|s| s.published_endpoint = endpoint.map(|e| e.to_string()));
        if want.is_empty() {
            self.publish_at = None;
            self.publish_backoff = PUBLISH_RETRY_MIN;
            self.last_patch = None;
            return;
        }
        if let Some((done, at)) = &self.last_patch {
            if *done == want && at.elapsed() < PATCH_SETTLE {
                return;
            }
        }
        let patch = serde_json::json!({ "metadata": { "annotations": want } });
        match self
            .nodes_api
            .patch(
                &self.settings.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                info!(node = %self.settings.node_name, annotations = ?want, "published on own Node");
                self.publish_at = None;
                self.publish_backoff = PUBLISH_RETRY_MIN;
                self.last_patch = Some((want, Instant::now()));
            }
            Err(e) => {
                error!(node = %self.settings.node_name, error = %explain(&e), retry_in = ?self.publish_backoff,
                       "annotating own Node failed; peers cannot reach this node until it succeeds");
                self.set_status(|s| s.last_error = Some(format!("patching Node: {}", explain(&e))));
                self.publish_at = Some(Instant::now() + self.publish_backoff);
                self.publish_backoff = (self.publish_backoff * 2).min(PUBLISH_RETRY_MAX);
            }
        }
    }

    /// Records a Warning Event on Node `node`, in the background. An Event
    /// about a field (a problem) is named after it: the router on the Node
    /// at fault and the cluster's reporter make the same one, and the API
    /// server keeps the first (AlreadyExists for the other).
    fn emit(
        &self,
        node: &str,
        uid: Option<String>,
        field: Option<String>,
        reason: &'static str,
        message: String,
    ) {
        let (name, generate_name) = match &field {
            Some(f) => (
                Some(format!(
                    "{node}.tunmesh.{:016x}",
                    fnv(&[reason, f, &message])
                )),
                None,
            ),
            None => (None, Some(format!("{node}.tunmesh."))),
        };
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let ev = Event {
            metadata: ObjectMeta {
                name,
                generate_name,
                namespace: Some(EVENT_NAMESPACE.into()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_string()),
                uid,
                field_path: field,
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some("tunmesh-router".into()),
                host: Some(self.settings.node_name.clone()),
            }),
            reporting_component: Some("tunmesh.io/router".into()),
            reporting_instance: Some(self.settings.node_name.clone()),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            count: Some(1),
            ..Default::default()
        };
        let api = self.events_api.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            match api.create(&PostParams::default(), &ev).await {
                Ok(_) => {}
                // Made already (by the other reporter).
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => warn!(%node, error = %explain(&e), "recording an Event failed"),
            }
        });
    }
}
