//! Key rotation: the node's static key replaced without losing a packet.
//!
//! The next key's file (`<key file>.next`, written atomically by
//! `tunmesh-ctl rotate-key`, or by the router itself when periodic rotation
//! is on) is the request, and the rotation's only state on disk:
//!
//! 1. the router loads it: handshakes addressed to either key are answered
//!    (MAC1 tells which one the initiator used), and the Node gets the
//!    `tunmesh.io/next-public-key` annotation;
//! 2. each peer, seeing the annotation, moves its session for this node to
//!    the next key in place (the live session goes on) and handshakes with
//!    it; this router's session with that peer uses the next key from then
//!    on;
//! 3. once every peer has handshaken with the next key (or the grace window
//!    has passed with the annotation published: a peer that was down learns
//!    the new key from the Node when it comes back), the next file is
//!    renamed over the key file, the old key is retired (a handshake still
//!    addressed to it is counted as `retired_key`), and the Node's
//!    `public-key` becomes the new key, `next-public-key` goes.
//!
//! A crash at any point leaves one of three states, each of which a start
//! resumes: no next file (nothing began or all is done but the annotation,
//! which the source then sets right); the next file beside the key file
//! (the window resumes; sessions re-handshake, and an initiation left
//! unanswered is tried with the other key); the new key in the key file
//! with the annotations still naming the old one as current (published at
//! start).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::dataplane::Dataplane;
use crate::model::OwnKeys;
use crate::{PrivateKey, PublicKey};

/// How long a rotation waits for every peer to handshake with the next key
/// before it completes anyway (if the Node announces the next key).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// The next key's file beside the key file.
pub fn next_key_file(key_file: &Path) -> PathBuf {
    let mut p = key_file.as_os_str().to_owned();
    p.push(".next");
    PathBuf::from(p)
}

/// What is wrong with a rotation's input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotationError {
    /// The next key file is there but is no key (or cannot be read).
    #[error("{path}: {problem}")]
    NextKey { path: PathBuf, problem: String },
    /// A duration (`TUNMESH_KEY_ROTATION`, its grace) that is not one.
    #[error("{text:?} is not a duration like 168h, 30m, 90s or 7d")]
    NotADuration { text: String },
    #[error("{text:?}: unknown unit {unit:?} (s, m, h or d)")]
    UnknownUnit { text: String, unit: String },
}

/// The next key, if a rotation was asked for. A file that is there but
/// unreadable is an error naming it (the rotation waits; nothing is lost).
pub fn read_next(path: &Path) -> Result<Option<PrivateKey>, RotationError> {
    match PrivateKey::read_file(path) {
        Ok(k) => Ok(Some(k)),
        Err(tunmesh_keygen::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(RotationError::NextKey {
            path: path.to_path_buf(),
            problem: e.to_string(),
        }),
    }
}

/// When the key in `path` was made: the file's modification time (a key
/// file is written once, and a rotation renames the next one into place).
fn key_made(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// `key_made` in Unix seconds.
pub fn key_created_unix(path: &Path) -> Option<u64> {
    key_made(path).map(unix)
}

/// How long ago the key in `path` was made.
fn key_age(path: &Path) -> Option<Duration> {
    SystemTime::now().duration_since(key_made(path)?).ok()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a duration as `168h`, `30m`, `45s`, `7d` or plain seconds; `0`
/// or `off` is none.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, RotationError> {
    let t = text.trim();
    if t.is_empty() || t == "0" || t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().map_err(|_| RotationError::NotADuration {
        text: text.to_string(),
    })?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86400),
        _ => {
            return Err(RotationError::UnknownUnit {
                text: text.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    Ok(Some(Duration::from_secs(secs)).filter(|d| !d.is_zero()))
}

/// What status.json says of the node's key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KeyStatus {
    pub key_file: String,
    /// Seconds since the current key was made.
    pub key_age_seconds: Option<u64>,
    /// Periodic rotation, in seconds (none: off).
    pub rotation_period_seconds: Option<u64>,
    /// A rotation under way.
    pub rotation: Option<RotationStatus>,
    /// The last rotation this process completed.
    pub last_rotation: Option<DoneRotation>,
    pub rotations: u64,
    /// Why a rotation cannot go on (an unreadable next key file, a mesh
    /// file as the source), empty when none.
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RotationStatus {
    pub next_public_key: String,
    pub started_unix: u64,
    /// Whether the API shows the next key on this Node yet.
    pub announced: bool,
    /// Peers that have handshaken with the next key, and those still to.
    pub peers_done: Vec<String>,
    pub peers_waiting: Vec<String>,
    /// When the rotation completes even without the waiting peers.
    pub grace_ends_unix: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DoneRotation {
    pub at_unix: u64,
    pub from: String,
    pub to: String,
    /// Peers that had not handshaken with the new key when it completed
    /// (they learn it from the Node).
    pub peers_not_seen: Vec<String>,
    pub took_seconds: u64,
}

/// The rotation driver, ticked by the main loop every second.
pub struct Rotation {
    key_file: PathBuf,
    next_file: PathBuf,
    /// None: the source cannot announce keys (a mesh file).
    announce: Option<watch::Sender<OwnKeys>>,
    period: Option<Duration>,
    grace: Duration,
    started: Option<SystemTime>,
    last: Option<DoneRotation>,
    rotations: u64,
    problem: Option<String>,
}

impl Rotation {
    pub fn new(
        key_file: PathBuf,
        announce: Option<watch::Sender<OwnKeys>>,
        period: Option<Duration>,
        grace: Duration,
    ) -> Rotation {
        Rotation {
            next_file: next_key_file(&key_file),
            key_file,
            announce,
            period,
            grace,
            started: None,
            last: None,
            rotations: 0,
            problem: None,
        }
    }

    fn set_problem(&mut self, p: Option<String>) {
        if p != self.problem {
            if let Some(p) = &p {
                error!(problem = %p, "key rotation cannot go on");
            }
            self.problem = p;
        }
    }

    fn announce(&self, dp: &Dataplane) {
        if let Some(tx) = &self.announce {
            tx.send_replace(OwnKeys {
                current: dp.public_key(),
                next: dp.next_public_key(),
                created_unix: key_created_unix(&self.key_file),
            });
        }
    }

    /// One step: picks up a next key file, completes or abandons a
    /// rotation, starts a periodic one. `announced` is the next key the API
    /// shows on this Node. Returns the new public key when one became
    /// current.
    pub fn tick(&mut self, dp: &Dataplane, announced: Option<&str>) -> Option<PublicKey> {
        let next = match read_next(&self.next_file) {
            Err(e) => {
                self.set_problem(Some(format!(
                    "the next key file is unreadable ({e}); remove it, or write a valid key \
                     (tunmesh-ctl rotate-key)"
                )));
                return None;
            }
            Ok(n) => n,
        };
        if self.announce.is_none() {
            self.set_problem(next.map(|_| {
                format!(
                    "{} asks for a key rotation, but peers from a mesh file cannot learn a new \
                     key: change the mesh files instead",
                    self.next_file.display()
                )
            }));
            return None;
        }
        self.set_problem(None);
        let in_dp = dp.next_public_key();
        match next {
            None if in_dp.is_some() => {
                warn!("the next key file is gone: key rotation abandoned, the current key stays");
                dp.set_next_key(None);
                self.started = None;
                self.announce(dp);
                None
            }
            None => {
                let due = self
                    .period
                    .is_some_and(|p| key_age(&self.key_file).is_some_and(|age| age >= p));
                if due {
                    info!("the key is older than the rotation period: rotating");
                    if let Err(e) = PrivateKey::generate().write_file(&self.next_file) {
                        self.set_problem(Some(format!("writing the next key: {e}")));
                    }
                }
                None
            }
            Some(k) if k.public_key() == dp.public_key() => {
                // The next key is the current one: nothing to rotate.
                let _ = std::fs::remove_file(&self.next_file);
                None
            }
            Some(k) if in_dp != Some(k.public_key()) => {
                dp.set_next_key(Some(&k));
                // Asked for when the next key was written (a restart
                // resumes the same window).
                self.started = key_made(&self.next_file).or(Some(SystemTime::now()));
                info!(next = %k.public_key(), "key rotation: answering handshakes to both keys, announcing the next one");
                self.announce(dp);
                None
            }
            Some(k) => self.maybe_commit(dp, &k, announced),
        }
    }

    fn maybe_commit(
        &mut self,
        dp: &Dataplane,
        next: &PrivateKey,
        announced: Option<&str>,
    ) -> Option<PublicKey> {
        let (done, waiting) = dp.rotation_progress()?;
        let announced = announced == Some(next.public_key().to_base64().as_str());
        let started = self.started.unwrap_or_else(SystemTime::now);
        let elapsed = SystemTime::now()
            .duration_since(started)
            .unwrap_or_default();
        let all_seen = waiting.is_empty() && (announced || !done.is_empty());
        if !(all_seen || (announced && elapsed >= self.grace)) {
            return None;
        }
        let from = dp.public_key();
        if let Err(e) = tunmesh_keygen::rename_durably(&self.next_file, &self.key_file) {
            self.set_problem(Some(format!(
                "replacing {} with {}: {e}",
                self.key_file.display(),
                self.next_file.display()
            )));
            return None;
        }
        dp.commit_next_key();
        let to = dp.public_key();
        if waiting.is_empty() {
            info!(from = %from, to = %to, "key rotation complete: every peer handshook with the new key");
        } else {
            warn!(from = %from, to = %to, not_seen = ?waiting,
                  "key rotation complete after the grace window; these peers learn the new key from the Node");
        }
        self.last = Some(DoneRotation {
            at_unix: unix(SystemTime::now()),
            from: from.to_base64(),
            to: to.to_base64(),
            peers_not_seen: waiting,
            took_seconds: elapsed.as_secs(),
        });
        self.rotations += 1;
        self.started = None;
        self.announce(dp);
        Some(to)
    }

    pub fn status(&self, dp: &Dataplane, announced: Option<&str>) -> KeyStatus {
        let rotation = dp.next_public_key().map(|next| {
            let (done, waiting) = dp.rotation_progress().unwrap_or_default();
            let started = self.started.unwrap_or_else(SystemTime::now);
            RotationStatus {
                next_public_key: next.to_base64(),
                started_unix: unix(started),
                announced: announced == Some(next.to_base64().as_str()),
                peers_done: done,
                peers_waiting: waiting,
                grace_ends_unix: unix(started + self.grace),
            }
        });
        KeyStatus {
            key_file: self.key_file.display().to_string(),
            key_age_seconds: key_age(&self.key_file).map(|d| d.as_secs()),
            rotation_period_seconds: self.period.map(|p| p.as_secs()),
            rotation,
            last_rotation: self.last.clone(),
            rotations: self.rotations,
            problem: self.problem.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("168h"),
            Ok(Some(Duration::from_secs(168 * 3600)))
        );
        assert_eq!(parse_duration("90"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(
            parse_duration("7d"),
            Ok(Some(Duration::from_secs(7 * 86400)))
        );
        assert_eq!(parse_duration("off"), Ok(None));
        assert_eq!(parse_duration("0"), Ok(None));
        assert!(parse_duration("1w")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_duration("h")
            .unwrap_err()
            .to_string()
            .contains("not a duration"));
    }

    #[test]
    fn next_file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("tunmesh-rot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("private.key");
        let next = next_key_file(&key);
        assert_eq!(next, dir.join("private.key.next"));
        assert!(matches!(read_next(&next), Ok(None)));
        std::fs::write(&next, "not base64\n").unwrap();
        let e = read_next(&next).unwrap_err().to_string();
        assert!(e.contains("private.key.next"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
