//! An in-memory model of userfaultfd in MISSING mode over the fake
//! destination's anonymous RAM, and a fake vCPU that reads guest pages
//! through it (faulting on missing ones).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::traits::*;

const PAGE: usize = 4096;

/// The model: a page is present once resident before registration, or
/// placed after it; a reader of a missing page queues a fault and waits.
pub struct FakePostcopy {
    regions: Vec<(usize, u64)>,
    st: Mutex<State>,
    cv: Condvar,
    /// Placements refused because the page was present (EEXIST).
    pub duplicates: AtomicU64,
    /// Pages placed with data or zeroes.
    pub placed: AtomicU64,
    /// Faults reported.
    pub faults: AtomicU64,
    /// Whether `unregister` ran.
    pub ended: AtomicBool,
}

struct State {
    registered: bool,
    present: Vec<Vec<bool>>,
    queue: VecDeque<GuestFault>,
}

impl FakePostcopy {
    /// Over `(host address, size)` regions.
    pub fn new(regions: Vec<(usize, u64)>) -> FakePostcopy {
        FakePostcopy {
            st: Mutex::new(State {
                registered: false,
                present: regions
                    .iter()
                    .map(|r| vec![true; (r.1 as usize) / PAGE])
                    .collect(),
                queue: VecDeque::new(),
            }),
            regions,
            cv: Condvar::new(),
            duplicates: AtomicU64::new(0),
            placed: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        }
    }

    fn ptr(&self, region: usize, page: u64) -> *mut u8 {
        (self.regions[region].0 + page as usize * PAGE) as *mut u8
    }

    /// A vCPU reads page `page` of `region`: waits while it is missing.
    /// `None` if it did not arrive within 30 s.
    pub fn guest_read(&self, region: usize, page: u64) -> Option<Vec<u8>> {
        let mut st = self.st.lock().unwrap();
        let mut asked = false;
        let start = Instant::now();
        while st.registered && !st.present[region][page as usize] {
            if !asked {
                st.queue.push_back(GuestFault { region, page });
                self.faults.fetch_add(1, SeqCst);
                self.cv.notify_all();
                asked = true;
            }
            if start.elapsed() > Duration::from_secs(30) {
                return None;
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        drop(st);
        let mut v = vec![0u8; PAGE];
        // SAFETY: the page lies in the fake's live mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(region, page), v.as_mut_ptr(), PAGE) };
        Some(v)
    }

    fn place_with(
        &self,
        region: usize,
        first: u64,
        n: u64,
        data: Option<&[u8]>,
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        let mut st = self.st.lock().unwrap();
        if !st.registered {
            return Err(BackendError::new("placing into unregistered RAM"));
        }
        for i in 0..n {
            let p = first + i;
            let slot = st
                .present
                .get_mut(region)
                .and_then(|r| r.get_mut(p as usize))
                .ok_or_else(|| BackendError::new("page outside RAM"))?;
            if *slot {
                present.push(p);
                self.duplicates.fetch_add(1, SeqCst);
                continue;
            }
            let dst = self.ptr(region, p);
            // SAFETY: the page lies in the fake's live mapping; no guest
            // reader touches a page before it is marked present.
            unsafe {
                match data {
                    Some(d) => {
                        std::ptr::copy_nonoverlapping(d[i as usize * PAGE..].as_ptr(), dst, PAGE)
                    }
                    None => std::ptr::write_bytes(dst, 0, PAGE),
                }
            }
            *slot = true;
            self.placed.fetch_add(1, SeqCst);
        }
        self.cv.notify_all();
        Ok(())
    }
}

impl PostcopyRam for FakePostcopy {
    fn discard(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        // SAFETY: the range lies in the fake's live private anonymous
        // mapping; MADV_DONTNEED makes it read as zero.
        let rc = unsafe {
            libc::madvise(
                self.ptr(region, first_page) as *mut libc::c_void,
                npages as usize * PAGE,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(BackendError::new("madvise failed"));
        }
        let mut st = self.st.lock().unwrap();
        for p in first_page..first_page + npages {
            st.present[region][p as usize] = false;
        }
        Ok(())
    }
    fn register(&self) -> BackendResult<()> {
        // Pages never written are missing too (as with userfaultfd): the
        // destination's RAM is anonymous, so residency tells.
        let mut st = self.st.lock().unwrap();
        for (i, &(addr, size)) in self.regions.iter().enumerate() {
            let pages = size as usize / PAGE;
            let mut v = vec![0u8; pages];
            // SAFETY: mincore over the fake's live mapping into a vector of
            // one byte per page.
            let rc =
                unsafe { libc::mincore(addr as *mut libc::c_void, size as usize, v.as_mut_ptr()) };
            if rc != 0 {
                return Err(BackendError::new("mincore failed"));
            }
            for (p, r) in v.iter().enumerate() {
                if r & 1 == 0 {
                    st.present[i][p] = false;
                }
            }
        }
        st.registered = true;
        Ok(())
    }
    fn wait_faults(&self, timeout: Duration, out: &mut Vec<GuestFault>) -> BackendResult<()> {
        let mut st = self.st.lock().unwrap();
        if st.queue.is_empty() {
            st = self.cv.wait_timeout(st, timeout).unwrap().0;
        }
        out.extend(st.queue.drain(..));
        Ok(())
    }
    fn place(
        &self,
        region: usize,
        first_page: u64,
        data: &[u8],
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        let n = (data.len() / PAGE) as u64;
        self.place_with(region, first_page, n, Some(data), present)
    }
    fn place_zero(
        &self,
        region: usize,
        first_page: u64,
        npages: u64,
        present: &mut Vec<u64>,
    ) -> BackendResult<()> {
        self.place_with(region, first_page, npages, None, present)
    }
    fn wake(&self, _region: usize, _first_page: u64, _npages: u64) -> BackendResult<()> {
        self.cv.notify_all();
        Ok(())
    }
    fn unregister(&self) -> BackendResult<()> {
        self.st.lock().unwrap().registered = false;
        self.ended.store(true, SeqCst);
        self.cv.notify_all();
        Ok(())
    }
}
