//! Test helpers: guest memory, temp files and tiny synthetic kernels.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use vm_memory::{ByteValued, GuestMemoryMmap};

use crate::layout::ram_regions;

/// Guest memory laid out as the VMM does (lazily allocated).
pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap<()> {
    GuestMemoryMmap::<()>::from_ranges(&ram_regions(size)).unwrap()
}

/// A temp file holding `bytes`, removed on drop.
pub(crate) struct TempFile {
    path: PathBuf,
    pub(crate) file: File,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn temp_file(bytes: &[u8]) -> TempFile {
    static N: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "ferry-arch-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mut f = File::create(&path).unwrap();
    f.write_all(bytes).unwrap();
    drop(f);
    let file = std::fs::OpenOptions::new().read(true).open(&path).unwrap();
    TempFile { path, file }
}

/// Parameters of a synthetic ELF kernel.
pub(crate) struct ElfSpec {
    pub(crate) paddr: u64,
    pub(crate) filesz: u64,
    pub(crate) memsz: u64,
    /// PVH entry note (name, type, 8-byte descriptor value); `None`: no note.
    pub(crate) note: Option<(&'static [u8; 4], u32, u64)>,
    pub(crate) class: u8,
    pub(crate) phnum_override: Option<u16>,
}

impl Default for ElfSpec {
    fn default() -> Self {
        ElfSpec {
            paddr: 0x100_0000,
            filesz: 0x100,
            memsz: 0x4000,
            note: Some((b"Xen\0", 18, 0x100_0040)),
            class: 2,
            phnum_override: None,
        }
    }
}

/// Minimal ELF64: header, PT_LOAD at file offset 0x1000, optional PT_NOTE
/// at 0x200 (preceded by an unrelated "GNU" note).
pub(crate) fn build_elf(spec: &ElfSpec) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + spec.filesz as usize];
    let put = |f: &mut Vec<u8>, off: usize, b: &[u8]| f[off..off + b.len()].copy_from_slice(b);
    let phnum: u16 = if spec.note.is_some() { 2 } else { 1 };
    put(&mut f, 0, b"\x7fELF");
    f[4] = spec.class;
    f[5] = 1; // little endian
    f[6] = 1; // EV_CURRENT
    put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
    put(&mut f, 18, &62u16.to_le_bytes()); // EM_X86_64
    put(&mut f, 20, &1u32.to_le_bytes());
    put(&mut f, 24, &(0xFFFF_FFFF_8100_0000u64).to_le_bytes()); // e_entry (virtual)
    put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
    put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
    put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
    put(
        &mut f,
        56,
        &spec.phnum_override.unwrap_or(phnum).to_le_bytes(),
    );

    // PT_LOAD
    let ph = 64;
    put(&mut f, ph, &1u32.to_le_bytes());
    put(&mut f, ph + 4, &7u32.to_le_bytes());
    put(&mut f, ph + 8, &0x1000u64.to_le_bytes()); // p_offset
    put(&mut f, ph + 16, &spec.paddr.to_le_bytes()); // p_vaddr
    put(&mut f, ph + 24, &spec.paddr.to_le_bytes()); // p_paddr
    put(&mut f, ph + 32, &spec.filesz.to_le_bytes());
    put(&mut f, ph + 40, &spec.memsz.to_le_bytes());
    put(&mut f, ph + 48, &0x1000u64.to_le_bytes());

    if let Some((name, ty, desc)) = spec.note {
        let mut notes = Vec::new();
        // An unrelated note first, to exercise note walking.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&3u32.to_le_bytes());
        notes.extend_from_slice(b"GNU\0");
        notes.extend_from_slice(&0u32.to_le_bytes());
        // The PVH note, 8-byte descriptor like Linux.
        notes.extend_from_slice(&4u32.to_le_bytes());
        notes.extend_from_slice(&8u32.to_le_bytes());
        notes.extend_from_slice(&ty.to_le_bytes());
        notes.extend_from_slice(name);
        notes.extend_from_slice(&desc.to_le_bytes());
        put(&mut f, 0x200, &notes);

        let ph = 64 + 56;
        put(&mut f, ph, &4u32.to_le_bytes()); // PT_NOTE
        put(&mut f, ph + 4, &4u32.to_le_bytes());
        put(&mut f, ph + 8, &0x200u64.to_le_bytes());
        put(&mut f, ph + 32, &(notes.len() as u64).to_le_bytes());
        put(&mut f, ph + 40, &(notes.len() as u64).to_le_bytes());
        put(&mut f, ph + 48, &4u64.to_le_bytes());
    }
    // Recognisable payload.
    for (i, b) in f[0x1000..].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    f
}

/// Setup header of a synthetic bzImage.
pub(crate) fn bz_header() -> setup_header {
    setup_header {
        setup_sects: 4,
        boot_flag: 0xAA55,
        header: 0x5372_6448,
        version: 0x020F,
        loadflags: LOADED_HIGH,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x7FFF_FFFF,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        xloadflags: XLF_KERNEL_64 | 2,
        cmdline_size: 2047,
        init_size: 0x80_0000,
        ..Default::default()
    }
}

/// Minimal bzImage: boot sector + 4 setup sectors, then `payload` bytes.
pub(crate) fn build_bzimage(hdr: &setup_header, payload: usize) -> Vec<u8> {
    let setup = (usize::from(hdr.setup_sects.max(1)) + 1) * 512;
    let mut f = vec![0u8; setup + payload];
    let h = hdr.as_slice();
    f[0x1F1..0x1F1 + h.len()].copy_from_slice(h);
    for (i, b) in f[setup..].iter_mut().enumerate() {
        *b = (i % 253) as u8 ^ 0x5A;
    }
    f
}
