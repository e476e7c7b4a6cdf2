//! Handover: a starting router takes the running one's place without a
//! packet lost and without a new handshake, and commits only once it
//! forwards: a new version that dies right after taking over leaves the
//! node to the old router, not to nobody.
//!
//! The running router listens on `<state-dir>/handover.sock` (0600). A new
//! one that finds it there connects and, over that stream:
//!
//! ```text
//! new  -> old   Hello { format, pid }
//! old  -> new   Refuse (a format it does not speak), or, still forwarding:
//!               State (the mesh, each peer's session index) + the TUN
//!               queues and UDP sockets (SCM_RIGHTS; the old keeps its own
//!               copies)
//! new           checks it and builds its peers from it
//! new  -> old   Ready, or Nack { why } when it cannot use the state
//! old           stops its workers (nothing is read or sealed from here on)
//! old  -> new   Sessions: when it stopped, and every live session with its
//!               send counters COUNTER_MARGIN ahead (`wire`: compact binary)
//! new  -> old   Ack, or Nack { why }
//! old  -> new   Released: the Ack is taken, the old stays stopped unless
//!               this handover fails
//! new           gives each peer its session, starts its workers, and once
//!               they run:
//! new  -> old   Forwarding
//! old  -> new   Committed, then exits or parks (see `AfterHandover`)
//! ```
//!
//! Only what must wait for the stop is done between the stop and the new
//! workers' start: the sessions' export, their bytes, their decoding. The
//! mesh, the descriptors and the new peers are made while the old router
//! still forwards; a session becomes its peer's `Tunn` at the peer's
//! first use.
//!
//! Until Forwarding the old router keeps everything it needs to resume:
//! its descriptors, its peers and their sessions. It resumes when the new
//! one refuses (Nack), when no Ack comes within `ACK_TIMEOUT`, when the
//! socket closes before Forwarding (the new one died), or when Forwarding
//! does not come within `FORWARD_TIMEOUT` of Released (it then says
//! `Resuming` first, and the new one, if it is alive after all, stops).
//!
//! Nonces: no (key, counter) pair is ever used twice. The old process stops
//! sealing before the state leaves it; the new one seals with counters
//! starting `COUNTER_MARGIN` past the old ones, and only after Released. If
//! the old resumes before it took an Ack, the new one sealed nothing and the
//! sessions go on as they were. If it resumes after an Ack, the new one may
//! have sealed any number of packets with those keys: the old router then
//! drops every session and handshakes afresh with every peer (new keys, new
//! indices; `Dataplane::fresh_sessions`), so nothing it seals can collide
//! with what the new one sent, and nothing the new one received can be
//! replayed to it.
//!
//! The new router seals nothing unless Released came: an old router that
//! gave up on the Ack (and resumed with the sessions it had) closes the
//! socket instead, and the new one exits without sending anything.
//! Packets that arrive while neither runs its workers wait in the kernel's
//! queues (the same TUN queues and sockets) and are read by whichever does.
//!
//! A new router that finds an old one speaking format 1 (the protocol
//! before the commit at Forwarding: the State after the stop, with the
//! sessions in it, and no Ready or Sessions) takes over in that format: the
//! old one then commits at the Ack, as it always did.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boringtun::noise::state::{SessionState, TunnState};
use serde::{Deserialize, Serialize};

use crate::dataplane::PeerSession;
use crate::source::file::RawFile;
use crate::PublicKey;

pub mod successor;
pub mod wire;

/// The socket's file name in the state directory.
pub const SOCKET: &str = "handover.sock";
/// The handover format this router speaks first: the commit at Forwarding.
pub const FORMAT: u32 = 2;
/// The format before it (the old router committed at the Ack), still
/// spoken with a router of that version, either way.
pub const LEGACY_FORMAT: u32 = 1;
/// How far ahead of the old process's send counters the new one starts.
/// The old one sends nothing after the export; the margin is there so that
/// even a packet sealed by mistake in between could not share a nonce.
pub const COUNTER_MARGIN: u64 = 1 << 16;
/// How long the old router waits for the new one's answer to the state
/// (the new one checks it and adopts the descriptors: milliseconds).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the old router waits for Forwarding after Released (the new
/// one adopts the sessions and starts its workers: milliseconds), and the
/// new one for Released and for the old one's last word.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// The most file descriptors one handover carries (queues are at most a
/// few; two descriptors each).
pub const MAX_FDS: usize = 64;
/// The largest message accepted (a mesh of thousands of peers fits).
pub const MAX_MESSAGE: u32 = 64 << 20;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET)
}

/// What went wrong in a handover, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("handover message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the running router refused the handover: {0}")]
    Refused(String),
    #[error("the handed-over state cannot be used: {0}")]
    Unusable(#[from] StateError),
    #[error("a handover message of {0} bytes (at most {MAX_MESSAGE})")]
    TooLarge(u64),
    #[error("{got} descriptors came for {queues} queues")]
    Descriptors { got: usize, queues: usize },
    #[error("adopting a handed-over descriptor: {0}")]
    Adopt(#[source] std::io::Error),
    #[error("the new router answered {0}")]
    Nack(String),
    #[error("the running router did not confirm our Ack (it may have resumed on its own): {0}")]
    NotReleased(#[source] Box<HandoverError>),
    #[error("the running router resumed before this one was forwarding: {0}")]
    Resumed(String),
}

/// Why a handed-over state cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("format {0}, this router reads {FORMAT}")]
    Format(u32),
    #[error("the running router's key is {theirs}, this one's {ours}")]
    Key { theirs: String, ours: String },
    #[error("the running router's interface is {theirs}, this one's {ours}")]
    Interface { theirs: String, ours: String },
    #[error("no queues")]
    NoQueues,
    #[error("{field}: {problem}")]
    Field { field: String, problem: String },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Hello {
    pub format: u32,
    pub pid: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Refuse(String),
    /// The state; the descriptors came with this message (TUN queues, then
    /// UDP sockets, `queues` of each).
    State(Box<State>),
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Ack,
    Nack(String),
    /// (format 2) The new router checked the state and built its peers:
    /// the old one may stop and send the sessions.
    Ready,
}

/// (format 2) The old router stopped: when, and the sessions follow as a
/// frame of their own (`wire`).
#[derive(Debug, Serialize, Deserialize)]
pub struct Sessions {
    pub stopped_unix_nanos: u128,
    pub count: usize,
}

/// The old router took the Ack: it stays stopped unless this handover
/// fails (the new one dies or stays silent before Forwarding).
#[derive(Debug, Serialize, Deserialize)]
pub struct Released {
    pub pid: u32,
}

/// The new router's workers run: from here on the node is its.
#[derive(Debug, Serialize, Deserialize)]
pub enum Progress {
    Forwarding,
}

/// The old router's last word after Released.
#[derive(Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// It lets go of everything (exiting, or parking: `AfterHandover`).
    Committed,
    /// Forwarding came too late: it serves again, and the new one must stop.
    Resuming(String),
}

/// Where in a handover the new router is: the points a test build can make
/// it fail at (`Faults`), and what the old one reports a failure after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Hello sent, the state not read yet.
    AfterHello,
    /// The state and the descriptors arrived, not answered yet (the old
    /// router still forwards).
    AfterState,
    /// The sessions arrived (the old router stopped), not answered yet.
    AfterSessions,
    /// Ack sent, Released not read yet.
    AfterAck,
    /// Released read: the node is about to be this router's.
    AfterReleased,
    /// Sessions adopted and peers in place, workers not started.
    BeforeWorkers,
    /// Workers running, Forwarding not sent yet.
    AfterWorkers,
}

impl Step {
    pub const ALL: [Step; 7] = [
        Step::AfterHello,
        Step::AfterState,
        Step::AfterSessions,
        Step::AfterAck,
        Step::AfterReleased,
        Step::BeforeWorkers,
        Step::AfterWorkers,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::AfterHello => "after-hello",
            Step::AfterState => "after-state",
            Step::AfterSessions => "after-sessions",
            Step::AfterAck => "after-ack",
            Step::AfterReleased => "after-released",
            Step::BeforeWorkers => "before-workers",
            Step::AfterWorkers => "after-workers",
        }
    }

    pub fn parse(text: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == text)
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Faults a test build injects into the new router's side of a handover.
/// The router itself passes `NoFaults`: nothing in it can trigger one.
pub trait Faults: Send + Sync {
    /// Called as the new router reaches `step`.
    fn at(&self, step: Step);
}

/// The router's own: no fault anywhere.
pub struct NoFaults;

impl Faults for NoFaults {
    fn at(&self, _: Step) {}
}

/// What the old router does once it has handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterHandover {
    /// Exit (status 0).
    Exit,
    /// Let go of every descriptor and wait for SIGTERM: for a DaemonSet
    /// whose new pod starts beside the old one (`maxSurge`), where an
    /// exited container would be restarted by kubelet and take the node
    /// back. The DaemonSet controller deletes the old pod once the new one
    /// is ready.
    Wait,
}

/// Everything the new process needs to go on where the old one stopped.
#[derive(Debug, Serialize, Deserialize)]
pub struct State {
    pub format: u32,
    pub pid: u32,
    /// When the old process's workers stopped (Unix nanoseconds): the new
    /// one reports the gap from there to its own workers' start.
    pub stopped_unix_nanos: u128,
    pub public_key: String,
    pub interface: String,
    pub listen_port: u16,
    pub tun_offload: bool,
    pub udp_offload: bool,
    pub queues: usize,
    /// The last applied mesh and pod CIDRs, in the mesh file's shape.
    pub mesh: RawFile,
    /// (format 1 only: format 2 sends them after the stop, as `Sessions`.)
    pub sessions: Vec<WireSession>,
    /// Each peer's session index (format 2), so that the new router's
    /// peers fit the sessions that follow.
    #[serde(default)]
    pub indices: Vec<(String, u32)>,
}

/// A peer's session as it travels (keys base64, durations in nanoseconds).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireSession {
    pub name: String,
    pub public_key: String,
    pub index: u32,
    pub endpoint: Option<String>,
    pub sessions: Vec<(usize, WireKeys)>,
    pub current: usize,
    pub is_initiator: bool,
    pub timer_ages_ns: Vec<u64>,
    pub want_keepalive: bool,
    pub want_handshake: bool,
    pub next_index: u32,
    pub last_handshake_timestamp: (u64, u32),
    pub tx_bytes: usize,
    pub rx_bytes: usize,
    pub last_rtt: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireKeys {
    pub receiving_index: u32,
    pub sending_index: u32,
    pub receiving_key: String,
    pub sending_key: String,
    pub sending_counter: u64,
    pub replay_next: u64,
    pub replay_received: u64,
    pub replay_bitmap: Vec<u64>,
    pub age_ns: u64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl From<&PeerSession> for WireSession {
    fn from(p: &PeerSession) -> Self {
        let t = &p.tunn;
        WireSession {
            name: p.name.clone(),
            public_key: p.public_key.to_base64(),
            index: p.index,
            endpoint: p.endpoint.map(|e| e.to_string()),
            sessions: t
                .sessions
                .iter()
                .map(|(slot, s)| {
                    (
                        *slot,
                        WireKeys {
                            receiving_index: s.receiving_index,
                            sending_index: s.sending_index,
                            receiving_key: b64(s.receiving_key),
                            sending_key: b64(s.sending_key),
                            sending_counter: s.sending_counter,
                            replay_next: s.replay_next,
                            replay_received: s.replay_received,
                            replay_bitmap: s.replay_bitmap.clone(),
                            age_ns: nanos(s.age),
                        },
                    )
                })
                .collect(),
            current: t.current,
            is_initiator: t.is_initiator,
            timer_ages_ns: t.timer_ages.iter().map(|d| nanos(*d)).collect(),
            want_keepalive: t.want_keepalive,
            want_handshake: t.want_handshake,
            next_index: t.next_index,
            last_handshake_timestamp: t.last_handshake_timestamp,
            tx_bytes: t.tx_bytes,
            rx_bytes: t.rx_bytes,
            last_rtt: t.last_rtt,
        }
    }
}

/// 32 key bytes as base64 (the public-key type's encoding, for any key).
fn b64(bytes: [u8; 32]) -> String {
    PublicKey::from_bytes(bytes).to_base64()
}

fn key32(text: &str, field: String) -> Result<[u8; 32], StateError> {
    PublicKey::from_base64(text)
        .map(|k| *k.as_bytes())
        .map_err(|e| StateError::Field {
            field,
            problem: e.to_string(),
        })
}

impl WireSession {
    pub fn to_session(&self) -> Result<PeerSession, StateError> {
        let label = format!("sessions[{:?}]", self.name);
        let field = |f: &str, problem: String| StateError::Field {
            field: format!("{label}.{f}"),
            problem,
        };
        let public_key = tunmesh_contract::validate::public_key(&self.public_key)
            .map_err(|e| field("public_key", e.to_string()))?;
        let endpoint = self
            .endpoint
            .as_deref()
            .map(tunmesh_contract::validate::endpoint)
            .transpose()
            .map_err(|e| field("endpoint", e.to_string()))?;
        let mut sessions = Vec::new();
        for (slot, k) in &self.sessions {
            sessions.push((
                *slot,
                SessionState {
                    receiving_index: k.receiving_index,
                    sending_index: k.sending_index,
                    receiving_key: key32(&k.receiving_key, format!("{label}.receiving_key"))?,
                    sending_key: key32(&k.sending_key, format!("{label}.sending_key"))?,
                    sending_counter: k.sending_counter,
                    replay_next: k.replay_next,
                    replay_received: k.replay_received,
                    replay_bitmap: k.replay_bitmap.clone(),
                    age: Duration::from_nanos(k.age_ns),
                },
            ));
        }
        Ok(PeerSession {
            name: self.name.clone(),
            public_key,
            index: self.index,
            endpoint,
            tunn: TunnState {
                sessions,
                current: self.current,
                is_initiator: self.is_initiator,
                timer_ages: self
                    .timer_ages_ns
                    .iter()
                    .map(|n| Duration::from_nanos(*n))
                    .collect(),
                want_keepalive: self.want_keepalive,
                want_handshake: self.want_handshake,
                next_index: self.next_index,
                last_handshake_timestamp: self.last_handshake_timestamp,
                tx_bytes: self.tx_bytes,
                rx_bytes: self.rx_bytes,
                last_rtt: self.last_rtt,
            },
        })
    }
}

/// Writes one message: its length (4 bytes, big-endian), then its JSON;
/// `fds` ride along with the first byte.
pub fn send<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), HandoverError> {
    let body = serde_json::to_vec(msg)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or(HandoverError::TooLarge(body.len() as u64))?;
    let mut head = len.to_be_bytes();
    send_with_fds(sock, &mut head, fds)?;
    (&*sock).write_all(&body)?;
    Ok(())
}

/// Writes one frame of raw bytes (its length, then the bytes).
pub fn send_bytes(sock: &UnixStream, body: &[u8]) -> Result<(), HandoverError> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_MESSAGE)
        .ok_or(HandoverError::TooLarge(body.len() as u64))?;
    (&*sock).write_all(&len.to_be_bytes())?;
    (&*sock).write_all(body)?;
    Ok(())
}

/// Reads one frame `send_bytes` wrote.
pub fn recv_bytes(sock: &UnixStream) -> Result<Vec<u8>, HandoverError> {
    let mut head = [0u8; 4];
    (&*sock).read_exact(&mut head)?;
    let len = u32::from_be_bytes(head);
    if len > MAX_MESSAGE {
        return Err(HandoverError::TooLarge(u64::from(len)));
    }
    let mut body = vec![0u8; len as usize];
    (&*sock).read_exact(&mut body)?;
    Ok(body)
}

/// Reads one message and the descriptors that came with it.
pub fn recv<T: for<'de> Deserialize<'de>>(
    sock: &UnixStream,
) -> Result<(T, Vec<OwnedFd>), HandoverError> {
    let mut head = [0u8; 4];
    let (n, fds) = recv_with_fds(sock, &mut head)?;
    if n == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    (&*sock).read_exact(&mut head[n..])?;
    let len = u32::from_be_bytes(head);
    if len > MAX_MESSAGE {
        return Err(HandoverError::TooLarge(u64::from(len)));
    }
    let mut body = vec![0u8; len as usize];
    (&*sock).read_exact(&mut body)?;
    Ok((serde_json::from_slice(&body)?, fds))
}

/// Room for `MAX_FDS` descriptors in a control message, in u64 words.
const CTRL_WORDS: usize = 2 + MAX_FDS / 2 + 2;

fn iovec(data: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    }
}

/// A message header over one buffer and a control buffer (all of it); the
/// caller keeps both alive across the system call.
fn msghdr(iov: &mut libc::iovec, ctrl: &mut [u64; CTRL_WORDS]) -> libc::msghdr {
    // SAFETY: a zeroed msghdr is valid (no buffers, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(ctrl);
    msg
}

fn send_with_fds(
    sock: &UnixStream,
    data: &mut [u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "too many descriptors",
        ));
    }
    let mut ctrl = [0u64; CTRL_WORDS];
    let mut iov = iovec(data);
    let mut msg = msghdr(&mut iov, &mut ctrl);
    msg.msg_controllen = 0;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds) as u32;
        // SAFETY: CMSG_SPACE is pure arithmetic.
        let space = unsafe { libc::CMSG_SPACE(bytes) } as usize;
        msg.msg_controllen = space;
        // SAFETY: the control buffer holds `space` bytes (checked against
        // MAX_FDS above), so the first header and its data fit.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes) as usize;
            let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                p.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at live buffers.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sent = r as usize;
    if sent < data.len() {
        (&*sock).write_all(&data[sent..])?;
    }
    Ok(())
}

fn recv_with_fds(sock: &UnixStream, data: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut ctrl = [0u64; CTRL_WORDS];
    let mut iov = iovec(data);
    let mut msg = msghdr(&mut iov, &mut ctrl);
    // SAFETY: `msg` points at live buffers; CMSG_CLOEXEC keeps received
    // descriptors out of children.
    let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into `ctrl`,
    // within msg_controllen; each SCM_RIGHTS entry is a descriptor now ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c).cast::<libc::c_int>();
                for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(p.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "descriptors were cut off",
        ));
    }
    Ok((r as usize, fds))
}

/// Listens for a successor at `<state_dir>/handover.sock` (0600), in place
/// of whatever file was there (the previous router's, gone now).
pub fn listen(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    l.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(l)
}

/// The flag that starts a parked router (internal: see `park`).
pub const PARKED_FLAG: &str = "--parked-after-handover";

/// Replaces this process with a parked router (`tunmesh-router
/// --parked-after-handover`): same pid, no descriptor but stdio (all of
/// ours are close-on-exec), waiting for SIGTERM. Returns only on failure.
pub fn park() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("/proc/self/exe")
        .arg(PARKED_FLAG)
        .exec()
}

/// Whether another socket holds UDP `port` (a router running or starting
/// on this node).
pub fn port_busy(port: u16) -> bool {
    let busy = |r: std::io::Result<std::net::UdpSocket>| matches!(r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
    busy(std::net::UdpSocket::bind((
        std::net::Ipv6Addr::UNSPECIFIED,
        port,
    ))) || busy(std::net::UdpSocket::bind((
        std::net::Ipv4Addr::UNSPECIFIED,
        port,
    )))
}

/// Whether process `pid` is still there.
pub fn alive(pid: u32) -> bool {
    // A zombie has exited too: it holds no descriptor any more.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Checks a received state against this router; why not, if it does not fit.
pub fn check(st: &State, public_key: &PublicKey, interface: &str) -> Result<(), StateError> {
    if st.format != FORMAT && st.format != LEGACY_FORMAT {
        return Err(StateError::Format(st.format));
    }
    if st.public_key != public_key.to_base64() {
        return Err(StateError::Key {
            theirs: st.public_key.clone(),
            ours: public_key.to_base64(),
        });
    }
    if st.interface != interface {
        return Err(StateError::Interface {
            theirs: st.interface.clone(),
            ours: interface.to_string(),
        });
    }
    if st.queues == 0 {
        return Err(StateError::NoQueues);
    }
    Ok(())
}

/// The descriptors of `queues`, TUN queues first, for `send`.
pub fn queue_fds(queues: &[crate::status::RealQueue]) -> Vec<BorrowedFd<'_>> {
    queues
        .iter()
        .map(|(t, _)| t.as_fd())
        .chain(queues.iter().map(|(_, u)| u.as_fd()))
        .collect()
}

/// Reads `Hello` with a deadline (a client that says nothing is dropped).
pub fn read_hello(sock: &UnixStream) -> Result<Hello, HandoverError> {
    sock.set_read_timeout(Some(Duration::from_secs(2)))?;
    Ok(recv::<Hello>(sock)?.0)
}
