//! What the tunmesh router and its CNI plugin agree on, in a crate of its
//! own so that neither links the other:
//!
//! - `nodestate`: the node state file (`node.json`) the router writes and
//!   the plugin reads, and the CNI network configuration list;
//! - `validate`: what counts as a valid public key, endpoint and CIDR. Every
//!   input path (Node annotations, the mesh file, the WireGuard API, the
//!   plugin's node.json) gives the same verdict on the same text.

pub mod nodestate;
pub mod validate;

pub use nodestate::{Chain, NodeState, NodeStateError, PluginSettings};
pub use validate::Invalid;
