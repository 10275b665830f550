//! The post-copy backend of a received VM's RAM ([`PostcopyRam`]): one
//! userfaultfd over every region, missing pages dropped before
//! registration (anonymous memory: `MADV_DONTNEED`; memfd or file:
//! `FALLOC_FL_PUNCH_HOLE`), and pages placed with `UFFDIO_COPY` /
//! `UFFDIO_ZEROPAGE` only, never written through the mapping.
//!
//! Anonymous memory and shared memory on tmpfs (`--memory shared=on`, or
//! `file=` under `/dev/shm`) work; a `file=` on another file system cannot
//! be registered (the kernel has no missing-page faults for it) and the
//! switch to post-copy fails before COMMIT, so the source runs on.

use std::os::fd::AsRawFd;
use std::time::Duration;

use migration::{BackendError, BackendResult, GuestFault, PostcopyRam};

use crate::memory::{GuestRam, RegionInfo, PAGE};
use crate::uffd::Uffd;

/// [`PostcopyRam`] over the RAM of a received VM.
///
/// Invariant: `ram` (a clone keeps the mappings alive) is the RAM whose
/// regions `uffd` registers; addresses passed to `uffd` lie inside them.
pub struct UffdRam {
    ram: GuestRam,
    uffd: Uffd,
}

fn be(what: &str, e: std::io::Error) -> BackendError {
    BackendError::new(format!("{what}: {e}"))
}

impl UffdRam {
    /// Opens the userfaultfd for `ram`.
    pub fn new(ram: GuestRam) -> BackendResult<UffdRam> {
        let uffd = Uffd::new().map_err(|e| {
            be(
                "opening a userfaultfd for post-copy (needs root or access to /dev/userfaultfd)",
                e,
            )
        })?;
        Ok(UffdRam { ram, uffd })
    }

    /// Host address of page `page` of `region` and the region, checking
    /// that `n` pages from there lie inside it.
    fn at(&self, region: usize, page: u64, n: u64) -> BackendResult<(u64, RegionInfo)> {
        let r = *self
            .ram
            .regions()
            .get(region)
            .ok_or_else(|| BackendError::new(format!("no RAM region {region}")))?;
        let end = page
            .checked_add(n)
            .and_then(|e| e.checked_mul(PAGE))
            .filter(|&e| e <= r.size)
            .ok_or_else(|| {
                BackendError::new(format!("pages {page}+{n} outside RAM region {region}"))
            })?;
        let _ = end;
        Ok((r.host_addr + page * PAGE, r))
    }

    fn fill(
        &self,
        region: usize,
        first: u64,
        n: u64,
        src: Option<&[u8]>,
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        let (addr, r) = self.at(region, first, n)?;
        if let Some(d) = src {
            if d.len() as u64 != n * PAGE {
                return Err(BackendError::new("post-copy data is not whole pages"));
            }
        }
        let mut at = Vec::new();
        // SAFETY: `src` (when given) is a slice of exactly `n` pages; the
        // destination range was checked to lie in a registered region.
        unsafe {
            self.uffd
                .fill(addr, src.map(|d| d.as_ptr()), n * PAGE, &mut at)
        }
        .map_err(|e| be("placing post-copy pages (UFFDIO_COPY/ZEROPAGE)", e))?;
        present.extend(at.into_iter().map(|a| (a - r.host_addr) / PAGE));
        Ok(())
    }
}

impl PostcopyRam for UffdRam {
    fn discard(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        let (addr, r) = self.at(region, first_page, npages)?;
        let len = npages * PAGE;
        match (self.ram.file(), r.file_offset) {
            (Some(f), Some(off)) => {
                // SAFETY: fallocate on the backing file we own; punching a
                // hole only drops the contents of this guest range (no vCPU
                // runs yet), which then read as missing.
                let rc = unsafe {
                    libc::fallocate(
                        f.as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        (off + first_page * PAGE) as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc != 0 {
                    return Err(be(
                        "punching stale pages out of the guest memory file",
                        std::io::Error::last_os_error(),
                    ));
                }
            }
            _ => {
                // SAFETY: the range lies in this region's live private
                // anonymous mapping (checked above); no vCPU runs yet and no
                // migration thread writes these pages; MADV_DONTNEED makes
                // them missing.
                let rc = unsafe {
                    libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
                };
                if rc != 0 {
                    return Err(be(
                        "dropping stale guest pages",
                        std::io::Error::last_os_error(),
                    ));
                }
            }
        }
        Ok(())
    }

    fn register(&self) -> BackendResult<()> {
        for (i, r) in self.ram.regions().iter().enumerate() {
            if let Err(e) = self.uffd.register(r.host_addr, r.size) {
                for q in &self.ram.regions()[..i] {
                    let _ = self.uffd.unregister(q.host_addr, q.size);
                }
                return Err(be(
                    &format!(
                        "registering guest RAM region {i} ({}) for post-copy faults (needs \
                         anonymous memory or shared memory on tmpfs)",
                        self.ram.backing().kind()
                    ),
                    e,
                ));
            }
        }
        Ok(())
    }

    fn wait_faults(&self, timeout: Duration, out: &mut Vec<GuestFault>) -> BackendResult<()> {
        let mut addrs = Vec::new();
        self.uffd
            .read_faults(timeout, &mut addrs)
            .map_err(|e| be("reading post-copy faults", e))?;
        for a in addrs {
            let found = self
                .ram
                .regions()
                .iter()
                .position(|r| a >= r.host_addr && a < r.host_addr + r.size);
            match found {
                Some(i) => out.push(GuestFault {
                    region: i,
                    page: (a - self.ram.regions()[i].host_addr) / PAGE,
                }),
                None => log::warn!("post-copy fault at {a:#x} outside guest RAM ignored"),
            }
        }
        Ok(())
    }

    fn place(
        &self,
        region: usize,
        first_page: u64,
        data: &[u8],
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        let n = data.len() as u64 / PAGE;
        self.fill(region, first_page, n, Some(data), present)
    }

    fn place_zero(
        &self,
        region: usize,
        first_page: u64,
        npages: u64,
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        self.fill(region, first_page, npages, None, present)
    }

    fn wake(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        let (addr, _) = self.at(region, first_page, npages)?;
        self.uffd
            .wake(addr, npages * PAGE)
            .map_err(|e| be("waking a faulting vCPU", e))
    }

    fn unregister(&self) -> BackendResult<()> {
        for r in self.ram.regions() {
            self.uffd
                .unregister(r.host_addr, r.size)
                .map_err(|e| be("ending post-copy (UFFDIO_UNREGISTER)", e))?;
        }
        Ok(())
    }
}
