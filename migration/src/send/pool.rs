//! The sender's bounded per-connection queues and the global enqueue lock.
//!
//! One mutex guards all queues. Device sequence numbers are assigned and
//! SYNC markers are pushed to every queue under that same mutex, so the
//! enqueue order is one total order that is consistent with each device's
//! sequence and with each connection's FIFO; the receiver's deadlock-freedom
//! argument (docs/migration-protocol.md) rests on this.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::MigrationError;
use crate::net::{lock, Ctl, POLL_INTERVAL};
use crate::traits::PAGE_SIZE;
use crate::wire::DevItemKind;

/// A run of pages inside one region (sender side, before zero detection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Region index.
    pub region: u32,
    /// First page relative to the region.
    pub first_page: u64,
    /// Pages (≥ 1).
    pub npages: u64,
}

/// One unit of work for a writer thread.
#[derive(Debug)]
pub enum Item {
    /// A RAM packet of pass `pass`; the writer reads the pages from guest
    /// memory when it sends them.
    Ram {
        /// Pass number (≥ 1).
        pass: u64,
        /// Page runs, total ≤ the packet size.
        runs: Vec<PageRun>,
    },
    /// A device stream item.
    Device {
        /// Device index.
        dev: u32,
        /// Sequence number within the device's stream.
        seq: u64,
        /// Item kind.
        kind: DevItemKind,
        /// Payload (empty for markers).
        data: Vec<u8>,
    },
    /// End of pass `pass` on this connection.
    Sync {
        /// Pass number.
        pass: u64,
    },
    /// No more items: the writer shuts down its write side and exits.
    Close,
    /// Post-copy started: the writer pushes missing pages (claimed from
    /// the push set, see `send::postcopy`) until none is left, then shuts
    /// down its write side and exits.
    Postcopy,
}

impl Item {
    /// Bytes this item counts against its queue's bound.
    pub fn cost(&self) -> u64 {
        match self {
            Item::Ram { runs, .. } => runs.iter().map(|r| r.npages).sum::<u64>() * PAGE_SIZE,
            Item::Device { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

struct PoolState {
    queues: Vec<VecDeque<Item>>,
    queued: Vec<u64>,
    dev_seq: Vec<u64>,
    dev_inflight: u64,
    /// Device payload buffers already written, for the save threads to
    /// reuse; `spare_bytes` is their total capacity.
    spare: Vec<Vec<u8>>,
    spare_bytes: u64,
}

/// The bounded queues feeding the writer threads.
///
/// Invariants: `queued[i]` is the cost of items pushed to connection `i` and
/// not yet reported written; pushes wait while every queue is over
/// `conn_limit` (markers excepted) or device bytes in flight exceed
/// `dev_limit`, which bounds sender memory; a spare device buffer is kept
/// for reuse only while the device bytes in flight plus the spare buffers'
/// capacity stay within `dev_limit` (so spares never exceed it).
pub struct Pool {
    st: Mutex<PoolState>,
    writer_cv: Vec<Condvar>,
    space_cv: Condvar,
    conn_limit: u64,
    dev_limit: u64,
    ctl: Arc<Ctl>,
    /// Bytes written on all data connections (headers included).
    pub sent_bytes: AtomicU64,
    /// RAM pages handed to the wire (data or zero marker).
    pub pages_done: AtomicU64,
    /// Notified once `pages_done` reaches `wake_at`, when pages are
    /// dropped and when the switch to post-copy is asked for: the pass
    /// loop waits on it rather than polling.
    progress: crate::net::Notify,
    /// The `pages_done` the pass loop waits for (`u64::MAX`: none).
    wake_at: AtomicU64,
    /// RAM pages queued but dropped by the switch to post-copy (they are
    /// in its missing set).
    pub pages_dropped: AtomicU64,
    /// Set once the source switches to post-copy: RAM is no longer queued.
    switching: std::sync::atomic::AtomicBool,
    /// Polled while a RAM push waits for space: `true` asks for the switch.
    interrupt: Mutex<Option<Box<dyn Fn() -> bool + Send + Sync>>>,
}

impl Pool {
    /// Queues for `n` connections and `ndev` devices.
    pub fn new(n: usize, ndev: usize, conn_limit: u64, dev_limit: u64, ctl: Arc<Ctl>) -> Arc<Pool> {
        Arc::new(Pool {
            st: Mutex::new(PoolState {
                queues: (0..n).map(|_| VecDeque::new()).collect(),
                queued: vec![0; n],
                dev_seq: vec![0; ndev],
                dev_inflight: 0,
                spare: Vec::new(),
                spare_bytes: 0,
            }),
            writer_cv: (0..n).map(|_| Condvar::new()).collect(),
            space_cv: Condvar::new(),
            conn_limit,
            dev_limit,
            ctl,
            sent_bytes: AtomicU64::new(0),
            pages_done: AtomicU64::new(0),
            progress: crate::net::Notify::default(),
            wake_at: AtomicU64::new(u64::MAX),
            pages_dropped: AtomicU64::new(0),
            switching: std::sync::atomic::AtomicBool::new(false),
            interrupt: Mutex::new(None),
        })
    }

    /// Counts `n` RAM pages handed to the wire, waking
    /// [`Pool::wait_pages`] once its target is reached.
    pub fn pages_written(&self, n: u64) {
        let now = self
            .pages_done
            .fetch_add(n, Ordering::SeqCst)
            .saturating_add(n);
        if now >= self.wake_at.load(Ordering::SeqCst) {
            self.progress.notify();
        }
    }

    /// Counts `n` queued RAM pages dropped by the switch to post-copy.
    pub fn drop_pages(&self, n: u64) {
        self.pages_dropped.fetch_add(n, Ordering::SeqCst);
        self.progress.notify();
    }

    /// Waits until `target` RAM pages were written, pages were dropped,
    /// the switch to post-copy was asked for, or `timeout` passed,
    /// whichever comes first (callers re-check their condition).
    ///
    /// Invariant: no wake-up is lost. The target is published before
    /// `pages_done` is read (both SeqCst), so a writer either sees the
    /// target and notifies, or counted its pages before the read here.
    /// Between waits no target is set, and writers do not notify.
    pub fn wait_pages(&self, target: u64, timeout: Duration) {
        self.wake_at.store(target, Ordering::SeqCst);
        let seen = self.progress.generation();
        if self.pages_done.load(Ordering::SeqCst) < target {
            self.progress.wait(seen, timeout);
        }
        self.wake_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// Installs the check a waiting RAM push polls (see
    /// [`Pool::switching`]).
    pub fn set_interrupt(&self, f: Box<dyn Fn() -> bool + Send + Sync>) {
        *lock(&self.interrupt) = Some(f);
    }

    /// Whether the switch to post-copy was asked for (by
    /// [`Pool::request_switch`] or the interrupt check). From then on RAM
    /// pushes are dropped (counted in `pages_dropped`).
    pub fn switching(&self) -> bool {
        if self.switching.load(Ordering::SeqCst) {
            return true;
        }
        let asked = lock(&self.interrupt).as_ref().is_some_and(|f| f());
        if asked {
            self.switching.store(true, Ordering::SeqCst);
        }
        asked
    }

    /// Whether the switch was asked for already (without polling the
    /// interrupt check).
    pub fn switch_requested(&self) -> bool {
        self.switching.load(Ordering::SeqCst)
    }

    /// Asks for the switch to post-copy: no more RAM is queued.
    pub fn request_switch(&self) {
        self.switching.store(true, Ordering::SeqCst);
        self.progress.notify();
    }

    /// Removes every queued (not yet taken) RAM item; their pages count as
    /// dropped. Returns the pages removed.
    pub fn drain_ram(&self) -> u64 {
        let mut st = lock(&self.st);
        let mut pages = 0;
        for i in 0..st.queues.len() {
            let mut cost = 0;
            st.queues[i].retain(|it| match it {
                Item::Ram { runs, .. } => {
                    let n: u64 = runs.iter().map(|r| r.npages).sum();
                    pages += n;
                    cost += n * PAGE_SIZE;
                    false
                }
                _ => true,
            });
            st.queued[i] = st.queued[i].saturating_sub(cost);
        }
        drop(st);
        self.drop_pages(pages);
        self.space_cv.notify_all();
        pages
    }

    /// Bytes queued and not yet written, all connections.
    pub fn backlog(&self) -> u64 {
        lock(&self.st).queued.iter().sum()
    }

    fn push_inner(
        &self,
        mut make: impl FnMut(&mut PoolState) -> Item,
        cost: u64,
        dev_bytes: u64,
        ram_pages: u64,
    ) -> Result<u64, MigrationError> {
        let mut st = lock(&self.st);
        loop {
            self.ctl.check()?;
            if ram_pages > 0 && self.switching.load(Ordering::SeqCst) {
                self.drop_pages(ram_pages);
                return Ok(0);
            }
            let (best, q) = st
                .queued
                .iter()
                .enumerate()
                .min_by_key(|(_, q)| **q)
                .map(|(i, q)| (i, *q))
                .unwrap_or((0, 0));
            let dev_ok = dev_bytes == 0
                || st.dev_inflight == 0
                || st.dev_inflight + dev_bytes <= self.dev_limit;
            if (q == 0 || q + cost <= self.conn_limit) && dev_ok {
                let item = make(&mut st);
                let seq = match &item {
                    Item::Device { seq, .. } => *seq,
                    _ => 0,
                };
                st.queued[best] += cost;
                st.dev_inflight += dev_bytes;
                st.queues[best].push_back(item);
                self.writer_cv[best].notify_one();
                return Ok(seq);
            }
            st = self
                .space_cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if ram_pages > 0 {
                drop(st);
                self.switching();
                st = lock(&self.st);
            }
        }
    }

    /// Queues a RAM packet on the least-loaded connection (waits for space).
    /// Once the switch to post-copy was asked for, the packet is dropped
    /// instead (its pages are in the missing set).
    pub fn push_ram(&self, pass: u64, runs: Vec<PageRun>) -> Result<(), MigrationError> {
        let pages = runs.iter().map(|r| r.npages).sum::<u64>();
        let cost = pages * PAGE_SIZE;
        let mut runs = Some(runs);
        self.push_inner(
            |_| Item::Ram {
                pass,
                runs: runs.take().unwrap_or_default(),
            },
            cost,
            0,
            pages.max(1),
        )
        .map(|_| ())
    }

    /// Assigns the next sequence number of device `dev` and queues the item,
    /// both under the global enqueue lock. Returns the sequence number.
    pub fn push_device(
        &self,
        dev: u32,
        kind: DevItemKind,
        data: Vec<u8>,
    ) -> Result<u64, MigrationError> {
        let cost = data.len() as u64;
        let mut data = Some(data);
        self.push_inner(
            |st| {
                let seq = st.dev_seq[dev as usize];
                st.dev_seq[dev as usize] += 1;
                Item::Device {
                    dev,
                    seq,
                    kind,
                    data: data.take().unwrap_or_default(),
                }
            },
            cost,
            cost,
            0,
        )
    }

    /// Pushes one marker to every queue atomically (SYNC or CLOSE).
    pub fn push_all(&self, make: impl Fn() -> Item) {
        let mut st = lock(&self.st);
        for i in 0..st.queues.len() {
            st.queues[i].push_back(make());
            self.writer_cv[i].notify_one();
        }
    }

    /// Takes the next item of connection `conn`, waiting for one.
    pub fn pop(&self, conn: usize) -> Result<Item, MigrationError> {
        let mut st = lock(&self.st);
        loop {
            if let Some(it) = st.queues[conn].pop_front() {
                return Ok(it);
            }
            self.ctl.check()?;
            st = self.writer_cv[conn]
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// A device payload buffer to reuse (one a writer has sent), or a new
    /// empty one.
    pub fn spare_buffer(&self) -> Vec<u8> {
        let mut st = lock(&self.st);
        match st.spare.pop() {
            Some(b) => {
                st.spare_bytes -= b.capacity() as u64;
                b
            }
            None => Vec::new(),
        }
    }

    /// Keeps `buf` (a device payload no longer needed) for
    /// [`Pool::spare_buffer`] while the device bytes in flight plus the
    /// spare buffers stay within `dev_limit`; frees it otherwise.
    pub fn recycle(&self, buf: Vec<u8>) {
        let cap = buf.capacity() as u64;
        let mut st = lock(&self.st);
        if cap > 0 && st.dev_inflight + st.spare_bytes + cap <= self.dev_limit {
            st.spare_bytes += cap;
            st.spare.push(buf);
            return;
        }
        drop(st);
        drop(buf);
    }

    /// Reports an item of `cost` bytes (of which `dev_bytes` device bytes)
    /// written on `conn`, freeing queue space.
    pub fn done(&self, conn: usize, cost: u64, dev_bytes: u64) {
        let mut st = lock(&self.st);
        st.queued[conn] = st.queued[conn].saturating_sub(cost);
        st.dev_inflight = st.dev_inflight.saturating_sub(dev_bytes);
        drop(st);
        self.space_cv.notify_all();
    }
}

/// Token bucket shared by all writers: the operator's cap
/// (`max_bandwidth_mib_s`, live) and the host's share (concurrent
/// migrations), whichever is lower; no limit while neither is set.
///
/// Invariant: over any interval in which the rate did not change, the bytes
/// granted are at most `rate × interval + burst`.
#[derive(Debug, Default)]
pub struct RateLimiter {
    st: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// The operator's cap in bytes/s.
    user: Option<f64>,
    /// The host's share in bytes/s.
    share: Option<f64>,
    tokens: f64,
    at: Instant,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            user: None,
            share: None,
            tokens: 0.0,
            at: Instant::now(),
        }
    }
}

impl Bucket {
    fn rate(&self) -> Option<f64> {
        match (self.user, self.share) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn burst(rate: f64) -> f64 {
        (rate * 0.05).max(256.0 * 1024.0)
    }
}

impl RateLimiter {
    /// A bucket with the operator's cap `rate` bytes/s (`None`: no cap).
    pub fn new(rate: Option<f64>) -> Arc<RateLimiter> {
        let l = Arc::new(RateLimiter::default());
        l.set_user(rate);
        l
    }

    /// Sets the operator's cap in bytes/s (`None`: no cap); takes effect
    /// for the next bytes taken.
    pub fn set_user(&self, rate: Option<f64>) {
        let mut st = lock(&self.st);
        st.user = rate.filter(|r| r.is_finite() && *r > 0.0);
        if let Some(r) = st.rate() {
            st.tokens = st.tokens.min(Bucket::burst(r));
        }
    }

    /// Sets the host's share in bytes/s (`None`: no share limit).
    pub fn set_share(&self, rate: Option<f64>) {
        let mut st = lock(&self.st);
        st.share = rate.filter(|r| r.is_finite() && *r > 0.0);
        if let Some(r) = st.rate() {
            st.tokens = st.tokens.min(Bucket::burst(r));
        }
    }

    /// The rate in force, bytes/s (`None`: unlimited).
    #[allow(dead_code)] // for tests and diagnostics
    pub fn rate(&self) -> Option<f64> {
        lock(&self.st).rate()
    }

    /// Takes `n` bytes at once, without waiting (the bucket may go into
    /// debt, which the next [`RateLimiter::take`] pays): for pages a vCPU
    /// waits for, which go ahead of everything else.
    pub fn take_now(&self, n: u64) {
        let mut st = lock(&self.st);
        let now = Instant::now();
        if let Some(rate) = st.rate() {
            let refill = now.duration_since(st.at).as_secs_f64() * rate;
            // At most one second of debt: the cap holds on average.
            st.tokens = ((st.tokens + refill).min(Bucket::burst(rate)) - n as f64).max(-rate);
        }
        st.at = now;
    }

    /// Takes `n` bytes, sleeping (in slices that poll abort) while in debt.
    pub fn take(&self, n: u64, ctl: &Ctl) -> Result<(), MigrationError> {
        self.take_unless(n, ctl, &|| false).map(|_| ())
    }

    /// As [`RateLimiter::take`], but gives the bytes back and returns
    /// `false` as soon as `abandon()` holds (polled before taking and while
    /// sleeping): for pre-copy RAM that the switch to post-copy makes
    /// useless, so that it does not hold the downtime up.
    pub fn take_unless(
        &self,
        n: u64,
        ctl: &Ctl,
        abandon: &dyn Fn() -> bool,
    ) -> Result<bool, MigrationError> {
        if abandon() {
            return Ok(false);
        }
        let wait = {
            let mut st = lock(&self.st);
            let now = Instant::now();
            let Some(rate) = st.rate() else {
                st.tokens = 0.0;
                st.at = now;
                return Ok(true);
            };
            let refill = now.duration_since(st.at).as_secs_f64() * rate;
            st.tokens = (st.tokens + refill).min(Bucket::burst(rate)) - n as f64;
            st.at = now;
            if st.tokens < 0.0 {
                -st.tokens / rate
            } else {
                0.0
            }
        };
        let deadline = Instant::now() + Duration::from_secs_f64(wait);
        loop {
            ctl.check()?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(true);
            }
            if abandon() {
                let mut st = lock(&self.st);
                if let Some(rate) = st.rate() {
                    st.tokens = (st.tokens + n as f64).min(Bucket::burst(rate));
                }
                return Ok(false);
            }
            std::thread::sleep((deadline - now).min(ABANDON_POLL));
        }
    }
}

/// How often a writer waiting for tokens checks whether its packet is
/// still wanted.
const ABANDON_POLL: Duration = Duration::from_millis(1);

/// Shorthand used by workers: the pool's stats counters.
pub fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::api::CancelToken;

    /// A take that would sleep for seconds gives up when its packet is no
    /// longer wanted, and gives its bytes back.
    #[test]
    fn an_abandoned_take_returns_its_bytes() {
        let ctl = Ctl::new(CancelToken::default(), Duration::from_secs(5));
        let l = RateLimiter::new(Some(1024.0 * 1024.0));
        // The burst (256 KiB) and then 4 s of debt.
        l.take_now(256 * 1024);
        let gone = Arc::new(AtomicBool::new(false));
        let g = gone.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            g.store(true, Ordering::SeqCst);
        });
        let taken = l
            .take_unless(4 << 20, &ctl, &|| gone.load(Ordering::SeqCst))
            .unwrap();
        t.join().unwrap();
        assert!(!taken);
        // The bytes came back: no 4 s debt is left behind.
        assert!(lock(&l.st).tokens > -((1u64 << 20) as f64));
        // Abandoned before taking: nothing taken at all.
        assert!(!l.take_unless(1 << 30, &ctl, &|| true).unwrap());
    }

    /// The pass loop's wait ends when the writers reach its target, not at
    /// its timeout: with an hour's timeout, a lost wake-up would hang here.
    #[test]
    fn a_drained_pass_wakes_its_waiter() {
        let ctl = Ctl::new(CancelToken::default(), Duration::from_secs(5));
        let pool = Pool::new(2, 0, 1 << 20, 1 << 20, ctl);
        let p = pool.clone();
        let writers = std::thread::spawn(move || {
            for _ in 0..1000 {
                p.pages_written(1);
            }
        });
        pool.wait_pages(1000, Duration::from_secs(3600));
        while pool.pages_done.load(Ordering::SeqCst) < 1000 {
            pool.wait_pages(1000, Duration::from_secs(3600));
        }
        writers.join().unwrap();
        // A target already reached returns at once.
        pool.wait_pages(10, Duration::from_secs(3600));
    }
}
