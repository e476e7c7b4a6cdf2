//! Hollow Nodes, as kubemark and KWOK make them: Node objects with no
//! kubelet behind them, created in the lab's API server with what a real
//! kubelet's Node carries (labels, a status with addresses, conditions,
//! node info and a list of images) and what a tunmesh router would have
//! published (a key, an endpoint), and driven from here: status reports
//! at a kubelet's pace, mesh changes, deletes and adds.
//!
//! Everything runs through the API server in the control plane's
//! namespace, with the lab's admin credentials (a thread of its own in that
//! namespace, with a single-threaded runtime: sockets made there stay in it).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;
use tunmesh_keygen::PrivateKey;

use crate::controlplane::ControlPlane;
use crate::netns;

/// The address every hollow Node's endpoint is at (a port each), on the
/// lab's underlay: the responder answers there, or nobody does.
pub const ENDPOINT_IP: &str = "172.28.0.250";
/// Hollow Node `i`'s WireGuard port there.
pub fn endpoint_port(i: usize) -> u16 {
    20000 + i as u16
}
/// Hollow pod CIDRs: a /24 each in 10.128.0.0/9 and a /64 each in the
/// upper half of the lab's IPv6 cluster CIDR, clear of the real nodes'.
pub const CLUSTER_V4: &str = "10.128.0.0/9";

pub fn pod_cidr_v4(i: usize) -> String {
    format!("10.{}.{}.0/24", 128 + i / 256, i % 256)
}

pub fn pod_cidr_v6(i: usize) -> String {
    format!("fd00:10:244:{:x}::/64", 0x8000 + i)
}

/// The first address of hollow Node `i`'s IPv4 pod CIDR.
pub fn gateway_v4(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(10, (128 + i / 256) as u8, (i % 256) as u8, 1)
}

/// Hollow Node `i`'s name: after the real nodes' (`node-N`) by name, as
/// the cluster-wide reporter of problems is the first healthy Node by name
/// and must be one with a router.
pub fn name(i: usize) -> String {
    format!("worker-{i:05}")
}

/// A hollow Node and the key it publishes.
pub struct Hollow {
    pub index: usize,
    pub key: PrivateKey,
}

impl Hollow {
    pub fn new(index: usize) -> Hollow {
        Hollow {
            index,
            key: PrivateKey::generate(),
        }
    }

    /// The Node object: what a kubelet registers and reports (about 9 KB
    /// of status with `images` images), and tunmesh's annotations.
    pub fn object(&self, images: usize) -> Node {
        let i = self.index;
        let name = name(i);
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let images: Vec<serde_json::Value> = (0..images)
            .map(|k| {
                json!({
                    "names": [
                        format!("registry.example.com/team-{k}/service-{k}@sha256:{:064x}", k * 7919 + i),
                        format!("registry.example.com/team-{k}/service-{k}:v1.{k}.{}", i % 97),
                    ],
                    "sizeBytes": 20_000_000 + k * 1_234_567,
                })
            })
            .collect();
        let v = json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/arch": "amd64",
                    "kubernetes.io/os": "linux",
                    "beta.kubernetes.io/arch": "amd64",
                    "beta.kubernetes.io/os": "linux",
                    "node.kubernetes.io/instance-type": "m6i.2xlarge",
                    "topology.kubernetes.io/region": "lab-1",
                    "topology.kubernetes.io/zone": format!("lab-1{}", ["a", "b", "c"][i % 3]),
                    "tunmesh.io/hollow": "true",
                },
                "annotations": {
                    "node.alpha.kubernetes.io/ttl": "0",
                    "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                    "tunmesh.io/public-key": self.key.public_key().to_base64(),
                    "tunmesh.io/endpoint": format!("{ENDPOINT_IP}:{}", endpoint_port(i)),
                    "tunmesh.io/public-key-created": now,
                    "tunmesh.io/underlay-mtu": "1500",
                },
            },
            "spec": {
                "podCIDR": pod_cidr_v4(i),
                "podCIDRs": [pod_cidr_v4(i), pod_cidr_v6(i)],
            },
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": ENDPOINT_IP},
                    {"type": "Hostname", "address": name},
                ],
                "conditions": conditions(&now),
                "capacity": {"cpu": "8", "memory": "32601476Ki", "pods": "110", "ephemeral-storage": "263174212Ki"},
                "allocatable": {"cpu": "7910m", "memory": "31582212Ki", "pods": "110", "ephemeral-storage": "242541353378"},
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": format!("{:032x}", i * 104729),
                    "systemUUID": format!("ec2{:029x}", i),
                    "bootID": format!("{:08x}-0000-4000-8000-{:012x}", i, i * 31),
                    "kernelVersion": "6.1.0-28-cloud-amd64",
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "containerRuntimeVersion": "containerd://1.7.24",
                    "kubeletVersion": "v1.37.2",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
                "images": images,
            },
        });
        // NB: built from constants of the right shape.
        serde_json::from_value(v).unwrap_or_default()
    }
}

/// The four conditions a kubelet reports, heartbeat at `now`.
fn conditions(now: &str) -> serde_json::Value {
    let c = |t: &str, s: &str, reason: &str, msg: &str| {
        json!({"type": t, "status": s, "lastHeartbeatTime": now, "lastTransitionTime": "2026-01-01T00:00:00Z",
               "reason": reason, "message": msg})
    };
    json!([
        c(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available"
        ),
        c(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure"
        ),
        c(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available"
        ),
        c(
            "Ready",
            "True",
            "KubeletReady",
            "kubelet is posting ready status"
        ),
    ])
}

/// A client of the lab's API server as its admin, made and used on a
/// thread in the control plane's namespace.
#[derive(Clone)]
pub struct Admin {
    ns: String,
    kubeconfig: std::path::PathBuf,
}

impl Admin {
    pub fn new(cp: &ControlPlane) -> Admin {
        Admin {
            ns: cp.ns.clone(),
            kubeconfig: cp.admin_kubeconfig(),
        }
    }

    /// Runs `f` with a Node API on a thread in the control plane's
    /// namespace, to completion.
    pub fn run<T: Send + 'static, F>(
        &self,
        f: impl FnOnce(Api<Node>) -> F + Send + 'static,
    ) -> Result<T>
    where
        F: std::future::Future<Output = Result<T>>,
    {
        let kc = self.kubeconfig.clone();
        netns::in_netns(&self.ns, move || -> Result<T> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let cfg = Kubeconfig::read_from(&kc)?;
                let config =
                    kube::Config::from_custom_kubeconfig(cfg, &KubeConfigOptions::default())
                        .await?;
                let client = Client::try_from(config)?;
                f(Api::all(client)).await
            })
        })?
    }
}

/// Creates every hollow Node, 32 at a time; how long it took.
pub async fn create_all(api: Api<Node>, nodes: Vec<Node>) -> Result<Duration> {
    let t = Instant::now();
    futures_util::stream::iter(nodes)
        .map(|n| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &n)
                    .await
                    .with_context(|| format!("creating {:?}", n.metadata.name))
            }
        })
        .buffer_unordered(32)
        .try_for_each(|_| async { Ok(()) })
        .await?;
    Ok(t.elapsed())
}

/// Status reports as kubelets send them (a new heartbeat in every
/// condition: nothing tunmesh reads), `per_second` of them spread evenly
/// over the hollow Nodes `names`, for `seconds`. Returns how many went.
pub async fn status_churn(
    api: Api<Node>,
    names: Vec<String>,
    per_second: f64,
    seconds: f64,
) -> Result<u64> {
    use k8s_openapi::jiff::Timestamp;
    let start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / per_second.max(0.001));
    let mut sent = 0u64;
    let mut k = 0usize;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    // NB: the API server keeps whole seconds of a heartbeat, and a write
    // that changes nothing is no event: a report in the second a Node was
    // made (or last reported) would be lost to the count. Each Node's
    // heartbeat is a second past its last, the first past the second this
    // began in.
    let mut last = vec![Timestamp::now().as_second(); names.len()];
    while start.elapsed().as_secs_f64() < seconds && !names.is_empty() {
        tick.tick().await;
        let i = k % names.len();
        let n = &names[i];
        k += 1;
        let second = Timestamp::now().as_second().max(last[i] + 1);
        last[i] = second;
        let now = Timestamp::from_second(second)
            .with_context(|| format!("a heartbeat at second {second}"))?
            .to_string();
        let patch = json!({"status": {"conditions": conditions(&now)}});
        api.patch_status(n, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("status of {n}"))?;
        sent += 1;
    }
    Ok(sent)
}

/// One mesh change, made through the API server.
#[derive(Debug, Clone)]
pub enum Change {
    /// The Node's endpoint moves to another port.
    EndpointMoved {
        index: usize,
        port: u16,
    },
    /// The Node announces its next key (the peers take it at once).
    KeyAnnounced {
        index: usize,
        next: String,
    },
    Deleted {
        index: usize,
    },
    Added {
        node: Box<Node>,
    },
}

impl Change {
    pub fn kind(&self) -> &'static str {
        match self {
            Change::EndpointMoved { .. } => "endpoint moved",
            Change::KeyAnnounced { .. } => "key rotated (next key announced)",
            Change::Deleted { .. } => "Node deleted",
            Change::Added { .. } => "Node added",
        }
    }
}

/// What a router's data plane (its WireGuard API's peers) shows once a
/// change landed.
pub type Landed = Box<dyn Fn(&BTreeMap<String, super::UapiPeer>) -> bool>;

/// The test that `change` landed, for hollow Nodes `hollows` (an added
/// one last among them).
pub fn landed(change: &Change, hollows: &[Hollow]) -> Result<Landed> {
    let key = |i: usize| -> Result<String> {
        let h = hollows
            .iter()
            .find(|h| h.index == i)
            .with_context(|| format!("no hollow Node {i}"))?;
        Ok(super::hex(&h.key.public_key()))
    };
    Ok(match change {
        Change::EndpointMoved { index, port } => {
            let (k, want) = (key(*index)?, format!("{ENDPOINT_IP}:{port}"));
            Box::new(move |p| p.get(&k).is_some_and(|e| e.endpoint == want))
        }
        Change::KeyAnnounced { index, next } => {
            let old = key(*index)?;
            let new = super::hex(&tunmesh_keygen::PublicKey::from_base64(next)?);
            Box::new(move |p| p.contains_key(&new) && !p.contains_key(&old))
        }
        Change::Deleted { index } => {
            let k = key(*index)?;
            Box::new(move |p| !p.contains_key(&k))
        }
        Change::Added { .. } => {
            let h = hollows.last().context("the added Node")?;
            let k = super::hex(&h.key.public_key());
            Box::new(move |p| p.contains_key(&k))
        }
    })
}

/// Makes `change`; when the API server accepted it.
pub async fn apply(api: &Api<Node>, change: &Change) -> Result<Instant> {
    let pp = PatchParams::default();
    match change {
        Change::EndpointMoved { index, port } => {
            let p = json!({"metadata": {"annotations": {"tunmesh.io/endpoint": format!("{ENDPOINT_IP}:{port}")}}});
            api.patch(&name(*index), &pp, &Patch::Merge(&p)).await?;
        }
        Change::KeyAnnounced { index, next } => {
            let p = json!({"metadata": {"annotations": {"tunmesh.io/next-public-key": next}}});
            api.patch(&name(*index), &pp, &Patch::Merge(&p)).await?;
        }
        Change::Deleted { index } => {
            api.delete(&name(*index), &DeleteParams::default()).await?;
        }
        Change::Added { node } => {
            api.create(&PostParams::default(), node).await?;
        }
    }
    Ok(Instant::now())
}

/// The API server's watch figures for Nodes: events and bytes sent to
/// watchers so far, and how many watchers there are.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchCost {
    pub events: f64,
    pub bytes: f64,
    pub watchers: f64,
}

/// Reads `/metrics` of the API server (`apiserver_watch_events_total`,
/// `apiserver_watch_events_sizes`, `apiserver_registered_watchers`) for
/// Nodes.
pub fn watch_cost(cp: &ControlPlane) -> Result<WatchCost> {
    let text = cp.kubectl(&["get", "--raw", "/metrics"])?;
    let mut c = WatchCost::default();
    for l in text.lines() {
        let nodes = l.contains("resource=\"nodes\"") || l.contains("kind=\"Node\"");
        if !nodes || l.starts_with('#') {
            continue;
        }
        let v: f64 = l
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if l.starts_with("apiserver_watch_events_total") {
            c.events += v;
        } else if l.starts_with("apiserver_watch_events_sizes_sum") {
            c.bytes += v;
        } else if l.starts_with("apiserver_registered_watchers") {
            c.watchers += v;
        }
    }
    Ok(c)
}

/// The size of hollow Node `i` as the API server serves it whole (what a
/// watch of whole Nodes sends per event), in bytes.
pub fn object_bytes(cp: &ControlPlane, i: usize) -> Result<usize> {
    Ok(cp.kubectl(&["get", "node", &name(i), "-o", "json"])?.len())
}

/// Annotations of a Node, by key (for checks).
pub fn annotations(n: &Node) -> BTreeMap<String, String> {
    n.metadata.annotations.clone().unwrap_or_default()
}
