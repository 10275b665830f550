//! `configure_system`: command line, firmware tables and boot information.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::acpi::setup_acpi_tables;
use crate::e820::{memory_map, MemoryMapEntry};
use crate::layout::{
    low_ram_end, ram_end, ram_regions, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START,
    MAX_SUPPORTED_CPUS, MPTABLE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::loader::{initrd_limit, stored_setup_header};
use crate::mptable::setup_mptable;
use crate::{BootProtocol, Error, InitrdInfo, Result};

/// `type_of_loader` value for "undefined" boot loaders.
pub const KERNEL_LOADER_OTHER: u8 = 0xFF;

/// Inputs of [`configure_system`].
#[derive(Debug, Clone, Copy)]
pub struct BootSetup<'a> {
    /// Must be the protocol returned by [`crate::load_kernel`].
    pub protocol: BootProtocol,
    /// Kernel command line without NUL bytes; at most
    /// `CMDLINE_MAX_SIZE - 1` bytes (and at most the bzImage's
    /// `cmdline_size` for [`BootProtocol::Linux64`]).
    pub cmdline: &'a str,
    /// The initramfs returned by [`crate::load_initramfs`], if any.
    pub initrd: Option<InitrdInfo>,
    /// Number of vCPUs, `1..=MAX_SUPPORTED_CPUS`; APIC IDs are `0..num_cpus`.
    pub num_cpus: u8,
    /// Guest RAM size; `mem` must cover [`ram_regions`]`(mem_size)`.
    pub mem_size: u64,
}

/// Writes everything the guest kernel reads at boot and returns the address
/// of the boot information to pass to [`crate::regs::setup_regs`]:
/// `hvm_start_info` at [`PVH_INFO_START`] (PVH) or `boot_params` at
/// [`ZERO_PAGE_START`] (Linux64).
///
/// Written in all cases: the NUL-terminated command line at
/// [`CMDLINE_START`], the MP table at [`MPTABLE_START`] and the ACPI tables
/// at [`crate::layout::ACPI_START`]. The memory map is
/// [`memory_map`]`(mem_size)`, the RSDP address is passed in the boot
/// information, and the initramfs (if any) is described as PVH module 0 or
/// as `ramdisk_image/size`.
///
/// All inputs are validated before anything is written; Linux64 needs the
/// setup header stored in the zero page by [`crate::load_kernel`].
pub fn configure_system<M: GuestMemoryBackend>(mem: &M, setup: &BootSetup) -> Result<GuestAddress> {
    if setup.num_cpus == 0 || setup.num_cpus > MAX_SUPPORTED_CPUS {
        return Err(Error::InvalidCpuCount(setup.num_cpus));
    }
    let map = memory_map(setup.mem_size)?;
    for (start, len) in ram_regions(setup.mem_size) {
        if !mem.check_range(start, len) {
            return Err(Error::MemoryNotCovered {
                start: start.raw_value(),
                len: len as u64,
            });
        }
    }
    let hdr = match setup.protocol {
        BootProtocol::Linux64 => Some(stored_setup_header(mem)?.ok_or(Error::MissingSetupHeader)?),
        BootProtocol::Pvh => None,
    };

    let cmdline = setup.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(Error::CmdlineHasNul);
    }
    let mut max_cmdline = CMDLINE_MAX_SIZE - 1;
    if let Some(h) = &hdr {
        max_cmdline = max_cmdline.min(h.cmdline_size as usize);
    }
    if cmdline.len() > max_cmdline {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: max_cmdline,
        });
    }

    if let Some(initrd) = &setup.initrd {
        let addr = initrd.addr.raw_value();
        let size = initrd.size as u64;
        let limit = low_ram_end(setup.mem_size).min(initrd_limit(hdr.as_ref()));
        let ok = size > 0
            && addr >= HIMEM_START
            && addr.checked_add(size).is_some_and(|end| end <= limit);
        if !ok {
            return Err(Error::InvalidInitrd { addr, size });
        }
    }

    let mut cmdline_nul = Vec::with_capacity(cmdline.len() + 1);
    cmdline_nul.extend_from_slice(cmdline);
    cmdline_nul.push(0);
    mem.write_slice(&cmdline_nul, GuestAddress(CMDLINE_START))
        .map_err(|source| Error::GuestWrite {
            what: "command line",
            source,
        })?;

    setup_mptable(mem, GuestAddress(MPTABLE_START), setup.num_cpus)?;
    let rsdp = setup_acpi_tables(mem, setup.num_cpus, ram_end(setup.mem_size))?;
    crate::reset::setup_reset_vector(mem)?;

    match setup.protocol {
        BootProtocol::Pvh => write_pvh_start_info(mem, setup, &map, rsdp),
        BootProtocol::Linux64 => {
            // `hdr` is Some for Linux64 (checked above).
            let hdr = hdr.ok_or(Error::MissingSetupHeader)?;
            let mut params = boot_params {
                hdr,
                ..Default::default()
            };
            write_zero_page(mem, setup, &map, rsdp, &mut params)
        }
    }
}

fn write_pvh_start_info<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    map: &[MemoryMapEntry],
    rsdp: GuestAddress,
) -> Result<GuestAddress> {
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(Error::TableTooLarge {
            what: "PVH memory map",
            size: map.len() * 24,
            max: PVH_MEMMAP_MAX_ENTRIES * 24,
        });
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = setup
        .initrd
        .iter()
        .map(|i| hvm_modlist_entry {
            paddr: i.addr.raw_value(),
            size: i.size as u64,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = PVH_MODLIST_START;
    }

    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootConfigurator)?;
    Ok(GuestAddress(PVH_INFO_START))
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    setup: &BootSetup,
    map: &[MemoryMapEntry],
    rsdp: GuestAddress,
    params: &mut boot_params,
) -> Result<GuestAddress> {
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(Error::TableTooLarge {
            what: "e820 table",
            size: map.len() * 20,
            max: E820_MAX_ENTRIES_ZEROPAGE * 20,
        });
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = 0;
    if let Some(initrd) = &setup.initrd {
        // Validated to lie below the 32-bit gap.
        params.hdr.ramdisk_image = initrd.addr.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    } else {
        params.hdr.ramdisk_image = 0;
        params.hdr.ramdisk_size = 0;
    }
    params.ext_ramdisk_image = 0;
    params.ext_ramdisk_size = 0;
    params.acpi_rsdp_addr = rsdp.raw_value();
    params.e820_entries = map.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    let bp = BootParams::new(&*params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(Error::BootConfigurator)?;
    Ok(GuestAddress(ZERO_PAGE_START))
}

#[cfg(test)]
#[path = "boot_tests.rs"]
mod tests;
