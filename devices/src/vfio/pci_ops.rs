//! The raw operations of a VFIO PCI function ([`RawPciOps`]), byte-exact
//! uAPI arguments in and out, and their implementation over a real device
//! and container fd ([`KernelPciOps`]). Unit tests substitute a fake kernel
//! that checks the same bytes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vfio_ioctls::{VfioContainer, VfioDevice};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_ptr};

use super::pci_uapi::{
    self as pu, IrqInfo, RegionInfo, RegionInfoReply, VFIO_DEVICE_GET_IRQ_INFO,
    VFIO_DEVICE_GET_REGION_INFO, VFIO_DEVICE_SET_IRQS, VFIO_IOMMU_MAP_DMA, VFIO_IOMMU_UNMAP_DMA,
};
use super::uapi;

/// The ioctls and fd operations a VFIO PCI function needs. Every buffer is
/// the exact uAPI argument (its `argsz` equals its length).
///
/// Invariant (implementations): no call keeps a reference to a buffer
/// after it returns.
pub trait RawPciOps: Send + Sync {
    /// `VFIO_DEVICE_GET_REGION_INFO` on the device fd.
    fn get_region_info(&self, arg: &mut [u8]) -> io::Result<()>;
    /// `VFIO_DEVICE_GET_IRQ_INFO` on the device fd.
    fn get_irq_info(&self, arg: &mut [u8]) -> io::Result<()>;
    /// `VFIO_DEVICE_SET_IRQS` on the device fd.
    fn set_irqs(&self, arg: &[u8]) -> io::Result<()>;
    /// `pread` of the device fd at `offset` (region offset + offset in it).
    fn read_at(&self, data: &mut [u8], offset: u64) -> io::Result<()>;
    /// `pwrite` of the device fd at `offset`.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// `mmap(MAP_SHARED, PROT_READ|PROT_WRITE)` of `len` bytes of the device
    /// fd at `offset`; returns the host address.
    fn mmap(&self, offset: u64, len: u64) -> io::Result<u64>;
    /// Unmaps what [`RawPciOps::mmap`] returned.
    fn munmap(&self, addr: u64, len: u64);
    /// `VFIO_IOMMU_MAP_DMA` on the container fd.
    fn map_dma(&self, arg: &[u8]) -> io::Result<()>;
    /// `VFIO_IOMMU_UNMAP_DMA` on the container fd (size written back).
    fn unmap_dma(&self, arg: &mut [u8]) -> io::Result<()>;
    /// `VFIO_DEVICE_FEATURE` on the device fd.
    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()>;
}

fn einval() -> io::Error {
    io::Error::from_raw_os_error(libc::EINVAL)
}

fn check_argsz(arg: &[u8]) -> io::Result<()> {
    if uapi::get_u32(arg, 0) == Some(arg.len() as u32) {
        Ok(())
    } else {
        Err(einval())
    }
}

/// Region info of `index` through `ops`, capability chain included (the
/// ioctl is re-issued once with the size the kernel asks for).
pub fn region_info(ops: &dyn RawPciOps, index: u32) -> io::Result<RegionInfo> {
    let mut arg = pu::region_info_arg(index, pu::REGION_INFO_SIZE);
    for _ in 0..2 {
        ops.get_region_info(&mut arg)?;
        match pu::parse_region_info(&arg).ok_or_else(einval)? {
            RegionInfoReply::Done(info) => return Ok(info),
            RegionInfoReply::NeedArgsz(n) => arg = pu::region_info_arg(index, n),
        }
    }
    // The kernel asked for more room twice: take the fixed part only.
    let mut arg = pu::region_info_arg(index, pu::REGION_INFO_SIZE);
    ops.get_region_info(&mut arg)?;
    match pu::parse_region_info(&arg) {
        Some(RegionInfoReply::Done(i)) => Ok(i),
        Some(RegionInfoReply::NeedArgsz(_)) => {
            let mut i = RegionInfo {
                index,
                flags: uapi::get_u32(&arg, 4).unwrap_or(0) & !pu::REGION_FLAG_CAPS,
                size: uapi::get_u64(&arg, 16).unwrap_or(0),
                offset: uapi::get_u64(&arg, 24).unwrap_or(0),
                ..Default::default()
            };
            i.flags &= !pu::REGION_FLAG_MMAP;
            Ok(i)
        }
        None => Err(einval()),
    }
}

/// IRQ info of `index` through `ops`.
pub fn irq_info(ops: &dyn RawPciOps, index: u32) -> io::Result<IrqInfo> {
    let mut arg = pu::irq_info_arg(index);
    ops.get_irq_info(&mut arg)?;
    pu::parse_irq_info(&arg).ok_or_else(einval)
}

/// [`RawPciOps`] over a `vfio-ioctls` device and its container.
///
/// Invariant: both stay open for this value's life (held by `Arc`).
pub struct KernelPciOps {
    device: Arc<VfioDevice>,
    container: Arc<VfioContainer>,
}

impl KernelPciOps {
    /// Ops on `device`, DMA mappings in `container`.
    pub fn new(device: Arc<VfioDevice>, container: Arc<VfioContainer>) -> Self {
        KernelPciOps { device, container }
    }

    fn dev_fd(&self) -> RawFd {
        self.device.as_raw_fd()
    }
}

struct Fd(RawFd);
impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

fn ret(r: i32) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RawPciOps for KernelPciOps {
    fn get_region_info(&self, arg: &mut [u8]) -> io::Result<()> {
        check_argsz(arg)?;
        // SAFETY: `arg` is an exclusively borrowed buffer of `argsz` bytes
        // (checked); the kernel writes at most `argsz` bytes into it.
        ret(unsafe {
            ioctl_with_mut_ptr(
                &Fd(self.dev_fd()),
                VFIO_DEVICE_GET_REGION_INFO(),
                arg.as_mut_ptr(),
            )
        })
    }

    fn get_irq_info(&self, arg: &mut [u8]) -> io::Result<()> {
        check_argsz(arg)?;
        if arg.len() != pu::IRQ_INFO_SIZE {
            return Err(einval());
        }
        // SAFETY: `arg` is an exclusively borrowed 16-byte vfio_irq_info.
        ret(unsafe {
            ioctl_with_mut_ptr(
                &Fd(self.dev_fd()),
                VFIO_DEVICE_GET_IRQ_INFO(),
                arg.as_mut_ptr(),
            )
        })
    }

    fn set_irqs(&self, arg: &[u8]) -> io::Result<()> {
        pu::parse_irq_set(arg).ok_or_else(einval)?;
        // SAFETY: `arg` is a complete vfio_irq_set of `argsz` bytes (checked
        // by the parse above); the kernel only reads it.
        ret(unsafe { ioctl_with_ptr(&Fd(self.dev_fd()), VFIO_DEVICE_SET_IRQS(), arg.as_ptr()) })
    }

    fn read_at(&self, data: &mut [u8], offset: u64) -> io::Result<()> {
        self.file().read_exact_at(data, offset)
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file().write_all_at(data, offset)
    }

    fn mmap(&self, offset: u64, len: u64) -> io::Result<u64> {
        let len_us = usize::try_from(len).map_err(|_| einval())?;
        let off = libc::off_t::try_from(offset).map_err(|_| einval())?;
        // SAFETY: a fresh shared mapping chosen by the kernel (no fixed
        // address), so no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_us,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.dev_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            Err(io::Error::last_os_error())
        } else {
            Ok(p as u64)
        }
    }

    fn munmap(&self, addr: u64, len: u64) {
        // SAFETY: `addr`/`len` are a mapping this type returned from mmap and
        // its owner stops using it before calling this.
        unsafe {
            libc::munmap(addr as *mut libc::c_void, len as usize);
        }
    }

    fn map_dma(&self, arg: &[u8]) -> io::Result<()> {
        check_argsz(arg)?;
        if arg.len() != pu::DMA_MAP_SIZE {
            return Err(einval());
        }
        // SAFETY: `arg` is a complete 32-byte vfio_iommu_type1_dma_map; the
        // memory it names is the caller's responsibility (DmaTarget::dma_map).
        ret(unsafe {
            ioctl_with_ptr(
                &Fd(self.container.as_raw_fd()),
                VFIO_IOMMU_MAP_DMA(),
                arg.as_ptr(),
            )
        })
    }

    fn unmap_dma(&self, arg: &mut [u8]) -> io::Result<()> {
        check_argsz(arg)?;
        if arg.len() != pu::DMA_UNMAP_SIZE {
            return Err(einval());
        }
        // SAFETY: `arg` is an exclusively borrowed 24-byte
        // vfio_iommu_type1_dma_unmap; the kernel writes the size back.
        ret(unsafe {
            ioctl_with_mut_ptr(
                &Fd(self.container.as_raw_fd()),
                VFIO_IOMMU_UNMAP_DMA(),
                arg.as_mut_ptr(),
            )
        })
    }

    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()> {
        uapi::device_feature_bytes(&Fd(self.dev_fd()), arg)
    }
}

impl KernelPciOps {
    /// The device fd as a `File` view (not owned: never closed by it).
    fn file(&self) -> std::mem::ManuallyDrop<std::fs::File> {
        use std::os::fd::FromRawFd;
        // SAFETY: the fd stays open while `self.device` lives; ManuallyDrop
        // keeps the view from closing it.
        std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(self.dev_fd()) })
    }
}
