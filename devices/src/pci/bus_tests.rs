use std::sync::Mutex;

use arch::pci::{ecam_address, PCI_ECAM_BASE, PCI_MMIO32_START};

use super::*;
use crate::pci::config::PCI_COMMAND_MEMORY;
use crate::pci::BarRequest;

/// A function with a 16 KiB 32-bit BAR 0 (trapped), a 1 MiB 64-bit
/// prefetchable BAR 2 (first page mapped) and a 32-byte I/O BAR 4.
struct Fake {
    id: String,
    cfg: Mutex<PciConfig>,
    writes: Mutex<Vec<(u8, u64, Vec<u8>)>>,
}

impl Fake {
    fn new(id: &str, device_id: u16) -> Arc<Self> {
        let mut cfg = PciConfig::new(PciHeader {
            vendor_id: 0x1b36,
            device_id,
            class: 0xff0000,
            revision: 1,
            ..Default::default()
        });
        for (bar, size, is_64bit, prefetchable, is_io) in [
            (0, 0x4000, false, false, false),
            (2, 1 << 20, true, true, false),
            (4, 0x20, false, false, true),
        ] {
            cfg.add_bar(BarRequest {
                bar,
                size,
                is_64bit,
                prefetchable,
                is_io,
            })
            .unwrap();
        }
        Arc::new(Self {
            id: id.into(),
            cfg: Mutex::new(cfg),
            writes: Mutex::new(Vec::new()),
        })
    }
}

impl PciDevice for Fake {
    fn id(&self) -> &str {
        &self.id
    }
    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.cfg.lock().unwrap().read(offset, data);
    }
    fn config_write(&self, offset: u16, data: &[u8]) {
        self.cfg.lock().unwrap().write(offset, data);
    }
    fn bars(&self) -> Vec<BarMapping> {
        self.cfg
            .lock()
            .unwrap()
            .decoded_bars()
            .into_iter()
            .map(|d| BarMapping {
                bar: d.bar,
                kind: match d.bar {
                    4 => BarKind::Io,
                    2 => BarKind::Mapped(vec![(0, 0x1000, 0x7f00_0000_0000)]),
                    _ => BarKind::Trap,
                },
                range: d.range,
            })
            .collect()
    }
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = bar
                .wrapping_mul(0x10)
                .wrapping_add((offset as u8).wrapping_add(i as u8));
        }
    }
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        self.writes
            .lock()
            .unwrap()
            .push((bar, offset, data.to_vec()));
    }
    fn bar_requests(&self) -> Vec<BarRequest> {
        self.cfg.lock().unwrap().bar_requests()
    }
    fn assign_bar(&self, bar: u8, addr: u64) {
        let mut c = self.cfg.lock().unwrap();
        c.set_bar_address(usize::from(bar), addr);
        let cmd = c.command()
            | if c.bar_is_io(usize::from(bar)) {
                crate::pci::config::PCI_COMMAND_IO
            } else {
                PCI_COMMAND_MEMORY
            };
        c.set_command(cmd);
    }
    fn save_pci(&self) -> PciFunctionState {
        self.cfg.lock().unwrap().save(&self.id)
    }
    fn restore_pci(&self, state: &PciFunctionState) -> Result<()> {
        self.cfg.lock().unwrap().restore(state)
    }
}

fn bus2() -> (PciBus, Arc<Fake>, Arc<Fake>) {
    let mut bus = PciBus::new(1 << 30);
    let a = Fake::new("a", 0xfe77);
    let b = Fake::new("b", 0xfe78);
    assert_eq!(bus.add_device(a.clone()).unwrap(), 1);
    assert_eq!(bus.add_device(b.clone()).unwrap(), 2);
    (bus, a, b)
}

fn ecam_off(dev: u8, func: u8, reg: u16) -> u64 {
    ecam_address(dev, func, reg).unwrap() - PCI_ECAM_BASE
}

fn ecam32(bus: &PciBus, dev: u8, func: u8, reg: u16) -> u32 {
    let mut d = [0u8; 4];
    bus.ecam_read(ecam_off(dev, func, reg), &mut d);
    u32::from_le_bytes(d)
}

fn ecam_w32(bus: &mut PciBus, dev: u8, reg: u16, v: u32) -> Vec<BarChange> {
    bus.ecam_write(ecam_off(dev, 0, reg), &v.to_le_bytes())
}

fn cf8_read32(bus: &mut PciBus, dev: u8, reg: u8) -> u32 {
    let addr = 0x8000_0000u32 | (u32::from(dev) << 11) | u32::from(reg);
    assert_eq!(bus.pio_write(0xcf8, &addr.to_le_bytes()), Some(vec![]));
    let mut d = [0u8; 4];
    assert!(bus.pio_read(0xcfc, &mut d));
    u32::from_le_bytes(d)
}

#[test]
fn enumeration_through_ecam() {
    let (bus, _, _) = bus2();
    assert_eq!(ecam32(&bus, 0, 0, 0), 0x0008_1b36, "host bridge");
    assert_eq!(ecam32(&bus, 0, 0, 8) >> 8, 0x060000);
    assert_eq!(ecam32(&bus, 1, 0, 0), 0xfe77_1b36);
    assert_eq!(ecam32(&bus, 2, 0, 0), 0xfe78_1b36);
    assert_eq!(ecam32(&bus, 3, 0, 0), 0xffff_ffff, "absent device");
    assert_eq!(ecam32(&bus, 1, 1, 0), 0xffff_ffff, "absent function");
    assert_eq!(ecam32(&bus, 31, 7, 0xffc), 0xffff_ffff);
    // Sub-dword reads.
    let mut w = [0u8; 2];
    bus.ecam_read(ecam_off(1, 0, 2), &mut w);
    assert_eq!(u16::from_le_bytes(w), 0xfe77);
    let mut b = [0u8; 1];
    bus.ecam_read(ecam_off(1, 0, 0xb), &mut b);
    assert_eq!(b[0], 0xff);
}

#[test]
fn bad_ecam_accesses() {
    let (mut bus, a, _) = bus2();
    let mut d = [0u8; 4];
    for (off, len) in [
        (ecam_off(1, 0, 1), 4),
        (ecam_off(1, 0, 0), 3),
        (ecam_off(1, 0, 0), 8),
        (PCI_ECAM_SIZE - 2, 4),
        (PCI_ECAM_SIZE, 4),
        (u64::MAX - 1, 4),
        (0, 0),
    ] {
        let mut buf = vec![0u8; len];
        bus.ecam_read(off, &mut buf);
        assert!(buf.iter().all(|b| *b == 0xff), "{off:#x}+{len}");
        assert!(bus.ecam_write(off, &vec![0xffu8; len]).is_empty());
    }
    // A misaligned command write does nothing.
    bus.ecam_write(ecam_off(1, 0, 5), &[0xff, 0xff]);
    assert_eq!(a.cfg.lock().unwrap().command(), 0);
    // Writes to absent functions are ignored.
    assert!(ecam_w32(&mut bus, 5, 4, 0x6).is_empty());
    bus.ecam_read(ecam_off(0, 0, 4), &mut d);
}

#[test]
fn enumeration_through_cf8() {
    let (mut bus, _, _) = bus2();
    assert_eq!(cf8_read32(&mut bus, 0, 0), 0x0008_1b36);
    assert_eq!(cf8_read32(&mut bus, 1, 0), 0xfe77_1b36);
    assert_eq!(cf8_read32(&mut bus, 9, 0), 0xffff_ffff);
    // CONFIG_ADDRESS reads back without the reserved bits.
    bus.pio_write(0xcf8, &0xffff_ffffu32.to_le_bytes());
    let mut d = [0u8; 4];
    assert!(bus.pio_read(0xcf8, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0x80ff_fffc);
    // Bus 1: all-ones.
    bus.pio_write(0xcf8, &(0x8001_0800u32).to_le_bytes());
    bus.pio_read(0xcfc, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
    // Disabled: all-ones.
    bus.pio_write(0xcf8, &(0x0000_0800u32).to_le_bytes());
    bus.pio_read(0xcfc, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0xffff_ffff);
    // Byte and word accesses at 0xCFC..0xCFF.
    bus.pio_write(0xcf8, &(0x8000_0800u32).to_le_bytes());
    let mut w = [0u8; 2];
    assert!(bus.pio_read(0xcfe, &mut w));
    assert_eq!(u16::from_le_bytes(w), 0xfe77);
    let mut b = [0u8; 1];
    assert!(bus.pio_read(0xcfd, &mut b));
    assert_eq!(b[0], 0x1b);
    // Misaligned word at 0xCFD: all-ones.
    assert!(bus.pio_read(0xcfd, &mut w));
    assert_eq!(w, [0xff, 0xff]);
    // Command through CFC (word at 0xCFC of register 4).
    bus.pio_write(0xcf8, &(0x8000_0804u32).to_le_bytes());
    assert_eq!(bus.pio_write(0xcfc, &[0x06, 0]), Some(vec![]));
    assert_eq!(cf8_read32(&mut bus, 1, 4) & 0xffff, 0x6);
}

#[test]
fn cf9_byte_is_not_ours() {
    let (mut bus, _, _) = bus2();
    assert!(!PciBus::handles_config_port(0xcf9, 1));
    assert!(PciBus::handles_config_port(0xcf8, 4));
    assert!(PciBus::handles_config_port(0xcfc, 1));
    assert!(!PciBus::handles_config_port(0xd00, 1));
    let mut b = [0u8; 1];
    assert!(!bus.pio_read(0xcf9, &mut b));
    assert_eq!(bus.pio_write(0xcf9, &[0x06]), None);
    assert_eq!(bus.pio_write(0x80, &[0x06]), None);
    // A byte write at 0xCF8 does not change CONFIG_ADDRESS.
    bus.pio_write(0xcf8, &(0x8000_0800u32).to_le_bytes());
    bus.pio_write(0xcf8, &[0]);
    let mut d = [0u8; 4];
    bus.pio_read(0xcf8, &mut d);
    assert_eq!(u32::from_le_bytes(d), 0x8000_0800);
}

#[test]
fn bar_sizing_through_the_bus() {
    let (mut bus, _, _) = bus2();
    ecam_w32(&mut bus, 1, 0x10, 0xffff_ffff);
    assert_eq!(ecam32(&bus, 1, 0, 0x10), 0xffff_c000);
    ecam_w32(&mut bus, 1, 0x18, 0xffff_ffff);
    ecam_w32(&mut bus, 1, 0x1c, 0xffff_ffff);
    assert_eq!(ecam32(&bus, 1, 0, 0x18), 0xfff0_000c);
    assert_eq!(ecam32(&bus, 1, 0, 0x1c), 0xffff_ffff);
    ecam_w32(&mut bus, 1, 0x20, 0xffff_ffff);
    assert_eq!(ecam32(&bus, 1, 0, 0x20), 0xffff_ffe1);
    assert_eq!(cf8_read32(&mut bus, 1, 0x10), 0xffff_c000);
}

#[test]
fn allocation_and_routing() {
    let (mut bus, a, b) = bus2();
    let changes = bus.allocate_bars().unwrap();
    assert_eq!(changes.len(), 6, "{changes:?}");
    assert!(changes.iter().all(|c| c.old.is_none() && c.new.is_some()));
    let a0 = a.cfg.lock().unwrap().bar_address(0).unwrap();
    let a2 = a.cfg.lock().unwrap().bar_address(2).unwrap();
    let b4 = b.cfg.lock().unwrap().bar_address(4).unwrap();
    assert!((PCI_MMIO32_START..0xE000_0000).contains(&a0));
    assert!(a2 >= 1 << 32, "64-bit prefetchable above 4 GiB");
    assert!(b4 >= 0xc000);
    assert_eq!(bus.mmio_lookup(a0 + 0x10), Some((0, 0, 0x10)));
    assert_eq!(bus.mmio_lookup(a2 + 0x2000), Some((0, 2, 0x2000)));
    assert_eq!(bus.mmio_lookup(0x1000), None);
    let mut d = [0u8; 4];
    assert!(bus.mmio_read(a0 + 4, &mut d));
    assert_eq!(d, [4, 5, 6, 7]);
    assert!(bus.mmio_write(a0 + 8, &[1, 2, 3, 4, 5, 6, 7, 8]));
    assert_eq!(
        a.writes.lock().unwrap().pop(),
        Some((0, 8, vec![1, 2, 3, 4, 5, 6, 7, 8]))
    );
    // Running past the BAR end: all-ones, the device is not called.
    assert!(bus.mmio_read(a0 + 0x3ffe, &mut d));
    assert_eq!(d, [0xff; 4]);
    assert!(bus.mmio_write(a0 + 0x3ffe, &[0; 4]));
    assert!(bus.mmio_write(a0, &[0; 16]));
    assert!(a.writes.lock().unwrap().is_empty());
    assert!(!bus.mmio_read(0x1000, &mut d));
    // I/O BAR.
    let port = b4 as u16;
    assert!(bus.handles_port(port, 2));
    let mut w = [0u8; 2];
    assert!(bus.pio_read(port + 2, &mut w));
    assert_eq!(w, [0x42, 0x43]);
    assert_eq!(bus.pio_write(port + 0x1e, &[9, 9]), Some(vec![]));
    assert_eq!(b.writes.lock().unwrap().pop(), Some((4, 0x1e, vec![9, 9])));
    assert_eq!(
        bus.pio_write(port + 0x1f, &[9, 9]),
        None,
        "runs past the BAR"
    );
    assert_eq!(bus.mappings().len(), 6);
}

#[test]
fn bar_move_reroutes() {
    let (mut bus, _, _) = bus2();
    bus.allocate_bars().unwrap();
    let old0 = bus.mmio_lookup(PCI_MMIO32_START);
    assert!(old0.is_some());
    let (_, m2) = bus
        .mappings()
        .into_iter()
        .find(|(d, m)| *d == 0 && m.bar == 2)
        .unwrap();
    // Disable memory decode: both memory BARs of device 1 go away.
    let ch = bus.ecam_write(ecam_off(1, 0, 4), &[0x01, 0]);
    assert_eq!(ch.len(), 2);
    assert!(ch.iter().all(|c| c.new.is_none() && c.device == 0));
    assert!(bus.mmio_lookup(m2.range.start).is_none());
    // Move BAR 0 and BAR 2, re-enable.
    ecam_w32(&mut bus, 1, 0x10, 0xd000_0000);
    ecam_w32(&mut bus, 1, 0x18, 0);
    ecam_w32(&mut bus, 1, 0x1c, 0x10);
    let ch = bus.ecam_write(ecam_off(1, 0, 4), &[0x03, 0]);
    assert_eq!(ch.len(), 2);
    let c2 = ch.iter().find(|c| c.bar == 2).unwrap();
    assert_eq!(c2.old, None);
    let n2 = c2.new.clone().unwrap();
    assert_eq!(n2.range, (0x10 << 32)..(0x10 << 32) + (1 << 20));
    assert!(matches!(n2.kind, BarKind::Mapped(_)));
    assert_eq!(bus.mmio_lookup(0xd000_0004), Some((0, 0, 4)));
    assert_eq!(bus.mmio_lookup((0x10 << 32) + 8), Some((0, 2, 8)));
    // Moving an enabled BAR reports old and new.
    let ch = ecam_w32(&mut bus, 1, 0x10, 0xd001_0000);
    assert_eq!(ch.len(), 1);
    assert_eq!(ch[0].old.as_ref().unwrap().range.start, 0xd000_0000);
    assert_eq!(ch[0].new.as_ref().unwrap().range.start, 0xd001_0000);
    assert!(bus.mmio_lookup(0xd000_0004).is_none());
    assert_eq!(bus.mmio_lookup(0xd001_0004), Some((0, 0, 4)));
    // A write that changes nothing reports nothing.
    assert!(ecam_w32(&mut bus, 1, 0x10, 0xd001_0000).is_empty());
}

#[test]
fn rescan_after_restore() {
    let (mut bus, a, _) = bus2();
    bus.allocate_bars().unwrap();
    let saved = a.save_pci();
    let mut bus2 = PciBus::new(1 << 30);
    let a2 = Fake::new("a", 0xfe77);
    bus2.add_device(a2.clone()).unwrap();
    a2.restore_pci(&saved).unwrap();
    let ch = bus2.rescan();
    assert_eq!(ch.len(), 3);
    assert_eq!(
        bus2.mappings(),
        bus.mappings()
            .into_iter()
            .filter(|(d, _)| *d == 0)
            .collect::<Vec<_>>()
    );
}

#[test]
fn bus_save_restore() {
    let (mut bus, _, _) = bus2();
    bus.allocate_bars().unwrap();
    let saved = bus.save_pci();
    assert_eq!(saved.len(), 2);
    let (mut dst, _, _) = bus2();
    assert!(dst.restore_pci(&saved[..1]).is_err());
    let mut wrong = saved.clone();
    wrong.swap(0, 1);
    assert!(dst.restore_pci(&wrong).is_err());
    assert!(dst.mappings().is_empty(), "nothing restored on refusal");
    let ch = dst.restore_pci(&saved).unwrap();
    assert_eq!(ch.len(), 6);
    assert_eq!(dst.mappings(), bus.mappings());
}

#[test]
fn full_bus_and_exhaustion() {
    let mut bus = PciBus::new(1 << 30);
    for i in 0..31 {
        assert_eq!(bus.add_device(Fake::new("x", i)).unwrap(), i as u8 + 1);
    }
    assert!(bus.add_device(Fake::new("y", 99)).is_err());
    // 31 I/O BARs of 32 bytes fit, the memory fits: allocation works.
    bus.allocate_bars().unwrap();

    struct Huge(Arc<Fake>);
    impl PciDevice for Huge {
        fn id(&self) -> &str {
            "huge"
        }
        fn config_read(&self, o: u16, d: &mut [u8]) {
            self.0.config_read(o, d)
        }
        fn config_write(&self, o: u16, d: &[u8]) {
            self.0.config_write(o, d)
        }
        fn bars(&self) -> Vec<BarMapping> {
            Vec::new()
        }
        fn bar_read(&self, _: u8, _: u64, _: &mut [u8]) {}
        fn bar_write(&self, _: u8, _: u64, _: &[u8]) {}
        fn bar_requests(&self) -> Vec<BarRequest> {
            vec![BarRequest {
                bar: 0,
                size: 1 << 31,
                is_64bit: false,
                prefetchable: false,
                is_io: false,
            }]
        }
        fn assign_bar(&self, _: u8, _: u64) {
            panic!("nothing is assigned on refusal")
        }
        fn save_pci(&self) -> PciFunctionState {
            PciFunctionState::default()
        }
        fn restore_pci(&self, _: &PciFunctionState) -> Result<()> {
            Ok(())
        }
    }
    let mut bus = PciBus::new(1 << 30);
    bus.add_device(Arc::new(Huge(Fake::new("h", 1)))).unwrap();
    let e = bus.allocate_bars().unwrap_err().to_string();
    assert!(e.contains("huge"), "{e}");
}
