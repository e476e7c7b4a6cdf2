//! tunmesh router: the node agent. It owns a TUN device, carries pod traffic
//! to the other nodes through a WireGuard full mesh, and keeps the host's
//! addresses and routes in line with the desired mesh.
//!
//! Layout (see DESIGN.md): `model` (plain domain types), `source` (where the
//! desired mesh comes from), `dataplane` (the packet path), `hostnet`
//! (addresses, routes, sysctls), `status` (what the router reports).
//! What the CNI plugin reads (node.json, the conflist) and what counts as a
//! valid key, endpoint and CIDR are the `tunmesh-contract` crate's, shared
//! with the plugin.

pub mod app;
pub mod ctl;
pub mod daemon;
pub mod dataplane;
pub mod handover;
pub mod hostnet;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod rotation;
pub mod source;
pub mod startup;
pub mod status;
pub mod uapi;
pub mod warm;

pub use tunmesh_keygen::{PrivateKey, PublicKey};

/// The router library's errors. Each carries the context an operator needs
/// to find what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    MeshFile(#[from] source::file::MeshFileError),
    #[error(transparent)]
    Key(#[from] tunmesh_keygen::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("netlink: {context}: {message}")]
    Netlink { context: String, message: String },
    #[error("{context}: {source}")]
    Json {
        context: String,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Kube(#[from] source::kube::ClientError),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
