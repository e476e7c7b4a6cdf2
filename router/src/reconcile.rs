//! The reconciler: applies what the source wants (a whole `Snapshot`, or
//! the peers that changed) to the three places it lives, in order: the data
//! plane's peers (a minimal diff that keeps unchanged sessions), the host's
//! routes through the TUN device, and, when this node's pod CIDRs changed,
//! the gateway addresses on the TUN device and the files the CNI plugin
//! reads (node.json, the conflist). It keeps the desired mesh by peer, so a
//! change costs the peers it names; the routes are looked at only when a
//! changed peer has a prefix the cluster CIDRs do not cover.
//!
//! Each place is behind a seam (`MeshApplier`, `HostApplier`, `CniFiles`)
//! so the order and the failure handling are tested over fakes; the real
//! ones are the `Dataplane`, `hostnet::TunLink` and `CniStateFiles`. Every
//! step is idempotent: applying the same snapshot twice changes nothing the
//! second time, and a failed apply is simply applied again later.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use tracing::{info, instrument};
use tunmesh_contract::nodestate::{write_conflist, NodeStateError};
use tunmesh_contract::validate::first_host;
use tunmesh_contract::{NodeState, PluginSettings};

use crate::dataplane::{Dataplane, MeshDiff};
use crate::hostnet::{HostApplier, RouteDiff};
use crate::model::{DesiredMesh, Nets, PeerSpec, Snapshot};
use crate::source::Update;

/// Applies the peer set (the data plane).
pub trait MeshApplier {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff;
    /// Applies the peers that changed (`None`: gone), the rest untouched.
    fn apply_peer_changes(&self, changes: &[(String, Option<PeerSpec>)]) -> MeshDiff;
    /// This node's gateways (the source of the data plane's ICMP replies).
    fn set_gateways(&self, gateways: &[IpAddr]);
}

impl MeshApplier for Dataplane {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff {
        self.apply(mesh)
    }

    fn apply_peer_changes(&self, changes: &[(String, Option<PeerSpec>)]) -> MeshDiff {
        self.apply_changes(changes)
    }

    fn set_gateways(&self, gateways: &[IpAddr]) {
        Dataplane::set_gateways(self, gateways)
    }
}

impl<T: MeshApplier> MeshApplier for std::sync::Arc<T> {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff {
        (**self).apply_mesh(mesh)
    }

    fn apply_peer_changes(&self, changes: &[(String, Option<PeerSpec>)]) -> MeshDiff {
        (**self).apply_peer_changes(changes)
    }

    fn set_gateways(&self, gateways: &[IpAddr]) {
        (**self).set_gateways(gateways)
    }
}

/// The mesh the source wants, by peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub peers: std::collections::BTreeMap<String, PeerSpec>,
    pub blackhole_cidrs: Vec<IpNetwork>,
    pub pod_cidrs: Vec<IpNetwork>,
}

impl Desired {
    fn from_snapshot(snap: &Snapshot) -> Desired {
        Desired {
            peers: snap
                .mesh
                .peers
                .iter()
                .map(|p| (p.name.clone(), p.clone()))
                .collect(),
            blackhole_cidrs: snap.mesh.blackhole_cidrs.clone(),
            pod_cidrs: snap.pod_cidrs.clone(),
        }
    }

    /// The whole mesh, as a snapshot (O(peers)).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            mesh: self.mesh(),
            pod_cidrs: self.pod_cidrs.clone(),
        }
    }

    fn mesh(&self) -> DesiredMesh {
        DesiredMesh {
            peers: self.peers.values().cloned().collect(),
            blackhole_cidrs: self.blackhole_cidrs.clone(),
        }
    }

    /// Whether `spec` has a prefix the cluster CIDRs do not cover (one
    /// that needs a route of its own).
    fn needs_route(&self, spec: &PeerSpec) -> bool {
        spec.allowed_ips
            .iter()
            .any(|a| !crate::model::covered(a, &self.blackhole_cidrs))
    }
}

/// What the CNI plugin reads from the router.
pub trait CniFiles {
    /// Writes node.json (and the conflist, where one is wanted); returns
    /// the conflist's path if it wrote one.
    fn write(&self, state: &NodeState) -> Result<Option<PathBuf>, NodeStateError>;
}

/// The real CNI files: node.json in the state directory, the conflist in
/// the CNI configuration directory (none when that is empty).
pub struct CniStateFiles {
    pub state_dir: PathBuf,
    pub conf_dir: Option<PathBuf>,
    pub plugin: PluginSettings,
    /// What the conflist chains after tunmesh-cni (portmap for hostPort).
    pub chain: tunmesh_contract::Chain,
}

impl CniFiles for CniStateFiles {
    fn write(&self, state: &NodeState) -> Result<Option<PathBuf>, NodeStateError> {
        state.write(&self.state_dir)?;
        self.conf_dir
            .as_deref()
            .map(|dir| write_conflist(dir, &self.plugin, self.chain))
            .transpose()
    }
}

/// This node's part of what the CNI plugin is told.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    pub node_name: String,
    pub interface: String,
    pub mtu: u16,
    pub cluster_cidrs: Vec<IpNetwork>,
}

/// What went wrong applying a snapshot. The peers are always applied first,
/// so traffic to existing peers never waits for the host side.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("peers applied, routes failed: {0}")]
    Routes(#[source] crate::Error),
    #[error("peers applied, gateway addresses on the TUN device failed: {0}")]
    Link(#[source] crate::Error),
    #[error("peers applied, the CNI plugin's files failed: {0}")]
    CniFiles(#[source] NodeStateError),
}

/// What an apply changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub peers: MeshDiff,
    pub routes: RouteDiff,
    /// The pod CIDRs put in place, when they changed.
    pub pod_cidrs: Option<Vec<IpNetwork>>,
}

impl std::fmt::Display for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.peers;
        write!(
            f,
            "{} added, {} updated, {} replaced, {} removed, {} unchanged; {} routes added, {} removed",
            d.added.len(),
            d.updated.len(),
            d.replaced.len(),
            d.removed.len(),
            d.unchanged,
            self.routes.added.len(),
            self.routes.removed.len()
        )
    }
}

pub struct Reconciler<M, H, C> {
    mesh: M,
    host: H,
    cni: C,
    node: NodeIdentity,
    /// Pod CIDRs on the TUN device and in node.json, once put there.
    pod_cidrs: Option<Vec<IpNetwork>>,
    /// What the source wants (applied or not): re-applied after a failure
    /// or a `wg set`.
    desired: Option<Desired>,
}

impl<M: MeshApplier, H: HostApplier, C: CniFiles> Reconciler<M, H, C> {
    pub fn new(mesh: M, host: H, cni: C, node: NodeIdentity) -> Self {
        Reconciler {
            mesh,
            host,
            cni,
            node,
            pod_cidrs: None,
            desired: None,
        }
    }

    /// What the source wants, by peer (none before its first update).
    pub fn desired(&self) -> Option<&Desired> {
        self.desired.as_ref()
    }

    /// The whole mesh the source wants, as a snapshot (O(peers): for a
    /// successor, the warm-start cache).
    pub fn snapshot(&self) -> Option<Snapshot> {
        self.desired.as_ref().map(Desired::snapshot)
    }

    /// Applies an update from the source.
    pub async fn apply_update(&mut self, u: &Update) -> Result<Applied, ReconcileError> {
        match u {
            Update::Full(snap) => self.apply(snap).await,
            Update::Changes { peers, pod_cidrs } => {
                self.apply_changes(peers, pod_cidrs.as_deref()).await
            }
        }
    }

    /// The whole desired mesh again (after a failure, or over `wg set`).
    pub async fn reapply(&mut self) -> Option<Result<Applied, ReconcileError>> {
        let snap = self.snapshot()?;
        Some(self.apply(&snap).await)
    }

    /// Applies the peers that changed, and this node's pod CIDRs when they
    /// changed. The routes are synced only when a peer changing has a
    /// prefix outside the cluster CIDRs.
    #[instrument(skip_all, fields(peers = peers.len()))]
    pub async fn apply_changes(
        &mut self,
        peers: &[(String, Option<PeerSpec>)],
        pod_cidrs: Option<&[IpNetwork]>,
    ) -> Result<Applied, ReconcileError> {
        let d = self.desired.get_or_insert_with(|| Desired {
            blackhole_cidrs: self.node.cluster_cidrs.clone(),
            ..Default::default()
        });
        let mut routes_touched = false;
        for (name, spec) in peers {
            let old = match spec {
                Some(s) => d.peers.insert(name.clone(), s.clone()),
                None => d.peers.remove(name),
            };
            routes_touched |= old.iter().chain(spec.iter()).any(|s| d.needs_route(s));
        }
        if let Some(c) = pod_cidrs {
            d.pod_cidrs = c.to_vec();
        }
        let want_cidrs = d.pod_cidrs.clone();
        let diff = self.mesh.apply_peer_changes(peers);
        let routes = if routes_touched {
            let routes = self
                .desired
                .as_ref()
                .map(|d| d.mesh().routes())
                .unwrap_or_default();
            self.host
                .sync_routes(&routes)
                .await
                .map_err(ReconcileError::Routes)?
        } else {
            RouteDiff::default()
        };
        self.finish(diff, routes, &want_cidrs).await
    }

    /// This node's pod CIDRs as put in place (empty before any).
    pub fn pod_cidrs(&self) -> &[IpNetwork] {
        self.pod_cidrs.as_deref().unwrap_or(&[])
    }

    /// Before any snapshot: the TUN device up with its MTU and no gateway,
    /// so routes can point at it.
    pub async fn bring_up(&mut self) -> Result<(), ReconcileError> {
        self.host
            .configure_link(&[])
            .await
            .map_err(ReconcileError::Link)
    }

    /// Applies `snap`: peers, routes, then (if they changed) the pod CIDRs'
    /// gateways and the CNI plugin's files.
    #[instrument(skip_all, fields(peers = snap.mesh.peers.len()))]
    pub async fn apply(&mut self, snap: &Snapshot) -> Result<Applied, ReconcileError> {
        self.desired = Some(Desired::from_snapshot(snap));
        let peers = self.mesh.apply_mesh(&snap.mesh);
        let routes = self
            .host
            .sync_routes(&snap.mesh.routes())
            .await
            .map_err(ReconcileError::Routes)?;
        self.finish(peers, routes, &snap.pod_cidrs).await
    }

    /// After the peers and routes: says what changed, then the pod CIDRs'
    /// gateways and the CNI files when the pod CIDRs changed.
    async fn finish(
        &mut self,
        peers: MeshDiff,
        routes: RouteDiff,
        pod_cidrs: &[IpNetwork],
    ) -> Result<Applied, ReconcileError> {
        if !peers.is_empty() || !routes.added.is_empty() || !routes.removed.is_empty() {
            info!(added = ?peers.added, updated = ?peers.updated, replaced = ?peers.replaced,
                  removed = ?peers.removed, unchanged = peers.unchanged,
                  routes_added = %Nets(&routes.added), routes_removed = %Nets(&routes.removed), "mesh applied");
        }
        let mut applied = Applied {
            peers,
            routes,
            pod_cidrs: None,
        };
        if self.pod_cidrs.as_deref() != Some(pod_cidrs) {
            self.set_pod_cidrs(pod_cidrs).await?;
            applied.pod_cidrs = Some(pod_cidrs.to_vec());
        }
        Ok(applied)
    }

    /// Puts the gateway of each pod CIDR on the TUN device and writes the
    /// CNI plugin's files (not while no CIDR is assigned: the plugin then
    /// answers "try again later").
    async fn set_pod_cidrs(&mut self, cidrs: &[IpNetwork]) -> Result<(), ReconcileError> {
        let gateways: Vec<IpAddr> = cidrs.iter().map(|c| first_host(*c)).collect();
        self.host
            .configure_link(&gateways)
            .await
            .map_err(ReconcileError::Link)?;
        self.mesh.set_gateways(&gateways);
        if !cidrs.is_empty() {
            let conflist = self
                .cni
                .write(&NodeState {
                    node_name: self.node.node_name.clone(),
                    interface: self.node.interface.clone(),
                    mtu: self.node.mtu,
                    pod_cidrs: cidrs.to_vec(),
                    gateways,
                    cluster_cidrs: self.node.cluster_cidrs.clone(),
                })
                .map_err(ReconcileError::CniFiles)?;
            info!(pod_cidrs = %Nets(cidrs), conflist = ?conflist, "pod CIDRs in place (gateways on the TUN device); node.json and the CNI conflist written");
        }
        self.pod_cidrs = Some(cidrs.to_vec());
        Ok(())
    }
}

/// `p` made absolute against the working directory (the CNI plugin runs
/// elsewhere).
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use crate::model::PeerSpec;

    #[derive(Default)]
    struct FakeMesh {
        applied: Mutex<Vec<DesiredMesh>>,
    }

    impl MeshApplier for FakeMesh {
        fn set_gateways(&self, _: &[IpAddr]) {}

        fn apply_peer_changes(&self, changes: &[(String, Option<PeerSpec>)]) -> MeshDiff {
            let mut a = self.applied.lock().unwrap();
            let mut mesh = a.last().cloned().unwrap_or_default();
            let mut diff = MeshDiff::default();
            for (name, spec) in changes {
                mesh.peers.retain(|p| p.name != *name);
                match spec {
                    Some(s) => {
                        mesh.peers.push(s.clone());
                        diff.updated.push(name.clone());
                    }
                    None => diff.removed.push(name.clone()),
                }
            }
            mesh.peers.sort_by(|x, y| x.name.cmp(&y.name));
            a.push(mesh);
            diff
        }

        fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff {
            let mut a = self.applied.lock().unwrap();
            let before: Vec<String> = a
                .last()
                .map(|m| m.peers.iter().map(|p| p.name.clone()).collect())
                .unwrap_or_default();
            a.push(mesh.clone());
            MeshDiff {
                added: mesh
                    .peers
                    .iter()
                    .filter(|p| !before.contains(&p.name))
                    .map(|p| p.name.clone())
                    .collect(),
                unchanged: mesh
                    .peers
                    .iter()
                    .filter(|p| before.contains(&p.name))
                    .count(),
                ..Default::default()
            }
        }
    }

    #[derive(Default)]
    struct FakeHost {
        routes: Mutex<Vec<IpNetwork>>,
        gateways: Mutex<Vec<Vec<IpAddr>>>,
        fail_routes: AtomicBool,
    }

    impl HostApplier for FakeHost {
        async fn sync_routes(&self, routes: &[IpNetwork]) -> crate::Result<RouteDiff> {
            if self.fail_routes.load(Ordering::Relaxed) {
                return Err(crate::Error::Netlink {
                    context: "adding route 10.244.2.0/24".into(),
                    message: "File exists".into(),
                });
            }
            let mut have = self.routes.lock().unwrap();
            let diff = RouteDiff {
                added: routes
                    .iter()
                    .filter(|r| !have.contains(r))
                    .copied()
                    .collect(),
                removed: have
                    .iter()
                    .filter(|r| !routes.contains(r))
                    .copied()
                    .collect(),
            };
            *have = routes.to_vec();
            Ok(diff)
        }

        async fn configure_link(&self, gateways: &[IpAddr]) -> crate::Result<()> {
            self.gateways.lock().unwrap().push(gateways.to_vec());
            Ok(())
        }
    }

    #[derive(Default)]
    struct FakeCni {
        written: Mutex<Vec<NodeState>>,
    }

    impl CniFiles for FakeCni {
        fn write(&self, state: &NodeState) -> Result<Option<PathBuf>, NodeStateError> {
            self.written.lock().unwrap().push(state.clone());
            Ok(Some("/etc/cni/net.d/10-tunmesh.conflist".into()))
        }
    }

    fn reconciler() -> Reconciler<FakeMesh, FakeHost, FakeCni> {
        Reconciler::new(
            FakeMesh::default(),
            FakeHost::default(),
            FakeCni::default(),
            NodeIdentity {
                node_name: "node-1".into(),
                interface: "tunmesh0".into(),
                mtu: 1420,
                cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            },
        )
    }

    fn snap(peers: &[(&str, &str)], pod: &[&str]) -> Snapshot {
        Snapshot {
            mesh: DesiredMesh {
                peers: peers
                    .iter()
                    .enumerate()
                    .map(|(i, (name, cidr))| PeerSpec {
                        name: name.to_string(),
                        public_key: crate::PrivateKey::from_bytes([i as u8 + 1; 32]).public_key(),
                        endpoint: None,
                        allowed_ips: vec![cidr.parse().unwrap()],
                        node_addresses: vec![],
                        persistent_keepalive: None,
                        rotated_from: None,
                        key_created_unix: None,
                        underlay_mtu: None,
                    })
                    .collect(),
                blackhole_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            },
            pod_cidrs: pod.iter().map(|c| c.parse().unwrap()).collect(),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_snapshot_reaches_peers_routes_gateways_and_cni_files() {
        let mut r = reconciler();
        let s = snap(
            &[("node-2", "10.244.2.0/24")],
            &["10.244.1.0/24", "fd00:1::/64"],
        );
        let a = block_on(r.apply(&s)).unwrap();
        assert_eq!(a.peers.added, ["node-2"]);
        assert_eq!(
            *r.host.routes.lock().unwrap(),
            ["10.244.0.0/16".parse::<IpNetwork>().unwrap()],
            "the cluster CIDR, which covers the peer's"
        );
        assert_eq!(
            r.host.gateways.lock().unwrap().last().unwrap(),
            &[
                "10.244.1.1".parse::<IpAddr>().unwrap(),
                "fd00:1::1".parse().unwrap()
            ]
        );
        let w = r.cni.written.lock().unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].pod_cidrs, s.pod_cidrs);
        assert_eq!(w[0].gateways.len(), 2);
        assert_eq!(w[0].cluster_cidrs, ["10.244.0.0/16".parse().unwrap()]);
        assert_eq!(a.pod_cidrs.as_deref(), Some(&s.pod_cidrs[..]));
    }

    #[test]
    fn applying_the_same_snapshot_again_changes_nothing() {
        let mut r = reconciler();
        let s = snap(&[("node-2", "10.244.2.0/24")], &["10.244.1.0/24"]);
        block_on(r.apply(&s)).unwrap();
        let again = block_on(r.apply(&s)).unwrap();
        assert!(again.peers.is_empty(), "{:?}", again.peers);
        assert_eq!(again.routes, RouteDiff::default());
        assert_eq!(again.pod_cidrs, None);
        assert_eq!(
            r.cni.written.lock().unwrap().len(),
            1,
            "node.json written once"
        );
        assert_eq!(r.host.gateways.lock().unwrap().len(), 1);
    }

    #[test]
    fn no_pod_cidr_yet_means_no_gateway_and_no_cni_files() {
        let mut r = reconciler();
        block_on(r.bring_up()).unwrap();
        block_on(r.apply(&snap(&[("node-2", "10.244.2.0/24")], &[]))).unwrap();
        assert!(r.cni.written.lock().unwrap().is_empty());
        assert!(r.host.gateways.lock().unwrap().iter().all(|g| g.is_empty()));
        // The podCIDR arrives: gateways and files follow.
        block_on(r.apply(&snap(&[("node-2", "10.244.2.0/24")], &["10.244.1.0/24"]))).unwrap();
        assert_eq!(r.cni.written.lock().unwrap().len(), 1);
        assert_eq!(
            r.pod_cidrs(),
            ["10.244.1.0/24".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn a_route_failure_keeps_the_peers_and_is_retried() {
        let mut r = reconciler();
        r.host.fail_routes.store(true, Ordering::Relaxed);
        let s = snap(&[("node-2", "10.244.2.0/24")], &["10.244.1.0/24"]);
        let e = block_on(r.apply(&s)).unwrap_err();
        assert!(matches!(e, ReconcileError::Routes(_)), "{e}");
        assert!(
            e.to_string()
                .starts_with("peers applied, routes failed: netlink: adding route 10.244.2.0/24"),
            "{e}"
        );
        assert_eq!(
            r.mesh.applied.lock().unwrap().len(),
            1,
            "peers applied first"
        );
        assert!(
            r.cni.written.lock().unwrap().is_empty(),
            "files only after routes"
        );
        assert_eq!(r.snapshot(), Some(s.clone()), "kept for the retry");
        r.host.fail_routes.store(false, Ordering::Relaxed);
        block_on(r.reapply()).unwrap().unwrap();
        assert_eq!(r.cni.written.lock().unwrap().len(), 1);
        assert_eq!(*r.host.routes.lock().unwrap(), s.mesh.routes());
    }

    /// Changes touch the peers they name; the routes only when a peer's
    /// prefix lies outside the cluster CIDRs.
    #[test]
    fn changes_touch_the_routes_only_outside_the_cluster_cidrs() {
        let mut r = reconciler();
        block_on(r.apply(&snap(&[("node-2", "10.244.2.0/24")], &["10.244.1.0/24"]))).unwrap();
        let inside = snap(&[("node-3", "10.244.3.0/24")], &[]).mesh.peers;
        let a =
            block_on(r.apply_changes(&[("node-3".into(), Some(inside[0].clone()))], None)).unwrap();
        assert_eq!(a.routes, RouteDiff::default());
        assert_eq!(a.pod_cidrs, None);
        let outside = snap(&[("node-4", "192.168.4.0/24")], &[]).mesh.peers;
        let a = block_on(r.apply_changes(&[("node-4".into(), Some(outside[0].clone()))], None))
            .unwrap();
        assert_eq!(
            a.routes.added,
            ["192.168.4.0/24".parse::<IpNetwork>().unwrap()]
        );
        let a = block_on(r.apply_changes(&[("node-4".into(), None)], None)).unwrap();
        assert_eq!(
            a.routes.removed,
            ["192.168.4.0/24".parse::<IpNetwork>().unwrap()]
        );
        let d = r.desired().unwrap();
        assert_eq!(d.peers.keys().collect::<Vec<_>>(), ["node-2", "node-3"]);
        // A pod CIDR change comes with the changes.
        let a = block_on(r.apply_changes(&[], Some(&["10.244.9.0/24".parse().unwrap()]))).unwrap();
        assert_eq!(
            a.pod_cidrs.unwrap(),
            ["10.244.9.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(r.cni.written.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_changed_pod_cidr_moves_the_gateway_and_rewrites_the_files() {
        let mut r = reconciler();
        block_on(r.apply(&snap(&[], &["10.244.1.0/24"]))).unwrap();
        let a = block_on(r.apply(&snap(&[], &["10.244.7.0/24"]))).unwrap();
        assert_eq!(
            a.pod_cidrs.unwrap(),
            ["10.244.7.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(
            r.host.gateways.lock().unwrap().last().unwrap(),
            &["10.244.7.1".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(r.cni.written.lock().unwrap().len(), 2);
    }
}
