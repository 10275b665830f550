//! The source's reader of the main connection: collects what the
//! destination reports (switch-over acks, load rates, READY, RESUMED,
//! ERROR) for the sender's state machine.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::error::MigrationError;
use crate::net::{lock, recv_header, recv_payload, Ctl, MainConn, Notify, Start};
use crate::stats::DeviceCounters;
use crate::wire::{self, Kind};

/// What the main-connection reader learned from the destination.
///
/// Invariants: `ready` and `resumed` are set at most once; `resumed` only
/// after `commit_sent`.
#[derive(Debug, Default)]
pub struct FromDest {
    /// Per device: (bytes loaded, load µs) once its initial data was loaded.
    pub acks: Mutex<Vec<Option<(u64, u64)>>>,
    /// READY arrived: the destination restored the state and waits for COMMIT.
    pub ready: AtomicBool,
    /// Set just before COMMIT is written; RESUMED before it is a violation.
    pub commit_sent: AtomicBool,
    /// RESUMED's destination resume time (µs since the epoch).
    pub resumed: Mutex<Option<u64>>,
    /// The text of an ERROR frame from the destination.
    pub remote_error: Mutex<Option<String>>,
    /// Notified on every frame and on failure.
    pub notify: Notify,
}

/// Reads the destination's frames on the main connection until RESUMED,
/// ERROR, EOF or stop; reports problems through `ctl`. READY is accepted
/// once, RESUMED only after COMMIT was sent; RATE updates a device's load
/// rate (the convergence estimate reads it).
pub fn main_reader(
    main: &MainConn,
    rctl: &Ctl,
    ctl: &Ctl,
    fd: &FromDest,
    counters: &[Arc<DeviceCounters>],
) {
    let what = "reading the main connection";
    let mut last = Instant::now();
    loop {
        let r = recv_header(&main.stream, rctl, true, what);
        let h = match r {
            Err(MigrationError::Aborted) => return,
            Err(e) => {
                ctl.fail(e);
                fd.notify.notify();
                return;
            }
            Ok((Start::Idle, _)) => {
                if last.elapsed() > rctl.stall {
                    ctl.fail(MigrationError::Stalled(format!(
                        "destination silent for {:?}",
                        rctl.stall
                    )));
                    fd.notify.notify();
                    return;
                }
                continue;
            }
            Ok((Start::Eof, _)) => {
                if lock(&fd.resumed).is_none() {
                    ctl.fail(MigrationError::PeerClosed(
                        "destination closed the main connection".into(),
                    ));
                }
                fd.notify.notify();
                return;
            }
            Ok((_, None)) => return,
            Ok((_, Some(h))) => h,
        };
        last = Instant::now();
        ctl.touch_peer();
        let res: Result<bool, MigrationError> = (|| {
            if h.session != main.session {
                return Err(MigrationError::proto(
                    "frame of another session on the main connection",
                ));
            }
            match h.kind {
                Kind::Keepalive => Ok(false),
                Kind::Ack => {
                    let dev = h.a as usize;
                    let mut acks = lock(&fd.acks);
                    let slot = acks.get_mut(dev).ok_or_else(|| {
                        MigrationError::proto(format!("ack for unknown device {dev}"))
                    })?;
                    *slot = Some((h.b, h.c));
                    if let Some(c) = counters.get(dev) {
                        c.initial_loaded.store(true, Relaxed);
                        if let Some(rate) = h.b.saturating_mul(1_000_000).checked_div(h.c) {
                            c.load_rate.store(rate, Relaxed);
                        }
                        log::debug!("device {}: destination loaded its initial data", c.id);
                    }
                    Ok(false)
                }
                Kind::Rate => {
                    let c = counters.get(h.a as usize).ok_or_else(|| {
                        MigrationError::proto(format!("load rate for unknown device {}", h.a))
                    })?;
                    if h.b > 0 {
                        c.load_rate.store(h.b, Relaxed);
                    }
                    Ok(false)
                }
                Kind::Ready => {
                    if fd.ready.swap(true, SeqCst) {
                        return Err(MigrationError::proto(
                            "duplicate READY from the destination",
                        ));
                    }
                    log::debug!("destination restored the VM state and is ready to start it");
                    Ok(false)
                }
                Kind::Resumed => {
                    if !fd.commit_sent.load(SeqCst) {
                        return Err(MigrationError::proto("RESUMED before COMMIT"));
                    }
                    *lock(&fd.resumed) = Some(h.a);
                    Ok(true)
                }
                Kind::Error => {
                    let m = wire::message_text(&recv_payload(&main.stream, h.len, rctl, what)?);
                    *lock(&fd.remote_error) = Some(m.clone());
                    ctl.fail(MigrationError::Remote(m));
                    Ok(true)
                }
                k => Err(MigrationError::proto(format!(
                    "unexpected {k:?} frame from the destination"
                ))),
            }
        })();
        fd.notify.notify();
        match res {
            Ok(false) => {}
            Ok(true) => return,
            Err(e) => {
                ctl.fail(e);
                return;
            }
        }
    }
}
