//! The populated pages of an anonymous mapping, by the kernel's
//! `PAGEMAP_SCAN` ioctl on `/proc/self/pagemap` (Linux 6.7+).
//!
//! `mincore` fills one byte per page of the whole range, so listing the
//! populated pages of an untouched 16 GiB guest costs 4 Mi bytes written
//! and read; `PAGEMAP_SCAN` walks the page tables, skips the empty upper
//! levels at once, and returns ranges: its cost follows populated memory,
//! not the guest's size. It also reports swapped-out pages (which mincore
//! does not), and pages mapped to the shared zero page can be left out (they
//! read as zero, and the receiver's memory reads as zero already).
//!
//! The ABI (`include/uapi/linux/fs.h`) is written out here; the unit tests
//! pin its sizes and numbers.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// `struct pm_scan_arg` of `include/uapi/linux/fs.h`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `PAGE_IS_PRESENT`.
const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`.
const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
/// Ranges returned per call (a fragmented guest takes several calls).
const VEC_LEN: usize = 4096;

/// The byte ranges, relative to `addr`, of the pages of `[addr, addr+size)`
/// that hold data: present (but not the shared zero page) or swapped out.
/// `Ok(None)` when this kernel has no `PAGEMAP_SCAN` (the caller falls back
/// to `mincore`).
///
/// `addr` and `size` must be page-aligned and lie in a live mapping of this
/// process (the kernel only reads its page tables; nothing is faulted in).
pub fn data_ranges(addr: u64, size: u64) -> io::Result<Option<Vec<Range<u64>>>> {
    let pagemap = match File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let end = addr
        .checked_add(size)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut regions = vec![PageRegion::default(); VEC_LEN];
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut start = addr;
    while start < end {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            start,
            end,
            vec: regions.as_mut_ptr() as u64,
            vec_len: VEC_LEN as u64,
            // Present or swapped, and not the zero page.
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            category_inverted: PAGE_IS_PFNZERO,
            category_mask: PAGE_IS_PFNZERO,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            ..Default::default()
        };
        // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
        // `regions`, VEC_LEN writable page_region entries that outlive the
        // call; the kernel writes only those and `arg.walk_end`, and only
        // reads the page tables of `[start, end)`.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOTTY) | Some(libc::EINVAL) if out.is_empty() && start == addr => {
                    Ok(None)
                }
                _ => Err(e),
            };
        }
        for r in &regions[..(n as usize).min(VEC_LEN)] {
            let (s, e) = (r.start.max(addr) - addr, r.end.min(end) - addr);
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some(last) if last.end == s => last.end = e,
                _ => out.push(s..e),
            }
        }
        if arg.walk_end <= start {
            // No progress: never loop forever on a kernel that misreports.
            return Err(io::Error::other("PAGEMAP_SCAN made no progress"));
        }
        start = arg.walk_end;
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abi_sizes_and_numbers() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(
            (PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_PFNZERO),
            (8, 16, 32)
        );
    }

    /// An anonymous mapping of `pages` pages, unmapped on drop.
    struct Map(*mut libc::c_void, usize);

    impl Map {
        fn new(pages: usize) -> Map {
            let len = pages * 4096;
            // SAFETY: a fresh private anonymous mapping; checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map(p, len)
        }
        fn addr(&self) -> u64 {
            self.0 as u64
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping made in `new`.
            unsafe { libc::munmap(self.0, self.1) };
        }
    }

    #[test]
    fn finds_written_pages_and_skips_read_only_zero_pages() {
        let m = Map::new(1024);
        let Some(none) = data_ranges(m.addr(), 1024 * 4096).unwrap() else {
            eprintln!("SKIPPED: this kernel has no PAGEMAP_SCAN");
            return;
        };
        assert!(none.is_empty(), "{none:?}");
        for page in [3u64, 4, 5, 700] {
            // SAFETY: inside the live mapping.
            unsafe { std::ptr::write_volatile((m.addr() + page * 4096 + 8) as *mut u8, 1) };
        }
        // A read maps the shared zero page: not data.
        // SAFETY: inside the live mapping.
        let _ = unsafe { std::ptr::read_volatile((m.addr() + 900 * 4096) as *const u8) };
        let r = data_ranges(m.addr(), 1024 * 4096).unwrap().unwrap();
        assert_eq!(r, vec![3 * 4096..6 * 4096, 700 * 4096..701 * 4096]);
        // A sub-range is reported relative to its own start.
        let r = data_ranges(m.addr() + 4 * 4096, 4096).unwrap().unwrap();
        assert_eq!(r, vec![0..4096]);
    }
}
