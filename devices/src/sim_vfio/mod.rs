//! A synthetic VFIO device with migration v2 semantics, for tests and
//! benchmarks (`--sim-vfio`).
//!
//! The device holds `state_size` bytes of internal state; the first
//! `precopy_size` bytes are pre-copyable. While running, a dirtier thread
//! rewrites 4 KiB blocks of the pre-copyable part (of the whole state when
//! there is none) at `dirty_rate`. Saving and loading go through real
//! sockets (see [`stream`] for the format) served by a pump (source) or a
//! loader (destination) thread, throttled to `save_rate` / `load_rate`.

pub mod config;
pub mod stream;

pub use config::{parse_sim_vfio_arg, parse_size, SimVfioConfig};

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, warn};
use migration::{BackendError, BackendResult, MigCaps, MigState, MigratableDevice, PrecopyInfo};

use crate::error::{Error, Result};
use crate::mig_fsm;
use stream::{
    RateLimiter, Record, XferError, BLOCK, CHUNK, END_LEN, END_OFFSET, HEADER_LEN,
    RECORD_HDR_LEN,
};

/// How long the loader waits for more data once the stream must be complete.
const LOAD_GRACE: Duration = Duration::from_secs(2);
/// Dirtier tick.
const TICK: Duration = Duration::from_millis(5);

/// One unit the pump will write.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Header,
    Data { off: u64, len: u64 },
    End,
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
    save_error: Option<String>,
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
        n
    }

    /// Commits the header (once) and all uncommitted initial bytes.
    fn commit_initial(&self, c: &mut Core) -> u64 {
        let mut n = 0;
        if !c.header_queued {
            c.queue.push_back(Seg::Header);
            c.header_queued = true;
            n += HEADER_LEN;
        }
        let pre = self.cfg.precopy_size;
        n += Self::queue_range(c, c.initial_next, pre);
        c.initial_next = pre;
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
        c.queue.push_back(Seg::Data { off, len: end - off });
        RECORD_HDR_LEN + end - off
    }

    /// Commits everything left for STOP_COPY, then the end marker.
    fn commit_rest(&self, c: &mut Core) {
        self.commit_initial(c);
        self.commit_dirty(c);
        Self::queue_range(c, self.cfg.precopy_size, self.cfg.state_size);
        c.queue.push_back(Seg::End);
        self.work_cv.notify_all();
    }

    fn begin_session(&self, c: &mut Core) {
        c.tracking = true;
        c.header_queued = false;
        c.initial_next = 0;
        c.dirty.iter_mut().for_each(|w| *w = 0);
        c.dirty_blocks = 0;
        c.queue.clear();
    }

    fn end_session(&self, c: &mut Core) {
        c.tracking = false;
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
    handle: JoinHandle<std::result::Result<(), String>>,
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
        f.debug_struct("SimVfioDevice").field("cfg", &self.shared.cfg).finish()
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
    /// everything), in RUNNING until moved to RESUMING.
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
                save_error: None,
                shutdown: false,
                seed: seed ^ 0x5eed,
            }),
            run_cv: Condvar::new(),
            work_cv: Condvar::new(),
        });
        let sh = shared.clone();
        let dirtier = spawn(&cfg.id, "dirtier", move || dirtier(sh))
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
    fn finish_loader(&self, ctl: &mut Ctl, cancel: bool) -> std::result::Result<(), String> {
        let Some(l) = ctl.loader.take() else {
            return Ok(());
        };
        l.closing.store(true, Ordering::Release);
        if cancel {
            l.cancel.store(true, Ordering::Release);
        }
        l.handle
            .join()
            .unwrap_or_else(|_| Err("loader thread panicked".into()))
    }

    fn start_pump(&self, ctl: &mut Ctl, sock: File) -> BackendResult<()> {
        let cancel = Arc::new(AtomicBool::new(false));
        let (sh, c2) = (self.shared.clone(), cancel.clone());
        let handle = spawn(&self.shared.cfg.id, "pump", move || pump(sh, sock, c2))?;
        ctl.pump = Some(Pump { cancel, handle });
        Ok(())
    }

    /// Executes one uAPI arc.
    fn step(&self, ctl: &mut Ctl, from: MigState, to: MigState) -> BackendResult<Option<File>> {
        use MigState::*;
        let sh = &self.shared;
        let pair = || stream::socket_pair().map_err(|e| self.err(format_args!("socketpair: {e}")));
        match (from, to) {
            (Running, RunningP2p) | (RunningP2p, Running) | (PreCopy, PreCopyP2p)
            | (PreCopyP2p, PreCopy) | (Running, Stop) | (RunningP2p, Stop) => {
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
                {
                    let mut c = sh.lock();
                    sh.begin_session(&mut c);
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
                    sh.begin_session(&mut c);
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
                let handle = spawn(&sh.cfg.id, "loader", move || loader(s2, rd, c2, cl2))?;
                ctl.loader = Some(Loader {
                    cancel,
                    closing,
                    handle,
                });
                sh.lock().state = Resuming;
                Ok(Some(wr))
            }
            (Resuming, Stop) => match self.finish_loader(ctl, false) {
                Ok(()) => {
                    sh.lock().state = Stop;
                    Ok(None)
                }
                Err(e) => {
                    sh.lock().state = Error;
                    Err(self.err(format_args!("loading device state failed: {e}")))
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
        Ok(self.shared.lock().state)
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
    ///   naming the device, if the stream was truncated or malformed.
    /// - Leaving PRE_COPY/STOP_COPY for RUNNING/STOP cancels the pump.
    /// - From ERROR only RUNNING is accepted: it acts as a device reset
    ///   (VFIO_DEVICE_RESET), stopping any pump/loader; the state bytes are
    ///   kept. Any other request in ERROR fails with the recorded error.
    fn set_state(&self, new: MigState) -> BackendResult<Option<File>> {
        let mut ctl = self.lock_ctl();
        let (cur, save_error) = {
            let c = self.shared.lock();
            (c.state, c.save_error.clone())
        };
        if cur == MigState::Error {
            if new == MigState::Running {
                self.reset_to_running(&mut ctl);
                return Ok(None);
            }
            let why = save_error.unwrap_or_else(|| "device is in ERROR".into());
            return Err(self.err(format_args!("cannot go to {new:?}: {why}")));
        }
        let steps = mig_fsm::path(self.caps(), cur, new)
            .ok_or_else(|| self.err(format_args!("transition {cur:?} -> {new:?} is not allowed")))?;
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

    /// Commits to the stream everything pending now — uncommitted initial
    /// bytes (and the stream header, first time) plus the blocks dirtied
    /// since the last commit — and returns those byte counts, record headers
    /// included. The reader must read exactly `initial_bytes + dirty_bytes`
    /// more bytes after each call (the pump delivers them at `save_rate`);
    /// reads never hit ENOMSG because nothing uncommitted is ever written.
    /// So `initial_bytes` is nonzero only at the first call of a session.
    fn precopy_info(&self) -> BackendResult<PrecopyInfo> {
        let mut c = self.shared.lock();
        if let Some(e) = &c.save_error {
            return Err(self.err(e));
        }
        if !mig_fsm::is_pre_copy(c.state) {
            return Err(self.err(format_args!("precopy info asked in state {:?}", c.state)));
        }
        let initial_bytes = self.shared.commit_initial(&mut c);
        let dirty_bytes = self.shared.commit_dirty(&mut c);
        self.shared.work_cv.notify_all();
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes,
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

/// Rewrites random blocks at `dirty_rate` while the device runs.
fn dirtier(sh: Arc<Shared>) {
    let rate = sh.cfg.dirty_rate * 1024.0 * 1024.0;
    let span = if sh.cfg.precopy_size > 0 {
        sh.cfg.precopy_size
    } else {
        sh.cfg.state_size
    };
    let nblocks = span.div_ceil(BLOCK);
    let mut credit = 0.0f64;
    let mut last = Instant::now();
    loop {
        {
            let mut c = sh.lock();
            let mut waited = false;
            while !c.shutdown && (rate <= 0.0 || !mig_fsm::is_running(c.state)) {
                c = sh.run_cv.wait(c).unwrap_or_else(|e| e.into_inner());
                waited = true;
            }
            if c.shutdown {
                return;
            }
            if waited {
                credit = 0.0;
                last = Instant::now();
            }
        }
        std::thread::sleep(TICK);
        let now = Instant::now();
        credit = (credit + rate * (now - last).as_secs_f64()).min(rate);
        last = now;
        let n = (credit / BLOCK as f64) as u64;
        if n == 0 {
            continue;
        }
        credit -= (n * BLOCK) as f64;
        let mut c = sh.lock();
        if c.shutdown {
            return;
        }
        if !mig_fsm::is_running(c.state) {
            continue; // frozen between our wait and now
        }
        let mut seed = c.seed;
        for _ in 0..n {
            let b = stream::splitmix64(&mut seed) % nblocks;
            let off = b * BLOCK;
            let end = (off + BLOCK).min(span);
            stream::fill(&mut c.data[off as usize..end as usize], &mut seed);
            if c.tracking && off < c.initial_next {
                let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
                if c.dirty[w] & bit == 0 {
                    c.dirty[w] |= bit;
                    c.dirty_blocks += 1;
                }
            }
        }
        c.seed = seed;
    }
}

/// Writes committed segments into the save socket until the end marker.
fn pump(sh: Arc<Shared>, sock: File, cancel: Arc<AtomicBool>) {
    let mut limiter = RateLimiter::new(sh.cfg.save_rate);
    let mut written = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity((CHUNK + RECORD_HDR_LEN) as usize);
    loop {
        buf.clear();
        let is_end;
        {
            let mut c = sh.lock();
            let seg = loop {
                if cancel.load(Ordering::Acquire) || c.shutdown {
                    return;
                }
                if let Some(s) = c.queue.pop_front() {
                    break s;
                }
                c = sh.work_cv.wait(c).unwrap_or_else(|e| e.into_inner());
            };
            is_end = matches!(seg, Seg::End);
            match seg {
                Seg::Header => buf.extend_from_slice(&stream::encode_header(sh.cfg.state_size)),
                Seg::Data { off, len } => {
                    buf.extend_from_slice(&stream::encode_record(off, len as u32));
                    buf.extend_from_slice(&c.data[off as usize..(off + len) as usize]);
                }
                Seg::End => buf.extend_from_slice(&stream::encode_record(END_OFFSET, 0)),
            }
        }
        if !stream::sleep_cancellable(limiter.reserve(buf.len() as u64), &cancel) {
            return;
        }
        let mut out = &buf[..];
        let mut fault = None;
        if let Some(limit) = sh.cfg.fail_save_after {
            let left = limit.saturating_sub(written);
            if out.len() as u64 > left {
                out = &out[..left as usize];
                fault = Some(limit);
            }
        }
        match stream::send_all(&sock, out, &cancel) {
            Ok(()) => written += out.len() as u64,
            Err(XferError::Cancelled) => return,
            Err(XferError::Io(e)) => {
                sh.fail_save(format!("writing the save stream failed after {written} bytes: {e}"));
                return;
            }
            Err(XferError::Truncated) => return,
        }
        if let Some(limit) = fault {
            // Record the error before the socket closes (on return).
            sh.fail_save(format!("injected save failure after {limit} bytes"));
            return;
        }
        if is_end {
            return;
        }
    }
}

/// Reads and applies a load stream until the end marker.
fn loader(
    sh: Arc<Shared>,
    sock: File,
    cancel: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
) -> std::result::Result<(), String> {
    let size = sh.cfg.state_size;
    let mut limiter = RateLimiter::new(sh.cfg.load_rate);
    let read = |buf: &mut [u8], what: &str| {
        stream::read_exact_cancellable(&sock, buf, &cancel, &closing, LOAD_GRACE).map_err(|e| match e {
            XferError::Cancelled => "load cancelled".to_string(),
            XferError::Truncated => format!("stream truncated while reading {what}"),
            XferError::Io(e) => format!("reading {what}: {e}"),
        })
    };
    let mut hdr = [0u8; HEADER_LEN as usize];
    read(&mut hdr, "the stream header")?;
    stream::check_header(&hdr, size)?;
    if sh.cfg.fail_load {
        return Err("device refuses its data (fail-load)".into());
    }
    let mut buf = Vec::new();
    let mut records = 0u64;
    loop {
        let mut rh = [0u8; RECORD_HDR_LEN as usize];
        read(&mut rh, "a record header")?;
        match stream::decode_record(&rh, size)? {
            Record::End => {
                debug!("sim-vfio {}: loaded {records} records", sh.cfg.id);
                return Ok(());
            }
            Record::Data { offset, len } => {
                let len = len as usize; // <= MAX_RECORD, checked by decode_record
                buf.resize(len, 0);
                read(&mut buf[..len], "record data")?;
                if !stream::sleep_cancellable(limiter.reserve(RECORD_HDR_LEN + len as u64), &cancel) {
                    return Err("load cancelled".into());
                }
                let off = offset as usize;
                sh.lock().data[off..off + len].copy_from_slice(&buf[..len]);
                records += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests;
