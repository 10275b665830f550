//! Boot GDT: descriptor encoding and conversion to KVM segment registers.
//!
//! Selectors follow the Linux boot protocol (`__BOOT_CS` = 0x10,
//! `__BOOT_DS` = 0x18); PVH does not care about selector values.

use kvm_bindings::kvm_segment;

/// Number of 8-byte slots in the boot GDT (the TSS descriptor takes two in
/// long mode: slots 4 and 5).
pub const BOOT_GDT_ENTRIES: usize = 6;
/// GDT index of the code segment (selector 0x10, Linux `__BOOT_CS`).
pub const CODE_INDEX: u8 = 2;
/// GDT index of the data segment (selector 0x18, Linux `__BOOT_DS`).
pub const DATA_INDEX: u8 = 3;
/// GDT index of the TSS descriptor (selector 0x20).
pub const TSS_INDEX: u8 = 4;

/// Access/flags word for 64-bit code: G=1, L=1, P=1, DPL=0, S=1, type
/// 0xB (execute/read, accessed).
pub const FLAGS_CODE64: u16 = 0xA09B;
/// Access/flags word for 32-bit code: G=1, D=1, P=1, DPL=0, S=1, type 0xB.
pub const FLAGS_CODE32: u16 = 0xC09B;
/// Access/flags word for flat data: G=1, B=1, P=1, DPL=0, S=1, type 0x3
/// (read/write, accessed).
pub const FLAGS_DATA: u16 = 0xC093;
/// Access/flags word for the TSS: G=0, P=1, S=0, type 0xB (busy 32/64-bit
/// TSS, which VM entry requires for TR).
pub const FLAGS_TSS: u16 = 0x008B;
/// Byte-granular TSS limit required by PVH (a 104-byte 32-bit TSS).
pub const TSS_LIMIT: u32 = 0x67;

/// Encodes a legacy 8-byte segment descriptor.
///
/// `flags` is the access byte in bits 0..8 and the G/D/L/AVL nibble in bits
/// 12..16 (bits 8..12 are ignored); only the low 20 bits of `limit` are
/// representable and are interpreted in 4 KiB units when G=1.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    let flags = flags as u64;
    ((base & 0xFF00_0000) << 32)
        | ((flags & 0xF0FF) << 40)
        | ((limit & 0x000F_0000) << 32)
        | ((base & 0x00FF_FFFF) << 16)
        | (limit & 0xFFFF)
}

/// Base address encoded in a descriptor (32 bits).
pub const fn entry_base(entry: u64) -> u64 {
    ((entry >> 32) & 0xFF00_0000) | ((entry >> 16) & 0x00FF_FFFF)
}

/// Byte-granular limit encoded in a descriptor: scaled to bytes
/// (`limit << 12 | 0xFFF`) when G=1, as KVM's `kvm_segment.limit` expects.
pub const fn entry_limit(entry: u64) -> u32 {
    let raw = (((entry >> 32) & 0x000F_0000) | (entry & 0xFFFF)) as u32;
    if (entry >> 55) & 1 == 1 {
        (raw << 12) | 0xFFF
    } else {
        raw
    }
}

/// KVM segment register state equivalent to loading GDT slot `index`
/// holding `entry`: selector = `index * 8` (RPL 0, GDT), base, scaled limit
/// and attribute bits decoded from the descriptor; a non-present
/// descriptor yields an `unusable` segment.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let present = bit(47);
    kvm_segment {
        base: entry_base(entry),
        limit: entry_limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xF) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT for a given code segment flavour: null, null, code
/// (`code_flags`), flat data, TSS (base 0, limit 0x67) and the zero upper
/// half of the 16-byte long-mode TSS descriptor.
pub fn boot_gdt(code_flags: u16) -> [u64; BOOT_GDT_ENTRIES] {
    [
        0,
        0,
        gdt_entry(code_flags, 0, 0xFFFFF),
        gdt_entry(FLAGS_DATA, 0, 0xFFFFF),
        gdt_entry(FLAGS_TSS, 0, TSS_LIMIT),
        0,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        assert_eq!(gdt_entry(FLAGS_CODE64, 0, 0xFFFFF), 0x00AF_9B00_0000_FFFF);
        assert_eq!(gdt_entry(FLAGS_CODE32, 0, 0xFFFFF), 0x00CF_9B00_0000_FFFF);
        assert_eq!(gdt_entry(FLAGS_DATA, 0, 0xFFFFF), 0x00CF_9300_0000_FFFF);
        assert_eq!(gdt_entry(FLAGS_TSS, 0, 0x67), 0x0000_8B00_0000_0067);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xABCDE);
        assert_eq!(entry_base(e), 0x1234_5678);
        assert_eq!(entry_limit(e), 0xABCDE);
        let g = gdt_entry(0xC093, 0xFF00_0001, 0x1);
        assert_eq!(entry_base(g), 0xFF00_0001);
        assert_eq!(entry_limit(g), 0x1FFF);
    }

    #[test]
    fn code64_segment() {
        let s = kvm_segment_from_gdt(gdt_entry(FLAGS_CODE64, 0, 0xFFFFF), CODE_INDEX);
        assert_eq!(s.selector, 0x10);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xFFFF_FFFF);
        assert_eq!(s.type_, 0xB);
        assert_eq!((s.present, s.dpl, s.db, s.s, s.l, s.g), (1, 0, 0, 1, 1, 1));
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn code32_data_and_tss_segments() {
        let c = kvm_segment_from_gdt(gdt_entry(FLAGS_CODE32, 0, 0xFFFFF), CODE_INDEX);
        assert_eq!((c.db, c.l, c.g, c.limit), (1, 0, 1, 0xFFFF_FFFF));
        let d = kvm_segment_from_gdt(gdt_entry(FLAGS_DATA, 0, 0xFFFFF), DATA_INDEX);
        assert_eq!(
            (d.selector, d.type_, d.db, d.s, d.limit),
            (0x18, 3, 1, 1, 0xFFFF_FFFF)
        );
        let t = kvm_segment_from_gdt(gdt_entry(FLAGS_TSS, 0, TSS_LIMIT), TSS_INDEX);
        assert_eq!(
            (t.selector, t.type_, t.s, t.g, t.limit, t.present),
            (0x20, 11, 0, 0, 0x67, 1)
        );
    }

    #[test]
    fn null_descriptor_is_unusable() {
        let s = kvm_segment_from_gdt(0, 0);
        assert_eq!((s.present, s.unusable), (0, 1));
    }

    #[test]
    fn boot_gdt_layout() {
        let g = boot_gdt(FLAGS_CODE64);
        assert_eq!(g[0], 0);
        assert_eq!(g[CODE_INDEX as usize], 0x00AF_9B00_0000_FFFF);
        assert_eq!(g[DATA_INDEX as usize], 0x00CF_9300_0000_FFFF);
        assert_eq!(g[TSS_INDEX as usize] & 0xFFFF, 0x67);
        assert_eq!(g[5], 0);
    }
}
