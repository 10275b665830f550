//! Tests of the simulated device's DMA side: ring walk and page pattern,
//! errors, interrupts, DMA logging, halting and resuming across a
//! migration, and the register record of the stream.

#![allow(clippy::single_range_in_vec_init)]

use super::regs::*;
use super::*;
use crate::pci::DmaTarget;
use migration::{DmaLog, MigratableDevice};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io::{Read, Write};
use std::sync::atomic::AtomicU32;
use std::time::Instant;
use stream::END_LEN;

/// Fake guest RAM: page-aligned zeroed host memory, only accessed through
/// raw pointers (the engine writes it concurrently).
pub(super) struct FakeRam {
    ptr: *mut u8,
    layout: Layout,
    /// Guest-physical address of the first byte.
    pub gpa: u64,
}

// SAFETY: the memory is plain bytes owned by the struct; all accesses are
// volatile through raw pointers.
unsafe impl Send for FakeRam {}
// SAFETY: as above.
unsafe impl Sync for FakeRam {}

impl FakeRam {
    pub(super) fn new(gpa: u64, pages: usize) -> Self {
        let layout = Layout::from_size_align(pages * PAGE as usize, PAGE as usize).unwrap();
        // SAFETY: non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        FakeRam { ptr, layout, gpa }
    }

    pub(super) fn size(&self) -> u64 {
        self.layout.size() as u64
    }

    fn at(&self, gpa: u64) -> *mut u64 {
        assert!(gpa >= self.gpa && gpa + 8 <= self.gpa + self.size() && gpa.is_multiple_of(8));
        // SAFETY: in bounds (checked above).
        unsafe { self.ptr.add((gpa - self.gpa) as usize).cast() }
    }

    pub(super) fn read(&self, gpa: u64) -> u64 {
        // SAFETY: in bounds and aligned (`at`); volatile as the engine may write.
        unsafe { self.at(gpa).read_volatile() }
    }

    pub(super) fn write(&self, gpa: u64, v: u64) {
        // SAFETY: as in `read`.
        unsafe { self.at(gpa).write_volatile(v) }
    }

    /// Maps the whole RAM into `t` (identity IOVA).
    pub(super) fn map_into(&self, t: &dyn DmaTarget) {
        // SAFETY: the memory stays allocated until `self` is dropped; every
        // test drops (or unmaps) the device first.
        unsafe { t.dma_map(self.gpa, self.size(), self.ptr as u64).unwrap() };
    }

    /// Copies everything into `other` (a RAM migration).
    pub(super) fn copy_to(&self, other: &FakeRam) {
        assert_eq!(self.size(), other.size());
        for off in (0..self.size()).step_by(8) {
            other.write(other.gpa + off, self.read(self.gpa + off));
        }
    }

    /// Writes a ring at page 0 with one descriptor per entry of `lens`
    /// (pages), buffers packed from page 1; returns the page addresses in
    /// ring order.
    pub(super) fn ring(&self, lens: &[u64]) -> Vec<u64> {
        let mut next = self.gpa + PAGE;
        let mut pages = Vec::new();
        for (i, &n) in lens.iter().enumerate() {
            let d = self.gpa + i as u64 * DESC_LEN;
            self.write(d, next);
            self.write(d + 8, n * PAGE);
            pages.extend((0..n).map(|p| next + p * PAGE));
            next += n * PAGE;
        }
        assert!(next <= self.gpa + self.size());
        pages
    }
}

impl Drop for FakeRam {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Checks every ring page against the formula after `seq` pages.
pub(super) fn check_pattern(ram: &FakeRam, pages: &[u64], seq: u64) {
    let np = pages.len() as u64;
    for (p, &gpa) in pages.iter().enumerate() {
        let want = expected_seq(seq, p as u64, np);
        let got = ram.read(gpa);
        assert_eq!(got, want, "page {p} (gpa {gpa:#x}) after seq {seq}");
        if want != 0 {
            assert_eq!(ram.read(gpa + 8), gpa, "page {p} address");
            assert_eq!(ram.read(gpa + TAIL_OFF), !want, "page {p} tail");
        } else {
            assert_eq!(ram.read(gpa + 8), 0);
            assert_eq!(ram.read(gpa + TAIL_OFF), 0);
        }
        assert_eq!(ram.read(gpa + 16), 0, "rest of the page untouched");
    }
}

pub(super) fn dev_cfg(id: &str) -> SimVfioConfig {
    let mut c = SimVfioConfig::new(id, 64 << 10, 0);
    c.dma_rate = 400.0;
    c
}

/// Sets up and starts the ring at `ram.gpa` with `n` descriptors.
pub(super) fn start(hw: &Hw, ram: &FakeRam, n: u32, ctrl: u32) {
    hw.write_reg(REG_RING_LO, ram.gpa as u32);
    hw.write_reg(REG_RING_HI, (ram.gpa >> 32) as u32);
    hw.write_reg(REG_RING_LEN, n);
    hw.set_bus_master(true);
    hw.write_reg(REG_CTRL, ctrl);
}

pub(super) fn seq(hw: &Hw) -> u64 {
    u64::from(hw.read_reg(REG_SEQ_LO)) | u64::from(hw.read_reg(REG_SEQ_HI)) << 32
}

/// Waits (up to 10 s) until `f` holds.
pub(super) fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Stops the engine the way the guest does: CTRL := 0, wait for !BUSY.
pub(super) fn stop(hw: &Hw) -> u64 {
    hw.write_reg(REG_CTRL, 0);
    assert_eq!(hw.read_reg(REG_STATUS) & STATUS_BUSY, 0);
    seq(hw)
}

#[test]
fn step_walks_the_ring_and_the_formula_holds() {
    for lens in [&[1u64][..], &[3], &[2, 1, 4], &[1, 1, 1, 1, 1]] {
        let ram = FakeRam::new(0x20_0000, 16);
        let map = dma::DmaMap::new("t");
        ram.map_into(&map);
        let pages = ram.ring(lens);
        let np = pages.len() as u64;
        let mut r = Regs::default();
        r.write32(REG_RING_LO, ram.gpa as u32);
        r.write32(REG_RING_LEN, lens.len() as u32);
        assert_eq!(r.write32(REG_CTRL, CTRL_RUN), WriteEffect::Wake);
        for s in 1..=3 * np + 2 {
            match step_page(&mut r, &map, true) {
                Step::Wrote { gpa, seq, wrapped } => {
                    assert_eq!(seq, s);
                    assert_eq!(gpa, pages[((s - 1) % np) as usize]);
                    assert_eq!(wrapped, s.is_multiple_of(np));
                }
                Step::Failed => panic!("failed at {s}: {:#x}", r.err_addr),
            }
            check_pattern(&ram, &pages, s);
            assert_eq!(u64::from(r.wraps), s / np);
        }
    }
}

#[test]
fn the_formula() {
    // NP = 4: after S = 6, pages 0, 1 hold 5, 6 and pages 2, 3 hold 3, 4.
    assert_eq!(
        (0..4).map(|p| expected_seq(6, p, 4)).collect::<Vec<_>>(),
        [5, 6, 3, 4]
    );
    assert_eq!(expected_seq(2, 3, 4), 0);
    assert_eq!(expected_seq(0, 0, 1), 0);
    assert_eq!(expected_seq(9, 0, 1), 9);
}

#[test]
fn engine_thread_runs_and_stops_between_pages() {
    let ram = FakeRam::new(0x10_0000, 40);
    let d = SimVfioDevice::new_source(&dev_cfg("eng")).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    let pages = ram.ring(&[8, 16, 7]);
    assert_eq!(hw.read_reg(REG_ID), ID_VALUE);
    start(&hw, &ram, 3, CTRL_RUN);
    assert_eq!(hw.read_reg(REG_STATUS), STATUS_BUSY);
    wait_for("two wraps", || hw.read_reg(REG_WRAPS) >= 2);
    // Ring registers are ignored while BUSY.
    hw.write_reg(REG_RING_LEN, 1);
    assert_eq!(hw.read_reg(REG_RING_LEN), 3);
    let s = stop(&hw);
    assert!(s >= 62, "{s}");
    check_pattern(&ram, &pages, s);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(seq(&hw), s, "stopped means stopped");
    check_pattern(&ram, &pages, s);
    // Restarting continues the sequence.
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("more pages", || seq(&hw) > s + 5);
    let s2 = stop(&hw);
    check_pattern(&ram, &pages, s2);
    // Setting the ring up again resets SEQ, WRAPS and the position.
    hw.write_reg(REG_RING_LEN, 3);
    assert_eq!((seq(&hw), hw.read_reg(REG_WRAPS)), (0, 0));
    drop(d);
}

#[test]
fn bad_rings_descriptors_and_unmapped_dma_are_errors() {
    let ram = FakeRam::new(0x10_0000, 8);
    let d = SimVfioDevice::new_source(&dev_cfg("err")).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    let err_addr =
        || u64::from(hw.read_reg(REG_ERR_ADDR_LO)) | u64::from(hw.read_reg(REG_ERR_ADDR_HI)) << 32;
    // RING_LEN 0 or too large: ERROR on RUN.
    for n in [0, MAX_RING_LEN + 1] {
        hw.write_reg(REG_RING_LEN, n);
        hw.write_reg(REG_CTRL, CTRL_RUN);
        assert_eq!(hw.read_reg(REG_STATUS), STATUS_ERROR, "len {n}");
    }
    // A buffer outside the mappings: ERROR at its first page, nothing written.
    ram.write(ram.gpa, 0x4000_0000);
    ram.write(ram.gpa + 8, PAGE);
    start(&hw, &ram, 1, CTRL_RUN);
    wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!(hw.read_reg(REG_STATUS), STATUS_ERROR, "not BUSY");
    assert_eq!(err_addr(), 0x4000_0000);
    assert_eq!(seq(&hw), 0);
    // A page half inside the mapping (the buffer's 2nd page is beyond it).
    let last = ram.gpa + ram.size() - PAGE;
    ram.write(ram.gpa, last);
    ram.write(ram.gpa + 8, 2 * PAGE);
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!((err_addr(), seq(&hw)), (last + PAGE, 1));
    assert_eq!(ram.read(last), 1);
    // A bad descriptor (unaligned, zero length, flags): ERR_ADDR = descriptor.
    for (addr, lenflags) in [
        (ram.gpa + 8, PAGE),
        (ram.gpa + PAGE, 0),
        (ram.gpa + PAGE, PAGE | 1 << 32),
    ] {
        hw.write_reg(REG_RING_LEN, 1);
        ram.write(ram.gpa, addr);
        ram.write(ram.gpa + 8, lenflags);
        hw.write_reg(REG_CTRL, CTRL_RUN);
        wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
        assert_eq!(err_addr(), ram.gpa, "{addr:#x} {lenflags:#x}");
    }
    // The ring itself outside the mappings.
    hw.write_reg(REG_RING_LO, 0x10);
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!(err_addr(), 0x10);
    // Bus master off.
    ram.ring(&[1]);
    hw.write_reg(REG_RING_LO, ram.gpa as u32);
    hw.set_bus_master(false);
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
    assert_eq!(err_addr(), 0);
    // Recovery: a good setup runs again.
    hw.set_bus_master(true);
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("pages", || seq(&hw) > 3);
    assert!(stop(&hw) > 3);
    assert_eq!(hw.read_reg(REG_STATUS), 0);
}

struct CountIrq(AtomicU32);

impl engine::IrqLine for CountIrq {
    fn raise(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[test]
fn irq_at_every_wrap_when_enabled() {
    let ram = FakeRam::new(0x10_0000, 8);
    let d = SimVfioDevice::new_source(&dev_cfg("irq")).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    let irq = Arc::new(CountIrq(AtomicU32::new(0)));
    hw.set_irq(irq.clone());
    ram.ring(&[2, 1]);
    start(&hw, &ram, 2, CTRL_RUN);
    wait_for("wraps", || hw.read_reg(REG_WRAPS) >= 3);
    stop(&hw);
    assert_eq!(irq.0.load(Ordering::SeqCst), 0, "IRQ off");
    hw.write_reg(REG_CTRL, CTRL_RUN | CTRL_IRQ);
    wait_for("interrupts", || irq.0.load(Ordering::SeqCst) >= 3);
    stop(&hw);
    let w = hw.read_reg(REG_WRAPS);
    let n = irq.0.load(Ordering::SeqCst);
    assert!(n >= 3 && n <= w - 3, "{n} interrupts, {w} wraps");
}

pub(super) fn report_all(d: &SimVfioDevice, ram: &FakeRam) -> Vec<u64> {
    let pages = ram.size() / PAGE;
    let mut bm = vec![0u64; pages.div_ceil(64) as usize];
    d.dma_log_report(ram.gpa, ram.size(), PAGE, &mut bm)
        .unwrap();
    (0..pages)
        .filter(|&p| bm[(p / 64) as usize] & 1 << (p % 64) != 0)
        .map(|p| ram.gpa + p * PAGE)
        .collect()
}

#[test]
fn dma_logging_on_off_none() {
    let ram = FakeRam::new(0x10_0000, 16);
    // on: every written page is reported once; the report clears.
    let d = SimVfioDevice::new_source(&dev_cfg("logon")).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    let pages = ram.ring(&[5, 6]);
    assert_eq!(d.dma_log(), DmaLog::Supported);
    assert!(d.dma_log_report(ram.gpa, PAGE, PAGE, &mut [0]).is_err());
    assert!(d
        .dma_log_start(&[ram.gpa..ram.gpa + ram.size()], 1000)
        .is_err());
    d.dma_log_start(&[ram.gpa..ram.gpa + ram.size()], PAGE)
        .unwrap();
    assert!(d
        .dma_log_report(ram.gpa, ram.size() + PAGE, PAGE, &mut [0])
        .is_err());
    assert!(d
        .dma_log_report(ram.gpa, 128 * PAGE, PAGE, &mut [0])
        .is_err());
    start(&hw, &ram, 2, CTRL_RUN);
    wait_for("a wrap", || hw.read_reg(REG_WRAPS) >= 1);
    let s0 = stop(&hw);
    assert_eq!(report_all(&d, &ram), pages, "all ring pages, no ring page");
    assert_eq!(report_all(&d, &ram), Vec::<u64>::new(), "cleared");
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("2 pages", || seq(&hw) >= s0 + 2);
    let s = stop(&hw);
    let mut want: Vec<u64> = (s0 + 1..=s)
        .map(|k| pages[((k - 1) % 11) as usize])
        .collect();
    want.sort();
    want.dedup();
    assert_eq!(report_all(&d, &ram), want);
    d.dma_log_stop().unwrap();
    d.dma_log_stop().unwrap();
    assert!(d.dma_log_report(ram.gpa, PAGE, PAGE, &mut [0]).is_err());
    drop(d);
    // off: advertised, START/REPORT succeed, nothing ever recorded.
    let mut c = dev_cfg("logoff");
    c.dma_log = DmaLogMode::Off;
    let d = SimVfioDevice::new_source(&c).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    assert_eq!(d.dma_log(), DmaLog::Supported);
    d.dma_log_start(&[ram.gpa..ram.gpa + ram.size()], PAGE)
        .unwrap();
    start(&hw, &ram, 2, CTRL_RUN);
    wait_for("a wrap", || hw.read_reg(REG_WRAPS) >= 1);
    stop(&hw);
    assert_eq!(report_all(&d, &ram), Vec::<u64>::new());
    drop(d);
    // none: cannot log.
    let mut c = dev_cfg("lognone");
    c.dma_log = DmaLogMode::None;
    let d = SimVfioDevice::new_source(&c).unwrap();
    assert_eq!(d.dma_log(), DmaLog::Unsupported);
    let e = d.dma_log_start(&[0..PAGE], PAGE).unwrap_err().to_string();
    assert!(e.contains("lognone") && e.contains("not supported"), "{e}");
}

/// Moves `src`'s stop-copy stream into `dst` (RESUMING -> STOP).
pub(super) fn transfer(src: &SimVfioDevice, dst: &SimVfioDevice, first: MigState) {
    let mut wr = dst.set_state(MigState::Resuming).unwrap().unwrap();
    let mut rd = match first {
        MigState::PreCopy => {
            let rd = src.set_state(MigState::PreCopy).unwrap().unwrap();
            assert!(src.set_state(MigState::StopCopy).unwrap().is_none());
            rd
        }
        _ => src.set_state(MigState::StopCopy).unwrap().unwrap(),
    };
    let mut buf = Vec::new();
    rd.read_to_end(&mut buf).unwrap();
    wr.write_all(&buf).unwrap();
    drop(wr);
    dst.set_state(MigState::Stop).unwrap();
}

#[test]
fn engine_halts_at_stop_copy_and_resumes_on_the_destination() {
    for first in [MigState::PreCopy, MigState::Running] {
        let mut c = dev_cfg("mig");
        c.precopy_size = 4096;
        let src = SimVfioDevice::new_source(&c).unwrap();
        let dst = SimVfioDevice::new_destination(&c).unwrap();
        let (sram, dram) = (FakeRam::new(0x10_0000, 40), FakeRam::new(0x10_0000, 40));
        sram.map_into(src.dma_target());
        dram.map_into(dst.dma_target());
        let pages = sram.ring(&[10, 3, 20]);
        let shw = src.shared.hw.clone();
        for i in 0..SCRATCH_COUNT as u64 {
            shw.write_reg(REG_SCRATCH + 4 * i, 0x1000 + i as u32);
        }
        start(&shw, &sram, 3, CTRL_RUN | CTRL_IRQ);
        src.dma_log_start(&[sram.gpa..sram.gpa + sram.size()], PAGE)
            .unwrap();
        wait_for("a wrap and a bit", || {
            shw.read_reg(REG_WRAPS) >= 1 && seq(&shw) % 33 > 5
        });
        report_all(&src, &sram); // a pre-copy pass
                                 // Pre-copy "RAM" copy while the engine runs: it is stale.
        sram.copy_to(&dram);
        transfer(&src, &dst, first);
        // After STOP_COPY entry nothing moves on the source.
        let s = seq(&shw);
        let dirty = report_all(&src, &sram);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(seq(&shw), s);
        assert_eq!(report_all(&src, &sram), Vec::<u64>::new());
        check_pattern(&sram, &pages, s);
        // The final pass: only the reported pages are copied again.
        for &p in &dirty {
            for off in (0..PAGE).step_by(8) {
                dram.write(p + off, sram.read(p + off));
            }
        }
        check_pattern(&dram, &pages, s);
        // The destination has the registers and resumes where it stopped.
        let dhw = dst.shared.hw.clone();
        assert_eq!(dhw.lock().regs, shw.lock().regs);
        assert_eq!(seq(&dhw), s);
        dhw.set_bus_master(true);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(seq(&dhw), s, "STOP: still halted");
        dst.set_state(MigState::Running).unwrap();
        wait_for("progress on the destination", || seq(&dhw) > s + 40);
        let s2 = stop(&dhw);
        check_pattern(&dram, &pages, s2);
        for i in 0..SCRATCH_COUNT as u64 {
            assert_eq!(dhw.read_reg(REG_SCRATCH + 4 * i), 0x1000 + i as u32);
        }
        // A failed migration: the source runs again from where it was.
        src.set_state(MigState::Running).unwrap();
        wait_for("source resumes", || seq(&shw) > s + 3);
        check_pattern(&sram, &pages, stop(&shw));
    }
}

/// A complete stream of a source whose registers are `r`.
fn stream_with(c: &SimVfioConfig, r: &Regs) -> Vec<u8> {
    let s = SimVfioDevice::new_source(c).unwrap();
    s.shared.hw.lock().regs = r.clone();
    let mut rd = s.set_state(MigState::StopCopy).unwrap().unwrap();
    let mut v = Vec::new();
    rd.read_to_end(&mut v).unwrap();
    v
}

fn load_err(c: &SimVfioConfig, bytes: &[u8]) -> Option<String> {
    let d = SimVfioDevice::new_destination(c).unwrap();
    let mut wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    let _ = wr.write_all(bytes);
    drop(wr);
    let r = d.set_state(MigState::Stop).err().map(|e| e.to_string());
    if r.is_none() {
        assert_eq!(
            d.shared.hw.lock().regs,
            Regs::decode(&bytes[regs_at(bytes)..][..REGS_LEN]).unwrap()
        );
    }
    r
}

/// Offset of the register record's payload in a complete stream.
fn regs_at(full: &[u8]) -> usize {
    full.len() - END_LEN as usize - REGS_LEN
}

#[test]
fn register_record_round_trip_and_hostile_records() {
    let c = cfg_small("regs");
    let mut r = Regs {
        ctrl: CTRL_RUN | CTRL_IRQ,
        error: false,
        ring: 0x1234_5670,
        ring_len: 7,
        seq: 0x1_0000_0005,
        wraps: 9,
        err_addr: 0,
        desc: 6,
        page: 3,
        scratch: [0; SCRATCH_COUNT],
    };
    for (i, s) in r.scratch.iter_mut().enumerate() {
        *s = 0xdead_0000 + i as u32;
    }
    assert_eq!(Regs::decode(&r.encode()), Ok(r.clone()));
    let full = stream_with(&c, &r);
    assert_eq!(load_err(&c, &full), None);
    let at = regs_at(&full);
    let hdr = &full[at - RECORD_HDR_LEN as usize..at];
    assert_eq!(&hdr[..8], &stream::REGS_OFFSET.to_le_bytes());
    // Hostile payloads: each breaks one invariant.
    let hostile: [(usize, &[u8], &str); 7] = [
        (0, &4u32.to_le_bytes(), "CTRL"),
        (4, &1u32.to_le_bytes(), "STATUS"),
        (8, &8u64.to_le_bytes(), "unaligned ring"),
        (16, &2000u32.to_le_bytes(), "RING_LEN"),
        (16, &0u32.to_le_bytes(), "empty ring"),
        (40, &7u32.to_le_bytes(), "position"),
        (44, &(1u32 << 20).to_le_bytes(), "position"),
    ];
    for (off, bytes, want) in hostile {
        let mut bad = full.clone();
        bad[at + off..at + off + bytes.len()].copy_from_slice(bytes);
        let e = load_err(&c, &bad).unwrap_or_else(|| panic!("{want} accepted"));
        assert!(e.contains("regs") && e.contains(want), "{want}: {e}");
    }
    // A wrong record length, a missing record, a duplicated record.
    let mut bad = full.clone();
    bad[at - 4..at].copy_from_slice(&8u32.to_le_bytes());
    let e = load_err(&c, &bad).unwrap();
    assert!(e.contains("register record has bad length 8"), "{e}");
    let mut bad = full[..at - RECORD_HDR_LEN as usize].to_vec();
    bad.extend_from_slice(&full[at + REGS_LEN..]);
    let e = load_err(&c, &bad).unwrap();
    assert!(e.contains("without its register record"), "{e}");
    let mut bad = full[..at + REGS_LEN].to_vec();
    bad.extend_from_slice(&full[at - RECORD_HDR_LEN as usize..]);
    let e = load_err(&c, &bad).unwrap();
    assert!(e.contains("second register record"), "{e}");
    // Truncated inside the record.
    let e = load_err(&c, &full[..at + 10]).unwrap();
    assert!(e.contains("truncated"), "{e}");
}

fn cfg_small(id: &str) -> SimVfioConfig {
    SimVfioConfig::new(id, 10_000, 0)
}

#[test]
fn unmap_while_running_stops_with_error_and_drop_joins() {
    let ram = FakeRam::new(0x10_0000, 8);
    let mut c = dev_cfg("unmap");
    c.dma_rate = 0.0; // unlimited
    let d = SimVfioDevice::new_source(&c).unwrap();
    let hw = d.shared.hw.clone();
    ram.map_into(d.dma_target());
    let pages = ram.ring(&[3, 4]);
    start(&hw, &ram, 2, CTRL_RUN | CTRL_IRQ);
    wait_for("pages", || seq(&hw) > 100);
    d.dma_target().dma_unmap(ram.gpa, ram.size()).unwrap();
    wait_for("error", || hw.read_reg(REG_STATUS) & STATUS_ERROR != 0);
    let s = seq(&hw);
    check_pattern(&ram, &pages, s);
    // Mapped again, it runs again; dropping it while it runs joins it.
    ram.map_into(d.dma_target());
    hw.write_reg(REG_CTRL, CTRL_RUN);
    wait_for("more pages", || seq(&hw) > s + 100);
    assert!(d.dma_pages_written() > 200);
    drop(d);
    let s = seq(&hw);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(seq(&hw), s, "no engine after drop");
    check_pattern(&ram, &pages, s);
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
#[ignore = "counts process-wide threads; run alone with --test-threads=1"]
fn no_thread_leak_with_a_running_engine() {
    let before = threads();
    {
        let ram = FakeRam::new(0x10_0000, 8);
        let d = SimVfioDevice::new_source(&dev_cfg("thr")).unwrap();
        let hw = d.shared.hw.clone();
        ram.map_into(d.dma_target());
        ram.ring(&[2]);
        start(&hw, &ram, 1, CTRL_RUN);
        wait_for("pages", || seq(&hw) > 10);
        assert!(threads() >= before + 2, "dirtier and engine");
        let _p = d.pci(); // the PCI view may outlive the device
    }
    assert_eq!(threads(), before);
}
