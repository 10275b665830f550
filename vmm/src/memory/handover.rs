//! Guest RAM across a memory handover (`unix:` migration on the same
//! host): the source lends its backing file, the destination maps it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::info;
use migration::RegionFd;

use super::{GuestRam, MemoryError};
use crate::config::MemoryBacking;

/// `(st_dev, st_ino)` of an open file.
fn identity(fd: &impl AsRawFd) -> Result<(u64, u64), MemoryError> {
    // SAFETY: fstat on an open descriptor into a zeroed stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(MemoryError::Handover(format!(
                "fstat: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok((st.st_dev, st.st_ino))
    }
}

impl GuestRam {
    /// Whether this memory was handed over to or from another process.
    pub fn is_lent(&self) -> bool {
        self.lent.load(Ordering::SeqCst)
    }

    /// The backing file of every region, duplicated, for a handover; `Err`
    /// names why this RAM cannot be handed over (anonymous memory). Marks
    /// the RAM as lent: this process never clears it again.
    pub fn lend(&self) -> Result<Vec<RegionFd>, String> {
        let fd = self.fd.as_ref().ok_or_else(|| {
            format!(
                "guest RAM is {} (only shared=on or file= memory can be handed over)",
                self.backing.kind()
            )
        })?;
        let mut out = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let offset = r
                .file_offset
                .ok_or("a region has no offset in the memory file")?;
            let dup = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("duplicating the memory file descriptor: {e}"))?;
            out.push(RegionFd {
                gpa: r.gpa,
                size: r.size,
                offset,
                fd: dup,
            });
        }
        self.lent.store(true, Ordering::SeqCst);
        Ok(out)
    }

    /// Maps handed-over memory as the RAM of a `size`-byte guest: every
    /// region must come from one file, at the offsets this VMM's own layout
    /// gives it (consecutive from 0), so that the guest sees the same
    /// bytes at the same addresses. The memory is live: it is neither
    /// cleared nor prefaulted, and never cleared later (`lent`).
    pub fn from_handover(size: u64, regions: Vec<RegionFd>) -> Result<GuestRam, MemoryError> {
        let layout = arch::layout::ram_regions(size);
        if layout.len() != regions.len() {
            return Err(MemoryError::Handover(format!(
                "{} regions handed over, this guest has {}",
                regions.len(),
                layout.len()
            )));
        }
        let first = identity(&regions[0].fd)?;
        let mut offset = 0u64;
        for (r, (gpa, len)) in regions.iter().zip(&layout) {
            if (r.gpa, r.size, r.offset) != (gpa.0, *len as u64, offset) {
                return Err(MemoryError::Handover(format!(
                    "region {:#x}+{:#x} at offset {:#x}; this layout has {:#x}+{:#x} at {offset:#x}",
                    r.gpa, r.size, r.offset, gpa.0, len
                )));
            }
            if identity(&r.fd)? != first {
                return Err(MemoryError::Handover(
                    "the regions come from different files".into(),
                ));
            }
            offset += *len as u64;
        }
        let fd = regions
            .into_iter()
            .next()
            .map(|r| Arc::new(File::from(r.fd)))
            .ok_or_else(|| MemoryError::Handover("no region".into()))?;
        let ram = GuestRam::map(size, MemoryBacking::Shared, Some(fd), false)?;
        ram.lent.store(true, Ordering::SeqCst);
        info!(
            "guest RAM: {} MiB handed over by the source, mapped shared",
            size >> 20
        );
        Ok(ram)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MemoryConfig;

    fn ram(size: u64, backing: MemoryBacking) -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size,
            backing,
            prefault: false,
        })
        .unwrap()
    }

    #[test]
    fn shared_memory_is_lent_and_mapped_with_the_same_bytes() {
        let src = ram(64 << 20, MemoryBacking::Shared);
        let r0 = src.regions()[0];
        // SAFETY: a live writable mapping of this test's guest RAM.
        unsafe { std::ptr::write_bytes((r0.host_addr + 4096) as *mut u8, 0x5a, 4096) };
        let lent = src.lend().unwrap();
        let dst = GuestRam::from_handover(64 << 20, lent).unwrap();
        let d0 = dst.regions()[0];
        assert_ne!(d0.host_addr, r0.host_addr);
        // SAFETY: a live readable mapping of the destination's RAM.
        let b = unsafe { *((d0.host_addr + 4096) as *const u8) };
        assert_eq!(b, 0x5a);
        // Neither side clears lent memory.
        assert!(matches!(src.claim_zeroed(), Err(MemoryError::Lent)));
        dst.zero();
        // SAFETY: as above.
        let b = unsafe { *((r0.host_addr + 4096) as *const u8) };
        assert_eq!(b, 0x5a);
    }

    #[test]
    fn anonymous_memory_cannot_be_lent() {
        let e = ram(16 << 20, MemoryBacking::Anonymous).lend().unwrap_err();
        assert!(e.contains("anonymous"), "{e}");
    }

    #[test]
    fn a_different_layout_is_refused() {
        let src = ram(64 << 20, MemoryBacking::Shared);
        let lent = src.lend().unwrap();
        let e = GuestRam::from_handover(32 << 20, lent).unwrap_err();
        assert!(e.to_string().contains("this layout has"), "{e}");
    }
}
