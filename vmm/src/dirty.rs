//! Dirty page tracking: KVM's dirty log (with KVM_CLEAR_DIRTY_LOG when the
//! host offers manual protection) OR'd with the VMM's own writes.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VmFd};
use log::{debug, info};
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

/// Enables KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (MANUAL_PROTECT_ENABLE only,
/// so the first fetch is not all ones) if the host offers it.
pub fn enable_manual_protect(_kvm: &Kvm, vm: &VmFd) -> bool {
    let v = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) as _);
    if v <= 0 || (v as u64) & u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE) == 0 {
        debug!("manual dirty-log protection unavailable");
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    match vm.enable_cap(&cap) {
        Ok(()) => true,
        Err(e) => {
            debug!("enabling manual dirty-log protection failed: {e}");
            false
        }
    }
}

/// Bitmap words (64 pages each) per KVM_CLEAR_DIRTY_LOG call.
pub const CLEAR_CHUNK_WORDS: usize = 32;

/// Number of u64 words of a bitmap of `pages` pages.
pub fn bitmap_words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

/// Clears bits at and past `pages` and fixes the length to
/// [`bitmap_words`]`(pages)`.
pub fn normalize_bitmap(mut words: Vec<u64>, pages: u64) -> Vec<u64> {
    words.resize(bitmap_words(pages), 0);
    let tail = pages % 64;
    if tail != 0 {
        if let Some(last) = words.last_mut() {
            *last &= (1u64 << tail) - 1;
        }
    }
    words
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

/// The part of KVM's log each region returned at its last fetch (clearing
/// only re-protects pages that were reported), and the buffer KVM copies
/// each region's log into.
///
/// Invariant: while dirty logging is on, `last[i]` and `kernel[i]` have
/// [`bitmap_words`] of region `i`'s pages words, every page of them
/// written once when logging started: a fetch then neither allocates nor
/// faults in memory that grows with the guest (0.5 ms for 13 GiB on this
/// host, with the guest paused at the final fetch).
#[derive(Debug, Default)]
pub struct DirtyTracker {
    last: Mutex<Vec<Vec<u64>>>,
    kernel: Mutex<Vec<Vec<u64>>>,
}

/// A zeroed bitmap of `words` words, its memory written (faulted in):
/// unlike `vec![0; n]`, which may leave the kernel's zero page mapped until
/// the first fetch writes it.
fn touched(words: usize) -> Vec<u64> {
    let mut v = Vec::with_capacity(words);
    v.resize(words, 0u64);
    v
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
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.ram.reset_vmm_dirty();
        let words = |s: &crate::vm::Slot| bitmap_words(s.size / crate::memory::PAGE);
        {
            let mut last = self.dirty.last.lock().unwrap_or_else(|p| p.into_inner());
            *last = self.slots.iter().map(|s| touched(words(s))).collect();
        }
        {
            let mut k = self.dirty.kernel.lock().unwrap_or_else(|p| p.into_inner());
            *k = self.slots.iter().map(|s| touched(words(s))).collect();
        }
        self.set_slot_flags(KVM_MEM_LOG_DIRTY_PAGES)?;
        self.dirty_logging.store(true, Ordering::SeqCst);
        info!(
            "dirty logging started on {} slot(s){}",
            self.slots.len(),
            if self.caps().manual_protect {
                " (manual protection)"
            } else {
                ""
            }
        );
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
        let mut arg = kvm_dirty_log {
            slot: slot.slot,
            ..Default::default()
        };
        arg.__bindgen_anon_1.dirty_bitmap = buf.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: `buf` holds `bitmap_words(pages)` words, exactly the
        // bytes KVM writes for a slot of `pages` pages (rounded up to 64
        // bits), and outlives the call; the slot is one of this VM's.
        let r = unsafe { ioctl_with_ref(&self.fd, KVM_GET_DIRTY_LOG(), &arg) };
        if r < 0 {
            return Err(VmError::Kvm {
                what: format!("KVM_GET_DIRTY_LOG slot {}", slot.slot),
                source: kvm_ioctls::Error::last(),
            });
        }
        if self.caps().manual_protect {
            let mut last = self.dirty.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = last.get_mut(idx).filter(|l| l.len() == words) {
                l.copy_from_slice(buf);
            }
        }
        if into.len() != words {
            into.resize(words, 0);
        }
        or_into(into, buf, pages);
        drop(kernel);
        let own = self.ram.take_vmm_dirty(idx);
        or_into(into, &own, pages);
        Ok(())
    }

    /// Re-protects the pages of `[first_page, first_page+npages)` of region
    /// `idx` that the last fetch reported (KVM_CLEAR_DIRTY_LOG).
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
        let mask: Vec<u64> = {
            let last = self.dirty.last.lock().unwrap_or_else(|p| p.into_inner());
            let Some(l) = last.get(idx) else {
                return Ok(());
            };
            let w0 = (first_page / 64) as usize;
            let w1 = bitmap_words(first_page + npages);
            l.get(w0..w1.min(l.len())).unwrap_or(&[]).to_vec()
        };
        // KVM holds the MMU lock for a whole call: clear in bounded chunks
        // so that faulting vCPUs are not stalled behind a long range.
        let end = first_page + npages;
        for (i, words) in mask.chunks(CLEAR_CHUNK_WORDS).enumerate() {
            if words.iter().all(|w| *w == 0) {
                continue;
            }
            let start = first_page + (i * CLEAR_CHUNK_WORDS * 64) as u64;
            let n = (words.len() as u64 * 64).min(end - start);
            let mut arg = kvm_clear_dirty_log {
                slot: slot.slot,
                num_pages: n as u32,
                first_page: start,
                ..Default::default()
            };
            arg.__bindgen_anon_1.dirty_bitmap = words.as_ptr() as *mut libc::c_void;
            // SAFETY: `words` holds at least num_pages bits and outlives the
            // call; the chunk lies inside the validated range (64-page
            // aligned start, length a multiple of 64 or reaching the end).
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
        assert_eq!(normalize_bitmap(vec![!0, !0], 70), vec![!0, 0x3f]);
        assert_eq!(normalize_bitmap(vec![], 128), vec![0, 0]);
        assert_eq!(normalize_bitmap(vec![1, 2, 3], 64), vec![1]);
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
