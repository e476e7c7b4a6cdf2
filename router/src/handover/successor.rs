//! The new router's side of a handover: ask the running one, take its
//! state and descriptors, and, once this router's workers run, tell it so
//! (`Forwarding`), which is when the node becomes this router's.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{
    check, recv, recv_bytes, send, socket_path, wire, Answer, Faults, HandoverError, Hello,
    Outcome, Progress, Released, Reply, Sessions, State, Step, FORMAT, FORWARD_TIMEOUT,
    LEGACY_FORMAT,
};
use crate::dataplane::tun::TunDevice;
use crate::dataplane::udp::UdpSocket;
use crate::dataplane::PeerSession;
use crate::model::Snapshot;
use crate::startup::{self, Cache, Observed, Predecessor, Start};
use crate::status::RealQueue;
use crate::PublicKey;

/// What a handover gave this router: the running one's queues and mesh
/// (its peers built by `Prepare`, their sessions installed). The old
/// process is stopped (it sent Released) and waits for `confirm` before it
/// lets go for good.
pub struct Taken {
    /// Its TUN queues and UDP sockets, TUN first, `queues` of each.
    pub queues: Vec<RealQueue>,
    pub tun_offload: bool,
    pub snapshot: Snapshot,
    /// Sessions handed over.
    pub sessions: usize,
    pub from_pid: u32,
    pub stopped_unix_nanos: u128,
    /// The format spoken (the legacy one commits at the Ack: no `confirm`).
    pub format: u32,
    sock: UnixStream,
}

/// What this router is, for checking the state it is handed.
pub struct Me<'a> {
    pub state_dir: &'a Path,
    pub public_key: &'a PublicKey,
    pub interface: &'a str,
    /// This router's UDP port: while something holds it, a router runs
    /// here (or is about to listen).
    pub port: u16,
}

/// What the new router does with what it is handed: its peers built from
/// the mesh (with the previous process's session indices) while the old
/// router still forwards, then the sessions given to them.
pub trait Prepare {
    fn peers(&mut self, snapshot: &Snapshot, indices: &[(String, u32)]);
    fn sessions(&mut self, sessions: Vec<PeerSession>) -> usize;
}

/// Takes over from the router running on this node, if one is: `None` when
/// there is none (no socket, or nobody behind it). An error when one runs
/// but the handover failed (it goes on serving, or this router could not
/// be sure it stopped): this router must then not start.
pub fn take_over(
    me: &Me,
    faults: &dyn Faults,
    prepare: &mut dyn Prepare,
) -> Result<Option<Taken>, HandoverError> {
    let path = socket_path(me.state_dir);
    let began = Instant::now();
    let mut format = FORMAT;
    let (sock, state, fds) = loop {
        let sock = match UnixStream::connect(&path) {
            Ok(s) => s,
            // No socket, or nobody behind it: a router that crashed (start
            // now), or one that handed over and whose successor does not
            // listen yet while it holds the port (ask it, once it does).
            Err(e) => {
                let predecessor = match e.kind() {
                    std::io::ErrorKind::NotFound => Predecessor::Absent,
                    std::io::ErrorKind::ConnectionRefused => Predecessor::Silent,
                    _ => return Err(e.into()),
                };
                let seen = Observed {
                    predecessor,
                    port_busy: predecessor == Predecessor::Silent && super::port_busy(me.port),
                    waited: began.elapsed(),
                    cache: Cache::Unread,
                };
                match startup::decide(&seen) {
                    Start::Wait => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                    Start::TakeOver | Start::Warm | Start::Cold => return Ok(None),
                }
            }
        };
        info!(socket = %path.display(), format, "a router runs on this node; asking it to hand over");
        sock.set_read_timeout(Some(super::ACK_TIMEOUT))?;
        let hello = Hello {
            format,
            pid: std::process::id(),
        };
        let got = send(&sock, &hello, &[]).and_then(|()| {
            faults.at(Step::AfterHello);
            recv::<Reply>(&sock)
        });
        match got {
            Ok((Reply::State(state), fds)) => break (sock, state, fds),
            // A router of the version before speaks the legacy format only.
            Ok((Reply::Refuse(why), _)) if format == FORMAT && why.contains("format") => {
                info!(reason = %why, "the running router speaks an older handover format; asking in format {LEGACY_FORMAT}");
                format = LEGACY_FORMAT;
            }
            Ok((Reply::Refuse(why), _)) => return Err(HandoverError::Refused(why)),
            // Nothing was handed over: the one we reached went away (it
            // handed over to another new router, or died). Try again: the
            // winner listens on the same path once it runs.
            Err(HandoverError::Io(e)) if began.elapsed() < startup::PREDECESSOR_WAIT => {
                info!(error = %e, "the running router went away before handing over; trying again");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    };
    faults.at(Step::AfterState);
    let nack = |e: HandoverError| {
        let _ = send(&sock, &Answer::Nack(e.to_string()), &[]);
        e
    };
    let (queues, snapshot) = adopt(&state, fds, me).map_err(nack)?;
    prepare.peers(&snapshot, &state.indices);
    let (sessions, stopped_unix_nanos) = if format == LEGACY_FORMAT {
        // The old one stopped before sending the state, sessions in it.
        let s = state
            .sessions
            .iter()
            .map(|s| s.to_session())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| nack(e.into()))?;
        (s, state.stopped_unix_nanos)
    } else {
        // Ready: the old one stops now and sends the sessions.
        send(&sock, &Answer::Ready, &[])?;
        let (head, _) = recv::<Sessions>(&sock)?;
        let bytes = recv_bytes(&sock)?;
        let s = wire::decode(&bytes).map_err(|e| nack(e.into()))?;
        if s.len() != head.count {
            return Err(nack(HandoverError::Unusable(super::StateError::Field {
                field: "sessions".into(),
                problem: format!("{} came, {} announced", s.len(), head.count),
            })));
        }
        faults.at(Step::AfterSessions);
        (s, head.stopped_unix_nanos)
    };
    let sessions = prepare.sessions(sessions);
    send(&sock, &Answer::Ack, &[])?;
    faults.at(Step::AfterAck);
    // We seal nothing until the old router said it took the Ack: one that
    // gave up waiting for it resumed with the same sessions, and closed
    // the socket instead of answering.
    sock.set_read_timeout(Some(FORWARD_TIMEOUT))?;
    recv::<Released>(&sock).map_err(|e| HandoverError::NotReleased(Box::new(e)))?;
    faults.at(Step::AfterReleased);
    Ok(Some(Taken {
        queues,
        tun_offload: state.tun_offload,
        snapshot,
        sessions,
        from_pid: state.pid,
        stopped_unix_nanos,
        format,
        sock,
    }))
}

/// The state checked and made usable: the queues and the mesh.
fn adopt(
    state: &State,
    fds: Vec<std::os::fd::OwnedFd>,
    me: &Me,
) -> Result<(Vec<RealQueue>, Snapshot), HandoverError> {
    check(state, me.public_key, me.interface)?;
    if fds.len() != 2 * state.queues {
        return Err(HandoverError::Descriptors {
            got: fds.len(),
            queues: state.queues,
        });
    }
    let mesh = crate::source::file::validate(&state.mesh).map_err(|p| {
        HandoverError::Unusable(super::StateError::Field {
            field: "mesh".into(),
            problem: crate::source::file::describe(&p),
        })
    })?;
    let mut fds = fds.into_iter();
    let mut tuns = Vec::new();
    for fd in fds.by_ref().take(state.queues) {
        tuns.push(Arc::new(
            TunDevice::adopt(fd, me.interface, state.tun_offload).map_err(HandoverError::Adopt)?,
        ));
    }
    let mut udps = Vec::new();
    for fd in fds {
        udps.push(Arc::new(
            UdpSocket::adopt(fd, state.udp_offload).map_err(HandoverError::Adopt)?,
        ));
    }
    let queues = tuns.into_iter().zip(udps).collect();
    let snapshot = Snapshot {
        mesh: mesh.mesh,
        pod_cidrs: mesh.node.pod_cidrs,
    };
    Ok((queues, snapshot))
}

impl Taken {
    /// Tells the old router that this one's workers run, and waits for its
    /// last word. `Err` when it resumed meanwhile (Forwarding came after
    /// its timeout): this router must stop its workers and exit. A closed
    /// socket means the old one is gone, which is fine too.
    pub fn confirm(&self) -> Result<(), HandoverError> {
        if self.format == LEGACY_FORMAT {
            // That router committed at the Ack.
            return Ok(());
        }
        send(&self.sock, &Progress::Forwarding, &[])?;
        match recv::<Outcome>(&self.sock) {
            Ok((Outcome::Committed, _)) => Ok(()),
            Ok((Outcome::Resuming(why), _)) => Err(HandoverError::Resumed(why)),
            Err(HandoverError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                warn!("the previous router closed the handover without a last word (it is gone)");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "no last word from the previous router; going on");
                Ok(())
            }
        }
    }
}
