//! Peer sources: where the desired mesh comes from. Each implements
//! `PeerSource` and hands the router `Update`s on one channel, in order:
//! the whole mesh (`Full`: a mesh file, the first listing of Nodes, a
//! relist) and, between those, what changed (`Changes`: the peers that
//! came, changed or went). The source's own store is the truth (a mesh
//! file, or the Node directory); a change reaches the router only when a
//! peer did change, so a Node update that changes nothing the mesh reads
//! costs the router nothing. `kube` watches Node objects (translated,
//! one Node at a time, by the pure `nodes` module); `file` reads the
//! static mesh file.
//!
//! The router's main loop knows only this seam: it selects on the channel,
//! signals and timers, and passes requests (a SIGHUP's reload) back.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use ipnetwork::IpNetwork;
use tokio::sync::mpsc;

use crate::model::{PeerSpec, Snapshot, SourceStatus};

pub mod apibytes;
pub mod file;
pub mod kube;
pub mod nodes;

/// What the router asks of its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read the configuration again (SIGHUP).
    Reload,
    /// Tell the operator, where this source can (a Warning Event on this
    /// router's Node; the log only, with a mesh file).
    Event {
        reason: &'static str,
        message: String,
    },
}

/// What a source hands the router.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The whole mesh and this node's pod CIDRs: applied as a minimal diff.
    Full(Snapshot),
    /// What changed since the last update.
    Changes {
        /// Peers that came or changed (`Some`), or went (`None`), by name.
        peers: Vec<(String, Option<PeerSpec>)>,
        /// This node's pod CIDRs, when they changed.
        pod_cidrs: Option<Vec<IpNetwork>>,
    },
}

/// The channel a source publishes on (in order; nothing is dropped).
pub type Updates = mpsc::UnboundedSender<Update>;

/// The source's status, shared with the router's reporting.
pub type SharedStatus = Arc<Mutex<SourceStatus>>;

/// A running source, boxed for the main loop.
pub type SourceTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A source of peers: Kubernetes Node objects, a mesh file, or what comes
/// later. Constructed by the wiring (each needs its own settings), then run.
pub trait PeerSource: Send + 'static {
    /// Short name for logs and status ("kubernetes", "mesh file").
    fn kind(&self) -> &'static str;

    /// Runs until the router is gone (`updates` closed): publishes a
    /// snapshot whenever the desired mesh may have changed, serves
    /// `requests`, and keeps `status` current. Every failure is reported in
    /// `status` and the log, and retried; it never ends the source.
    fn run(
        self: Box<Self>,
        updates: Updates,
        requests: mpsc::UnboundedReceiver<Request>,
        status: SharedStatus,
    ) -> SourceTask;
}

/// Updates `status` under its lock (a poisoned lock is still used: the
/// status is plain data).
pub fn set_status(status: &SharedStatus, f: impl FnOnce(&mut SourceStatus)) {
    let mut s = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut s);
}

/// Folds updates that queued up into one: a `Full` replaces everything
/// before it, and the changes after it go into it; changes alone merge, a
/// later change of a peer winning. `None` for no update.
pub fn fold(updates: Vec<Update>) -> Option<Update> {
    let mut out: Option<Update> = None;
    for u in updates {
        out = Some(match (out, u) {
            (_, Update::Full(s)) => Update::Full(s),
            (None, c) => c,
            (Some(Update::Full(mut snap)), Update::Changes { peers, pod_cidrs }) => {
                for (name, spec) in peers {
                    snap.mesh.peers.retain(|p| p.name != name);
                    if let Some(spec) = spec {
                        let at = snap.mesh.peers.partition_point(|p| p.name < spec.name);
                        snap.mesh.peers.insert(at, spec);
                    }
                }
                if let Some(c) = pod_cidrs {
                    snap.pod_cidrs = c;
                }
                Update::Full(snap)
            }
            (
                Some(Update::Changes {
                    peers: mut before,
                    pod_cidrs: cidrs_before,
                }),
                Update::Changes { peers, pod_cidrs },
            ) => {
                for (name, spec) in peers {
                    before.retain(|(n, _)| *n != name);
                    before.push((name, spec));
                }
                Update::Changes {
                    peers: before,
                    pod_cidrs: pod_cidrs.or(cidrs_before),
                }
            }
        });
    }
    out
}

/// Publishes the whole mesh `snap`.
pub fn publish(updates: &Updates, snap: Snapshot) {
    let _ = updates.send(Update::Full(snap));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DesiredMesh;

    fn spec(name: &str, seed: u8) -> PeerSpec {
        PeerSpec {
            name: name.into(),
            public_key: crate::PrivateKey::from_bytes([seed; 32]).public_key(),
            endpoint: None,
            allowed_ips: vec![],
            node_addresses: vec![],
            persistent_keepalive: None,
            rotated_from: None,
            key_created_unix: None,
            underlay_mtu: None,
        }
    }

    #[test]
    fn queued_updates_fold_into_one() {
        let a = |seed| Update::Changes {
            peers: vec![("a".into(), Some(spec("a", seed)))],
            pod_cidrs: None,
        };
        let gone_b = Update::Changes {
            peers: vec![("b".into(), None)],
            pod_cidrs: Some(vec!["10.244.1.0/24".parse().unwrap()]),
        };
        // Changes merge, the later one of a peer winning.
        match fold(vec![a(1), gone_b.clone(), a(2)]).unwrap() {
            Update::Changes { peers, pod_cidrs } => {
                assert_eq!(peers.len(), 2);
                assert_eq!(peers[1].1, Some(spec("a", 2)));
                assert_eq!(peers[0], ("b".into(), None));
                assert_eq!(pod_cidrs.unwrap().len(), 1);
            }
            other => panic!("{other:?}"),
        }
        // A Full swallows what came before, and takes what comes after.
        let full = Update::Full(Snapshot {
            mesh: DesiredMesh {
                peers: vec![spec("b", 3), spec("c", 4)],
                blackhole_cidrs: vec![],
            },
            pod_cidrs: vec![],
        });
        match fold(vec![a(1), full, a(5), gone_b]).unwrap() {
            Update::Full(s) => {
                let names: Vec<&str> = s.mesh.peers.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(names, ["a", "c"]);
                assert_eq!(s.mesh.peers[0], spec("a", 5));
                assert_eq!(s.pod_cidrs.len(), 1);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fold(vec![]), None);
    }
}
