//! How a router starts, decided in one place. A router starting on a node
//! can find there:
//! - a router that answers on the handover socket in the state directory:
//!   it takes over that router's queues and live sessions (`handover`);
//! - a socket nobody answers while the WireGuard port is still held: a
//!   predecessor that is dying or has just handed over to another new
//!   router; it waits a moment and looks again;
//! - a warm-start cache it may use: the last applied mesh goes up before
//!   the peer source answers (`warm`);
//! - nothing of the kind: a cold start, the mesh comes from the source.
//!
//! `decide` is that choice, a plain function of what was observed. The
//! observing (connecting to a socket, asking whether a port is held,
//! reading the cache) is its callers': the handover's connect loop asks it
//! whether to take over, wait or give up; the router asks it again with
//! the cache read once nobody took over.

use std::time::Duration;

/// How long a starting router waits for a predecessor that holds the port
/// but does not answer on the handover socket yet, or that went away
/// before handing over (two new routers at once: the second takes over
/// from the first, once the first listens).
pub const PREDECESSOR_WAIT: Duration = Duration::from_secs(10);

/// The handover socket in the state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Predecessor {
    /// No socket: no router ran here with a state directory (or it was
    /// cleaned up).
    Absent,
    /// A socket nobody answers on: a router that died, or one that is
    /// handing over to another new router.
    Silent,
    /// A router answers.
    Answers,
}

/// The warm-start cache, as far as it was looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cache {
    /// Not read (yet): the handover's loop decides before the cache counts.
    Unread,
    /// Warm start is off (`--warm-start false`, or a source without one).
    Off,
    /// None written yet.
    Missing,
    /// A cache of this router's own mesh, recent enough and valid.
    Usable,
    /// A cache that is corrupt, stale or another router's (the reason is
    /// reported with the start).
    Refused,
}

/// What a starting router found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    pub predecessor: Predecessor,
    /// Whether the WireGuard port is held by another socket.
    pub port_busy: bool,
    /// How long this router has waited so far.
    pub waited: Duration,
    pub cache: Cache,
}

/// How to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Take over the running router's queues and sessions.
    TakeOver,
    /// Look again in a moment: a predecessor still holds the port.
    Wait,
    /// Bring the cached mesh up now; the source's replaces it.
    Warm,
    /// Wait for the source's mesh.
    Cold,
}

/// The start for what was observed.
pub fn decide(o: &Observed) -> Start {
    match o.predecessor {
        Predecessor::Answers => Start::TakeOver,
        Predecessor::Silent if o.port_busy && o.waited < PREDECESSOR_WAIT => Start::Wait,
        Predecessor::Absent | Predecessor::Silent => match o.cache {
            Cache::Usable => Start::Warm,
            Cache::Unread | Cache::Off | Cache::Missing | Cache::Refused => Start::Cold,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination of what can be found, and the start it gives.
    #[test]
    fn every_case() {
        let s = Duration::from_secs;
        use Cache::*;
        use Predecessor::*;
        use Start::*;
        let cases: &[(Predecessor, bool, Duration, Cache, Start)] = &[
            // A router answers: take over, whatever else holds.
            (Answers, true, s(0), Usable, TakeOver),
            (Answers, false, s(30), Refused, TakeOver),
            (Answers, true, s(30), Off, TakeOver),
            // Nobody answers, the port held: wait, up to PREDECESSOR_WAIT.
            (Silent, true, s(0), Usable, Wait),
            (Silent, true, s(9), Unread, Wait),
            (Silent, true, s(10), Usable, Warm),
            (Silent, true, s(11), Refused, Cold),
            // Nobody answers, the port free: the predecessor is gone.
            (Silent, false, s(0), Usable, Warm),
            (Silent, false, s(0), Missing, Cold),
            (Silent, false, s(0), Unread, Cold),
            // No socket: the cache decides.
            (Absent, false, s(0), Usable, Warm),
            (Absent, true, s(0), Usable, Warm),
            (Absent, false, s(0), Refused, Cold),
            (Absent, false, s(0), Missing, Cold),
            (Absent, false, s(0), Off, Cold),
            (Absent, false, s(0), Unread, Cold),
        ];
        for &(predecessor, port_busy, waited, cache, want) in cases {
            let o = Observed {
                predecessor,
                port_busy,
                waited,
                cache,
            };
            assert_eq!(decide(&o), want, "{o:?}");
        }
    }
}
