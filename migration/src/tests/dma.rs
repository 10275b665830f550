//! Pages written by device DMA: merged from the devices' DMA logs in every
//! pass and in the final pass after the devices stopped; an untracked
//! device is refused unless allowed (then every populated page is re-sent);
//! post-copy is refused with a DMA device. A device whose log reports
//! nothing proves the memory comparison can fail.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use super::*;
use crate::live::Technique;

const MIB: u64 = 1 << 20;
/// The device's buffer: pages 64..128 of region 0.
const BUF_FIRST: u64 = 64;
const BUF_PAGES: u64 = 64;

/// How the fake device treats its DMA log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// Logs every write.
    On,
    /// Advertises logging but never records (a broken device).
    Broken,
    /// Cannot log.
    None,
}

type Log = (Vec<Range<u64>>, Vec<u64>);

/// A device engine writing one page of its buffer (a sequence number) per
/// step straight into region 0, behind the back of the KVM dirty log.
pub struct DmaSim {
    mem: usize,
    mode: LogMode,
    seq: AtomicU64,
    /// The ranges logging started with, and the bits of written pages.
    log: Mutex<Option<Log>>,
}

impl DmaSim {
    pub fn new(src: &FakeSource, mode: LogMode) -> Arc<DmaSim> {
        Arc::new(DmaSim {
            mem: src.regions[0].1.addr(),
            mode,
            seq: AtomicU64::new(0),
            log: Mutex::new(None),
        })
    }

    pub fn kind(&self) -> DmaLog {
        match self.mode {
            LogMode::None => DmaLog::Unsupported,
            _ => DmaLog::Supported,
        }
    }

    /// Writes the next page of the buffer, round robin.
    pub fn write_next(&self) {
        let s = self.seq.fetch_add(1, SeqCst) + 1;
        self.write_page(BUF_FIRST + (s - 1) % BUF_PAGES, s);
    }

    /// The write a stopping device completes: the page after the buffer,
    /// which nothing else writes (lost unless the final fetch of the dirty
    /// log comes after the stop).
    pub fn write_last(&self) {
        let s = self.seq.load(SeqCst) | 1 << 63;
        self.write_page(BUF_FIRST + BUF_PAGES, s);
    }

    fn write_page(&self, page: u64, s: u64) {
        let bytes = [s.to_le_bytes(); 512].concat();
        // SAFETY: the page lies inside region 0 (4 MiB or more), which the
        // source keeps mapped for the test's life.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.mem + (page * 4096) as usize) as *mut u8,
                4096,
            )
        };
        if self.mode == LogMode::On {
            if let Some((_, bits)) = &mut *self.log.lock().unwrap() {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }

    pub fn start(&self, ranges: &[Range<u64>], page_size: u64) -> BackendResult<()> {
        if self.mode == LogMode::None {
            return Err(BackendError::new("cannot log"));
        }
        assert_eq!(page_size, 4096);
        assert!(ranges.iter().any(|r| r.start == 0), "{ranges:?}");
        *self.log.lock().unwrap() = Some((ranges.to_vec(), vec![0; 1024]));
        Ok(())
    }

    pub fn report(&self, iova: u64, len: u64, ps: u64, bm: &mut [u64]) -> BackendResult<()> {
        let mut g = self.log.lock().unwrap();
        let (_, bits) = g.as_mut().ok_or_else(|| BackendError::new("not logging"))?;
        assert!(bm.len() as u64 * 64 * ps >= len);
        if iova == 0 {
            for (b, l) in bm.iter_mut().zip(bits.iter_mut()) {
                *b |= *l;
                *l = 0;
            }
        }
        Ok(())
    }

    pub fn stop(&self) {
        *self.log.lock().unwrap() = None;
    }
}

/// A 8 MiB + 4 MiB source with `dev0` doing DMA in `mode`; every fetch of
/// the dirty log lets the device write a few pages. Its buffer is populated
/// (zeroed) before the migration, as a driver would leave it.
fn dma_source(mode: LogMode) -> (Arc<FakeSource>, Arc<DmaSim>) {
    let mut s = FakeSource::new(&[(0, 8 * MIB), (4 << 30, 4 * MIB)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        "dev0",
        true,
        pattern(1, 10_000),
        pattern(2, 5_000),
    ))];
    fill(&s, 0, 3, 3);
    fill(&s, 1, 4, 2);
    for p in BUF_FIRST..=BUF_FIRST + BUF_PAGES {
        s.write(0, p * 4096, &[0u8; 4096]);
    }
    let dma = DmaSim::new(&s, mode);
    *s.devices[0].dma.lock().unwrap() = Some(dma.clone());
    let s = Arc::new(s);
    let d = dma.clone();
    s.set_hook(move |src, n| {
        // Guest writes keep the migration iterating for a few passes.
        if n < 4 {
            src.write(0, 4096 * (200 + n), &pattern(n as u8, 4096));
        }
        for _ in 0..40 {
            d.write_next();
        }
    });
    (s, dma)
}

/// A send the source refuses before it connects anywhere.
fn refused(mode: LogMode, p: &mut SendParams) -> (MigrationError, Arc<FakeSource>) {
    let (src, _) = dma_source(mode);
    // Never dialled: the refusal comes first.
    p.destination_url = "tcp:127.0.0.1:9".into();
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), p, &stats, &CancelToken::default()).unwrap_err();
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
    (e, src)
}

fn run(mode: LogMode, p: &mut SendParams) -> (Result<(), MigrationError>, Arc<FakeSource>) {
    let (src, dma) = dma_source(mode);
    let f = factory_for(&src);
    let (r, rr, dest, stats) = migrate_with(src.clone(), f, p);
    if r.is_ok() {
        rr.unwrap();
        assert!(
            dma.seq.load(SeqCst) > BUF_PAGES,
            "the device wrapped its buffer"
        );
        let s = stats.snapshot();
        if mode == LogMode::On {
            assert!(s.dma_dirty_pages > 0, "{s:?}");
        }
        let d = dest.factory.last();
        let same = src.mem(0) == d.regions[0].1.read(0, (8 * MIB) as usize);
        assert_eq!(
            same,
            mode != LogMode::Broken,
            "destination RAM {} the source's (mode {mode:?})",
            if same { "equals" } else { "differs from" }
        );
    }
    (r, src)
}

#[test]
fn dma_writes_reach_the_destination_over_1_and_4_connections() {
    for n in [1, 4] {
        let mut p = params(0, n);
        run(LogMode::On, &mut p).0.unwrap();
    }
}

#[test]
fn dma_writes_in_main_mode_and_the_last_write_before_the_stop() {
    let mut p = params(0, 2);
    p.device_state = DeviceStateMode::Main;
    run(LogMode::On, &mut p).0.unwrap();
}

#[test]
fn a_device_whose_log_reports_nothing_loses_pages() {
    // The witness of the comparison above: without the log the destination
    // holds stale pages of the device's buffer.
    let mut p = params(0, 2);
    run(LogMode::Broken, &mut p).0.unwrap();
}

#[test]
fn an_untracked_device_is_refused_unless_allowed() {
    let mut p = params(0, 2);
    let (e, src) = refused(LogMode::None, &mut p);
    assert!(matches!(e, MigrationError::InvalidParams(_)), "{e}");
    assert!(e.to_string().contains("allow_untracked_dma"), "{e}");
    assert!(e.to_string().contains("dev0"), "{e}");
    assert_source_running(&src);
    assert_eq!(src.pauses.load(SeqCst), 0);

    let mut p = params(0, 2);
    p.allow_untracked_dma = true;
    run(LogMode::None, &mut p).0.unwrap();
}

#[test]
fn post_copy_is_refused_with_a_dma_device() {
    let mut p = params(0, 2);
    p.technique = Some(Technique::PostCopy);
    let (e, src) = refused(LogMode::On, &mut p);
    assert!(e.to_string().contains("post-copy"), "{e}");
    assert_source_running(&src);
}
