//! The hardware side of the simulated device: register file, DMA
//! mappings, DMA log, interrupt hook, and the DMA engine thread.
//!
//! Locking: [`Hw::lock`] guards [`HwState`]; the engine writes each page
//! while holding it, so whoever takes the lock (a register access, a
//! migration state change) finds the engine between two pages. The engine
//! raises interrupts after releasing it. Lock order: the device's `Core`
//! is never held while taking this lock from the migration side, and the
//! engine never takes `Core`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, warn};

use super::config::DmaLogMode;
use super::dma::DmaMap;
use super::dma_log::DmaLogState;
use super::regs::{self, Regs, Step, WriteEffect, PAGE};
use super::stream::RateLimiter;

/// Pages the engine writes per lock hold when unlimited.
const UNLIMITED_BATCH: u32 = 64;
/// The engine sleeps only once it is this far ahead of its rate.
const MIN_SLEEP: Duration = Duration::from_millis(2);

/// Where the engine's interrupts go (the PCI function's MSI-X vector 0).
pub trait IrqLine: Send + Sync {
    /// Raises vector 0 (delivered, or left pending if masked).
    fn raise(&self);
}

/// The mutable hardware state.
///
/// Invariants: the engine advances only while `mig_runs && bus_master`
/// could let it and `regs.busy()`; `shutdown` is final.
pub struct HwState {
    /// Register file and engine position.
    pub regs: Regs,
    /// The migration state lets the device run (RUNNING, RUNNING_P2P,
    /// PRE_COPY, PRE_COPY_P2P).
    pub mig_runs: bool,
    /// PCI command register bit 2 (Bus Master Enable).
    pub bus_master: bool,
    /// The DMA log.
    pub log: DmaLogState,
    /// Pages written by the engine since the device was made (statistics).
    pub pages_written: u64,
    /// The device is being dropped.
    pub shutdown: bool,
}

/// The hardware of one device, shared by the device, its PCI function and
/// the engine thread.
///
/// Invariant: `dma` is the only way the device reaches guest memory.
pub struct Hw {
    /// Device id (for logs).
    pub id: String,
    /// DMA rate in MiB/s (0: unlimited).
    pub rate: f64,
    /// `dma-log=` knob.
    pub log_mode: DmaLogMode,
    /// IOMMU mappings.
    pub dma: DmaMap,
    state: Mutex<HwState>,
    cv: Condvar,
    irq: Mutex<Option<Arc<dyn IrqLine>>>,
}

impl Hw {
    /// Idle hardware: registers zero, migration state RUNNING, bus master
    /// off, no mappings.
    pub fn new(id: &str, rate: f64, log_mode: DmaLogMode) -> Self {
        Hw {
            id: id.to_string(),
            rate,
            log_mode,
            dma: DmaMap::new(id),
            state: Mutex::new(HwState {
                regs: Regs::default(),
                mig_runs: true,
                bus_master: false,
                log: DmaLogState::default(),
                pages_written: 0,
                shutdown: false,
            }),
            cv: Condvar::new(),
            irq: Mutex::new(None),
        }
    }

    /// Locks the hardware state: the engine is between pages while held.
    pub fn lock(&self) -> MutexGuard<'_, HwState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the engine (after a change that may give it work).
    pub fn wake(&self) {
        self.cv.notify_all();
    }

    /// Sets where interrupts go.
    pub fn set_irq(&self, line: Arc<dyn IrqLine>) {
        *self.irq.lock().unwrap_or_else(|e| e.into_inner()) = Some(line);
    }

    /// Lets the engine run or halts it (migration state change). Returns
    /// once the engine is between pages: after `set_mig_runs(false)`, no
    /// DMA happens until `set_mig_runs(true)`.
    pub fn set_mig_runs(&self, runs: bool) {
        let mut s = self.lock();
        s.mig_runs = runs;
        drop(s);
        self.wake();
    }

    /// Sets Bus Master Enable (PCI command bit 2).
    pub fn set_bus_master(&self, on: bool) {
        let mut s = self.lock();
        s.bus_master = on;
        drop(s);
        self.wake();
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&self, off: u64) -> u32 {
        self.lock().regs.read32(off)
    }

    /// Writes a 32-bit register (waits for the page in flight).
    pub fn write_reg(&self, off: u64, v: u32) {
        let effect = self.lock().regs.write32(off, v);
        if effect == WriteEffect::Wake {
            self.wake();
        }
    }

    /// Reads `data.len()` bytes of the register block at `off` under one
    /// lock (so an 8-byte read of a lo/hi pair is consistent); bytes past
    /// the registers read 0.
    pub fn read_bytes(&self, off: u64, data: &mut [u8]) {
        let s = self.lock();
        for (i, d) in data.iter_mut().enumerate() {
            let at = off.saturating_add(i as u64);
            let word = s.regs.read32(at & !3);
            *d = word.to_le_bytes()[(at & 3) as usize];
        }
    }

    /// Writes `data` into the register block at `off` under one lock, dword
    /// by dword in address order (lo before hi); a partial dword is merged
    /// with the register's current value.
    pub fn write_bytes(&self, off: u64, data: &[u8]) {
        let mut wake = false;
        {
            let mut s = self.lock();
            let mut i = 0usize;
            while i < data.len() {
                let at = off.saturating_add(i as u64);
                let base = at & !3;
                let mut bytes = s.regs.read32(base).to_le_bytes();
                let mut k = (at & 3) as usize;
                while k < 4 && i < data.len() {
                    bytes[k] = data[i];
                    k += 1;
                    i += 1;
                }
                if s.regs.write32(base, u32::from_le_bytes(bytes)) == WriteEffect::Wake {
                    wake = true;
                }
            }
        }
        if wake {
            self.wake();
        }
    }

    /// Pages the engine wrote since the device was made.
    pub fn pages_written(&self) -> u64 {
        self.lock().pages_written
    }

    /// Stops the engine for good and wakes it so that it exits.
    pub fn shutdown(&self) {
        self.lock().shutdown = true;
        self.wake();
    }

    fn raise(&self) {
        let line = self.irq.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(l) = line {
            l.raise();
        }
    }
}

/// The engine thread: walks the ring while the device may run, until
/// shutdown.
pub fn engine(hw: Arc<Hw>) {
    let mut limiter = RateLimiter::new(hw.rate);
    let unlimited = hw.rate <= 0.0;
    loop {
        let mut s = hw.lock();
        let mut waited = false;
        while !(s.shutdown || s.mig_runs && s.regs.busy()) {
            s = hw.cv.wait(s).unwrap_or_else(|e| e.into_inner());
            waited = true;
        }
        if s.shutdown {
            return;
        }
        if waited {
            limiter = RateLimiter::new(hw.rate);
        }
        let mut wraps = 0u32;
        let batch = if unlimited { UNLIMITED_BATCH } else { 1 };
        let mut wrote = 0u32;
        for _ in 0..batch {
            let bm = s.bus_master;
            match regs::step_page(&mut s.regs, &hw.dma, bm) {
                Step::Wrote { gpa, wrapped, .. } => {
                    s.log.mark(gpa, PAGE);
                    s.pages_written += 1;
                    wrote += 1;
                    if wrapped && s.regs.ctrl & regs::CTRL_IRQ != 0 {
                        wraps += 1;
                    }
                }
                Step::Failed => {
                    warn!(
                        "sim-vfio {}: DMA engine stopped: error at {:#x}",
                        hw.id, s.regs.err_addr
                    );
                    break;
                }
            }
        }
        drop(s);
        for _ in 0..wraps {
            hw.raise();
        }
        if unlimited {
            std::thread::yield_now();
            continue;
        }
        let d = limiter.reserve(u64::from(wrote) * PAGE);
        if d >= MIN_SLEEP {
            // Sleep with the lock released; shutdown cuts it short. A halt
            // meanwhile is seen at the top of the loop.
            let s = hw.lock();
            let (s, _) = hw
                .cv
                .wait_timeout_while(s, d, |s| !s.shutdown)
                .unwrap_or_else(|e| e.into_inner());
            if s.shutdown {
                debug!("sim-vfio {}: engine exits", hw.id);
                return;
            }
        }
    }
}
