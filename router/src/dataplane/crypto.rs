//! Crypto workers: one batch's AEAD spread over several threads, so that
//! one flow (one peer on one queue) is not held to one core's speed.
//!
//! ```text
//! queue worker  read batch ─ plan in order, under the peers' locks ─┐
//!               (counters taken, sessions found), a chunk of jobs   │
//!               published as soon as it is planned                  │
//! helpers       (parked, or spinning briefly after their last chunk)│
//!               claim published chunks from the front, run them ────┤
//! queue worker  claim what is left from the back, run it; wait for ─┘
//!               the chunks helpers hold ─ finish in order ─ write / send
//! ```
//!
//! Who owns what: the batches and the plan are the queue worker's; a
//! chunk is a contiguous run of the plan's jobs, and every job names
//! slots of its own, so whoever runs a chunk writes buffers nobody else
//! touches. The queue worker never waits for a helper to wake up: it runs
//! every chunk nobody has claimed, and waits only for chunks a helper is
//! running. So with no helper free (every core busy) a batch costs what it
//! did on one thread, plus an atomic operation per chunk. Helpers start on
//! the first chunks while the queue worker still plans the rest, so the
//! planning (the serial part) overlaps their work. A direction's packets
//! leave in the order their counters were taken (the plan's order),
//! whichever thread sealed them, so the receiver's replay window and TCP
//! see no reordering.
//!
//! A board per posting thread (up to `BOARDS`; a thread that finds none
//! free runs its batch alone) holds the chunks of the batch in flight:
//! its generation and the range of chunks published and not yet claimed
//! (`front..back`) in one atomic word, so a claim or a publication is one
//! compare-and-swap, and a claim fails once the batch is over. Helpers
//! claim from the front, the queue worker from the back: each runs through
//! neighbouring packets (the next step on the same thread, a batch opened
//! after it was sealed say, finds them in its cache). Helpers park when
//! there is nothing to claim, after spinning for `SPIN`; a poster wakes
//! one, and a helper that claims a chunk while more are left wakes the
//! next.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use tracing::{error, info};

/// How many threads may post batches at once (queue workers); a thread
/// that finds every board taken runs its batch alone.
const BOARDS: usize = 16;
/// At most this many helpers (their parked set is a bit mask).
pub const MAX_HELPERS: usize = 63;
/// Words of a board's finished-chunk bits: a streamed batch has at most
/// `64 * DONE_WORDS` chunks (more, and it runs on the posting thread).
const DONE_WORDS: usize = 2;
/// How long a helper looks for work after its last chunk before it parks:
/// longer than the gap between a stream's batches, so that a busy flow
/// does not pay a wake-up per batch; short enough that an idle router
/// costs nothing.
const SPIN: Duration = Duration::from_micros(50);
/// How long a parked helper sleeps before it looks again on its own (a
/// lost wake-up costs at most this; the poster runs the chunks anyway).
const PARK: Duration = Duration::from_millis(100);

/// A batch's work: `run(chunk)` for every chunk published, each exactly
/// once, on any of the threads.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// A board's state: generation, the next chunk from the front (helpers'
/// end) and one past the last chunk published (the poster claims from
/// there). Chunks `front..back` are published and not claimed.
fn pack(generation: u32, front: u16, back: u16) -> u64 {
    (u64::from(generation) << 32) | (u64::from(front) << 16) | u64::from(back)
}

fn unpack(s: u64) -> (u32, u16, u16) {
    ((s >> 32) as u32, (s >> 16) as u16, s as u16)
}

/// One posting thread's batch in flight (on its own cache lines: helpers
/// read every board while they look for work).
#[repr(align(128))]
struct Board {
    /// Taken by a poster for the duration of one batch.
    busy: AtomicBool,
    /// See `pack`.
    state: AtomicU64,
    /// Chunks of the current generation finished (by anyone).
    done: AtomicU32,
    /// Which chunks of the current generation are finished (bit c of word
    /// c / 64): the poster finishes a batch in order as they come.
    finished: [AtomicU64; DONE_WORDS],
    /// The batch's job. Written by the poster before it publishes a chunk
    /// (release, through `state`) and read by a thread only after its
    /// claim on that state succeeded (acquire); the poster does not
    /// return, so the job stays alive, until every claimed chunk is done.
    job: UnsafeCell<Option<Job<'static>>>,
}

// SAFETY: `job` is written only by the board's owner (`busy`) while no
// chunk of it can be claimed, and read only by a thread holding a claim
// (see `Board::run_claimed`); every other field is atomic.
unsafe impl Sync for Board {}

impl Board {
    fn new() -> Self {
        Board {
            busy: AtomicBool::new(false),
            state: AtomicU64::new(pack(0, 0, 0)),
            done: AtomicU32::new(0),
            finished: [AtomicU64::new(0), AtomicU64::new(0)],
            job: UnsafeCell::new(None),
        }
    }

    /// Whether chunk `c` of the current generation is finished (acquire:
    /// what its runner wrote is visible).
    fn is_finished(&self, c: usize) -> bool {
        self.finished
            .get(c / 64)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (c % 64)) != 0)
    }

    /// Claims a published chunk: from the front (helpers) or the back
    /// (the poster). How many are left after the claim comes along (to
    /// wake another helper).
    fn claim(&self, from_front: bool) -> Option<(usize, u16)> {
        let mut s = self.state.load(Ordering::Acquire);
        loop {
            let (g, front, back) = unpack(s);
            if front >= back {
                return None;
            }
            let (chunk, next) = if from_front {
                (front, pack(g, front + 1, back))
            } else {
                (back - 1, pack(g, front, back - 1))
            };
            match self
                .state
                .compare_exchange_weak(s, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some((usize::from(chunk), back - front - 1)),
                Err(now) => s = now,
            }
        }
    }

    /// Publishes chunk `chunk` (the next one of this generation).
    fn publish(&self, chunk: u16) {
        let mut s = self.state.load(Ordering::Relaxed);
        loop {
            let (g, front, _) = unpack(s);
            // NB: everything claimed so far was below `chunk`, so `front`
            // never passes it; SeqCst pairs with a parking helper's look.
            match self.state.compare_exchange_weak(
                s,
                pack(g, front, chunk + 1),
                Ordering::SeqCst,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(now) => s = now,
            }
        }
    }

    /// Whether a chunk is waiting to be claimed.
    fn has_work(&self) -> bool {
        let (_, front, back) = unpack(self.state.load(Ordering::SeqCst));
        front < back
    }

    /// Runs `chunk` of the batch in flight (claimed by the caller) and
    /// counts it done. Whether the job returned normally.
    fn run_claimed(&self, chunk: usize) -> bool {
        // SAFETY: the caller's claim succeeded on this generation's state,
        // which the poster published after writing `job` (release/acquire
        // through `state`); the poster waits for `done` to count this
        // chunk before it returns or writes `job` again, so the reference
        // inside is alive and unchanged for the whole call.
        let job = unsafe { *self.job.get() };
        let ok = match job {
            Some(f) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(chunk))).is_ok(),
            None => true,
        };
        if let Some(w) = self.finished.get(chunk / 64) {
            w.fetch_or(1 << (chunk % 64), Ordering::Release);
        }
        self.done.fetch_add(1, Ordering::Release);
        ok
    }
}

/// What the pool has done, for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    /// Crypto workers: the posting thread and the helpers.
    pub workers: usize,
    /// Batches cut into more than one chunk and posted.
    pub parallel_batches: u64,
    /// Chunks those batches had, and how many of them helpers ran.
    pub chunks: u64,
    pub helper_chunks: u64,
    /// Time the posting threads spent waiting for helpers to finish the
    /// chunks they had claimed, in microseconds.
    #[serde(default)]
    pub wait_us: u64,
}

struct Shared {
    boards: Vec<Board>,
    /// Bit i set: helper i is parked (or about to).
    parked: AtomicU64,
    helpers: std::sync::OnceLock<Vec<Thread>>,
    stop: AtomicBool,
    parallel_batches: AtomicU64,
    chunks: AtomicU64,
    helper_chunks: AtomicU64,
    helper_panics: AtomicU64,
    wait_ns: AtomicU64,
}

impl Shared {
    /// Claims and runs one chunk of any board; whether there was one.
    fn help_once(&self, me: usize) -> bool {
        for b in &self.boards {
            if let Some((chunk, left)) = b.claim(true) {
                if left > 0 {
                    self.wake_one(Some(me));
                }
                if !b.run_claimed(chunk) {
                    self.helper_panics.fetch_add(1, Ordering::Relaxed);
                }
                self.helper_chunks.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    fn any_work(&self) -> bool {
        self.boards.iter().any(Board::has_work)
    }

    /// Wakes one parked helper (not `except`), if one is parked.
    fn wake_one(&self, except: Option<usize>) {
        let mut mask = self.parked.load(Ordering::SeqCst);
        if let Some(e) = except {
            mask &= !(1u64 << e);
        }
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            let bit = 1u64 << i;
            if self.parked.fetch_and(!bit, Ordering::SeqCst) & bit != 0 {
                if let Some(t) = self.helpers.get().and_then(|h| h.get(i)) {
                    t.unpark();
                }
                return;
            }
            mask &= !bit;
        }
    }

    fn helper_loop(&self, me: usize) {
        let bit = 1u64 << me;
        while !self.stop.load(Ordering::Relaxed) {
            if self.help_once(me) {
                continue;
            }
            let until = Instant::now() + SPIN;
            let mut found = false;
            while Instant::now() < until {
                if self.any_work() {
                    found = true;
                    break;
                }
                std::hint::spin_loop();
            }
            if found {
                continue;
            }
            // NB: say "parked" first, then look once more: a poster that
            // published after this look sees the bit and unparks us (both
            // SeqCst), so no wake-up is lost.
            self.parked.fetch_or(bit, Ordering::SeqCst);
            if self.any_work() || self.stop.load(Ordering::Relaxed) {
                self.parked.fetch_and(!bit, Ordering::SeqCst);
                continue;
            }
            std::thread::park_timeout(PARK);
            self.parked.fetch_and(!bit, Ordering::SeqCst);
        }
    }

    /// A free board, taken, for a batch of its own.
    fn take_board(&self) -> Option<&Board> {
        self.boards.iter().find(|b| {
            b.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        })
    }
}

/// The crypto workers of a data plane: the threads that post batches
/// (queue workers) and `workers - 1` helpers.
pub struct CryptoPool {
    shared: Arc<Shared>,
    workers: usize,
    handles: Vec<JoinHandle<()>>,
}

impl CryptoPool {
    /// A pool of `workers` crypto workers in all: the posting thread
    /// counts as one, so `workers - 1` helper threads start (none for 0 or
    /// 1; at most `MAX_HELPERS`). A helper that cannot be started is
    /// reported and the pool runs with fewer.
    pub fn new(workers: usize) -> Self {
        let want = workers.saturating_sub(1).min(MAX_HELPERS);
        let shared = Arc::new(Shared {
            boards: (0..BOARDS).map(|_| Board::new()).collect(),
            parked: AtomicU64::new(0),
            helpers: std::sync::OnceLock::new(),
            stop: AtomicBool::new(false),
            parallel_batches: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            helper_chunks: AtomicU64::new(0),
            helper_panics: AtomicU64::new(0),
            wait_ns: AtomicU64::new(0),
        });
        let mut handles = Vec::new();
        for i in 0..want {
            let s = Arc::clone(&shared);
            match std::thread::Builder::new()
                .name(format!("tm-crypto-{i}"))
                .spawn(move || s.helper_loop(i))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    error!(error = %e, started = i, "could not start a crypto helper; running with fewer");
                    break;
                }
            }
        }
        let _ = shared
            .helpers
            .set(handles.iter().map(|h| h.thread().clone()).collect());
        if !handles.is_empty() {
            info!(workers = handles.len() + 1, "crypto workers");
        }
        CryptoPool {
            workers: handles.len() + 1,
            shared,
            handles,
        }
    }

    /// Crypto workers in all (the posting thread and the helpers).
    pub fn workers(&self) -> usize {
        self.workers
    }

    pub fn stats(&self) -> PoolStats {
        let s = &self.shared;
        PoolStats {
            workers: self.workers,
            parallel_batches: s.parallel_batches.load(Ordering::Relaxed),
            chunks: s.chunks.load(Ordering::Relaxed),
            helper_chunks: s.helper_chunks.load(Ordering::Relaxed),
            wait_us: s.wait_ns.load(Ordering::Relaxed) / 1000,
        }
    }

    /// Runs `job(c)` for every chunk `c` in `0..chunks`, each once: on
    /// this thread, and on whichever helpers are free. Returns once every
    /// chunk is done. With one chunk, no helper, or no free board, all run
    /// here, in order.
    pub fn run(&self, chunks: usize, job: &(dyn Fn(usize) + Sync)) {
        let n = match u16::try_from(chunks) {
            Ok(n) if n > 1 && !self.handles.is_empty() => n,
            _ => return (0..chunks).for_each(job),
        };
        let Some(board) = self.shared.take_board() else {
            return (0..chunks).for_each(job);
        };
        let posted = Posted::new(&self.shared, board, job);
        posted.publish_through(n - 1);
        drop(posted);
    }

    /// Plans a batch, runs `f` on every job of it on this thread and the
    /// free helpers, and finishes the jobs in order on this thread.
    /// `plan` pushes the batch's jobs into a `Feed`, in order; helpers
    /// start on the first chunks (`per_chunk` jobs each) while it still
    /// plans. Then `finish` gets each job, in the order pushed, as soon as
    /// `f` has run on it: while a helper still runs the next chunk, this
    /// thread runs chunks nobody has claimed, so it waits only when there
    /// is nothing else to do. `ctx` is lent to `plan` and to `finish` in
    /// turn (what both write to: the output batches). On return `jobs`
    /// holds every job pushed, in order.
    pub fn stream<T: Send, C>(
        &self,
        jobs: &mut Vec<T>,
        per_chunk: usize,
        ctx: &mut C,
        f: &(dyn Fn(&mut T) + Sync),
        plan: impl FnOnce(&mut Feed<'_, T>, &mut C),
        mut finish: impl FnMut(&mut T, &mut C),
    ) {
        jobs.clear();
        let per_chunk = per_chunk.max(1);
        let cap = jobs.capacity();
        let helped = !self.handles.is_empty()
            && cap >= 2 * per_chunk
            && cap.div_ceil(per_chunk) <= 64 * DONE_WORDS
            && cap.div_ceil(per_chunk) < usize::from(u16::MAX);
        let written = AtomicUsize::new(0);
        let base = Jobs(jobs.as_mut_ptr());
        let range = |c: usize, len: usize| {
            let start = c * per_chunk;
            (start, (start + per_chunk).min(len).max(start))
        };
        let chunk = |c: usize| {
            let (start, end) = range(c, written.load(Ordering::Acquire));
            if end > cap {
                return;
            }
            // SAFETY: jobs `start..end` were written (`Feed::push`) before
            // this chunk was published, and are touched by no one else
            // until the chunk is marked finished (which `finish` waits
            // for) or the stream is over (`Stream`'s drop waits for every
            // claimed chunk before `jobs` is used again).
            let part = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
            part.iter_mut().for_each(f);
        };
        let mut feed = Feed {
            base,
            cap,
            len: 0,
            per_chunk,
            written: &written,
            posted: None,
            shared: &self.shared,
            helped,
            job: &chunk,
        };
        // NB: on every way out (a panic in `plan` or `finish` included)
        // the stream's drop closes the board, waits for the helpers'
        // chunks and hands the jobs written to `jobs`.
        let stream = Stream {
            feed: &mut feed,
            jobs,
        };
        plan(&mut *stream.feed, ctx);
        let feed = &mut *stream.feed;
        let len = feed.len;
        written.store(len, Ordering::Release);
        let chunks = len.div_ceil(per_chunk);
        let finish_chunk = |c: usize, ctx: &mut C, finish: &mut dyn FnMut(&mut T, &mut C)| {
            let (start, end) = range(c, len);
            // SAFETY: chunk `c`'s jobs were written, `f` has run on them
            // and nobody touches them again (its runner marked it
            // finished, with release; or it ran on this thread).
            let part = unsafe { std::slice::from_raw_parts_mut(base.at(start), end - start) };
            part.iter_mut().for_each(|j| finish(j, ctx));
        };
        match &feed.posted {
            None => {
                (0..chunks).for_each(&chunk);
                (0..chunks).for_each(|c| finish_chunk(c, ctx, &mut finish));
            }
            Some(p) => {
                p.publish_through((chunks as u16).saturating_sub(1));
                let board = p.board;
                let mut next = 0;
                let mut spins = 0u32;
                let mut waiting: Option<Instant> = None;
                while next < chunks {
                    if board.is_finished(next) {
                        if let Some(t) = waiting.take() {
                            p.shared
                                .wait_ns
                                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        }
                        finish_chunk(next, ctx, &mut finish);
                        next += 1;
                    } else if let Some((c, _)) = board.claim(false) {
                        board.run_claimed(c);
                    } else {
                        // A helper is running chunk `next`.
                        waiting.get_or_insert_with(Instant::now);
                        spins += 1;
                        if spins < 1 << 12 {
                            std::hint::spin_loop();
                        } else {
                            std::thread::yield_now();
                        }
                    }
                }
            }
        }
        // The rest: `Stream`'s drop.
        drop(stream);
    }
}

/// Where `CryptoPool::stream`'s planning pushes jobs.
pub struct Feed<'s, T> {
    base: Jobs<T>,
    cap: usize,
    len: usize,
    per_chunk: usize,
    written: &'s AtomicUsize,
    posted: Option<Posted<'s>>,
    shared: &'s Shared,
    helped: bool,
    job: Job<'s>,
}

impl<T> Feed<'_, T> {
    /// Adds `job` to the batch; `Err(job)` when the batch's room (the
    /// vector's capacity) is used up.
    pub fn push(&mut self, job: T) -> Result<(), T> {
        if self.len >= self.cap {
            return Err(job);
        }
        // SAFETY: `len < cap`: the slot is inside the vector's allocation,
        // past every published chunk (nobody else reads it) and written
        // once.
        unsafe { self.base.at(self.len).write(job) };
        self.len += 1;
        // A chunk is published once the next one has begun: a batch of
        // one chunk (a lone packet, say) never wakes a helper, and never
        // waits for one.
        if self.helped && self.len > self.per_chunk && self.len % self.per_chunk == 1 {
            self.written.store(self.len - 1, Ordering::Release);
            self.publish((self.len / self.per_chunk - 1) as u16);
        }
        Ok(())
    }

    /// Jobs pushed so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Publishes chunk `chunk` (its jobs are written), taking a board for
    /// the batch at its first chunk.
    fn publish(&mut self, chunk: u16) {
        if self.posted.is_none() {
            match self.shared.take_board() {
                Some(b) => self.posted = Some(Posted::new(self.shared, b, self.job)),
                None => {
                    // No board free: this batch runs here alone.
                    self.helped = false;
                    return;
                }
            }
        }
        if let Some(p) = &self.posted {
            p.publish_through(chunk);
        }
    }
}

/// A stream being planned: finishing (or dropping) it runs what is left.
struct Stream<'f, 's, T> {
    feed: &'f mut Feed<'s, T>,
    jobs: &'f mut Vec<T>,
}

impl<T> Drop for Stream<'_, '_, T> {
    fn drop(&mut self) {
        // Runs the unclaimed chunks here, waits for the helpers' and
        // frees the board.
        drop(self.feed.posted.take());
        // SAFETY: every slot below `len` was written by `Feed::push`, and
        // no chunk is running any more: the vector owns them now.
        unsafe { self.jobs.set_len(self.feed.len) };
    }
}

/// The start of a job buffer, shared with the threads that run its chunks.
struct Jobs<T>(*mut T);

impl<T> Jobs<T> {
    fn at(&self, i: usize) -> *mut T {
        self.0.wrapping_add(i)
    }
}

impl<T> Clone for Jobs<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Jobs<T> {}

// SAFETY: the pointer is only used to make disjoint `&mut [T]` chunks,
// each on one thread at a time, and to write slots nobody reads yet;
// `T: Send` lets a job move to another thread.
unsafe impl<T: Send> Sync for Jobs<T> {}
unsafe impl<T: Send> Send for Jobs<T> {}

/// A batch on a board. Dropping it runs what nobody claimed on this
/// thread (from the back), closes the board, waits for every chunk a
/// helper claimed, and frees the board: also when the posting thread
/// unwinds.
struct Posted<'b> {
    shared: &'b Shared,
    board: &'b Board,
    generation: u32,
    /// Chunks published (`0..published`).
    published: std::cell::Cell<u16>,
}

impl<'b> Posted<'b> {
    /// Puts `job` on `board` (taken by the caller), nothing published yet.
    fn new(shared: &'b Shared, board: &'b Board, job: Job<'b>) -> Self {
        // SAFETY: the lifetime is extended to 'static only for the board;
        // `Posted`'s drop waits until every claimed chunk is done and
        // clears the board before `job` can go.
        let erased: Job<'static> = unsafe { std::mem::transmute::<Job<'_>, Job<'static>>(job) };
        // SAFETY: this thread holds `busy`, and the board's state is closed
        // (front == back), so no thread reads `job` now.
        unsafe { *board.job.get() = Some(erased) };
        board.done.store(0, Ordering::Relaxed);
        for w in &board.finished {
            w.store(0, Ordering::Relaxed);
        }
        let (generation, _, _) = unpack(board.state.load(Ordering::Relaxed));
        let generation = generation.wrapping_add(1);
        board.state.store(pack(generation, 0, 0), Ordering::Release);
        shared.parallel_batches.fetch_add(1, Ordering::Relaxed);
        Posted {
            shared,
            board,
            generation,
            published: std::cell::Cell::new(0),
        }
    }

    /// Publishes every chunk up to `last` and wakes a helper.
    fn publish_through(&self, last: u16) {
        self.board.publish(last);
        self.published.set(self.published.get().max(last + 1));
        self.shared.wake_one(None);
    }
}

impl Drop for Posted<'_> {
    fn drop(&mut self) {
        let b = self.board;
        while let Some((chunk, _)) = b.claim(false) {
            b.run_claimed(chunk);
        }
        // Closed: nothing left to claim, every published chunk claimed
        // (the loop above ended because none was left). NB: the poster
        // claims from the back, so `back` is no count of what was
        // published: `published` is.
        b.state.store(pack(self.generation, 0, 0), Ordering::SeqCst);
        let published = u32::from(self.published.get());
        let began = (b.done.load(Ordering::Acquire) < published).then(Instant::now);
        let mut spins = 0u32;
        while b.done.load(Ordering::Acquire) < published {
            spins += 1;
            if spins < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Some(t) = began {
            self.shared
                .wait_ns
                .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        self.shared
            .chunks
            .fetch_add(u64::from(published), Ordering::Relaxed);
        // SAFETY: no chunk can be claimed (the state says none is left)
        // and every claimed one is done: nobody reads `job`.
        unsafe { *b.job.get() = None };
        b.busy.store(false, Ordering::Release);
    }
}

impl Drop for CryptoPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.shared.helpers.get() {
            h.iter().for_each(Thread::unpark);
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every chunk runs exactly once, whoever runs it, batch after batch.
    #[test]
    fn every_chunk_once() {
        let pool = CryptoPool::new(3);
        assert_eq!(pool.workers(), 3);
        for batch in 0..2000usize {
            let chunks = 1 + batch % 40;
            let runs: Vec<AtomicUsize> = (0..chunks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(chunks, &|c| {
                runs[c].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                runs.iter().all(|r| r.load(Ordering::Relaxed) == 1),
                "batch {batch}: {runs:?}"
            );
        }
        let s = pool.stats();
        assert!(s.parallel_batches > 0 && s.chunks > 0);
    }

    /// A streamed batch: every job pushed is run once and handed back in
    /// the order it was pushed, whatever its size; several posting
    /// threads at once (queue workers) share the helpers.
    #[test]
    fn streams_from_posters_at_once() {
        let pool = Arc::new(CryptoPool::new(2));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut jobs: Vec<(u64, u64)> = Vec::with_capacity(128);
                    for round in 0..500u64 {
                        let n = (round * 7 + t) % 129;
                        let mut finished = 0u64;
                        pool.stream(
                            &mut jobs,
                            5,
                            &mut finished,
                            &|j| j.1 += 1,
                            |feed, _| {
                                for i in 0..n {
                                    assert!(feed.push((i, round)).is_ok());
                                }
                                assert_eq!(feed.len() as u64, n);
                            },
                            // In order, each after `f` ran on it.
                            |j, finished| {
                                assert_eq!(*j, (*finished, round + 1));
                                *finished += 1;
                            },
                        );
                        assert_eq!(finished, n);
                        assert_eq!(jobs.len() as u64, n);
                        assert!(jobs
                            .iter()
                            .enumerate()
                            .all(|(i, j)| *j == (i as u64, round + 1)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a poster failed");
        }
    }

    /// Pushing past the vector's room is refused, not written.
    #[test]
    fn a_full_stream_refuses() {
        let pool = CryptoPool::new(2);
        let mut jobs: Vec<u32> = Vec::with_capacity(10);
        let cap = jobs.capacity();
        pool.stream(
            &mut jobs,
            3,
            &mut (),
            &|j| *j *= 2,
            |feed, _| {
                for i in 0..cap as u32 {
                    assert!(feed.push(i).is_ok());
                }
                assert_eq!(feed.push(99), Err(99));
            },
            |_, _| {},
        );
        assert_eq!(jobs, (0..cap as u32).map(|i| i * 2).collect::<Vec<_>>());
    }

    /// Helpers do run chunks: with jobs slow enough to see them, the
    /// count of chunks run by helpers moves (polled with a deadline).
    #[test]
    fn helpers_take_chunks() {
        let pool = CryptoPool::new(2);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut jobs: Vec<u8> = Vec::with_capacity(16);
        while pool.stats().helper_chunks == 0 {
            assert!(Instant::now() < deadline, "no helper ever ran a chunk");
            pool.stream(
                &mut jobs,
                2,
                &mut (),
                &|_| std::thread::sleep(Duration::from_micros(200)),
                |feed, _| (0..16).for_each(|i| assert!(feed.push(i).is_ok())),
                |_, _| {},
            );
        }
    }

    /// A job that panics on a helper neither hangs the poster nor leaves
    /// the board taken; a lone chunk takes no board at all.
    #[test]
    fn panics_and_lone_chunks() {
        let pool = CryptoPool::new(2);
        for _ in 0..200 {
            pool.run(4, &|c| {
                if c == 3 {
                    panic!("chunk {c}");
                }
            });
        }
        let before = pool.stats().parallel_batches;
        let mut jobs: Vec<u8> = Vec::with_capacity(128);
        for _ in 0..100 {
            pool.stream(
                &mut jobs,
                8,
                &mut (),
                &|j| *j += 1,
                |feed, _| (0..8).for_each(|i| assert!(feed.push(i).is_ok())),
                |_, _| {},
            );
            assert_eq!(jobs, (1..=8).collect::<Vec<u8>>());
        }
        assert_eq!(
            pool.stats().parallel_batches,
            before,
            "a lone chunk was posted"
        );
        assert!(pool
            .shared
            .boards
            .iter()
            .all(|b| !b.busy.load(Ordering::Relaxed)));
    }

    /// No helper for 1 worker: everything runs on the caller, in order.
    #[test]
    fn one_worker_runs_inline_in_order() {
        let pool = CryptoPool::new(1);
        assert_eq!(pool.workers(), 1);
        let order = std::sync::Mutex::new(Vec::new());
        pool.run(5, &|c| order.lock().unwrap().push(c));
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3, 4]);
        assert_eq!(pool.stats().parallel_batches, 0);
    }
}
