//! Checks run against a lab: ping, byte-exact TCP transfers, iperf3, and the
//! connectivity matrix the demo prints.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::lab::Lab;
use crate::netns::{self, exec_output, in_netns};

/// Pings `dst` from namespace `ns` until one reply arrives or `deadline_s` passes.
pub fn ping(ns: &str, dst: IpAddr, deadline_s: u32) -> bool {
    let deadline = deadline_s.to_string();
    let dst = dst.to_string();
    exec_output(
        ns,
        "ping",
        &["-n", "-q", "-c", "1", "-i", "0.2", "-w", &deadline, &dst],
    )
    .map(|o| o.status.success())
    .unwrap_or(false)
}

/// Deterministic pseudo-random bytes (xorshift64), so both ends can agree
/// on what was sent without shipping it twice.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Self {
        Pattern(seed | 1)
    }

    /// Fills `buf` with the next bytes of the sequence.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
    }
}

/// `len` bytes of the pattern seeded with `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Pattern::new(seed).fill(&mut v);
    v
}

/// Opens a TCP connection from namespace `from` to `dst` in namespace `to`,
/// lets `send` write into it, and returns the SHA-256 and the number of the
/// bytes that arrived.
fn tcp_send(
    from: &str,
    to: &str,
    dst: IpAddr,
    timeout: Duration,
    send: impl FnOnce(&mut TcpStream) -> std::io::Result<()>,
) -> Result<([u8; 32], u64)> {
    let listener = in_netns(to, move || TcpListener::bind(SocketAddr::new(dst, 0)))?
        .with_context(|| format!("listening on {dst} in {to}"))?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> Result<([u8; 32], u64)> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(timeout))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
            h.update(&buf[..n]);
        }
        Ok((h.finalize().into(), got))
    });
    let sent = (|| -> Result<()> {
        let mut s = in_netns(from, move || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connecting to {addr} from {from}"))?;
        s.set_write_timeout(Some(timeout))?;
        send(&mut s)?;
        s.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    })();
    if let Err(e) = sent {
        // Unblock the receiver by connecting locally, then report the send error.
        let _ = in_netns(to, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        });
        let _ = receiver.join();
        return Err(e);
    }
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

/// Listens on `listen_port` (0: any) in namespace `to`, connects from
/// namespace `from` to `connect` (its port replaced by the listener's when
/// `listen_port` is 0), and returns the source address the listener saw:
/// proof that no NAT happened, or that one did.
pub fn tcp_seen_source(
    from: &str,
    to: &str,
    listen_port: u16,
    connect: SocketAddr,
) -> Result<IpAddr> {
    let unspecified = if connect.is_ipv4() {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    let bind = SocketAddr::new(unspecified, listen_port);
    let listener = in_netns(to, move || TcpListener::bind(bind))?
        .with_context(|| format!("listening on {bind} in {to}"))?;
    let port = listener.local_addr()?.port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(listener.accept().map(|(_, peer)| peer.ip()));
    });
    let addr = if listen_port == 0 {
        SocketAddr::new(connect.ip(), port)
    } else {
        connect
    };
    in_netns(from, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })?
    .with_context(|| format!("connecting to {addr} from {from}"))?;
    rx.recv_timeout(Duration::from_secs(5))
        .context("the listener saw no connection")?
        .context("accepting")
}

/// Sends `data` over TCP from namespace `from` to `dst` in namespace `to`
/// and returns the SHA-256 of what arrived (compare with `sha256(data)`).
pub fn tcp_transfer(
    from: &str,
    to: &str,
    dst: IpAddr,
    data: Vec<u8>,
    timeout: Duration,
) -> Result<[u8; 32]> {
    tcp_send(from, to, dst, timeout, |s| s.write_all(&data)).map(|(h, _)| h)
}

/// Streams `total` pattern bytes over TCP from namespace `from` to `dst`
/// in `to`, hashing on both sides, without holding them in memory. Returns
/// (sent hash, received hash, bytes received).
pub fn tcp_stream(
    from: &str,
    to: &str,
    dst: IpAddr,
    total: u64,
    seed: u64,
    timeout: Duration,
) -> Result<([u8; 32], [u8; 32], u64)> {
    let mut sent = Sha256::new();
    let (got, n) = tcp_send(from, to, dst, timeout, |s| {
        let mut gen = Pattern::new(seed);
        let mut chunk = vec![0u8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = (chunk.len() as u64).min(left) as usize;
            gen.fill(&mut chunk[..n]);
            s.write_all(&chunk[..n])?;
            sent.update(&chunk[..n]);
            left -= n as u64;
        }
        Ok(())
    })?;
    Ok((sent.finalize().into(), got, n))
}

/// The content of UDP datagram `seq` of `len` bytes in `udp_bursts`.
fn datagram(seq: u32, len: usize, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&seq.to_be_bytes());
    buf.extend((4..len).map(|i| (i as u32).wrapping_mul(2654435761).wrapping_add(seq) as u8));
}

/// Sends bursts of UDP datagrams (sizes taken in turn from `sizes`, `per`
/// datagrams per burst) from namespace `from` to `dst` in `to`, waiting for
/// each burst to arrive before the next. Returns (sent, arrived intact,
/// arrived damaged or with the wrong length).
pub fn udp_bursts(
    from: &str,
    to: &str,
    dst: IpAddr,
    sizes: &[usize],
    per: usize,
    rounds: usize,
) -> Result<(u64, u64, u64)> {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let (rx, tx) = udp_pair(from, to, dst)?;
    let (good, bad) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sizes_rx: Vec<usize> = sizes.to_vec();
    let receiver = {
        let (good, bad, done) = (Arc::clone(&good), Arc::clone(&bad), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut want = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let Ok(n) = rx.recv(&mut buf) else { continue };
                let seq = buf
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .unwrap_or(u32::MAX);
                let len = sizes_rx[(seq as usize / per) % sizes_rx.len()];
                datagram(seq, len, &mut want);
                if buf[..n] == want[..] {
                    good.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let mut sent = 0u64;
    let mut msg = Vec::new();
    for round in 0..rounds {
        let len = sizes[round % sizes.len()];
        for _ in 0..per {
            datagram(sent as u32, len, &mut msg);
            tx.send(&msg)?;
            sent += 1;
        }
        let all = sent;
        let _ = netns::wait_for(Duration::from_secs(3), || {
            (good.load(Ordering::Relaxed) + bad.load(Ordering::Relaxed) >= all).then_some(())
        });
    }
    done.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    Ok((
        sent,
        good.load(Ordering::Relaxed),
        bad.load(Ordering::Relaxed),
    ))
}

/// What a receiver counting sequence numbers saw (`udp_in_order`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderCount {
    pub sent: u64,
    pub received: u64,
    /// Datagrams that arrived after one with a higher number.
    pub reordered: u64,
    /// Datagrams that arrived twice.
    pub duplicates: u64,
    /// Datagrams whose bytes were not what was sent.
    pub damaged: u64,
}

/// Sends numbered UDP datagrams of `len` bytes from namespace `from` to
/// `dst` in `to`, in bursts of `burst`, each burst handed to the kernel
/// in UDP GSO sends of up to 40 datagrams (so that they reach the router
/// as super-packets, which it reads as one batch), waiting for each burst
/// to arrive (or 3 s) before the next, until `more` says stop (asked after
/// each burst with what was seen so far); the receiver counts what came
/// out of order, twice or damaged.
pub fn udp_in_order(
    from: &str,
    to: &str,
    dst: IpAddr,
    len: usize,
    burst: usize,
    mut more: impl FnMut(&OrderCount) -> bool,
) -> Result<OrderCount> {
    use std::sync::{Arc, Mutex};
    let (rx, tx) = udp_pair(from, to, dst)?;
    {
        use std::os::fd::AsRawFd;
        let seg = libc::c_int::try_from(len)?;
        // SAFETY: setsockopt on a valid socket with a pointer to a c_int
        // and its size.
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_UDP,
                libc::UDP_SEGMENT,
                (&seg as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            bail!(
                "UDP_SEGMENT on the sender: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    let seen = Arc::new(Mutex::new(OrderCount::default()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let receiver = {
        let (seen, done) = (Arc::clone(&seen), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            let mut want = Vec::new();
            let mut got: Vec<bool> = Vec::new();
            let mut highest: Option<u32> = None;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(n) = rx.recv(&mut buf) else { continue };
                let Some(seq) = buf
                    .get(..4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                else {
                    continue;
                };
                datagram(seq, n, &mut want);
                let mut c = seen.lock().unwrap_or_else(|p| p.into_inner());
                c.received += 1;
                if buf[..n] != want[..] {
                    c.damaged += 1;
                    continue;
                }
                let i = seq as usize;
                if got.len() <= i {
                    got.resize(i + 1, false);
                }
                if std::mem::replace(&mut got[i], true) {
                    c.duplicates += 1;
                }
                if highest.is_some_and(|h| seq < h) {
                    c.reordered += 1;
                }
                highest = highest.max(Some(seq));
            }
        })
    };
    let mut msg = Vec::new();
    let mut gso = Vec::new();
    let mut sent = 0u64;
    let result = (|| -> Result<()> {
        loop {
            let mut left = burst;
            while left > 0 {
                let k = left.min(40);
                gso.clear();
                for _ in 0..k {
                    datagram(sent as u32, len, &mut msg);
                    gso.extend_from_slice(&msg);
                    sent += 1;
                }
                tx.send(&gso)?;
                left -= k;
            }
            let all = sent;
            let _ = netns::wait_for(Duration::from_secs(3), || {
                (seen.lock().map(|c| c.received).unwrap_or(0) >= all).then_some(())
            });
            let now = OrderCount {
                sent,
                ..*seen.lock().unwrap_or_else(|p| p.into_inner())
            };
            if !more(&now) {
                return Ok(());
            }
        }
    })();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = receiver.join();
    result?;
    let c = *seen.lock().unwrap_or_else(|p| p.into_inner());
    Ok(OrderCount { sent, ..c })
}

/// A UDP receiver bound to `dst` in namespace `to` (8 MiB of buffer, reads
/// time out after 200 ms) and a sender in `from` connected to it.
fn udp_pair(
    from: &str,
    to: &str,
    dst: IpAddr,
) -> Result<(std::net::UdpSocket, std::net::UdpSocket)> {
    use std::net::UdpSocket;
    let rx = in_netns(to, move || UdpSocket::bind(SocketAddr::new(dst, 0)))?
        .with_context(|| format!("binding UDP on {dst} in {to}"))?;
    let addr = rx.local_addr()?;
    let tx = in_netns(from, move || -> std::io::Result<UdpSocket> {
        let unspecified: IpAddr = if addr.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let s = UdpSocket::bind(SocketAddr::new(unspecified, 0))?;
        s.connect(addr)?;
        Ok(s)
    })??;
    rx.set_read_timeout(Some(Duration::from_millis(200)))?;
    big_receive_buffer(&rx);
    Ok((rx, tx))
}

/// Gives a test's receiving UDP socket 8 MiB of buffer: a burst must not be
/// lost to the kernel default (208 KiB) when the machine is busy.
pub fn big_receive_buffer(sock: &std::net::UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 8 << 20;
    // SAFETY: setsockopt on a valid socket with a pointer to a c_int and its size.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// One transfer of `len` pattern bytes; true when the hash at the far end matches.
pub fn tcp_ok(from: &str, to: &str, dst: IpAddr, len: usize) -> bool {
    let data = pattern(len, len as u64 ^ 0x7475_6e6d);
    let want = sha256(&data);
    matches!(tcp_transfer(from, to, dst, data, Duration::from_secs(10)), Ok(h) if h == want)
}

/// What one iperf3 run measured, at the receiver unless it says otherwise.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    /// Receiver goodput: bytes that arrived / time (for UDP too: iperf3's
    /// `end.sum` is the sender's rate there).
    pub gbps: f64,
    /// The sender's rate.
    pub sent_gbps: f64,
    /// Bytes that arrived.
    pub received_bytes: u64,
    /// TCP retransmits, or UDP receiver loss in percent.
    pub retr_or_loss: f64,
    /// The slowest whole second at the receiver (iperf3's 1 s intervals;
    /// a last partial one is left out).
    pub worst_interval_gbps: Option<f64>,
}

/// The lowest rate among iperf3 intervals of at least half a second.
fn worst_interval(intervals: &serde_json::Value) -> Option<f64> {
    intervals
        .as_array()?
        .iter()
        .filter(|i| i["sum"]["seconds"].as_f64().is_some_and(|s| s >= 0.5))
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .map(|b| b / 1e9)
        .min_by(f64::total_cmp)
}

/// Reads what one iperf3 client run (`-J --get-server-output`, the server
/// with `-J`) measured. `reverse`: the server sent (`-R`).
pub fn parse_iperf3(v: &serde_json::Value, reverse: bool) -> Result<Iperf> {
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3: {e}");
    }
    let end = &v["end"];
    let received = &end["sum_received"];
    let gbps = received["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received")?
        / 1e9;
    let udp = v["start"]["test_start"]["protocol"].as_str() == Some("UDP");
    let retr_or_loss = if udp {
        received["lost_percent"].as_f64().unwrap_or(0.0)
    } else {
        end["sum_sent"]["retransmits"].as_f64().unwrap_or(0.0)
    };
    // The receiver's intervals: the server's (in its JSON, which the client
    // fetched), or the client's own with -R.
    let worst = if reverse {
        worst_interval(&v["intervals"])
    } else {
        worst_interval(&v["server_output_json"]["intervals"])
    };
    Ok(Iperf {
        gbps,
        sent_gbps: end["sum_sent"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        received_bytes: received["bytes"].as_u64().unwrap_or(0),
        retr_or_loss,
        worst_interval_gbps: worst,
    })
}

/// `iperf3` (no extra arguments) on a thread of its own, as the load
/// under a fault a test brings about meanwhile; join it for the result.
pub fn iperf3_in_background(
    client: &str,
    server: &str,
    server_ip: IpAddr,
    seconds: u32,
) -> std::thread::JoinHandle<Result<Iperf>> {
    let (client, server) = (client.to_string(), server.to_string());
    std::thread::spawn(move || iperf3(&client, &server, server_ip, seconds, &[]))
}

/// iperf3 from namespace `client` to `server_ip` in namespace `server`.
/// `extra` goes to the client (e.g. `-R`, `-P 4`, `-u -b 0`).
pub fn iperf3(
    client: &str,
    server: &str,
    server_ip: IpAddr,
    seconds: u32,
    extra: &[&str],
) -> Result<Iperf> {
    let port = "5201";
    let log = std::env::temp_dir().join(format!(
        "tunmesh-iperf3-{}-{server}.log",
        std::process::id()
    ));
    let mut srv = netns::spawn(
        server,
        std::path::Path::new("iperf3"),
        &["-s", "-1", "-J", "-p", port],
        &[],
        &log,
    )?;
    let listening = netns::wait_for(Duration::from_secs(10), || {
        let out = exec_output(server, "ss", &["-Hltn", "sport", "=", ":5201"]).ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    let result = (|| -> Result<Iperf> {
        if listening.is_none() {
            bail!("iperf3 server did not start in {server}");
        }
        let (secs, limit, dst) = (
            seconds.to_string(),
            (seconds + 20).to_string(),
            server_ip.to_string(),
        );
        // `timeout`: a stuck tunnel ends the run instead of hanging it.
        let mut args = vec![
            limit.as_str(),
            "iperf3",
            "-c",
            &dst,
            "-p",
            port,
            "-t",
            &secs,
            "-J",
            "--get-server-output",
        ];
        args.extend_from_slice(extra);
        let out = exec_output(client, "timeout", &args)?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
        parse_iperf3(&v, extra.contains(&"-R"))
    })();
    netns::stop_pid(srv.id(), Duration::from_secs(2));
    let _ = srv.wait();
    let _ = std::fs::remove_file(&log);
    result
}

/// The outcome for one ordered pair of the matrix.
#[derive(Debug, Clone)]
pub struct PairResult {
    pub from: String,
    pub to: String,
    pub ping4: bool,
    pub ping6: bool,
    pub tcp4: bool,
    pub tcp6: bool,
}

impl PairResult {
    pub fn ok(&self) -> bool {
        self.ping4 && self.ping6 && self.tcp4 && self.tcp6
    }
}

/// Bytes sent per TCP check.
pub const TCP_CHECK_BYTES: usize = 256 * 1024;

/// Every pod to every other pod, and every node to every pod: ping over
/// IPv4 and IPv6 and a byte-compared TCP transfer over each family.
pub fn matrix(lab: &Lab) -> Vec<PairResult> {
    let mut sources: Vec<(String, String)> = lab
        .state
        .pods
        .iter()
        .map(|p| (p.name.clone(), p.ns.clone()))
        .collect();
    sources.extend(
        lab.state
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.ns.clone())),
    );
    let mut out = Vec::new();
    for (from, from_ns) in &sources {
        for to in &lab.state.pods {
            if *from == to.name {
                continue;
            }
            let r = PairResult {
                from: from.clone(),
                to: to.name.clone(),
                ping4: ping(from_ns, to.ipv4.into(), 5),
                ping6: ping(from_ns, to.ipv6.into(), 5),
                tcp4: tcp_ok(from_ns, &to.ns, to.ipv4.into(), TCP_CHECK_BYTES),
                tcp6: tcp_ok(from_ns, &to.ns, to.ipv6.into(), TCP_CHECK_BYTES),
            };
            out.push(r);
        }
    }
    out
}

/// A readable table of the matrix.
pub fn matrix_table(results: &[PairResult]) -> String {
    let mark = |b: bool| if b { "ok" } else { "FAIL" };
    let w = results
        .iter()
        .map(|r| r.from.len().max(r.to.len()))
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!(
        "{:w$}  {:w$}  {:5} {:5} {:5} {:5}\n",
        "from", "to", "ping4", "ping6", "tcp4", "tcp6"
    );
    for r in results {
        s += &format!(
            "{:w$}  {:w$}  {:5} {:5} {:5} {:5}\n",
            r.from,
            r.to,
            mark(r.ping4),
            mark(r.ping6),
            mark(r.tcp4),
            mark(r.tcp6)
        );
    }
    s
}

/// A plain HTTP/1.1 GET from inside namespace `ns`; returns the status
/// code and the body (the router's metrics and health endpoints).
pub fn http_get(ns: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = in_netns(ns, move || -> std::io::Result<Vec<u8>> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    })?
    .with_context(|| format!("GET http://{addr}{path} in {ns}"))?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    // The router answers with a length; a chunked body is not expected.
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> serde_json::Value {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(name);
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
    }

    /// iperf3 3.12's UDP `end.sum` is the sender's rate: the goodput is
    /// what arrived (a loopback flood that lost 78%, recorded here).
    #[test]
    fn udp_goodput_is_what_arrived_not_what_was_sent() {
        let v = fixture("iperf3-3.12-udp.json");
        let r = parse_iperf3(&v, false).unwrap();
        assert!((r.gbps - 0.3436).abs() < 0.001, "{r:?}");
        assert!((r.sent_gbps - 1.5692).abs() < 0.001, "{r:?}");
        assert!((r.retr_or_loss - 78.1).abs() < 0.1, "{r:?}");
        assert_eq!(r.received_bytes, 85_915_632, "{r:?}");
        // The server's 1 s intervals (0.33, 0.36), not the short last one.
        assert!(
            (r.worst_interval_gbps.unwrap() - 0.326).abs() < 0.001,
            "{r:?}"
        );
    }

    #[test]
    fn tcp_goodput_and_the_slowest_second_come_from_the_receiver() {
        let v = fixture("iperf3-3.12-tcp.json");
        let r = parse_iperf3(&v, false).unwrap();
        assert!((r.gbps - 7.7739).abs() < 0.001, "{r:?}");
        assert!(
            (r.worst_interval_gbps.unwrap() - 6.635).abs() < 0.001,
            "{r:?}"
        );
        assert!(parse_iperf3(&serde_json::json!({"error": "unable to connect"}), false).is_err());
        assert!(parse_iperf3(&serde_json::json!({"end": {}}), false).is_err());
    }
}
