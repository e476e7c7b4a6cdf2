//! Peer sources: each produces `Snapshot`s (the desired mesh and this
//! node's pod CIDRs). `file` is the static mesh file; `kube` watches Node
//! objects, translated by the pure `nodes` module.

pub mod file;
pub mod kube;
pub mod nodes;
