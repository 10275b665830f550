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
use super::unzstd::{apply_data, check_negotiated, ReaderZstd};
use crate::error::MigrationError;
use crate::guest_mem::{GuestMemory, IoVecs, Scatter};
use crate::net::{read_full, read_vecs, recv_frame, recv_payload, Channel, Ctl, Notify, Recv};
use crate::stats::MigrationStats;
use crate::traits::PAGE_SIZE;
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
    /// The missing set of a coming post-copy, once POSTCOPY arrived on the
    /// main connection (one bitmap per region): pre-copy RAM still in
    /// flight for these pages is read and thrown away, not written (the
    /// pages are dropped at the switch and pulled again anyway), so that
    /// the switch does not wait for memory writes that would be undone.
    pub stale: OnceLock<Arc<Vec<Vec<u64>>>>,
    /// SETUP negotiated compression: RAM and PAGES frames may carry zstd
    /// data (refused otherwise).
    pub zstd: bool,
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
    let mut pages: Vec<u8> = Vec::new();
    let mut bufs = ReadBufs::default();
    // Made at the first compressed packet (its buffers grow to the
    // packets' size, at most 4 MiB each).
    let mut unz: Option<ReaderZstd> = None;
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
                zstd_len,
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
                if zstd_len > 0 {
                    check_negotiated(ctx, idx)?;
                    let z = match &mut unz {
                        Some(z) => z,
                        None => unz.insert(ReaderZstd::new()?),
                    };
                    let data = z.read(s, zstd_len, data_len, &ctx.ctl, &what)?;
                    pcd.accept_all(&ranges, data)?;
                } else {
                    // Bounded by the header check (≤ MAX_PACKET_PAGES pages).
                    pages.resize(data_len as usize, 0);
                    read_full(s, &mut pages, &ctx.ctl, &what)?;
                    pcd.accept_all(&ranges, &pages)?;
                }
                count_packet(ctx, data_len, zstd_len);
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
                zstd_len,
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
                let zero = if zstd_len > 0 {
                    check_negotiated(ctx, idx)?;
                    let z = match &mut unz {
                        Some(z) => z,
                        None => unz.insert(ReaderZstd::new()?),
                    };
                    // Decompressed into the reader's buffer, then copied.
                    let data = z.read(s, zstd_len, data_len, &ctx.ctl, &what)?;
                    bufs.discarded +=
                        apply_data(ctx, &mut bufs.storage, &ranges, data, &|r, p| {
                            stale(ctx, r, p)
                        })?;
                    apply_zero_ranges(ctx, &ranges)?
                } else {
                    read_ram_data(s, ctx, &ranges, &mut bufs, &what)?
                };
                count_packet(ctx, data_len, zstd_len);
                let (_, normal) = count_pages(&ranges);
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
                if ctx.stale.get().is_some() {
                    log::debug!(
                        "data connection {idx}: SYNC({pass}) in; {} bytes of stale pre-copy \
                         RAM thrown away",
                        bufs.discarded
                    );
                }
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
                // Budget first (waiting while it is spent), then the payload,
                // straight into the buffer the load thread writes to the
                // device.
                let mut t = inbox.admit(dev as usize, seq, item, len, false)?;
                read_full(s, t.payload_mut(), &ctx.ctl, &what)?;
                inbox.deliver(t)?;
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

/// Pre-copy page data is read in pieces of at most this many pages, so that
/// the missing set of a post-copy switch takes effect within a frame.
const READ_CHUNK_PAGES: u64 = 128;

/// A reader's reusable buffers for [`read_ram_data`].
#[derive(Default)]
struct ReadBufs {
    storage: Vec<libc::iovec>,
    /// Where stale page data goes (read, never looked at).
    sink: Vec<u8>,
    /// Bytes of stale pre-copy data thrown away so far.
    discarded: u64,
}

/// Reads the page data of a RAM frame whose validated ranges are `ranges`
/// into guest memory, marks the pages written and applies the zero ranges;
/// returns the number of zero pages. Once a post-copy missing set is known
/// (`ctx.stale`), data for its pages is read into a sink instead, and they
/// are neither marked nor cleared (they are dropped at the switch and
/// pulled again).
fn read_ram_data(
    s: &Channel,
    ctx: &ReaderCtx,
    ranges: &[ResolvedRange],
    bufs: &mut ReadBufs,
    what: &str,
) -> Result<u64, MigrationError> {
    let ram = &*ctx.ram;
    if bufs.sink.is_empty() {
        bufs.sink = vec![0; (READ_CHUNK_PAGES * PAGE_SIZE) as usize];
    }
    let stale_at = |region: usize, page: u64| stale(ctx, region, page);
    for r in ranges.iter().filter(|r| !r.zero) {
        let end = r.first_page + r.npages;
        let mut at = r.first_page;
        while at < end {
            let stop = (at + READ_CHUNK_PAGES).min(end);
            // Runs of pages alike (stale or not) within this piece. Every
            // range lies inside a region of the destination's guest RAM
            // (validated by decode_ranges); within a pass each page is sent
            // once, so no other reader writes these pages now.
            let mut spare: &mut [u8] = &mut bufs.sink;
            let mut v: IoVecs<'_, Scatter> =
                IoVecs::with_storage(std::mem::take(&mut bufs.storage));
            let mut written: Vec<(u64, u64)> = Vec::new();
            let mut p = at;
            while p < stop {
                let st = stale_at(r.region, p);
                let mut q = p + 1;
                while q < stop && stale_at(r.region, q) == st {
                    q += 1;
                }
                if st {
                    let len = ((q - p) * PAGE_SIZE) as usize;
                    let (buf, rest) = std::mem::take(&mut spare).split_at_mut(len);
                    v.push_sink(buf);
                    spare = rest;
                    bufs.discarded += len as u64;
                } else {
                    v.push_guest_mut(&ram.mem, r.region, p, q - p)?;
                    written.push((p, q - p));
                }
                p = q;
            }
            read_vecs(s, &mut v, &ctx.ctl, what)?;
            bufs.storage = v.into_storage();
            for (first, n) in written {
                ram.mark(r.region, first, n);
            }
            at = stop;
        }
    }
    apply_zero_ranges(ctx, ranges)
}

/// Whether page `page` of `region` is in a known post-copy missing set.
fn stale(ctx: &ReaderCtx, region: usize, page: u64) -> bool {
    ctx.stale
        .get()
        .is_some_and(|m| crate::bitmap::page_set(m, region, page))
}

/// The compression counters of one RAM/PAGES packet of `data_len` raw
/// data bytes, `zstd_len` of them compressed (0: as is).
fn count_packet(ctx: &ReaderCtx, data_len: u64, zstd_len: u64) {
    if ctx.zstd && data_len > 0 {
        let wire = if zstd_len > 0 { zstd_len } else { data_len };
        ctx.stats.compression.packet(data_len, wire);
    }
}

/// Applies the zero ranges of a RAM frame; returns its zero pages.
fn apply_zero_ranges(ctx: &ReaderCtx, ranges: &[ResolvedRange]) -> Result<u64, MigrationError> {
    let ram = &*ctx.ram;
    let stale_at = |region: usize, page: u64| stale(ctx, region, page);
    let mut zero = 0;
    for r in ranges.iter().filter(|r| r.zero) {
        zero += r.npages;
        // Fresh pages read as zero already (receiver contract); only pages
        // written earlier are cleared (stale ones are dropped anyway).
        for p in r.first_page..r.first_page + r.npages {
            if ram.is_written(r.region, p) && !stale_at(r.region, p) {
                ram.mem.zero_pages(r.region, p, 1)?;
            }
        }
    }
    Ok(zero)
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use super::*;
    use crate::api::CancelToken;
    use crate::tests::FakeSource;
    use crate::traits::SourceVm;

    const PAGES: u64 = 512;

    /// A reader context over a fresh 2 MiB guest, and a connected socket
    /// pair (`tx` is the source's end).
    fn setup() -> (Arc<FakeSource>, ReaderCtx, Channel, TcpStream) {
        let fake = Arc::new(FakeSource::new(&[(0, PAGES * PAGE_SIZE)]));
        let vm: Arc<dyn SourceVm> = fake.clone();
        let ctx = ReaderCtx {
            ram: Arc::new(DestRam::new(GuestMemory::of_source(&vm))),
            barrier: Arc::new(PassBarrier::new(1)),
            inbox: None,
            session: 1,
            ctl: Ctl::new(CancelToken::default(), Duration::from_secs(5)),
            stats: Arc::new(MigrationStats::default()),
            chunk_max: 0,
            notify: Arc::new(Notify::default()),
            sealed: AtomicBool::new(false),
            postcopy: OnceLock::new(),
            stale: OnceLock::new(),
            zstd: false,
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        (fake, ctx, Channel::plain(rx.into()), tx)
    }

    fn page_bytes(p: u64) -> Vec<u8> {
        vec![(p % 251 + 1) as u8; PAGE_SIZE as usize]
    }

    /// Pages 0..PAGES in one range; pages `stale` (odd ones in 100..400)
    /// belong to the missing set.
    fn stale_map() -> Vec<Vec<u64>> {
        let mut m = vec![0u64; (PAGES / 64) as usize];
        for p in (100..400).filter(|p| p % 2 == 1) {
            m[(p / 64) as usize] |= 1 << (p % 64);
        }
        vec![m]
    }

    fn check(fake: &FakeSource, ctx: &ReaderCtx, stale_from: u64) {
        let mem = fake.mem(0);
        let map = stale_map();
        for p in 0..PAGES {
            let got = &mem[(p * PAGE_SIZE) as usize..((p + 1) * PAGE_SIZE) as usize];
            let stale = p >= stale_from && crate::bitmap::page_set(&map, 0, p);
            if stale {
                assert!(got.iter().all(|&b| b == 0), "stale page {p} was written");
                assert!(!ctx.ram.is_written(0, p), "stale page {p} marked written");
            } else {
                assert_eq!(got, &page_bytes(p)[..], "page {p}");
                assert!(ctx.ram.is_written(0, p), "page {p} not marked");
            }
        }
    }

    fn one_range() -> Vec<ResolvedRange> {
        vec![ResolvedRange {
            region: 0,
            first_page: 0,
            npages: PAGES,
            zero: false,
        }]
    }

    /// With the missing set known before the frame, its pages are read and
    /// thrown away; every other page lands and is marked.
    #[test]
    fn stale_pages_are_thrown_away() {
        let (fake, ctx, rx, mut tx) = setup();
        let _ = ctx.stale.set(Arc::new(stale_map()));
        let data: Vec<u8> = (0..PAGES).flat_map(page_bytes).collect();
        let w = std::thread::spawn(move || tx.write_all(&data).unwrap());
        let mut bufs = ReadBufs::default();
        read_ram_data(&rx, &ctx, &one_range(), &mut bufs, "test").unwrap();
        w.join().unwrap();
        check(&fake, &ctx, 0);
        assert_eq!(bufs.discarded, 150 * PAGE_SIZE);
    }

    /// The missing set arriving in the middle of a frame takes effect from
    /// the next piece on: the first piece was written (and is dropped at
    /// the switch anyway), the later stale pages are not.
    #[test]
    fn a_missing_set_takes_effect_within_a_frame() {
        let (fake, ctx, rx, mut tx) = setup();
        let ctx = Arc::new(ctx);
        let data: Vec<u8> = (0..PAGES).flat_map(page_bytes).collect();
        let first = (READ_CHUNK_PAGES * PAGE_SIZE) as usize;
        let c = ctx.clone();
        let w = std::thread::spawn(move || {
            // All of the first piece but its last byte: the reader cannot
            // finish it before the missing set is known.
            tx.write_all(&data[..first - 1]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            let _ = c.stale.set(Arc::new(stale_map()));
            tx.write_all(&data[first - 1..]).unwrap();
        });
        let mut bufs = ReadBufs::default();
        read_ram_data(&rx, &ctx, &one_range(), &mut bufs, "test").unwrap();
        w.join().unwrap();
        check(&fake, &ctx, READ_CHUNK_PAGES);
        assert_eq!(bufs.discarded, 136 * PAGE_SIZE);
    }
}
