//! The cross-platform WireGuard userspace API (the protocol wireguard-go
//! and boringtun serve), on `/var/run/wireguard/<interface>.sock`, mode
//! 0600, so that `wg show` and `wg showconf` work on a tunmesh node.
//!
//! `get=1` reports the key, port and every peer (endpoint as it is now,
//! allowed IPs, latest handshake, transfer). `set=1` accepts peer changes
//! (add, remove, endpoint, allowed IPs, keepalive): they take effect at once
//! and last until the router re-applies its source (the next change, or the
//! resync). Changing the private key or the listen port is refused: they
//! belong to the router's configuration and the Node's annotations.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use tunmesh_contract::validate;

use crate::dataplane::Dataplane;
use crate::model::{DesiredMesh, PeerSpec};
use crate::PublicKey;

/// Where WireGuard userspace implementations put their sockets.
pub const SOCKET_DIR: &str = "/var/run/wireguard";
/// Longest request accepted (a `set` for thousands of peers fits).
const MAX_REQUEST: usize = 4 << 20;

// Errors go back negated, as wireguard-go sends them and `wg` expects.
const EINVAL: i32 = -22;
const EPERM: i32 = -1;
const EPROTO: i32 = -71;

/// The socket path for `interface`.
pub fn socket_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("{interface}.sock"))
}

/// Binds the socket (replacing a stale one), mode 0600. Returns the
/// listener; `serve` answers on it.
pub fn bind(dir: &Path, interface: &str) -> std::io::Result<UnixListener> {
    std::fs::create_dir_all(dir)?;
    let path = socket_path(dir, interface);
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is served by another process (is a second router running?)",
                    path.display()
                ),
            ))
        }
        Err(_) => {
            let _ = std::fs::remove_file(&path);
        }
    }
    let l = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Serves requests until the listener fails. Applied `set`s are reported on
/// `changed` so the router knows its source's mesh was overridden.
pub async fn serve(
    listener: UnixListener,
    dp: Arc<Dataplane>,
    port: u16,
    changed: mpsc::UnboundedSender<()>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let (dp, changed) = (Arc::clone(&dp), changed.clone());
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &dp, port, &changed).await {
                        debug!(error = %e, "UAPI connection");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "UAPI socket failed; `wg show` will not work until restart");
                return;
            }
        }
    }
}

async fn handle(
    stream: UnixStream,
    dp: &Dataplane,
    port: u16,
    changed: &mpsc::UnboundedSender<()>,
) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    loop {
        let mut op = String::new();
        if r.read_line(&mut op).await? == 0 {
            return Ok(());
        }
        let mut lines = Vec::new();
        let mut size = op.len();
        loop {
            let mut l = String::new();
            if r.read_line(&mut l).await? == 0 || l == "\n" {
                break;
            }
            size += l.len();
            if size > MAX_REQUEST {
                w.write_all(format!("errno={EINVAL}\n\n").as_bytes())
                    .await?;
                return Ok(());
            }
            lines.push(l.trim_end_matches('\n').to_string());
        }
        let reply = match op.trim_end() {
            "get=1" => get(dp, port),
            "set=1" => {
                let errno = match set(dp, port, &lines) {
                    Ok(applied) => {
                        if applied {
                            let _ = changed.send(());
                        }
                        0
                    }
                    Err(e) => {
                        warn!(errno = e.errno, "wg set refused: {}", e.message);
                        e.errno
                    }
                };
                format!("errno={errno}\n\n")
            }
            _ => format!("errno={EPROTO}\n\n"),
        };
        w.write_all(reply.as_bytes()).await?;
    }
}

fn hex(b: &[u8; 32]) -> String {
    b.iter().fold(String::with_capacity(64), |mut s, x| {
        let _ = write!(s, "{x:02x}");
        s
    })
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The `get` reply.
pub fn get(dp: &Dataplane, port: u16) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex(&dp.private_key_bytes()));
    let _ = writeln!(s, "listen_port={port}");
    for p in &dp.table().peers {
        let (at, endpoint, tx, rx) = {
            let st = p.lock();
            let (tx, rx) = st.transfer();
            (st.last_handshake(), st.endpoint, tx, rx)
        };
        let _ = writeln!(s, "public_key={}", hex(p.public_key.as_bytes()));
        let _ = writeln!(s, "protocol_version=1");
        if let Some(e) = endpoint {
            let _ = writeln!(s, "endpoint={e}");
        }
        let at = at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(s, "last_handshake_time_sec={}", at.as_secs());
        let _ = writeln!(s, "last_handshake_time_nsec={}", at.subsec_nanos());
        let _ = writeln!(s, "tx_bytes={tx}");
        let _ = writeln!(s, "rx_bytes={rx}");
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            p.persistent_keepalive.unwrap_or(0)
        );
        for a in &p.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
    }
    s.push_str("errno=0\n\n");
    s
}

/// A `set` the router refuses: the errno the protocol answers with, and why
/// (logged; `wg` only shows the errno).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (errno {errno})")]
pub struct Refused {
    pub errno: i32,
    pub message: String,
}

/// Applies a `set` request's lines. Returns whether anything changed.
/// Keys, endpoints and allowed IPs get the verdicts every other source
/// gives them (`tunmesh_contract::validate`).
pub fn set(dp: &Dataplane, port: u16, lines: &[String]) -> Result<bool, Refused> {
    let table = dp.table();
    let mut peers: Vec<PeerSpec> = table
        .peers
        .iter()
        .map(|p| PeerSpec {
            name: p.name.clone(),
            public_key: p.public_key,
            endpoint: p.configured_endpoint,
            allowed_ips: p.allowed_ips.clone(),
            node_addresses: p.node_addresses.clone(),
            persistent_keepalive: p.persistent_keepalive,
            rotated_from: None,
            key_created_unix: p.key_created_unix,
            underlay_mtu: None,
        })
        .collect();
    let mut cur: Option<usize> = None;
    let mut remove: Vec<PublicKey> = Vec::new();
    let refuse = |errno: i32, message: String| Refused { errno, message };
    let bad = |line: &str| refuse(EINVAL, format!("bad line {line:?}"));
    // The same verdicts as every other source (tunmesh_contract::validate).
    let refused = |key: &str, e: validate::Invalid| refuse(EINVAL, format!("{key}: {e}"));
    for line in lines {
        let (k, v) = line.split_once('=').ok_or_else(|| bad(line))?;
        match (k, cur) {
            ("private_key", _) => {
                if unhex(v) != Some(dp.private_key_bytes()) {
                    return Err(refuse(
                        EPERM,
                        "the private key belongs to the router (its state directory); not changed"
                            .into(),
                    ));
                }
            }
            ("listen_port", _) => {
                if v.parse::<u16>().ok() != Some(port) {
                    return Err(refuse(
                        EPERM,
                        format!("the listen port is the router's setting ({port}); not changed"),
                    ));
                }
            }
            ("fwmark", _) if v == "0" || v.is_empty() => {}
            ("replace_peers", _) if v == "true" => peers.clear(),
            ("public_key", _) => {
                let key = validate::public_key_hex(v).map_err(|e| refused(k, e))?;
                cur = Some(match peers.iter().position(|p| p.public_key == key) {
                    Some(i) => i,
                    None => {
                        peers.push(PeerSpec {
                            name: key.to_base64(),
                            public_key: key,
                            endpoint: None,
                            allowed_ips: Vec::new(),
                            node_addresses: Vec::new(),
                            persistent_keepalive: None,
                            rotated_from: None,
                            key_created_unix: None,
                            underlay_mtu: None,
                        });
                        peers.len() - 1
                    }
                });
            }
            ("remove", Some(i)) if v == "true" => remove.push(peers[i].public_key),
            ("update_only", Some(_)) | ("protocol_version", Some(_)) => {}
            ("preshared_key", Some(_)) if v.chars().all(|c| c == '0') => {}
            ("endpoint", Some(i)) => {
                peers[i].endpoint = Some(validate::endpoint(v).map_err(|e| refused(k, e))?);
            }
            ("persistent_keepalive_interval", Some(i)) => {
                let s: u16 = v.parse().map_err(|_| bad(line))?;
                peers[i].persistent_keepalive = (s > 0).then_some(s);
            }
            ("replace_allowed_ips", Some(i)) if v == "true" => peers[i].allowed_ips.clear(),
            ("allowed_ip", Some(i)) => {
                let n = validate::cidr(v).map_err(|e| refused(k, e))?;
                if !peers[i].allowed_ips.contains(&n) {
                    peers[i].allowed_ips.push(n);
                }
            }
            _ => return Err(refuse(EINVAL, format!("unsupported: {line:?}"))),
        }
    }
    peers.retain(|p| !remove.contains(&p.public_key));
    let diff = dp.apply(&DesiredMesh {
        peers,
        blackhole_cidrs: Vec::new(),
    });
    let changed = !diff.is_empty();
    if changed {
        info!(added = ?diff.added, updated = ?diff.updated, replaced = ?diff.replaced, removed = ?diff.removed,
              "wg set applied; the router's source takes over again at its next change or resync");
    }
    Ok(changed)
}
