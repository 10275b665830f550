//! Tests of `configure_system` for both protocols.

use super::*;
use crate::bytes::sum;
use crate::e820::{E820_RAM, E820_RESERVED};
use crate::layout::{ACPI_START, MEM_32BIT_GAP_START};
use crate::test_utils::{build_bzimage, build_elf, bz_header, guest_mem, temp_file, ElfSpec};
use crate::{load_initramfs, load_kernel};
use vm_memory::GuestMemoryMmap;

fn read_cstr(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
    let mut v = vec![0u8; CMDLINE_MAX_SIZE];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    let nul = v.iter().position(|b| *b == 0).unwrap();
    v.truncate(nul);
    v
}

fn setup(protocol: BootProtocol, mem_size: u64) -> BootSetup<'static> {
    BootSetup {
        protocol,
        cmdline: "console=ttyS0 reboot=k panic=1",
        initrd: None,
        num_cpus: 2,
        mem_size,
    }
}

/// Loads a synthetic kernel of the given protocol (and an initramfs).
fn load(mem: &GuestMemoryMmap<()>, protocol: BootProtocol) -> InitrdInfo {
    let image = match protocol {
        BootProtocol::Pvh => build_elf(&ElfSpec::default()),
        BootProtocol::Linux64 => build_bzimage(&bz_header(), 0x2000),
    };
    let mut k = temp_file(&image);
    let kl = load_kernel(mem, &mut k.file).unwrap();
    assert_eq!(kl.protocol, protocol);
    let mut f = temp_file(&[0x42u8; 12345]);
    load_initramfs(mem, &mut f.file, kl.kernel_end).unwrap()
}

fn check_pvh(mem_size: u64) {
    let mem = guest_mem(mem_size);
    let initrd = load(&mem, BootProtocol::Pvh);
    let s = BootSetup {
        initrd: Some(initrd),
        ..setup(BootProtocol::Pvh, mem_size)
    };
    let info_addr = configure_system(&mem, &s).unwrap();
    assert_eq!(info_addr, GuestAddress(PVH_INFO_START));

    let info: hvm_start_info = mem.read_obj(info_addr).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.version, 1);
    assert_eq!(info.flags, 0);
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!(read_cstr(&mem, info.cmdline_paddr), s.cmdline.as_bytes());
    assert_eq!(info.rsdp_paddr, ACPI_START);
    assert_eq!(info.nr_modules, 1);
    assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
    let m: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
    assert_eq!(
        (m.paddr, m.size, m.cmdline_paddr),
        (initrd.addr.0, 12345, 0)
    );

    let expected = memory_map(mem_size).unwrap();
    assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
    assert_eq!(info.memmap_entries as usize, expected.len());
    for (i, e) in expected.iter().enumerate() {
        let got: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
            .unwrap();
        assert_eq!(
            (got.addr, got.size, got.type_, got.reserved),
            (e.addr, e.size, e.kind, 0)
        );
    }
    // The RSDP the guest is pointed at is valid.
    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(info.rsdp_paddr))
        .unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!((sum(&rsdp[..20]), sum(&rsdp)), (0, 0));
    // MP floating pointer too.
    let mut mpf = [0u8; 16];
    mem.read_slice(&mut mpf, GuestAddress(MPTABLE_START))
        .unwrap();
    assert_eq!((&mpf[..4], sum(&mpf)), (&b"_MP_"[..], 0));
}

#[test]
fn pvh_start_info_512m() {
    check_pvh(512 << 20);
}

#[test]
fn pvh_start_info_5g() {
    check_pvh(5 << 30);
    let map = memory_map(5 << 30).unwrap();
    assert_eq!(map.len(), 5);
    assert_eq!(map[2].addr + map[2].size, MEM_32BIT_GAP_START);
}

#[test]
fn pvh_without_initrd_has_no_modules() {
    let mem = guest_mem(512 << 20);
    configure_system(&mem, &setup(BootProtocol::Pvh, 512 << 20)).unwrap();
    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
}

fn check_linux64(mem_size: u64) {
    let mem = guest_mem(mem_size);
    let initrd = load(&mem, BootProtocol::Linux64);
    let s = BootSetup {
        initrd: Some(initrd),
        ..setup(BootProtocol::Linux64, mem_size)
    };
    let addr = configure_system(&mem, &s).unwrap();
    assert_eq!(addr, GuestAddress(ZERO_PAGE_START));

    let bp: boot_params = mem.read_obj(addr).unwrap();
    let hdr = bp.hdr;
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.boot_flag }, 0xAA55);
    assert_eq!({ hdr.version }, 0x020F);
    assert_eq!({ hdr.type_of_loader }, 0xFF);
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.cmd_line_ptr } as u64, CMDLINE_START);
    assert_eq!(read_cstr(&mem, CMDLINE_START), s.cmdline.as_bytes());
    assert_eq!({ hdr.ramdisk_image } as u64, initrd.addr.0);
    assert_eq!({ hdr.ramdisk_size }, 12345);
    assert_eq!({ hdr.xloadflags } & 1, 1);
    assert_eq!({ bp.acpi_rsdp_addr }, ACPI_START);
    assert_eq!(bp.sentinel, 0);

    let expected = memory_map(mem_size).unwrap();
    assert_eq!(bp.e820_entries as usize, expected.len());
    let table = bp.e820_table;
    for (got, e) in table.iter().zip(&expected) {
        assert_eq!(
            ({ got.addr }, { got.size }, { got.r#type }),
            (e.addr, e.size, e.kind)
        );
    }
    assert_eq!({ table[0].r#type }, E820_RAM);
    assert_eq!({ table[1].r#type }, E820_RESERVED);
    assert_eq!({ table[expected.len()].size }, 0);
}

#[test]
fn linux64_boot_params_512m() {
    check_linux64(512 << 20);
}

#[test]
fn linux64_boot_params_5g() {
    check_linux64(5 << 30);
    let mem = guest_mem(5 << 30);
    load(&mem, BootProtocol::Linux64);
    configure_system(&mem, &setup(BootProtocol::Linux64, 5 << 30)).unwrap();
    let bp: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    let t = bp.e820_table;
    assert_eq!(bp.e820_entries, 5);
    assert_eq!(
        ({ t[3].addr }, { t[3].size }, { t[3].r#type }),
        (0xE000_0000, 0x10_0000, E820_RESERVED),
        "PCI ECAM"
    );
    assert_eq!(({ t[4].addr }, { t[4].size }), (1 << 32, 2 << 30));
    assert_eq!(({ bp.hdr.ramdisk_image }, { bp.hdr.ramdisk_size }), (0, 0));
}

#[test]
fn linux64_requires_bzimage_header() {
    let mem = guest_mem(512 << 20);
    assert!(matches!(
        configure_system(&mem, &setup(BootProtocol::Linux64, 512 << 20)),
        Err(Error::MissingSetupHeader)
    ));
}

#[test]
fn cmdline_limits() {
    let mem = guest_mem(512 << 20);
    let max = "x".repeat(CMDLINE_MAX_SIZE - 1);
    let s = BootSetup {
        cmdline: &max,
        ..setup(BootProtocol::Pvh, 512 << 20)
    };
    configure_system(&mem, &s).unwrap();
    assert_eq!(read_cstr(&mem, CMDLINE_START).len(), CMDLINE_MAX_SIZE - 1);

    let long = "x".repeat(CMDLINE_MAX_SIZE);
    let s = BootSetup {
        cmdline: &long,
        ..setup(BootProtocol::Pvh, 512 << 20)
    };
    assert!(matches!(
        configure_system(&mem, &s),
        Err(Error::CmdlineTooLong {
            len: 2048,
            max: 2047
        })
    ));

    let s = BootSetup {
        cmdline: "a\0b",
        ..setup(BootProtocol::Pvh, 512 << 20)
    };
    assert!(matches!(
        configure_system(&mem, &s),
        Err(Error::CmdlineHasNul)
    ));

    // Linux64 also honours the kernel's own cmdline_size.
    let mut hdr = bz_header();
    hdr.cmdline_size = 10;
    let mut k = temp_file(&build_bzimage(&hdr, 0x1000));
    load_kernel(&mem, &mut k.file).unwrap();
    let s = BootSetup {
        cmdline: "0123456789A",
        ..setup(BootProtocol::Linux64, 512 << 20)
    };
    assert!(matches!(
        configure_system(&mem, &s),
        Err(Error::CmdlineTooLong { len: 11, max: 10 })
    ));
}

#[test]
fn invalid_inputs_rejected() {
    let mem = guest_mem(512 << 20);
    for n in [0u8, 255] {
        let s = BootSetup {
            num_cpus: n,
            ..setup(BootProtocol::Pvh, 512 << 20)
        };
        assert!(matches!(configure_system(&mem, &s), Err(Error::InvalidCpuCount(x)) if x == n));
    }
    let s = BootSetup {
        num_cpus: 254,
        ..setup(BootProtocol::Pvh, 512 << 20)
    };
    configure_system(&mem, &s).unwrap();

    // mem_size larger than the guest memory object.
    let s = setup(BootProtocol::Pvh, 1 << 30);
    assert!(matches!(
        configure_system(&mem, &s),
        Err(Error::MemoryNotCovered { .. })
    ));
    let s = setup(BootProtocol::Pvh, 1 << 20);
    assert!(matches!(
        configure_system(&mem, &s),
        Err(Error::InvalidMemSize(_))
    ));

    for (addr, size) in [
        (0x1000u64, 100usize),
        (0x1000_0000, 0),
        ((512 << 20) - 10, 100),
    ] {
        let s = BootSetup {
            initrd: Some(InitrdInfo {
                addr: GuestAddress(addr),
                size,
            }),
            ..setup(BootProtocol::Pvh, 512 << 20)
        };
        assert!(matches!(
            configure_system(&mem, &s),
            Err(Error::InvalidInitrd { .. })
        ));
    }
}

#[test]
fn works_with_dirty_bitmap_memory() {
    use vm_memory::bitmap::AtomicBitmap;
    let mem_size = 512u64 << 20;
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&crate::layout::ram_regions(mem_size))
        .unwrap();
    let mut k = temp_file(&build_elf(&ElfSpec::default()));
    let kl = load_kernel(&mem, &mut k.file).unwrap();
    let mut f = temp_file(&[7u8; 100]);
    let initrd = load_initramfs(&mem, &mut f.file, kl.kernel_end).unwrap();
    let s = BootSetup {
        initrd: Some(initrd),
        ..setup(kl.protocol, mem_size)
    };
    let info = configure_system(&mem, &s).unwrap();
    let mut sregs = kvm_bindings::kvm_sregs::default();
    crate::regs::setup_sregs(&mem, kl.protocol, &mut sregs).unwrap();
    let regs = crate::regs::setup_regs(kl.protocol, kl.entry, info);
    assert_eq!((regs.rip, regs.rbx), (0x100_0040, PVH_INFO_START));
}
