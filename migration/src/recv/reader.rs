//! Receiver data path: one reader thread per data connection validates each
//! frame and reads page data straight into guest memory with `readv`; the
//! per-pass barrier orders passes across connections; the "written" bitmap
//! lets zero-page markers leave never-written (fresh) memory untouched.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::devrecv::DeviceInbox;
use crate::error::MigrationError;
use crate::net::{
    lock, read_full, recv_header, recv_payload, vectored_full, Ctl, Dir, Notify, Start,
    POLL_INTERVAL,
};
use crate::pool::add;
use crate::stats::MigrationStats;
use crate::traits::{RamRegion, PAGE_SIZE};
use crate::wire::{decode_ranges, Kind, ResolvedRange, HEADER_LEN, RANGE_ENTRY_LEN};

/// Destination guest RAM plus one "written" bit per page.
///
/// Invariant: a bit is set only after data was read into its page; pages
/// whose bit is clear were never touched by the receiver (fresh memory).
#[derive(Debug)]
pub struct DestRam {
    /// Layout (host addresses valid while the destination VM lives).
    pub regions: Vec<RamRegion>,
    written: Vec<Vec<AtomicU64>>,
}

impl DestRam {
    /// Bitmaps for `regions`.
    pub fn new(regions: Vec<RamRegion>) -> Self {
        let written = regions
            .iter()
            .map(|r| {
                (0..r.pages().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        DestRam { regions, written }
    }

    /// Marks pages `[first, first + n)` of `region` written.
    pub fn mark(&self, region: usize, first: u64, n: u64) {
        let bm = &self.written[region];
        let (mut p, end) = (first, first + n);
        while p < end {
            let bit = p % 64;
            let take = (64 - bit).min(end - p);
            let mask = if take == 64 {
                u64::MAX
            } else {
                ((1u64 << take) - 1) << bit
            };
            bm[(p / 64) as usize].fetch_or(mask, Relaxed);
            p += take;
        }
    }

    /// Whether page `page` of `region` was ever written.
    pub fn is_written(&self, region: usize, page: u64) -> bool {
        self.written[region][(page / 64) as usize].load(Relaxed) & (1 << (page % 64)) != 0
    }

    fn host(&self, region: usize, page: u64) -> *mut u8 {
        (self.regions[region].host_addr + (page * PAGE_SIZE) as usize) as *mut u8
    }
}

#[derive(Debug)]
struct BarrierState {
    completed: u64,
    arrived: usize,
    exited: Vec<Option<u64>>,
}

/// The per-pass barrier: pass `k + 1` data of one connection is applied
/// only after every connection delivered SYNC(k).
///
/// Invariant: `completed` is the last pass every reader finished; no reader
/// applies a frame of pass `p` unless `completed == p - 1`.
#[derive(Debug)]
pub struct PassBarrier {
    st: Mutex<BarrierState>,
    cv: Condvar,
    n: usize,
}

impl PassBarrier {
    /// A barrier for `n` readers.
    pub fn new(n: usize) -> Self {
        PassBarrier {
            st: Mutex::new(BarrierState {
                completed: 0,
                arrived: 0,
                exited: vec![None; n],
            }),
            cv: Condvar::new(),
            n,
        }
    }

    /// Last pass completed on all connections.
    pub fn completed(&self) -> u64 {
        lock(&self.st).completed
    }

    /// Reader `idx` reached SYNC(`pass`): waits for all others. The last one
    /// to arrive runs `on_last` (consistency checks) before releasing all.
    pub fn wait(
        &self,
        idx: usize,
        pass: u64,
        ctl: &Ctl,
        on_last: &dyn Fn() -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut st = lock(&self.st);
        if pass != st.completed + 1 {
            return Err(MigrationError::proto(format!(
                "SYNC({pass}) while pass {} is open",
                st.completed + 1
            )));
        }
        st.arrived += 1;
        if st.arrived == self.n {
            on_last()?;
            st.completed = pass;
            st.arrived = 0;
            drop(st);
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            if st.completed >= pass {
                return Ok(());
            }
            ctl.check()?;
            if let Some(i) = st.exited.iter().position(|e| e.is_some_and(|c| c < pass)) {
                return Err(MigrationError::PeerClosed(format!(
                    "data connection {i} ended before pass {pass} (reader {idx} waiting)"
                )));
            }
            st = self
                .cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reader `idx` ended after completing `passes`.
    pub fn exit(&self, idx: usize, passes: u64) {
        lock(&self.st).exited[idx] = Some(passes);
        self.cv.notify_all();
    }
}

/// What the readers share.
pub struct ReaderCtx {
    /// Guest RAM.
    pub ram: Arc<DestRam>,
    /// Pass barrier.
    pub barrier: Arc<PassBarrier>,
    /// Device reorder buffers (channels mode only).
    pub inbox: Option<Arc<DeviceInbox>>,
    /// Session id every frame must carry.
    pub session: u128,
    /// Abort control.
    pub ctl: Arc<Ctl>,
    /// Statistics.
    pub stats: Arc<MigrationStats>,
    /// Largest accepted device chunk.
    pub chunk_max: u64,
    /// Wakes the receiver state machine.
    pub notify: Arc<Notify>,
    /// Set once the migration completed: readers stop applying anything.
    pub sealed: AtomicBool,
}

/// Starts one reader per data connection (index = connection index).
pub fn spawn_readers(
    ctx: &Arc<ReaderCtx>,
    streams: Vec<TcpStream>,
) -> Result<Vec<JoinHandle<()>>, MigrationError> {
    let mut v = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let ctx = ctx.clone();
        let h = std::thread::Builder::new()
            .name(format!("mig-reader-{i}"))
            .spawn(move || {
                let mut passes = 0;
                let r = run_reader(i, &s, &ctx, &mut passes);
                if let Err(e) = r {
                    if !ctx.sealed.load(SeqCst) {
                        ctx.ctl.fail(e);
                    }
                }
                ctx.barrier.exit(i, passes);
                ctx.notify.notify();
            })
            .map_err(|e| MigrationError::io("spawning a reader thread", e))?;
        v.push(h);
    }
    Ok(v)
}

fn run_reader(
    idx: usize,
    s: &TcpStream,
    ctx: &ReaderCtx,
    passes: &mut u64,
) -> Result<(), MigrationError> {
    let what = format!("reading data connection {idx}");
    let mut table = Vec::new();
    let mut ranges: Vec<ResolvedRange> = Vec::new();
    let mut iovs: Vec<libc::iovec> = Vec::new();
    loop {
        let (st, h) = recv_header(s, &ctx.ctl, true, &what)?;
        let h = match (st, h) {
            (Start::Idle, _) => continue,
            (Start::Eof, _) => return Ok(()),
            (_, Some(h)) => h,
            (_, None) => return Ok(()),
        };
        if ctx.sealed.load(SeqCst) {
            return Ok(());
        }
        if h.session != ctx.session {
            return Err(MigrationError::proto(format!(
                "frame of another session on data connection {idx}"
            )));
        }
        let pass = *passes + 1;
        match h.kind {
            Kind::Ram => {
                if h.a != pass {
                    return Err(MigrationError::proto(format!(
                        "RAM of pass {} while pass {pass} is open",
                        h.a
                    )));
                }
                table.resize(h.count as usize * RANGE_ENTRY_LEN, 0);
                read_full(s, &mut table, &ctx.ctl, &what)?;
                decode_ranges(&table, h.ram_data_len(), &ctx.ram.regions, &mut ranges)?;
                iovs.clear();
                for r in ranges.iter().filter(|r| !r.zero) {
                    iovs.push(libc::iovec {
                        iov_base: ctx.ram.host(r.region, r.first_page) as *mut libc::c_void,
                        iov_len: (r.npages * PAGE_SIZE) as usize,
                    });
                }
                // SAFETY: every range was checked to lie inside a region of
                // the destination's guest RAM, whose mapping is valid and
                // writable while the destination VM lives (RamRegion
                // invariant). Within a pass each page is sent once, so no
                // other reader writes these pages now.
                unsafe { vectored_full(s, &mut iovs, Dir::Read, &ctx.ctl, &what)? };
                let mut zero = 0;
                for r in &ranges {
                    if r.zero {
                        zero += r.npages;
                        for p in r.first_page..r.first_page + r.npages {
                            if ctx.ram.is_written(r.region, p) {
                                // SAFETY: page inside guest RAM (validated above).
                                unsafe {
                                    std::ptr::write_bytes(
                                        ctx.ram.host(r.region, p),
                                        0,
                                        PAGE_SIZE as usize,
                                    )
                                };
                            }
                        }
                    } else {
                        ctx.ram.mark(r.region, r.first_page, r.npages);
                    }
                }
                add(&ctx.stats.transferred_bytes, HEADER_LEN as u64 + h.len);
                add(&ctx.stats.zero_pages, zero);
            }
            Kind::Sync => {
                if h.a != pass {
                    return Err(MigrationError::proto(format!(
                        "SYNC({}) while pass {pass} is open",
                        h.a
                    )));
                }
                let check = || match &ctx.inbox {
                    Some(i) => i.check_contiguous(),
                    None => Ok(()),
                };
                ctx.barrier.wait(idx, pass, &ctx.ctl, &check)?;
                *passes = pass;
                ctx.stats.iteration.fetch_max(pass, Relaxed);
                ctx.notify.notify();
            }
            Kind::Device => {
                let inbox = ctx
                    .inbox
                    .as_ref()
                    .ok_or_else(|| MigrationError::proto("device data on a data connection"))?;
                if h.len > ctx.chunk_max {
                    return Err(MigrationError::proto(format!(
                        "device chunk of {} bytes over the announced {}",
                        h.len, ctx.chunk_max
                    )));
                }
                inbox.check_index(h.a)?;
                let data = recv_payload(s, h.len, &ctx.ctl, &what)?;
                inbox.deliver(h.a as usize, h.b, h.dev_item(), data)?;
            }
            Kind::Abort => {
                let m = recv_payload(s, h.len, &ctx.ctl, &what)?;
                return Err(MigrationError::PeerAborted(crate::wire::message_text(&m)));
            }
            Kind::Keepalive => {}
            k => {
                return Err(MigrationError::proto(format!(
                    "unexpected {k:?} frame on data connection {idx}"
                )))
            }
        }
    }
}
