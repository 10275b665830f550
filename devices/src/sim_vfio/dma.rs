//! The IOMMU side of the simulated device: the DMA mappings the VMM made
//! ([`DmaMap`], a [`DmaTarget`]) and the only code of the device that
//! touches guest memory.
//!
//! Guest memory is never turned into a Rust reference (`&[u8]`): the guest
//! and other threads write it concurrently. Every access is a volatile load
//! or store through a raw pointer computed from a mapping, while the
//! mapping table's read lock is held, so a concurrent
//! [`DmaTarget::dma_unmap`] waits for the access to finish (the memory then
//! stays mapped for the whole access, as the `dma_map` contract promises).

use std::sync::{RwLock, RwLockReadGuard};

use crate::error::{Error, Result};
use crate::pci::DmaTarget;

/// Most mappings a device accepts (a VM has a handful of RAM regions).
pub const MAX_MAPPINGS: usize = 64;

/// One IOMMU mapping: `[iova, iova + size)` is host memory at `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    iova: u64,
    size: u64,
    host: u64,
}

/// The DMA mappings of one device (identity IOVA: `iova` is the
/// guest-physical address).
///
/// Invariants: mappings are non-empty, do not overlap, do not wrap the
/// address space (neither side), and are sorted by `iova`; each host range
/// is mapped writable memory until its `dma_unmap` returns (the caller's
/// promise in [`DmaTarget::dma_map`]); an access holds the read lock for
/// its whole duration.
#[derive(Debug)]
pub struct DmaMap {
    id: String,
    maps: RwLock<Vec<Mapping>>,
}

/// A DMA access that no mapping covers: the first guest-physical address
/// that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DmaFault(pub u64);

impl DmaMap {
    /// No mappings, for device `id` (named in errors).
    pub fn new(id: &str) -> Self {
        DmaMap {
            id: id.to_string(),
            maps: RwLock::new(Vec::new()),
        }
    }

    fn err(&self, msg: String) -> Error {
        Error::Device {
            id: self.id.clone(),
            msg,
        }
    }

    fn read_maps(&self) -> RwLockReadGuard<'_, Vec<Mapping>> {
        self.maps.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The mapped ranges `(iova, size)`, sorted.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.read_maps().iter().map(|m| (m.iova, m.size)).collect()
    }

    /// Host address of `[gpa, gpa + len)`, which must lie inside one mapping.
    fn host_of(maps: &[Mapping], gpa: u64, len: u64) -> Option<u64> {
        let end = gpa.checked_add(len)?;
        let i = maps.partition_point(|m| m.iova <= gpa).checked_sub(1)?;
        let m = maps[i];
        // m.iova <= gpa; the mapping does not wrap (invariant).
        if end <= m.iova + m.size {
            Some(m.host + (gpa - m.iova))
        } else {
            None
        }
    }

    /// Reads `N` u64 words (little endian) at `gpa` by DMA; `gpa` must be
    /// 8-byte aligned and the `8 * N` bytes inside one mapping.
    pub fn read_u64s<const N: usize>(&self, gpa: u64) -> std::result::Result<[u64; N], DmaFault> {
        if !gpa.is_multiple_of(8) {
            return Err(DmaFault(gpa));
        }
        let maps = self.read_maps();
        let host = Self::host_of(&maps, gpa, 8 * N as u64).ok_or(DmaFault(gpa))?;
        let mut out = [0u64; N];
        for (i, w) in out.iter_mut().enumerate() {
            *w = u64::from_le(load(host + 8 * i as u64));
        }
        Ok(out)
    }

    /// Writes `words` as `(offset, value)` little-endian u64s into the
    /// `span` bytes at `gpa` by DMA: all or nothing, the whole span must lie
    /// inside one mapping and every offset be 8-byte aligned with
    /// `offset + 8 <= span`.
    pub fn write_u64s(
        &self,
        gpa: u64,
        span: u64,
        words: &[(u64, u64)],
    ) -> std::result::Result<(), DmaFault> {
        if !gpa.is_multiple_of(8)
            || words
                .iter()
                .any(|&(o, _)| !o.is_multiple_of(8) || o + 8 > span)
        {
            return Err(DmaFault(gpa));
        }
        let maps = self.read_maps();
        let host = Self::host_of(&maps, gpa, span).ok_or(DmaFault(gpa))?;
        for &(off, v) in words {
            store(host + off, v.to_le());
        }
        Ok(())
    }
}

/// Volatile load of the u64 at host address `addr`.
///
/// Only called by [`DmaMap`] with `addr` inside a mapping whose read lock
/// the caller holds.
fn load(addr: u64) -> u64 {
    let p = addr as usize as *const u64;
    if p.is_aligned() {
        // SAFETY: `addr` lies inside a live mapping (checked by `host_of`
        // under the read lock the caller holds, so it cannot be unmapped
        // meanwhile), which the `dma_map` contract guarantees is mapped
        // memory; the pointer is aligned. Volatile: the guest may write the
        // memory concurrently, and no reference is formed.
        unsafe { p.read_volatile() }
    } else {
        let b = addr as usize as *const u8;
        let mut v = [0u8; 8];
        for (i, x) in v.iter_mut().enumerate() {
            // SAFETY: as above, byte by byte for an unaligned host address
            // (all 8 bytes lie in the mapping).
            *x = unsafe { b.add(i).read_volatile() };
        }
        u64::from_ne_bytes(v)
    }
}

/// Volatile store of the u64 `v` at host address `addr` (see [`load`]).
fn store(addr: u64, v: u64) {
    let p = addr as usize as *mut u64;
    if p.is_aligned() {
        // SAFETY: `addr` lies inside a live mapping of writable memory
        // (checked under the read lock the caller holds; `dma_map`
        // contract); aligned; volatile, no reference formed.
        unsafe { p.write_volatile(v) }
    } else {
        let b = addr as usize as *mut u8;
        for (i, x) in v.to_ne_bytes().iter().enumerate() {
            // SAFETY: as above, byte by byte for an unaligned host address.
            unsafe { b.add(i).write_volatile(*x) };
        }
    }
}

impl DmaTarget for DmaMap {
    /// Adds a mapping. Refuses empty, wrapping or overlapping ranges and
    /// more than [`MAX_MAPPINGS`].
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> Result<()> {
        let bad = |why: &str| self.err(format!("DMA map [{iova:#x}, +{size:#x}): {why}"));
        if size == 0 {
            return Err(bad("empty range"));
        }
        if iova.checked_add(size).is_none() || host_addr.checked_add(size).is_none() {
            return Err(bad("range wraps the address space"));
        }
        if usize::try_from(host_addr + size).is_err() {
            return Err(bad("host range beyond the address space"));
        }
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        if maps.len() >= MAX_MAPPINGS {
            return Err(bad("too many mappings"));
        }
        if maps
            .iter()
            .any(|m| iova < m.iova + m.size && m.iova < iova + size)
        {
            return Err(bad("overlaps an existing mapping"));
        }
        let at = maps.partition_point(|m| m.iova < iova);
        maps.insert(
            at,
            Mapping {
                iova,
                size,
                host: host_addr,
            },
        );
        Ok(())
    }

    /// Removes exactly a mapping made by `dma_map`; waits for DMA accesses
    /// in flight.
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        match maps.iter().position(|m| m.iova == iova && m.size == size) {
            Some(i) => {
                maps.remove(i);
                Ok(())
            }
            None => Err(self.err(format!(
                "DMA unmap [{iova:#x}, +{size:#x}): no such mapping"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_access_unmap() {
        let mut buf = vec![0u64; 1024]; // 8 KiB
        let host = buf.as_mut_ptr() as u64;
        let m = DmaMap::new("t");
        // SAFETY: `buf` outlives `m`'s use and stays allocated.
        unsafe { m.dma_map(0x10_0000, 8192, host).unwrap() };
        // SAFETY: as above.
        unsafe {
            assert!(m.dma_map(0x10_1000, 4096, host).is_err());
            assert!(m.dma_map(0, 0, host).is_err());
            assert!(m.dma_map(u64::MAX - 10, 4096, host).is_err());
        }
        m.write_u64s(0x10_1000, 4096, &[(0, 7), (4088, !7)])
            .unwrap();
        assert_eq!(m.read_u64s::<1>(0x10_1000).unwrap(), [7]);
        assert_eq!(m.read_u64s::<1>(0x10_1ff8).unwrap(), [!7]);
        assert_eq!(m.read_u64s::<1>(0x10_2000), Err(DmaFault(0x10_2000)));
        assert_eq!(m.read_u64s::<2>(0x10_1ff8), Err(DmaFault(0x10_1ff8)));
        assert_eq!(
            m.write_u64s(0x10_1800, 4096, &[(0, 1)]),
            Err(DmaFault(0x10_1800))
        );
        assert!(m.write_u64s(0x10_1000, 4096, &[(4090, 1)]).is_err());
        assert!(m.read_u64s::<1>(0x10_0004).is_err());
        assert_eq!(m.ranges(), vec![(0x10_0000, 8192)]);
        assert!(m.dma_unmap(0x10_0000, 4096).is_err());
        m.dma_unmap(0x10_0000, 8192).unwrap();
        assert!(m.read_u64s::<1>(0x10_1000).is_err());
        assert_eq!(buf[512], 7);
        assert_eq!(buf[1023], !7);
    }
}
