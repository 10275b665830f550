//! The worker threads of the simulated device: dirtier, pump, loader.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use log::debug;

use super::regs::{Regs, REGS_LEN};
use super::stream::{
    self, LoadError, RateLimiter, Record, XferError, BLOCK, CHUNK, END_DIGEST_LEN, HEADER_LEN,
    RECORD_HDR_LEN,
};
use super::{Seg, Shared, DIRTY_BATCH, LOAD_GRACE, TICK};
use crate::mig_fsm;

/// Rewrites random blocks at `mib_per_sec` while the device runs (0: never).
pub(super) fn dirtier(sh: Arc<Shared>, mib_per_sec: f64) {
    let rate = mib_per_sec * 1024.0 * 1024.0;
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
        let mut left = n;
        while left > 0 {
            // Short lock holds so the pump and precopy_info are not starved.
            let batch = left.min(DIRTY_BATCH);
            left -= batch;
            let mut c = sh.lock();
            if c.shutdown {
                return;
            }
            if !mig_fsm::is_running(c.state) {
                break; // frozen between our wait and now
            }
            let mut seed = c.seed;
            for _ in 0..batch {
                let v = stream::splitmix64(&mut seed);
                let b = v % nblocks;
                let off = b * BLOCK;
                let end = (off + BLOCK).min(span);
                stream::scribble(&mut c.data[off as usize..end as usize], v);
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
}

/// Writes committed segments into the save socket until the end marker.
pub(super) fn pump(sh: Arc<Shared>, sock: File, sent: Arc<Mutex<u64>>, cancel: Arc<AtomicBool>) {
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
            is_end = matches!(seg, Seg::End { .. });
            match seg {
                Seg::Header => buf.extend_from_slice(&stream::encode_header(sh.cfg.state_size)),
                Seg::Data { off, len } => {
                    buf.extend_from_slice(&stream::encode_record(off, len as u32));
                    buf.extend_from_slice(&c.data[off as usize..(off + len) as usize]);
                }
                Seg::Regs { regs } => buf.extend_from_slice(&stream::encode_regs(&regs)),
                Seg::End { digest } => buf.extend_from_slice(&stream::encode_end(digest)),
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
        match stream::send_all(&sock, out, &sent, &cancel) {
            Ok(()) => written += out.len() as u64,
            Err(XferError::Cancelled) => return,
            Err(XferError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                // The reader closed its fd: its choice, not a device fault.
                debug!(
                    "sim-vfio {}: save stream reader went away after {written} bytes",
                    sh.cfg.id
                );
                return;
            }
            Err(XferError::Io(e)) => {
                sh.fail_save(format!(
                    "writing the save stream failed after {written} bytes: {e}"
                ));
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

/// Reads and applies a load stream until the end marker, then checks the
/// loaded state against the source's digest the marker carries (recorded in
/// `source_digest` whether or not it matches). The register record (exactly
/// one, before the end marker) is validated when read and applied to the
/// hardware when the end marker arrives (the engine is halted in RESUMING;
/// it resumes from the loaded position once the device runs).
///
/// Everything read is untrusted: malformed input yields an error, never a
/// panic.
pub(super) fn loader(
    sh: Arc<Shared>,
    sock: File,
    cancel: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
) -> std::result::Result<(), LoadError> {
    let size = sh.cfg.state_size;
    let mut limiter = RateLimiter::new(sh.cfg.load_rate);
    let read = |buf: &mut [u8], what: &str| {
        stream::read_exact_cancellable(&sock, buf, &cancel, &closing, LOAD_GRACE).map_err(|e| {
            match e {
                XferError::Cancelled => "load cancelled".to_string(),
                XferError::Truncated => format!("stream truncated while reading {what}"),
                XferError::Io(e) => format!("reading {what}: {e}"),
            }
        })
    };
    let mut hdr = [0u8; HEADER_LEN as usize];
    read(&mut hdr, "the stream header")?;
    stream::check_header(&hdr, size)?;
    if sh.cfg.fail_load {
        return Err(LoadError::Stream(
            "device refuses its data (fail-load)".into(),
        ));
    }
    let mut buf = Vec::new();
    let mut records = 0u64;
    let mut regs: Option<Regs> = None;
    loop {
        let mut rh = [0u8; RECORD_HDR_LEN as usize];
        read(&mut rh, "a record header")?;
        match stream::decode_record(&rh, size)? {
            Record::Regs => {
                let mut rb = [0u8; REGS_LEN];
                read(&mut rb, "the register record")?;
                if regs.is_some() {
                    return Err(LoadError::Stream("a second register record".into()));
                }
                regs = Some(Regs::decode(&rb)?);
            }
            Record::End => {
                let mut dg = [0u8; END_DIGEST_LEN as usize];
                read(&mut dg, "the end marker digest")?;
                let sent = stream::decode_end_digest(&dg);
                let Some(regs) = regs else {
                    return Err(LoadError::Stream(
                        "the stream ended without its register record".into(),
                    ));
                };
                sh.hw.lock().regs = regs;
                let checked = {
                    let mut c = sh.lock();
                    c.source_digest = Some(sent);
                    stream::check_loaded(sent, &c.data)
                };
                debug!(
                    "sim-vfio {}: loaded {records} records, source digest {sent:016x}",
                    sh.cfg.id
                );
                return checked;
            }
            Record::Data { offset, len } => {
                let len = len as usize; // <= MAX_RECORD, checked by decode_record
                buf.resize(len, 0);
                read(&mut buf[..len], "record data")?;
                if !stream::sleep_cancellable(limiter.reserve(RECORD_HDR_LEN + len as u64), &cancel)
                {
                    return Err(LoadError::Stream("load cancelled".into()));
                }
                let off = offset as usize;
                sh.lock().data[off..off + len].copy_from_slice(&buf[..len]);
                records += 1;
            }
        }
    }
}
