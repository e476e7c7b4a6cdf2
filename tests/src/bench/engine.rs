//! `tunmesh-lab engine-bench`: one flow sealed and opened by the engine
//! with 1 crypto worker and with 2, over in-memory batches (no kernel, no
//! socket, no TUN: one side's sealed batch is the other side's input), so
//! the machine's cores are the engine's alone and what is measured is the
//! speed-up of one flow's AEAD spread over workers.
//!
//! Each configuration is a pair of data planes with a session between
//! them (made by the engines' own handshake). One step: A seals a batch of
//! `BATCH` packets of one flow (1420 bytes, 10.244.1.5 to 10.244.2.7),
//! B opens what A sealed. A repetition runs each configuration for the
//! same time, in an order rotated each repetition; the ratio is taken
//! inside the repetition, and the headline is the median of the ratios
//! with their spread. A third configuration, two such flows with one
//! worker each on two threads at once, says what the machine gave a
//! second thread in that repetition (on this shared machine, often less
//! than a core): the ceiling the 2-worker figure is to be read against. Every step checks what B delivered: the packets'
//! count and nothing dropped; every 16th step also their order (a
//! sequence number in each), so a figure is never taken from a run that
//! lost or reordered packets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Result};
use serde::Serialize;
use tunmesh_keygen::PrivateKey;
use tunmesh_router::dataplane::{Batch, Dataplane, Drop, Plan, BATCH};
use tunmesh_router::model::{DesiredMesh, PeerSpec};

use super::Spread;

const A_AT: &str = "192.0.2.1:51820";
const B_AT: &str = "192.0.2.2:51820";
/// The inner packets: the TUN MTU the lab uses.
const PACKET: usize = 1420;
/// Every step checks that the whole batch arrived; every this many steps,
/// also each packet's number, so that its order is checked.
const CHECK_EVERY: u64 = 16;

/// One configuration's run in one repetition.
#[derive(Debug, Clone, Serialize)]
pub struct EngineRow {
    pub rep: u32,
    pub workers: usize,
    /// Inner bytes sealed by A and delivered by B, per second, in Gbit/s.
    pub gbps: f64,
    /// Batches the crypto workers split, and the chunks helpers ran.
    pub parallel_batches: u64,
    pub helper_chunks: u64,
    pub chunks: u64,
    /// Time the posting thread waited for helpers' chunks, microseconds.
    pub wait_us: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct EngineReport {
    pub rows: Vec<EngineRow>,
    /// 2 workers over 1, per repetition.
    pub ratios: Vec<f64>,
    pub speedup: Option<Spread>,
    /// Two flows on two threads over one flow on one, per repetition: what
    /// the machine gave a second thread meanwhile.
    pub ceiling: Option<Spread>,
}

impl EngineReport {
    /// The line a script reads.
    pub fn line(&self) -> String {
        match &self.speedup {
            Some(s) => format!(
                "engine: one flow 2/1 workers = {:.2} (median of {} per-repetition ratios, min {:.2}, max {:.2}; two flows on two threads, the machine's ceiling: {})",
                s.median,
                s.n,
                s.min,
                s.max,
                self.ceiling
                    .map(|c| format!("{:.2} [{:.2}-{:.2}]", c.median, c.min, c.max))
                    .unwrap_or_else(|| "n/a".into())
            ),
            None => "engine: one flow 2/1 workers = n/a (no repetition measured both)".into(),
        }
    }
}

/// Two data planes with a session, `workers` crypto workers each.
struct Pair {
    a: Arc<Dataplane>,
    b: Arc<Dataplane>,
    a_at: SocketAddr,
    input: Batch,
    sealed: Batch,
    icmp: Batch,
    delivered: Batch,
    replies: Batch,
    plan_a: Plan,
    plan_b: Plan,
}

fn spec(name: &str, key: &PrivateKey, at: &str, cidr: &str) -> Result<PeerSpec> {
    Ok(PeerSpec {
        name: name.into(),
        public_key: key.public_key(),
        endpoint: Some(at.parse()?),
        allowed_ips: vec![cidr.parse()?],
        node_addresses: vec![],
        persistent_keepalive: None,
        rotated_from: None,
        key_created_unix: None,
        underlay_mtu: None,
    })
}

/// An IPv4 UDP packet of `len` bytes from 10.244.1.5 to 10.244.2.7 with
/// sequence number `seq` in its first payload bytes.
fn packet(buf: &mut [u8], len: usize, seq: u64) {
    buf[..len].fill(0x5a);
    buf[0] = 0x45;
    buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    buf[8] = 64;
    buf[9] = 17;
    buf[12..16].copy_from_slice(&[10, 244, 1, 5]);
    buf[16..20].copy_from_slice(&[10, 244, 2, 7]);
    buf[28..36].copy_from_slice(&seq.to_be_bytes());
}

fn seq_of(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(28..36)?.try_into().ok()?))
}

impl Pair {
    fn new(workers: usize) -> Result<Pair> {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let a = Dataplane::new(&ka, PACKET);
        let b = Dataplane::new(&kb, PACKET);
        // One set of crypto workers for both sides, as one router has:
        // the process seals and opens on one thread and `workers - 1`
        // helpers.
        a.start_crypto_workers(workers);
        b.share_crypto_workers(&a);
        a.apply(&DesiredMesh {
            peers: vec![spec("b", &kb, B_AT, "10.244.2.0/24")?],
            blackhole_cidrs: vec![],
        });
        b.apply(&DesiredMesh {
            peers: vec![spec("a", &ka, A_AT, "10.244.1.0/24")?],
            blackhole_cidrs: vec![],
        });
        let size = a.buf_size();
        let mut p = Pair {
            a,
            b,
            a_at: A_AT.parse()?,
            input: Batch::new(BATCH, size),
            sealed: Batch::new(BATCH, size),
            icmp: Batch::new(BATCH, size),
            delivered: Batch::new(BATCH, size),
            replies: Batch::new(BATCH, size),
            plan_a: Plan::new(),
            plan_b: Plan::new(),
        };
        p.handshake()?;
        Ok(p)
    }

    /// A's first packet starts the handshake; carried both ways until
    /// the session is up and the packet arrived.
    fn handshake(&mut self) -> Result<()> {
        let b_at: SocketAddr = B_AT.parse()?;
        self.fill(1, 0);
        self.a.seal(
            &self.a.table(),
            &self.input,
            &mut self.sealed,
            &mut self.icmp,
            &mut self.plan_a,
        );
        let mut to_b: Vec<Vec<u8>> = (0..self.sealed.n)
            .map(|i| self.sealed.packet(i).to_vec())
            .collect();
        self.sealed.n = 0;
        for _ in 0..8 {
            let mut to_a = Vec::new();
            if !to_b.is_empty() {
                load(&mut self.sealed, &to_b, self.a_at);
                to_b.clear();
                self.open_at_b();
                if self.delivered.n > 0 {
                    return Ok(());
                }
                to_a.extend((0..self.replies.n).map(|i| self.replies.packet(i).to_vec()));
            }
            if !to_a.is_empty() {
                load(&mut self.sealed, &to_a, b_at);
                self.delivered.n = 0;
                self.replies.n = 0;
                let t = self.a.table();
                let done = self.a.open(
                    &t,
                    &self.sealed,
                    &mut self.delivered,
                    &mut self.replies,
                    &mut self.plan_a,
                );
                to_b.extend((0..self.replies.n).map(|i| self.replies.packet(i).to_vec()));
                if done {
                    while self.a.flush_waiting(&t, &mut self.replies) {
                        to_b.extend((0..self.replies.n).map(|i| self.replies.packet(i).to_vec()));
                        self.replies.n = 0;
                    }
                    to_b.extend((0..self.replies.n).map(|i| self.replies.packet(i).to_vec()));
                }
            }
        }
        bail!("the engines' handshake did not complete")
    }

    /// B opens what is in `sealed` (into `delivered`, its replies into
    /// `replies`).
    fn open_at_b(&mut self) {
        self.delivered.n = 0;
        self.replies.n = 0;
        let t = self.b.batch_table();
        self.b.open(
            &t,
            &self.sealed,
            &mut self.delivered,
            &mut self.replies,
            &mut self.plan_b,
        );
    }

    /// `n` packets of the flow, numbered from `first`, as A's TUN input.
    fn fill(&mut self, n: usize, first: u64) {
        self.input.n = 0;
        for i in 0..n {
            packet(&mut self.input.bufs[i], PACKET, first + i as u64);
            self.input.commit(PACKET, self.a_at);
        }
    }

    /// One step: A seals the batch, B opens it; checks that every packet
    /// arrived and, with `check`, that they arrived in order, numbered
    /// from `first` (the numbers are written for those steps only: a
    /// check is memory traffic the engine does not make).
    fn step(&mut self, first: u64, check: bool) -> Result<u64> {
        if check {
            for i in 0..self.input.n {
                let seq = first + i as u64;
                self.input.bufs[i][28..36].copy_from_slice(&seq.to_be_bytes());
            }
        }
        self.sealed.n = 0;
        let t = self.a.batch_table();
        self.a.seal(
            &t,
            &self.input,
            &mut self.sealed,
            &mut self.icmp,
            &mut self.plan_a,
        );
        ensure!(
            self.sealed.n == self.input.n,
            "A sealed {} of {}",
            self.sealed.n,
            self.input.n
        );
        // The datagrams come from A.
        for a in &mut self.sealed.addrs[..self.sealed.n] {
            *a = self.a_at;
        }
        self.open_at_b();
        ensure!(
            self.delivered.n == self.input.n,
            "B delivered {} of {} (decrypt failed {}, replays {})",
            self.delivered.n,
            self.input.n,
            self.b.counters.drops(Drop::DecryptFailed),
            self.b.counters.drops(Drop::Replay)
        );
        for i in (0..self.delivered.n).filter(|_| check) {
            let got = seq_of(self.delivered.packet(i));
            ensure!(
                got == Some(first + i as u64),
                "B delivered packet {got:?} in place {}",
                first + i as u64
            );
        }
        Ok((self.delivered.n * PACKET) as u64)
    }

    /// Steps for `time`; inner Gbit/s delivered.
    fn run(&mut self, time: Duration) -> Result<f64> {
        self.fill(BATCH, 0);
        let start = Instant::now();
        let (mut bytes, mut seq) = (0u64, 1u64);
        let mut steps = 0u64;
        while start.elapsed() < time {
            bytes += self.step(seq, steps.is_multiple_of(CHECK_EVERY))?;
            seq += BATCH as u64;
            steps += 1;
        }
        Ok(bytes as f64 * 8.0 / start.elapsed().as_secs_f64() / 1e9)
    }
}

fn load(b: &mut Batch, datagrams: &[Vec<u8>], from: SocketAddr) {
    b.n = 0;
    for d in datagrams {
        if let Some(buf) = b.bufs.get_mut(b.n) {
            buf[..d.len()].copy_from_slice(d);
            b.commit(d.len(), from);
        }
    }
}

/// One configuration alone for `seconds` (to profile it): its Gbit/s.
pub fn run_one(workers: usize, seconds: f64) -> Result<f64> {
    let mut p = Pair::new(workers)?;
    p.run(Duration::from_secs_f64(seconds))
}

/// `reps` repetitions of `seconds` for each of three configurations, in
/// an order rotated each repetition: one flow with 1 worker, one flow with
/// 2, and two flows with 1 worker each on two threads at once (what the
/// machine gives two threads at that moment: the ceiling for the second).
pub fn run(reps: u32, seconds: f64) -> Result<EngineReport> {
    let mut pairs = [Pair::new(1)?, Pair::new(2)?];
    let mut twin = Pair::new(1)?;
    let warm = Duration::from_secs_f64((seconds / 4.0).min(1.0));
    for p in &mut pairs {
        p.run(warm)?;
    }
    twin.run(warm)?;
    let time = Duration::from_secs_f64(seconds);
    let mut rows = Vec::new();
    let (mut ratios, mut ceilings) = (Vec::new(), Vec::new());
    for rep in 0..reps {
        let mut gbps = [0.0; 3];
        for k in 0..3 {
            let k = (k + rep as usize) % 3;
            if k == 2 {
                // Two flows at once, one a thread.
                let (first, second) = std::thread::scope(|s| {
                    let t = s.spawn(|| twin.run(time));
                    let mine = pairs[0].run(time);
                    (mine, t.join())
                });
                let second =
                    second.map_err(|_| anyhow::anyhow!("the second flow's thread panicked"))?;
                gbps[2] = first? + second?;
                eprintln!(
                    "engine: rep {rep} two flows on two threads, 1 worker each: {:.2} Gbit/s",
                    gbps[2]
                );
                continue;
            }
            let p = &mut pairs[k];
            // (One pool for both sides: A's figures are the pair's.)
            let before = p.a.crypto_stats();
            let g = p.run(time)?;
            let after = p.a.crypto_stats();
            gbps[k] = g;
            let row = EngineRow {
                rep,
                workers: after.workers,
                gbps: g,
                parallel_batches: after.parallel_batches - before.parallel_batches,
                helper_chunks: after.helper_chunks - before.helper_chunks,
                chunks: after.chunks - before.chunks,
                wait_us: after.wait_us - before.wait_us,
            };
            eprintln!(
                "engine: rep {rep} one flow, {} workers: {:.2} Gbit/s ({} batches split, helpers ran {} of {} chunks, waited for them {:.2} s)",
                row.workers, row.gbps, row.parallel_batches, row.helper_chunks, row.chunks,
                row.wait_us as f64 / 1e6
            );
            rows.push(row);
        }
        if gbps[0] > 0.0 {
            ratios.push(gbps[1] / gbps[0]);
            ceilings.push(gbps[2] / gbps[0]);
        }
    }
    Ok(EngineReport {
        speedup: Spread::of(&ratios),
        ceiling: Spread::of(&ceilings),
        rows,
        ratios,
    })
}
