//! Writer threads: one per data connection. A writer takes items from its
//! queue, detects zero pages, builds the frame header and range table and
//! `writev`s them together with the page data straight from guest memory
//! (no copy into an intermediate buffer).

use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::MigrationError;
use crate::net::{vectored_full, Ctl, Dir};
use crate::pool::{add, Item, PageRun, Pool, RateLimiter};
use crate::stats::{DeviceCounters, MigrationStats};
use crate::traits::{RamRegion, PAGE_SIZE};
use crate::wire::{Header, Kind, RangeEntry, HEADER_LEN, RANGE_ZERO};

/// Whether the 4 KiB page at `p` is all zeroes.
///
/// # Safety
/// `p` must point to `PAGE_SIZE` readable bytes. The guest may write the page
/// concurrently; a torn answer is harmless because such a write also marks
/// the page dirty and it is sent again in the next pass.
pub unsafe fn page_is_zero(p: *const u8) -> bool {
    if (p as usize) % 8 != 0 {
        // SAFETY: caller guarantees PAGE_SIZE readable bytes.
        let s = unsafe { std::slice::from_raw_parts(p, PAGE_SIZE as usize) };
        return s.iter().all(|&b| b == 0);
    }
    // SAFETY: aligned, PAGE_SIZE readable bytes.
    let s = unsafe { std::slice::from_raw_parts(p as *const u64, PAGE_SIZE as usize / 8) };
    // Blocks of 512 bytes: vectorizes and still exits early on data.
    s.chunks_exact(64)
        .all(|b| b.iter().fold(0u64, |a, &x| a | x) == 0)
}

/// What a writer needs; shared by all writers of one migration.
pub struct WriterCtx {
    /// The queues.
    pub pool: Arc<Pool>,
    /// Source RAM layout (host addresses valid for the whole migration).
    pub regions: Vec<RamRegion>,
    /// Session id stamped on every frame.
    pub session: u128,
    /// Statistics.
    pub stats: Arc<MigrationStats>,
    /// Per-device counters (index = device index).
    pub devs: Vec<Arc<DeviceCounters>>,
    /// Optional bandwidth cap.
    pub limiter: Option<Arc<RateLimiter>>,
    /// Abort control.
    pub ctl: Arc<Ctl>,
}

/// Starts one writer per stream. Each returns when it has sent CLOSE, or on
/// the first error (which it also reports through `ctl.fail`).
pub fn spawn_writers(
    ctx: Arc<WriterCtx>,
    streams: Vec<TcpStream>,
) -> Result<Vec<JoinHandle<()>>, MigrationError> {
    let mut handles = Vec::new();
    for (i, s) in streams.into_iter().enumerate() {
        let ctx = ctx.clone();
        let h = std::thread::Builder::new()
            .name(format!("mig-writer-{i}"))
            .spawn(move || {
                if let Err(e) = run_writer(i, &s, &ctx) {
                    ctx.ctl.fail(e);
                }
            })
            .map_err(|e| MigrationError::io("spawning a writer thread", e))?;
        handles.push(h);
    }
    Ok(handles)
}

fn iov(p: *const u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: p as *mut libc::c_void,
        iov_len: len,
    }
}

fn run_writer(conn: usize, s: &TcpStream, ctx: &WriterCtx) -> Result<(), MigrationError> {
    let what = format!("writing data connection {conn}");
    let mut table: Vec<u8> = Vec::with_capacity(8192);
    let mut iovs: Vec<libc::iovec> = Vec::with_capacity(1030);
    loop {
        let item = ctx.pool.pop(conn)?;
        let cost = item.cost();
        match item {
            Item::Ram { pass, runs } => {
                let (wire, zero, pages) =
                    write_ram(s, ctx, pass, &runs, &mut table, &mut iovs, &what)?;
                add(&ctx.pool.sent_bytes, wire);
                add(&ctx.pool.pages_done, pages);
                add(&ctx.stats.transferred_bytes, wire);
                add(&ctx.stats.zero_pages, zero);
                ctx.pool.done(conn, cost, 0);
            }
            Item::Device {
                dev,
                seq,
                kind,
                data,
            } => {
                let h = Header::new(Kind::Device, ctx.session)
                    .args(dev as u64, seq, kind as u64)
                    .with_len(data.len() as u64);
                let head = h.encode();
                if let Some(l) = &ctx.limiter {
                    l.take((HEADER_LEN + data.len()) as u64, &ctx.ctl)?;
                }
                iovs.clear();
                iovs.push(iov(head.as_ptr(), HEADER_LEN));
                if !data.is_empty() {
                    iovs.push(iov(data.as_ptr(), data.len()));
                }
                // SAFETY: `head` and `data` outlive the call.
                unsafe { vectored_full(s, &mut iovs, Dir::Write, &ctx.ctl, &what)? };
                add(&ctx.pool.sent_bytes, (HEADER_LEN + data.len()) as u64);
                if let Some(d) = ctx.devs.get(dev as usize) {
                    add(&d.transferred, data.len() as u64);
                }
                ctx.pool.done(conn, cost, cost);
            }
            Item::Sync { pass } => {
                let h = Header::new(Kind::Sync, ctx.session)
                    .args(pass, 0, 0)
                    .encode();
                iovs.clear();
                iovs.push(iov(h.as_ptr(), HEADER_LEN));
                // SAFETY: `h` outlives the call.
                unsafe { vectored_full(s, &mut iovs, Dir::Write, &ctx.ctl, &what)? };
                add(&ctx.pool.sent_bytes, HEADER_LEN as u64);
            }
            Item::Close => {
                let _ = s.shutdown(Shutdown::Write);
                log::debug!("data connection {conn}: closed after the final pass");
                return Ok(());
            }
        }
    }
}

/// Sends one RAM packet; returns (wire bytes, zero pages, pages).
fn write_ram(
    s: &TcpStream,
    ctx: &WriterCtx,
    pass: u64,
    runs: &[PageRun],
    table: &mut Vec<u8>,
    iovs: &mut Vec<libc::iovec>,
    what: &str,
) -> Result<(u64, u64, u64), MigrationError> {
    table.clear();
    iovs.clear();
    iovs.push(iov(std::ptr::null(), 0)); // header, filled below
    iovs.push(iov(std::ptr::null(), 0)); // table, filled below
    let mut count = 0u32;
    let mut data = 0u64;
    let mut zero = 0u64;
    let mut pages = 0u64;
    for run in runs {
        let r = ctx.regions[run.region as usize];
        let base = r.host_addr + (run.first_page * PAGE_SIZE) as usize;
        let at = |p: u64| (base + (p * PAGE_SIZE) as usize) as *const u8;
        let mut p = 0;
        while p < run.npages {
            // SAFETY: the scheduler only queues pages inside the region, whose
            // mapping stays valid for the whole migration (RamRegion invariant).
            let z = unsafe { page_is_zero(at(p)) };
            let mut q = p + 1;
            // SAFETY: as above.
            while q < run.npages && unsafe { page_is_zero(at(q)) } == z {
                q += 1;
            }
            let n = q - p;
            RangeEntry {
                gpa: r.gpa + (run.first_page + p) * PAGE_SIZE,
                npages: n as u32,
                flags: if z { RANGE_ZERO } else { 0 },
            }
            .encode_into(table);
            count += 1;
            if z {
                zero += n;
            } else {
                iovs.push(iov(at(p), (n * PAGE_SIZE) as usize));
                data += n * PAGE_SIZE;
            }
            pages += n;
            p = q;
        }
    }
    let mut h = Header::new(Kind::Ram, ctx.session).args(pass, 0, 0);
    h.count = count;
    h.len = table.len() as u64 + data;
    let head = h.encode();
    iovs[0] = iov(head.as_ptr(), HEADER_LEN);
    iovs[1] = iov(table.as_ptr(), table.len());
    let wire = HEADER_LEN as u64 + h.len;
    if let Some(l) = &ctx.limiter {
        l.take(wire, &ctx.ctl)?;
    }
    // SAFETY: header and table live on this stack frame / in `table`; page
    // data lies in guest RAM mappings valid for the migration.
    unsafe { vectored_full(s, iovs, Dir::Write, &ctx.ctl, what)? };
    Ok((wire, zero, pages))
}
