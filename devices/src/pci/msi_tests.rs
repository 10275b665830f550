use std::os::fd::RawFd;
use std::sync::Mutex;

use super::*;
use crate::pci::config::PciHeader;

#[derive(Default)]
struct FakeSink {
    routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    signals: Mutex<Vec<u16>>,
}

impl MsiSink for FakeSink {
    fn count(&self) -> u16 {
        32
    }
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<()> {
        self.routes.lock().unwrap().push((vector, msg));
        Ok(())
    }
    fn signal(&self, vector: u16) -> Result<()> {
        self.signals.lock().unwrap().push(vector);
        Ok(())
    }
    fn eventfd(&self, _vector: u16) -> Option<RawFd> {
        None
    }
}

fn take<T>(m: &Mutex<Vec<T>>) -> Vec<T> {
    std::mem::take(&mut *m.lock().unwrap())
}

fn setup(vectors: u8, pvm: bool) -> (PciConfig, Msi, Arc<FakeSink>) {
    let mut cfg = PciConfig::new(PciHeader::default());
    let mut msi = Msi::new(&mut cfg, vectors, pvm).unwrap();
    let sink = Arc::new(FakeSink::default());
    msi.attach(sink.clone(), &mut cfg).unwrap();
    assert_eq!(take(&sink.routes).len(), usize::from(vectors));
    (cfg, msi, sink)
}

fn guest_write(cfg: &mut PciConfig, msi: &mut Msi, reg: u16, data: &[u8]) {
    let at = msi.cap_offset() + reg;
    cfg.write(at, data);
    msi.config_written(cfg).unwrap();
}

#[test]
fn capability_layout() {
    let (mut cfg, msi, _) = setup(4, true);
    let cap = msi.cap_offset();
    assert_eq!(cfg.find_capability(PCI_CAP_ID_MSI), Some(cap));
    assert_eq!(
        cfg.read_u16(cap + 2),
        MSI_CONTROL_64BIT | MSI_CONTROL_PVM | (2 << 1)
    );
    // MMC, 64-bit and PVM bits are read-only.
    cfg.write(cap + 2, &[0xff, 0xff]);
    assert_eq!(
        cfg.read_u16(cap + 2),
        MSI_CONTROL_64BIT | MSI_CONTROL_PVM | (2 << 1) | 0x71
    );
    cfg.write(cap + 16, &[0xff; 4]);
    assert_eq!(
        cfg.read_u32(cap + 16),
        0xf,
        "mask bits only for the vectors"
    );
    let mut c2 = PciConfig::new(PciHeader::default());
    assert!(Msi::new(&mut c2, 3, false).is_err());
    assert!(Msi::new(&mut c2, 64, false).is_err());
    assert!(Msi::new(&mut c2, 0, false).is_err());
    assert!(Msi::new(&mut c2, 32, false).is_ok());
}

#[test]
fn routes_and_delivery() {
    let (mut cfg, mut msi, sink) = setup(4, true);
    guest_write(&mut cfg, &mut msi, ADDR_LO, &0xfee0_0000u32.to_le_bytes());
    guest_write(&mut cfg, &mut msi, DATA, &0x41u16.to_le_bytes());
    assert!(take(&sink.routes).is_empty());
    // Enable with 2 vectors (MME = 1).
    guest_write(&mut cfg, &mut msi, CONTROL, &[0x11, 0]);
    let msg = |data| {
        Some(MsiMessage {
            address: 0xfee0_0000,
            data,
        })
    };
    assert_eq!(take(&sink.routes), vec![(0, msg(0x40)), (1, msg(0x41))]);
    msi.trigger(&mut cfg, 1).unwrap();
    assert_eq!(take(&sink.signals), vec![1]);
    // Vector 2 is not enabled: dropped into pending (PVM).
    msi.trigger(&mut cfg, 2).unwrap();
    assert!(take(&sink.signals).is_empty());
    // Mask vector 0, fire it, unmask: delivered.
    guest_write(&mut cfg, &mut msi, MASK, &[1, 0, 0, 0]);
    assert_eq!(take(&sink.routes), vec![(0, None)]);
    msi.trigger(&mut cfg, 0).unwrap();
    assert_eq!(cfg.read_u32(msi.cap_offset() + PENDING), 0b101);
    guest_write(&mut cfg, &mut msi, MASK, &[0, 0, 0, 0]);
    assert_eq!(take(&sink.routes), vec![(0, msg(0x40))]);
    assert_eq!(take(&sink.signals), vec![0]);
    // Pending is read-only for the guest.
    guest_write(&mut cfg, &mut msi, PENDING, &[0, 0, 0, 0]);
    assert_eq!(cfg.read_u32(msi.cap_offset() + PENDING), 0b100);
    // Disable.
    guest_write(&mut cfg, &mut msi, CONTROL, &[0x10, 0]);
    assert_eq!(take(&sink.routes), vec![(0, None), (1, None)]);
    assert!(msi.trigger(&mut cfg, 4).is_err());
}

#[test]
fn without_masking_and_restore() {
    let (mut cfg, mut msi, sink) = setup(1, false);
    msi.trigger(&mut cfg, 0).unwrap();
    assert!(take(&sink.signals).is_empty(), "disabled: dropped");
    guest_write(&mut cfg, &mut msi, ADDR_HI, &1u32.to_le_bytes());
    guest_write(&mut cfg, &mut msi, CONTROL, &[0x71, 0]);
    let m = MsiMessage {
        address: 1 << 32,
        data: 0,
    };
    assert_eq!(
        take(&sink.routes),
        vec![(0, Some(m))],
        "MME clamped to 1 vector"
    );
    let saved = cfg.save("x");

    let (mut cfg2, mut msi2, sink2) = setup(1, false);
    cfg2.restore(&saved).unwrap();
    msi2.restore(&mut cfg2).unwrap();
    assert_eq!(take(&sink2.routes), vec![(0, Some(m))]);
}
