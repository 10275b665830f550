//! KernelVfioPci against the fake kernel of `super::super::fake`.

use std::sync::Arc;

use super::*;
use crate::pci::MsiMessage;
use crate::vfio::fake::{
    msix_mappable_cap, sparse_cap, Call, FakeMig, FakePci, FakeRegion, TestSink,
};
use crate::vfio::pci_caps::walk;
use crate::vfio::pci_uapi::{REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE};

const RWM: u32 = REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP;

fn w16(c: &mut [u8], o: usize, v: u16) {
    c[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn w32(c: &mut [u8], o: usize, v: u32) {
    c[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// 8086:1234; BAR0 32-bit 16 KiB (MSI-X table 4 vectors at 0x2000, PBA at
/// 0x3000), BAR1 of a bad size, BAR2/3 64-bit prefetchable 1 MiB, BAR4 I/O
/// 256 bytes; caps MSI-X @0x40 -> MSI (64-bit, per-vector mask, 4) @0x50
/// -> PM @0x70.
fn config() -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    w16(&mut c, 0, 0x8086);
    w16(&mut c, 2, 0x1234);
    w16(&mut c, 6, 0x0010);
    w32(&mut c, 0x10, 0xfeb0_0000); // host address: never shown
    w32(&mut c, 0x18, 0x0000_000c);
    w32(&mut c, 0x20, 0x0000_e001);
    c[0x34] = 0x40;
    c[0x3d] = 1; // INTA: hidden
    c[0x40] = 0x11;
    c[0x41] = 0x50;
    w16(&mut c, 0x42, 0x0003);
    w32(&mut c, 0x44, 0x2000);
    w32(&mut c, 0x48, 0x3000);
    c[0x50] = 0x05;
    c[0x51] = 0x70;
    w16(&mut c, 0x52, 0x0184);
    c[0x70] = 0x01;
    c[0x71] = 0x00;
    c
}

fn fake_with(cfg: Vec<u8>, bar0_caps: Vec<u8>) -> FakePci {
    let mut f = FakePci::new(cfg);
    f.regions[0] = FakeRegion::new(RWM, 0x4000).with_caps(bar0_caps);
    f.regions[1] = FakeRegion::new(RWM, 0x3000);
    f.regions[2] = FakeRegion::new(RWM, 0x10_0000);
    f.regions[4] = FakeRegion::new(REGION_FLAG_READ | REGION_FLAG_WRITE, 0x100);
    f.irqs = [1, 4, 4, 1, 1];
    f
}

fn default_caps() -> Vec<u8> {
    // sparse cap at 32 (16 + 16 bytes) -> MSIX_MAPPABLE at 64 -> end
    let mut caps = sparse_cap(64, &[(0, 0x4000)]);
    caps.extend(msix_mappable_cap(0));
    caps
}

fn build(f: FakePci) -> (KernelVfioPci, Arc<FakePci>) {
    let f = Arc::new(f);
    let mig = Arc::new(
        KernelVfioDevice::with_ops("vf0", Box::new(Arc::new(FakeMig { dma: None }))).unwrap(),
    );
    (
        KernelVfioPci::with_ops(mig, Box::new(f.clone())).unwrap(),
        f,
    )
}

fn dev() -> (KernelVfioPci, Arc<FakePci>) {
    build(fake_with(config(), default_caps()))
}

fn rd32(d: &KernelVfioPci, o: u16) -> u32 {
    let mut b = [0u8; 4];
    d.config_read(o, &mut b);
    u32::from_le_bytes(b)
}
fn rd8(d: &KernelVfioPci, o: u16) -> u8 {
    let mut b = [0u8; 1];
    d.config_read(o, &mut b);
    b[0]
}
fn wr32(d: &KernelVfioPci, o: u16, v: u32) {
    d.config_write(o, &v.to_le_bytes());
}
fn chain(d: &KernelVfioPci) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut p = rd8(d, 0x34) & !3;
    while p != 0 && out.len() < 64 {
        out.push((p, rd8(d, p as u16)));
        p = rd8(d, p as u16 + 1) & !3;
    }
    out
}

#[test]
fn capability_list_is_parsed_and_shown() {
    let caps: Vec<u8> = walk(&config()).iter().map(|c| c.id).collect();
    assert_eq!(caps, vec![0x11, 0x05, 0x01]);
    let (d, _) = dev();
    assert_eq!(chain(&d), vec![(0x40, 0x11), (0x50, 0x05), (0x70, 0x01)]);
    assert_eq!(d.msi_vectors(), 4);
    assert_eq!(rd32(&d, 0), 0x1234_8086);
    assert_eq!(rd8(&d, 0x3d), 0, "INTx pin hidden");
    assert_eq!(rd32(&d, 0x30), 0, "no ROM");
}

#[test]
fn capability_loop_and_bad_pointers_are_cut() {
    let mut c = config();
    c[0x71] = 0x40; // PM -> MSI-X again
    assert_eq!(walk(&c).len(), 3);
    let (d, _) = build(fake_with(c, default_caps()));
    assert_eq!(chain(&d).len(), 3);
    assert_eq!(rd8(&d, 0x71), 0, "loop cut in the guest's view");

    for bad in [0x20u8, 0x08, 0x01] {
        let mut c = config();
        c[0x34] = bad;
        assert!(walk(&c).is_empty(), "{bad:#x}");
        let (d, _) = build(fake_with(c, default_caps()));
        assert!(chain(&d).is_empty());
        assert_eq!(d.msi_vectors(), 0);
    }
    let mut c = config();
    c[0x51] = 0xfe; // -> 0xfc: in range, id 0, next 0
    assert_eq!(walk(&c).len(), 3);
    let mut c = config();
    c[0x51] = 0x10; // below 0x40
    assert_eq!(walk(&c).len(), 2);
    let mut c = config();
    w16(&mut c, 6, 0); // no capability list bit
    assert!(walk(&c).is_empty());
}

#[test]
fn msix_outside_its_bar_is_hidden() {
    let mut c = config();
    w32(&mut c, 0x44, 0x8000); // table past the 16 KiB BAR0
    let (d, _) = build(fake_with(c, default_caps()));
    assert_eq!(chain(&d), vec![(0x50, 0x05), (0x70, 0x01)]);
    let mut c = config();
    w32(&mut c, 0x48, 0x3001); // PBA in BAR1 (ignored: bad size)
    let (d, _) = build(fake_with(c, default_caps()));
    assert_eq!(chain(&d)[0], (0x50, 0x05));
    let mut c = config();
    w16(&mut c, 0x42, 0x07ff); // 2048 vectors: 32 KiB table in a 16 KiB BAR
    let (d, _) = build(fake_with(c, default_caps()));
    assert_eq!(d.msi_vectors(), 4);
}

#[test]
fn hostile_config_never_panics() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let mut c = config();
        for _ in 0..40 {
            let o = (next() % 256) as usize;
            c[o] = next() as u8;
        }
        c[0x0e] = 0;
        let mut caps = sparse_cap((next() % 128) as u32, &[(next() % 0x8000, next() % 0x8000)]);
        caps.extend(msix_mappable_cap((next() % 128) as u32));
        if next() % 4 == 0 {
            let n = caps.len();
            caps[(next() as usize) % n] = next() as u8;
        }
        let mut f = fake_with(c, caps);
        if next() % 2 == 0 {
            for i in 0..6 {
                let size = match next() % 4 {
                    0 => 0,
                    1 => 1 << (next() % 40),
                    2 => next() % 0x10_0000,
                    _ => u64::MAX - next() % 0x1000,
                };
                f.regions[i] = FakeRegion::new((next() % 16) as u32, size);
            }
            f.irqs = [0, (next() % 64) as u32, (next() % 4096) as u32, 0, 0];
        }
        if let Ok(d) = KernelVfioPci::with_ops(
            Arc::new(KernelVfioDevice::with_ops("h", Box::new(FakeMig { dma: None })).unwrap()),
            Box::new(f),
        ) {
            let _ = d.attach_msi(Arc::new(TestSink::new(2048)));
            for r in d.bar_requests() {
                assert!(r.size.is_power_of_two());
                d.assign_bar(r.bar, 0x1_0000_0000 + r.size);
            }
            let _ = chain(&d);
            for o in (0..0x100).step_by(4) {
                wr32(&d, o, next() as u32);
            }
            let _ = d.bars();
            for b in 0..6 {
                d.bar_write(b, next() % 0x5000, &[1, 2, 3, 4]);
                d.bar_read(b, next() % 0x5000, &mut [0; 8]);
            }
            let s = d.save_pci();
            let _ = d.restore_pci(&s);
        }
    }
    let mut c = config();
    c[0x0e] = 1;
    assert!(KernelVfioPci::with_ops(
        Arc::new(KernelVfioDevice::with_ops("b", Box::new(FakeMig { dma: None })).unwrap()),
        Box::new(fake_with(c, vec![])),
    )
    .is_err());
}

#[test]
fn bar_sizing_and_virtual_addresses() {
    let (d, f) = dev();
    assert_eq!(
        d.bar_requests(),
        vec![
            BarRequest {
                bar: 0,
                size: 0x4000,
                is_64bit: false,
                prefetchable: false,
                is_io: false
            },
            BarRequest {
                bar: 2,
                size: 0x10_0000,
                is_64bit: true,
                prefetchable: true,
                is_io: false
            },
            BarRequest {
                bar: 4,
                size: 0x100,
                is_64bit: false,
                prefetchable: false,
                is_io: true
            },
        ]
    );
    assert_eq!(rd32(&d, 0x10), 0, "host address hidden");
    for o in (0x10..0x28).step_by(4) {
        wr32(&d, o, 0xffff_ffff);
    }
    assert_eq!(rd32(&d, 0x10), 0xffff_c000);
    assert_eq!(rd32(&d, 0x14), 0, "BAR of a bad size: absent");
    assert_eq!(rd32(&d, 0x18), 0xfff0_000c);
    assert_eq!(rd32(&d, 0x1c), 0xffff_ffff);
    assert_eq!(rd32(&d, 0x20), 0xffff_ff01);
    assert_eq!(rd32(&d, 0x24), 0);
    wr32(&d, 0x30, 0xffff_ffff);
    assert_eq!(rd32(&d, 0x30), 0);

    wr32(&d, 0x10, 0xd000_0123);
    wr32(&d, 0x18, 0);
    wr32(&d, 0x1c, 1);
    wr32(&d, 0x20, 0x1003);
    assert_eq!(rd32(&d, 0x10), 0xd000_0000);
    assert_eq!(rd32(&d, 0x20), 0x1001);
    assert!(d.bars().is_empty(), "decode off");
    d.config_write(4, &3u16.to_le_bytes());
    let bars = d.bars();
    assert_eq!(bars.len(), 3);
    assert_eq!(bars[0].range, 0xd000_0000..0xd000_4000);
    assert_eq!(bars[1].range, 0x1_0000_0000..0x1_0010_0000);
    assert_eq!(bars[2].range, 0x1000..0x1100);
    assert_eq!(bars[2].kind, BarKind::Io);
    // Only the command register reached the device's config space.
    let cfg_writes: Vec<_> = f
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Write {
                region: 7, offset, ..
            } => Some(offset),
            _ => None,
        })
        .collect();
    assert_eq!(cfg_writes, vec![4]);
    assert_eq!(
        &f.regions[7].data.lock().unwrap()[0x10..0x14],
        &0xfeb0_0000u32.to_le_bytes()
    );

    d.assign_bar(2, 0x8_0000_0000);
    assert_eq!((rd32(&d, 0x18), rd32(&d, 0x1c)), (0xc, 0x8));
    let (d, f) = dev();
    d.assign_bar(0, 0xc000_0000);
    assert_eq!(rd32(&d, 0x10), 0xc000_0000);
    assert_eq!(d.bars()[0].range, 0xc000_0000..0xc000_4000);
    assert!(f.calls().contains(&Call::Write {
        region: 7,
        offset: 4,
        data: vec![2, 0]
    }));
}

#[test]
fn sparse_mmap_parts_exclude_the_msix_pages() {
    let (d, f) = dev();
    d.assign_bar(0, 0xd000_0000);
    d.assign_bar(2, 0x1_0000_0000);
    let bars = d.bars();
    // Table page 0x2000 and PBA page 0x3000 trap.
    assert_eq!(
        bars[0].kind,
        BarKind::Mapped(vec![(0, 0x2000, 0x7f00_0000_0000)])
    );
    assert_eq!(
        bars[1].kind,
        BarKind::Mapped(vec![(0, 0x10_0000, 0x7f00_0000_0000 + (2 << 40))])
    );
    let mmaps: Vec<_> = f
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Mmap { .. }))
        .collect();
    assert_eq!(
        mmaps,
        vec![
            Call::Mmap {
                offset: 0,
                len: 0x2000
            },
            Call::Mmap {
                offset: 2 << 40,
                len: 0x10_0000
            }
        ]
    );
    drop(d);
    assert!(f.calls().contains(&Call::Munmap {
        addr: 0x7f00_0000_0000,
        len: 0x2000
    }));

    // Sparse areas with a hole, one out of range; table+PBA in one page.
    let mut c = config();
    w32(&mut c, 0x44, 0x3000);
    w32(&mut c, 0x48, 0x3800);
    let caps = sparse_cap(0, &[(0, 0x1000), (0x2000, 0x2000), (0x8000, 0x1000)]);
    let (d, _) = build(fake_with(c.clone(), caps));
    d.assign_bar(0, 0xd000_0000);
    assert_eq!(
        d.bars()[0].kind,
        BarKind::Mapped(vec![
            (0, 0x1000, 0x7f00_0000_0000),
            (0x2000, 0x1000, 0x7f00_0000_2000)
        ])
    );
    // A capability chain that loops on itself: parsed once.
    let caps = sparse_cap(32, &[(0, 0x1000)]);
    let (d, _) = build(fake_with(c.clone(), caps));
    d.assign_bar(0, 0xd000_0000);
    assert_eq!(
        d.bars()[0].kind,
        BarKind::Mapped(vec![(0, 0x1000, 0x7f00_0000_0000)])
    );
    // No MMAP flag: the BAR traps.
    let mut f = fake_with(c, vec![]);
    f.regions[0] = FakeRegion::new(REGION_FLAG_READ | REGION_FLAG_WRITE, 0x4000);
    let (d, _) = build(f);
    d.assign_bar(0, 0xd000_0000);
    assert_eq!(d.bars()[0].kind, BarKind::Trap);
}

#[test]
fn trapped_bar_accesses_and_the_emulated_table() {
    let (d, f) = dev();
    f.regions[0].data.lock().unwrap()[0x100..0x104].copy_from_slice(&[1, 2, 3, 4]);
    let mut b = [0u8; 4];
    d.bar_read(0, 0x100, &mut b);
    assert_eq!(b, [1, 2, 3, 4]);
    d.bar_write(0, 0x104, &[9, 9]);
    assert!(f.calls().contains(&Call::Write {
        region: 0,
        offset: 0x104,
        data: vec![9, 9]
    }));
    let mut b = [0u8; 8];
    d.bar_read(0, 0x3ffc, &mut b);
    assert_eq!(b, [0xff; 8], "past the region");
    d.bar_read(5, 0, &mut b);
    assert_eq!(b, [0xff; 8], "no such BAR");
    // The table: vector control reads masked, writes stay in the model.
    let mut b = [0u8; 4];
    d.bar_read(0, 0x200c, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    d.bar_write(0, 0x2000, &0x1_fee0_0000u64.to_le_bytes());
    d.bar_write(0, 0x200c, &0xffff_fffeu32.to_le_bytes());
    let mut b = [0u8; 16];
    d.bar_read(0, 0x2000, &mut b);
    assert_eq!(&b[0..8], &0x1_fee0_0000u64.to_le_bytes());
    assert_eq!(&b[12..16], &[0, 0, 0, 0], "reserved control bits dropped");
    assert!(!f
        .calls()
        .iter()
        .any(|c| matches!(c, Call::Write { region: 0, offset, .. } if *offset >= 0x2000)));
}

fn msg(address: u64, data: u32) -> Option<MsiMessage> {
    Some(MsiMessage { address, data })
}

#[test]
fn msix_enable_sets_irqs_and_table_writes_route() {
    let (d, f) = dev();
    let sink = Arc::new(TestSink::new(4));
    d.attach_msi(sink.clone()).unwrap();
    d.bar_write(0, 0x2000, &0xfee0_0000u32.to_le_bytes());
    d.bar_write(0, 0x2008, &0x41u32.to_le_bytes());
    d.bar_write(0, 0x200c, &0u32.to_le_bytes());
    assert!(f.irq_sets().is_empty(), "MSI-X still disabled");
    d.config_write(0x42, &0x8003u16.to_le_bytes());
    assert_eq!(rd32(&d, 0x40) >> 16, 0x8003);
    let sets = f.irq_sets();
    assert_eq!(sets.len(), 1);
    let s = &sets[0];
    assert_eq!(
        (s.argsz, s.flags, s.index, s.start, s.count),
        (36, 0x24, 2, 0, 4)
    );
    assert_eq!(s.fds, vec![100, 101, 102, 103]);
    assert_eq!(sink.route(0), Some(msg(0xfee0_0000, 0x41)));
    assert_eq!(sink.route(1), Some(None));
    // Entry 1 programmed and unmasked while enabled: a route, no SET_IRQS.
    d.bar_write(0, 0x2010, &0xfee0_1000u64.to_le_bytes());
    d.bar_write(0, 0x2018, &0x42u32.to_le_bytes());
    d.bar_write(0, 0x201c, &0u32.to_le_bytes());
    assert_eq!(sink.route(1), Some(msg(0xfee0_1000, 0x42)));
    d.bar_write(0, 0x201c, &1u32.to_le_bytes());
    assert_eq!(sink.route(1), Some(None), "masked");
    // Function mask drops every route, unmask brings them back.
    d.config_write(0x43, &[0xc0]);
    assert_eq!(sink.route(0), Some(None));
    d.config_write(0x43, &[0x80]);
    assert_eq!(sink.route(0), Some(msg(0xfee0_0000, 0x41)));
    assert_eq!(f.irq_sets().len(), 1);
    // Disable: count 0, DATA_NONE | ACTION_TRIGGER.
    d.config_write(0x42, &0x0003u16.to_le_bytes());
    let sets = f.irq_sets();
    assert_eq!(sets.len(), 2);
    let s = &sets[1];
    assert_eq!(
        (s.argsz, s.flags, s.index, s.start, s.count),
        (20, 0x21, 2, 0, 0)
    );
    assert_eq!(sink.route(0), Some(None));
    // Table size bits are read-only.
    d.config_write(0x42, &0x0000u16.to_le_bytes());
    assert_eq!(rd32(&d, 0x40) >> 16, 0x0003);
}

#[test]
fn msi_enable_sets_irqs_with_the_enabled_count() {
    let (d, f) = dev();
    let sink = Arc::new(TestSink::new(4));
    d.attach_msi(sink.clone()).unwrap();
    wr32(&d, 0x54, 0xfee0_0003); // low 2 bits read-only
    wr32(&d, 0x58, 0);
    wr32(&d, 0x5c, 0x50);
    d.config_write(0x52, &0x0011u16.to_le_bytes()); // enable, MME = 1 (2 vectors)
    assert_eq!(rd32(&d, 0x54), 0xfee0_0000);
    assert_eq!(rd32(&d, 0x50) >> 16, 0x0195);
    let s = f.irq_sets();
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].argsz, s[0].flags, s[0].index, s[0].count),
        (28, 0x24, 1, 2)
    );
    assert_eq!(s[0].fds, vec![100, 101]);
    assert_eq!(sink.route(0), Some(msg(0xfee0_0000, 0x50)));
    assert_eq!(sink.route(1), Some(msg(0xfee0_0000, 0x51)));
    wr32(&d, 0x5c, 0x53); // the low log2(2) bit is the vector's
    assert_eq!(sink.route(0), Some(msg(0xfee0_0000, 0x52)));
    assert_eq!(sink.route(1), Some(msg(0xfee0_0000, 0x53)));
    wr32(&d, 0x60, 0b10); // mask vector 1
    assert_eq!(sink.route(1), Some(None));
    assert_eq!(f.irq_sets().len(), 1);
    // MSI-X wins: MSI is disabled in the kernel first.
    d.config_write(0x42, &0x8003u16.to_le_bytes());
    let s = f.irq_sets();
    assert_eq!(s.len(), 3);
    assert_eq!((s[1].index, s[1].count, s[1].flags), (1, 0, 0x21));
    assert_eq!((s[2].index, s[2].count), (2, 4));
}

#[test]
fn interrupts_need_a_sink_of_the_right_size() {
    let (d, f) = dev();
    assert!(d.attach_msi(Arc::new(TestSink::new(2))).is_err());
    d.config_write(0x42, &0x8003u16.to_le_bytes());
    assert!(f.irq_sets().is_empty(), "no sink, no eventfds");
    // The sink arrives later: attaching programs what the guest enabled.
    let sink = Arc::new(TestSink::new(4));
    d.attach_msi(sink.clone()).unwrap();
    assert_eq!(f.irq_sets().len(), 1);
    assert_eq!(f.irq_sets()[0].count, 4);
    assert_eq!(sink.route(0), Some(None), "entry 0 still masked");
    d.config_write(0x43, &[0x80]);
    assert_eq!(f.irq_sets().len(), 1, "no change, no SET_IRQS");
}

#[test]
fn dma_map_and_unmap_arguments() {
    let (d, f) = dev();
    let dma = d.dma().unwrap();
    // SAFETY: the fake kernel never touches the address.
    unsafe { dma.dma_map(0x10_0000, 0x20_0000, 0x7fff_0000_0000) }.unwrap();
    dma.dma_unmap(0x10_0000, 0x20_0000).unwrap();
    let calls: Vec<_> = f
        .calls()
        .into_iter()
        .filter(|c| matches!(c, Call::MapDma { .. } | Call::UnmapDma { .. }))
        .collect();
    assert_eq!(
        calls,
        vec![
            Call::MapDma {
                argsz: 32,
                flags: 3,
                vaddr: 0x7fff_0000_0000,
                iova: 0x10_0000,
                size: 0x20_0000
            },
            Call::UnmapDma {
                argsz: 24,
                flags: 0,
                iova: 0x10_0000,
                size: 0x20_0000
            }
        ]
    );
    // SAFETY: rejected before any ioctl.
    unsafe {
        assert!(dma.dma_map(0x10_0001, 0x1000, 0x7fff_0000_0000).is_err());
        assert!(dma.dma_map(0x10_0000, 0, 0x7fff_0000_0000).is_err());
        assert!(dma.dma_map(0x10_0000, 0x1000, 0x7fff_0000_0010).is_err());
        assert!(dma.dma_map(!0xfff, 0x2000, 0x1000).is_err());
    }
    assert!(dma.dma_unmap(0x10_0000, 0x10).is_err());
    assert_eq!(
        f.calls().len(),
        calls.len() + 2,
        "only the two mmaps besides"
    );
    let mut short = fake_with(config(), default_caps());
    short.unmap_short = 0x1000;
    let (d, _) = build(short);
    let e = d
        .dma()
        .unwrap()
        .dma_unmap(0, 0x2000)
        .unwrap_err()
        .to_string();
    assert!(e.contains("vf0") && e.contains("unmapped"), "{e}");
}

fn program(d: &KernelVfioPci) {
    d.assign_bar(0, 0xd000_0000);
    d.assign_bar(2, 0x1_0000_0000);
    d.assign_bar(4, 0x1000);
    d.config_write(4, &0x0007u16.to_le_bytes());
    d.config_write(0x3c, &[11]);
    for v in 0..4u64 {
        d.bar_write(
            0,
            0x2000 + 16 * v,
            &(0xfee0_0000 + v * 0x1000).to_le_bytes(),
        );
        d.bar_write(0, 0x2008 + 16 * v, &(0x41 + v as u32).to_le_bytes());
        d.bar_write(0, 0x200c + 16 * v, &((v == 3) as u32).to_le_bytes());
    }
    d.config_write(0x42, &0x8003u16.to_le_bytes());
}

#[test]
fn save_and_restore_reprogram_the_destination() {
    let (a, _) = dev();
    a.attach_msi(Arc::new(TestSink::new(4))).unwrap();
    program(&a);
    let s = a.save_pci();
    assert_eq!(s.bars, vec![0xd000_0000, 0, 0x1_0000_0000, 0, 0x1000, 0]);
    assert_eq!(s.config.len(), 4096);
    let m = s.msix.as_ref().unwrap();
    assert!(m.enabled && !m.function_masked);
    assert_eq!(m.entries[2].data, 0x43);
    assert_eq!(m.entries[3].ctrl, 1);

    let (b, fb) = dev();
    let sink = Arc::new(TestSink::new(4));
    b.attach_msi(sink.clone()).unwrap();
    b.restore_pci(&s).unwrap();
    assert_eq!(b.save_pci(), s);
    assert_eq!(b.bars(), a.bars());
    let sets = fb.irq_sets();
    assert_eq!(sets.len(), 1);
    assert_eq!((sets[0].index, sets[0].count), (2, 4));
    assert_eq!(sink.route(1), Some(msg(0xfee0_1000, 0x42)));
    assert_eq!(sink.route(3), Some(None));
    assert!(fb.calls().contains(&Call::Write {
        region: 7,
        offset: 4,
        data: vec![7, 0]
    }));
    assert_eq!(rd8(&b, 0x3c), 11);

    let bad = |f: &dyn Fn(&mut PciFunctionState)| {
        let mut t = s.clone();
        f(&mut t);
        b.restore_pci(&t).is_err()
    };
    assert!(bad(&|t| t.id = "other".into()));
    assert!(bad(&|t| t.bars.pop().map(drop).unwrap_or(())));
    assert!(bad(&|t| t.config.resize(5000, 0)));
    assert!(bad(&|t| t.config[0] = 0x87));
    assert!(bad(&|t| {
        t.msix.as_mut().unwrap().entries.pop();
    }));
    assert!(bad(&|t| t.msix = None));
}

#[test]
fn from_device_needs_the_host_fds() {
    let mig =
        Arc::new(KernelVfioDevice::with_ops("nofd", Box::new(FakeMig { dma: None })).unwrap());
    let e = KernelVfioPci::from_device(mig).unwrap_err().to_string();
    assert!(e.contains("nofd") && e.contains("fds"), "{e}");
    let cfg =
        crate::vfio::parse_vfio_arg("path=/sys/bus/pci/devices/0000:ff:1f.6,id=gone").unwrap();
    let e = KernelVfioPci::open(&cfg).unwrap_err().to_string();
    assert!(e.contains("gone") && e.contains("no such device"), "{e}");
}
