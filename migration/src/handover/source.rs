//! The source VM of a `unix:` migration: once the destination accepted the
//! memory handover ([`HandoverSource::engage`]) it has no RAM to send and
//! no dirty log to keep (the destination maps the same memory), so every
//! pass is empty and the switch-over moves only vCPU and device state.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;

use crate::traits::{
    BackendResult, DirtyBitmap, MemoryHandover, MigratableDevice, RamRegion, SourceVm,
};

/// [`SourceVm`] wrapper of a `unix:` send.
///
/// Invariant: while not engaged it is exactly `inner`; once engaged (never
/// undone) `populated` and `fetch_dirty` are empty and the dirty log is not
/// started. The sender switches dirty logging on while SETUP (and so the
/// engagement) may still be under way: `logging` records whether `inner`'s
/// log was started, so that the stop always matches the start.
pub struct HandoverSource {
    inner: Arc<dyn SourceVm>,
    engaged: AtomicBool,
    logging: AtomicBool,
}

impl HandoverSource {
    /// Wraps `inner` (not engaged).
    pub fn new(inner: Arc<dyn SourceVm>) -> Arc<HandoverSource> {
        Arc::new(HandoverSource {
            inner,
            engaged: AtomicBool::new(false),
            logging: AtomicBool::new(false),
        })
    }

    /// From now on no RAM is sent: the destination maps the memory.
    pub fn engage(&self) {
        self.engaged.store(true, SeqCst);
    }

    /// Whether the memory was handed over.
    pub fn engaged(&self) -> bool {
        self.engaged.load(SeqCst)
    }
}

impl SourceVm for HandoverSource {
    fn config(&self) -> BackendResult<Vec<u8>> {
        self.inner.config()
    }

    fn ram(&self) -> Vec<RamRegion> {
        self.inner.ram()
    }

    fn populated(&self, region: usize) -> BackendResult<Vec<Range<u64>>> {
        if self.engaged() {
            return Ok(Vec::new());
        }
        self.inner.populated(region)
    }

    fn start_dirty_log(&self) -> BackendResult<()> {
        if self.engaged() {
            return Ok(());
        }
        self.inner.start_dirty_log()?;
        self.logging.store(true, SeqCst);
        Ok(())
    }

    fn stop_dirty_log(&self) -> BackendResult<()> {
        if !self.logging.swap(false, SeqCst) {
            return Ok(());
        }
        self.inner.stop_dirty_log()
    }

    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap> {
        if self.engaged() {
            return Ok(DirtyBitmap { words: Vec::new() });
        }
        self.inner.fetch_dirty(region)
    }

    fn fetch_dirty_into(&self, region: usize, into: &mut DirtyBitmap) -> BackendResult<()> {
        if self.engaged() {
            return Ok(());
        }
        self.inner.fetch_dirty_into(region, into)
    }

    fn manual_protect(&self) -> bool {
        !self.engaged() && self.inner.manual_protect()
    }

    fn clear_dirty(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        if self.engaged() {
            return Ok(());
        }
        self.inner.clear_dirty(region, first_page, npages)
    }

    fn pause(&self) -> BackendResult<()> {
        self.inner.pause()
    }

    fn resume(&self) -> BackendResult<()> {
        self.inner.resume()
    }

    fn user_paused(&self) -> bool {
        self.inner.user_paused()
    }

    fn save_state(&self) -> BackendResult<Vec<u8>> {
        self.inner.save_state()
    }

    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.inner.devices()
    }

    fn vcpus(&self) -> Option<u32> {
        self.inner.vcpus()
    }

    fn set_throttle(&self, percent: u32) -> BackendResult<()> {
        self.inner.set_throttle(percent)
    }

    fn memory_handover(&self) -> Option<&dyn MemoryHandover> {
        self.inner.memory_handover()
    }
}
