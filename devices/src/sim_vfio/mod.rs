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

pub mod config;
pub mod stream;
mod workers;

pub use config::{parse_sim_vfio_arg, SimVfioConfig};

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, warn};
use migration::{BackendError, BackendResult, MigCaps, MigState, MigratableDevice, PrecopyInfo};

use crate::error::{Error, Result};
use crate::mig_fsm;
use stream::{LoadError, BLOCK, CHUNK, END_LEN, HEADER_LEN, RECORD_HDR_LEN};

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
        let mut c = self.lock();
        c.save_error = Some(msg);
        c.state = MigState::Error;
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

    /// Commits everything left for STOP_COPY, then the end marker with the
    /// digest of the state now. Must be called with `c.state` already
    /// STOP_COPY (the dirtier checks it under the same lock), so the state
    /// cannot change after the digest is taken.
    fn commit_rest(&self, c: &mut Core) {
        self.commit_initial(c);
        self.commit_dirty(c);
        Self::queue_range(c, self.cfg.precopy_size, self.cfg.state_size);
        let digest = stream::digest(&c.data);
        c.switchover_digest = Some(digest);
        c.queue.push_back(Seg::End { digest });
        c.commit_total += END_LEN;
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
/// (dirtier) or RESUMING (loader); at most one pump or loader exists; all
/// threads are joined on drop and every fd the device created is closed by
/// then (the fds handed out belong to the caller).
pub struct SimVfioDevice {
    shared: Arc<Shared>,
    ctl: Mutex<Ctl>,
    dirtier: Option<JoinHandle<()>>,
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
        let shared = Arc::new(Shared {
            cfg: cfg.clone(),
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
        })
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

    /// Executes one uAPI arc.
    fn step(&self, ctl: &mut Ctl, from: MigState, to: MigState) -> BackendResult<Option<File>> {
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
                let mut c = sh.lock();
                c.state = StopCopy; // freezes the dirtier
                sh.commit_rest(&mut c);
                Ok(None)
            }
            (Stop, StopCopy) => {
                let (rd, wr) = pair()?;
                {
                    let mut c = sh.lock();
                    sh.begin_session(&mut c, None);
                    c.state = StopCopy;
                    sh.commit_rest(&mut c);
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
    }
}

impl MigratableDevice for SimVfioDevice {
    fn id(&self) -> &str {
        &self.shared.cfg.id
    }

    /// STOP_COPY and P2P always; PRE_COPY iff `precopy_size > 0`.
    fn caps(&self) -> MigCaps {
        MigCaps {
            stop_copy: true,
            p2p: true,
            pre_copy: self.shared.cfg.precopy_size > 0,
        }
    }

    /// ERROR after a failed save stream or a failed load.
    fn state(&self) -> BackendResult<MigState> {
        let c = self.shared.lock();
        Ok(if c.save_error.is_some() {
            MigState::Error
        } else {
            c.state
        })
    }

    /// Walks the uAPI FSM one arc at a time, like the kernel.
    ///
    /// - Entering PRE_COPY returns the read end of a socket a pump thread
    ///   writes into; PRE_COPY -> STOP_COPY keeps it (`None`), freezes the
    ///   state and queues everything left followed by the end marker, after
    ///   which the pump closes its end (the reader sees EOF).
    /// - STOP -> STOP_COPY (e.g. from RUNNING) returns a fresh socket carrying
    ///   the whole state, then EOF.
    /// - Entering RESUMING returns the write end; leaving RESUMING waits for
    ///   the loader to reach the end marker (the writer must have written the
    ///   whole stream; a writer silent for 2 s counts as truncation) and fails,
    ///   naming the device, if the stream was truncated or malformed, or if
    ///   the loaded state's digest differs from the source's digest carried
    ///   by the end marker ("state digest mismatch after load").
    /// - Leaving PRE_COPY/STOP_COPY for RUNNING/STOP cancels the pump.
    /// - From ERROR only RUNNING is accepted: it acts as a device reset
    ///   (VFIO_DEVICE_RESET), stopping any pump/loader; the state bytes are
    ///   kept. Any other request in ERROR fails with the recorded error.
    fn set_state(&self, new: MigState) -> BackendResult<Option<File>> {
        let mut ctl = self.lock_ctl();
        let (cur, save_error) = {
            let c = self.shared.lock();
            // A failed save is sticky until reset, whatever arc raced it.
            let cur = if c.save_error.is_some() {
                MigState::Error
            } else {
                c.state
            };
            (cur, c.save_error.clone())
        };
        if cur == MigState::Error {
            if new == MigState::Running {
                self.reset_to_running(&mut ctl);
                return Ok(None);
            }
            let why = save_error.unwrap_or_else(|| "device is in ERROR".into());
            return Err(self.err(format_args!("cannot go to {new:?}: {why}")));
        }
        let steps = mig_fsm::path(self.caps(), cur, new).ok_or_else(|| {
            self.err(format_args!("transition {cur:?} -> {new:?} is not allowed"))
        })?;
        let mut fd = None;
        let mut at = cur;
        for s in steps {
            if let Some(f) = self.step(&mut ctl, at, s)? {
                fd = Some(f);
            }
            at = s;
        }
        debug!("sim-vfio {}: {cur:?} -> {new:?}", self.shared.cfg.id);
        Ok(fd)
    }

    /// Commits to the stream everything pending now — the stream header and
    /// all initial bytes at the first call, then the blocks dirtied since the
    /// previous call — and reports what is committed but not yet read by the
    /// reader (record headers included), VFIO-style: `initial_bytes` is the
    /// unread part of the initial data (a prefix of the stream), and
    /// `dirty_bytes` the rest. All reported bytes are (or will shortly be,
    /// at `save_rate`) readable without blocking; reading more may block
    /// until the next call or STOP_COPY (the socket never returns ENOMSG).
    /// A reader that reads everything reported after each call thus reads
    /// exactly `initial_bytes + dirty_bytes` each time.
    fn precopy_info(&self) -> BackendResult<PrecopyInfo> {
        let mut c = self.shared.lock();
        if let Some(e) = &c.save_error {
            return Err(self.err(e));
        }
        if !mig_fsm::is_pre_copy(c.state) {
            return Err(self.err(format_args!("precopy info asked in state {:?}", c.state)));
        }
        self.shared.commit_initial(&mut c);
        self.shared.commit_dirty(&mut c);
        self.shared.work_cv.notify_all();
        let consumed = match &c.reader {
            Some(r) => {
                // Holding `sent` keeps the pump from sending meanwhile.
                let sent = c.sent.clone();
                let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                let queued = stream::unread(r)
                    .map_err(|e| self.err(format_args!("FIONREAD on the data socket: {e}")))?;
                sent.saturating_sub(queued)
            }
            None => 0,
        };
        let unread = c.commit_total.saturating_sub(consumed);
        let initial_bytes = c
            .initial_end
            .map_or(0, |e| e.saturating_sub(consumed))
            .min(unread);
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes: unread - initial_bytes,
        })
    }

    /// Stream bytes STOP_COPY would still produce (excluding bytes already
    /// committed in PRE_COPY); the full stream size outside a session.
    fn stop_copy_size(&self) -> BackendResult<u64> {
        let c = self.shared.lock();
        let cfg = &self.shared.cfg;
        let rest = stream::stream_len(cfg.state_size - cfg.precopy_size) + END_LEN;
        if !c.tracking {
            return Ok(HEADER_LEN + stream::stream_len(cfg.precopy_size) + rest);
        }
        let hdr = if c.header_queued { 0 } else { HEADER_LEN };
        let dirty = c.dirty_blocks * (BLOCK + RECORD_HDR_LEN);
        Ok(hdr + stream::stream_len(cfg.precopy_size - c.initial_next) + dirty + rest)
    }
}

#[cfg(test)]
mod tests;
