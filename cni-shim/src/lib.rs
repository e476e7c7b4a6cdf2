//! tunmesh-cni: the CNI plugin that puts each pod on its node's subnet.
//!
//! The container runtime runs the binary with the CNI environment and the
//! network configuration on stdin. ADD allocates an address per family from
//! the node's pod CIDRs (read from the router's `node.json`), creates a veth
//! pair with one end in the pod as `CNI_IFNAME`, and routes the pod's
//! addresses to the node's end. DEL undoes it and is idempotent; CHECK
//! compares the pod's network with the ADD's result; STATUS tells whether
//! the router is ready; GC frees what no runtime knows any more.
//!
//! - `spec`: versions, error codes, results per version;
//! - `request`: the environment and the configuration, parsed and checked;
//! - `store`: the persistent, locked address allocation store;
//! - `net`: links, addresses and routes over netlink, on both sides;
//! - `plugin`: the commands;
//!
//! What the router writes for the plugin (node.json, the conflist) is the
//! `tunmesh-contract` crate's, shared with the router.

pub mod net;
pub mod plugin;
pub mod request;
pub mod spec;
pub mod store;

pub use tunmesh_contract::nodestate;
pub use tunmesh_contract::{NodeState, PluginSettings};
