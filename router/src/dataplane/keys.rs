//! This node's static keys as the packet path sees them: the current one,
//! during a key rotation the next one too, and the keys retired by recent
//! rotations (only to count handshakes still addressed to them).
//!
//! A handshake message says which static key its sender used for this node
//! through MAC1, which is keyed by the receiver's public key: the load
//! limiter of each key checks it, so trying the current key and then the
//! next tells them apart before any Diffie-Hellman work. A data message has
//! no MAC1 and passes the first check.

use std::net::IpAddr;
use std::sync::Arc;

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use boringtun::x25519;

use super::counters::Drop;
use crate::{PrivateKey, PublicKey};

/// How many retired keys are remembered (to count what is addressed to them).
const RETIRED_KEPT: usize = 2;

/// One static key, with the load limiter that checks MAC1 against it and
/// answers with cookies under load.
pub struct StaticKey {
    pub secret: x25519::StaticSecret,
    pub public: x25519::PublicKey,
    pub limiter: Arc<RateLimiter>,
}

impl StaticKey {
    pub fn new(key: &PrivateKey, rate: u64) -> Self {
        let secret = x25519::StaticSecret::from(*key.as_bytes());
        let public = x25519::PublicKey::from(&secret);
        StaticKey {
            limiter: Arc::new(RateLimiter::new(&public, rate)),
            secret,
            public,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey::from_bytes(*self.public.as_bytes())
    }
}

/// The node's keys at one moment; replaced as a whole (behind `ArcSwap`).
pub struct NodeKeys {
    pub current: Arc<StaticKey>,
    /// The key being rotated to: handshakes addressed to it are answered
    /// with it.
    pub next: Option<Arc<StaticKey>>,
    /// Keys given up by earlier rotations, newest first.
    pub retired: Vec<Arc<StaticKey>>,
}

/// What the MAC check made of a datagram.
pub enum Verified<'d, 'k> {
    /// Go on with it; for a handshake message, `key` is the static key its
    /// sender addressed.
    Packet(Packet<'d>, &'k Arc<StaticKey>),
    /// Under load: a cookie reply of this length was written into the reply
    /// buffer.
    Cookie(usize),
    Dropped(Drop),
}

impl NodeKeys {
    pub fn new(current: StaticKey) -> Self {
        NodeKeys {
            current: Arc::new(current),
            next: None,
            retired: Vec::new(),
        }
    }

    /// The same keys with `next` as the key being rotated to (or none).
    pub fn with_next(&self, next: Option<Arc<StaticKey>>) -> Self {
        NodeKeys {
            current: Arc::clone(&self.current),
            next,
            retired: self.retired.clone(),
        }
    }

    /// The next key made current, the current one retired.
    pub fn committed(&self) -> Option<Self> {
        let next = self.next.as_ref()?;
        let mut retired = vec![Arc::clone(&self.current)];
        retired.extend(self.retired.iter().take(RETIRED_KEPT - 1).cloned());
        Some(NodeKeys {
            current: Arc::clone(next),
            next: None,
            retired,
        })
    }

    /// Every limiter (their per-second counts start over together).
    pub fn limiters(&self) -> impl Iterator<Item = &Arc<RateLimiter>> {
        std::iter::once(&self.current)
            .chain(self.next.iter())
            .chain(self.retired.iter())
            .map(|k| &k.limiter)
    }

    /// MAC1 (and under load MAC2) of `datagram`, against the current key
    /// and then the next one. A handshake addressed to neither is dropped:
    /// as `retired_key` when a retired key's MAC1 fits, else as
    /// `handshake_rejected`.
    pub fn verify<'d, 'k>(
        &'k self,
        src: IpAddr,
        datagram: &'d [u8],
        reply: &mut [u8],
    ) -> Verified<'d, 'k> {
        for key in std::iter::once(&self.current).chain(self.next.iter()) {
            match key.limiter.verify_packet(Some(src), datagram, reply) {
                Ok(p) => return Verified::Packet(p, key),
                Err(TunnResult::WriteToNetwork(cookie)) => return Verified::Cookie(cookie.len()),
                Err(TunnResult::Err(WireGuardError::InvalidMac)) => continue,
                Err(TunnResult::Err(WireGuardError::UnderLoad)) => {
                    return Verified::Dropped(Drop::HandshakeRejected)
                }
                Err(_) => return Verified::Dropped(Drop::Malformed),
            }
        }
        let retired = self.retired.iter().any(|k| {
            !matches!(
                k.limiter.verify_packet(Some(src), datagram, reply),
                Err(TunnResult::Err(WireGuardError::InvalidMac))
            )
        });
        Verified::Dropped(if retired {
            Drop::RetiredKey
        } else {
            Drop::HandshakeRejected
        })
    }
}
