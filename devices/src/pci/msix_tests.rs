use std::os::fd::RawFd;
use std::sync::Mutex;

use super::*;
use crate::pci::config::{PciConfig, PciHeader};
use crate::pci::BarRequest;

/// Records every route and signal.
#[derive(Default)]
struct FakeSink {
    count: u16,
    routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
    signals: Mutex<Vec<u16>>,
}

impl MsiSink for FakeSink {
    fn count(&self) -> u16 {
        self.count
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

impl FakeSink {
    fn take_routes(&self) -> Vec<(u16, Option<MsiMessage>)> {
        std::mem::take(&mut *self.routes.lock().unwrap())
    }
    fn take_signals(&self) -> Vec<u16> {
        std::mem::take(&mut *self.signals.lock().unwrap())
    }
}

fn setup(vectors: u16) -> (PciConfig, Msix, Arc<FakeSink>) {
    let mut cfg = PciConfig::new(PciHeader {
        vendor_id: 0x1b36,
        device_id: 0xfe77,
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
    let mut m = Msix::new(&mut cfg, vectors, 0, 0x1000, 0, 0x1800).unwrap();
    let sink = Arc::new(FakeSink {
        count: vectors,
        ..Default::default()
    });
    m.attach(sink.clone()).unwrap();
    (cfg, m, sink)
}

fn w32(m: &mut Msix, off: u64, v: u32) {
    assert!(m.bar_write(0, off, &v.to_le_bytes()));
}

fn control(cfg: &mut PciConfig, m: &mut Msix, v: u16) {
    let cap = m.cap_offset();
    cfg.write(cap + 2, &v.to_le_bytes());
    m.config_written(cfg).unwrap();
}

const MSG: MsiMessage = MsiMessage {
    address: 0xfee0_0000,
    data: 0x41,
};

fn program(m: &mut Msix, v: u64) {
    w32(m, 0x1000 + 16 * v, 0xfee0_0000);
    w32(m, 0x1000 + 16 * v + 4, 0);
    w32(m, 0x1000 + 16 * v + 8, 0x41);
}

#[test]
fn capability_layout() {
    let (mut cfg, m, sink) = setup(3);
    let cap = m.cap_offset();
    assert_eq!(cfg.find_capability(PCI_CAP_ID_MSIX), Some(cap));
    assert_eq!(cfg.read_u16(cap + 2), 2, "table size field = N - 1");
    assert_eq!(cfg.read_u32(cap + 4), 0x1000);
    assert_eq!(cfg.read_u32(cap + 8), 0x1800);
    // Table size and BIR/offsets are read-only.
    cfg.write(cap + 2, &[0xff, 0x3f]);
    cfg.write(cap + 4, &[0xff; 8]);
    assert_eq!(cfg.read_u16(cap + 2), 2);
    assert_eq!(cfg.read_u32(cap + 4), 0x1000);
    // attach programmed every vector as disabled.
    assert_eq!(sink.take_routes(), vec![(0, None), (1, None), (2, None)]);
    assert_eq!(m.table_range(), (0, 0x1000..0x1030));
    assert_eq!(m.pba_range(), (0, 0x1800..0x1808));
}

#[test]
fn bad_layouts_refused() {
    let mut cfg = PciConfig::new(PciHeader::default());
    cfg.add_bar(BarRequest {
        bar: 0,
        size: 0x1000,
        is_64bit: false,
        prefetchable: false,
        is_io: false,
    })
    .unwrap();
    assert!(Msix::new(&mut cfg, 0, 0, 0, 0, 0x800).is_err());
    assert!(Msix::new(&mut cfg, 2049, 0, 0, 0, 0x800).is_err());
    assert!(
        Msix::new(&mut cfg, 1, 1, 0, 0, 0x800).is_err(),
        "BAR 1 undeclared"
    );
    assert!(
        Msix::new(&mut cfg, 1, 0, 4, 0, 0x800).is_err(),
        "misaligned"
    );
    assert!(
        Msix::new(&mut cfg, 1, 0, 0xff8, 0, 0x800).is_err(),
        "past the BAR"
    );
    assert!(Msix::new(&mut cfg, 2, 0, 0, 0, 0x10).is_err(), "overlap");
    assert!(cfg.capabilities().is_empty());
    assert!(Msix::new(&mut cfg, 128, 0, 0, 0, 0x800).is_ok());
}

#[test]
fn routes_follow_enable_and_masks() {
    let (mut cfg, mut m, sink) = setup(2);
    sink.take_routes();
    program(&mut m, 0);
    assert!(
        sink.take_routes().is_empty(),
        "masked, disabled: still None"
    );
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE);
    assert!(m.enabled());
    assert!(sink.take_routes().is_empty(), "entries still masked");
    w32(&mut m, 0x100c, 0);
    assert_eq!(sink.take_routes(), vec![(0, Some(MSG))]);
    // Function mask removes it, clearing it restores it.
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASK);
    assert_eq!(sink.take_routes(), vec![(0, None)]);
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE);
    assert_eq!(sink.take_routes(), vec![(0, Some(MSG))]);
    // Changing the data of an unmasked entry re-routes.
    w32(&mut m, 0x1008, 0x42);
    assert_eq!(
        sink.take_routes(),
        vec![(0, Some(MsiMessage { data: 0x42, ..MSG }))]
    );
    // Entry mask.
    w32(&mut m, 0x100c, 1);
    assert_eq!(sink.take_routes(), vec![(0, None)]);
    // Disable.
    w32(&mut m, 0x100c, 0);
    sink.take_routes();
    control(&mut cfg, &mut m, 0);
    assert_eq!(sink.take_routes(), vec![(0, None)]);
    assert!(!m.enabled());
}

#[test]
fn table_accesses() {
    let (_cfg, mut m, _sink) = setup(2);
    // qword write of address lo/hi, dword data, ctrl with reserved bits.
    assert!(m.bar_write(0, 0x1010, &0x0000_0001_fee0_1000u64.to_le_bytes()));
    w32(&mut m, 0x1018, 0x55);
    w32(&mut m, 0x101c, 0xffff_fffe);
    let e = m.entry(1).unwrap();
    assert_eq!(
        (e.addr_lo, e.addr_hi, e.data, e.ctrl),
        (0xfee0_1000, 1, 0x55, 0)
    );
    let mut q = [0u8; 8];
    assert!(m.bar_read(0, 0x1010, &mut q));
    assert_eq!(u64::from_le_bytes(q), 0x0000_0001_fee0_1000);
    let mut d = [0u8; 4];
    assert!(m.bar_read(0, 0x100c, &mut d));
    assert_eq!(u32::from_le_bytes(d), 1, "entry 0 starts masked");
    // Misaligned or odd-sized writes are ignored.
    assert!(m.bar_write(0, 0x1012, &[1, 2, 3, 4]));
    assert!(m.bar_write(0, 0x1018, &[9]));
    assert!(m.bar_write(0, 0x1014, &[0; 8]));
    assert_eq!(m.entry(1), Some(e));
    // Outside table and PBA: not ours.
    assert!(!m.bar_read(0, 0x0, &mut d));
    assert!(!m.bar_write(0, 0x1020, &[0; 4]));
    assert!(!m.bar_read(1, 0x1000, &mut d));
    // PBA writes are swallowed.
    assert!(m.bar_write(0, 0x1800, &[0xff; 8]));
    assert!(!m.pending(0));
    // A read running past the table end reads zeros there.
    let mut big = [0xaau8; 8];
    m.table_read(0x1c, &mut big);
    assert_eq!(&big[4..], &[0, 0, 0, 0]);
}

#[test]
fn trigger_pending_and_delivery() {
    let (mut cfg, mut m, sink) = setup(70);
    program(&mut m, 0);
    program(&mut m, 65);
    // Disabled: pending.
    m.trigger(0).unwrap();
    assert!(m.pending(0));
    assert!(sink.take_signals().is_empty());
    let mut q = [0u8; 8];
    assert!(m.bar_read(0, 0x1800, &mut q));
    assert_eq!(u64::from_le_bytes(q), 1);
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE);
    assert!(sink.take_signals().is_empty(), "entry still masked");
    // Unmask: the pending vector is delivered and cleared.
    w32(&mut m, 0x100c, 0);
    assert_eq!(sink.take_signals(), vec![0]);
    assert!(!m.pending(0));
    m.trigger(0).unwrap();
    assert_eq!(sink.take_signals(), vec![0]);
    // Vector 65 (second PBA word): masked -> pending, function mask.
    w32(&mut m, 0x1000 + 16 * 65 + 12, 0);
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE | MSIX_CONTROL_MASK);
    m.trigger(65).unwrap();
    m.trigger(0).unwrap();
    assert!(m.pending(65) && m.pending(0));
    assert!(m.bar_read(0, 0x1808, &mut q));
    assert_eq!(u64::from_le_bytes(q), 2);
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE);
    let mut s = sink.take_signals();
    s.sort();
    assert_eq!(s, vec![0, 65]);
    assert!(m.trigger(70).is_err());
}

#[test]
fn save_restore() {
    let (mut cfg, mut m, _sink) = setup(2);
    program(&mut m, 0);
    w32(&mut m, 0x100c, 0);
    control(&mut cfg, &mut m, MSIX_CONTROL_ENABLE);
    m.trigger(1).unwrap();
    let st = m.save();
    assert_eq!(st.entries.len(), 2);
    assert_eq!(st.pba, vec![2]);

    let (mut cfg2, mut m2, sink2) = setup(2);
    sink2.take_routes();
    m2.restore(&st, &mut cfg2).unwrap();
    assert_eq!(m2.save(), st);
    assert_eq!(cfg2.read_u16(m2.cap_offset() + 2), MSIX_CONTROL_ENABLE | 1);
    assert_eq!(sink2.take_routes(), vec![(0, Some(MSG)), (1, None)]);
    assert!(m2.enabled());

    let mut bad = st.clone();
    bad.entries.push(MsixEntry::default());
    assert!(m2.restore(&bad, &mut cfg2).is_err());
    let mut bad = st.clone();
    bad.pba = vec![];
    assert!(m2.restore(&bad, &mut cfg2).is_err());
    let mut bad = st.clone();
    bad.pba = vec![4];
    assert!(m2.restore(&bad, &mut cfg2).is_err());
    assert_eq!(m2.save(), st, "unchanged on refusal");
}

#[test]
fn small_sink_refused() {
    let (_cfg, mut m, _sink) = setup(2);
    let small = Arc::new(FakeSink {
        count: 1,
        ..Default::default()
    });
    assert!(m.attach(small).is_err());
}
