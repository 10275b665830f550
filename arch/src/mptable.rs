//! Intel MultiProcessor Specification 1.4 tables (floating pointer and
//! configuration table), for guests booted with `acpi=off` or without ACPI
//! support. Modern kernels prefer the ACPI MADT ([`crate::acpi`]).

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::bytes::{checksum, ByteBuf};
use crate::layout::{
    APIC_ADDR, IOAPIC_ADDR, IOAPIC_NUM_PINS, MAX_SUPPORTED_CPUS, MPTABLE_MAX_SIZE,
};
use crate::{Error, Result};

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SPEC: u8 = 4; // MP spec 1.4
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Family 6 stepping signature reported for every CPU entry.
const CPU_SIGNATURE: u32 = 0x600;
/// CPU feature flags: FPU (bit 0) and on-chip APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 9) | 1;
const BUS_ID_ISA: u8 = 0;

/// Size of the MP floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const MPC_HEADER_SIZE: usize = 44;
/// Size of one processor entry (all other entry types are 8 bytes).
pub const MPC_CPU_SIZE: usize = 20;

/// IOAPIC ID used in the MP table and MADT: one past the last APIC ID.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

/// Builds the MP floating pointer followed by the configuration table, as
/// it must appear at guest-physical `addr` (the floating pointer's
/// `physptr` is `addr + 16`).
///
/// The config table holds `num_cpus` processor entries (APIC IDs
/// `0..num_cpus`, CPU 0 the BSP), one ISA bus, one IOAPIC (ID
/// [`ioapic_id`]) at [`IOAPIC_ADDR`], ISA IRQ 0 routed to IOAPIC pin 2 (as
/// KVM wires the PIT), IRQs `1..24` except 2 identity-routed, and LINT0
/// ExtINT / LINT1 NMI on all local APICs. Both structures carry valid
/// checksums. Fails if `num_cpus` is not in `1..=MAX_SUPPORTED_CPUS`.
pub fn build_mptable(addr: u64, num_cpus: u8) -> Result<Vec<u8>> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(Error::InvalidCpuCount(num_cpus));
    }
    let table_addr = u32::try_from(addr + MPF_SIZE as u64).map_err(|_| Error::TableTooLarge {
        what: "MP table (address above 4 GiB)",
        size: 0,
        max: 0,
    })?;

    let mut entries = ByteBuf::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries
            .u8(MP_PROCESSOR)
            .u8(cpu)
            .u8(APIC_VERSION)
            .u8(flags)
            .u32(CPU_SIGNATURE)
            .u32(CPU_FEATURES)
            .zeros(8);
        count += 1;
    }
    entries.u8(MP_BUS).u8(BUS_ID_ISA).bytes(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(num_cpus);
    entries
        .u8(MP_IOAPIC)
        .u8(ioapic)
        .u8(IOAPIC_VERSION)
        .u8(MPC_APIC_USABLE)
        .u32(IOAPIC_ADDR);
    count += 1;
    for (src, dst) in isa_irq_routes() {
        entries
            .u8(MP_INTSRC)
            .u8(MP_IRQ_INT)
            .u16(0) // polarity/trigger: conforms to bus
            .u8(BUS_ID_ISA)
            .u8(src)
            .u8(ioapic)
            .u8(dst);
        count += 1;
    }
    for (kind, lint) in [(MP_IRQ_EXTINT, 0u8), (MP_IRQ_NMI, 1u8)] {
        entries
            .u8(MP_LINTSRC)
            .u8(kind)
            .u16(0)
            .u8(BUS_ID_ISA)
            .u8(0)
            .u8(0xFF) // all local APICs
            .u8(lint);
        count += 1;
    }

    let table_len = MPC_HEADER_SIZE + entries.len();
    let total = MPF_SIZE + table_len;
    if total > MPTABLE_MAX_SIZE {
        return Err(Error::TableTooLarge {
            what: "MP table",
            size: total,
            max: MPTABLE_MAX_SIZE,
        });
    }

    let mut mpc = ByteBuf::new();
    mpc.bytes(MPC_SIGNATURE)
        .u16(table_len as u16) // <= MPTABLE_MAX_SIZE - 16 < 64 KiB
        .u8(MPC_SPEC)
        .u8(0) // checksum
        .bytes(b"FERRY   ")
        .bytes(b"FERRYVMM    ")
        .u32(0) // OEM table pointer
        .u16(0) // OEM table size
        .u16(count)
        .u32(APIC_ADDR)
        .u16(0) // extended table length
        .u8(0) // extended table checksum
        .u8(0);
    mpc.bytes(&entries.0);
    let c = checksum(&mpc.0);
    mpc.0[7] = c;

    let mut mpf = ByteBuf::new();
    mpf.bytes(MPF_SIGNATURE)
        .u32(table_addr)
        .u8(1) // length in 16-byte paragraphs
        .u8(MPC_SPEC)
        .u8(0) // checksum
        .u8(0) // feature 1: a configuration table is present
        .u8(0) // feature 2: IMCR absent, virtual wire mode
        .zeros(3);
    let c = checksum(&mpf.0);
    mpf.0[10] = c;

    mpf.bytes(&mpc.0);
    Ok(mpf.0)
}

/// Writes [`build_mptable`]`(addr, num_cpus)` to guest memory at `addr`.
pub fn setup_mptable<M: GuestMemoryBackend>(
    mem: &M,
    addr: GuestAddress,
    num_cpus: u8,
) -> Result<()> {
    let table = build_mptable(addr.0, num_cpus)?;
    mem.write_slice(&table, addr)
        .map_err(|source| Error::GuestWrite {
            what: "MP table",
            source,
        })
}

/// ISA IRQ -> IOAPIC pin routes: IRQ 0 -> pin 2, then identity for every
/// other pin except 2.
pub(crate) fn isa_irq_routes() -> impl Iterator<Item = (u8, u8)> {
    std::iter::once((0, 2)).chain((1..IOAPIC_NUM_PINS).filter(|&i| i != 2).map(|i| (i, i)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::sum;
    use crate::layout::MPTABLE_START;
    use crate::test_utils::guest_mem;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }

    /// Parses the config table entries, returning counts per type.
    fn entry_counts(mpc: &[u8]) -> [usize; 5] {
        let mut counts = [0; 5];
        let mut off = MPC_HEADER_SIZE;
        for _ in 0..u16_at(mpc, 34) {
            let t = mpc[off] as usize;
            counts[t] += 1;
            off += if t == 0 { MPC_CPU_SIZE } else { 8 };
        }
        assert_eq!(off, mpc.len());
        counts
    }

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 8, 254] {
            let t = build_mptable(MPTABLE_START, n).unwrap();
            let (mpf, mpc) = t.split_at(MPF_SIZE);
            assert_eq!(&mpf[..4], b"_MP_");
            assert_eq!(sum(mpf), 0, "floating pointer checksum");
            assert_eq!(u32_at(mpf, 4) as u64, MPTABLE_START + 16);
            assert_eq!((mpf[8], mpf[9]), (1, 4));
            assert_eq!(&mpc[..4], b"PCMP");
            assert_eq!(u16_at(mpc, 4) as usize, mpc.len());
            assert_eq!(sum(mpc), 0, "config table checksum");
            assert_eq!(u32_at(mpc, 36), 0xFEE0_0000);
            let c = entry_counts(mpc);
            assert_eq!(c, [n as usize, 1, 1, 23, 2]);
        }
    }

    #[test]
    fn processor_and_ioapic_entries() {
        let t = build_mptable(MPTABLE_START, 3).unwrap();
        let mpc = &t[MPF_SIZE..];
        let cpu = |i: usize| &mpc[MPC_HEADER_SIZE + i * MPC_CPU_SIZE..];
        assert_eq!((cpu(0)[1], cpu(0)[3]), (0, CPU_ENABLED | CPU_BOOTPROCESSOR));
        assert_eq!((cpu(2)[1], cpu(2)[3]), (2, CPU_ENABLED));
        let io = &mpc[MPC_HEADER_SIZE + 3 * MPC_CPU_SIZE + 8..];
        assert_eq!((io[0], io[1], io[3]), (MP_IOAPIC, 3, 1));
        assert_eq!(u32_at(io, 4), 0xFEC0_0000);
        let irq0 = &io[8..];
        assert_eq!((irq0[0], irq0[5], irq0[6], irq0[7]), (MP_INTSRC, 0, 3, 2));
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(matches!(
            build_mptable(MPTABLE_START, 0),
            Err(Error::InvalidCpuCount(0))
        ));
        assert!(matches!(
            build_mptable(MPTABLE_START, 255),
            Err(Error::InvalidCpuCount(255))
        ));
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = guest_mem(512 << 20);
        setup_mptable(&mem, GuestAddress(MPTABLE_START), 4).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START + 16))
            .unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
