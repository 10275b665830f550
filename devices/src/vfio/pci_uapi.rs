//! VFIO PCI uAPI argument layouts (include/uapi/linux/vfio.h): region
//! info with its capability chain, IRQ info and SET_IRQS, and the type1
//! IOMMU DMA map/unmap of the container.
//!
//! Arguments are built and parsed as byte buffers at the header's offsets
//! (asserted against `vfio-bindings` in the tests), so the fake ioctls of
//! the unit tests see exactly the bytes the kernel would. Parsing never
//! trusts a length or an offset in the data: everything is bounded.

use std::mem::size_of;

use vfio_bindings::bindings::vfio as b;

use super::uapi::{get_u16, get_u32, get_u64, put_u32, put_u64, VFIO_BASE, VFIO_TYPE};

/// `VFIO_PCI_CONFIG_REGION_INDEX`.
pub const CONFIG_REGION_INDEX: u32 = 7;
/// `VFIO_PCI_MSI_IRQ_INDEX`.
pub const MSI_IRQ_INDEX: u32 = 1;
/// `VFIO_PCI_MSIX_IRQ_INDEX`.
pub const MSIX_IRQ_INDEX: u32 = 2;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_FLAG_READ: u32 = 1;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_FLAG_WRITE: u32 = 2;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const REGION_FLAG_MMAP: u32 = 4;
/// `VFIO_REGION_INFO_FLAG_CAPS`.
pub const REGION_FLAG_CAPS: u32 = 8;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_CAP_SPARSE_MMAP: u16 = 1;
/// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`.
pub const REGION_CAP_MSIX_MAPPABLE: u16 = 3;

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_SET_DATA_EVENTFD: u32 = 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 32;

/// `VFIO_DMA_MAP_FLAG_READ`.
pub const DMA_MAP_FLAG_READ: u32 = 1;
/// `VFIO_DMA_MAP_FLAG_WRITE`.
pub const DMA_MAP_FLAG_WRITE: u32 = 2;

/// `sizeof(struct vfio_region_info)`.
pub const REGION_INFO_SIZE: usize = 32;
/// `sizeof(struct vfio_irq_info)`.
pub const IRQ_INFO_SIZE: usize = 16;
/// `sizeof(struct vfio_irq_set)` without `data[]`.
pub const IRQ_SET_SIZE: usize = 20;
/// `sizeof(struct vfio_iommu_type1_dma_map)`.
pub const DMA_MAP_SIZE: usize = 32;
/// `sizeof(struct vfio_iommu_type1_dma_unmap)` without `data[]`.
pub const DMA_UNMAP_SIZE: usize = 24;
/// Largest region info (with capabilities) accepted from the kernel.
pub const MAX_REGION_INFO: usize = 64 * 1024;
/// Most capabilities walked in one region info chain.
pub const MAX_REGION_CAPS: usize = 64;
/// Most vectors in one SET_IRQS (MSI-X tables hold at most 2048).
pub const MAX_IRQ_VECTORS: usize = 2048;

#[allow(missing_docs)]
mod nr {
    use super::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE, VFIO_BASE + 8);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_IRQ_INFO, VFIO_TYPE, VFIO_BASE + 9);
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE, VFIO_BASE + 10);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE, VFIO_BASE + 13);
    vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE, VFIO_BASE + 14);
}
/// `VFIO_DEVICE_GET_REGION_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 8)` (0x3B6C).
#[allow(non_snake_case)]
pub fn VFIO_DEVICE_GET_REGION_INFO() -> std::os::raw::c_ulong {
    nr::VFIO_DEVICE_GET_REGION_INFO()
}
/// `VFIO_DEVICE_GET_IRQ_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 9)` (0x3B6D).
#[allow(non_snake_case)]
pub fn VFIO_DEVICE_GET_IRQ_INFO() -> std::os::raw::c_ulong {
    nr::VFIO_DEVICE_GET_IRQ_INFO()
}
/// `VFIO_DEVICE_SET_IRQS` = `_IO(VFIO_TYPE, VFIO_BASE + 10)` (0x3B6E).
#[allow(non_snake_case)]
pub fn VFIO_DEVICE_SET_IRQS() -> std::os::raw::c_ulong {
    nr::VFIO_DEVICE_SET_IRQS()
}
/// `VFIO_IOMMU_MAP_DMA` = `_IO(VFIO_TYPE, VFIO_BASE + 13)` (0x3B71).
#[allow(non_snake_case)]
pub fn VFIO_IOMMU_MAP_DMA() -> std::os::raw::c_ulong {
    nr::VFIO_IOMMU_MAP_DMA()
}
/// `VFIO_IOMMU_UNMAP_DMA` = `_IO(VFIO_TYPE, VFIO_BASE + 14)` (0x3B72).
#[allow(non_snake_case)]
pub fn VFIO_IOMMU_UNMAP_DMA() -> std::os::raw::c_ulong {
    nr::VFIO_IOMMU_UNMAP_DMA()
}

/// One region of a VFIO device as `VFIO_DEVICE_GET_REGION_INFO` describes
/// it, capabilities parsed.
///
/// Invariant: `sparse` (when `Some`) holds only areas inside `[0, size)`;
/// areas the kernel reported out of range were dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist, e.g. an unused BAR).
    pub size: u64,
    /// Offset of the region in the device fd (pread/pwrite/mmap).
    pub offset: u64,
    /// Mmap-able areas `(offset, size)` from `VFIO_REGION_INFO_CAP_SPARSE_MMAP`;
    /// `None` when the capability is absent (then the whole region is
    /// mmap-able if `flags` has MMAP).
    pub sparse: Option<Vec<(u64, u64)>>,
    /// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE` present.
    pub msix_mappable: bool,
}

impl RegionInfo {
    /// Readable region.
    pub fn readable(&self) -> bool {
        self.flags & REGION_FLAG_READ != 0
    }
    /// Writable region.
    pub fn writable(&self) -> bool {
        self.flags & REGION_FLAG_WRITE != 0
    }
    /// The parts of the region that may be mmapped, `(offset, size)`.
    pub fn mmap_areas(&self) -> Vec<(u64, u64)> {
        if self.flags & REGION_FLAG_MMAP == 0 || self.size == 0 {
            return Vec::new();
        }
        match &self.sparse {
            Some(a) => a.clone(),
            None => vec![(0, self.size)],
        }
    }
}

/// A `vfio_region_info` argument for `index` with room for `argsz` bytes
/// (header plus capabilities); `argsz` is clamped to
/// `REGION_INFO_SIZE..=MAX_REGION_INFO`.
pub fn region_info_arg(index: u32, argsz: usize) -> Vec<u8> {
    let len = argsz.clamp(REGION_INFO_SIZE, MAX_REGION_INFO);
    let mut v = vec![0u8; len];
    put_u32(&mut v, 0, len as u32);
    put_u32(&mut v, 8, index);
    v
}

/// What a `VFIO_DEVICE_GET_REGION_INFO` answer asks for next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegionInfoReply {
    /// The info is complete.
    Done(RegionInfo),
    /// The capabilities did not fit: re-issue with this `argsz`.
    NeedArgsz(usize),
}

/// Parses a `VFIO_DEVICE_GET_REGION_INFO` answer held in `buf` (the
/// argument buffer after the ioctl). `None` if `buf` is shorter than the
/// fixed struct.
pub fn parse_region_info(buf: &[u8]) -> Option<RegionInfoReply> {
    let argsz = get_u32(buf, 0)? as usize;
    let flags = get_u32(buf, 4)?;
    let index = get_u32(buf, 8)?;
    let cap_offset = get_u32(buf, 12)? as usize;
    let size = get_u64(buf, 16)?;
    let offset = get_u64(buf, 24)?;
    let mut info = RegionInfo {
        index,
        flags,
        size,
        offset,
        sparse: None,
        msix_mappable: false,
    };
    if flags & REGION_FLAG_CAPS != 0 && argsz > buf.len() {
        if argsz > MAX_REGION_INFO {
            log::warn!("vfio region {index}: capability chain of {argsz} bytes ignored");
            return Some(RegionInfoReply::Done(info));
        }
        return Some(RegionInfoReply::NeedArgsz(argsz));
    }
    if flags & REGION_FLAG_CAPS != 0 {
        parse_region_caps(buf, cap_offset, &mut info);
    }
    Some(RegionInfoReply::Done(info))
}

/// Walks the capability chain starting at `first` (offsets from the start
/// of `buf`; 0 ends it). Loops, offsets inside the fixed struct or past the
/// buffer, and truncated capabilities end the walk.
fn parse_region_caps(buf: &[u8], first: usize, info: &mut RegionInfo) {
    let mut off = first;
    let mut seen = Vec::new();
    while off != 0 {
        if off < REGION_INFO_SIZE || seen.contains(&off) || seen.len() >= MAX_REGION_CAPS {
            log::warn!("vfio region {}: bad capability chain at {off}", info.index);
            return;
        }
        seen.push(off);
        let (Some(id), Some(next)) = (get_u16(buf, off), get_u32(buf, off + 4)) else {
            return;
        };
        match id {
            REGION_CAP_SPARSE_MMAP => {
                // header (8), nr_areas u32, reserved u32, areas[] {u64 offset, u64 size}
                let Some(nr) = get_u32(buf, off + 8) else {
                    return;
                };
                let mut areas = Vec::new();
                for i in 0..nr as usize {
                    let at = off + 16 + i * 16;
                    let (Some(o), Some(s)) = (get_u64(buf, at), get_u64(buf, at + 8)) else {
                        break;
                    };
                    match o.checked_add(s) {
                        Some(end) if s > 0 && end <= info.size => areas.push((o, s)),
                        _ => log::warn!(
                            "vfio region {}: sparse area {o:#x}+{s:#x} out of range",
                            info.index
                        ),
                    }
                }
                info.sparse = Some(areas);
            }
            REGION_CAP_MSIX_MAPPABLE => info.msix_mappable = true,
            _ => {}
        }
        off = next as usize;
    }
}

/// Interrupts of one index (`VFIO_DEVICE_GET_IRQ_INFO`).
///
/// Invariant: raw kernel values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// `VFIO_IRQ_INFO_*` flags.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// Vectors of this index.
    pub count: u32,
}

/// A `vfio_irq_info` argument for `index` (16 bytes).
pub fn irq_info_arg(index: u32) -> Vec<u8> {
    let mut v = vec![0u8; IRQ_INFO_SIZE];
    put_u32(&mut v, 0, IRQ_INFO_SIZE as u32);
    put_u32(&mut v, 8, index);
    v
}

/// Parses a `vfio_irq_info` answer.
pub fn parse_irq_info(buf: &[u8]) -> Option<IrqInfo> {
    Some(IrqInfo {
        flags: get_u32(buf, 4)?,
        index: get_u32(buf, 8)?,
        count: get_u32(buf, 12)?,
    })
}

/// `VFIO_DEVICE_SET_IRQS` with DATA_EVENTFD | ACTION_TRIGGER: vectors
/// `start..start + fds.len()` of `index` signal `fds` (-1: vector off).
/// `argsz` = 20 + 4 * count. `None` when more than [`MAX_IRQ_VECTORS`].
pub fn irq_set_eventfds_arg(index: u32, start: u32, fds: &[i32]) -> Option<Vec<u8>> {
    if fds.len() > MAX_IRQ_VECTORS {
        return None;
    }
    let len = IRQ_SET_SIZE + std::mem::size_of_val(fds);
    let mut v = vec![0u8; len];
    put_u32(&mut v, 0, len as u32);
    put_u32(&mut v, 4, IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER);
    put_u32(&mut v, 8, index);
    put_u32(&mut v, 12, start);
    put_u32(&mut v, 16, fds.len() as u32);
    for (i, fd) in fds.iter().enumerate() {
        put_u32(&mut v, IRQ_SET_SIZE + 4 * i, *fd as u32);
    }
    Some(v)
}

/// `VFIO_DEVICE_SET_IRQS` that disables every vector of `index`:
/// DATA_NONE | ACTION_TRIGGER, start 0, count 0 (20 bytes).
pub fn irq_set_disable_arg(index: u32) -> Vec<u8> {
    let mut v = vec![0u8; IRQ_SET_SIZE];
    put_u32(&mut v, 0, IRQ_SET_SIZE as u32);
    put_u32(&mut v, 4, IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER);
    put_u32(&mut v, 8, index);
    v
}

/// A decoded `vfio_irq_set` (what the fake kernel checks).
///
/// Invariant: raw values; `fds` is filled only for DATA_EVENTFD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IrqSet {
    /// argsz.
    pub argsz: u32,
    /// flags.
    pub flags: u32,
    /// IRQ index.
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Vector count.
    pub count: u32,
    /// Eventfds (DATA_EVENTFD).
    pub fds: Vec<i32>,
}

/// Decodes a `vfio_irq_set` argument; `None` if it is truncated or its
/// `argsz` does not match the data the flags imply.
pub fn parse_irq_set(buf: &[u8]) -> Option<IrqSet> {
    let mut s = IrqSet {
        argsz: get_u32(buf, 0)?,
        flags: get_u32(buf, 4)?,
        index: get_u32(buf, 8)?,
        start: get_u32(buf, 12)?,
        count: get_u32(buf, 16)?,
        fds: Vec::new(),
    };
    if s.argsz as usize != buf.len() {
        return None;
    }
    if s.flags & IRQ_SET_DATA_EVENTFD != 0 {
        if s.count as usize > MAX_IRQ_VECTORS || buf.len() != IRQ_SET_SIZE + 4 * s.count as usize {
            return None;
        }
        s.fds = (0..s.count as usize)
            .map(|i| get_u32(buf, IRQ_SET_SIZE + 4 * i).map(|v| v as i32))
            .collect::<Option<_>>()?;
    } else if buf.len() != IRQ_SET_SIZE {
        return None;
    }
    Some(s)
}

/// `vfio_iommu_type1_dma_map` (32 bytes) mapping `[iova, iova + size)` to
/// `vaddr` for device reads and writes.
pub fn dma_map_arg(iova: u64, size: u64, vaddr: u64) -> Vec<u8> {
    let mut v = vec![0u8; DMA_MAP_SIZE];
    put_u32(&mut v, 0, DMA_MAP_SIZE as u32);
    put_u32(&mut v, 4, DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE);
    put_u64(&mut v, 8, vaddr);
    put_u64(&mut v, 16, iova);
    put_u64(&mut v, 24, size);
    v
}

/// `vfio_iommu_type1_dma_unmap` (24 bytes) of `[iova, iova + size)`; the
/// kernel writes the unmapped size back at offset 16.
pub fn dma_unmap_arg(iova: u64, size: u64) -> Vec<u8> {
    let mut v = vec![0u8; DMA_UNMAP_SIZE];
    put_u32(&mut v, 0, DMA_UNMAP_SIZE as u32);
    put_u64(&mut v, 8, iova);
    put_u64(&mut v, 16, size);
    v
}

/// The size field of a DMA unmap argument (after the ioctl: bytes unmapped).
pub fn dma_unmap_size(buf: &[u8]) -> Option<u64> {
    get_u64(buf, 16)
}

/// Compile-time view of the layouts the encoders above assume.
pub const fn layouts_ok() -> bool {
    size_of::<b::vfio_region_info>() == REGION_INFO_SIZE
        && size_of::<b::vfio_irq_info>() == IRQ_INFO_SIZE
        && size_of::<b::vfio_irq_set>() == IRQ_SET_SIZE
        && size_of::<b::vfio_iommu_type1_dma_map>() == DMA_MAP_SIZE
        && size_of::<b::vfio_iommu_type1_dma_unmap>() == DMA_UNMAP_SIZE
}
const _: () = assert!(layouts_ok());

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn layouts_and_numbers_match_kernel() {
        assert!(layouts_ok());
        assert_eq!(offset_of!(b::vfio_region_info, argsz), 0);
        assert_eq!(offset_of!(b::vfio_region_info, flags), 4);
        assert_eq!(offset_of!(b::vfio_region_info, index), 8);
        assert_eq!(offset_of!(b::vfio_region_info, cap_offset), 12);
        assert_eq!(offset_of!(b::vfio_region_info, size), 16);
        assert_eq!(offset_of!(b::vfio_region_info, offset), 24);
        assert_eq!(size_of::<b::vfio_info_cap_header>(), 8);
        assert_eq!(offset_of!(b::vfio_info_cap_header, next), 4);
        assert_eq!(size_of::<b::vfio_region_info_cap_sparse_mmap>(), 16);
        assert_eq!(offset_of!(b::vfio_region_info_cap_sparse_mmap, nr_areas), 8);
        assert_eq!(offset_of!(b::vfio_region_info_cap_sparse_mmap, areas), 16);
        assert_eq!(size_of::<b::vfio_region_sparse_mmap_area>(), 16);
        assert_eq!(offset_of!(b::vfio_irq_info, count), 12);
        assert_eq!(offset_of!(b::vfio_irq_set, start), 12);
        assert_eq!(offset_of!(b::vfio_irq_set, count), 16);
        assert_eq!(offset_of!(b::vfio_irq_set, data), 20);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_map, vaddr), 8);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_map, iova), 16);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_map, size), 24);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_unmap, iova), 8);
        assert_eq!(offset_of!(b::vfio_iommu_type1_dma_unmap, size), 16);

        assert_eq!(CONFIG_REGION_INDEX, b::VFIO_PCI_CONFIG_REGION_INDEX);
        assert_eq!(MSI_IRQ_INDEX, b::VFIO_PCI_MSI_IRQ_INDEX);
        assert_eq!(MSIX_IRQ_INDEX, b::VFIO_PCI_MSIX_IRQ_INDEX);
        assert_eq!(REGION_FLAG_READ, b::VFIO_REGION_INFO_FLAG_READ);
        assert_eq!(REGION_FLAG_WRITE, b::VFIO_REGION_INFO_FLAG_WRITE);
        assert_eq!(REGION_FLAG_MMAP, b::VFIO_REGION_INFO_FLAG_MMAP);
        assert_eq!(REGION_FLAG_CAPS, b::VFIO_REGION_INFO_FLAG_CAPS);
        assert_eq!(
            REGION_CAP_SPARSE_MMAP as u32,
            b::VFIO_REGION_INFO_CAP_SPARSE_MMAP
        );
        assert_eq!(
            REGION_CAP_MSIX_MAPPABLE as u32,
            b::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE
        );
        assert_eq!(IRQ_SET_DATA_NONE, b::VFIO_IRQ_SET_DATA_NONE);
        assert_eq!(IRQ_SET_DATA_EVENTFD, b::VFIO_IRQ_SET_DATA_EVENTFD);
        assert_eq!(IRQ_SET_ACTION_TRIGGER, b::VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(DMA_MAP_FLAG_READ, b::VFIO_DMA_MAP_FLAG_READ);
        assert_eq!(DMA_MAP_FLAG_WRITE, b::VFIO_DMA_MAP_FLAG_WRITE);
        // _IO(';', 100 + n): no size or direction encoded.
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO(), 0x3B6C);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO(), 0x3B6D);
        assert_eq!(VFIO_DEVICE_SET_IRQS(), 0x3B6E);
        assert_eq!(VFIO_IOMMU_MAP_DMA(), 0x3B71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA(), 0x3B72);
    }

    #[test]
    fn argument_bytes() {
        let m = dma_map_arg(0x1000, 0x2000, 0x7f00_0000_0000);
        assert_eq!(m.len(), 32);
        assert_eq!(get_u32(&m, 0), Some(32));
        assert_eq!(get_u32(&m, 4), Some(3));
        assert_eq!(get_u64(&m, 8), Some(0x7f00_0000_0000));
        assert_eq!(get_u64(&m, 16), Some(0x1000));
        assert_eq!(get_u64(&m, 24), Some(0x2000));
        let u = dma_unmap_arg(0x1000, 0x2000);
        assert_eq!(u.len(), 24);
        assert_eq!((get_u32(&u, 0), get_u32(&u, 4)), (Some(24), Some(0)));
        assert_eq!(
            (get_u64(&u, 8), dma_unmap_size(&u)),
            (Some(0x1000), Some(0x2000))
        );
        let s = irq_set_eventfds_arg(MSIX_IRQ_INDEX, 0, &[7, -1, 9]).unwrap();
        assert_eq!(s.len(), 32);
        let p = parse_irq_set(&s).unwrap();
        assert_eq!(
            (p.argsz, p.flags, p.index, p.start, p.count),
            (32, 0x24, 2, 0, 3)
        );
        assert_eq!(p.fds, vec![7, -1, 9]);
        let d = parse_irq_set(&irq_set_disable_arg(MSI_IRQ_INDEX)).unwrap();
        assert_eq!((d.argsz, d.flags, d.index, d.count), (20, 0x21, 1, 0));
        assert!(irq_set_eventfds_arg(2, 0, &vec![0; MAX_IRQ_VECTORS + 1]).is_none());
        // Inconsistent argsz or truncated data are refused.
        let mut bad = s.clone();
        bad.pop();
        assert!(parse_irq_set(&bad).is_none());
        let mut bad = s.clone();
        put_u32(&mut bad, 16, 4);
        assert!(parse_irq_set(&bad).is_none());
        let r = region_info_arg(3, 0);
        assert_eq!(
            (r.len(), get_u32(&r, 0), get_u32(&r, 8)),
            (32, Some(32), Some(3))
        );
        assert_eq!(region_info_arg(0, usize::MAX).len(), MAX_REGION_INFO);
        assert_eq!(irq_info_arg(2), {
            let mut v = vec![0u8; 16];
            put_u32(&mut v, 0, 16);
            put_u32(&mut v, 8, 2);
            v
        });
    }

    fn info_with_caps(size: u64, caps: &[u8]) -> Vec<u8> {
        let mut b = region_info_arg(0, 32 + caps.len());
        put_u32(
            &mut b,
            4,
            REGION_FLAG_READ | REGION_FLAG_MMAP | REGION_FLAG_CAPS,
        );
        put_u32(&mut b, 12, 32);
        put_u64(&mut b, 16, size);
        b[32..].copy_from_slice(caps);
        b
    }

    fn sparse(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut c = vec![0u8; 16 + 16 * areas.len()];
        c[0..2].copy_from_slice(&REGION_CAP_SPARSE_MMAP.to_ne_bytes());
        put_u32(&mut c, 4, next);
        put_u32(&mut c, 8, areas.len() as u32);
        for (i, (o, s)) in areas.iter().enumerate() {
            put_u64(&mut c, 16 + 16 * i, *o);
            put_u64(&mut c, 24 + 16 * i, *s);
        }
        c
    }

    fn done(b: &[u8]) -> RegionInfo {
        match parse_region_info(b) {
            Some(RegionInfoReply::Done(i)) => i,
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn sparse_mmap_capability_parsing() {
        let i = done(&info_with_caps(
            0x4000,
            &sparse(0, &[(0, 0x1000), (0x3000, 0x1000)]),
        ));
        assert_eq!(i.sparse, Some(vec![(0, 0x1000), (0x3000, 0x1000)]));
        assert_eq!(i.mmap_areas(), vec![(0, 0x1000), (0x3000, 0x1000)]);
        // Areas out of range, zero-sized or overflowing are dropped.
        let i = done(&info_with_caps(
            0x4000,
            &sparse(
                0,
                &[(0x3000, 0x2000), (0, 0), (u64::MAX, 2), (0x1000, 0x1000)],
            ),
        ));
        assert_eq!(i.sparse, Some(vec![(0x1000, 0x1000)]));
        // nr_areas larger than the buffer: what fits is read.
        let mut c = sparse(0, &[(0, 0x1000)]);
        put_u32(&mut c, 8, 1_000_000);
        assert_eq!(
            done(&info_with_caps(0x4000, &c)).sparse,
            Some(vec![(0, 0x1000)])
        );
        // A loop, a pointer into the fixed struct, past the end.
        for next in [32u32, 8, 4096, u32::MAX] {
            let i = done(&info_with_caps(0x4000, &sparse(next, &[(0, 0x1000)])));
            assert_eq!(i.sparse, Some(vec![(0, 0x1000)]), "{next}");
        }
        // No caps, but MMAP: the whole region.
        let mut b = region_info_arg(1, 32);
        put_u32(&mut b, 4, REGION_FLAG_MMAP);
        put_u64(&mut b, 16, 0x2000);
        assert_eq!(done(&b).mmap_areas(), vec![(0, 0x2000)]);
        // The kernel asks for more room.
        let mut b = region_info_arg(1, 32);
        put_u32(&mut b, 0, 80);
        put_u32(&mut b, 4, REGION_FLAG_CAPS);
        assert_eq!(parse_region_info(&b), Some(RegionInfoReply::NeedArgsz(80)));
        put_u32(&mut b, 0, u32::MAX);
        assert!(matches!(
            parse_region_info(&b),
            Some(RegionInfoReply::Done(_))
        ));
        assert_eq!(parse_region_info(&b[..31]), None);
    }
}
