//! Warm start: the last mesh the router applied, kept in its state
//! directory, so that a restarted router forwards pod traffic again before
//! its source (the API server) answers.
//!
//! The cache (`mesh-cache.json`, mode 0600 like the rest of the state
//! directory) is a header saying whose mesh it is and when its source last
//! confirmed it, and the mesh itself in the mesh file's shape, validated on
//! load by the mesh file's own validation. It is rewritten atomically when
//! an applied snapshot differs from the cached one, and its confirmation
//! time is refreshed every resync while the source is healthy.
//!
//! A cache is used only if it is this node's (node name, public key,
//! interface, port), in a format this router reads, and confirmed less
//! than `max_age` ago. Anything else is reported with the reason and
//! ignored: the router then starts cold, as without a cache. Either way
//! the source's first snapshot replaces the cached mesh (a minimal diff
//! that keeps the sessions of unchanged peers), so a cache is never trusted
//! over the API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tunmesh_contract::nodestate::write_atomic;

use crate::model::Snapshot;
use crate::source::file::{self, RawFile};
use crate::PublicKey;

/// The cache's file name in the state directory.
pub const CACHE_FILE: &str = "mesh-cache.json";
/// The cache format this router writes (it reads format 1 too: no list of
/// the peers in use).
pub const FORMAT: u32 = 2;
/// How often at most the cache is rewritten for changes of the mesh (a
/// resync's confirmation rewrites it anyway): with thousands of peers a
/// write is a few milliseconds.
pub const WRITE_EVERY: Duration = Duration::from_secs(10);
/// How long after its source last confirmed it a cached mesh is used.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Whose mesh a cache holds: checked on load against the running router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    pub node_name: String,
    pub public_key: String,
    pub interface: String,
    pub listen_port: u16,
}

impl Owner {
    pub fn new(node_name: &str, public_key: &PublicKey, interface: &str, port: u16) -> Owner {
        Owner {
            node_name: node_name.to_string(),
            public_key: public_key.to_base64(),
            interface: interface.to_string(),
            listen_port: port,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    format: u32,
    owner: Owner,
    /// Unix seconds when the source last confirmed this mesh.
    confirmed_unix: u64,
    /// The peers that had a session when it was written: a warm start
    /// handshakes with these at once (they may hold a session with this
    /// node's previous process), and with the others when they are used.
    #[serde(default)]
    active: Vec<String>,
    mesh: RawFile,
}

/// Why a cache was not used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("warm-start cache {path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("warm-start cache {path} is corrupt: {problem}")]
    Corrupt { path: PathBuf, problem: String },
    #[error("warm-start cache {path} is stale: {problem}")]
    Stale { path: PathBuf, problem: String },
    #[error("writing warm-start cache {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A cached mesh that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub snapshot: Snapshot,
    /// Seconds since its source last confirmed it.
    pub age: u64,
    /// The peers in use when it was written.
    pub active: Vec<String>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(CACHE_FILE)
}

/// Writes `snap` as `owner`'s cache, confirmed at `now_unix`, with the
/// peers in use (`active`).
pub fn write(
    state_dir: &Path,
    owner: &Owner,
    snap: &Snapshot,
    active: &[String],
    private_key_file: &Path,
    now_unix: u64,
) -> Result<(), CacheError> {
    let path = path(state_dir);
    let file = CacheFile {
        format: FORMAT,
        owner: owner.clone(),
        confirmed_unix: now_unix,
        active: active.to_vec(),
        mesh: RawFile::from_snapshot(snap, private_key_file, owner.listen_port),
    };
    // NB: plain strings and numbers always encode.
    let json = serde_json::to_vec(&file).unwrap_or_default();
    write_atomic(&path, &json).map_err(|source| CacheError::Write { path, source })
}

/// Reads `owner`'s cache. `Ok(None)`: there is none. An error says why the
/// one there cannot be used; the caller reports it and starts cold.
pub fn load(
    state_dir: &Path,
    owner: &Owner,
    now_unix: u64,
    max_age: Duration,
) -> Result<Option<Cached>, CacheError> {
    let path = path(state_dir);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CacheError::Read { path, source }),
    };
    let corrupt = |problem: String| CacheError::Corrupt {
        path: path.clone(),
        problem,
    };
    let stale = |problem: String| CacheError::Stale {
        path: path.clone(),
        problem,
    };
    // The format first, so a newer router's cache is "stale", not "corrupt".
    let format = serde_json::from_slice::<serde_json::Value>(&text)
        .map_err(|e| corrupt(e.to_string()))?
        .get("format")
        .and_then(serde_json::Value::as_u64);
    if format != Some(u64::from(FORMAT)) && format != Some(1) {
        return Err(stale(format!(
            "format {format:?}, this router reads formats 1 and {FORMAT}"
        )));
    }
    let file: CacheFile = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if file.owner != *owner {
        return Err(stale(format!(
            "written for {:?}, this router is {:?}",
            file.owner, owner
        )));
    }
    if file.confirmed_unix > now_unix.saturating_add(60) {
        return Err(corrupt(format!(
            "confirmed_unix {} is in the future (now {now_unix})",
            file.confirmed_unix
        )));
    }
    let age = now_unix.saturating_sub(file.confirmed_unix);
    if age > max_age.as_secs() {
        return Err(stale(format!(
            "last confirmed {age} s ago, more than the {} s allowed (--warm-start-max-age)",
            max_age.as_secs()
        )));
    }
    let mesh = file::validate(&file.mesh).map_err(|p| corrupt(file::describe(&p)))?;
    Ok(Some(Cached {
        snapshot: Snapshot {
            mesh: mesh.mesh,
            pod_cidrs: mesh.node.pod_cidrs,
        },
        age,
        active: file.active,
    }))
}

/// How the router started, for status.json and `tunmesh-ctl status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartStatus {
    /// "handover" (from the running router), "warm" (from the cache),
    /// "cold" (no cache) or "cold: cache refused".
    pub kind: String,
    /// Peers brought up from the cache.
    pub peers: usize,
    /// How long before the start the source last confirmed the cache.
    pub cache_age_seconds: Option<u64>,
    /// Why a cache there was not used.
    pub problem: Option<String>,
    /// After a handover: microseconds from the previous process's workers
    /// stopping to this one's starting, its peers in place.
    #[serde(default)]
    pub handover_gap_us: Option<u64>,
}

impl StartStatus {
    pub fn from_load(r: &Result<Option<Cached>, CacheError>) -> StartStatus {
        match r {
            Ok(Some(c)) => StartStatus {
                kind: "warm".into(),
                peers: c.snapshot.mesh.peers.len(),
                cache_age_seconds: Some(c.age),
                ..StartStatus::default()
            },
            Ok(None) => StartStatus {
                kind: "cold".into(),
                ..StartStatus::default()
            },
            Err(e) => StartStatus {
                kind: "cold: cache refused".into(),
                problem: Some(e.to_string()),
                ..StartStatus::default()
            },
        }
    }
}

/// Keeps the cache in line with what the router applied: the daemon says
/// when the mesh `changed`, writes it (`save`) when it is `due` (at most
/// every `WRITE_EVERY`), and every resync while its source is healthy (the
/// confirmation). A failed write is logged once, not retried in a loop:
/// the cache is an optimisation, never a reason to stop.
pub struct Keeper {
    pub state_dir: PathBuf,
    pub owner: Owner,
    pub private_key_file: PathBuf,
    dirty: bool,
    written_at: Option<std::time::Instant>,
    failing: bool,
}

impl Keeper {
    pub fn new(state_dir: PathBuf, owner: Owner, private_key_file: PathBuf) -> Keeper {
        Keeper {
            state_dir,
            owner,
            private_key_file,
            dirty: false,
            written_at: None,
            failing: false,
        }
    }

    /// The applied mesh changed.
    pub fn changed(&mut self) {
        self.dirty = true;
    }

    /// Whether a change waits to be written (the first at once, later ones
    /// at most every `WRITE_EVERY`).
    pub fn due(&self) -> bool {
        self.dirty && self.written_at.is_none_or(|t| t.elapsed() >= WRITE_EVERY)
    }

    /// Whether a cache was written by this process (the confirmation only
    /// moves the time of one).
    pub fn written(&self) -> bool {
        self.written_at.is_some()
    }

    /// Writes the cache: `snap`, confirmed now, with the peers in use.
    pub fn save(&mut self, snap: &Snapshot, active: &[String]) {
        let now = crate::model::unix_now();
        match write(
            &self.state_dir,
            &self.owner,
            snap,
            active,
            &self.private_key_file,
            now,
        ) {
            Ok(()) => {
                self.failing = false;
                self.dirty = false;
                self.written_at = Some(std::time::Instant::now());
            }
            Err(e) => {
                if !self.failing {
                    tracing::warn!(error = %e, "the next start will be cold");
                }
                self.failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DesiredMesh, PeerSpec};

    fn snap() -> Snapshot {
        Snapshot {
            mesh: DesiredMesh {
                peers: vec![PeerSpec {
                    name: "node-2".into(),
                    public_key: PublicKey::from_bytes([7; 32]),
                    endpoint: Some("172.30.0.12:51820".parse().unwrap()),
                    allowed_ips: vec!["10.244.2.0/24".parse().unwrap()],
                    node_addresses: vec!["172.30.0.12".parse().unwrap()],
                    persistent_keepalive: Some(25),
                    rotated_from: None,
                    key_created_unix: None,
                    underlay_mtu: None,
                }],
                blackhole_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            },
            pod_cidrs: vec!["10.244.1.0/24".parse().unwrap()],
        }
    }

    fn owner() -> Owner {
        Owner::new("node-1", &PublicKey::from_bytes([9; 32]), "tunmesh0", 51820)
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "tunmesh-warm-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_written_cache_loads_as_the_same_snapshot() {
        let d = dir();
        assert!(load(&d, &owner(), 1000, HOUR).unwrap().is_none());
        write(
            &d,
            &owner(),
            &snap(),
            &["node-2".into()],
            Path::new("/k"),
            1000,
        )
        .unwrap();
        let c = load(&d, &owner(), 1010, HOUR).unwrap().unwrap();
        assert_eq!(c.snapshot, snap());
        assert_eq!(c.age, 10);
        assert_eq!(c.active, ["node-2"]);
        // A format-1 cache (no list of the peers in use) still loads.
        let text = std::fs::read_to_string(path(&d))
            .unwrap()
            .replace("\"format\":2", "\"format\":1")
            .replace("\"active\":[\"node-2\"],", "");
        std::fs::write(path(&d), text).unwrap();
        let c = load(&d, &owner(), 1010, HOUR).unwrap().unwrap();
        assert_eq!(c.snapshot, snap());
        assert!(c.active.is_empty());
    }

    #[test]
    fn someone_elses_or_an_old_cache_is_stale() {
        let d = dir();
        write(&d, &owner(), &snap(), &[], Path::new("/k"), 1000).unwrap();
        let mut other = owner();
        other.node_name = "node-9".into();
        let e = load(&d, &other, 1000, HOUR).unwrap_err().to_string();
        assert!(e.contains("stale") && e.contains("node-9"), "{e}");
        let mut rekeyed = owner();
        rekeyed.public_key = PublicKey::from_bytes([8; 32]).to_base64();
        assert!(matches!(
            load(&d, &rekeyed, 1000, HOUR),
            Err(CacheError::Stale { .. })
        ));
        let e = load(&d, &owner(), 1000 + 3601, HOUR)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3601 s ago"), "{e}");
        let text = std::fs::read_to_string(path(&d))
            .unwrap()
            .replace("\"format\":2", "\"format\":3");
        std::fs::write(path(&d), text).unwrap();
        let e = load(&d, &owner(), 1000, HOUR).unwrap_err().to_string();
        assert!(e.contains("stale") && e.contains("format Some(3)"), "{e}");
    }

    #[test]
    fn a_corrupt_cache_names_what_is_wrong() {
        let d = dir();
        write(&d, &owner(), &snap(), &[], Path::new("/k"), 1000).unwrap();
        let good = std::fs::read_to_string(path(&d)).unwrap();
        let cases: &[(&str, &str, &str)] = &[
            (
                "10.244.2.0/24",
                "10.244.2.1/24",
                "peer[0] (\"node-2\").allowed_ips[0]",
            ),
            ("172.30.0.12:51820", "172.30.0.12", "endpoint"),
            (
                "\"confirmed_unix\":1000",
                "\"confirmed_unix\":99999",
                "future",
            ),
            ("\"private_key_file\"", "\"key_file\"", "unknown field"),
        ];
        for (from, to, want) in cases {
            let text = good.replacen(from, to, 1);
            assert_ne!(text, good, "{from}");
            std::fs::write(path(&d), text).unwrap();
            let e = load(&d, &owner(), 1000, HOUR).unwrap_err().to_string();
            assert!(e.contains("corrupt") && e.contains(want), "{from}: {e}");
            assert!(e.contains(CACHE_FILE), "{e}");
        }
        std::fs::write(path(&d), &good[..good.len() / 2]).unwrap();
        let e = load(&d, &owner(), 1000, HOUR).unwrap_err().to_string();
        assert!(e.contains("corrupt") && e.contains("line"), "{e}");
    }
}
