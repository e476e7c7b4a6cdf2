//! WireGuard keys as `wg genkey` / `wg pubkey` write them: 32-byte X25519
//! keys in standard base64 with padding (44 characters). The router uses the
//! same types, so a key written by one tool is always read by the other.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand_core::{OsRng, RngCore};

/// Errors from parsing or storing keys.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("key is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("key decodes to {0} bytes, a WireGuard key has 32")]
    Length(usize),
    #[error("key has {0} characters, a base64 WireGuard key has 44")]
    TextLength(usize),
    #[error("{action} key file {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn decode32(text: &str) -> Result<[u8; 32]> {
    let text = text.trim();
    if text.len() != 44 {
        return Err(Error::TextLength(text.len()));
    }
    let bytes = STANDARD.decode(text)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| Error::Length(bytes.len()))
}

/// A private key. Never printed by `Debug`; `to_base64` is the only way out.
#[derive(Clone)]
pub struct PrivateKey([u8; 32]);

impl PrivateKey {
    /// A fresh key from the OS RNG, clamped exactly as `wg genkey` clamps it.
    pub fn generate() -> Self {
        let mut k = [0u8; 32];
        OsRng.fill_bytes(&mut k);
        k[0] &= 248;
        k[31] = (k[31] & 127) | 64;
        PrivateKey(k)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PrivateKey(bytes)
    }

    /// Parses base64 text as `wg pubkey` accepts it (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<Self> {
        decode32(text).map(PrivateKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The matching public key (X25519 base-point multiplication; clamping is
    /// part of the scalar multiplication, as in `wg pubkey`).
    pub fn public_key(&self) -> PublicKey {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        PublicKey(*x25519_dalek::PublicKey::from(&secret).as_bytes())
    }

    /// Reads a key file (base64, one line).
    pub fn read_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            action: "reading",
            path: path.display().to_string(),
            source,
        })?;
        Self::from_base64(&text)
    }

    /// Writes the key as one base64 line, mode 0600, atomically: into a
    /// temporary file beside `path`, synced, then renamed over it (and the
    /// directory synced), so a crash leaves either the old file or the new
    /// one, never a torn or empty key.
    pub fn write_file(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            action: "writing",
            path: path.display().to_string(),
            source,
        };
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let written = (|| -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            writeln!(f, "{}", self.to_base64())?;
            f.sync_all()?;
            drop(f);
            rename_durably(&tmp, path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// Loads the key at `path`, or creates one there (mode 0600) if the file
    /// does not exist. Returns the key and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Self, bool)> {
        match Self::read_file(path) {
            Ok(k) => Ok((k, false)),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let k = Self::generate();
                k.write_file(path)?;
                Ok((k, true))
            }
            Err(e) => Err(e),
        }
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// Renames `from` over `to` and syncs the directory, so that after a crash
/// the directory holds one of the two files under `to`, never neither
/// (a key file replaced in a rotation, a new key file written).
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    match to.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A public key; `Display` is the base64 form `wg` prints.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    pub fn from_base64(text: &str) -> Result<Self> {
        decode32(text).map(PublicKey)
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl std::str::FromStr for PublicKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::from_base64(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7748 section 6.1: Alice's private and public key.
    const RFC7748_PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const RFC7748_PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";

    #[test]
    fn rfc7748_vector() {
        let k = PrivateKey::from_base64(RFC7748_PRIVATE).unwrap();
        assert_eq!(k.public_key().to_base64(), RFC7748_PUBLIC);
    }

    #[test]
    fn generated_keys_are_clamped_and_round_trip() {
        for _ in 0..64 {
            let k = PrivateKey::generate();
            let b = k.as_bytes();
            assert_eq!(b[0] & 7, 0);
            assert_eq!(b[31] & 128, 0);
            assert_eq!(b[31] & 64, 64);
            let text = k.to_base64();
            assert_eq!(text.len(), 44);
            assert_eq!(PrivateKey::from_base64(&text).unwrap().as_bytes(), b);
        }
    }

    #[test]
    fn bad_keys_are_refused_with_reason() {
        let short = PrivateKey::from_base64("abc").unwrap_err().to_string();
        assert!(short.contains("44"), "{short}");
        let bad = PublicKey::from_base64(&"!".repeat(44))
            .unwrap_err()
            .to_string();
        assert!(bad.contains("base64"), "{bad}");
        // 44 characters that decode to 33 bytes are impossible; 43+'=' decodes to 32.
        assert!(PublicKey::from_base64(&format!("{}=", "A".repeat(43))).is_ok());
    }

    #[test]
    fn key_file_mode_is_0600() {
        let dir = std::env::temp_dir().join(format!("tm-keygen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("key");
        let (k, created) = PrivateKey::load_or_create(&p).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created2) = PrivateKey::load_or_create(&p).unwrap();
        assert!(!created2);
        assert_eq!(k.as_bytes(), k2.as_bytes());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
