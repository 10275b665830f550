//! Guest RAM: allocation (anonymous, memfd, file), prefaulting, and the
//! "which pages may hold data" query used by the first migration pass.

use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{debug, info};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestRegionMmap};

use crate::config::{MemoryBacking, MemoryConfig};

mod handover;
mod vmm_writes;

pub use vmm_writes::VmmWrites;

/// Guest memory with a bitmap of the VMM's own writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<VmmWrites>;

/// Page size used for dirty tracking and population queries.
pub const PAGE: u64 = 4096;

/// Errors of guest memory setup.
///
/// Invariant: messages name the operation and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory was handed over to another process (it is not cleared).
    #[error("guest RAM was handed over to another process; it is never cleared here")]
    Lent,
    /// Handed-over memory that cannot be mapped as this guest's RAM.
    #[error("handed-over memory: {0}")]
    Handover(String),
    /// memfd_create failed.
    #[error("creating the guest memory memfd: {0}")]
    Memfd(#[source] std::io::Error),
    /// Opening or sizing the backing file failed.
    #[error("guest memory file {path}: {source}")]
    File {
        /// Path of the file.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// mmap of a region failed.
    #[error("mapping {size:#x} bytes of guest memory at {gpa:#x}: {msg}")]
    Mmap {
        /// Guest address of the region.
        gpa: u64,
        /// Size of the region.
        size: u64,
        /// What the mapper said.
        msg: String,
    },
    /// Assembling the regions failed.
    #[error("building guest memory: {0}")]
    Collection(String),
    /// The size yields no region.
    #[error("guest memory size {0:#x} yields no RAM region")]
    Empty(u64),
    /// Prefaulting failed.
    #[error("prefaulting guest memory: {0}")]
    Prefault(#[source] std::io::Error),
    /// Zeroing guest RAM for a received VM failed.
    #[error("zeroing guest RAM region {region} ({how}): {source}")]
    Zero {
        /// Region index.
        region: usize,
        /// The method that failed.
        how: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A population query failed.
    #[error("querying resident pages of region {region}: {source}")]
    Populated {
        /// Region index.
        region: usize,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// One RAM region as the VMM sees it.
///
/// Invariant: `host_addr..host_addr+size` is a live mapping owned by the
/// [`GuestRam`] that holds this value; `gpa` and `size` are page multiples.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Host virtual address.
    pub host_addr: u64,
    /// Offset in the backing fd (memfd or file), if any.
    pub file_offset: Option<u64>,
}

/// The guest RAM of one VM.
///
/// Invariant: `regions` mirrors `mem`'s regions in guest address order; the
/// mappings live as long as any clone of `mem`; `fd` is the backing file of
/// every region when the kind is shared or file. `clean` (shared by all
/// clones) is true only while every byte reads as zero and no VM was handed
/// the memory since ([`GuestRam::claim_zeroed`]); `resident` is true once
/// [`GuestRam::prefault`] succeeded (zeroing then keeps pages faulted in).
/// `lent` (shared by all clones) is set once the memory was handed over to
/// (or received from) another process by a `unix:` migration: from then on
/// this process never clears it ([`GuestRam::zero`] and
/// [`GuestRam::claim_zeroed`] refuse), since the other side's guest may run
/// on it.
#[derive(Clone)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RegionInfo>,
    backing: MemoryBacking,
    fd: Option<Arc<File>>,
    size: u64,
    clean: Arc<AtomicBool>,
    resident: Arc<AtomicBool>,
    lent: Arc<AtomicBool>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .field("backing", &self.backing)
            .finish()
    }
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the returned fd is
    // checked and then owned by the File.
    let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    Ok(file)
}

impl GuestRam {
    /// Allocates guest RAM of `cfg.size` bytes laid out as
    /// [`arch::layout::ram_regions`] says, with the given backing.
    /// Does not prefault (see [`GuestRam::prefault`]).
    pub fn new(cfg: &MemoryConfig) -> Result<GuestRam, MemoryError> {
        let layout = arch::layout::ram_regions(cfg.size);
        if layout.is_empty() {
            return Err(MemoryError::Empty(cfg.size));
        }
        let fd = match &cfg.backing {
            MemoryBacking::Anonymous => None,
            MemoryBacking::Shared => Some(Arc::new(memfd(cfg.size)?)),
            MemoryBacking::File(path) => Some(Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|source| MemoryError::File {
                        path: path.display().to_string(),
                        source,
                    })?,
            )),
        };
        // Fresh anonymous memory and a fresh memfd read as zero; a file may
        // hold anything.
        let clean = !matches!(cfg.backing, MemoryBacking::File(_));
        GuestRam::map(cfg.size, cfg.backing.clone(), fd, clean)
    }

    /// Maps `size` bytes of guest RAM as [`arch::layout::ram_regions`] lays
    /// them out: anonymous without `fd`, else `MAP_SHARED` from `fd` at
    /// consecutive offsets from 0.
    fn map(
        size: u64,
        backing: MemoryBacking,
        fd: Option<Arc<File>>,
        clean: bool,
    ) -> Result<GuestRam, MemoryError> {
        let layout = arch::layout::ram_regions(size);
        if layout.is_empty() {
            return Err(MemoryError::Empty(size));
        }
        let mut regions = Vec::with_capacity(layout.len());
        let mut mmaps = Vec::with_capacity(layout.len());
        let mut offset = 0u64;
        for (gpa, size) in layout {
            let size64 = size as u64;
            let builder = MmapRegionBuilder::new_with_bitmap(size, VmmWrites::new(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
            let builder = match &fd {
                None => builder
                    .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE),
                Some(f) => builder
                    .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
                    .with_file_offset(FileOffset::from_arc(f.clone(), offset)),
            };
            let mapping = builder.build().map_err(|e| MemoryError::Mmap {
                gpa: gpa.0,
                size: size64,
                msg: e.to_string(),
            })?;
            let host_addr = mapping.as_ptr() as u64;
            let region = GuestRegionMmap::new(mapping, gpa).ok_or(MemoryError::Mmap {
                gpa: gpa.0,
                size: size64,
                msg: "region end overflows".into(),
            })?;
            regions.push(RegionInfo {
                gpa: gpa.0,
                size: size64,
                host_addr,
                file_offset: fd.as_ref().map(|_| offset),
            });
            mmaps.push(region);
            offset += size64;
        }
        let mem = GuestMemoryMmap::from_regions(mmaps)
            .map_err(|e| MemoryError::Collection(e.to_string()))?;
        for r in &regions {
            info!(
                "guest RAM: {:#x}..{:#x} ({} MiB, {}) at host {:#x}",
                r.gpa,
                r.gpa + r.size,
                r.size >> 20,
                backing.kind(),
                r.host_addr
            );
        }
        Ok(GuestRam {
            mem,
            regions,
            backing,
            fd,
            size,
            clean: Arc::new(AtomicBool::new(clean)),
            resident: Arc::new(AtomicBool::new(false)),
            lent: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The vm-memory object (shares the mappings).
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The regions in guest address order.
    pub fn regions(&self) -> &[RegionInfo] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing kind.
    pub fn backing(&self) -> &MemoryBacking {
        &self.backing
    }

    /// The backing file (memfd or `file=`) of every region, if any.
    pub fn file(&self) -> Option<&Arc<File>> {
        self.fd.as_ref()
    }

    /// Faults every page in, writable, with two threads (MADV_POPULATE_WRITE,
    /// or a read-and-write-back touch per page where that is unsupported).
    /// Content is preserved.
    pub fn prefault(&self) -> Result<(), MemoryError> {
        let start = std::time::Instant::now();
        // Split all memory into two halves by bytes, chunk by chunk.
        let mut chunks: Vec<(u64, u64)> = Vec::new();
        const CHUNK: u64 = 64 << 20;
        for r in &self.regions {
            let mut off = 0;
            while off < r.size {
                let len = CHUNK.min(r.size - off);
                chunks.push((r.host_addr + off, len));
                off += len;
            }
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let result: Result<(), std::io::Error> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| -> Result<(), std::io::Error> {
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(&(addr, len)) = chunks.get(i) else {
                                return Ok(());
                            };
                            populate_write(addr, len)?;
                        }
                    })
                })
                .collect();
            for w in workers {
                match w.join() {
                    Ok(r) => r?,
                    Err(_) => return Err(std::io::Error::other("prefault thread panicked")),
                }
            }
            Ok(())
        });
        result.map_err(MemoryError::Prefault)?;
        self.resident.store(true, Ordering::SeqCst);
        info!(
            "prefaulted {} MiB of guest RAM in {:?}",
            self.size >> 20,
            start.elapsed()
        );
        Ok(())
    }

    /// Zeroes all guest RAM by writing zeroes (used to reuse pre-provisioned
    /// memory after a failed migration). Pages stay faulted in. The caller
    /// guarantees that no vCPU or migration thread uses the memory.
    pub fn zero(&self) {
        if self.lent.load(Ordering::SeqCst) {
            log::warn!("guest RAM was handed over to another process: not zeroing it");
            return;
        }
        for r in &self.regions {
            // SAFETY: the mapping is live and writable for `size` bytes (type
            // invariant); the caller guarantees nothing else accesses it now.
            unsafe { std::ptr::write_bytes(r.host_addr as *mut u8, 0, r.size as usize) };
        }
        self.clean.store(true, Ordering::SeqCst);
    }

    /// Makes every byte read as zero before a received VM is built on this
    /// memory (the receiver contract: pages the source never sends must read
    /// zero), then marks the memory as in use. Free when the memory is known
    /// to be clean (fresh anonymous or memfd memory, or zeroed since its last
    /// use). Otherwise, cheaply by backing: resident (prefaulted) memory is
    /// overwritten in place, so that it stays faulted in; anonymous memory
    /// is dropped (`MADV_DONTNEED`); memfd and file ranges get their holes
    /// punched (`FALLOC_FL_PUNCH_HOLE`, size kept), with writing zeroes as
    /// the fallback where the file system cannot punch holes. The caller
    /// guarantees that no vCPU or migration thread uses the memory.
    pub fn claim_zeroed(&self) -> Result<(), MemoryError> {
        if self.lent.load(Ordering::SeqCst) {
            return Err(MemoryError::Lent);
        }
        if self.clean.swap(false, Ordering::SeqCst) {
            return Ok(());
        }
        let start = std::time::Instant::now();
        let how = if self.resident.load(Ordering::SeqCst) {
            self.zero();
            "written"
        } else {
            self.drop_contents()?
        };
        self.clean.store(false, Ordering::SeqCst);
        info!(
            "{} MiB of guest RAM zeroed for an incoming VM ({how}) in {:?}",
            self.size >> 20,
            start.elapsed()
        );
        Ok(())
    }

    /// Drops the contents of every region without faulting pages in;
    /// returns how.
    fn drop_contents(&self) -> Result<&'static str, MemoryError> {
        let mut how = "";
        for (idx, r) in self.regions.iter().enumerate() {
            how = match (&self.fd, r.file_offset) {
                (Some(fd), Some(off)) => {
                    punch_hole(fd, off, r.size).map_err(|source| MemoryError::Zero {
                        region: idx,
                        how: "punching a hole",
                        source,
                    })?
                }
                _ => {
                    // SAFETY: the range is this region's live private
                    // anonymous mapping (type invariant); MADV_DONTNEED makes
                    // it read as zero-fill-on-demand memory, and the caller
                    // guarantees nothing else accesses it now.
                    let rc = unsafe {
                        libc::madvise(
                            r.host_addr as *mut libc::c_void,
                            r.size as usize,
                            libc::MADV_DONTNEED,
                        )
                    };
                    if rc != 0 {
                        return Err(MemoryError::Zero {
                            region: idx,
                            how: "MADV_DONTNEED",
                            source: std::io::Error::last_os_error(),
                        });
                    }
                    "dropped"
                }
            };
            if how == "written" {
                // SAFETY: as in `zero`: live, writable, unused mapping.
                unsafe { std::ptr::write_bytes(r.host_addr as *mut u8, 0, r.size as usize) };
            }
        }
        Ok(how)
    }

    /// Byte ranges of region `idx` that may hold non-zero data, page-aligned,
    /// sorted. Anonymous memory: resident pages (mincore); memfd/file:
    /// data extents (SEEK_DATA/SEEK_HOLE). The whole region when the host
    /// has swap (swapped-out pages are not resident).
    pub fn populated(&self, idx: usize) -> Result<Vec<Range<u64>>, MemoryError> {
        let size = self.regions.get(idx).map_or(0, |r| r.size);
        Ok(self.populated_exact(idx)?.unwrap_or_else(|| whole(size)))
    }

    /// [`GuestRam::populated`], or `None` where this host cannot tell
    /// (anonymous memory, no PAGEMAP_SCAN, and swap that mincore cannot
    /// see): then every page may hold data.
    pub fn populated_exact(&self, idx: usize) -> Result<Option<Vec<Range<u64>>>, MemoryError> {
        let Some(r) = self.regions.get(idx) else {
            return Ok(Some(Vec::new()));
        };
        let perr = |source| MemoryError::Populated {
            region: idx,
            source,
        };
        match (&self.fd, r.file_offset) {
            (Some(fd), Some(off)) => seek_data_ranges(fd, off, r.size).map(Some).map_err(perr),
            _ => {
                // Page tables first: cost follows populated memory, and
                // swapped-out pages are seen.
                if let Some(ranges) =
                    crate::pagemap::data_ranges(r.host_addr, r.size).map_err(perr)?
                {
                    return Ok(Some(ranges));
                }
                if host_has_swap() {
                    return Ok(None);
                }
                mincore_ranges(r.host_addr, r.size).map(Some).map_err(perr)
            }
        }
    }

    /// Reads and clears the VMM's own-write bitmap of region `idx` (same
    /// layout as KVM's dirty log). Empty if `idx` is out of range or the
    /// VMM wrote nothing there since the previous take.
    pub fn take_vmm_dirty(&self, idx: usize) -> Vec<u64> {
        match self.mem.iter().nth(idx) {
            Some(region) => (**region).bitmap().take().unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Clears the VMM's own-write bitmaps of all regions.
    pub fn reset_vmm_dirty(&self) {
        for region in self.mem.iter() {
            (**region).bitmap().reset();
        }
    }
}

/// Punches a hole over `[offset, offset+len)` of `fd` (size kept): the range
/// then reads as zero, through mappings too. `Ok("written")` when the file
/// system cannot punch holes (the caller then writes zeroes), else
/// `Ok("holes punched")`.
fn punch_hole(fd: &File, offset: u64, len: u64) -> Result<&'static str, std::io::Error> {
    // SAFETY: fallocate on a valid fd owned by `fd`; it changes only the
    // file's contents in the given range.
    let rc = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok("holes punched");
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok("written"),
        _ => Err(e),
    }
}

fn host_has_swap() -> bool {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("SwapTotal:"))
                .map(|l| l.split_whitespace().nth(1) != Some("0"))
        })
        .unwrap_or(true)
}

/// Faults `[addr, addr+len)` in writable without changing its content.
fn populate_write(addr: u64, len: u64) -> Result<(), std::io::Error> {
    // SAFETY: madvise on a range of our own live mapping; POPULATE_WRITE
    // does not change content.
    let r = unsafe {
        libc::madvise(
            addr as *mut libc::c_void,
            len as usize,
            libc::MADV_POPULATE_WRITE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(err);
    }
    debug!("MADV_POPULATE_WRITE unsupported, touching pages");
    let mut p = addr;
    while p < addr + len {
        // SAFETY: p is inside our live, writable mapping; a volatile read and
        // write-back of the same byte preserves content.
        unsafe {
            let ptr = p as *mut u8;
            let v = std::ptr::read_volatile(ptr);
            std::ptr::write_volatile(ptr, v);
        }
        p += PAGE;
    }
    Ok(())
}

/// The single range covering `size` bytes (a list of one byte range,
/// not the list of numbers that clippy suspects).
#[allow(clippy::single_range_in_vec_init)]
fn whole(size: u64) -> Vec<Range<u64>> {
    vec![0..size]
}

/// Appends page `[start, end)` to `out`, merging with the previous range.
fn push_range(out: &mut Vec<Range<u64>>, start: u64, end: u64) {
    if let Some(last) = out.last_mut() {
        if last.end == start {
            last.end = end;
            return;
        }
    }
    out.push(start..end);
}

/// Resident pages of `[addr, addr+size)` as offset ranges (mincore, in
/// chunks with a bounded buffer).
fn mincore_ranges(addr: u64, size: u64) -> Result<Vec<Range<u64>>, std::io::Error> {
    const CHUNK_PAGES: u64 = 64 * 1024;
    let mut vec = vec![0u8; CHUNK_PAGES as usize];
    let mut out = Vec::new();
    let pages = size / PAGE;
    let mut page = 0;
    while page < pages {
        let n = CHUNK_PAGES.min(pages - page);
        // SAFETY: the range lies in our live mapping; `vec` has room for n
        // entries.
        let r = unsafe {
            libc::mincore(
                (addr + page * PAGE) as *mut libc::c_void,
                (n * PAGE) as usize,
                vec.as_mut_ptr(),
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for (i, v) in vec[..n as usize].iter().enumerate() {
            if v & 1 != 0 {
                let off = (page + i as u64) * PAGE;
                push_range(&mut out, off, off + PAGE);
            }
        }
        page += n;
    }
    Ok(out)
}

/// Data extents of `fd` within `[offset, offset+size)`, as page-aligned
/// ranges relative to `offset`.
fn seek_data_ranges(fd: &File, offset: u64, size: u64) -> Result<Vec<Range<u64>>, std::io::Error> {
    let end = offset + size;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        // SAFETY: lseek on a valid fd owned by `fd`.
        let data = unsafe { libc::lseek(fd.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            if e.raw_os_error() == Some(libc::EINVAL) {
                // SEEK_DATA unsupported: everything may hold data.
                return Ok(whole(size));
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        let s = (data - offset) / PAGE * PAGE;
        let e = (hole - offset).div_ceil(PAGE) * PAGE;
        push_range(&mut out, s, e.min(size));
        pos = hole.max(data + 1);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64, backing: MemoryBacking) -> MemoryConfig {
        MemoryConfig {
            size,
            backing,
            prefault: false,
        }
    }

    #[test]
    fn anonymous_populated_tracks_writes() {
        let ram = GuestRam::new(&cfg(16 << 20, MemoryBacking::Anonymous)).unwrap();
        assert_eq!(ram.regions().len(), 1);
        let r = ram.regions()[0];
        if host_has_swap() {
            return;
        }
        assert!(ram.populated(0).unwrap().is_empty());
        // SAFETY: `r` is a live 16 MiB mapping owned by `ram` (alive to the
        // end of the test), the offsets are inside it, and no vCPU or other
        // thread touches it.
        unsafe {
            *((r.host_addr + 5 * PAGE) as *mut u8) = 1;
            *((r.host_addr + 6 * PAGE + 7) as *mut u8) = 1;
            *((r.host_addr + 100 * PAGE) as *mut u8) = 1;
        }
        assert_eq!(
            ram.populated(0).unwrap(),
            vec![5 * PAGE..7 * PAGE, 100 * PAGE..101 * PAGE]
        );
        assert!(ram.populated(9).unwrap().is_empty());
    }

    #[test]
    fn shared_populated_uses_seek_data() {
        let ram = GuestRam::new(&cfg(16 << 20, MemoryBacking::Shared)).unwrap();
        assert!(ram.populated(0).unwrap().is_empty());
        let r = ram.regions()[0];
        // SAFETY: offset inside the live 16 MiB mapping owned by `ram`; no
        // other thread touches it.
        unsafe { *((r.host_addr + 3 * PAGE + 1) as *mut u8) = 1 };
        let p = ram.populated(0).unwrap();
        assert_eq!(p.len(), 1);
        assert!(p[0].start <= 3 * PAGE && p[0].end >= 4 * PAGE, "{p:?}");
    }

    #[test]
    fn large_memory_is_split() {
        let ram = GuestRam::new(&cfg(4 << 30, MemoryBacking::Shared)).unwrap();
        let regs = ram.regions();
        assert_eq!(regs.len(), 2);
        assert_eq!(regs[1].gpa, 4 << 30);
        assert_eq!(regs[0].size + regs[1].size, 4 << 30);
        assert_eq!(regs[1].file_offset, Some(regs[0].size));
        // Write past the gap and find it in region 1.
        // SAFETY: region 1 is a live mapping owned by `ram`, larger than two
        // pages; no other thread touches it.
        unsafe { *((regs[1].host_addr + PAGE) as *mut u8) = 9 };
        let p = ram.populated(1).unwrap();
        assert!(p.iter().any(|r| r.contains(&PAGE)), "{p:?}");
    }

    #[test]
    fn prefault_and_zero_keep_working() {
        let ram = GuestRam::new(&cfg(8 << 20, MemoryBacking::Anonymous)).unwrap();
        let r = ram.regions()[0];
        // SAFETY: byte 8 of the live 8 MiB mapping owned by `ram`; no other
        // thread touches it.
        unsafe { *((r.host_addr + 8) as *mut u8) = 7 };
        ram.prefault().unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *((r.host_addr + 8) as *const u8) }, 7);
        if !host_has_swap() {
            assert_eq!(ram.populated(0).unwrap(), vec![0..8 << 20]);
        }
        ram.zero();
        // SAFETY: as above.
        assert_eq!(unsafe { *((r.host_addr + 8) as *const u8) }, 0);
    }

    /// Every byte of every region of `ram`, checked for zero.
    fn all_zero(ram: &GuestRam) -> bool {
        ram.regions().iter().all(|r| {
            // SAFETY: `r` is a live mapping of `r.size` bytes owned by
            // `ram`, which outlives this borrow; no other thread touches it.
            let s =
                unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.size as usize) };
            s.iter().all(|b| *b == 0)
        })
    }

    /// Writes `v` at a few offsets of every region of `ram`.
    fn scribble(ram: &GuestRam, v: u8) {
        for r in ram.regions() {
            for off in [0, PAGE + 9, r.size / 2, r.size - 1] {
                // SAFETY: `off` < `r.size`, inside the live mapping owned by
                // `ram`; no other thread touches it.
                unsafe { *((r.host_addr + off) as *mut u8) = v };
            }
        }
    }

    #[test]
    fn claim_zeroed_clears_each_backing() {
        let dir = std::env::temp_dir().join(format!("ferry-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        // A file full of old bytes, a page longer than the guest RAM.
        std::fs::write(&path, vec![0xa5u8; (8 << 20) + PAGE as usize]).unwrap();
        for backing in [
            MemoryBacking::Anonymous,
            MemoryBacking::Shared,
            MemoryBacking::File(path.clone()),
        ] {
            let ram = GuestRam::new(&cfg(8 << 20, backing.clone())).unwrap();
            // First use: a fresh mapping is free, an old file is cleared.
            ram.claim_zeroed().unwrap();
            assert!(all_zero(&ram), "{backing:?}: first claim");
            // Reuse after the memory was written.
            scribble(&ram, 3);
            ram.claim_zeroed().unwrap();
            assert!(all_zero(&ram), "{backing:?}: reused");
            // Resident memory stays resident.
            scribble(&ram, 4);
            ram.prefault().unwrap();
            ram.claim_zeroed().unwrap();
            assert!(all_zero(&ram), "{backing:?}: prefaulted");
            if !host_has_swap() && backing == MemoryBacking::Anonymous {
                assert_eq!(ram.populated(0).unwrap(), vec![0..8 << 20]);
            }
            // zero() marks it clean: the next claim is free and keeps zeroes.
            scribble(&ram, 5);
            ram.zero();
            ram.claim_zeroed().unwrap();
            assert!(all_zero(&ram), "{backing:?}: after zero()");
        }
        // The file kept its size and the bytes past the guest RAM.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), (8 << 20) + PAGE as usize);
        assert!(bytes[..8 << 20].iter().all(|b| *b == 0));
        assert!(bytes[8 << 20..].iter().all(|b| *b == 0xa5));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vmm_writes_are_tracked() {
        use vm_memory::{Bytes, GuestAddress};
        let ram = GuestRam::new(&cfg(8 << 20, MemoryBacking::Anonymous)).unwrap();
        ram.reset_vmm_dirty();
        ram.mem()
            .write_slice(&[1, 2, 3], GuestAddress(70 * PAGE))
            .unwrap();
        let bm = ram.take_vmm_dirty(0);
        assert_eq!(bm[1], 1 << 6);
        assert!(ram.take_vmm_dirty(0).iter().all(|w| *w == 0));
    }
}
