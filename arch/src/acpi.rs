//! ACPI tables: RSDP (v2) -> XSDT -> {FADT -> DSDT, MADT}.
//!
//! The platform is described as *hardware-reduced* ACPI (FADT flag
//! `HW_REDUCED_ACPI`): no PM timer, SCI, GPE or fixed-feature registers
//! exist, which Linux accepts and which matches a VMM without an ACPI PM
//! device. The FADT still advertises the i8042 and "no VGA", and it points
//! its reset register and its sleep control/status registers at the VMM's
//! one-byte power port ([`ACPI_POWER_PORT`]): writing [`ACPI_RESET_VALUE`]
//! resets the machine, writing `SLP_EN | SLP_TYP(5)` powers it off.
//!
//! Hardware-reduced ACPI makes Linux drop the legacy PIC and with it the
//! fixed ISA IRQ numbers, so the DSDT (AML built with `acpi_tables`)
//! declares COM1 (PNP0501, IRQ 4) and the i8042 keyboard port (PNP0303,
//! IRQ 1) with their resources, and the `_S5_` sleep type. The MADT lists
//! the local APICs, the IOAPIC, the IRQ0 -> GSI2 override and LINT1 NMI.
//!
//! PCI: the MCFG points at the ECAM of bus 0 ([`crate::pci`]), and the DSDT
//! declares the host bridge `\_SB_.PCI0` (PNP0A08, bus 0, the legacy config
//! ports, the I/O BAR window and the 32-bit and 64-bit MMIO windows) and a
//! motherboard resource `\_SB_.MBRD` (PNP0C02) claiming the ECAM.

use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::bytes::{checksum, ByteBuf};
use crate::layout::{ACPI_MAX_SIZE, ACPI_START, APIC_ADDR, IOAPIC_ADDR, MAX_SUPPORTED_CPUS};
use crate::mptable::ioapic_id;
use crate::pci::{
    mmio64_window, PCI_CONFIG_ADDRESS_PORT, PCI_ECAM_BASE, PCI_ECAM_SIZE, PCI_IO_END, PCI_IO_START,
    PCI_MMIO32_END, PCI_MMIO32_START,
};
use crate::{Error, Result};

/// OEM ID in every table.
pub const OEM_ID: &[u8; 6] = b"FERRY ";
/// OEM table ID in every table.
pub const OEM_TABLE_ID: &[u8; 8] = b"FERRYVMM";
/// Creator ID in every table.
pub const CREATOR_ID: &[u8; 4] = b"FRRY";
/// Size of the common system description table header.
pub const SDT_HEADER_SIZE: usize = 36;
/// Size of an ACPI 2.0+ RSDP.
pub const RSDP_SIZE: usize = 36;
/// Size of a revision 6 FADT.
pub const FADT_SIZE: usize = 276;
/// Size of the MCFG with its one allocation entry.
pub const MCFG_SIZE: usize = 60;

/// FADT flag: power button is a control-method device (none here).
const FADT_F_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag: sleep button is a control-method device (none here).
const FADT_F_SLP_BUTTON: u32 = 1 << 5;
/// FADT flag: hardware-reduced ACPI.
pub const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flag: the reset register is supported.
pub const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
/// I/O port of the VMM's ACPI power device: the FADT's reset register and
/// its sleep control and status registers are this one byte. It is outside
/// every legacy ISA range (0x3c0 would be VGA's attribute controller, which
/// a guest may program with the reset value).
pub const ACPI_POWER_PORT: u16 = 0x600;
/// Value the guest writes to the reset register ([`ACPI_POWER_PORT`]).
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// Sleep type of S5 (soft off), as `_S5_` declares it.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register bit: enter the sleep state written in SLP_TYP.
pub const ACPI_SLP_EN: u8 = 1 << 5;
/// Bits 2..4 of the sleep control register hold SLP_TYP.
pub const ACPI_SLP_TYP_SHIFT: u8 = 2;
/// IA-PC boot architecture flag: an 8042 keyboard controller is present.
pub const IAPC_BOOT_ARCH_8042: u16 = 1 << 1;
/// IA-PC boot architecture flag: VGA must not be probed.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT flag: dual 8259 PICs are present (KVM's in-kernel irqchip has them).
const MADT_PCAT_COMPAT: u32 = 1;
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INT_SRC_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT local APIC flag: processor enabled.
const MADT_LAPIC_ENABLED: u32 = 1;

/// Guest-physical addresses of each table produced by [`build_acpi_tables`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    /// RSDP (always the window base, 16-byte aligned).
    pub rsdp: u64,
    /// XSDT.
    pub xsdt: u64,
    /// FADT ("FACP").
    pub fadt: u64,
    /// DSDT.
    pub dsdt: u64,
    /// MADT ("APIC").
    pub madt: u64,
    /// MCFG (PCI ECAM).
    pub mcfg: u64,
}

fn sdt_header(sig: &[u8; 4], revision: u8) -> ByteBuf {
    let mut b = ByteBuf::new();
    b.bytes(sig)
        .u32(0) // length, fixed up by finish_sdt
        .u8(revision)
        .u8(0) // checksum
        .bytes(OEM_ID)
        .bytes(OEM_TABLE_ID)
        .u32(1) // OEM revision
        .bytes(CREATOR_ID)
        .u32(1); // creator revision
    b
}

/// Sets the length and checksum fields of a complete table.
fn finish_sdt(mut b: ByteBuf) -> Vec<u8> {
    // Tables are bounded by ACPI_MAX_SIZE (checked by the caller) < 4 GiB.
    let len = b.len() as u32;
    b.put_u32(4, len);
    let c = checksum(&b.0);
    b.0[9] = c;
    b.0
}

fn gas_zero(b: &mut ByteBuf) {
    b.zeros(12);
}

/// A generic address structure for one byte of system I/O space at `port`.
fn gas_io_byte(b: &mut ByteBuf, port: u16) {
    b.u8(1) // address space: system I/O
        .u8(8) // register bit width
        .u8(0) // bit offset
        .u8(1) // access size: byte
        .u64(u64::from(port));
}

fn build_fadt(dsdt: u64) -> Vec<u8> {
    let mut b = sdt_header(b"FACP", 6);
    b.u32(0) // FIRMWARE_CTRL: no FACS (optional when hardware-reduced)
        .u32(dsdt as u32) // DSDT (below 1 MiB)
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(0) // SCI_INT
        .u32(0) // SMI_CMD: no SMM, already in ACPI mode
        .zeros(4) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .zeros(8 * 4) // PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM TMR, GPE0, GPE1
        .zeros(8) // block lengths, GPE1_BASE, CST_CNT
        .zeros(8) // P_LVL2/3 latencies, FLUSH_SIZE/STRIDE
        .zeros(5) // duty cycle, RTC alarm/century indices
        .u16(IAPC_BOOT_ARCH_8042 | IAPC_BOOT_ARCH_VGA_NOT_PRESENT)
        .u8(0) // reserved
        .u32(FADT_F_HW_REDUCED_ACPI | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP);
    gas_io_byte(&mut b, ACPI_POWER_PORT); // RESET_REG
    b.u8(ACPI_RESET_VALUE) // RESET_VALUE
        .u16(0) // ARM_BOOT_ARCH
        .u8(5) // FADT minor version (ACPI 6.5)
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt); // X_DSDT
    for _ in 0..8 {
        gas_zero(&mut b); // X_PM1a_EVT .. X_GPE1 blocks
    }
    gas_io_byte(&mut b, ACPI_POWER_PORT); // SLEEP_CONTROL_REG
    gas_io_byte(&mut b, ACPI_POWER_PORT); // SLEEP_STATUS_REG
    b.bytes(b"FERRYVMM"); // hypervisor vendor identity
    finish_sdt(b)
}

/// COM1 port base and IRQ, and the i8042 ports and IRQ, as the DSDT
/// declares them (the VMM's port bus decodes the same numbers).
const COM1_BASE: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const I8042_DATA: u16 = 0x60;
const I8042_CMD: u16 = 0x64;
const I8042_IRQ: u32 = 1;

/// The DSDT: `\_SB.COM1`, `\_SB.PS2K`, `\_SB.PCI0`, `\_SB.MBRD` and
/// `\_S5_`; `mmio64` is the 64-bit PCI window.
fn build_dsdt(mmio64: &std::ops::Range<u64>) -> Vec<u8> {
    // Extended IRQ descriptor: consumer, edge-triggered, active high,
    // exclusive (the ISA defaults).
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_uid = aml::Name::new("_UID".into(), &aml::ONE);
    let com1_hid = aml::Name::new("_HID".into(), &com1_hid);
    let com1_crs = aml::Name::new("_CRS".into(), &com1_crs);
    let com1 = aml::Device::new("COM1".into(), vec![&com1_hid, &com1_uid, &com1_crs]);

    let kbd_data = aml::IO::new(I8042_DATA, I8042_DATA, 1, 1);
    let kbd_cmd = aml::IO::new(I8042_CMD, I8042_CMD, 1, 1);
    let kbd_irq = aml::Interrupt::new(true, true, false, false, I8042_IRQ);
    let kbd_crs = aml::ResourceTemplate::new(vec![&kbd_data, &kbd_cmd, &kbd_irq]);
    let kbd_hid = aml::EISAName::new("PNP0303");
    let kbd_hid = aml::Name::new("_HID".into(), &kbd_hid);
    let kbd_crs = aml::Name::new("_CRS".into(), &kbd_crs);
    let kbd = aml::Device::new("PS2K".into(), vec![&kbd_hid, &kbd_crs]);

    // PCI host bridge of segment 0, bus 0.
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");
    let pci_hid = aml::Name::new("_HID".into(), &pci_hid);
    let pci_cid = aml::Name::new("_CID".into(), &pci_cid);
    let pci_adr = aml::Name::new("_ADR".into(), &aml::ZERO);
    let pci_seg = aml::Name::new("_SEG".into(), &aml::ZERO);
    let pci_bbn = aml::Name::new("_BBN".into(), &aml::ZERO);
    let pci_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_io = aml::IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8);
    // The constants are below 2^16 / 2^32 (checked in tests::pci_constants_fit).
    let bar_io = aml::AddressSpace::new_io(PCI_IO_START as u16, (PCI_IO_END - 1) as u16, None);
    let mem32 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32_START as u32,
        (PCI_MMIO32_END - 1) as u32,
        None,
    );
    let mem64 = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::NotCacheable,
        true,
        mmio64.start,
        mmio64.end - 1,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![&bus, &cfg_io, &bar_io, &mem32, &mem64]);
    let pci_crs = aml::Name::new("_CRS".into(), &pci_crs);
    let pci0 = aml::Device::new(
        "PCI0".into(),
        vec![
            &pci_hid, &pci_cid, &pci_adr, &pci_seg, &pci_bbn, &pci_uid, &pci_crs,
        ],
    );

    // The ECAM as a motherboard resource (Linux checks that it is claimed).
    let mbrd_hid = aml::EISAName::new("PNP0C02");
    let mbrd_hid = aml::Name::new("_HID".into(), &mbrd_hid);
    let mbrd_uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let ecam = aml::Memory32Fixed::new(false, PCI_ECAM_BASE as u32, PCI_ECAM_SIZE as u32);
    let mbrd_crs = aml::ResourceTemplate::new(vec![&ecam]);
    let mbrd_crs = aml::Name::new("_CRS".into(), &mbrd_crs);
    let mbrd = aml::Device::new("MBRD".into(), vec![&mbrd_hid, &mbrd_uid, &mbrd_crs]);

    let sb = aml::Scope::new("\\_SB_".into(), vec![&com1, &kbd, &pci0, &mbrd]);
    let s5_type = ACPI_S5_SLEEP_TYPE;
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type]));

    let mut b = sdt_header(b"DSDT", 2);
    let mut body: Vec<u8> = Vec::new();
    sb.to_aml_bytes(&mut body);
    s5.to_aml_bytes(&mut body);
    b.bytes(&body);
    finish_sdt(b)
}

fn build_madt(num_cpus: u8) -> Vec<u8> {
    let mut b = sdt_header(b"APIC", 6);
    b.u32(APIC_ADDR).u32(MADT_PCAT_COMPAT);
    for cpu in 0..num_cpus {
        b.u8(MADT_LOCAL_APIC)
            .u8(8)
            .u8(cpu) // ACPI processor UID
            .u8(cpu) // APIC ID
            .u32(MADT_LAPIC_ENABLED);
    }
    b.u8(MADT_IO_APIC)
        .u8(12)
        .u8(ioapic_id(num_cpus))
        .u8(0)
        .u32(IOAPIC_ADDR)
        .u32(0); // GSI base
    b.u8(MADT_INT_SRC_OVERRIDE)
        .u8(10)
        .u8(0) // bus: ISA
        .u8(0) // source: IRQ 0 (PIT)
        .u32(2) // GSI 2
        .u16(0); // flags: conforms to bus
    b.u8(MADT_LOCAL_APIC_NMI)
        .u8(6)
        .u8(0xFF) // all processors
        .u16(0)
        .u8(1); // LINT1
    finish_sdt(b)
}

/// The MCFG: one allocation for the ECAM of segment 0, buses 0..=0.
fn build_mcfg() -> Vec<u8> {
    let mut b = sdt_header(b"MCFG", 1);
    b.zeros(8) // reserved
        .u64(PCI_ECAM_BASE)
        .u16(0) // PCI segment group
        .u8(0) // start bus
        .u8(0) // end bus
        .u32(0); // reserved
    finish_sdt(b)
}

fn build_xsdt(entries: &[u64]) -> Vec<u8> {
    let mut b = sdt_header(b"XSDT", 1);
    for e in entries {
        b.u64(*e);
    }
    finish_sdt(b)
}

fn build_rsdp(xsdt: u64) -> Vec<u8> {
    let mut b = ByteBuf::new();
    b.bytes(b"RSD PTR ")
        .u8(0) // checksum of the first 20 bytes
        .bytes(OEM_ID)
        .u8(2) // revision: ACPI 2.0+
        .u32(0) // RSDT address: none, XSDT only
        .u32(RSDP_SIZE as u32)
        .u64(xsdt)
        .u8(0) // extended checksum
        .zeros(3);
    let c = checksum(&b.0[..20]);
    b.0[8] = c;
    let c = checksum(&b.0);
    b.0[32] = c;
    b.0
}

const fn align16(x: usize) -> usize {
    (x + 15) & !15
}

/// Builds every ACPI table for `num_cpus` vCPUs as one image to be copied
/// to guest-physical `base` (RSDP first, at `base`, which must be 16-byte
/// aligned for the RSDP scan to find it). Tables are 16-byte aligned, all
/// checksums valid, and the whole image is at most [`ACPI_MAX_SIZE`].
/// `ram_end` (first address past RAM, [`crate::layout::ram_end`]) places
/// the 64-bit PCI window the DSDT declares.
pub fn build_acpi_tables(base: u64, num_cpus: u8, ram_end: u64) -> Result<(AcpiLayout, Vec<u8>)> {
    if num_cpus == 0 || num_cpus > MAX_SUPPORTED_CPUS {
        return Err(Error::InvalidCpuCount(num_cpus));
    }
    let mut image: Vec<u8> = Vec::new();
    let place = |table: &[u8], image: &mut Vec<u8>| -> u64 {
        let off = align16(image.len());
        image.resize(off, 0);
        image.extend_from_slice(table);
        base + off as u64
    };

    // The DSDT does not depend on any address, so it is built first; then
    // every address is known before the tables that point at others.
    let dsdt = build_dsdt(&mmio64_window(ram_end));
    let rsdp_at = 0usize;
    let xsdt_at = align16(rsdp_at + RSDP_SIZE);
    let xsdt_len = SDT_HEADER_SIZE + 3 * 8;
    let dsdt_at = align16(xsdt_at + xsdt_len);
    let fadt_at = align16(dsdt_at + dsdt.len());
    let madt_at = align16(fadt_at + FADT_SIZE);
    let madt = build_madt(num_cpus);
    let mcfg_at = align16(madt_at + madt.len());
    let layout = AcpiLayout {
        rsdp: base + rsdp_at as u64,
        xsdt: base + xsdt_at as u64,
        dsdt: base + dsdt_at as u64,
        fadt: base + fadt_at as u64,
        madt: base + madt_at as u64,
        mcfg: base + mcfg_at as u64,
    };

    let placed = [
        place(&build_rsdp(layout.xsdt), &mut image),
        place(
            &build_xsdt(&[layout.fadt, layout.madt, layout.mcfg]),
            &mut image,
        ),
        place(&dsdt, &mut image),
        place(&build_fadt(layout.dsdt), &mut image),
        place(&madt, &mut image),
        place(&build_mcfg(), &mut image),
    ];
    debug_assert_eq!(
        placed,
        [
            layout.rsdp,
            layout.xsdt,
            layout.dsdt,
            layout.fadt,
            layout.madt,
            layout.mcfg
        ]
    );
    if image.len() > ACPI_MAX_SIZE {
        return Err(Error::TableTooLarge {
            what: "ACPI tables",
            size: image.len(),
            max: ACPI_MAX_SIZE,
        });
    }
    Ok((layout, image))
}

/// Writes the ACPI tables for `num_cpus` vCPUs (RAM ending at `ram_end`,
/// see [`build_acpi_tables`]) at [`ACPI_START`] and returns the RSDP
/// address (for `hvm_start_info.rsdp_paddr` / `boot_params.acpi_rsdp_addr`).
pub fn setup_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    num_cpus: u8,
    ram_end: u64,
) -> Result<GuestAddress> {
    let (layout, image) = build_acpi_tables(ACPI_START, num_cpus, ram_end)?;
    mem.write_slice(&image, GuestAddress(ACPI_START))
        .map_err(|source| Error::GuestWrite {
            what: "ACPI tables",
            source,
        })?;
    Ok(GuestAddress(layout.rsdp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bytes::sum;
    use crate::test_utils::guest_mem;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    /// The table at guest address `addr`, sliced by its length field.
    fn table(image: &[u8], addr: u64) -> &[u8] {
        let off = (addr - ACPI_START) as usize;
        let len = u32_at(image, off + 4) as usize;
        &image[off..off + len]
    }

    #[test]
    fn rsdp_checksums() {
        let (l, img) = build_acpi_tables(ACPI_START, 2, 512 << 20).unwrap();
        let rsdp = &img[..RSDP_SIZE];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "v1 checksum");
        assert_eq!(sum(rsdp), 0, "extended checksum");
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(rsdp, 20) as usize, RSDP_SIZE);
        assert_eq!(u64_at(rsdp, 24), l.xsdt);
        assert_eq!(l.rsdp % 16, 0);
    }

    #[test]
    fn xsdt_fadt_dsdt() {
        let (l, img) = build_acpi_tables(ACPI_START, 2, 512 << 20).unwrap();
        let xsdt = table(&img, l.xsdt);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        assert_eq!(xsdt.len(), 36 + 24);
        assert_eq!(
            (u64_at(xsdt, 36), u64_at(xsdt, 44), u64_at(xsdt, 52)),
            (l.fadt, l.madt, l.mcfg)
        );

        let fadt = table(&img, l.fadt);
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(fadt.len(), FADT_SIZE);
        assert_eq!(sum(fadt), 0);
        assert_eq!(fadt[8], 6);
        assert_ne!(u32_at(fadt, 112) & FADT_F_HW_REDUCED_ACPI, 0);
        assert_eq!(u64_at(fadt, 140), l.dsdt);
        assert_eq!(u32_at(fadt, 40) as u64, l.dsdt);
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0x6);
        assert_eq!(&fadt[268..276], b"FERRYVMM");

        // Reset register and sleep registers: one byte of system I/O at
        // the power port; the reset register is flagged as supported.
        assert_ne!(u32_at(fadt, 112) & FADT_F_RESET_REG_SUP, 0);
        for off in [116usize, 244, 256] {
            assert_eq!(&fadt[off..off + 4], &[1, 8, 0, 1], "GAS at {off}");
            assert_eq!(u64_at(fadt, off + 4), u64::from(ACPI_POWER_PORT));
        }
        assert_eq!(fadt[128], ACPI_RESET_VALUE);

        let dsdt = table(&img, l.dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.len() > SDT_HEADER_SIZE);
        assert_eq!(sum(dsdt), 0);
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    #[test]
    fn dsdt_declares_com1_keyboard_and_s5() {
        let (l, img) = build_acpi_tables(ACPI_START, 1, 512 << 20).unwrap();
        let dsdt = &table(&img, l.dsdt)[SDT_HEADER_SIZE..];
        // DeviceOp (0x5B 0x82) named COM1 and PS2K inside \_SB_.
        assert!(find(dsdt, b"\\_SB_").is_some());
        for name in [&b"COM1"[..], b"PS2K"] {
            let at = find(dsdt, name).expect("device name");
            assert_eq!(
                &dsdt[at - 3..at - 1],
                &[0x5b, 0x82],
                "DeviceOp before {name:?}"
            );
        }
        // EISA ids: PNP0501 = 41 D0 05 01, PNP0303 = 41 D0 03 03 (DWordConst 0x0C).
        assert!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]).is_some());
        assert!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x03, 0x03]).is_some());
        // IO descriptors (0x47, decode16, min, max, align, len) for the ports.
        assert!(find(dsdt, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]).is_some());
        assert!(find(dsdt, &[0x47, 1, 0x60, 0, 0x60, 0, 1, 1]).is_some());
        assert!(find(dsdt, &[0x47, 1, 0x64, 0, 0x64, 0, 1, 1]).is_some());
        // Extended IRQ descriptors: 0x89, len 6, flags consumer|edge, 1 irq.
        assert!(find(dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]).is_some());
        assert!(find(dsdt, &[0x89, 6, 0, 0x03, 1, 1, 0, 0, 0]).is_some());
        // Name(_S5_, Package(1) { 5 }): NameOp, name, PackageOp.
        let at = find(dsdt, b"_S5_").expect("_S5_");
        assert_eq!(dsdt[at - 1], 0x08, "NameOp");
        assert_eq!(dsdt[at + 4], 0x12, "PackageOp");
        assert!(dsdt[at + 5..].contains(&ACPI_S5_SLEEP_TYPE));
    }

    #[test]
    fn madt_entries() {
        for n in [1u8, 4, 254] {
            let (l, img) = build_acpi_tables(ACPI_START, n, 512 << 20).unwrap();
            let madt = table(&img, l.madt);
            assert_eq!(&madt[..4], b"APIC");
            assert_eq!(sum(madt), 0);
            assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
            let mut off = 44;
            let mut counts = [0usize; 5];
            let mut apic_ids = Vec::new();
            while off < madt.len() {
                let (t, len) = (madt[off] as usize, madt[off + 1] as usize);
                assert!(len >= 2);
                counts[t] += 1;
                match t {
                    0 => {
                        apic_ids.push(madt[off + 3]);
                        assert_eq!(u32_at(madt, off + 4), 1);
                    }
                    1 => {
                        assert_eq!(madt[off + 2], n);
                        assert_eq!(u32_at(madt, off + 4), 0xFEC0_0000);
                    }
                    2 => assert_eq!((madt[off + 3], u32_at(madt, off + 4)), (0, 2)),
                    _ => {}
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(counts, [n as usize, 1, 1, 0, 1]);
            assert_eq!(apic_ids, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn pci_constants_fit() {
        const {
            assert!(PCI_IO_END - 1 <= u16::MAX as u64);
            assert!(PCI_MMIO32_END - 1 <= u32::MAX as u64);
            assert!(PCI_ECAM_BASE + PCI_ECAM_SIZE <= u32::MAX as u64);
        }
    }

    #[test]
    fn mcfg_bytes() {
        let (l, img) = build_acpi_tables(ACPI_START, 2, 512 << 20).unwrap();
        let mcfg = table(&img, l.mcfg);
        assert_eq!(&mcfg[..4], b"MCFG");
        assert_eq!(mcfg.len(), MCFG_SIZE);
        assert_eq!(mcfg[8], 1, "revision");
        assert_eq!(sum(mcfg), 0);
        assert_eq!(u64_at(mcfg, 36), 0, "reserved");
        assert_eq!(u64_at(mcfg, 44), 0xE000_0000);
        assert_eq!(u16::from_le_bytes([mcfg[52], mcfg[53]]), 0, "segment");
        assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0..=0");
        assert_eq!(u32_at(mcfg, 56), 0);
        assert_eq!(l.mcfg % 16, 0);
    }

    #[test]
    fn dsdt_declares_the_pci_host_bridge() {
        for (ram_end, win64) in [
            (512u64 << 20, 4u64 << 30),
            (6 << 30, 6 << 30),
            ((6 << 30) + 1, 7 << 30),
        ] {
            let (l, img) = build_acpi_tables(ACPI_START, 1, ram_end).unwrap();
            let dsdt = &table(&img, l.dsdt)[SDT_HEADER_SIZE..];
            let at = find(dsdt, b"PCI0").expect("PCI0");
            // DeviceOp, then a PkgLength of 1 to 4 bytes.
            assert!(
                (2..=5).any(|k| dsdt[at - k - 2..at - k] == [0x5b, 0x82]),
                "DeviceOp before PCI0"
            );
            // PNP0A08 = 41 D0 0A 08, PNP0A03 = 41 D0 0A 03, PNP0C02 = 41 D0 0C 02.
            assert!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]).is_some());
            assert!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]).is_some());
            assert!(find(dsdt, &[0x0c, 0x41, 0xd0, 0x0c, 0x02]).is_some());
            for name in [&b"_SEG"[..], b"_BBN", b"_UID", b"_CRS"] {
                assert!(find(&dsdt[at..], name).is_some(), "{name:?}");
            }
            // WordBusNumber 0..0: 0x88, len 13, type 2, flags, 0, gran 0, min 0, max 0, tra 0, len 1.
            assert!(find(
                dsdt,
                &[0x88, 13, 0, 2, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
            )
            .is_some());
            // IO 0xCF8 len 8.
            assert!(find(dsdt, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]).is_some());
            // WordIO 0xC000..0xFFFF.
            assert!(find(dsdt, &[0x88, 13, 0, 1, 0x0c, 3, 0, 0, 0, 0xc0, 0xff, 0xff]).is_some());
            // DWordMemory 0xC000_0000..0xDFFF_FFFF, length 0x2000_0000.
            let mut dw = vec![0x87, 23, 0, 0, 0x0c, 1];
            for v in [0u32, 0xC000_0000, 0xDFFF_FFFF, 0, 0x2000_0000] {
                dw.extend_from_slice(&v.to_le_bytes());
            }
            assert!(find(dsdt, &dw).is_some(), "DWordMemory");
            // QWordMemory for the 64-bit window.
            let mut qw = vec![0x8a, 43, 0, 0, 0x0c, 1];
            for v in [0u64, win64, win64 + (64 << 30) - 1, 0, 64 << 30] {
                qw.extend_from_slice(&v.to_le_bytes());
            }
            assert!(find(dsdt, &qw).is_some(), "QWordMemory at {win64:#x}");
            // Memory32Fixed of the ECAM in MBRD.
            let mut ecam = vec![0x86, 9, 0, 0];
            ecam.extend_from_slice(&0xE000_0000u32.to_le_bytes());
            ecam.extend_from_slice(&0x10_0000u32.to_le_bytes());
            assert!(find(dsdt, &ecam).is_some(), "ECAM claimed");
        }
    }

    #[test]
    fn bad_cpu_counts() {
        assert!(build_acpi_tables(ACPI_START, 0, 512 << 20).is_err());
        assert!(build_acpi_tables(ACPI_START, 255, 512 << 20).is_err());
    }

    #[test]
    fn written_to_guest_memory() {
        let mem = guest_mem(512 << 20);
        let rsdp = setup_acpi_tables(&mem, 2, 512 << 20).unwrap();
        assert_eq!(rsdp, GuestAddress(ACPI_START));
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
