//! Peer sources: where the desired mesh comes from. Each implements
//! `PeerSource` and hands the router whole `Snapshot`s (the desired mesh and
//! this node's pod CIDRs) on one `watch` channel, level-triggered: the
//! router applies the latest one as it is, and a snapshot it missed while
//! busy is one it no longer needs. `kube` watches Node objects (translated
//! by the pure `nodes` module); `file` reads the static mesh file.
//!
//! The router's main loop knows only this seam: it selects on the channel,
//! signals and timers, and passes requests (a SIGHUP's reload) back.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::model::{Snapshot, SourceStatus};

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

/// The channel a source publishes on: the latest snapshot (`None` until it
/// has one).
pub type Updates = watch::Sender<Option<Snapshot>>;

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

/// Publishes `snap` if it differs from the last one.
pub fn publish(updates: &Updates, snap: Snapshot) {
    updates.send_if_modified(|cur| {
        if cur.as_ref() == Some(&snap) {
            false
        } else {
            *cur = Some(snap);
            true
        }
    });
}
