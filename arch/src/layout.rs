//! Guest-physical memory layout used for booting.
//!
//! Everything the VMM writes before the first instruction lives below
//! [`HIMEM_START`] (1 MiB), except the kernel (at or above 1 MiB) and the
//! initramfs (top of low RAM). The windows below never overlap each other;
//! `tests::windows_do_not_overlap` checks it.
//!
//! ```text
//! 0x0000_0500  GDT (BOOT_GDT_ENTRIES x 8 bytes)
//! 0x0000_0600  IDT (one zero 8-byte entry)
//! 0x0000_6000  PVH hvm_start_info, 0x6040 modlist, 0x6100 memmap
//! 0x0000_7000  Linux zero page (boot_params, 4 KiB)
//! 0x0000_8ff0  initial stack pointer (Linux 64-bit boot)
//! 0x0000_9000  PML4, 0xA000 PDPT, 0xB000..0xF000 four PDs (identity 4 GiB)
//! 0x0002_0000  kernel command line (CMDLINE_MAX_SIZE bytes)
//! 0x0009_FC00  EBDA start: e820 "reserved" up to 1 MiB
//! 0x000E_0000  ACPI: RSDP, then XSDT/FADT/DSDT/MADT (up to 0xF_0000)
//! 0x000F_0000  MP floating pointer + MP configuration table (up to 1 MiB)
//! 0x0010_0000  HIMEM_START: kernel image
//! 0xC000_0000  32-bit MMIO gap (1 GiB): PCI 32-bit BAR window up to
//!              0xE000_0000, PCI ECAM 0xE000_0000 (1 MiB, e820 reserved),
//!              IOAPIC 0xFEC0_0000, LAPIC 0xFEE0_0000 (see `crate::pci`)
//! 0x1_0000_0000 RAM above the gap when mem_size > 3 GiB
//! ```

use vm_memory::GuestAddress;

/// GDT: [`crate::gdt::BOOT_GDT_ENTRIES`] 8-byte descriptors.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT: a single zero 8-byte gate (any exception before the guest installs
/// its own IDT is a triple fault, i.e. a clean VM shutdown).
pub const BOOT_IDT_START: u64 = 0x600;

/// PVH `hvm_start_info` (56 bytes).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (`hvm_modlist_entry`, 32 bytes each; at most one used).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry`, 24 bytes each).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Upper bound on PVH memory-map entries; the window ends at the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;

/// Linux `boot_params` (the "zero page", 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial `rsp`/`rbp` for the Linux 64-bit entry (stack grows down to 0x8000).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level 4 (one 4 KiB page, entry 0 used).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table (one page, entries 0..4 used).
pub const PDPTE_START: u64 = 0xA000;
/// First of [`BOOT_PD_COUNT`] consecutive page directories of 2 MiB pages.
pub const PDE_START: u64 = 0xB000;
/// Number of page directories: each maps 1 GiB, so 4 GiB are identity mapped.
pub const BOOT_PD_COUNT: u64 = 4;

/// Kernel command line, NUL terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Size of the command-line window *including* the NUL terminator; equals
/// Linux's x86 `COMMAND_LINE_SIZE`, so a longer line would be truncated by
/// the kernel anyway.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// Start of the Extended BIOS Data Area; RAM below it is usable, from here
/// to [`HIMEM_START`] is reported reserved (EBDA, VGA hole, BIOS ROM area).
pub const EBDA_START: u64 = 0x9FC00;

/// ACPI tables window start; the RSDP is at this (16-byte aligned) address,
/// inside the 0xE0000..0xFFFFF area Linux scans for it.
pub const ACPI_START: u64 = 0xE0000;
/// Guest-physical address of the ACPI RSDP.
pub const RSDP_ADDR: u64 = ACPI_START;
/// Size of the ACPI tables window.
pub const ACPI_MAX_SIZE: usize = 0x10000;

/// MP table window start: floating pointer (16 bytes) then configuration
/// table, inside the 0xF0000..0xFFFFF BIOS area Linux scans.
pub const MPTABLE_START: u64 = 0xF0000;
/// Size of the MP table window (up to the reset vector).
pub const MPTABLE_MAX_SIZE: usize = 0xFFF0;
/// Real-mode reset vector (F000:FFF0): 16 bytes, see `crate::reset`.
pub const RESET_VECTOR: u64 = 0xFFFF0;

/// First address of "high" memory: kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (3 GiB): no RAM between here and 4 GiB.
pub const MEM_32BIT_GAP_START: u64 = 0xC000_0000;
/// Size of the 32-bit MMIO gap (1 GiB).
pub const MEM_32BIT_GAP_SIZE: u64 = 0x4000_0000;
/// First address above 4 GiB, where RAM beyond the gap continues.
pub const FIRST_ADDR_PAST_32BITS: u64 = MEM_32BIT_GAP_START + MEM_32BIT_GAP_SIZE;

/// IOAPIC MMIO base (inside the gap).
pub const IOAPIC_ADDR: u32 = 0xFEC0_0000;
/// Local APIC MMIO base (inside the gap).
pub const APIC_ADDR: u32 = 0xFEE0_0000;
/// Number of IOAPIC input pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_NUM_PINS: u8 = 24;

/// Largest vCPU count: APIC IDs are 0..num_cpus-1 and must stay below the
/// IOAPIC ID (== num_cpus) and the xAPIC broadcast ID 0xFF.
pub const MAX_SUPPORTED_CPUS: u8 = 254;

/// Smallest guest RAM: the boot structures, 1 MiB of BIOS area and a few
/// MiB for a kernel.
pub const MIN_MEM_SIZE: u64 = 8 << 20;
/// Largest guest RAM: 1 TiB plus the gap stays well within the 40-bit
/// minimum guest physical address width of x86-64 KVM hosts.
pub const MAX_MEM_SIZE: u64 = 1 << 40;

/// Upper bound on ELF program headers accepted by the kernel loader.
pub const MAX_ELF_PHDRS: u16 = 128;

/// Guest RAM regions for `mem_size` bytes of RAM: one region at 0 if it fits
/// below [`MEM_32BIT_GAP_START`], otherwise `[0, 3 GiB)` plus the remainder
/// at [`FIRST_ADDR_PAST_32BITS`].
///
/// Regions never overlap the gap and their sizes add up to `mem_size`
/// clamped to [`MAX_MEM_SIZE`]; `mem_size == 0` yields no region.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, usize)> {
    let mem_size = mem_size.min(MAX_MEM_SIZE);
    if mem_size == 0 {
        return Vec::new();
    }
    if mem_size <= MEM_32BIT_GAP_START {
        return vec![(GuestAddress(0), mem_size as usize)];
    }
    vec![
        (GuestAddress(0), MEM_32BIT_GAP_START as usize),
        (
            GuestAddress(FIRST_ADDR_PAST_32BITS),
            (mem_size - MEM_32BIT_GAP_START) as usize,
        ),
    ]
}

/// First address past the highest RAM byte for `mem_size` bytes of RAM
/// laid out by [`ram_regions`] (0 when `mem_size == 0`). The PCI 64-bit
/// window ([`crate::pci::mmio64_window`]) starts above it.
pub fn ram_end(mem_size: u64) -> u64 {
    ram_regions(mem_size)
        .last()
        .map_or(0, |(start, len)| start.0 + *len as u64)
}

/// First address past RAM below the gap for `mem_size` bytes of RAM.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MEM_32BIT_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        assert_eq!(
            ram_regions(MEM_32BIT_GAP_START),
            vec![(GuestAddress(0), MEM_32BIT_GAP_START as usize)]
        );
        assert!(ram_regions(0).is_empty());
    }

    #[test]
    fn large_memory_is_split_around_gap() {
        let r = ram_regions(5 << 30);
        assert_eq!(
            r,
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        let total: usize = r.iter().map(|(_, s)| s).sum();
        assert_eq!(total, 5 << 30);
    }

    #[test]
    fn ram_end_follows_the_regions() {
        assert_eq!(ram_end(0), 0);
        assert_eq!(ram_end(512 << 20), 512 << 20);
        assert_eq!(ram_end(3 << 30), 3 << 30);
        assert_eq!(ram_end(5 << 30), 6 << 30);
    }

    #[test]
    fn huge_memory_is_clamped() {
        let total: usize = ram_regions(u64::MAX).iter().map(|(_, s)| s).sum();
        assert_eq!(total as u64, MAX_MEM_SIZE);
    }

    #[test]
    fn windows_do_not_overlap() {
        let mut w = [
            (BOOT_GDT_START, 8 * crate::gdt::BOOT_GDT_ENTRIES as u64),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 56),
            (PVH_MODLIST_START, 32),
            (PVH_MEMMAP_START, 24 * PVH_MEMMAP_MAX_ENTRIES as u64),
            (ZERO_PAGE_START, 4096),
            (BOOT_STACK_POINTER - 0xff0, 0x1000),
            (PML4_START, 4096),
            (PDPTE_START, 4096),
            (PDE_START, 4096 * BOOT_PD_COUNT),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (ACPI_START, ACPI_MAX_SIZE as u64),
            (MPTABLE_START, MPTABLE_MAX_SIZE as u64),
            (RESET_VECTOR, 16),
        ];
        w.sort();
        for pair in w.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        let last = w[w.len() - 1];
        assert!(last.0 + last.1 <= HIMEM_START);
        const {
            assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
            assert!(PDE_START + 4096 * BOOT_PD_COUNT <= EBDA_START);
            assert!(ACPI_START >= EBDA_START);
        }
    }
}
