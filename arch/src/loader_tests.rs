//! Tests of kernel and initramfs loading with synthetic images.

use super::*;
use crate::layout::{FIRST_ADDR_PAST_32BITS, MEM_32BIT_GAP_START};
use crate::test_utils::{build_bzimage, build_elf, bz_header, guest_mem, temp_file, ElfSpec};

fn read_bytes<M: GuestMemoryBackend>(mem: &M, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

#[test]
fn pvh_elf_loads() {
    let mem = guest_mem(512 << 20);
    let image = build_elf(&ElfSpec::default());
    let mut k = temp_file(&image);
    let load = load_kernel(&mem, &mut k.file).unwrap();
    assert_eq!(load.protocol, BootProtocol::Pvh);
    assert_eq!(load.entry, GuestAddress(0x100_0040));
    assert_eq!(load.kernel_end, GuestAddress(0x100_4000));
    assert_eq!(read_bytes(&mem, 0x100_0000, 0x100), image[0x1000..0x1100]);
}

#[test]
fn elf_without_pvh_note_is_rejected() {
    let mem = guest_mem(512 << 20);
    let mut k = temp_file(&build_elf(&ElfSpec {
        note: None,
        ..Default::default()
    }));
    assert!(matches!(
        load_kernel(&mem, &mut k.file),
        Err(Error::ElfWithoutPvhNote)
    ));
    // A note with the right type but the wrong name is not a PVH note.
    let spec = ElfSpec {
        note: Some((b"Gnu\0", 18, 0x100_0040)),
        ..Default::default()
    };
    let mut k = temp_file(&build_elf(&spec));
    assert!(matches!(
        load_kernel(&mem, &mut k.file),
        Err(Error::ElfWithoutPvhNote)
    ));
}

#[test]
fn elf_bad_inputs() {
    let mem = guest_mem(512 << 20);
    type Check = fn(&Error) -> bool;
    let cases: Vec<(ElfSpec, Check)> = vec![
        (
            ElfSpec {
                class: 1,
                ..Default::default()
            },
            |e| matches!(e, Error::UnsupportedElf),
        ),
        (
            ElfSpec {
                paddr: 0x1000,
                ..Default::default()
            },
            |e| matches!(e, Error::ElfSegmentOutOfRange { paddr: 0x1000, .. }),
        ),
        (
            ElfSpec {
                paddr: MEM_32BIT_GAP_START - 0x1000,
                ..Default::default()
            },
            |e| matches!(e, Error::ElfSegmentOutOfRange { .. }),
        ),
        (
            ElfSpec {
                paddr: u64::MAX - 0x10,
                ..Default::default()
            },
            |e| matches!(e, Error::ElfSegmentOutOfRange { .. }),
        ),
        (
            ElfSpec {
                note: Some((b"Xen\0", 18, 0x200_0000)),
                ..Default::default()
            },
            |e| matches!(e, Error::PvhEntryOutOfRange(0x200_0000)),
        ),
        (
            ElfSpec {
                phnum_override: Some(1000),
                ..Default::default()
            },
            |e| matches!(e, Error::TooManyProgramHeaders(1000)),
        ),
        (
            ElfSpec {
                phnum_override: Some(100),
                ..Default::default()
            },
            |e| {
                matches!(e, Error::UnsupportedElf) // program headers past EOF
            },
        ),
    ];
    for (i, (spec, check)) in cases.iter().enumerate() {
        let mut k = temp_file(&build_elf(spec));
        let err = load_kernel(&mem, &mut k.file).unwrap_err();
        assert!(check(&err), "case {i}: {err}");
    }
}

#[test]
fn elf_segment_beyond_small_memory() {
    let mem = guest_mem(16 << 20);
    let mut k = temp_file(&build_elf(&ElfSpec {
        paddr: 0x100_0000,
        ..Default::default()
    }));
    assert!(matches!(
        load_kernel(&mem, &mut k.file),
        Err(Error::ElfSegmentOutOfRange { .. })
    ));
}

#[test]
fn unknown_formats() {
    let mem = guest_mem(512 << 20);
    for bytes in [&b""[..], b"MZ", &[0u8; 4096][..], &[0xAB; 100][..]] {
        let mut k = temp_file(bytes);
        let err = load_kernel(&mem, &mut k.file).unwrap_err();
        assert!(matches!(err, Error::UnknownKernelFormat), "{err}");
        assert_eq!(
            err.to_string(),
            "kernel image is not an ELF with a PVH note nor a bzImage"
        );
    }
}

#[test]
fn bzimage_loads_and_stores_header() {
    let mem = guest_mem(512 << 20);
    let hdr = bz_header();
    let image = build_bzimage(&hdr, 0x3000);
    let mut k = temp_file(&image);
    let load = load_kernel(&mem, &mut k.file).unwrap();
    assert_eq!(load.protocol, BootProtocol::Linux64);
    assert_eq!(load.entry, GuestAddress(0x10_0200));
    // init_size (8 MiB) exceeds the payload: the decompression area counts.
    assert_eq!(load.kernel_end, GuestAddress(0x10_0000 + 0x80_0000));
    assert_eq!(read_bytes(&mem, 0x10_0000, 0x3000), image[5 * 512..]);
    let stored = stored_setup_header(&mem).unwrap().unwrap();
    assert_eq!({ stored.version }, 0x020F);
    assert_eq!({ stored.code32_start }, 0x10_0000);
    assert_eq!({ stored.cmdline_size }, 2047);
}

#[test]
fn bzimage_bad_headers() {
    let mem = guest_mem(512 << 20);
    let variants: [fn(&mut setup_header); 4] = [
        |h| h.version = 0x020B,
        |h| h.loadflags = 0,
        |h| h.xloadflags = 0,
        |h| h.code32_start = 0x1000,
    ];
    for (i, f) in variants.iter().enumerate() {
        let mut hdr = bz_header();
        f(&mut hdr);
        let mut k = temp_file(&build_bzimage(&hdr, 0x1000));
        let err = load_kernel(&mem, &mut k.file).unwrap_err();
        assert!(
            matches!(err, Error::UnsupportedBzImage(_)),
            "variant {i}: {err}"
        );
    }
    // Setup sectors only, no payload.
    let mut k = temp_file(&build_bzimage(&bz_header(), 0));
    assert!(matches!(
        load_kernel(&mem, &mut k.file),
        Err(Error::UnsupportedBzImage(_))
    ));
}

#[test]
fn bzimage_too_large_for_memory() {
    let mem = guest_mem(8 << 20);
    let mut k = temp_file(&build_bzimage(&bz_header(), 0x1000));
    assert!(matches!(
        load_kernel(&mem, &mut k.file),
        Err(Error::KernelTooLarge {
            end: 0x90_0000,
            limit: 0x80_0000
        })
    ));
}

#[test]
fn elf_after_bzimage_clears_stored_header() {
    let mem = guest_mem(512 << 20);
    let mut k = temp_file(&build_bzimage(&bz_header(), 0x1000));
    load_kernel(&mem, &mut k.file).unwrap();
    let mut k = temp_file(&build_elf(&ElfSpec::default()));
    load_kernel(&mem, &mut k.file).unwrap();
    assert!(stored_setup_header(&mem).unwrap().is_none());
}

#[test]
fn initramfs_placed_high_and_aligned() {
    let mem = guest_mem(512 << 20);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
    let mut f = temp_file(&data);
    let info = load_initramfs(&mem, &mut f.file, GuestAddress(0x100_4000)).unwrap();
    assert_eq!(info.size, 10_000);
    assert_eq!(info.addr.raw_value() % 4096, 0);
    assert!(info.addr.raw_value() + 10_000 <= 512 << 20);
    assert!(
        info.addr.raw_value() + 10_000 + 4096 > 512 << 20,
        "as high as possible"
    );
    assert_eq!(read_bytes(&mem, info.addr.raw_value(), 10_000), data);
}

#[test]
fn initramfs_stays_below_gap_with_large_memory() {
    let mem = guest_mem(5 << 30);
    let mut f = temp_file(&[1u8; 5000]);
    let info = load_initramfs(&mem, &mut f.file, GuestAddress(0x200_0000)).unwrap();
    let end = info.addr.raw_value() + 5000;
    assert!(end <= MEM_32BIT_GAP_START && info.addr.raw_value() < FIRST_ADDR_PAST_32BITS);
    assert!(end > MEM_32BIT_GAP_START - 8192);
}

#[test]
fn initramfs_respects_initrd_addr_max() {
    let mem = guest_mem(1 << 30);
    let mut hdr = bz_header();
    hdr.initrd_addr_max = 0x0FFF_FFFF;
    let mut k = temp_file(&build_bzimage(&hdr, 0x1000));
    let load = load_kernel(&mem, &mut k.file).unwrap();
    let mut f = temp_file(&[2u8; 3000]);
    let info = load_initramfs(&mem, &mut f.file, load.kernel_end).unwrap();
    assert!(info.addr.raw_value() + 3000 <= 0x1000_0000);
    assert!(info.addr.raw_value() >= 0x1000_0000 - 0x2000);
}

#[test]
fn initramfs_errors() {
    let mem = guest_mem(16 << 20);
    let mut f = temp_file(&[]);
    assert!(matches!(
        load_initramfs(&mem, &mut f.file, GuestAddress(0x10_0000)),
        Err(Error::InitrdEmpty)
    ));
    // 8 MiB does not fit between a kernel ending at 10 MiB and 16 MiB.
    let mut f = temp_file(&vec![0u8; 8 << 20]);
    assert!(matches!(
        load_initramfs(&mem, &mut f.file, GuestAddress(10 << 20)),
        Err(Error::InitrdTooLarge { available, .. }) if available == 6 << 20
    ));
    // Kernel end beyond memory: nothing is available.
    let mut f = temp_file(&[0u8; 10]);
    assert!(matches!(
        load_initramfs(&mem, &mut f.file, GuestAddress(u64::MAX)),
        Err(Error::InitrdTooLarge { available: 0, .. })
    ));
}
