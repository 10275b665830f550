//! Writer threads: one per data connection. A writer takes items from its
//! queue, detects zero pages, builds the frame header and range table and
//! `writev`s them together with the page data straight from guest memory
//! (no copy into an intermediate buffer). With `"zero_copy": true` the
//! pages go out with `MSG_ZEROCOPY` instead (see `crate::net::ZeroCopy`):
//! a writer waits for its connection's completions after each SYNC and
//! before it ends, and publishes that in [`WriterCtx::zc_synced`], which
//! the switch-over awaits before the commit point. With compression each
//! writer compresses its packets' page data with its own zstd context
//! ([`super::zstd::WriterZstd`]) and sends the result when it shrinks; a
//! compressed packet goes copied (it is the writer's reused buffer, not
//! guest memory), one that did not shrink zero-copy when that is on.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::pool::{add, Item, PageRun, Pool, RateLimiter};
use super::push::{PushSet, PUSH_PACKET_PAGES};
use super::zstd::WriterZstd;
use crate::error::MigrationError;
use crate::guest_mem::{Gather, GuestMemory, IoVecs};
use crate::net::{write_vecs, Channel, Ctl};
use crate::stats::{DeviceCounters, MigrationStats};
use crate::traits::PAGE_SIZE;
use crate::wire::{Frame, RangeEntry, HEADER_LEN, RANGE_ZERO};
use crate::worker::Workers;

/// What a writer needs; shared by all writers of one migration.
pub struct WriterCtx {
    /// The queues.
    pub pool: Arc<Pool>,
    /// Source guest RAM.
    pub mem: Arc<GuestMemory>,
    /// Session id stamped on every frame.
    pub session: u128,
    /// Statistics.
    pub stats: Arc<MigrationStats>,
    /// Per-device counters (index = device index).
    pub devs: Vec<Arc<DeviceCounters>>,
    /// The bandwidth cap (live; unlimited while unset).
    pub limiter: Arc<RateLimiter>,
    /// Abort control.
    pub ctl: Arc<Ctl>,
    /// Set when post-copy starts, before [`Item::Postcopy`] is queued.
    pub postcopy: OnceLock<Arc<PushSet>>,
    /// Zero-copy is on for the data connections.
    pub zero_copy: bool,
    /// Per connection: 1 + the last pass whose SYNC was written with every
    /// zero-copy send before it completed (0: none yet).
    pub zc_synced: Vec<AtomicU64>,
    /// The zstd level of RAM compression (`None`: off); agreed with the
    /// destination at SETUP.
    pub zstd_level: Option<i32>,
}

impl WriterCtx {
    /// The `zc_synced` slots for `conns` connections.
    pub fn zc_slots(conns: usize) -> Vec<AtomicU64> {
        (0..conns).map(|_| AtomicU64::new(0)).collect()
    }

    /// Waits until every connection's zero-copy sends up to the SYNC of
    /// `pass` completed (at once without zero-copy): the source's pages
    /// are then no longer read by the kernel. `check` is polled (deadline).
    pub fn await_zero_copy(
        &self,
        pass: u64,
        check: &dyn Fn() -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        if !self.zero_copy {
            return Ok(());
        }
        loop {
            self.ctl.check()?;
            if self.zc_synced.iter().all(|a| a.load(SeqCst) > pass) {
                return Ok(());
            }
            check()?;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// What a RAM frame is: a pre-copy pass's or a post-copy push.
#[derive(Debug, Clone, Copy)]
enum Packet {
    Ram { pass: u64 },
    Pages,
}

/// Starts one writer per stream into `workers`. Each returns when it has
/// sent CLOSE, or on the first error (which it also reports through
/// `ctl.fail`).
pub fn spawn_writers(
    ctx: Arc<WriterCtx>,
    streams: Vec<Arc<Channel>>,
    workers: &mut Workers,
) -> Result<(), MigrationError> {
    for (i, s) in streams.into_iter().enumerate() {
        let ctx = ctx.clone();
        workers.spawn(&format!("mig-writer-{i}"), move || {
            run_writer(i, &s, &ctx).map_err(|e| {
                ctx.ctl.fail(e);
                MigrationError::Aborted
            })
        })?;
    }
    Ok(())
}

fn run_writer(conn: usize, s: &Channel, ctx: &WriterCtx) -> Result<(), MigrationError> {
    let what = format!("writing data connection {conn}");
    let mut table: Vec<u8> = Vec::with_capacity(8192);
    let mut data_runs: Vec<(usize, u64, u64)> = Vec::with_capacity(1030);
    let mut storage: Vec<libc::iovec> = Vec::with_capacity(1030);
    // One zstd context per writer, reused for every packet.
    let mut zstd = ctx.zstd_level.map(WriterZstd::new).transpose()?;
    loop {
        let item = ctx.pool.pop(conn)?;
        let cost = item.cost();
        match item {
            Item::Ram { pass, runs } => {
                let Some((wire, zero, pages)) = write_ram(
                    s,
                    ctx,
                    Packet::Ram { pass },
                    &runs,
                    &mut table,
                    &mut data_runs,
                    &mut storage,
                    zstd.as_mut(),
                    &what,
                )?
                else {
                    // The switch to post-copy came while this packet waited
                    // for the bandwidth cap: its pages are in the missing
                    // set (the interrupted pass), so it is not sent.
                    let pages: u64 = runs.iter().map(|r| r.npages).sum();
                    ctx.pool.drop_pages(pages);
                    ctx.pool.done(conn, cost, 0);
                    continue;
                };
                add(&ctx.pool.sent_bytes, wire);
                ctx.pool.pages_written(pages);
                add(&ctx.stats.transferred_bytes, wire);
                add(&ctx.stats.zero_pages, zero);
                add(&ctx.stats.normal_pages, pages - zero);
                add(&ctx.stats.sent_pages, pages);
                ctx.pool.done(conn, cost, 0);
            }
            Item::Device {
                dev,
                seq,
                kind,
                data,
            } => {
                let head = Frame::Device {
                    dev,
                    seq,
                    item: kind,
                    len: data.len() as u64,
                }
                .encode_v(ctx.session, s.version());
                ctx.limiter
                    .take((HEADER_LEN + data.len()) as u64, &ctx.ctl)?;
                let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(std::mem::take(&mut storage));
                v.push_bytes(&head);
                v.push_bytes(&data);
                write_vecs(s, &mut v, &ctx.ctl, &what)?;
                storage = v.into_storage();
                add(&ctx.pool.sent_bytes, (HEADER_LEN + data.len()) as u64);
                if let Some(d) = ctx.devs.get(dev as usize) {
                    add(&d.transferred, data.len() as u64);
                }
                ctx.pool.done(conn, cost, cost);
                // Back to the save threads: no allocation per chunk.
                ctx.pool.recycle(data);
            }
            Item::Sync { pass } => {
                let head = Frame::Sync { pass }.encode_v(ctx.session, s.version());
                let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(std::mem::take(&mut storage));
                v.push_bytes(&head);
                write_vecs(s, &mut v, &ctx.ctl, &what)?;
                storage = v.into_storage();
                add(&ctx.pool.sent_bytes, HEADER_LEN as u64);
                log::trace!("data connection {conn}: SYNC({pass}) written");
                if ctx.zero_copy {
                    s.drain_zero_copy(&ctx.ctl, &what)?;
                    if let Some(a) = ctx.zc_synced.get(conn) {
                        a.store(pass + 1, SeqCst);
                    }
                }
            }
            Item::Close => {
                s.close_write();
                s.drain_zero_copy(&ctx.ctl, &what)?;
                log::debug!("data connection {conn}: closed after the final pass");
                return Ok(());
            }
            Item::Postcopy => {
                let push = ctx.postcopy.get().cloned().ok_or_else(|| {
                    MigrationError::Internal("post-copy started without its push set".into())
                })?;
                let mut pushed = 0u64;
                loop {
                    let runs = push.claim_next(PUSH_PACKET_PAGES);
                    if runs.is_empty() {
                        break;
                    }
                    let Some((wire, zero, pages)) = write_ram(
                        s,
                        ctx,
                        Packet::Pages,
                        &runs,
                        &mut table,
                        &mut data_runs,
                        &mut storage,
                        zstd.as_mut(),
                        &what,
                    )?
                    else {
                        return Err(MigrationError::Internal(
                            "a post-copy packet was given up".into(),
                        ));
                    };
                    pushed += pages;
                    add(&ctx.pool.sent_bytes, wire);
                    add(&ctx.stats.transferred_bytes, wire);
                    add(&ctx.stats.postcopy_bytes, wire);
                    add(&ctx.stats.zero_pages, zero);
                    add(&ctx.stats.normal_pages, pages - zero);
                }
                s.close_write();
                s.drain_zero_copy(&ctx.ctl, &what)?;
                log::debug!("data connection {conn}: post-copy push done ({pushed} pages)");
                return Ok(());
            }
        }
    }
}

/// The range table of a packet of `runs` and its data runs.
pub struct Classified {
    /// Range-table entries.
    pub count: u32,
    /// Page data bytes.
    pub data: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages.
    pub pages: u64,
}

/// Classifies every page of `runs` as zero or data (volatile reads) and
/// builds the range table (one entry per run of equal class) in `table`
/// and the data runs `(region, first page, pages)` in `data_runs`.
pub fn classify(
    mem: &GuestMemory,
    runs: &[PageRun],
    table: &mut Vec<u8>,
    data_runs: &mut Vec<(usize, u64, u64)>,
) -> Result<Classified, MigrationError> {
    table.clear();
    data_runs.clear();
    let mut c = Classified {
        count: 0,
        data: 0,
        zero: 0,
        pages: 0,
    };
    for run in runs {
        let region = run.region as usize;
        let gpa0 = mem
            .regions()
            .get(region)
            .map(|r| r.gpa())
            .ok_or_else(|| MigrationError::Internal(format!("RAM region {region} queued")))?;
        let is_zero = |p: u64| mem.page_is_zero(region, run.first_page + p);
        let mut p = 0;
        while p < run.npages {
            let z = is_zero(p)?;
            let mut q = p + 1;
            while q < run.npages && is_zero(q)? == z {
                q += 1;
            }
            let n = q - p;
            RangeEntry {
                gpa: gpa0 + (run.first_page + p) * PAGE_SIZE,
                npages: n as u32,
                flags: if z { RANGE_ZERO } else { 0 },
            }
            .encode_into(table);
            c.count += 1;
            if z {
                c.zero += n;
            } else {
                data_runs.push((region, run.first_page + p, n));
                c.data += n * PAGE_SIZE;
            }
            c.pages += n;
            p = q;
        }
    }
    Ok(c)
}

/// Sends one RAM packet; returns (wire bytes, zero pages, pages), or `None`
/// for a pre-copy packet given up at the switch to post-copy (nothing of it
/// was written).
///
/// Zero pages are detected here, page by page with volatile reads; runs of
/// equal zero-ness become one range-table entry each. The header, the table
/// and the non-zero pages go out in one `writev`, the pages straight from
/// guest memory.
#[allow(clippy::too_many_arguments)]
fn write_ram(
    s: &Channel,
    ctx: &WriterCtx,
    kind: Packet,
    runs: &[PageRun],
    table: &mut Vec<u8>,
    data_runs: &mut Vec<(usize, u64, u64)>,
    storage: &mut Vec<libc::iovec>,
    zstd: Option<&mut WriterZstd>,
    what: &str,
) -> Result<Option<(u64, u64, u64)>, MigrationError> {
    let mem = &*ctx.mem;
    let c = classify(mem, runs, table, data_runs)?;
    // Zero pages were taken out above: only the data pages are compressed.
    let packed = match zstd {
        Some(z) => Some(z.pack(mem, data_runs, c.data)?),
        None => None,
    };
    let zstd_len = packed.flatten().map_or(0, |p| p.len() as u64);
    let frame = match kind {
        Packet::Ram { pass } => Frame::Ram {
            pass,
            ranges: c.count,
            data_len: c.data,
            zstd_len,
        },
        Packet::Pages => Frame::Pages {
            requested: false,
            ranges: c.count,
            data_len: c.data,
            zstd_len,
        },
    };
    let head = frame.encode_v(ctx.session, s.version());
    let wire = HEADER_LEN as u64 + frame.payload_len();
    match kind {
        Packet::Ram { .. } => {
            let pool = &ctx.pool;
            if !ctx
                .limiter
                .take_unless(wire, &ctx.ctl, &|| pool.switch_requested())?
            {
                return Ok(None);
            }
        }
        Packet::Pages => ctx.limiter.take(wire, &ctx.ctl)?,
    }
    let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(std::mem::take(storage));
    v.push_bytes(&head);
    v.push_bytes(table);
    let compressed = packed.flatten();
    if compressed.is_none() && s.zero_copy_pages() && c.data > 0 {
        // Header and table are copied (their buffers are reused at once);
        // the pages go from guest memory with MSG_ZEROCOPY. A compressed
        // packet is not guest memory but the writer's reused output
        // buffer (and a fraction of the pages' size): it is copied.
        write_vecs(s, &mut v, &ctx.ctl, what)?;
        let mut d: IoVecs<'_, Gather> = IoVecs::with_storage(v.into_storage());
        for &(region, first, n) in data_runs.iter() {
            d.push_guest(mem, region, first, n)?;
        }
        s.send_zero_copy(&mut d, &ctx.ctl, what)?;
        *storage = d.into_storage();
    } else {
        match compressed {
            Some(p) => v.push_bytes(p),
            None => {
                for &(region, first, n) in data_runs.iter() {
                    v.push_guest(mem, region, first, n)?;
                }
            }
        }
        write_vecs(s, &mut v, &ctx.ctl, what)?;
        *storage = v.into_storage();
    }
    if packed.is_some() && c.data > 0 {
        let sent = if zstd_len > 0 { zstd_len } else { c.data };
        ctx.stats.compression.packet(c.data, sent);
    }
    Ok(Some((wire, c.zero, c.pages)))
}
