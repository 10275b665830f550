//! Post-copy on the destination: the missing set, the fault thread that
//! asks the source for the pages faulting vCPUs wait for, and page
//! placement (`PostcopyRam::place`, never a write through the mapping) for
//! pages from the main connection (requested) and the data connections
//! (background push) alike. The first copy of a page wins; a later one is
//! dropped (the backend reports it present).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::net::{lock, Ctl, MainConn, Notify};
use crate::stats::MigrationStats;
use crate::traits::{GuestFault, PostcopyRam, PAGE_SIZE};
use crate::wire::{Frame, ResolvedRange};
use crate::worker::{self, Worker};

/// A vCPU (or VMM thread) waiting for a missing page.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    /// When its fault was read.
    since: Instant,
    /// Whether a PAGE_REQUEST went out for it on the current main connection.
    requested: bool,
}

/// The destination's post-copy state; lives from the switch until every
/// missing page is placed, across lost and resumed connections.
///
/// Invariants: `missing` never changes; a `received` bit is set only for a
/// missing page the backend placed, once, and `got` counts those bits;
/// `waiting` holds the missing pages a fault waits for that were not placed
/// when it was recorded; once `finished` is set nothing is placed any more.
pub struct PcDest {
    pc: Arc<dyn PostcopyRam>,
    /// `(gpa, size)` of each region.
    pub layout: Vec<(u64, u64)>,
    missing: Vec<Vec<u64>>,
    received: Vec<Vec<AtomicU64>>,
    total: u64,
    got: AtomicU64,
    waiting: Mutex<HashMap<(usize, u64), Waiter>>,
    nwaiting: AtomicUsize,
    /// The main connection of the current epoch and its control block.
    main: Mutex<Option<(Arc<MainConn>, Arc<Ctl>)>>,
    stats: Arc<MigrationStats>,
    notify: Arc<Notify>,
    finished: AtomicBool,
}

impl PcDest {
    /// Post-copy of the pages set in `missing` (one bitmap per region of
    /// `layout`, as decoded from POSTCOPY).
    pub fn new(
        pc: Arc<dyn PostcopyRam>,
        layout: Vec<(u64, u64)>,
        missing: Vec<Vec<u64>>,
        stats: Arc<MigrationStats>,
        notify: Arc<Notify>,
    ) -> PcDest {
        let total = missing
            .iter()
            .flatten()
            .map(|w| w.count_ones() as u64)
            .sum();
        let received = missing
            .iter()
            .map(|m| m.iter().map(|_| AtomicU64::new(0)).collect())
            .collect();
        PcDest {
            pc,
            layout,
            missing,
            received,
            total,
            got: AtomicU64::new(0),
            waiting: Mutex::new(HashMap::new()),
            nwaiting: AtomicUsize::new(0),
            main: Mutex::new(None),
            stats,
            notify,
            finished: AtomicBool::new(false),
        }
    }

    /// The statistics it updates.
    pub fn stats(&self) -> &Arc<MigrationStats> {
        &self.stats
    }

    /// Missing pages in all.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Whether every missing page was placed.
    pub fn complete(&self) -> bool {
        self.got.load(SeqCst) >= self.total
    }

    fn is_missing(&self, region: usize, page: u64) -> bool {
        crate::bitmap::page_set(&self.missing, region, page)
    }

    fn is_received(&self, region: usize, page: u64) -> bool {
        self.received
            .get(region)
            .and_then(|m| m.get((page / 64) as usize))
            .is_some_and(|w| w.load(SeqCst) & (1 << (page % 64)) != 0)
    }

    /// Runs `(first, npages)` of missing pages not yet received, per region
    /// (what a resumed source must still send).
    pub fn still_missing(&self) -> Vec<Vec<u64>> {
        self.missing
            .iter()
            .zip(&self.received)
            .map(|(m, r)| m.iter().zip(r).map(|(w, g)| w & !g.load(SeqCst)).collect())
            .collect()
    }

    /// Places the pages of a validated PAGES frame: `ranges` with their data
    /// in `data` (in table order).
    pub fn accept_all(&self, ranges: &[ResolvedRange], data: &[u8]) -> Result<(), MigrationError> {
        let mut off = 0usize;
        for r in ranges {
            if r.zero {
                self.accept(r.region, r.first_page, r.npages, None)?;
            } else {
                let len = (r.npages * PAGE_SIZE) as usize;
                let d = data.get(off..off + len).ok_or_else(|| {
                    MigrationError::Internal("PAGES data shorter than its table".into())
                })?;
                off += len;
                self.accept(r.region, r.first_page, r.npages, Some(d))?;
            }
        }
        Ok(())
    }

    /// Places pages `[first, first + n)` of `region` (`data`, or zero pages)
    /// unless already present, and accounts for the missing ones.
    fn accept(
        &self,
        region: usize,
        first: u64,
        n: u64,
        data: Option<&[u8]>,
    ) -> Result<(), MigrationError> {
        if self.finished.load(SeqCst) {
            return Ok(());
        }
        let mut present = Vec::new();
        let placed = match data {
            Some(d) => self.pc.place(region, first, d, &mut present),
            None => self.pc.place_zero(region, first, n, &mut present),
        };
        placed.map_err(|e| MigrationError::vm("placing post-copy pages", e))?;
        present.sort_unstable();
        let (Some(miss), Some(recv)) = (self.missing.get(region), self.received.get(region)) else {
            return Ok(());
        };
        let mut newly = 0;
        let end = first + n;
        let mut skip = present.iter().copied().peekable();
        for (word, mut mask) in crate::bitmap::word_masks(first, end) {
            // The pages of this word in the range: [lo, hi).
            let lo = word as u64 * 64 + u64::from(mask.trailing_zeros());
            let hi = lo + u64::from(mask.count_ones());
            while let Some(&q) = skip.peek() {
                if q >= hi {
                    break;
                }
                if q >= lo {
                    mask &= !(1 << (q % 64));
                }
                skip.next();
            }
            mask &= miss.get(word).copied().unwrap_or(0);
            if mask != 0 {
                if let Some(w) = recv.get(word) {
                    let old = w.fetch_or(mask, SeqCst);
                    newly += (mask & !old).count_ones() as u64;
                }
            }
        }
        if self.nwaiting.load(SeqCst) > 0 {
            let mut w = lock(&self.waiting);
            let now = Instant::now();
            w.retain(|&(r, pg), wt| {
                let done = r == region && pg >= first && pg < end && self.is_received(r, pg);
                if done {
                    self.stats
                        .fault_latency
                        .record(now.duration_since(wt.since).as_micros() as u64);
                }
                !done
            });
            self.nwaiting.store(w.len(), SeqCst);
        }
        if newly > 0 && self.got.fetch_add(newly, SeqCst) + newly >= self.total {
            self.notify.notify();
        }
        Ok(())
    }

    /// Handles one fault: a received page is woken, a page that is not
    /// missing is zero-filled (it read as zero before post-copy), a missing
    /// one is asked for (once) from the source.
    fn on_fault(&self, f: GuestFault) -> Result<(), MigrationError> {
        if self.layout.get(f.region).is_none() {
            log::warn!("post-copy fault outside guest RAM ignored: {f:?}");
            return Ok(());
        }
        if self.is_received(f.region, f.page) {
            return self
                .pc
                .wake(f.region, f.page, 1)
                .map_err(|e| MigrationError::vm("waking a faulting vCPU", e));
        }
        if !self.is_missing(f.region, f.page) {
            let mut present = Vec::new();
            return self
                .pc
                .place_zero(f.region, f.page, 1, &mut present)
                .map_err(|e| MigrationError::vm("zero-filling a never-sent page", e));
        }
        let fresh = {
            let mut w = lock(&self.waiting);
            let fresh = !w.contains_key(&(f.region, f.page));
            w.entry((f.region, f.page)).or_insert(Waiter {
                since: Instant::now(),
                requested: false,
            });
            self.nwaiting.store(w.len(), SeqCst);
            fresh
        };
        // The page may have arrived between the check and the insert.
        if self.is_received(f.region, f.page) {
            let mut w = lock(&self.waiting);
            w.remove(&(f.region, f.page));
            self.nwaiting.store(w.len(), SeqCst);
            return self
                .pc
                .wake(f.region, f.page, 1)
                .map_err(|e| MigrationError::vm("waking a faulting vCPU", e));
        }
        if fresh {
            self.request(f.region, f.page);
        }
        Ok(())
    }

    /// Sends a PAGE_REQUEST for one page if a main connection is up; a
    /// failed send leaves it to [`PcDest::resend`].
    fn request(&self, region: usize, page: u64) {
        let Some((main, ctl)) = lock(&self.main).clone() else {
            return;
        };
        let gpa = self.layout[region].0 + page * PAGE_SIZE;
        let frame = Frame::PageRequest { gpa, npages: 1 };
        if main.send(&frame, &[], &ctl, "requesting a page").is_ok() {
            self.stats.postcopy_requests.fetch_add(1, Relaxed);
            if let Some(w) = lock(&self.waiting).get_mut(&(region, page)) {
                w.requested = true;
            }
        }
    }

    /// Uses `main` (under `ctl`) for page requests from now on (`None`: the
    /// connection is lost) and asks again for every page still waited for.
    pub fn set_main(&self, main: Option<(Arc<MainConn>, Arc<Ctl>)>) {
        let up = main.is_some();
        *lock(&self.main) = main;
        if up {
            self.resend();
        } else {
            for w in lock(&self.waiting).values_mut() {
                w.requested = false;
            }
        }
    }

    /// Asks again for every page a fault waits for and no request went out
    /// for on the current connection.
    fn resend(&self) {
        let pending: Vec<(usize, u64)> = lock(&self.waiting)
            .iter()
            .filter(|(_, w)| !w.requested)
            .map(|(k, _)| *k)
            .collect();
        for (r, p) in pending {
            self.request(r, p);
        }
    }

    /// Every page is here: nothing is placed any more, and the RAM is
    /// unregistered (later faults are ordinary ones and read zero).
    pub fn finish(&self) -> Result<(), MigrationError> {
        self.finished.store(true, SeqCst);
        *lock(&self.main) = None;
        self.pc
            .unregister()
            .map_err(|e| MigrationError::vm("ending post-copy", e))
    }
}

/// The thread that reads faults and resolves or requests them; stopped and
/// joined when dropped.
pub struct FaultThread {
    stop: CancelToken,
    handle: Option<Worker>,
}

impl FaultThread {
    /// Starts reading `pcd`'s faults. A backend error stops the thread
    /// (logged): the faulting threads then wait until the RAM is
    /// unregistered.
    pub fn spawn(pcd: Arc<PcDest>) -> Result<FaultThread, MigrationError> {
        let stop = CancelToken::default();
        let ctl = Ctl::new(stop.clone(), crate::net::STALL_TIMEOUT);
        let st = stop.clone();
        let handle = worker::spawn("mig-pc-faults", &ctl, move || {
            let mut faults = Vec::new();
            while !st.is_cancelled() {
                let r = pcd
                    .pc
                    .wait_faults(Duration::from_millis(100), &mut faults)
                    .map_err(|e| MigrationError::vm("reading post-copy faults", e))
                    .and_then(|()| faults.drain(..).try_for_each(|f| pcd.on_fault(f)));
                if let Err(e) = r {
                    log::error!("post-copy fault thread stopped: {e}");
                    return Err(e);
                }
            }
            Ok(())
        })?;
        Ok(FaultThread {
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for FaultThread {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = worker::join(h);
        }
    }
}
