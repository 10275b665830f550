//! Dirty page tracking: KVM's dirty log (with KVM_CLEAR_DIRTY_LOG when the
//! host offers manual protection) OR'd with the VMM's own writes.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use log::{debug, info};
use migration::bitmap::{ranges_words, word_masks, written_zeros};
use vmm_sys_util::ioctl::ioctl_with_ref;

use crate::vm::{kvm_err, Vm, VmError};

mod ioctls {
    #![allow(missing_docs)]
    use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log};
    use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};
    const KVMIO: u32 = 0xAE;
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::{KVM_CLEAR_DIRTY_LOG, KVM_GET_DIRTY_LOG};

/// How manual dirty-log protection was enabled on a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ManualProtect {
    /// KVM_CLEAR_DIRTY_LOG is in use.
    pub enabled: bool,
    /// With KVM_DIRTY_LOG_INITIALLY_SET: switching logging on write-protects
    /// nothing (the kernel's walk over every page of every slot, 2 ms for
    /// 16 GiB here, is skipped); each page is tracked from its first clear
    /// on ([`DirtyTracker`] says how the pages never cleared are found).
    pub initially_set: bool,
}

/// Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 if the host offers it, with
/// KVM_DIRTY_LOG_INITIALLY_SET where offered too.
pub fn enable_manual_protect(_kvm: &Kvm, vm: &VmFd) -> ManualProtect {
    let v = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
    if v <= 0 || (v as u64) & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        debug!("manual dirty-log protection unavailable");
        return ManualProtect::default();
    }
    let init = (v as u64) & u64::from(KVM_DIRTY_LOG_INITIALLY_SET) != 0;
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    for initially_set in [init, false] {
        cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
            | if initially_set {
                u64::from(KVM_DIRTY_LOG_INITIALLY_SET)
            } else {
                0
            };
        match vm.enable_cap(&cap) {
            Ok(()) => {
                return ManualProtect {
                    enabled: true,
                    initially_set,
                }
            }
            Err(e) => debug!(
                "enabling manual dirty-log protection ({:#x}) failed: {e}",
                cap.args[0]
            ),
        }
        if !init {
            break;
        }
    }
    ManualProtect::default()
}

/// Bitmap words (64 pages each) per KVM_CLEAR_DIRTY_LOG call.
pub const CLEAR_CHUNK_WORDS: usize = 32;

/// Number of u64 words of a bitmap of `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Validates a clear range: 64-page aligned start, length a multiple of 64
/// or reaching the region's end, inside the region.
pub fn check_clear_range(first_page: u64, npages: u64, region_pages: u64) -> Result<(), String> {
    let end = first_page
        .checked_add(npages)
        .ok_or_else(|| "page range overflows".to_string())?;
    if end > region_pages {
        return Err(format!(
            "pages {first_page}..{end} exceed the region's {region_pages} pages"
        ));
    }
    if !first_page.is_multiple_of(64) {
        return Err(format!("first page {first_page} is not a multiple of 64"));
    }
    if !npages.is_multiple_of(64) && end != region_pages {
        return Err(format!(
            "{npages} pages is not a multiple of 64 and does not reach the region's end"
        ));
    }
    Ok(())
}

/// The dirty-log state of one VM: the buffer KVM copies each region's log
/// into, which keeps what the region reported at its last fetch (clearing
/// only re-protects pages that were reported), and, with
/// KVM_DIRTY_LOG_INITIALLY_SET, the pages already tracked.
///
/// Invariant: while dirty logging is on, `kernel[i]` has [`bitmap_words`]
/// of region `i`'s pages words, every page of them written once when
/// logging started: a fetch then neither allocates nor faults in memory
/// that grows with the guest (0.5 ms for 13 GiB on this host, with the
/// guest paused at the final fetch). Between fetches it holds the last
/// report of region `i` (after [`Vm::fetch_dirty_into`]'s masking).
///
/// With `initially_set`, `armed[i]` has a bit for each page of
/// region `i` that was cleared at least once since logging started: KVM
/// tracks exactly those pages. Every other page still reads as dirty in
/// KVM's log and is not write-protected; a fetch reports it only if it is
/// populated at the time of the fetch, so that a page the guest touched
/// anywhere is reported (and tracked from its clear on), and the untouched
/// rest of a large guest costs one page-table scan per fetch instead of
/// the kernel's walk at start. Pages populated when logging starts are
/// armed at once, so that pass 1 does not see them again.
#[derive(Debug, Default)]
pub struct DirtyTracker {
    kernel: Mutex<Vec<Vec<u64>>>,
    armed: Mutex<Vec<ArmedMap>>,
    initially_set: bool,
}

/// Words of [`ArmedMap`] per chunk: one 4 KiB page of the bitmap.
const ARMED_CHUNK_WORDS: usize = 512;

/// A bitmap of the pages armed (cleared at least once) in one region,
/// written only where a bit was set: its memory is faulted in as pages
/// are armed, not for the guest's whole size.
///
/// Invariant: a chunk of `words` whose `touched` flag is false reads as
/// zero and was never written (its memory may still be unmapped).
#[derive(Debug, Default)]
struct ArmedMap {
    words: Vec<u64>,
    touched: Vec<bool>,
}

impl ArmedMap {
    /// No page armed, for a region of `words` bitmap words (allocated
    /// zeroed: nothing is written).
    fn new(words: usize) -> ArmedMap {
        ArmedMap {
            words: vec![0; words],
            touched: vec![false; words.div_ceil(ARMED_CHUNK_WORDS)],
        }
    }

    /// ORs `mask` in at word `w0` (words past the map are ignored).
    fn arm(&mut self, w0: usize, mask: &[u64]) {
        for (i, m) in mask.iter().enumerate() {
            if *m == 0 {
                continue;
            }
            if let Some(x) = self.words.get_mut(w0 + i) {
                *x |= *m;
                self.touched[(w0 + i) / ARMED_CHUNK_WORDS] = true;
            }
        }
    }

    /// Whether any page is armed.
    fn any(&self) -> bool {
        self.touched.iter().any(|t| *t)
    }

    /// Word `w` (0 past the map or in an untouched chunk).
    fn word(&self, w: usize) -> u64 {
        if self.touched.get(w / ARMED_CHUNK_WORDS) == Some(&true) {
            self.words.get(w).copied().unwrap_or(0)
        } else {
            0
        }
    }

    /// `buf &= self`, word by word; untouched chunks zero `buf` without
    /// being read.
    fn mask(&self, buf: &mut [u64]) {
        for (c, chunk) in buf.chunks_mut(ARMED_CHUNK_WORDS).enumerate() {
            if self.touched.get(c) == Some(&true) {
                let a = &self.words[c * ARMED_CHUNK_WORDS..];
                for (k, m) in chunk.iter_mut().zip(a) {
                    *k &= *m;
                }
            } else {
                chunk.fill(0);
            }
        }
    }
}

impl DirtyTracker {
    /// The tracker of a VM whose manual protection is `mp`.
    pub fn new(mp: ManualProtect) -> DirtyTracker {
        DirtyTracker {
            initially_set: mp.enabled && mp.initially_set,
            ..Default::default()
        }
    }
}

/// ORs `src` into `dst` (same length), clearing bits at and past `pages`.
fn or_into(dst: &mut [u64], src: &[u64], pages: u64) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
    let tail = pages % 64;
    if tail != 0 {
        if let Some(last) = dst.get_mut(bitmap_words(pages) - 1) {
            *last &= (1u64 << tail) - 1;
        }
    }
}

impl Vm {
    fn set_slot_flags(&self, flags: u32) -> Result<(), VmError> {
        for s in &self.slots {
            // SAFETY: the same live mapping as at creation, only flags change.
            unsafe { self.fd.set_user_memory_region(s.region(flags)) }.map_err(kvm_err(
                format!(
                    "KVM_SET_USER_MEMORY_REGION slot {} (flags {flags:#x})",
                    s.slot
                ),
            ))?;
        }
        Ok(())
    }

    /// Starts dirty logging on every memslot and forgets earlier VMM writes.
    /// With KVM_DIRTY_LOG_INITIALLY_SET, the pages populated now are then
    /// armed (cleared): pass 1 reads them after this returns.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.ram.reset_vmm_dirty();
        let words = |s: &crate::vm::Slot| bitmap_words(s.size / crate::memory::PAGE);
        *self.dirty.kernel.lock().unwrap_or_else(|p| p.into_inner()) =
            self.slots.iter().map(|s| written_zeros(words(s))).collect();
        let init = self.dirty.initially_set;
        if init {
            *self.dirty.armed.lock().unwrap_or_else(|p| p.into_inner()) =
                self.slots.iter().map(|s| ArmedMap::new(words(s))).collect();
        }
        self.set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        if init {
            if let Err(e) = self.arm_populated() {
                let _ = self.set_slot_flags(self.slot_flags());
                return Err(e);
            }
        }
        self.dirty_logging.store(true, Ordering::SeqCst);
        info!(
            "dirty logging started on {} slot(s){}",
            self.slots.len(),
            match (self.caps().manual_protect, init) {
                (true, true) => " (manual protection, initially set)",
                (true, false) => " (manual protection)",
                _ => "",
            }
        );
        Ok(())
    }

    /// Clears (arms) every page populated now, region by region, and
    /// records them as armed.
    fn arm_populated(&self) -> Result<(), VmError> {
        for (i, s) in self.slots.iter().enumerate() {
            let pages = s.size / crate::memory::PAGE;
            // Where populated memory cannot be told, every page is armed
            // (as without KVM_DIRTY_LOG_INITIALLY_SET, at the same cost).
            let ranges = self
                .ram
                .populated_exact(i)?
                .unwrap_or_else(|| std::iter::once(0..s.size).collect());
            let mask = ranges_words(&ranges, pages, crate::memory::PAGE);
            self.clear_masked(s, 0, &mask)?;
            let mut armed = self.dirty.armed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = armed.get_mut(i) {
                a.arm(0, &mask);
            }
        }
        Ok(())
    }

    /// Stops dirty logging.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.dirty_logging.store(false, Ordering::SeqCst);
        self.set_slot_flags(self.slot_flags())?;
        info!("dirty logging stopped");
        Ok(())
    }

    /// Pages of region `idx` dirtied since the previous fetch (or, with
    /// manual protection, since their last clear), OR'd with VMM writes.
    pub fn fetch_dirty(&self, idx: usize) -> Result<Vec<u64>, VmError> {
        let mut out = Vec::new();
        self.fetch_dirty_into(idx, &mut out)?;
        Ok(out)
    }

    /// ORs what [`Vm::fetch_dirty`] returns into `into`, which is sized to
    /// the region first (a no-op when it already is): without allocating,
    /// into the buffers made when logging started.
    pub fn fetch_dirty_into(&self, idx: usize, into: &mut Vec<u64>) -> Result<(), VmError> {
        let slot = self
            .slots
            .get(idx)
            .ok_or_else(|| VmError::State(format!("no RAM region {idx}")))?;
        if !self.dirty_logging.load(Ordering::SeqCst) {
            return Err(VmError::State("dirty logging is not active".into()));
        }
        let pages = slot.size / crate::memory::PAGE;
        let words = bitmap_words(pages);
        let mut kernel = self.dirty.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let buf = kernel
            .get_mut(idx)
            .filter(|b| b.len() == words)
            .ok_or_else(|| VmError::State(format!("no dirty-log buffer for region {idx}")))?;
        // Held from the GET to the report: the armed pages are those whose
        // bits in KVM's log mean something.
        let armed_guard = self
            .dirty
            .initially_set
            .then(|| self.dirty.armed.lock().unwrap_or_else(|p| p.into_inner()));
        let armed =
            match &armed_guard {
                Some(a) => Some(a.get(idx).filter(|a| a.words.len() == words).ok_or_else(
                    || VmError::State(format!("no armed-page map for region {idx}")),
                )?),
                None => None,
            };
        if let Err(e) = self.get_and_report(slot, idx, armed, buf) {
            // Raw or partial, it must not be what clear_dirty masks with:
            // a clear could arm pages never reported. Zero clears nothing.
            buf.fill(0);
            return Err(e);
        }
        drop(armed_guard);
        // `buf` stays as it is until the next fetch: clear_dirty masks
        // with it.
        if into.len() != words {
            into.resize(words, 0);
        }
        or_into(into, buf, pages);
        drop(kernel);
        let own = self.ram.take_vmm_dirty(idx);
        or_into(into, &own, pages);
        Ok(())
    }

    /// KVM_GET_DIRTY_LOG of `slot` (region `idx`) into `buf`, then, with
    /// KVM_DIRTY_LOG_INITIALLY_SET (`armed`), [`Vm::report_unarmed`].
    fn get_and_report(
        &self,
        slot: &crate::vm::Slot,
        idx: usize,
        armed: Option<&ArmedMap>,
        buf: &mut [u64],
    ) -> Result<(), VmError> {
        // With nothing armed in this slot, every bit KVM would copy reads
        // dirty only because logging started with them set, and the report
        // below zeroes them all: a large slot the guest never touched
        // costs no GET.
        if armed.is_none_or(|a| a.any()) {
            let mut arg = kvm_dirty_log {
                slot: slot.slot,
                ..Default::default()
            };
            arg.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr() as *mut libc::c_void;
            // SAFETY: `buf` holds `bitmap_words(pages)` words of the slot's
            // pages (the caller checked), exactly the bytes KVM writes for
            // the slot (rounded up to 64 bits), and outlives the call; the
            // slot is one of this VM's.
            let r = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DIRTY_LOG(), &arg) };
            if r < 0 {
                return Err(VmError::Kvm {
                    what: format!("KVM_GET_DIRTY_LOG slot {}", slot.slot),
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        if let Some(a) = armed {
            self.report_unarmed(idx, a, buf)?;
        }
        Ok(())
    }

    /// With KVM_DIRTY_LOG_INITIALLY_SET: keeps of KVM's log `buf` of
    /// region `idx` only the armed pages (the others read as dirty until
    /// their first clear) and adds the pages not armed that are populated
    /// now: the guest (or a device) wrote them at some time, and until they
    /// are cleared KVM does not say when.
    fn report_unarmed(&self, idx: usize, a: &ArmedMap, buf: &mut [u64]) -> Result<(), VmError> {
        let ranges = self.ram.populated(idx)?;
        a.mask(buf);
        for r in &ranges {
            let end = r.end.div_ceil(crate::memory::PAGE);
            for (w, m) in word_masks(r.start / crate::memory::PAGE, end) {
                if let Some(k) = buf.get_mut(w) {
                    *k |= m & !a.word(w);
                }
            }
        }
        Ok(())
    }

    /// Re-protects the pages of `[first_page, first_page+npages)` of region
    /// `idx` that the last fetch reported (KVM_CLEAR_DIRTY_LOG); with
    /// KVM_DIRTY_LOG_INITIALLY_SET they count as armed from then on.
    pub fn clear_dirty(&self, idx: usize, first_page: u64, npages: u64) -> Result<(), VmError> {
        if !self.caps().manual_protect || npages == 0 {
            return Ok(());
        }
        let slot = self
            .slots
            .get(idx)
            .ok_or_else(|| VmError::State(format!("no RAM region {idx}")))?;
        let pages = slot.size / crate::memory::PAGE;
        check_clear_range(first_page, npages, pages).map_err(VmError::State)?;
        let w0 = (first_page / 64) as usize;
        let mask: Vec<u64> = {
            let last = self.dirty.kernel.lock().unwrap_or_else(|p| p.into_inner());
            let Some(l) = last.get(idx) else {
                return Ok(());
            };
            let w1 = bitmap_words(first_page + npages);
            l.get(w0..w1.min(l.len())).unwrap_or(&[]).to_vec()
        };
        self.clear_masked(slot, first_page, &mask)?;
        if self.dirty.initially_set {
            let mut armed = self.dirty.armed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(a) = armed.get_mut(idx) {
                a.arm(w0, &mask);
            }
        }
        Ok(())
    }

    /// KVM_CLEAR_DIRTY_LOG of the pages of `mask` (bit `i` of word `i / 64`
    /// is page `first_page + i`; `first_page` 64-page aligned, the mask
    /// inside the slot) in bounded chunks: KVM holds the MMU lock for a
    /// whole call, and faulting vCPUs must not stall behind a long range.
    fn clear_masked(
        &self,
        slot: &crate::vm::Slot,
        first_page: u64,
        mask: &[u64],
    ) -> Result<(), VmError> {
        let pages = slot.size / crate::memory::PAGE;
        for (i, words) in mask.chunks(CLEAR_CHUNK_WORDS).enumerate() {
            if words.iter().all(|w| *w == 0) {
                continue;
            }
            let start = first_page + (i * CLEAR_CHUNK_WORDS * 64) as u64;
            if start >= pages {
                break;
            }
            let n = (words.len() as u64 * 64).min(pages - start);
            let mut arg = kvm_clear_dirty_log {
                slot: slot.slot,
                num_pages: n as u32,
                first_page: start,
                ..Default::default()
            };
            arg.__bindgen_anon_1.dirty_bitmap = words.as_ptr() as *mut libc::c_void;
            // SAFETY: `words` holds at least num_pages bits and outlives the
            // call; the chunk starts 64-page aligned inside the slot and its
            // length is a multiple of 64 or reaches the slot's end.
            let r = unsafe { ioctl_with_ref(&self.fd, KVM_CLEAR_DIRTY_LOG(), &arg) };
            if r < 0 {
                return Err(VmError::Kvm {
                    what: format!("KVM_CLEAR_DIRTY_LOG slot {}", slot.slot),
                    source: kvm_ioctls::Error::last(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps() {
        assert_eq!(bitmap_words(0), 0);
        assert_eq!(bitmap_words(1), 1);
        assert_eq!(bitmap_words(64), 1);
        assert_eq!(bitmap_words(65), 2);
    }

    #[test]
    fn armed_map_reads_untouched_chunks_as_zero() {
        let n = ARMED_CHUNK_WORDS * 3 + 7;
        let mut a = ArmedMap::new(n);
        a.arm(ARMED_CHUNK_WORDS + 2, &[0, 0b1010, 0]);
        assert_eq!(a.touched, vec![false, true, false, false]);
        assert_eq!(a.word(ARMED_CHUNK_WORDS + 3), 0b1010);
        assert_eq!(a.word(ARMED_CHUNK_WORDS + 2), 0);
        assert_eq!(a.word(n + 100), 0, "past the map");
        a.arm(n - 1, &[1, 1]);
        assert_eq!(a.word(n - 1), 1, "the word past the map is ignored");
        let mut buf = vec![!0u64; n];
        a.mask(&mut buf);
        for (w, b) in buf.iter().enumerate() {
            let want = match w {
                w if w == ARMED_CHUNK_WORDS + 3 => 0b1010,
                w if w == n - 1 => 1,
                _ => 0,
            };
            assert_eq!(*b, want, "word {w}");
        }
    }

    #[test]
    fn clear_ranges() {
        assert!(check_clear_range(0, 64, 1000).is_ok());
        assert!(check_clear_range(64, 128, 1000).is_ok());
        assert!(check_clear_range(960, 40, 1000).is_ok(), "reaches the end");
        assert!(check_clear_range(1, 64, 1000).is_err());
        assert!(check_clear_range(0, 65, 1000).is_err());
        assert!(check_clear_range(960, 41, 1000).is_err());
        assert!(check_clear_range(u64::MAX - 10, 64, 1000).is_err());
    }
}
