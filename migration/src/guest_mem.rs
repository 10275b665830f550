//! Guest memory as the migration machinery reaches it: the one audited
//! module where host addresses become memory accesses.
//!
//! A VMM describes its RAM with [`RamRegion`]s, which only an `unsafe`
//! constructor can build: its caller promises that the mapping stays valid
//! for as long as the VM object that returned it lives. [`GuestMemory`]
//! keeps that object alive next to the regions, so every access it hands
//! out is inside a live mapping:
//!
//! * [`GuestMemory::page_is_zero`]: the zero-page scan, with volatile reads
//!   only (vCPUs may write the page meanwhile; no Rust reference is ever
//!   made to guest memory);
//! * [`GuestMemory::zero_pages`]: clears pages on the destination;
//! * [`IoVecs`]: scatter/gather lists for `writev` (guest pages and local
//!   buffers, zero-copy) and `readv` (guest pages), built from bounds-checked
//!   ranges and tied by lifetime to the memory they describe.
//!
//! Nothing outside this module does arithmetic on a host address.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::error::MigrationError;
use crate::traits::{DestinationVm, SourceVm, PAGE_SIZE};

/// One contiguous block of guest RAM mapped into this process.
///
/// Invariants (promised to [`RamRegion::new`]): the host mapping of `size`
/// bytes at the region's host address stays mapped, readable and writable
/// for as long as the object whose `ram()` returned the region lives;
/// `gpa` and `size` are multiples of [`PAGE_SIZE`] and `gpa + size` does not
/// overflow; regions of one VM never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    gpa: u64,
    size: u64,
    host_addr: usize,
}

impl RamRegion {
    /// Describes `size` bytes of guest RAM at guest-physical `gpa`, mapped
    /// at host address `host_addr`.
    ///
    /// # Safety
    /// `host_addr..host_addr + size` must be a mapping of this process that
    /// stays mapped, readable and writable for as long as the object whose
    /// [`SourceVm::ram`] or [`DestinationVm::ram`] returns this region lives
    /// (the migration machinery keeps that object alive while it touches the
    /// memory). The guest may write the memory concurrently: the migration
    /// machinery only reads it with volatile loads or through the kernel
    /// (`writev`/`readv`). `gpa` and `size` must be multiples of
    /// [`PAGE_SIZE`], `gpa + size` must not overflow, and the regions of one
    /// VM must not overlap.
    pub unsafe fn new(gpa: u64, size: u64, host_addr: usize) -> RamRegion {
        RamRegion {
            gpa,
            size,
            host_addr,
        }
    }

    /// Guest-physical address of the first byte.
    pub fn gpa(&self) -> u64 {
        self.gpa
    }

    /// Length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of pages in the region.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Whether `[gpa, gpa + len)` lies wholly inside this region (overflow-safe).
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa
            && gpa
                .checked_add(len)
                .is_some_and(|end| end <= self.gpa + self.size)
    }

    /// Host pointer of pages `[first, first + n)`, or `None` when the range
    /// does not lie inside the region.
    fn pages_ptr(&self, first: u64, n: u64) -> Option<(*mut u8, usize)> {
        let end = first.checked_add(n)?;
        if end > self.pages() {
            return None;
        }
        let off = usize::try_from(first * PAGE_SIZE).ok()?;
        let len = usize::try_from(n * PAGE_SIZE).ok()?;
        // `off + len <= size`, and the mapping is `size` bytes long.
        Some(((self.host_addr + off) as *mut u8, len))
    }
}

/// Keeps the object that returned a RAM layout alive.
trait Keep: Send + Sync {}
impl<T: ?Sized + Send + Sync> Keep for Arc<T> {}

/// The guest RAM of one VM together with the VM object that owns it.
///
/// Invariant: `regions` is what `owner.ram()` returned, and `owner` lives
/// as long as this value, so every region's mapping is valid while `self`
/// is (the [`RamRegion::new`] contract).
pub struct GuestMemory {
    regions: Vec<RamRegion>,
    _owner: Box<dyn Keep>,
}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

fn out_of_range(region: usize, first: u64, n: u64) -> MigrationError {
    MigrationError::Internal(format!(
        "pages {first}+{n} of RAM region {region} are outside guest memory"
    ))
}

impl GuestMemory {
    /// The RAM of a source VM (kept alive by the returned value).
    pub fn of_source(vm: &Arc<dyn SourceVm>) -> GuestMemory {
        GuestMemory {
            regions: vm.ram(),
            _owner: Box::new(vm.clone()),
        }
    }

    /// The RAM of a destination VM (kept alive by the returned value).
    pub fn of_destination(vm: &Arc<dyn DestinationVm>) -> GuestMemory {
        GuestMemory {
            regions: vm.ram(),
            _owner: Box::new(vm.clone()),
        }
    }

    /// The regions, sorted by guest-physical address.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// The layout as `(gpa, size)` pairs (what SETUP carries).
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.gpa, r.size)).collect()
    }

    fn ptr(&self, region: usize, first: u64, n: u64) -> Result<(*mut u8, usize), MigrationError> {
        self.regions
            .get(region)
            .and_then(|r| r.pages_ptr(first, n))
            .ok_or_else(|| out_of_range(region, first, n))
    }

    /// Whether page `page` of `region` is all zeroes, read with volatile
    /// loads. The guest may write the page meanwhile; a torn answer is
    /// harmless because such a write also marks the page dirty and the page
    /// is sent again in the next pass.
    pub fn page_is_zero(&self, region: usize, page: u64) -> Result<bool, MigrationError> {
        let (p, _) = self.ptr(region, page, 1)?;
        // SAFETY: `p` points to PAGE_SIZE bytes inside a mapping that stays
        // valid while `self` lives (GuestMemory invariant).
        Ok(unsafe { volatile_zero(p) })
    }

    /// Writes zeroes over pages `[first, first + n)` of `region`.
    pub fn zero_pages(&self, region: usize, first: u64, n: u64) -> Result<(), MigrationError> {
        let (p, len) = self.ptr(region, first, n)?;
        // SAFETY: `[p, p + len)` lies inside a writable mapping that stays
        // valid while `self` lives; only raw pointers touch it (no Rust
        // reference to guest memory exists).
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Ok(())
    }
}

/// Whether the page at `p` reads as zero, with volatile loads only.
///
/// # Safety
/// `p` must point to [`PAGE_SIZE`] readable bytes.
unsafe fn volatile_zero(p: *const u8) -> bool {
    #[cfg(target_arch = "x86_64")]
    if (p as usize).is_multiple_of(16) {
        // SAFETY: forwarded; alignment checked.
        return unsafe { volatile_zero_sse2(p) };
    }
    if (p as usize).is_multiple_of(8) {
        let w = p as *const u64;
        // Blocks of 64 words (512 bytes): exits early on data.
        for blk in 0..(PAGE_SIZE as usize / 8 / 64) {
            let mut acc = 0u64;
            for i in 0..64 {
                // SAFETY: aligned, inside the page.
                acc |= unsafe { std::ptr::read_volatile(w.add(blk * 64 + i)) };
            }
            if acc != 0 {
                return false;
            }
        }
        return true;
    }
    // SAFETY: each byte is inside the page.
    (0..PAGE_SIZE as usize).all(|i| unsafe { std::ptr::read_volatile(p.add(i)) } == 0)
}

/// [`volatile_zero`] with 16-byte volatile loads (SSE2 is part of the
/// x86_64 baseline), as fast as the vectorized non-volatile scan.
///
/// # Safety
/// `p` must be 16-byte aligned and point to [`PAGE_SIZE`] readable bytes.
#[cfg(target_arch = "x86_64")]
unsafe fn volatile_zero_sse2(p: *const u8) -> bool {
    use std::arch::x86_64::_mm_setzero_si128;
    use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_movemask_epi8, _mm_or_si128};
    let w = p as *const __m128i;
    // SAFETY: SSE2 intrinsics are always available on x86_64; every load is
    // aligned and inside the page.
    unsafe {
        for blk in 0..(PAGE_SIZE as usize / 16 / 32) {
            let mut acc = _mm_setzero_si128();
            for i in 0..32 {
                acc = _mm_or_si128(acc, std::ptr::read_volatile(w.add(blk * 32 + i)));
            }
            if _mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) != 0xffff {
                return false;
            }
        }
    }
    true
}

/// Direction marker of [`IoVecs`]: gathered and written (`writev`).
#[derive(Debug)]
pub enum Gather {}
/// Direction marker of [`IoVecs`]: read and scattered (`readv`).
#[derive(Debug)]
pub enum Scatter {}

/// A scatter/gather list whose entries all describe memory that lives for
/// `'a`: local buffers borrowed for `'a`, or guest pages of a
/// [`GuestMemory`] borrowed for `'a`.
///
/// Invariant: every entry from `start` on describes memory valid for `'a`,
/// readable for [`Gather`] lists and writable for [`Scatter`] lists (a
/// scatter list holds guest pages, or local buffers borrowed mutably for
/// `'a` that nothing else reads meanwhile); no entry is empty.
pub struct IoVecs<'a, D> {
    iovs: Vec<libc::iovec>,
    start: usize,
    _life: PhantomData<(&'a [u8], D)>,
}

// SAFETY: the entries describe memory borrowed for 'a (shared slices or
// guest memory, which is shared between threads by design); moving the list
// to another thread moves no ownership.
unsafe impl<D> Send for IoVecs<'_, D> {}

impl<D> IoVecs<'_, D> {
    /// An empty list reusing `storage`'s allocation (see
    /// [`IoVecs::into_storage`]).
    pub fn with_storage(mut storage: Vec<libc::iovec>) -> Self {
        storage.clear();
        IoVecs {
            iovs: storage,
            start: 0,
            _life: PhantomData,
        }
    }

    /// Gives the allocation back for the next list.
    pub fn into_storage(self) -> Vec<libc::iovec> {
        self.iovs
    }

    fn push_raw(&mut self, p: *mut u8, len: usize) {
        if len > 0 {
            self.iovs.push(libc::iovec {
                iov_base: p as *mut libc::c_void,
                iov_len: len,
            });
        }
    }

    fn push_pages(
        &mut self,
        mem: &GuestMemory,
        region: usize,
        first: u64,
        n: u64,
    ) -> Result<(), MigrationError> {
        let (p, len) = mem.ptr(region, first, n)?;
        self.push_raw(p, len);
        Ok(())
    }

    /// Whether every byte was moved.
    pub fn is_empty(&self) -> bool {
        self.start >= self.iovs.len()
    }

    /// The entries not yet moved, at most `max` of them, for one
    /// `writev`/`readv` call (pointer and count).
    pub fn pending(&self, max: usize) -> (*const libc::iovec, i32) {
        let rest = &self.iovs[self.start.min(self.iovs.len())..];
        (
            rest.as_ptr(),
            rest.len().min(max).min(i32::MAX as usize) as i32,
        )
    }

    /// Copies the entries not yet moved into `out` (cleared first), at
    /// most `max` entries and `max_bytes` bytes (the last entry trimmed),
    /// for one `sendmsg` whose size must stay bounded (zero-copy: the
    /// kernel charges locked memory by the size asked). Returns the bytes
    /// `out` describes.
    pub fn pending_capped(
        &self,
        max: usize,
        max_bytes: usize,
        out: &mut Vec<libc::iovec>,
    ) -> usize {
        out.clear();
        let mut total = 0;
        for v in self.iovs[self.start.min(self.iovs.len())..]
            .iter()
            .take(max)
        {
            if total == max_bytes {
                break;
            }
            let n = v.iov_len.min(max_bytes - total);
            out.push(libc::iovec {
                iov_base: v.iov_base,
                iov_len: n,
            });
            total += n;
        }
        total
    }

    /// Drops `n` moved bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        while n > 0 && self.start < self.iovs.len() {
            let v = &mut self.iovs[self.start];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.start += 1;
            } else {
                // SAFETY: `n < iov_len`: the new base stays inside the
                // buffer the entry describes.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

impl<'a> IoVecs<'a, Gather> {
    /// Appends up to `max` of the next pending bytes to `dst` and advances
    /// past them; returns how many were appended. Used where the bytes must
    /// pass through a transform (TLS) instead of `writev`.
    pub fn append_to(&mut self, dst: &mut Vec<u8>, max: usize) -> usize {
        dst.reserve(max);
        let base = dst.len();
        let mut done = 0;
        for v in &self.iovs[self.start..] {
            if done == max {
                break;
            }
            let n = v.iov_len.min(max - done);
            // SAFETY: the source entry describes `iov_len` readable bytes
            // valid for the list's lifetime (IoVecs invariant) and
            // `n <= iov_len`; the destination is `dst`'s spare capacity,
            // which `reserve(max)` made at least `max >= done + n` bytes
            // long past `base`. The regions cannot overlap (one is owned
            // by `dst`). Guest memory may change under the copy (the
            // guest runs): a byte copy with no reference into it is what
            // the volatile contract allows.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base as *const u8,
                    dst.as_mut_ptr().add(base + done),
                    n,
                )
            };
            done += n;
        }
        // SAFETY: the `done` bytes past `base` were just initialized above,
        // inside the reserved capacity.
        unsafe { dst.set_len(base + done) };
        self.advance(done);
        done
    }
}

impl<'a> IoVecs<'a, Gather> {
    /// Appends a local buffer (nothing if empty).
    pub fn push_bytes(&mut self, b: &'a [u8]) {
        self.push_raw(b.as_ptr() as *mut u8, b.len());
    }

    /// Appends guest pages `[first, first + n)` of `region` (bounds-checked).
    pub fn push_guest(
        &mut self,
        mem: &'a GuestMemory,
        region: usize,
        first: u64,
        n: u64,
    ) -> Result<(), MigrationError> {
        self.push_pages(mem, region, first, n)
    }
}

impl<'a> IoVecs<'a, Scatter> {
    /// Copies `src` into the next pending bytes (as far as the list
    /// reaches) and advances past them; returns how many were copied.
    pub fn copy_in(&mut self, src: &[u8]) -> usize {
        let mut done = 0;
        for v in &self.iovs[self.start..] {
            if done == src.len() {
                break;
            }
            let n = v.iov_len.min(src.len() - done);
            // SAFETY: by the IoVecs invariant a scatter entry describes
            // `iov_len` writable bytes valid for the list's lifetime that no
            // Rust reference aliases; `n <= iov_len` and `src[done..done + n]`
            // is in bounds.
            unsafe {
                std::ptr::copy_nonoverlapping(src[done..].as_ptr(), v.iov_base as *mut u8, n)
            };
            done += n;
        }
        self.advance(done);
        done
    }

    /// Appends a local buffer to be read into (data the receiver throws
    /// away).
    pub fn push_sink(&mut self, b: &'a mut [u8]) {
        self.push_raw(b.as_mut_ptr(), b.len());
    }

    /// Appends guest pages `[first, first + n)` of `region` (bounds-checked)
    /// to be read into.
    pub fn push_guest_mut(
        &mut self,
        mem: &'a GuestMemory,
        region: usize,
        first: u64,
        n: u64,
    ) -> Result<(), MigrationError> {
        self.push_pages(mem, region, first, n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment path of the zero scan (16-byte, 8-byte, bytes) sees
    /// a single set byte at any offset.
    #[test]
    fn volatile_zero_on_every_alignment() {
        let page = PAGE_SIZE as usize;
        let mut buf = vec![0u64; (page + 64) / 8];
        let base = buf.as_mut_ptr() as *mut u8;
        for shift in [0usize, 1, 8, 16] {
            for off in [0usize, 1, 15, 512, page - 1] {
                // SAFETY: `shift + page <= buf` bytes; only raw pointers.
                unsafe {
                    let p = base.add(shift);
                    assert!(volatile_zero(p), "shift {shift}");
                    p.add(off).write(0x80);
                    assert!(!volatile_zero(p), "shift {shift} off {off}");
                    p.add(off).write(0);
                }
            }
        }
        drop(buf);
    }
}
