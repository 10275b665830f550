//! Receiver data path: one reader thread per data connection validates each
//! frame and reads page data straight into guest memory with `readv`; the
//! per-pass barrier (`barrier`) orders passes across connections; the
//! "written" bitmap lets zero-page markers leave never-written (fresh)
//! memory untouched, which relies on the receiver contract of
//! [`crate::DestinationVm::ram`] (destination RAM reads as zero until
//! written).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};

use super::barrier::PassBarrier;
use super::devices::DeviceInbox;
use super::postcopy::PcDest;
use crate::error::MigrationError;
use crate::guest_mem::{GuestMemory, IoVecs, Scatter};
use crate::net::{read_full, read_vecs, recv_frame, recv_payload, Channel, Ctl, Notify, Recv};
use crate::stats::MigrationStats;
use crate::wire::{decode_ranges, Frame, ResolvedRange, HEADER_LEN, RANGE_ENTRY_LEN};
use crate::worker::Workers;

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Relaxed);
}

/// Destination guest RAM plus one "written" bit per page.
///
/// Invariant: a bit is set only after data was read into its page; pages
/// whose bit is clear were never touched by the receiver (fresh memory);
/// `layout` is `mem`'s layout.
#[derive(Debug)]
pub struct DestRam {
    /// The guest memory (keeps the destination VM alive).
    pub mem: GuestMemory,
    /// The layout as `(gpa, size)`, for range-table validation.
    pub layout: Vec<(u64, u64)>,
    written: Vec<Vec<AtomicU64>>,
}

impl DestRam {
    /// Bitmaps for the regions of `mem`.
    pub fn new(mem: GuestMemory) -> Self {
        let written = mem
            .regions()
            .iter()
            .map(|r| {
                (0..r.pages().div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect()
            })
            .collect();
        DestRam {
            layout: mem.layout(),
            mem,
            written,
        }
    }

    /// Marks pages `[first, first + n)` of `region` written.
    pub fn mark(&self, region: usize, first: u64, n: u64) {
        let bm = &self.written[region];
        for (word, mask) in crate::bitmap::word_masks(first, first + n) {
            bm[word].fetch_or(mask, Relaxed);
        }
    }

    /// Whether page `page` of `region` was ever written.
    pub fn is_written(&self, region: usize, page: u64) -> bool {
        self.written[region][(page / 64) as usize].load(Relaxed) & (1 << (page % 64)) != 0
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
    /// Set once the destination switched to post-copy (before READY): from
    /// then on only PAGES frames carry RAM, placed through it.
    pub postcopy: OnceLock<Arc<PcDest>>,
}

/// Starts one reader per data connection (index = connection index) into
/// `workers`.
pub fn spawn_readers(
    ctx: &Arc<ReaderCtx>,
    streams: Vec<Channel>,
    workers: &mut Workers,
) -> Result<(), MigrationError> {
    for (i, s) in streams.into_iter().enumerate() {
        let ctx = ctx.clone();
        workers.spawn(&format!("mig-reader-{i}"), move || {
            let mut passes = 0;
            let r = run_reader(i, &s, &ctx, &mut passes);
            if let Err(e) = r {
                if !ctx.sealed.load(SeqCst) {
                    ctx.ctl.fail(e);
                }
            }
            ctx.barrier.exit(i, passes);
            ctx.notify.notify();
            Ok(())
        })?;
    }
    Ok(())
}

fn run_reader(
    idx: usize,
    s: &Channel,
    ctx: &ReaderCtx,
    passes: &mut u64,
) -> Result<(), MigrationError> {
    let what = format!("reading data connection {idx}");
    let mut table = Vec::new();
    let mut ranges: Vec<ResolvedRange> = Vec::new();
    let mut storage: Vec<libc::iovec> = Vec::new();
    let mut pages: Vec<u8> = Vec::new();
    let ram = &*ctx.ram;
    loop {
        let env = match recv_frame(s, &ctx.ctl, true, &what)? {
            Recv::Idle => continue,
            Recv::Eof => return Ok(()),
            Recv::Frame(env) => env,
        };
        if ctx.sealed.load(SeqCst) {
            return Ok(());
        }
        if env.session != ctx.session {
            return Err(MigrationError::proto(format!(
                "frame of another session on data connection {idx}"
            )));
        }
        let pass = *passes + 1;
        match env.frame {
            Frame::Pages {
                ranges: count,
                data_len,
                ..
            } => {
                let pcd = ctx.postcopy.get().ok_or_else(|| {
                    MigrationError::proto(format!(
                        "PAGES before post-copy on data connection {idx}"
                    ))
                })?;
                table.resize(count as usize * RANGE_ENTRY_LEN, 0);
                read_full(s, &mut table, &ctx.ctl, &what)?;
                decode_ranges(&table, data_len, &ram.layout, &mut ranges)?;
                // Bounded by the header check (≤ MAX_PACKET_PAGES pages).
                pages.resize(data_len as usize, 0);
                read_full(s, &mut pages, &ctx.ctl, &what)?;
                pcd.accept_all(&ranges, &pages)?;
                let (zero, normal) = count_pages(&ranges);
                add(&ctx.stats.zero_pages, zero);
                add(&ctx.stats.normal_pages, normal);
                add(
                    &ctx.stats.postcopy_bytes,
                    HEADER_LEN as u64 + env.frame.payload_len(),
                );
                add(
                    &ctx.stats.transferred_bytes,
                    HEADER_LEN as u64 + env.frame.payload_len(),
                );
            }
            Frame::Ram {
                pass: p,
                ranges: count,
                data_len,
            } => {
                if ctx.postcopy.get().is_some() {
                    return Err(MigrationError::proto(format!(
                        "pre-copy RAM after the switch to post-copy on data connection {idx}"
                    )));
                }
                if p != pass {
                    return Err(MigrationError::proto(format!(
                        "RAM of pass {p} while pass {pass} is open"
                    )));
                }
                table.resize(count as usize * RANGE_ENTRY_LEN, 0);
                read_full(s, &mut table, &ctx.ctl, &what)?;
                decode_ranges(&table, data_len, &ram.layout, &mut ranges)?;
                // Every range lies inside a region of the destination's
                // guest RAM (validated above). Within a pass each page is
                // sent once, so no other reader writes these pages now.
                let mut v: IoVecs<'_, Scatter> = IoVecs::with_storage(std::mem::take(&mut storage));
                for r in ranges.iter().filter(|r| !r.zero) {
                    v.push_guest_mut(&ram.mem, r.region, r.first_page, r.npages)?;
                }
                read_vecs(s, &mut v, &ctx.ctl, &what)?;
                storage = v.into_storage();
                let mut zero = 0;
                let mut normal = 0;
                for r in &ranges {
                    if !r.zero {
                        normal += r.npages;
                    }
                    if r.zero {
                        zero += r.npages;
                        // Fresh pages read as zero already (receiver
                        // contract); only pages written earlier are cleared.
                        for p in r.first_page..r.first_page + r.npages {
                            if ram.is_written(r.region, p) {
                                ram.mem.zero_pages(r.region, p, 1)?;
                            }
                        }
                    } else {
                        ram.mark(r.region, r.first_page, r.npages);
                    }
                }
                add(
                    &ctx.stats.transferred_bytes,
                    HEADER_LEN as u64 + env.frame.payload_len(),
                );
                add(&ctx.stats.zero_pages, zero);
                add(&ctx.stats.normal_pages, normal);
            }
            Frame::Sync { pass: p } => {
                if p != pass {
                    return Err(MigrationError::proto(format!(
                        "SYNC({p}) while pass {pass} is open"
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
            Frame::Device {
                dev,
                seq,
                item,
                len,
            } => {
                let inbox = ctx
                    .inbox
                    .as_ref()
                    .ok_or_else(|| MigrationError::proto("device data on a data connection"))?;
                if len > ctx.chunk_max {
                    return Err(MigrationError::proto(format!(
                        "device chunk of {len} bytes over the announced {}",
                        ctx.chunk_max
                    )));
                }
                // Budget first (waiting while it is spent), then the payload.
                let t = inbox.admit(dev as usize, seq, item, len, false)?;
                let data = recv_payload(s, len, &ctx.ctl, &what)?;
                inbox.deliver(t, data)?;
            }
            Frame::Abort { len } => {
                let m = recv_payload(s, len, &ctx.ctl, &what)?;
                return Err(MigrationError::PeerAborted(crate::wire::message_text(&m)));
            }
            Frame::Keepalive => {}
            f => {
                return Err(MigrationError::proto(format!(
                    "unexpected {:?} frame on data connection {idx}",
                    f.kind()
                )))
            }
        }
    }
}

/// (zero pages, data pages) of decoded `ranges`.
pub(crate) fn count_pages(ranges: &[ResolvedRange]) -> (u64, u64) {
    ranges.iter().fold((0, 0), |(z, n), r| {
        if r.zero {
            (z + r.npages, n)
        } else {
            (z, n + r.npages)
        }
    })
}
