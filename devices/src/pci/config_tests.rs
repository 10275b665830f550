use super::*;

fn header() -> PciHeader {
    PciHeader {
        vendor_id: 0x1b36,
        device_id: 0xfe77,
        class: 0xff0000,
        revision: 1,
        subsystem_vendor_id: 0x1b36,
        subsystem_id: 1,
    }
}

fn bar(bar: u8, size: u64, is_64bit: bool, prefetchable: bool, is_io: bool) -> BarRequest {
    BarRequest {
        bar,
        size,
        is_64bit,
        prefetchable,
        is_io,
    }
}

fn cfg() -> PciConfig {
    let mut c = PciConfig::new(header());
    c.add_bar(bar(0, 0x4000, false, false, false)).unwrap();
    c.add_bar(bar(2, 1 << 33, true, true, false)).unwrap();
    c.add_bar(bar(4, 0x20, false, false, true)).unwrap();
    c
}

fn w32(c: &mut PciConfig, off: u16, v: u32) {
    c.write(off, &v.to_le_bytes());
}

#[test]
fn identity_is_read_only() {
    let mut c = cfg();
    assert_eq!(c.read_u32(0), 0xfe77_1b36);
    assert_eq!(c.read_u32(8), 0xff00_0001);
    assert_eq!(c.read_u32(0x2c), 0x0001_1b36);
    for off in (0..0x40).step_by(4) {
        if !(0x10..0x28).contains(&off) {
            w32(&mut c, off, 0xffff_ffff);
        }
    }
    assert_eq!(c.read_u32(0), 0xfe77_1b36);
    assert_eq!(c.read_u32(8), 0xff00_0001);
    assert_eq!(c.read_u16(PCI_STATUS), 0, "status is read-only");
    assert_eq!(c.command(), PCI_COMMAND_WRITABLE);
    assert_eq!(c.read_u32(0x30), 0, "no expansion ROM");
    assert_eq!(c.bytes()[0x3d], 0, "no interrupt pin");
    assert_eq!(c.bytes()[0x3c], 0xff, "interrupt line is scratch");
}

#[test]
fn command_bits() {
    let mut c = cfg();
    assert!(!c.memory_enabled() && !c.bus_master() && !c.io_enabled());
    c.set_command(0x6);
    assert!(c.memory_enabled() && c.bus_master() && !c.io_enabled());
    c.write(PCI_COMMAND, &[0x01]);
    assert!(c.io_enabled() && !c.memory_enabled());
    assert_eq!(c.command(), 0x1);
}

#[test]
fn bar_sizing() {
    let mut c = cfg();
    w32(&mut c, 0x10, 0xffff_ffff);
    assert_eq!(c.read_u32(0x10), 0xffff_c000);
    // 64-bit prefetchable 8 GiB: low reads type bits only, high the mask.
    w32(&mut c, 0x18, 0xffff_ffff);
    w32(&mut c, 0x1c, 0xffff_ffff);
    assert_eq!(c.read_u32(0x18), 0x0000_000c);
    assert_eq!(c.read_u32(0x1c), 0xffff_fffe);
    w32(&mut c, 0x20, 0xffff_ffff);
    assert_eq!(c.read_u32(0x20), 0xffff_ffe1);
    // Undeclared BARs read 0 whatever is written.
    w32(&mut c, 0x14, 0xffff_ffff);
    w32(&mut c, 0x24, 0xffff_ffff);
    assert_eq!((c.read_u32(0x14), c.read_u32(0x24)), (0, 0));
    // Program addresses.
    w32(&mut c, 0x10, 0xd000_0000);
    w32(&mut c, 0x18, 0x0000_0000);
    w32(&mut c, 0x1c, 0x3);
    w32(&mut c, 0x20, 0xc040);
    assert_eq!(c.bar_address(0), Some(0xd000_0000));
    assert_eq!(c.bar_address(2), Some(2 << 32), "8 GiB aligned");
    assert_eq!(c.bar_address(4), Some(0xc040));
    assert_eq!(c.bar_address(1), None);
    assert_eq!(c.bar_size(2), Some(1 << 33));
    // Misaligned addresses are truncated by the mask.
    w32(&mut c, 0x10, 0xd000_1234);
    assert_eq!(c.bar_address(0), Some(0xd000_0000));
    assert!(c.decoded_bars().is_empty());
    c.set_command(PCI_COMMAND_MEMORY);
    let d = c.decoded_bars();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].range, 0xd000_0000..0xd000_4000);
    assert_eq!(d[1].range, (2 << 32)..(4 << 32));
    c.set_command(PCI_COMMAND_IO);
    assert_eq!(
        c.decoded_bars(),
        vec![DecodedBar {
            bar: 4,
            range: 0xc040..0xc060,
            is_io: true
        }]
    );
    c.set_bar_address(0, 0xc000_4000);
    assert_eq!(c.bar_address(0), Some(0xc000_4000));
    assert_eq!(c.bar_requests().len(), 3);
}

#[test]
fn bad_bars_refused() {
    let mut c = cfg();
    assert!(c.add_bar(bar(0, 0x1000, false, false, false)).is_err());
    assert!(
        c.add_bar(bar(3, 0x1000, false, false, false)).is_err(),
        "upper half of BAR 2"
    );
    assert!(
        c.add_bar(bar(1, 0x1000, true, false, false)).is_err(),
        "BAR 2 is taken"
    );
    assert!(c.add_bar(bar(6, 0x1000, false, false, false)).is_err());
    let mut c = PciConfig::new(header());
    assert!(c.add_bar(bar(5, 0x1000, true, false, false)).is_err());
    for size in [0, 8, 0x1001] {
        assert!(c.add_bar(bar(0, size, false, false, false)).is_err());
    }
    assert!(c.add_bar(bar(0, 512, false, false, true)).is_err());
    assert!(c.add_bar(bar(0, 16, true, false, true)).is_err());
    assert!(c.bar_requests().is_empty());
}

#[test]
fn capability_list() {
    let mut c = cfg();
    assert!(c.capabilities().is_empty());
    let a = c
        .add_capability(&[0x11, 0xaa, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0, 0, 0xff])
        .unwrap();
    let b = c
        .add_capability(&[0x05, 0, 0, 0, 0, 0], &[0xff, 0xff])
        .unwrap();
    assert_eq!((a, b), (0x40, 0x4c));
    assert_eq!(c.bytes()[0x34], 0x40);
    assert_eq!(c.bytes()[0x41], 0x4c);
    assert_eq!(c.bytes()[0x4d], 0);
    assert_ne!(c.read_u16(PCI_STATUS) & PCI_STATUS_CAP_LIST, 0);
    assert_eq!(c.capabilities(), vec![(0x11, 0x40), (0x05, 0x4c)]);
    assert_eq!(c.find_capability(0x05), Some(0x4c));
    assert_eq!(c.find_capability(0x10), None);
    // Header bytes read-only even if the mask said otherwise; body per mask.
    c.write(0x4c, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(&c.bytes()[0x4c..0x50], &[0x05, 0, 0, 0]);
    c.write(0x40, &[0xff, 0xff, 0xff, 0xff]);
    assert_eq!(&c.bytes()[0x40..0x44], &[0x11, 0x4c, 0xff, 2]);
    assert!(c.add_capability(&[1], &[]).is_err());
    assert!(c.add_capability(&[1, 0], &[0, 0, 0]).is_err());
    assert!(c.add_capability(&[1; 200], &[]).is_err());
}

#[test]
fn out_of_range_accesses() {
    let mut c = cfg();
    let mut b = [0u8; 4];
    c.read(4094, &mut b);
    assert_eq!(b, [0, 0, 0xff, 0xff]);
    c.write(u16::MAX, &[1, 2, 3, 4]);
    c.poke(u16::MAX, &[1, 2]);
    c.set_wmask(u16::MAX, &[1, 2]);
    assert_eq!(c.read_u32(u16::MAX), 0xffff_ffff);
}

#[test]
fn save_restore() {
    let mut c = cfg();
    w32(&mut c, 0x10, 0xd000_0000);
    w32(&mut c, 0x1c, 0x2);
    c.set_command(0x6);
    let s = c.save("sim0");
    assert_eq!(s.config.len(), CONFIG_SPACE_SIZE);
    assert_eq!(s.bars, vec![0xd000_0000, 0, 2 << 32, 0, 0, 0]);
    let mut d = cfg();
    d.restore(&s).unwrap();
    assert_eq!(d.bytes(), c.bytes());
    assert_eq!(d.bar_address(2), Some(2 << 32));
    assert!(d.bus_master());

    let fresh = cfg();
    let mut bad = s.clone();
    bad.config.truncate(10);
    assert!(d.restore(&bad).is_err());
    let mut bad = s.clone();
    bad.config.resize(CONFIG_SPACE_SIZE + 1, 0);
    assert!(d.restore(&bad).is_err());
    let mut bad = s.clone();
    bad.bars.pop();
    assert!(d.restore(&bad).is_err());
    let mut bad = s.clone();
    bad.config[2] = 0x12;
    assert!(d.restore(&bad).is_err());
    let mut bad = s.clone();
    bad.bars[1] = 0x1000;
    let mut e = fresh.clone();
    assert!(e.restore(&bad).is_err());
    assert_eq!(e.bytes(), fresh.bytes(), "nothing changed on refusal");
    // Read-only bytes are not taken from the stream.
    let mut ro = s.clone();
    ro.config[PCI_STATUS as usize] = 0xff;
    ro.config[0x34] = 0x80;
    let mut e = fresh.clone();
    e.restore(&ro).unwrap();
    assert_eq!(e.read_u16(PCI_STATUS), 0);
    assert_eq!(e.bytes()[0x34], 0);
    // A short (256-byte) config is accepted.
    let mut short = s.clone();
    short.config.truncate(256);
    fresh.clone().restore(&short).unwrap();
}
