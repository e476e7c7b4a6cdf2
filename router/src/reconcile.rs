//! The reconciler: applies a desired `Snapshot` to the three places it
//! lives, in order: the data plane's peers (a minimal diff that keeps
//! unchanged sessions), the host's routes through the TUN device, and, when
//! this node's pod CIDRs changed, the gateway addresses on the TUN device
//! and the files the CNI plugin reads (node.json, the conflist).
//!
//! Each place is behind a seam (`MeshApplier`, `HostApplier`, `CniFiles`)
//! so the order and the failure handling are tested over fakes; the real
//! ones are the `Dataplane`, `hostnet::TunLink` and `CniStateFiles`. Every
//! step is idempotent: applying the same snapshot twice changes nothing the
//! second time, and a failed apply is simply applied again later.

use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use tracing::{info, instrument};
use tunmesh_contract::nodestate::{write_conflist, NodeStateError};
use tunmesh_contract::validate::first_host;
use tunmesh_contract::{NodeState, PluginSettings};

use crate::dataplane::{Dataplane, MeshDiff};
use crate::hostnet::RouteDiff;
use crate::model::{DesiredMesh, Nets, Snapshot};

/// Applies the peer set (the data plane).
pub trait MeshApplier {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff;
    /// This node's gateways (the source of the data plane's ICMP replies).
    fn set_gateways(&self, gateways: &[IpAddr]);
}

impl MeshApplier for Dataplane {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff {
        self.apply(mesh)
    }

    fn set_gateways(&self, gateways: &[IpAddr]) {
        Dataplane::set_gateways(self, gateways)
    }
}

impl<T: MeshApplier> MeshApplier for std::sync::Arc<T> {
    fn apply_mesh(&self, mesh: &DesiredMesh) -> MeshDiff {
        (**self).apply_mesh(mesh)
    }

    fn set_gateways(&self, gateways: &[IpAddr]) {
        (**self).set_gateways(gateways)
    }
}

/// The host side of the TUN device: its routes and addresses.
pub trait HostApplier {
    /// Makes tunmesh's routes through the TUN device exactly `routes`.
    fn sync_routes(
        &self,
        routes: &[IpNetwork],
    ) -> impl Future<Output = crate::Result<RouteDiff>> + Send;
    /// Brings the device up with its MTU and exactly `gateways` as addresses.
    fn configure_link(&self, gateways: &[IpAddr])
        -> impl Future<Output = crate::Result<()>> + Send;
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
    /// The last snapshot asked for (applied or not): re-applied after a
    /// failure or a `wg set`.
    last: Option<Snapshot>,
}

impl<M: MeshApplier, H: HostApplier, C: CniFiles> Reconciler<M, H, C> {
    pub fn new(mesh: M, host: H, cni: C, node: NodeIdentity) -> Self {
        Reconciler {
            mesh,
            host,
            cni,
            node,
            pod_cidrs: None,
            last: None,
        }
    }

    /// The last snapshot asked for.
    pub fn last(&self) -> Option<&Snapshot> {
        self.last.as_ref()
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
        self.last = Some(snap.clone());
        let peers = self.mesh.apply_mesh(&snap.mesh);
        let routes = self
            .host
            .sync_routes(&snap.mesh.routes())
            .await
            .map_err(ReconcileError::Routes)?;
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
        if self.pod_cidrs.as_ref() != Some(&snap.pod_cidrs) {
            self.set_pod_cidrs(&snap.pod_cidrs).await?;
            applied.pod_cidrs = Some(snap.pod_cidrs.clone());
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

    fn block_on<F: Future>(f: F) -> F::Output {
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
            s.mesh.routes(),
            "the cluster CIDR and the peer's"
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
        assert_eq!(r.last(), Some(&s), "kept for the retry");
        r.host.fail_routes.store(false, Ordering::Relaxed);
        let last = r.last().cloned().unwrap();
        block_on(r.apply(&last)).unwrap();
        assert_eq!(r.cni.written.lock().unwrap().len(), 1);
        assert_eq!(*r.host.routes.lock().unwrap(), s.mesh.routes());
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
