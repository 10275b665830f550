//! Architectural vCPU state at the first guest instruction.
//!
//! Only the boot vCPU needs this state; application processors are started
//! by the guest through INIT/SIPI.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::gdt::{
    boot_gdt, kvm_segment_from_gdt, BOOT_GDT_ENTRIES, CODE_INDEX, DATA_INDEX, FLAGS_CODE32,
    FLAGS_CODE64, TSS_INDEX,
};
use crate::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START,
};
use crate::{BootProtocol, Error, Result};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (hard-wired 1 on every CPU since the i486).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS with only the always-one reserved bit 1 set (interrupts off).
pub const RFLAGS_RESERVED: u64 = 0x2;

/// Page-table entry bits: present | writable.
const PTE_P_RW: u64 = 0x3;
/// Page-directory entry bits for a 2 MiB page: present | writable | PS.
const PDE_P_RW_PS: u64 = 0x83;

/// General-purpose registers at entry.
///
/// `entry` must already be the address to jump to (see
/// [`crate::KernelLoad::entry`]) and `boot_info` the address returned by
/// [`crate::configure_system`]. PVH: `rip = entry`, `rbx = boot_info`
/// (`hvm_start_info`), everything else 0. Linux64: `rip = entry`,
/// `rsi = boot_info` (`boot_params`), `rsp = rbp =` [`BOOT_STACK_POINTER`].
/// Both: `rflags = 0x2` (interrupts disabled).
pub fn setup_regs(
    protocol: BootProtocol,
    entry: GuestAddress,
    boot_info: GuestAddress,
) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: entry.raw_value(),
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Pvh => regs.rbx = boot_info.raw_value(),
        BootProtocol::Linux64 => {
            regs.rsi = boot_info.raw_value();
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// x87/SSE state at entry: `fcw = 0x37f` (all exceptions masked, extended
/// precision) and `mxcsr = 0x1f80` (all SSE exceptions masked), the
/// architectural reset values; everything else zero.
pub fn setup_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// Writes the boot GDT and IDT (and, for Linux64, identity page tables) to
/// guest memory and sets the matching special registers in `sregs`.
///
/// `sregs` should come from `KVM_GET_SREGS` so that fields not listed here
/// (`apic_base`, `ldt`, `cr2`, `cr8`, interrupt bitmap) keep KVM's values.
///
/// Both protocols: GDT at [`BOOT_GDT_START`], IDT base [`BOOT_IDT_START`]
/// with one zero gate (limit 7); DS/ES/FS/GS/SS = flat 4 GiB data (selector
/// 0x18), TR = busy TSS (selector 0x20, base 0, limit 0x67).
///
/// PVH: CS = flat 32-bit code (selector 0x10), `cr0 = PE|ET`, `cr3 = cr4 =
/// efer = 0` (no paging), as the PVH ABI requires.
///
/// Linux64: CS = 64-bit code (L=1, selector 0x10 = `__BOOT_CS`); PML4 at
/// [`PML4_START`] -> PDPT at [`PDPTE_START`] -> four PDs at [`PDE_START`]
/// identity-mapping `[0, 4 GiB)` with 2 MiB pages; `cr3 = PML4_START`,
/// `cr4 = PAE`, `cr0 = PE|ET|PG`, `efer = LME|LMA`.
pub fn setup_sregs<M: GuestMemoryBackend>(
    mem: &M,
    protocol: BootProtocol,
    sregs: &mut kvm_sregs,
) -> Result<()> {
    let code_flags = match protocol {
        BootProtocol::Pvh => FLAGS_CODE32,
        BootProtocol::Linux64 => FLAGS_CODE64,
    };
    let gdt = boot_gdt(code_flags);
    write_gdt(mem, &gdt)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| Error::GuestWrite {
            what: "IDT",
            source,
        })?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match protocol {
        BootProtocol::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootProtocol::Linux64 => {
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<()> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(|source| Error::GuestWrite {
            what: "GDT",
            source,
        })
}

/// Writes PML4[0] -> PDPT[0..4] -> 4 PDs of 512 2 MiB identity pages.
fn write_identity_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    let wr = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "page tables",
                source,
            })
    };
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(PDPTE_START | PTE_P_RW).to_le_bytes());
    wr(&pml4, PML4_START)?;

    let mut pdpt = vec![0u8; 4096];
    for i in 0..BOOT_PD_COUNT {
        let off = (i * 8) as usize;
        pdpt[off..off + 8].copy_from_slice(&((PDE_START + i * 4096) | PTE_P_RW).to_le_bytes());
    }
    wr(&pdpt, PDPTE_START)?;

    let pds: Vec<u8> = (0..BOOT_PD_COUNT * 512)
        .flat_map(|i| ((i << 21) | PDE_P_RW_PS).to_le_bytes())
        .collect();
    wr(&pds, PDE_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gdt::{entry_base, entry_limit};
    use crate::test_utils::guest_mem;

    fn read_u64<M: GuestMemoryBackend>(mem: &M, addr: u64) -> u64 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Walks the 4-level tables like the MMU does for a 2 MiB mapping.
    fn translate<M: GuestMemoryBackend>(mem: &M, cr3: u64, va: u64) -> Option<u64> {
        let mask = 0x000F_FFFF_FFFF_F000;
        let pml4e = read_u64(mem, (cr3 & mask) + ((va >> 39) & 0x1FF) * 8);
        if pml4e & 1 == 0 {
            return None;
        }
        let pdpte = read_u64(mem, (pml4e & mask) + ((va >> 30) & 0x1FF) * 8);
        if pdpte & 1 == 0 || pdpte & 0x80 != 0 {
            return None;
        }
        let pde = read_u64(mem, (pdpte & mask) + ((va >> 21) & 0x1FF) * 8);
        if pde & 1 == 0 || pde & 0x80 == 0 {
            return None;
        }
        Some((pde & 0x000F_FFFF_FFE0_0000) | (va & 0x1F_FFFF))
    }

    #[test]
    fn regs_pvh() {
        let r = setup_regs(
            BootProtocol::Pvh,
            GuestAddress(0x100_0040),
            GuestAddress(0x6000),
        );
        assert_eq!((r.rip, r.rbx, r.rflags), (0x100_0040, 0x6000, 2));
        assert_eq!((r.rsi, r.rsp, r.rax), (0, 0, 0));
    }

    #[test]
    fn regs_linux64() {
        let r = setup_regs(
            BootProtocol::Linux64,
            GuestAddress(0x10_0200),
            GuestAddress(0x7000),
        );
        assert_eq!((r.rip, r.rsi, r.rflags), (0x10_0200, 0x7000, 2));
        assert_eq!(
            (r.rsp, r.rbp, r.rbx),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER, 0)
        );
    }

    #[test]
    fn fpu() {
        let f = setup_fpu();
        assert_eq!((f.fcw, f.mxcsr, f.fsw), (0x37f, 0x1f80, 0));
    }

    #[test]
    fn sregs_pvh() {
        let mem = guest_mem(512 << 20);
        let mut s = kvm_sregs {
            apic_base: 0xFEE0_0900,
            ..Default::default()
        };
        setup_sregs(&mem, BootProtocol::Pvh, &mut s).unwrap();
        assert_eq!(s.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!((s.cr3, s.cr4, s.efer), (0, 0, 0));
        assert_eq!(
            (s.cs.selector, s.cs.db, s.cs.l, s.cs.type_),
            (0x10, 1, 0, 0xB)
        );
        assert_eq!((s.cs.base, s.cs.limit), (0, 0xFFFF_FFFF));
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!(
                (d.selector, d.type_, d.db, d.base, d.limit),
                (0x18, 3, 1, 0, 0xFFFF_FFFF)
            );
        }
        assert_eq!(
            (s.tr.type_, s.tr.base, s.tr.limit, s.tr.present),
            (11, 0, 0x67, 1)
        );
        assert_eq!((s.gdt.base, s.gdt.limit), (BOOT_GDT_START, 47));
        assert_eq!((s.idt.base, s.idt.limit), (BOOT_IDT_START, 7));
        assert_eq!(s.apic_base, 0xFEE0_0900, "untouched");
        // The GDT in memory matches the segment registers.
        let cs = read_u64(&mem, BOOT_GDT_START + 0x10);
        assert_eq!(kvm_segment_from_gdt(cs, 2), s.cs);
        let tr = read_u64(&mem, BOOT_GDT_START + 0x20);
        assert_eq!((entry_base(tr), entry_limit(tr)), (0, 0x67));
        assert_eq!(read_u64(&mem, BOOT_IDT_START), 0);
        // No page tables are written for PVH.
        assert_eq!(read_u64(&mem, PML4_START), 0);
    }

    #[test]
    fn sregs_linux64_and_page_table_walk() {
        let mem = guest_mem(512 << 20);
        let mut s = kvm_sregs::default();
        setup_sregs(&mem, BootProtocol::Linux64, &mut s).unwrap();
        assert_eq!(s.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(
            (s.cr3, s.cr4, s.efer),
            (PML4_START, X86_CR4_PAE, EFER_LME | EFER_LMA)
        );
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!((s.ss.selector, s.ds.selector), (0x18, 0x18));
        assert_eq!(s.tr.type_, 11);

        assert_eq!(read_u64(&mem, PML4_START), PDPTE_START | 3);
        assert_eq!(read_u64(&mem, PML4_START + 8), 0);
        for i in 0..4 {
            assert_eq!(
                read_u64(&mem, PDPTE_START + i * 8),
                (PDE_START + i * 0x1000) | 3
            );
        }
        assert_eq!(read_u64(&mem, PDPTE_START + 32), 0);
        assert_eq!(read_u64(&mem, PDE_START), 0x83);
        assert_eq!(read_u64(&mem, PDE_START + 8), (2 << 20) | 0x83);
        for va in [
            0u64,
            0x7000,
            0x10_0200,
            0x1234_5678,
            0xBFFF_FFFF,
            0xC000_0000,
            0xFFFF_FFFF,
        ] {
            assert_eq!(translate(&mem, s.cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, s.cr3, 1 << 32), None);
    }

    #[test]
    fn sregs_fail_cleanly_without_low_memory() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(1 << 32), 1 << 20)])
                .unwrap();
        let mut s = kvm_sregs::default();
        assert!(matches!(
            setup_sregs(&mem, BootProtocol::Linux64, &mut s),
            Err(Error::GuestWrite { what: "GDT", .. })
        ));
    }
}
