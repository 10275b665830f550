//! KVM tests of [`super::wiring::PciWiring`] with a fake function: RAM is
//! DMA-mapped at build (and unmapped on drop), the sink has the function's
//! vectors, BARs are allocated at boot only, ECAM and 0xCF8/0xCFC reach the
//! function, a mapped BAR part follows the BAR as a KVM slot, and a PCI
//! state round trip is checked before it is applied. Skipped without
//! /dev/kvm.

use std::sync::{Arc, Mutex};

use arch::pci::{ecam_address, PCI_MMIO32_START};
use devices::pci::config::{PciConfig, PciHeader, PCI_COMMAND_MEMORY};
use devices::pci::{
    BarKind, BarMapping, BarRequest, DmaTarget, MsiSink, PciDevice, PciFunctionState,
};

use super::io::PciIo;
use super::wiring::PciWiring;
use crate::config::{MemoryBacking, MemoryConfig};
use crate::memory::GuestRam;

struct Fake {
    cfg: Mutex<PciConfig>,
    host: u64,
    maps: Mutex<Vec<(u64, u64, u64)>>,
    unmaps: Mutex<Vec<(u64, u64)>>,
    sink: Mutex<Option<Arc<dyn MsiSink>>>,
    _page: Vec<u8>,
}

impl Fake {
    fn new() -> Arc<Fake> {
        let mut cfg = PciConfig::new(PciHeader {
            vendor_id: 0x1b36,
            device_id: 0xfe77,
            class: 0xff0000,
            revision: 1,
            ..Default::default()
        });
        cfg.add_bar(BarRequest {
            bar: 0,
            size: 0x4000,
            is_64bit: false,
            prefetchable: false,
            is_io: false,
        })
        .unwrap();
        let page = vec![0u8; 0x2000];
        let host = (page.as_ptr() as u64 + 4095) & !4095;
        Arc::new(Fake {
            cfg: Mutex::new(cfg),
            host,
            maps: Mutex::new(Vec::new()),
            unmaps: Mutex::new(Vec::new()),
            sink: Mutex::new(None),
            _page: page,
        })
    }
}

impl DmaTarget for Fake {
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> devices::Result<()> {
        self.maps.lock().unwrap().push((iova, size, host_addr));
        Ok(())
    }
    fn dma_unmap(&self, iova: u64, size: u64) -> devices::Result<()> {
        self.unmaps.lock().unwrap().push((iova, size));
        Ok(())
    }
}

impl PciDevice for Fake {
    fn id(&self) -> &str {
        "f0"
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
                range: d.range,
                // The second page of BAR 0 is host memory.
                kind: BarKind::Mapped(vec![(0x1000, 0x1000, self.host)]),
            })
            .collect()
    }
    fn bar_read(&self, _bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8 ^ 0xa5);
    }
    fn bar_write(&self, _bar: u8, _offset: u64, _data: &[u8]) {}
    fn bar_requests(&self) -> Vec<BarRequest> {
        self.cfg.lock().unwrap().bar_requests()
    }
    fn assign_bar(&self, bar: u8, addr: u64) {
        let mut c = self.cfg.lock().unwrap();
        c.set_bar_address(usize::from(bar), addr);
        let cmd = c.command() | PCI_COMMAND_MEMORY;
        c.set_command(cmd);
    }
    fn msi_vectors(&self) -> u16 {
        3
    }
    fn attach_msi(&self, sink: Arc<dyn MsiSink>) -> devices::Result<()> {
        *self.sink.lock().unwrap() = Some(sink);
        Ok(())
    }
    fn dma(&self) -> Option<&dyn DmaTarget> {
        Some(self)
    }
    fn save_pci(&self) -> PciFunctionState {
        self.cfg.lock().unwrap().save("f0")
    }
    fn restore_pci(&self, state: &PciFunctionState) -> devices::Result<()> {
        self.cfg.lock().unwrap().restore(state)
    }
}

fn ecam(dev: u8, reg: u16) -> u64 {
    ecam_address(dev, 0, reg).unwrap()
}

fn ram() -> GuestRam {
    GuestRam::new(&MemoryConfig {
        size: 64 << 20,
        backing: MemoryBacking::Anonymous,
        prefault: false,
    })
    .unwrap()
}

#[test]
fn wiring_maps_routes_and_moves_bars() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let fd = Arc::new(kvm.create_vm().unwrap());
    fd.create_irq_chip().unwrap();
    let ram = ram();
    let f = Fake::new();
    let w = PciWiring::build(&fd, &ram, vec![f.clone() as Arc<dyn PciDevice>], true).unwrap();

    // Every RAM region is DMA-mapped, identity IOVA.
    let want: Vec<_> = ram
        .regions()
        .iter()
        .map(|r| (r.gpa, r.size, r.host_addr))
        .collect();
    assert_eq!(*f.maps.lock().unwrap(), want);
    assert_eq!(f.sink.lock().unwrap().as_ref().unwrap().count(), 3);

    // The host bridge at 00:00.0, the function at 00:01.0 (ECAM and CF8).
    let mut d = [0u8; 4];
    assert!(w.mmio_read(ecam(0, 0), &mut d));
    assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
    assert!(w.pio_write(0xcf8, &(0x8000_0800u32).to_le_bytes()));
    assert!(w.pio_read(0xcfc, &mut d));
    assert_eq!(u32::from_le_bytes(d), 0xfe77_1b36);
    // Not a PCI port.
    assert!(!w.pio_read(0x3f8, &mut [0u8]));

    // Allocated at boot in the 32-bit window; its mapped page is a slot.
    let bar0 = f.cfg.lock().unwrap().bar_address(0).unwrap();
    assert!(bar0 >= PCI_MMIO32_START, "{bar0:#x}");
    assert_eq!(
        w.bar_slots(),
        vec![(ram.regions().len() as u32, (bar0 + 0x1000, 0x1000, f.host))]
    );
    // The trapped page reaches the function.
    let mut b = [0u8; 4];
    assert!(w.mmio_read(bar0 + 4, &mut b));
    assert_eq!(b, [4 ^ 0xa5; 4]);

    // The guest moves BAR 0 through ECAM: the slot follows; disabling
    // memory decode removes it.
    assert!(w.mmio_write(ecam(1, 0x10), &0xd000_0000u32.to_le_bytes()));
    assert_eq!(w.bar_slots()[0].1, (0xd000_1000, 0x1000, f.host));
    assert!(
        !w.mmio_read(bar0 + 4, &mut b),
        "the old address decodes nothing"
    );
    let saved = w.save();
    assert!(w.mmio_write(ecam(1, 0x04), &0u16.to_le_bytes()));
    assert!(w.bar_slots().is_empty());

    // Restore: refused for another function's id, applied otherwise (the
    // slot comes back at the saved address).
    let mut wrong = saved.clone();
    wrong[0].id = "other".into();
    assert!(w.restore(&wrong).is_err());
    assert!(w.restore(&[]).is_err());
    w.restore(&saved).unwrap();
    assert_eq!(w.bar_slots()[0].1, (0xd000_1000, 0x1000, f.host));

    // Dropping the wiring unmaps the RAM.
    drop(w);
    assert_eq!(f.unmaps.lock().unwrap().len(), ram.regions().len());
}

#[test]
fn a_received_vm_gets_no_boot_allocation() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let fd = Arc::new(kvm.create_vm().unwrap());
    fd.create_irq_chip().unwrap();
    let f = Fake::new();
    let w = PciWiring::build(&fd, &ram(), vec![f.clone() as Arc<dyn PciDevice>], false).unwrap();
    assert_eq!(f.cfg.lock().unwrap().command() & PCI_COMMAND_MEMORY, 0);
    assert!(w.bar_slots().is_empty());
    assert_eq!(w.ids(), vec!["f0".to_string()]);
}
