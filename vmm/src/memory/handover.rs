//! Guest RAM across a memory handover (`unix:` migration on the same
//! host): the source lends its backing file, the destination maps it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::info;
use migration::RegionFd;

use super::{GuestRam, MemoryError, RegionInfo};
use crate::config::MemoryBacking;

/// What [`check_handover`] needs to know of a handed-over descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileInfo {
    /// `(st_dev, st_ino)`: which file it is.
    id: (u64, u64),
    /// Its size in bytes.
    size: u64,
    /// A regular file (memfds are).
    regular: bool,
}

/// fstat of an open descriptor.
fn file_info(fd: &impl AsRawFd) -> Result<FileInfo, MemoryError> {
    // SAFETY: fstat on an open descriptor into a zeroed stat buffer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(MemoryError::Handover(format!(
                "fstat: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(FileInfo {
            id: (st.st_dev, st.st_ino),
            size: u64::try_from(st.st_size).unwrap_or(0),
            regular: st.st_mode & libc::S_IFMT == libc::S_IFREG,
        })
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
        let fd = check_handover(size, regions)?;
        let ram = GuestRam::map(size, MemoryBacking::Shared, Some(fd), false)?;
        ram.lent.store(true, Ordering::SeqCst);
        info!(
            "guest RAM: {} MiB handed over by the source, mapped shared",
            size >> 20
        );
        Ok(ram)
    }

    /// Maps handed-over memory (checked as [`GuestRam::from_handover`]
    /// checks it) in place of this RAM, at the same host addresses
    /// (`MAP_FIXED`), so that a KVM VM whose memory slots map these
    /// addresses runs on the source's memory without a new slot: KVM
    /// follows the host mapping, not the pages it found there first.
    ///
    /// The returned RAM shares this RAM's mappings and is backed by the
    /// handed-over file. This RAM is marked lent before the first page is
    /// replaced, so neither it nor any clone is ever cleared again, even
    /// if a later region fails to map. The caller guarantees that nothing
    /// uses the memory meanwhile (no vCPU runs on it).
    pub fn adopt_handover(&self, regions: Vec<RegionFd>) -> Result<GuestRam, MemoryError> {
        let offsets: Vec<u64> = regions.iter().map(|r| r.offset).collect();
        let fd = check_handover(self.size, regions)?;
        self.lent.store(true, Ordering::SeqCst);
        for (r, &offset) in self.regions.iter().zip(&offsets) {
            let off = libc::off_t::try_from(offset)
                .map_err(|_| MemoryError::Handover(format!("offset {offset:#x}")))?;
            // SAFETY: `host_addr..host_addr+size` is a live mapping owned by
            // this RAM (type invariant); MAP_FIXED replaces exactly that
            // range with the same length and protection, so every clone's
            // view stays a valid mapping of `size` bytes. Guest memory is
            // never borrowed as a Rust reference, and the caller guarantees
            // no vCPU runs on it now.
            let p = unsafe {
                libc::mmap(
                    r.host_addr as *mut libc::c_void,
                    r.size as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    fd.as_raw_fd(),
                    off,
                )
            };
            if p == libc::MAP_FAILED || p as u64 != r.host_addr {
                return Err(MemoryError::Mmap {
                    gpa: r.gpa,
                    size: r.size,
                    msg: format!(
                        "mapping the handed-over memory in place: {}",
                        std::io::Error::last_os_error()
                    ),
                });
            }
        }
        let regions = self
            .regions
            .iter()
            .zip(&offsets)
            .map(|(r, &o)| RegionInfo {
                file_offset: Some(o),
                ..*r
            })
            .collect();
        info!(
            "guest RAM: {} MiB handed over by the source, mapped in place of the prepared RAM",
            self.size >> 20
        );
        Ok(GuestRam {
            mem: self.mem.clone(),
            regions,
            backing: MemoryBacking::Shared,
            fd: Some(fd),
            size: self.size,
            clean: Arc::new(AtomicBool::new(false)),
            resident: Arc::new(AtomicBool::new(false)),
            lent: self.lent.clone(),
        })
    }
}

/// Checks handed-over `regions` against this VMM's layout of a `size`-byte
/// guest (one file, the layout's regions at consecutive offsets from 0)
/// and returns that file.
fn check_handover(size: u64, regions: Vec<RegionFd>) -> Result<Arc<File>, MemoryError> {
    let layout = arch::layout::ram_regions(size);
    if layout.len() != regions.len() {
        return Err(MemoryError::Handover(format!(
            "{} regions handed over, this guest has {}",
            regions.len(),
            layout.len()
        )));
    }
    let Some(head) = regions.first() else {
        return Err(MemoryError::Handover("no region".into()));
    };
    let first = file_info(&head.fd)?;
    if !first.regular {
        return Err(MemoryError::Handover(
            "the handed-over memory is not a regular file or memfd".into(),
        ));
    }
    let mut offset = 0u64;
    for (r, (gpa, len)) in regions.iter().zip(&layout) {
        if (r.gpa, r.size, r.offset) != (gpa.0, *len as u64, offset) {
            return Err(MemoryError::Handover(format!(
                "region {:#x}+{:#x} at offset {:#x}; this layout has {:#x}+{:#x} at {offset:#x}",
                r.gpa, r.size, r.offset, gpa.0, len
            )));
        }
        if file_info(&r.fd)?.id != first.id {
            return Err(MemoryError::Handover(
                "the regions come from different files".into(),
            ));
        }
        offset += *len as u64;
    }
    // Mapped past its end, the file would fault (SIGBUS) at the first
    // guest access there instead of failing here.
    if first.size < offset {
        return Err(MemoryError::Handover(format!(
            "the handed-over memory file has {} bytes, this guest needs {offset}",
            first.size
        )));
    }
    regions
        .into_iter()
        .next()
        .map(|r| Arc::new(File::from(r.fd)))
        .ok_or_else(|| MemoryError::Handover("no region".into()))
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

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
    fn handed_over_memory_is_mapped_in_place_of_prepared_ram() {
        let src = ram(64 << 20, MemoryBacking::Shared);
        let prepared = ram(64 << 20, MemoryBacking::Anonymous);
        let (s1, p1) = (src.regions()[0], prepared.regions()[0]);
        // SAFETY: live writable mappings of this test's guest RAM.
        unsafe {
            std::ptr::write_bytes((s1.host_addr + 8192) as *mut u8, 0x3c, 4096);
            std::ptr::write_bytes((p1.host_addr + 8192) as *mut u8, 0x11, 4096);
        }
        let adopted = prepared.adopt_handover(src.lend().unwrap()).unwrap();
        // Same addresses (the KVM slots stay valid), the source's bytes.
        assert_eq!(adopted.regions()[0].host_addr, p1.host_addr);
        // SAFETY: as above; the mapping was replaced, not removed.
        let b = unsafe { *((p1.host_addr + 8192) as *const u8) };
        assert_eq!(b, 0x3c);
        // Writes go to the shared memory both processes see.
        // SAFETY: as above.
        unsafe { *((p1.host_addr + 8192) as *mut u8) = 0x77 };
        // SAFETY: as above.
        let b = unsafe { *((s1.host_addr + 8192) as *const u8) };
        assert_eq!(b, 0x77);
        // Neither the prepared RAM nor the adopted one is cleared again,
        // and the adopted one can be handed on (a second upgrade).
        assert!(prepared.is_lent() && adopted.is_lent());
        assert!(matches!(prepared.claim_zeroed(), Err(MemoryError::Lent)));
        assert_eq!(adopted.lend().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_adoption_leaves_the_prepared_ram_as_it_was() {
        let src = ram(64 << 20, MemoryBacking::Shared);
        let prepared = ram(32 << 20, MemoryBacking::Anonymous);
        let e = prepared.adopt_handover(src.lend().unwrap()).unwrap_err();
        assert!(e.to_string().contains("this layout has"), "{e}");
        assert!(!prepared.is_lent());
        assert!(prepared.claim_zeroed().is_ok());
    }

    /// A file shorter than the guest is refused: mapped, its missing tail
    /// would kill this process with SIGBUS at the guest's first access.
    #[test]
    fn a_short_memory_file_is_refused() {
        // SAFETY: memfd_create with a NUL-terminated name; the descriptor
        // is owned below.
        let raw = unsafe { libc::memfd_create(c"short".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone().unwrap())
            .set_len(32 << 20)
            .unwrap();
        let region = RegionFd {
            gpa: 0,
            size: 64 << 20,
            offset: 0,
            fd,
        };
        let e = GuestRam::from_handover(64 << 20, vec![region]).unwrap_err();
        assert!(e.to_string().contains("needs"), "{e}");
    }

    #[test]
    fn a_handed_over_pipe_is_refused() {
        let mut fds = [0; 2];
        // SAFETY: pipe into a 2-element array; both ends are owned below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors nothing else owns.
        let (r, _w) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let region = RegionFd {
            gpa: 0,
            size: 16 << 20,
            offset: 0,
            fd: r,
        };
        let e = GuestRam::from_handover(16 << 20, vec![region]).unwrap_err();
        assert!(e.to_string().contains("regular"), "{e}");
    }

    #[test]
    fn a_different_layout_is_refused() {
        let src = ram(64 << 20, MemoryBacking::Shared);
        let lent = src.lend().unwrap();
        let e = GuestRam::from_handover(32 << 20, lent).unwrap_err();
        assert!(e.to_string().contains("this layout has"), "{e}");
    }
}
