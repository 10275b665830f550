//! A synthetic VFIO device with migration v2 semantics, for tests and
//! benchmarks (`--sim-vfio`).
//!
//! The device holds `state_size` bytes of internal state; the first
//! `precopy_size` bytes are pre-copyable. While running, a dirtier thread
//! rewrites 4 KiB blocks of the pre-copyable part (of the whole state when
//! there is none) at `dirty_rate`. Saving and loading go through real
//! sockets (see [`stream`] for the format) served by a pump (source) or a
//! loader (destination) thread, throttled to `save_rate` / `load_rate`.
//!
//! A source ([`SimVfioDevice::new_source`]) starts with content derived from
//! its id; a destination ([`SimVfioDevice::new_destination`]) starts zeroed
//! and never dirties its own state, so after a migration its
//! [`SimVfioDevice::digest`] equals the source's at STOP_COPY entry (the
//! source stays frozen from then on unless set back to RUNNING). The source
//! records that digest ([`SimVfioDevice::switchover_digest`]) and sends it in
//! the stream's end marker; the destination keeps it
//! ([`SimVfioDevice::source_digest`]) and refuses to leave RESUMING when its
//! loaded state's digest differs ("state digest mismatch after load").
//!
//! Fault injection: `fail_save_after` makes the pump close the stream early
//! and the device report ERROR; `fail_load` makes the loader refuse the
//! stream so that leaving RESUMING fails. Errors name the device id.
//!
//! # The PCI function and its DMA (issue 12)
//!
//! The device is also a PCI function (1b36:fe77, see [`pci_fn`]) with a
//! register file in BAR0 ([`regs`]) and a DMA engine thread ([`engine`])
//! that writes guest pages through the IOMMU mappings ([`dma`]) and logs
//! them ([`dma_log`], kernel uAPI semantics). One object, two views:
//!
//! - [`SimVfioDevice`] itself is the [`migration::MigratableDevice`]
//!   (state machine, stop-copy stream, `dma_log*`);
//! - [`SimVfioDevice::pci`] returns the `Arc<dyn PciDevice>` for the bus
//!   (config space, BARs, MSI-X, `save_pci`/`restore_pci` of the
//!   virtualized PCI layer, which the VMM saves in the VM state).
//!
//! What the VMM does with it:
//! 1. `let dev = Arc::new(SimVfioDevice::new_source(&cfg)?)` (or
//!    `new_destination`), `let f = dev.pci()`, add `f` to the bus,
//!    `f.attach_msi(sink)` (1 vector), allocate BAR0 from `f.bar_requests()`
//!    and `f.assign_bar(0, addr)` (boot only; a destination gets its BARs
//!    from `restore_pci`).
//! 2. Map every guest RAM region: `unsafe { dev.dma_target().dma_map(gpa,
//!    size, host_addr) }` (same object as `f.dma()`), at boot, and on a
//!    destination before its devices go RUNNING. DMA outside the mappings
//!    sets STATUS.ERROR.
//! 3. Route BAR0 accesses to `f.bar_read`/`f.bar_write` (always trapped)
//!    and config accesses to `f.config_read`/`f.config_write`.
//! 4. Destination: `f.restore_pci(&state)` in `restore_state` (before
//!    `set_state(RUNNING)`: the engine needs Bus Master Enable from the
//!    restored command register, or it stops with ERROR).
//!
//! The engine runs while the migration state is RUNNING, RUNNING_P2P,
//! PRE_COPY or PRE_COPY_P2P; every arc into another state halts it before
//! `set_state` returns (the page in flight is finished first), so after
//! STOP_COPY entry no DMA happens and the next `dma_log_report` is
//! complete. The registers and engine position travel in the stop-copy
//! stream's register record ([`stream`], version 3); the destination's
//! engine continues from there once it runs.

pub mod config;
pub mod dma;
pub mod dma_log;
pub mod engine;
mod migratable;
pub mod pci_fn;
pub mod regs;
pub mod stream;
mod workers;

pub use config::{parse_sim_vfio_arg, DmaLogMode, SimVfioConfig};

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use migration::{BackendError, BackendResult, MigState};

use crate::error::{Error, Result};
use crate::mig_fsm;
use crate::pci::{DmaTarget, PciDevice};
use engine::Hw;
use pci_fn::SimPciFunction;
use stream::{LoadError, BLOCK, CHUNK, HEADER_LEN, RECORD_HDR_LEN, TAIL_LEN};

/// How long the loader waits for more data once the stream must be complete.
const LOAD_GRACE: Duration = Duration::from_secs(2);
/// Dirtier tick.
const TICK: Duration = Duration::from_millis(5);
/// Blocks the dirtier rewrites per lock hold.
const DIRTY_BATCH: u64 = 16;

/// One unit the pump will write.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Header,
    Data {
        off: u64,
        len: u64,
    },
    /// The register record (registers at STOP_COPY entry).
    Regs {
        regs: [u8; regs::REGS_LEN],
    },
    /// The end marker, carrying the state digest at STOP_COPY entry.
    End {
        digest: u64,
    },
}

/// Mutable device state, under one lock shared with the worker threads.
struct Core {
    state: MigState,
    data: Vec<u8>,
    /// A save session (PRE_COPY/STOP_COPY) is active.
    tracking: bool,
    header_queued: bool,
    /// First byte of the pre-copyable part not yet committed to the stream.
    initial_next: u64,
    /// Dirty blocks of the pre-copyable part (only committed blocks are marked).
    dirty: Vec<u64>,
    dirty_blocks: u64,
    queue: VecDeque<Seg>,
    /// Stream bytes committed in this session.
    commit_total: u64,
    /// Stream offset where the initial part (header + pre-copyable bytes)
    /// ends, once committed; it is always a prefix of the stream.
    initial_end: Option<u64>,
    /// Stream bytes the pump got accepted by the socket (see `send_all`).
    sent: Arc<Mutex<u64>>,
    /// A duplicate of the PRE_COPY read end, to ask how much is unread.
    reader: Option<File>,
    save_error: Option<String>,
    /// Source: digest of the state when the current/last save session
    /// entered STOP_COPY (the state is frozen from then on); cleared when a
    /// new session begins.
    switchover_digest: Option<u64>,
    /// Destination: the source's digest received in the end marker of the
    /// last load stream (kept even when the check failed); cleared when a
    /// new load begins.
    source_digest: Option<u64>,
    shutdown: bool,
    seed: u64,
}

struct Shared {
    cfg: SimVfioConfig,
    /// The PCI function's hardware (registers, DMA engine, DMA log).
    hw: Arc<Hw>,
    core: Mutex<Core>,
    /// Wakes the dirtier (state became running, or shutdown).
    run_cv: Condvar,
    /// Wakes the pump (queue grew, or cancel/shutdown).
    work_cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_save(&self, msg: String) {
        warn!("sim-vfio {}: {msg}", self.cfg.id);
        {
            let mut c = self.lock();
            c.save_error = Some(msg);
            c.state = MigState::Error;
        }
        self.hw.set_mig_runs(false);
    }

    /// Queues `[from, to)` in CHUNK records; returns the stream bytes.
    fn queue_range(c: &mut Core, from: u64, to: u64) -> u64 {
        let mut n = 0;
        let mut off = from;
        while off < to {
            let len = CHUNK.min(to - off);
            c.queue.push_back(Seg::Data { off, len });
            n += RECORD_HDR_LEN + len;
            off += len;
        }
        c.commit_total += n;
        n
    }

    /// Commits the header (once) and all uncommitted initial bytes.
    fn commit_initial(&self, c: &mut Core) -> u64 {
        let mut n = 0;
        if !c.header_queued {
            c.queue.push_back(Seg::Header);
            c.header_queued = true;
            c.commit_total += HEADER_LEN;
            n += HEADER_LEN;
        }
        let pre = self.cfg.precopy_size;
        n += Self::queue_range(c, c.initial_next, pre);
        c.initial_next = pre;
        if c.initial_end.is_none() {
            c.initial_end = Some(c.commit_total);
        }
        n
    }

    /// Commits the dirty blocks as coalesced runs and clears them.
    fn commit_dirty(&self, c: &mut Core) -> u64 {
        let pre = self.cfg.precopy_size;
        let max_run = CHUNK / BLOCK;
        let mut n = 0;
        let mut run: Option<(u64, u64)> = None; // (first block, count)
        for w in 0..c.dirty.len() {
            let mut word = std::mem::take(&mut c.dirty[w]);
            while word != 0 {
                let b = w as u64 * 64 + u64::from(word.trailing_zeros());
                word &= word - 1;
                run = match run {
                    Some((s, k)) if s + k == b && k < max_run => Some((s, k + 1)),
                    other => {
                        if let Some((s, k)) = other {
                            n += Self::queue_blocks(c, s, k, pre);
                        }
                        Some((b, 1))
                    }
                };
            }
        }
        if let Some((s, k)) = run {
            n += Self::queue_blocks(c, s, k, pre);
        }
        c.dirty_blocks = 0;
        n
    }

    fn queue_blocks(c: &mut Core, first: u64, count: u64, pre: u64) -> u64 {
        let off = first * BLOCK;
        let end = ((first + count) * BLOCK).min(pre);
        if off >= end {
            return 0;
        }
        c.queue.push_back(Seg::Data {
            off,
            len: end - off,
        });
        c.commit_total += RECORD_HDR_LEN + end - off;
        RECORD_HDR_LEN + end - off
    }

    /// Commits everything left for STOP_COPY, then the register record
    /// (`regs`, taken with the engine halted) and the end marker with the
    /// digest of the state now. Must be called with `c.state` already
    /// STOP_COPY (the dirtier checks it under the same lock), so the state
    /// cannot change after the digest is taken.
    fn commit_rest(&self, c: &mut Core, regs: [u8; regs::REGS_LEN]) {
        self.commit_initial(c);
        self.commit_dirty(c);
        Self::queue_range(c, self.cfg.precopy_size, self.cfg.state_size);
        let digest = stream::digest(&c.data);
        c.switchover_digest = Some(digest);
        c.queue.push_back(Seg::Regs { regs });
        c.queue.push_back(Seg::End { digest });
        c.commit_total += TAIL_LEN;
        c.reader = None; // no more PRECOPY_INFO: let a closed reader fail the pump
        self.work_cv.notify_all();
    }

    /// Starts a save session; `reader` is a duplicate of the read end
    /// (PRE_COPY only).
    fn begin_session(&self, c: &mut Core, reader: Option<File>) {
        c.tracking = true;
        c.switchover_digest = None;
        c.commit_total = 0;
        c.initial_end = None;
        c.sent = Arc::new(Mutex::new(0));
        c.reader = reader;
        c.header_queued = false;
        c.initial_next = 0;
        c.dirty.iter_mut().for_each(|w| *w = 0);
        c.dirty_blocks = 0;
        c.queue.clear();
    }

    fn end_session(&self, c: &mut Core) {
        c.tracking = false;
        c.reader = None;
        c.queue.clear();
        c.dirty.iter_mut().for_each(|w| *w = 0);
        c.dirty_blocks = 0;
    }
}

struct Pump {
    cancel: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

struct Loader {
    cancel: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
    handle: JoinHandle<std::result::Result<(), LoadError>>,
}

#[derive(Default)]
struct Ctl {
    pump: Option<Pump>,
    loader: Option<Loader>,
}

/// The simulated device.
///
/// Invariants: `data.len() == cfg.state_size`; the state only changes while
/// the migration state is RUNNING, RUNNING_P2P, PRE_COPY or PRE_COPY_P2P
/// (dirtier) or RESUMING (loader); the DMA engine writes guest memory
/// only in those running states (never once an arc to another state has
/// returned) and only through the DMA mappings; at most one pump or loader
/// exists; all threads (dirtier, DMA engine, pump, loader) are joined on
/// drop and every fd the device created is closed by then (the fds handed
/// out belong to the caller). The PCI view ([`SimVfioDevice::pci`]) may
/// outlive the device; it then only serves registers.
pub struct SimVfioDevice {
    shared: Arc<Shared>,
    ctl: Mutex<Ctl>,
    dirtier: Option<JoinHandle<()>>,
    engine: Option<JoinHandle<()>>,
    pci: Arc<SimPciFunction>,
}

impl std::fmt::Debug for SimVfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimVfioDevice")
            .field("cfg", &self.shared.cfg)
            .finish()
    }
}

fn spawn<T: Send + 'static>(
    id: &str,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> BackendResult<JoinHandle<T>> {
    std::thread::Builder::new()
        .name(format!("sim-{what}"))
        .spawn(f)
        .map_err(|e| BackendError::new(format!("sim device {id}: spawning {what} thread: {e}")))
}

impl SimVfioDevice {
    /// A source device: state filled with deterministic content derived
    /// from the id, in RUNNING.
    pub fn new_source(cfg: &SimVfioConfig) -> Result<Self> {
        Self::build(cfg, true)
    }

    /// A destination device: same config, state zeroed (it receives
    /// everything), in RUNNING until moved to RESUMING. It never dirties its
    /// own state (even when RUNNING after the migration), so its digest stays
    /// that of the loaded state.
    pub fn new_destination(cfg: &SimVfioConfig) -> Result<Self> {
        Self::build(cfg, false)
    }

    fn build(cfg: &SimVfioConfig, source: bool) -> Result<Self> {
        cfg.validate()?;
        let dev_err = |msg: String| Error::Device {
            id: cfg.id.clone(),
            msg,
        };
        let n = usize::try_from(cfg.state_size)
            .map_err(|_| dev_err("state does not fit in memory".into()))?;
        let mut data = Vec::new();
        data.try_reserve_exact(n)
            .map_err(|e| dev_err(format!("allocating {n} bytes of state: {e}")))?;
        data.resize(n, 0);
        let mut seed = stream::fnv1a(cfg.id.as_bytes());
        if source {
            stream::fill(&mut data, &mut seed);
        }
        let words = cfg.precopy_size.div_ceil(BLOCK).div_ceil(64) as usize;
        let hw = Arc::new(Hw::new(&cfg.id, cfg.dma_rate, cfg.dma_log));
        let pci = Arc::new(SimPciFunction::new(hw.clone())?);
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
            hw: hw.clone(),
            core: Mutex::new(Core {
                state: MigState::Running,
                data,
                tracking: false,
                header_queued: false,
                initial_next: 0,
                dirty: vec![0; words],
                dirty_blocks: 0,
                queue: VecDeque::new(),
                commit_total: 0,
                initial_end: None,
                sent: Arc::new(Mutex::new(0)),
                reader: None,
                save_error: None,
                switchover_digest: None,
                source_digest: None,
                shutdown: false,
                seed: seed ^ 0x5eed,
            }),
            run_cv: Condvar::new(),
            work_cv: Condvar::new(),
        });
        let sh = shared.clone();
        // Only a source changes its own state: a destination keeps what it
        // loaded, so its digest can be checked after it resumes.
        let rate = if source { cfg.dirty_rate } else { 0.0 };
        let dirtier = spawn(&cfg.id, "dirtier", move || workers::dirtier(sh, rate))
            .map_err(|e| dev_err(e.to_string()))?;
        let h2 = hw.clone();
        let engine = match spawn(&cfg.id, "dma", move || engine::engine(h2)) {
            Ok(h) => h,
            Err(e) => {
                shared.lock().shutdown = true;
                shared.run_cv.notify_all();
                let _ = dirtier.join();
                return Err(dev_err(e.to_string()));
            }
        };
        debug!(
            "sim-vfio {}: {} bytes ({} pre-copyable), {}",
            cfg.id,
            cfg.state_size,
            cfg.precopy_size,
            if source { "source" } else { "destination" }
        );
        Ok(SimVfioDevice {
            shared,
            ctl: Mutex::new(Ctl::default()),
            dirtier: Some(dirtier),
            engine: Some(engine),
            pci,
        })
    }

    /// The IOMMU side of the device: the VMM maps every guest RAM region
    /// here (identity IOVA) before the guest can start the DMA engine (boot)
    /// or before the device runs (migration destination).
    pub fn dma_target(&self) -> &dyn DmaTarget {
        &self.shared.hw.dma
    }

    /// The device's PCI function, for the bus (the same device: its
    /// registers, DMA engine and DMA log are what this object migrates).
    pub fn pci(&self) -> Arc<dyn PciDevice> {
        self.pci.clone()
    }

    /// The PCI function with its concrete type (tests, diagnostics).
    pub fn pci_function(&self) -> &Arc<SimPciFunction> {
        &self.pci
    }

    /// Pages the DMA engine wrote since the device was made.
    pub fn dma_pages_written(&self) -> u64 {
        self.shared.hw.pages_written()
    }

    /// The configuration.
    pub fn config(&self) -> &SimVfioConfig {
        &self.shared.cfg
    }

    /// Bytes of device state.
    pub fn state_size(&self) -> u64 {
        self.shared.cfg.state_size
    }

    /// Digest of the current state ([`stream::digest`]); equal on source
    /// (at STOP_COPY entry) and destination (after RESUMING) when a
    /// migration succeeded.
    pub fn digest(&self) -> u64 {
        stream::digest(&self.shared.lock().data)
    }

    /// Source: the digest of the state when the last save session entered
    /// STOP_COPY (what its end marker carries), if one did since the last
    /// session began.
    pub fn switchover_digest(&self) -> Option<u64> {
        self.shared.lock().switchover_digest
    }

    /// Destination: the source's switch-over digest received with the last
    /// load stream, if its end marker was read. After a successful load it
    /// equals [`Self::digest`] (leaving RESUMING checks it).
    pub fn source_digest(&self) -> Option<u64> {
        self.shared.lock().source_digest
    }

    fn err(&self, msg: impl std::fmt::Display) -> BackendError {
        BackendError::new(format!("sim device {}: {msg}", self.shared.cfg.id))
    }

    fn lock_ctl(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop_pump(&self, ctl: &mut Ctl) {
        if let Some(p) = ctl.pump.take() {
            p.cancel.store(true, Ordering::Release);
            {
                let _c = self.shared.lock();
                self.shared.work_cv.notify_all();
            }
            if p.handle.join().is_err() {
                warn!("sim-vfio {}: pump thread panicked", self.shared.cfg.id);
            }
        }
    }

    /// Waits for the loader to reach the end marker (`cancel`: abandon it).
    fn finish_loader(&self, ctl: &mut Ctl, cancel: bool) -> std::result::Result<(), LoadError> {
        let Some(l) = ctl.loader.take() else {
            return Ok(());
        };
        l.closing.store(true, Ordering::Release);
        if cancel {
            l.cancel.store(true, Ordering::Release);
        }
        l.handle
            .join()
            .unwrap_or_else(|_| Err(LoadError::Stream("loader thread panicked".into())))
    }

    fn start_pump(&self, ctl: &mut Ctl, sock: File) -> BackendResult<()> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (sh, c2) = (self.shared.clone(), cancel.clone());
        let sent = self.shared.lock().sent.clone();
        let handle = spawn(&self.shared.cfg.id, "pump", move || {
            workers::pump(sh, sock, sent, c2)
        })?;
        ctl.pump = Some(Pump { cancel, handle });
        Ok(())
    }

    /// Executes one uAPI arc, halting the DMA engine first when `to` does
    /// not run (so no DMA happens once the arc is done) and letting it run
    /// after it when `to` does.
    fn step(&self, ctl: &mut Ctl, from: MigState, to: MigState) -> BackendResult<Option<File>> {
        let runs = mig_fsm::is_running(to);
        if !runs {
            self.shared.hw.set_mig_runs(false);
        }
        let r = self.step_inner(ctl, from, to);
        if runs && r.is_ok() {
            self.shared.hw.set_mig_runs(true);
        }
        r
    }

    fn step_inner(
        &self,
        ctl: &mut Ctl,
        from: MigState,
        to: MigState,
    ) -> BackendResult<Option<File>> {
        use MigState::*;
        let sh = &self.shared;
        let pair = || stream::socket_pair().map_err(|e| self.err(format_args!("socketpair: {e}")));
        match (from, to) {
            (Running, RunningP2p)
            | (RunningP2p, Running)
            | (PreCopy, PreCopyP2p)
            | (PreCopyP2p, PreCopy)
            | (Running, Stop)
            | (RunningP2p, Stop) => {
                sh.lock().state = to;
                Ok(None)
            }
            (Stop, Running) | (Stop, RunningP2p) => {
                sh.lock().state = to;
                sh.run_cv.notify_all();
                Ok(None)
            }
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) => {
                let (rd, wr) = pair()?;
                let dup = rd
                    .try_clone()
                    .map_err(|e| self.err(format_args!("duplicating data fd: {e}")))?;
                {
                    let mut c = sh.lock();
                    sh.begin_session(&mut c, Some(dup));
                    c.state = to;
                }
                self.start_pump(ctl, wr)?;
                Ok(Some(rd))
            }
            (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
                self.stop_pump(ctl);
                let mut c = sh.lock();
                sh.end_session(&mut c);
                c.state = to;
                Ok(None)
            }
            (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => {
                let regs = sh.hw.lock().regs.encode(); // engine halted by `step`
                let mut c = sh.lock();
                c.state = StopCopy; // freezes the dirtier
                sh.commit_rest(&mut c, regs);
                Ok(None)
            }
            (Stop, StopCopy) => {
                let (rd, wr) = pair()?;
                let regs = sh.hw.lock().regs.encode();
                {
                    let mut c = sh.lock();
                    sh.begin_session(&mut c, None);
                    c.state = StopCopy;
                    sh.commit_rest(&mut c, regs);
                }
                self.start_pump(ctl, wr)?;
                Ok(Some(rd))
            }
            (Stop, Resuming) => {
                let (rd, wr) = pair()?;
                let cancel = Arc::new(AtomicBool::new(false));
                let closing = Arc::new(AtomicBool::new(false));
                let (s2, c2, cl2) = (sh.clone(), cancel.clone(), closing.clone());
                let handle = spawn(&sh.cfg.id, "loader", move || {
                    workers::loader(s2, rd, c2, cl2)
                })?;
                ctl.loader = Some(Loader {
                    cancel,
                    closing,
                    handle,
                });
                {
                    let mut c = sh.lock();
                    c.source_digest = None;
                    c.state = Resuming;
                }
                Ok(Some(wr))
            }
            (Resuming, Stop) => match self.finish_loader(ctl, false) {
                Ok(()) => {
                    sh.lock().state = Stop;
                    Ok(None)
                }
                Err(e) => {
                    sh.lock().state = Error;
                    Err(match e {
                        // "sim device X: state digest mismatch after load: ..."
                        LoadError::DigestMismatch { .. } => self.err(e),
                        LoadError::Stream(m) => {
                            self.err(format_args!("loading device state failed: {m}"))
                        }
                    })
                }
            },
            _ => Err(self.err(format_args!("internal: unexpected arc {from:?} -> {to:?}"))),
        }
    }

    /// Device reset out of ERROR (see the trait impl's `set_state`).
    fn reset_to_running(&self, ctl: &mut Ctl) {
        self.stop_pump(ctl);
        if let Err(e) = self.finish_loader(ctl, true) {
            debug!("sim-vfio {}: abandoned loader: {e}", self.shared.cfg.id);
        }
        let mut c = self.shared.lock();
        self.shared.end_session(&mut c);
        c.save_error = None;
        c.state = MigState::Running;
        self.shared.run_cv.notify_all();
        drop(c);
        self.shared.hw.set_mig_runs(true);
    }
}

impl Drop for SimVfioDevice {
    fn drop(&mut self) {
        let mut ctl = std::mem::take(&mut *self.lock_ctl());
        self.stop_pump(&mut ctl);
        let _ = self.finish_loader(&mut ctl, true);
        {
            let mut c = self.shared.lock();
            c.shutdown = true;
            self.shared.run_cv.notify_all();
            self.shared.work_cv.notify_all();
        }
        if let Some(h) = self.dirtier.take() {
            if h.join().is_err() {
                warn!("sim-vfio {}: dirtier thread panicked", self.shared.cfg.id);
            }
        }
        self.shared.hw.shutdown();
        if let Some(h) = self.engine.take() {
            if h.join().is_err() {
                warn!(
                    "sim-vfio {}: DMA engine thread panicked",
                    self.shared.cfg.id
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_dma;
#[cfg(test)]
mod tests_pci;
