//! Kernel and initramfs loading.
//!
//! Two image formats are accepted: an ELF `vmlinux` carrying a PVH entry
//! note (booted with [`BootProtocol::Pvh`]) and a bzImage with the 64-bit
//! entry point (booted with [`BootProtocol::Linux64`]). The copying itself
//! is done by linux-loader; this module validates the images first so that
//! nothing lands below [`HIMEM_START`] or inside the 32-bit MMIO gap.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;

use linux_loader::loader::bootparam::{boot_params, setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{HIMEM_START, MAX_ELF_PHDRS, MEM_32BIT_GAP_START, ZERO_PAGE_START};
use crate::{BootProtocol, Error, Result};

/// `"HdrS"`: magic of the bzImage setup header.
pub(crate) const HDRS_MAGIC: u32 = 0x5372_6448;
/// Offset of the setup header in a bzImage and in `boot_params`.
pub(crate) const SETUP_HEADER_OFFSET: u64 = 0x1F1;
/// Offset of the 64-bit entry point from the protected-mode kernel start.
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Oldest boot protocol with `xloadflags` (and thus a declared 64-bit entry).
pub const MIN_BOOT_PROTOCOL: u16 = 0x020C;
/// `initrd_addr_max` assumed by protocols older than 2.03.
const DEFAULT_INITRD_ADDR_MAX: u32 = 0x37FF_FFFF;
const PAGE_SIZE: u64 = 4096;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const ELF64_EHDR_SIZE: usize = 64;
const ELF64_PHDR_SIZE: usize = 56;

/// Where and how the loaded kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLoad {
    /// Address of the first instruction, already adjusted for the protocol
    /// (PVH note address, or bzImage load address + 0x200): pass it
    /// unchanged to [`crate::regs::setup_regs`].
    pub entry: GuestAddress,
    /// Boot protocol implied by the image format.
    pub protocol: BootProtocol,
    /// First address past everything the kernel occupies before it runs,
    /// including `.bss` (ELF) or the in-place decompression area
    /// `init_size` (bzImage); the initramfs must start at or above it.
    pub kernel_end: GuestAddress,
}

/// Where the initramfs was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdInfo {
    /// Page-aligned guest-physical start, below the 32-bit gap.
    pub addr: GuestAddress,
    /// Size in bytes (non-zero).
    pub size: usize,
}

/// Reads `buf.len()` bytes at `off`; `Ok(false)` if the file is too short.
fn read_at(file: &File, off: u64, buf: &mut [u8]) -> io::Result<bool> {
    match file.read_exact_at(buf, off) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// First address past low RAM (the region holding `HIMEM_START`, capped at
/// the 32-bit gap).
fn low_ram_limit<M: GuestMemoryBackend>(mem: &M) -> Result<u64> {
    let region = mem
        .find_region(GuestAddress(HIMEM_START))
        .ok_or(Error::MemoryNotCovered {
            start: HIMEM_START,
            len: 1,
        })?;
    let end = region.start_addr().raw_value().saturating_add(region.len());
    Ok(end.min(MEM_32BIT_GAP_START))
}

/// Loads `kernel` into guest memory and determines how to enter it.
///
/// - ELF: must be a little-endian ELF64 x86-64 image with at most
///   [`MAX_ELF_PHDRS`] program headers, every `PT_LOAD` segment inside
///   `[HIMEM_START, end of low RAM)`, and a `XEN_ELFNOTE_PHYS32_ENTRY`
///   note pointing into the image -> [`BootProtocol::Pvh`].
///   An ELF without that note fails with [`Error::ElfWithoutPvhNote`].
/// - bzImage: `"HdrS"` magic, boot protocol >= 2.12, `LOADED_HIGH` and
///   `XLF_KERNEL_64`; the protected-mode part is copied to `code32_start`
///   (>= 1 MiB) and must fit, with `init_size`, below the gap ->
///   [`BootProtocol::Linux64`], entry = load address + 0x200.
///   The image's setup header is also stored in the zero page at
///   `ZERO_PAGE_START + 0x1F1`, where [`crate::configure_system`] and
///   [`load_initramfs`] read it back (the rest of the page is zeroed).
/// - anything else: [`Error::UnknownKernelFormat`].
///
/// `mem` must contain a region covering `HIMEM_START`.
pub fn load_kernel<M: GuestMemoryBackend>(mem: &M, kernel: &mut File) -> Result<KernelLoad> {
    let limit = low_ram_limit(mem)?;
    let mut magic = [0u8; 4];
    if read_at(kernel, 0, &mut magic).map_err(Error::KernelRead)? && magic == ELF_MAGIC {
        return load_elf(mem, kernel, limit);
    }
    let mut hdr = setup_header::default();
    if read_at(
        kernel,
        SETUP_HEADER_OFFSET,
        vm_memory::ByteValued::as_mut_slice(&mut hdr),
    )
    .map_err(Error::KernelRead)?
        && hdr.header == HDRS_MAGIC
    {
        return load_bzimage(mem, kernel, hdr, limit);
    }
    Err(Error::UnknownKernelFormat)
}

fn load_elf<M: GuestMemoryBackend>(mem: &M, kernel: &mut File, limit: u64) -> Result<KernelLoad> {
    let mut ehdr = [0u8; ELF64_EHDR_SIZE];
    if !read_at(kernel, 0, &mut ehdr).map_err(Error::KernelRead)? {
        return Err(Error::UnsupportedElf);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(a)
    };
    if ehdr[4] != ELFCLASS64 || ehdr[5] != ELFDATA2LSB || u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(Error::UnsupportedElf);
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != ELF64_PHDR_SIZE {
        return Err(Error::UnsupportedElf);
    }
    if phnum > MAX_ELF_PHDRS {
        return Err(Error::TooManyProgramHeaders(phnum));
    }

    // Validate every loadable segment before linux-loader copies anything.
    let mut phdrs = vec![0u8; usize::from(phnum) * ELF64_PHDR_SIZE];
    if !read_at(kernel, phoff, &mut phdrs).map_err(Error::KernelRead)? {
        return Err(Error::UnsupportedElf);
    }
    let mut image_end = 0u64;
    for ph in phdrs.chunks_exact(ELF64_PHDR_SIZE) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        let span = filesz.max(memsz);
        let end = paddr.checked_add(span);
        match end {
            Some(end) if paddr >= HIMEM_START && end <= limit => image_end = image_end.max(end),
            _ => return Err(Error::ElfSegmentOutOfRange { paddr, memsz: span }),
        }
    }

    let res = Elf::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(Error::KernelLoader)?;
    let entry = match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr,
        _ => return Err(Error::ElfWithoutPvhNote),
    };
    let kernel_end = image_end.max(res.kernel_end);
    if entry.raw_value() < HIMEM_START || entry.raw_value() >= kernel_end {
        return Err(Error::PvhEntryOutOfRange(entry.raw_value()));
    }
    // No bzImage header may linger in the zero page.
    mem.write_obj(boot_params::default(), GuestAddress(ZERO_PAGE_START))
        .map_err(|source| Error::GuestWrite {
            what: "zero page",
            source,
        })?;
    Ok(KernelLoad {
        entry,
        protocol: BootProtocol::Pvh,
        kernel_end: GuestAddress(kernel_end),
    })
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    hdr: setup_header,
    limit: u64,
) -> Result<KernelLoad> {
    if hdr.version < MIN_BOOT_PROTOCOL {
        return Err(Error::UnsupportedBzImage("boot protocol older than 2.12"));
    }
    if hdr.loadflags & LOADED_HIGH == 0 {
        return Err(Error::UnsupportedBzImage(
            "kernel is not loaded high (zImage)",
        ));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::UnsupportedBzImage(
            "no 64-bit entry point (XLF_KERNEL_64)",
        ));
    }
    let file_len = kernel.seek(SeekFrom::End(0)).map_err(Error::KernelRead)?;
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let setup_len = (setup_sects + 1) * 512;
    let payload =
        file_len
            .checked_sub(setup_len)
            .filter(|p| *p > 0)
            .ok_or(Error::UnsupportedBzImage(
                "file shorter than its setup sectors",
            ))?;
    let load = u64::from(hdr.code32_start);
    if load < HIMEM_START {
        return Err(Error::UnsupportedBzImage("code32_start below 1 MiB"));
    }
    let end = load + payload.max(u64::from(hdr.init_size));
    if end > limit {
        return Err(Error::KernelTooLarge { end, limit });
    }

    let res = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(Error::KernelLoader)?;
    let loaded_hdr = res.setup_header.unwrap_or(hdr);
    let zero_page = boot_params {
        hdr: loaded_hdr,
        ..Default::default()
    };
    mem.write_obj(zero_page, GuestAddress(ZERO_PAGE_START))
        .map_err(|source| Error::GuestWrite {
            what: "zero page",
            source,
        })?;

    Ok(KernelLoad {
        entry: res.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
        protocol: BootProtocol::Linux64,
        kernel_end: GuestAddress(end.max(res.kernel_end)),
    })
}

/// The bzImage setup header stored in the zero page by [`load_kernel`], if
/// the last kernel loaded was a bzImage.
pub(crate) fn stored_setup_header<M: GuestMemoryBackend>(mem: &M) -> Result<Option<setup_header>> {
    let hdr: setup_header = mem
        .read_obj(GuestAddress(ZERO_PAGE_START + SETUP_HEADER_OFFSET))
        .map_err(|source| Error::GuestRead {
            what: "setup header",
            source,
        })?;
    Ok((hdr.header == HDRS_MAGIC).then_some(hdr))
}

/// Highest address (exclusive) the kernel accepts for initramfs bytes.
pub(crate) fn initrd_limit(hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(h) => {
            let max = if h.version >= 0x0203 {
                h.initrd_addr_max
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            u64::from(max) + 1
        }
        None => MEM_32BIT_GAP_START,
    }
}

/// Copies `initrd` to the top of low RAM, page aligned.
///
/// The image ends at or below `min(end of low RAM, 3 GiB, initrd_addr_max
/// + 1)` (the latter only after a bzImage was loaded) and starts at or
/// above `kernel_end` rounded up to a page. An empty file fails with
/// [`Error::InitrdEmpty`], one that does not fit with
/// [`Error::InitrdTooLarge`]; nothing is written in either case.
pub fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &mut File,
    kernel_end: GuestAddress,
) -> Result<InitrdInfo> {
    let size = initrd.metadata().map_err(Error::InitrdRead)?.len();
    if size == 0 {
        return Err(Error::InitrdEmpty);
    }
    let hdr = stored_setup_header(mem)?;
    let limit = low_ram_limit(mem)?.min(initrd_limit(hdr.as_ref()));
    let lowest = kernel_end
        .raw_value()
        .max(HIMEM_START)
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let available = limit.saturating_sub(lowest);
    if size > available {
        return Err(Error::InitrdTooLarge { size, available });
    }
    // lowest <= limit - size and lowest is page aligned, so addr >= lowest.
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    initrd.rewind().map_err(Error::InitrdRead)?;
    let len = size as usize; // < 3 GiB
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|source| Error::GuestWrite {
            what: "initramfs",
            source,
        })?;
    Ok(InitrdInfo {
        addr: GuestAddress(addr),
        size: len,
    })
}

#[cfg(test)]
#[path = "loader_tests.rs"]
mod tests;
