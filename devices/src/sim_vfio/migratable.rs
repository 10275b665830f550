//! The VFIO migration v2 interface of the simulated device
//! ([`MigratableDevice`]): the uAPI state machine, pre-copy info, the
//! stop-copy size, and DMA logging.

use std::fs::File;
use std::ops::Range;

use log::debug;
use migration::{BackendResult, DmaLog, MigCaps, MigState, MigratableDevice, PrecopyInfo};

use super::config::DmaLogMode;
use super::stream::{self, BLOCK, HEADER_LEN, RECORD_HDR_LEN, TAIL_LEN};
use super::SimVfioDevice;
use crate::mig_fsm;

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
        let rest = stream::stream_len(cfg.state_size - cfg.precopy_size) + TAIL_LEN;
        if !c.tracking {
            return Ok(HEADER_LEN + stream::stream_len(cfg.precopy_size) + rest);
        }
        let hdr = if c.header_queued { 0 } else { HEADER_LEN };
        let dirty = c.dirty_blocks * (BLOCK + RECORD_HDR_LEN);
        Ok(hdr + stream::stream_len(cfg.precopy_size - c.initial_next) + dirty + rest)
    }

    /// `Supported`, or `Unsupported` with `dma-log=none`.
    fn dma_log(&self) -> DmaLog {
        match self.shared.cfg.dma_log {
            DmaLogMode::None => DmaLog::Unsupported,
            DmaLogMode::On | DmaLogMode::Off => DmaLog::Supported,
        }
    }

    /// Validates like the kernel (page size a power of two >= 4096, 1..=256
    /// aligned, non-overlapping ranges; not already started). With
    /// `dma-log=off` it succeeds but nothing is ever recorded; with
    /// `dma-log=none` it fails.
    fn dma_log_start(&self, ranges: &[Range<u64>], page_size: u64) -> BackendResult<()> {
        let record = match self.shared.cfg.dma_log {
            DmaLogMode::None => return Err(self.err("DMA logging is not supported (dma-log=none)")),
            DmaLogMode::On => true,
            DmaLogMode::Off => false,
        };
        self.shared
            .hw
            .lock()
            .log
            .start(ranges, page_size, record)
            .map_err(|e| self.err(e))
    }

    /// Reports and clears the pages written in `[iova, iova + length)`
    /// (see [`dma_log::DmaLogState::report`]); fails without touching
    /// `bitmap`'s existing bits on a bad page size, a range outside the
    /// started ranges, a short bitmap, or when not started.
    fn dma_log_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> BackendResult<()> {
        self.shared
            .hw
            .lock()
            .log
            .report(iova, length, page_size, bitmap)
            .map_err(|e| self.err(e))
    }

    /// Forgets the log (idempotent).
    fn dma_log_stop(&self) -> BackendResult<()> {
        self.shared.hw.lock().log.stop();
        Ok(())
    }
}
