//! The Kubernetes source: Node objects are the directory.
//!
//! One task watches all Nodes with a reflector. On every change, and on a
//! periodic resync, it rebuilds the whole desired mesh from the store
//! (`nodes::translate`, level-triggered, never event-diffed) and hands it
//! to the router through a `watch` channel. On the way it keeps this
//! router's own Node annotated with its public key and endpoint, and turns
//! every new problem it finds into a log warning and a Kubernetes Event on
//! the Node at fault.
//!
//! When the API server goes away the store keeps the last listing, so the
//! last mesh stays in place; the watcher reconnects with backoff and relists,
//! and whatever changed meanwhile is picked up by the rebuild that follows.
//!
//! Verbs used, and nothing more (deploy/rbac.yaml): nodes get, list, watch,
//! patch; events create. An Event is created once per distinct problem, by
//! the router on the Node at fault and by one cluster-wide reporter (no
//! patching of event series, which would need another verb).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Event, EventSource, Node, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Config};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::nodes::{
    self, Problem, TranslateSettings, ANN_ENDPOINT, ANN_KEY_CREATED, ANN_NEXT_PUBLIC_KEY,
    ANN_PUBLIC_KEY, ANN_UNDERLAY_MTU,
};
use super::{publish, set_status, PeerSource, Request, SharedStatus, SourceTask, Updates};
use crate::model::{unix_now, KubeStatus, Nets, OwnKeys, ProblemStatus, Snapshot};

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
    Client::try_from(config).map_err(ClientError::Build)
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
    let (store, writer) = reflector::store::<Node>();
    let stream = watcher(
        nodes_api.clone(),
        watcher::Config::default().timeout(WATCH_TIMEOUT_SECS),
    )
    .default_backoff()
    .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut resync = tokio::time::interval(settings.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut st = SourceState {
        settings,
        keys: *keys.borrow_and_update(),
        nodes_api,
        events_api,
        reported: BTreeSet::new(),
        publish_at: None,
        publish_backoff: PUBLISH_RETRY_MIN,
        last_patch: None,
        said_missing: false,
        said_no_cidr: false,
        status,
    };
    let name = st.settings.node_name.clone();
    st.set_status(|s| s.node_name = name);
    let mut ready = false;
    let mut failing = false;
    loop {
        let retry = st.publish_at;
        let rebuild = tokio::select! {
            ev = stream.next() => match ev {
                None => {
                    error!("the Node watch ended; no further mesh updates");
                    return;
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
                    false
                }
                Some(Ok(ev)) => {
                    if failing {
                        info!("Kubernetes API reachable again; relisting Nodes");
                        failing = false;
                    }
                    st.set_status(|s| {
                        s.connected = true;
                        s.last_error = None;
                    });
                    match ev {
                        watcher::Event::InitDone => {
                            ready = true;
                            true
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => ready,
                        watcher::Event::Init | watcher::Event::InitApply(_) => false,
                    }
                }
            },
            _ = resync.tick() => ready,
            changed = keys.changed() => {
                if changed.is_err() {
                    // The router is gone.
                    return;
                }
                st.keys = *keys.borrow_and_update();
                // Published at once, not at the next resync.
                st.last_patch = None;
                st.publish_at = None;
                ready
            }
            _ = sleep_until(retry) => ready,
            req = requests.recv() => match req {
                Some(Request::Reload) => {
                    info!("reload asked for: nothing to reload (Node objects are watched continuously)");
                    false
                }
                Some(Request::Event { reason, message }) => {
                    let own = st.settings.node_name.clone();
                    let uid = store
                        .state()
                        .iter()
                        .find(|n| n.metadata.name.as_deref() == Some(own.as_str()))
                        .and_then(|n| n.metadata.uid.clone());
                    st.emit(&own, uid, None, reason, message);
                    false
                }
                // The router is gone.
                None => return,
            },
        };
        if rebuild {
            st.rebuild(&store, &tx).await;
        }
        if tx.is_closed() {
            return;
        }
    }
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
    /// Problems already logged and recorded as Events.
    reported: BTreeSet<Problem>,
    /// When to try annotating the own Node again after a failure.
    publish_at: Option<Instant>,
    publish_backoff: Duration,
    /// The annotations last patched successfully, and when: the store may
    /// not show them yet on the next rebuild, so the same patch is not
    /// repeated until the store had time to catch up.
    last_patch: Option<(BTreeMap<&'static str, Option<String>>, Instant)>,
    said_missing: bool,
    said_no_cidr: bool,
    status: SharedStatus,
}

impl SourceState {
    fn set_status(&self, f: impl FnOnce(&mut KubeStatus)) {
        set_status(&self.status, |s| {
            f(s.kubernetes.get_or_insert_with(Default::default))
        });
    }

    async fn rebuild(&mut self, store: &Store<Node>, tx: &Updates) {
        let all = store.state();
        let t = nodes::translate(
            all.iter().map(|n| n.as_ref()),
            &TranslateSettings {
                own_name: &self.settings.node_name,
                own_key: &self.keys.current,
                own_next_key: self.keys.next.as_ref(),
                cluster_cidrs: &self.settings.cluster_cidrs,
                persistent_keepalive: self.settings.persistent_keepalive,
            },
        );

        // Every router logs every problem; Events come from the router on
        // the Node at fault and from one reporter for the whole cluster
        // (the first name among the healthy Nodes), so a bad Node gets at
        // most two Events, not one per node in the cluster.
        let own = self.settings.node_name.as_str();
        let reporter = t
            .mesh
            .peers
            .iter()
            .map(|p| p.name.as_str())
            .chain(std::iter::once(own))
            .min()
            .unwrap_or(own);
        let now: BTreeSet<Problem> = t.problems.iter().cloned().collect();
        for p in now.difference(&self.reported) {
            warn!(node = %p.node, field = %p.field, reason = p.reason, "{}; skipped, the rest of the mesh is unaffected", p.message);
            if p.node == own || reporter == own {
                self.record_event(p, &all);
            }
        }
        for p in self.reported.difference(&now) {
            info!(node = %p.node, field = %p.field, reason = p.reason, "problem resolved");
        }
        self.reported = now;

        let pod_cidrs = match &t.own {
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
        };

        self.set_status(|s| {
            s.announced_next_key = t.own.as_ref().and_then(|o| o.next_public_key.clone());
            s.last_sync_unix = Some(unix_now());
            s.nodes = all.len();
            s.problems = t
                .problems
                .iter()
                .map(|p| ProblemStatus {
                    node: p.node.clone(),
                    field: p.field.clone(),
                    reason: p.reason.to_string(),
                    message: p.message.clone(),
                })
                .collect();
            s.pending = t
                .pending
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect();
        });
        let snap = Snapshot {
            mesh: t.mesh.clone(),
            pod_cidrs,
        };
        publish(tx, snap);
        // After the mesh is handed over: a slow or failing API call here
        // never delays it.
        if let Some(own) = &t.own {
            self.publish(own).await;
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
        if own.public_key.as_deref() != Some(key.as_str()) {
            want.insert(ANN_PUBLIC_KEY, Some(key));
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

    /// Records a Warning Event on the Node at fault, in the background so an
    /// unreachable API server never holds up the mesh.
    fn record_event(&self, p: &Problem, all: &[Arc<Node>]) {
        let uid = all
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(p.node.as_str()))
            .and_then(|n| n.metadata.uid.clone());
        self.emit(
            &p.node,
            uid,
            Some(p.field.clone()),
            p.reason,
            format!("{}: {}", p.field, p.message),
        );
    }

    /// Records a Warning Event on Node `node`, in the background.
    fn emit(
        &self,
        node: &str,
        uid: Option<String>,
        field: Option<String>,
        reason: &'static str,
        message: String,
    ) {
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        let ev = Event {
            metadata: ObjectMeta {
                generate_name: Some(format!("{node}.tunmesh.")),
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
            if let Err(e) = api.create(&PostParams::default(), &ev).await {
                warn!(%node, error = %explain(&e), "recording an Event failed");
            }
        });
    }
}
