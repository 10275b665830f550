//! Tests of the simulated device's PCI function: config space, BAR0
//! registers, MSI-X delivery through a fake sink, bus master, and the PCI
//! layer's save/restore.

#![allow(clippy::single_range_in_vec_init)]

use super::regs::*;
use super::tests_dma::{check_pattern, dev_cfg, report_all, transfer, wait_for, FakeRam};
use super::*;
use crate::pci::config::{PCI_BAR0, PCI_CAPABILITY_LIST, PCI_COMMAND};
use crate::pci::msix::PCI_CAP_ID_MSIX;
use crate::pci::{MsiMessage, MsiSink};
use migration::MigratableDevice;
use std::os::fd::RawFd;

/// Records routes and signals.
#[derive(Default)]
struct FakeSink {
    routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    signals: Mutex<u32>,
}

impl MsiSink for FakeSink {
    fn count(&self) -> u16 {
        1
    }
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<()> {
        self.routes.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn signal(&self, vector: u16) -> Result<()> {
        assert_eq!(vector, 0);
        *self.signals.lock().unwrap() += 1;
        Ok(())
    }
    fn eventfd(&self, _vector: u16) -> Option<RawFd> {
        None
    }
}

impl FakeSink {
    fn signals(&self) -> u32 {
        *self.signals.lock().unwrap()
    }
    fn last_route(&self) -> Option<(u16, Option<MsiMessage>)> {
        self.routes.lock().unwrap().last().copied()
    }
}

fn cfg_read(p: &dyn PciDevice, off: u16, len: usize) -> u32 {
    let mut b = [0u8; 4];
    p.config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_write(p: &dyn PciDevice, off: u16, v: u32, len: usize) {
    p.config_write(off, &v.to_le_bytes()[..len]);
}

fn reg(p: &dyn PciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    p.bar_read(0, off, &mut b);
    u32::from_le_bytes(b)
}

fn set_reg(p: &dyn PciDevice, off: u64, v: u32) {
    p.bar_write(0, off, &v.to_le_bytes());
}

fn msix_cap(p: &dyn PciDevice) -> u16 {
    let mut at = cfg_read(p, PCI_CAPABILITY_LIST, 1) as u16;
    while at != 0 {
        if cfg_read(p, at, 1) as u8 == PCI_CAP_ID_MSIX {
            return at;
        }
        at = cfg_read(p, at + 1, 1) as u16;
    }
    panic!("no MSI-X capability");
}

/// Programs MSI-X entry 0 (`masked` or not) and enables MSI-X.
fn setup_msix(p: &dyn PciDevice, masked: bool) {
    p.bar_write(0, 0x1000, &0xfee0_0000u32.to_le_bytes());
    p.bar_write(0, 0x1004, &0u32.to_le_bytes());
    p.bar_write(0, 0x1008, &0x41u32.to_le_bytes());
    p.bar_write(0, 0x100c, &u32::from(masked).to_le_bytes());
    let cap = msix_cap(p);
    cfg_write(p, cap + 2, 0x8000, 2);
}

#[test]
fn config_space_and_bar0() {
    let d = SimVfioDevice::new_source(&dev_cfg("cfgsp")).unwrap();
    let p = d.pci();
    let p = &*p;
    assert_eq!(p.id(), "cfgsp");
    assert_eq!(cfg_read(p, 0, 4), 0xfe77_1b36);
    assert_eq!(cfg_read(p, 8, 4), 0xff00_0001, "class ff0000, revision 1");
    assert_eq!(cfg_read(p, 0x0e, 1) & 0x7f, 0, "header type 0");
    assert_ne!(cfg_read(p, 0x06, 2) & 0x10, 0, "capability list");
    let cap = msix_cap(p);
    assert_eq!(cfg_read(p, cap + 2, 2) & 0x7ff, 0, "table size 1");
    assert_eq!(cfg_read(p, cap + 4, 4), 0x1000, "table in BAR0 at 0x1000");
    assert_eq!(cfg_read(p, cap + 8, 4), 0x1800, "PBA in BAR0 at 0x1800");
    assert_eq!(p.msi_vectors(), 1);
    assert_eq!(
        p.bar_requests(),
        vec![crate::pci::BarRequest {
            bar: 0,
            size: 0x4000,
            is_64bit: false,
            prefetchable: false,
            is_io: false
        }]
    );
    // Sizing: 32-bit non-prefetchable memory, 16 KiB.
    cfg_write(p, PCI_BAR0, 0xffff_ffff, 4);
    assert_eq!(cfg_read(p, PCI_BAR0, 4), 0xffff_c000);
    assert!(p.bars().is_empty(), "no decoding before memory enable");
    p.assign_bar(0, 0xd000_0000);
    let bars = p.bars();
    assert_eq!(bars.len(), 1);
    assert_eq!(bars[0].range, 0xd000_0000..0xd000_4000);
    assert_eq!(bars[0].kind, crate::pci::BarKind::Trap);
    assert!(p.dma().is_some());
    // Registers through BAR0, several access sizes.
    assert_eq!(reg(p, REG_ID), ID_VALUE);
    let mut b = [0u8; 1];
    p.bar_read(0, REG_ID + 2, &mut b);
    assert_eq!(b[0], 0x77);
    set_reg(p, REG_SCRATCH + 4, 0x1234_5678);
    p.bar_write(0, REG_SCRATCH + 4, &[0xab]);
    assert_eq!(reg(p, REG_SCRATCH + 4), 0x1234_56ab);
    p.bar_write(0, REG_RING_LO, &0x1_0000_2000u64.to_le_bytes());
    let mut q = [0u8; 8];
    p.bar_read(0, REG_RING_LO, &mut q);
    assert_eq!(u64::from_le_bytes(q), 0x1_0000_2000);
    set_reg(p, REG_ID, 0); // read-only
    assert_eq!(reg(p, REG_ID), ID_VALUE);
    // Holes, other BARs and out-of-range offsets read 0 and ignore writes.
    set_reg(p, 0x200, 5);
    assert_eq!(reg(p, 0x200), 0);
    let mut b = [0xffu8; 4];
    p.bar_read(1, 0, &mut b);
    assert_eq!(b, [0; 4]);
    p.bar_read(0, 0x4000, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn wrap_interrupts_through_msix_and_masked_pending() {
    let ram = FakeRam::new(0x10_0000, 8);
    let d = SimVfioDevice::new_source(&dev_cfg("msix")).unwrap();
    let p = d.pci();
    let p = &*p;
    let sink = Arc::new(FakeSink::default());
    p.attach_msi(sink.clone()).unwrap();
    ram.map_into(p.dma().unwrap());
    let pages = ram.ring(&[2, 2]);
    p.assign_bar(0, 0xd000_0000);
    setup_msix(p, false);
    assert_eq!(
        sink.last_route(),
        Some((
            0,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        ))
    );
    set_reg(p, REG_RING_LO, ram.gpa as u32);
    set_reg(p, REG_RING_LEN, 2);
    // Without bus mastering the engine refuses to run.
    set_reg(p, REG_CTRL, CTRL_RUN | CTRL_IRQ);
    wait_for("error", || reg(p, REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!(reg(p, REG_SEQ_LO), 0);
    let cmd = cfg_read(p, PCI_COMMAND, 2);
    cfg_write(p, PCI_COMMAND, cmd | 0x4, 2);
    set_reg(p, REG_CTRL, CTRL_RUN | CTRL_IRQ);
    wait_for("3 interrupts", || sink.signals() >= 3);
    set_reg(p, REG_CTRL, 0);
    assert_eq!(reg(p, REG_STATUS), 0);
    let s = u64::from(reg(p, REG_SEQ_LO));
    check_pattern(&ram, &pages, s);
    assert!(u64::from(sink.signals()) <= s / 4);
    // Masked: the wrap sets the pending bit, unmasking delivers it.
    p.bar_write(0, 0x100c, &1u32.to_le_bytes());
    assert_eq!(sink.last_route(), Some((0, None)));
    let before = sink.signals();
    let w = reg(p, REG_WRAPS);
    set_reg(p, REG_CTRL, CTRL_RUN | CTRL_IRQ);
    wait_for("a wrap", || reg(p, REG_WRAPS) > w);
    set_reg(p, REG_CTRL, 0);
    wait_for("pending", || d.pci_function().msix_pending());
    assert_eq!(reg(p, 0x1800) & 1, 1, "PBA bit 0");
    assert_eq!(sink.signals(), before);
    p.bar_write(0, 0x100c, &0u32.to_le_bytes());
    assert_eq!(sink.signals(), before + 1);
    assert_eq!(reg(p, 0x1800), 0);
    // Bus master off while running: ERROR, ERR_ADDR 0.
    set_reg(p, REG_CTRL, CTRL_RUN);
    cfg_write(p, PCI_COMMAND, cmd, 2);
    wait_for("error", || reg(p, REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!(reg(p, REG_ERR_ADDR_LO), 0);
}

#[test]
fn pci_layer_save_restore() {
    let a = SimVfioDevice::new_source(&dev_cfg("pcis")).unwrap();
    let b = SimVfioDevice::new_destination(&dev_cfg("pcis")).unwrap();
    let (pa, pb) = (a.pci(), b.pci());
    pa.assign_bar(0, 0xd001_0000);
    let cmd = cfg_read(&*pa, PCI_COMMAND, 2);
    cfg_write(&*pa, PCI_COMMAND, cmd | 0x4, 2);
    setup_msix(&*pa, true);
    let st = pa.save_pci();
    assert_eq!(st.bars[0], 0xd001_0000);
    let sink = Arc::new(FakeSink::default());
    pb.attach_msi(sink.clone()).unwrap();
    pb.restore_pci(&st).unwrap();
    assert_eq!(pb.save_pci(), st);
    assert!(b.shared.hw.lock().bus_master);
    assert_eq!(pb.bars(), pa.bars());
    assert_eq!(sink.last_route(), Some((0, None)), "masked entry: no route");
    // Refusals change nothing.
    let mut other = st.clone();
    other.id = "x".into();
    assert!(pb.restore_pci(&other).is_err());
    let mut bad = st.clone();
    bad.msix = None;
    assert!(pb.restore_pci(&bad).is_err());
    let mut bad = st.clone();
    bad.msix.as_mut().unwrap().entries.push(Default::default());
    assert!(pb.restore_pci(&bad).is_err());
    let mut bad = st.clone();
    bad.msix.as_mut().unwrap().pba[0] = 2;
    assert!(pb.restore_pci(&bad).is_err());
    let mut bad = st.clone();
    bad.config[0] ^= 1;
    assert!(pb.restore_pci(&bad).is_err());
    let mut bad = st.clone();
    bad.bars[3] = 0x1000;
    assert!(pb.restore_pci(&bad).is_err());
    assert_eq!(pb.save_pci(), st);
}

/// Both views of one device across a migration, as the VMM drives them:
/// PCI layer in the VM state, registers in the device stream, RAM copied
/// with the DMA log's help; the destination's engine goes on and its
/// interrupts reach the destination's sink.
#[test]
fn pci_device_migrates_with_its_engine() {
    let mut c = dev_cfg("both");
    c.precopy_size = 4096;
    let (src, dst) = (
        SimVfioDevice::new_source(&c).unwrap(),
        SimVfioDevice::new_destination(&c).unwrap(),
    );
    let (sram, dram) = (FakeRam::new(0x10_0000, 24), FakeRam::new(0x10_0000, 24));
    let (ps, pd) = (src.pci(), dst.pci());
    let (ss, sd) = (Arc::new(FakeSink::default()), Arc::new(FakeSink::default()));
    ps.attach_msi(ss.clone()).unwrap();
    pd.attach_msi(sd.clone()).unwrap();
    sram.map_into(ps.dma().unwrap());
    dram.map_into(pd.dma().unwrap());
    // Boot: firmware assigns BAR0; the guest driver does the rest.
    ps.assign_bar(0, 0xd000_0000);
    let cmd = cfg_read(&*ps, PCI_COMMAND, 2);
    cfg_write(&*ps, PCI_COMMAND, cmd | 0x6, 2);
    setup_msix(&*ps, false);
    let pages = sram.ring(&[5, 9, 2]);
    p_ring(&*ps, sram.gpa, 3);
    set_reg(&*ps, REG_SCRATCH, 0x5ca7);
    set_reg(&*ps, REG_CTRL, CTRL_RUN | CTRL_IRQ);
    wait_for("interrupts", || ss.signals() >= 2);
    src.dma_log_start(&[sram.gpa..sram.gpa + sram.size()], 4096)
        .unwrap();
    sram.copy_to(&dram);
    transfer(&src, &dst, MigState::PreCopy);
    let s = u64::from(reg(&*ps, REG_SEQ_LO));
    for p in report_all(&src, &sram) {
        for off in (0..4096).step_by(8) {
            dram.write(p + off, sram.read(p + off));
        }
    }
    check_pattern(&dram, &pages, s);
    // The VM state carries the PCI layer; the device is still STOP.
    pd.restore_pci(&ps.save_pci()).unwrap();
    assert_eq!(pd.bars(), ps.bars());
    assert_eq!(
        sd.last_route(),
        Some((
            0,
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        ))
    );
    assert_eq!(sd.signals(), 0);
    dst.set_state(MigState::Running).unwrap();
    wait_for("interrupts on the destination", || sd.signals() >= 2);
    set_reg(&*pd, REG_CTRL, 0);
    let s2 = u64::from(reg(&*pd, REG_SEQ_LO));
    assert!(s2 > s);
    check_pattern(&dram, &pages, s2);
    assert_eq!(reg(&*pd, REG_SCRATCH), 0x5ca7);
    assert_eq!(reg(&*pd, REG_STATUS), 0);
}

fn p_ring(p: &dyn PciDevice, gpa: u64, n: u32) {
    set_reg(p, REG_RING_LO, gpa as u32);
    set_reg(p, REG_RING_HI, (gpa >> 32) as u32);
    set_reg(p, REG_RING_LEN, n);
}
