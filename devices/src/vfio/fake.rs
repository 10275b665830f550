//! Fake kernels for the unit tests: a VFIO PCI device ([`FakePci`]) that
//! answers the PCI ioctls from a model and records every call after
//! checking its argument bytes as the kernel would, a migration device with
//! a DMA log ([`FakeMig`]), and an [`MsiSink`] that records routes.

use std::collections::BTreeSet;
use std::io;
use std::sync::Mutex;

use super::pci_ops::RawPciOps;
use super::pci_uapi::{self as pu, IrqSet};
use super::uapi::{self, get_u32, get_u64, put_u32, put_u64};
use super::RawMigOps;
use crate::pci::{MsiMessage, MsiSink};

/// Region `i` lives at `i << 40` of the device fd (as in vfio-pci).
pub const REGION_SHIFT: u32 = 40;

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

/// One region of the fake device.
pub struct FakeRegion {
    pub flags: u32,
    pub size: u64,
    /// Capability bytes placed right after the 32-byte info (their `next`
    /// offsets count from the start of the info).
    pub caps: Vec<u8>,
    pub data: Mutex<Vec<u8>>,
}

impl FakeRegion {
    pub fn new(flags: u32, size: u64) -> Self {
        FakeRegion {
            flags,
            size,
            caps: Vec::new(),
            data: Mutex::new(vec![0; size.min(1 << 20) as usize]),
        }
    }
    pub fn with_caps(mut self, caps: Vec<u8>) -> Self {
        self.caps = caps;
        self
    }
}

/// A sparse-mmap capability (`next` absolute from the info start).
pub fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
    let mut b = vec![0u8; 16 + 16 * areas.len()];
    b[0..2].copy_from_slice(&pu::REGION_CAP_SPARSE_MMAP.to_ne_bytes());
    b[2..4].copy_from_slice(&1u16.to_ne_bytes());
    put_u32(&mut b, 4, next);
    put_u32(&mut b, 8, areas.len() as u32);
    for (i, (o, s)) in areas.iter().enumerate() {
        put_u64(&mut b, 16 + 16 * i, *o);
        put_u64(&mut b, 24 + 16 * i, *s);
    }
    b
}

/// An MSIX_MAPPABLE capability.
pub fn msix_mappable_cap(next: u32) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b[0..2].copy_from_slice(&pu::REGION_CAP_MSIX_MAPPABLE.to_ne_bytes());
    put_u32(&mut b, 4, next);
    b
}

/// A call the fake kernel saw (arguments already checked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    SetIrqs(IrqSet),
    MapDma {
        argsz: u32,
        flags: u32,
        vaddr: u64,
        iova: u64,
        size: u64,
    },
    UnmapDma {
        argsz: u32,
        flags: u32,
        iova: u64,
        size: u64,
    },
    Mmap {
        offset: u64,
        len: u64,
    },
    Munmap {
        addr: u64,
        len: u64,
    },
    Write {
        region: u32,
        offset: u64,
        data: Vec<u8>,
    },
}

/// The fake VFIO PCI device.
pub struct FakePci {
    /// Regions by index (7 is config space).
    pub regions: Vec<FakeRegion>,
    /// IRQ counts by index (INTx, MSI, MSI-X, ERR, REQ).
    pub irqs: [u32; 5],
    pub calls: Mutex<Vec<Call>>,
    /// Bytes the fake reports unmapped short of the request.
    pub unmap_short: u64,
}

impl FakePci {
    /// A device with `config` as its config space (4 KiB region) and no BARs.
    pub fn new(config: Vec<u8>) -> Self {
        let mut regions: Vec<FakeRegion> = (0..9).map(|_| FakeRegion::new(0, 0)).collect();
        let cfg = FakeRegion::new(pu::REGION_FLAG_READ | pu::REGION_FLAG_WRITE, 4096);
        {
            let mut d = cfg.data.lock().unwrap();
            let n = config.len().min(4096);
            d[..n].copy_from_slice(&config[..n]);
        }
        regions[7] = cfg;
        FakePci {
            regions,
            irqs: [1, 1, 0, 1, 1],
            calls: Mutex::new(Vec::new()),
            unmap_short: 0,
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    pub fn irq_sets(&self) -> Vec<IrqSet> {
        self.calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::SetIrqs(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn locate(&self, offset: u64, len: usize) -> io::Result<(usize, usize)> {
        let index = (offset >> REGION_SHIFT) as usize;
        let off = (offset & ((1 << REGION_SHIFT) - 1)) as usize;
        let r = self.regions.get(index).ok_or_else(einval)?;
        let dlen = r.data.lock().unwrap().len();
        if off + len > dlen {
            return Err(einval());
        }
        Ok((index, off))
    }
}

impl RawPciOps for FakePci {
    fn get_region_info(&self, arg: &mut [u8]) -> io::Result<()> {
        let argsz = get_u32(arg, 0).ok_or_else(einval)? as usize;
        if argsz != arg.len() || argsz < pu::REGION_INFO_SIZE {
            return Err(einval());
        }
        let index = get_u32(arg, 8).ok_or_else(einval)?;
        let r = self.regions.get(index as usize).ok_or_else(einval)?;
        let mut flags = r.flags;
        if !r.caps.is_empty() {
            flags |= pu::REGION_FLAG_CAPS;
        }
        put_u32(arg, 4, flags);
        put_u64(arg, 16, r.size);
        put_u64(arg, 24, (index as u64) << REGION_SHIFT);
        put_u32(arg, 12, 0);
        if !r.caps.is_empty() {
            let need = pu::REGION_INFO_SIZE + r.caps.len();
            if argsz < need {
                put_u32(arg, 0, need as u32);
            } else {
                arg[32..need].copy_from_slice(&r.caps);
                put_u32(arg, 12, 32);
            }
        }
        Ok(())
    }

    fn get_irq_info(&self, arg: &mut [u8]) -> io::Result<()> {
        if arg.len() != pu::IRQ_INFO_SIZE || get_u32(arg, 0) != Some(16) {
            return Err(einval());
        }
        let index = get_u32(arg, 8).ok_or_else(einval)?;
        let count = *self.irqs.get(index as usize).ok_or_else(einval)?;
        put_u32(arg, 4, 0);
        put_u32(arg, 12, count);
        Ok(())
    }

    fn set_irqs(&self, arg: &[u8]) -> io::Result<()> {
        let s = pu::parse_irq_set(arg).ok_or_else(einval)?;
        let max = *self.irqs.get(s.index as usize).ok_or_else(einval)?;
        if s.start + s.count > max {
            return Err(einval());
        }
        self.calls.lock().unwrap().push(Call::SetIrqs(s));
        Ok(())
    }

    fn read_at(&self, data: &mut [u8], offset: u64) -> io::Result<()> {
        let (i, off) = self.locate(offset, data.len())?;
        data.copy_from_slice(&self.regions[i].data.lock().unwrap()[off..off + data.len()]);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let (i, off) = self.locate(offset, data.len())?;
        self.regions[i].data.lock().unwrap()[off..off + data.len()].copy_from_slice(data);
        self.calls.lock().unwrap().push(Call::Write {
            region: i as u32,
            offset: off as u64,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn mmap(&self, offset: u64, len: u64) -> io::Result<u64> {
        if !offset.is_multiple_of(4096) || !len.is_multiple_of(4096) || len == 0 {
            return Err(einval());
        }
        self.calls.lock().unwrap().push(Call::Mmap { offset, len });
        Ok(0x7f00_0000_0000 + offset)
    }

    fn munmap(&self, addr: u64, len: u64) {
        self.calls.lock().unwrap().push(Call::Munmap { addr, len });
    }

    fn map_dma(&self, arg: &[u8]) -> io::Result<()> {
        if arg.len() != pu::DMA_MAP_SIZE || get_u32(arg, 0) != Some(arg.len() as u32) {
            return Err(einval());
        }
        self.calls.lock().unwrap().push(Call::MapDma {
            argsz: get_u32(arg, 0).ok_or_else(einval)?,
            flags: get_u32(arg, 4).ok_or_else(einval)?,
            vaddr: get_u64(arg, 8).ok_or_else(einval)?,
            iova: get_u64(arg, 16).ok_or_else(einval)?,
            size: get_u64(arg, 24).ok_or_else(einval)?,
        });
        Ok(())
    }

    fn unmap_dma(&self, arg: &mut [u8]) -> io::Result<()> {
        if arg.len() != pu::DMA_UNMAP_SIZE || get_u32(arg, 0) != Some(arg.len() as u32) {
            return Err(einval());
        }
        let size = get_u64(arg, 16).ok_or_else(einval)?;
        self.calls.lock().unwrap().push(Call::UnmapDma {
            argsz: get_u32(arg, 0).ok_or_else(einval)?,
            flags: get_u32(arg, 4).ok_or_else(einval)?,
            iova: get_u64(arg, 8).ok_or_else(einval)?,
            size,
        });
        put_u64(arg, 16, size - self.unmap_short.min(size));
        Ok(())
    }

    fn device_feature(&self, _arg: &mut [u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
}

/// The DMA log of [`FakeMig`].
#[derive(Default)]
pub struct DmaModel {
    /// `(page_size, ranges)` while started.
    pub started: Option<(u64, Vec<(u64, u64)>)>,
    /// Addresses the "device" wrote since the last report.
    pub dirty: BTreeSet<u64>,
    /// `(argsz, flags)` of every feature call.
    pub calls: Vec<(u32, u32)>,
    /// Page size the fake picks at START (`None`: the one asked).
    pub pick_page: Option<u64>,
}

/// A migration-capable device (STOP_COPY, RUNNING) with an optional DMA log.
pub struct FakeMig {
    /// `None`: the device cannot log (ENOTTY).
    pub dma: Option<Mutex<DmaModel>>,
}

impl RawMigOps for FakeMig {
    fn migration_flags(&self) -> io::Result<u64> {
        Ok(crate::mig_fsm::FLAG_STOP_COPY)
    }
    fn get_state(&self) -> io::Result<u32> {
        Ok(migration::MigState::Running as u32)
    }
    fn set_state(&self, _state: u32) -> io::Result<Option<std::fs::File>> {
        Ok(None)
    }
    fn data_size(&self) -> io::Result<u64> {
        Ok(0)
    }
    fn precopy_info(&self, _f: &std::fs::File) -> io::Result<(u64, u64)> {
        Err(einval())
    }

    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()> {
        let m = self
            .dma
            .as_ref()
            .ok_or(io::Error::from_raw_os_error(libc::ENOTTY))?;
        let mut m = m.lock().unwrap();
        let argsz = get_u32(arg, 0).ok_or_else(einval)?;
        let flags = get_u32(arg, 4).ok_or_else(einval)?;
        if argsz as usize != arg.len() {
            return Err(einval());
        }
        m.calls.push((argsz, flags));
        let dir = flags & (uapi::FEATURE_GET | uapi::FEATURE_SET);
        let feature = flags & uapi::FEATURE_MASK;
        let allowed = match feature {
            uapi::FEATURE_DMA_LOGGING_START | uapi::FEATURE_DMA_LOGGING_STOP => uapi::FEATURE_SET,
            uapi::FEATURE_DMA_LOGGING_REPORT => uapi::FEATURE_GET,
            _ => return Err(io::Error::from_raw_os_error(libc::ENOTTY)),
        };
        if dir & !allowed != 0 {
            return Err(einval());
        }
        if flags & uapi::FEATURE_PROBE != 0 {
            return Ok(());
        }
        if dir == 0 {
            return Err(einval());
        }
        match feature {
            uapi::FEATURE_DMA_LOGGING_START => {
                if arg.len() != 32 || m.started.is_some() {
                    return Err(einval());
                }
                let page = get_u64(arg, 8).ok_or_else(einval)?;
                let n = get_u32(arg, 16).ok_or_else(einval)? as usize;
                let ptr = get_u64(arg, 24).ok_or_else(einval)?;
                if !page.is_power_of_two()
                    || n == 0
                    || n > 256
                    || ptr == 0
                    || !ptr.is_multiple_of(8)
                {
                    return Err(einval());
                }
                if get_u32(arg, 20) != Some(0) {
                    return Err(einval());
                }
                // SAFETY: as the kernel's copy_from_user: the code under test
                // promises `n` ranges of 16 bytes, 8-aligned (checked), live
                // across this call.
                let words = unsafe { std::slice::from_raw_parts(ptr as *const u64, 2 * n) };
                let ranges: Vec<(u64, u64)> = words.chunks(2).map(|c| (c[0], c[1])).collect();
                if ranges
                    .iter()
                    .any(|(i, l)| !i.is_multiple_of(page) || !l.is_multiple_of(page))
                {
                    return Err(einval());
                }
                let chosen = m.pick_page.unwrap_or(page);
                put_u64(arg, 8, chosen);
                m.started = Some((chosen, ranges));
                Ok(())
            }
            uapi::FEATURE_DMA_LOGGING_STOP => {
                if arg.len() != 8 {
                    return Err(einval());
                }
                m.started = None;
                Ok(())
            }
            _ => {
                if arg.len() != 40 || m.started.is_none() {
                    return Err(einval());
                }
                let iova = get_u64(arg, 8).ok_or_else(einval)?;
                let length = get_u64(arg, 16).ok_or_else(einval)?;
                let page = get_u64(arg, 24).ok_or_else(einval)?;
                let ptr = get_u64(arg, 32).ok_or_else(einval)?;
                if !page.is_power_of_two() || length == 0 || ptr == 0 || !ptr.is_multiple_of(8) {
                    return Err(einval());
                }
                let words = length.div_ceil(page).div_ceil(64) as usize;
                // SAFETY: as the kernel's iova_bitmap: the caller promises a
                // bitmap of ceil(length / page) bits at `ptr` (the code
                // under test checks it), live across this call.
                let bm = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u64, words) };
                let hit: Vec<u64> = m.dirty.range(iova..iova + length).copied().collect();
                for a in hit {
                    let bit = (a - iova) / page;
                    bm[(bit / 64) as usize] |= 1 << (bit % 64);
                    m.dirty.remove(&a);
                }
                Ok(())
            }
        }
    }
}

/// An [`MsiSink`] that records routes; vector `v`'s eventfd is `100 + v`.
pub struct TestSink {
    pub n: u16,
    pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
}

impl TestSink {
    pub fn new(n: u16) -> Self {
        TestSink {
            n,
            routes: Mutex::new(Vec::new()),
        }
    }
    /// The last route set for `v`.
    pub fn route(&self, v: u16) -> Option<Option<MsiMessage>> {
        self.routes
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|(x, _)| *x == v)
            .map(|(_, r)| *r)
    }
}

impl MsiSink for TestSink {
    fn count(&self) -> u16 {
        self.n
    }
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> crate::Result<()> {
        self.routes.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn signal(&self, _vector: u16) -> crate::Result<()> {
        Ok(())
    }
    fn eventfd(&self, vector: u16) -> Option<std::os::fd::RawFd> {
        (vector < self.n).then_some(100 + vector as i32)
    }
}

/// Shared handles so tests keep looking at the fakes they hand over.
impl RawPciOps for std::sync::Arc<FakePci> {
    fn get_region_info(&self, arg: &mut [u8]) -> io::Result<()> {
        (**self).get_region_info(arg)
    }
    fn get_irq_info(&self, arg: &mut [u8]) -> io::Result<()> {
        (**self).get_irq_info(arg)
    }
    fn set_irqs(&self, arg: &[u8]) -> io::Result<()> {
        (**self).set_irqs(arg)
    }
    fn read_at(&self, data: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(data, offset)
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(data, offset)
    }
    fn mmap(&self, offset: u64, len: u64) -> io::Result<u64> {
        (**self).mmap(offset, len)
    }
    fn munmap(&self, addr: u64, len: u64) {
        (**self).munmap(addr, len)
    }
    fn map_dma(&self, arg: &[u8]) -> io::Result<()> {
        (**self).map_dma(arg)
    }
    fn unmap_dma(&self, arg: &mut [u8]) -> io::Result<()> {
        (**self).unmap_dma(arg)
    }
    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()> {
        (**self).device_feature(arg)
    }
}

impl RawMigOps for std::sync::Arc<FakeMig> {
    fn migration_flags(&self) -> io::Result<u64> {
        (**self).migration_flags()
    }
    fn get_state(&self) -> io::Result<u32> {
        (**self).get_state()
    }
    fn set_state(&self, state: u32) -> io::Result<Option<std::fs::File>> {
        (**self).set_state(state)
    }
    fn data_size(&self) -> io::Result<u64> {
        (**self).data_size()
    }
    fn precopy_info(&self, f: &std::fs::File) -> io::Result<(u64, u64)> {
        (**self).precopy_info(f)
    }
    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()> {
        (**self).device_feature(arg)
    }
}
