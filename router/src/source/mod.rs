//! Peer sources: each produces `DesiredMesh` snapshots. For now the static
//! mesh file; the Kubernetes source arrives with its own issue.

pub mod file;
