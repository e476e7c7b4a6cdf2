//! The peer source the flags ask for, with what only it knows at start:
//! the node's key (and a rotation's next key), its port and name.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnetwork::IpNetwork;
use tracing::{error, info, warn};

use super::Args;
use crate::model::OwnKeys;
use crate::source::file::FileSource;
use crate::source::kube::{self as kube_source, KubeSettings, KubeSource};
use crate::source::PeerSource;
use crate::{rotation, PrivateKey};

/// The peer source, and what only it knows at start.
pub struct SourceParts {
    pub source: Box<dyn PeerSource>,
    pub key: PrivateKey,
    /// The key a rotation under way goes to (its file is there).
    pub next_key: Option<PrivateKey>,
    /// Where key changes are announced (none: a mesh file, which cannot).
    pub announce: Option<tokio::sync::watch::Sender<OwnKeys>>,
    /// Where the key is (the warm-start cache names it, as a mesh file does).
    pub key_file: PathBuf,
    /// Whether a warm-start cache is kept (the Kubernetes source; a mesh
    /// file is at hand at every start anyway).
    pub warm_start: bool,
    pub port: u16,
    pub node_name: String,
    pub cluster_cidrs: Vec<IpNetwork>,
}

fn check_key_mode(path: &Path) {
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warn!(path = %path.display(), mode = format!("{mode:o}"), "private key file is accessible by others; chmod 600 it");
        }
    }
}

/// The source `args` name: a mesh file, else Node objects.
pub async fn open(args: &Args, underlay_mtu: Option<u16>) -> anyhow::Result<SourceParts> {
    match &args.mesh_file {
        Some(path) => file_source(args, path),
        None => kube(args, underlay_mtu).await,
    }
}

/// A mesh file's source: key, port and CIDRs from its `[node]` table.
fn file_source(args: &Args, path: &Path) -> anyhow::Result<SourceParts> {
    let f = FileSource::open(path)?;
    let node = f.node().clone();
    let key = PrivateKey::read_file(&node.private_key_file).context("node.private_key_file")?;
    check_key_mode(&node.private_key_file);
    let node_name = args.node_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        host.trim().to_string()
    });
    Ok(SourceParts {
        source: Box::new(f),
        key,
        next_key: None,
        announce: None,
        key_file: node.private_key_file.clone(),
        warm_start: false,
        port: node.listen_port,
        node_name,
        cluster_cidrs: node.cluster_cidrs,
    })
}

/// Node objects' source: the key from the state directory (made on first
/// start), the rest from the flags.
async fn kube(args: &Args, underlay_mtu: Option<u16>) -> anyhow::Result<SourceParts> {
    let Some(name) = args.node_name.clone().filter(|n| !n.is_empty()) else {
        bail!("no peer source: give --node-name (or NODE_NAME) to use the Kubernetes API, or --mesh-file");
    };
    let key_path = args
        .private_key_file
        .clone()
        .unwrap_or_else(|| args.state_dir.join("private.key"));
    let (key, created) = PrivateKey::load_or_create(&key_path)
        .with_context(|| format!("private key {}", key_path.display()))?;
    check_key_mode(&key_path);
    if created {
        info!(path = %key_path.display(), "created a new private key");
    }
    let client = kube_source::client(args.kubeconfig.as_deref()).await?;
    let settings = KubeSettings {
        node_name: name.clone(),
        listen_port: args.listen_port,
        endpoint: args.endpoint,
        cluster_cidrs: args.cluster_cidrs.clone(),
        persistent_keepalive: Some(args.persistent_keepalive).filter(|k| *k > 0),
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        underlay_mtu,
    };
    // A rotation that was under way when this router last stopped goes on.
    let next_key = match rotation::read_next(&rotation::next_key_file(&key_path)) {
        Ok(k) => k.filter(|k| k.public_key() != key.public_key()),
        Err(e) => {
            error!(error = %e, "the next key file is unreadable; no key rotation until it is fixed");
            None
        }
    };
    let (announce, keys) = tokio::sync::watch::channel(OwnKeys {
        current: key.public_key(),
        next: next_key.as_ref().map(PrivateKey::public_key),
        created_unix: rotation::key_created_unix(&key_path),
    });
    let source = Box::new(KubeSource::new(client, settings, keys));
    Ok(SourceParts {
        source,
        key,
        next_key,
        announce: Some(announce),
        key_file: key_path,
        warm_start: args.warm_start_max_age > 0,
        port: args.listen_port,
        node_name: name,
        cluster_cidrs: args.cluster_cidrs.clone(),
    })
}
