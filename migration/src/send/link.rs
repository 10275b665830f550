//! The source's main connection once data flows: the connection itself,
//! its reader thread (which collects what the destination reports:
//! switch-over acks, load rates, READY, RESUMED, ERROR) and its keepalive
//! thread, owned together by [`Link`].

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::push::PageServer;
use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::net::{lock, recv_payload, Ctl, Keepalive, MainConn, Notify, Recv};
use crate::stats::DeviceCounters;
use crate::wire::{self, Frame};
use crate::worker::{self, Worker};

/// What the main-connection reader learned from the destination.
///
/// Invariants: `ready` and `resumed` are set at most once; `ready` only
/// after `state_sent`, `resumed` only after `commit_sent`; `discarded` only
/// with `remote_error`.
#[derive(Debug, Default)]
pub struct FromDest {
    /// Per device: (bytes loaded, load µs) once its initial data was loaded.
    pub acks: Mutex<Vec<Option<(u64, u64)>>>,
    /// Set just before STATE is written; READY before it is a violation.
    pub state_sent: AtomicBool,
    /// READY arrived: the destination restored the state and waits for COMMIT.
    pub ready: AtomicBool,
    /// Set just before COMMIT is written; RESUMED before it is a violation.
    pub commit_sent: AtomicBool,
    /// RESUMED's destination resume time (µs since the epoch).
    pub resumed: Mutex<Option<u64>>,
    /// The text of an ERROR frame from the destination.
    pub remote_error: Mutex<Option<String>>,
    /// That ERROR said the destination discarded its VM without starting
    /// the guest ([`Frame::Discarded`]): the source may resume even after
    /// COMMIT.
    pub discarded: AtomicBool,
    /// Incoming migrations on the destination host, from its last
    /// HOST_LOAD (0: none arrived).
    pub host_load: AtomicU64,
    /// Notified on every frame and on failure.
    pub notify: Notify,
    /// The switch to post-copy was made (the VM state follows POSTCOPY).
    pub postcopy: AtomicBool,
    /// Serves PAGE_REQUESTs; set once the destination is READY for
    /// post-copy. A request before it is a protocol violation.
    pub server: OnceLock<Arc<PageServer>>,
    /// POSTCOPY_DONE's figures: requests, p50 and p99 fault latency (µs).
    pub done: Mutex<Option<(u64, u64, u64)>>,
}

/// The main connection with its reader and keepalive threads.
///
/// Invariant: the reader runs on its own stop token (not the migration's
/// abort), so that after a failure it can still pick up the destination's
/// ERROR. Dropping the link stops and joins the keepalive, then the reader
/// (field order).
pub struct Link {
    /// The connection.
    pub main: Arc<MainConn>,
    keepalive: Keepalive,
    reader: MainReader,
}

/// The reader thread of the main connection; stopped and joined on drop.
struct MainReader {
    stop: CancelToken,
    handle: Option<Worker>,
}

impl MainReader {
    fn is_running(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }
}

impl Drop for MainReader {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.handle.take() {
            let _ = worker::join(h);
        }
    }
}

impl Link {
    /// Starts the reader and keepalive threads on `main`.
    pub fn start(
        main: Arc<MainConn>,
        ctl: &Arc<Ctl>,
        from_dest: &Arc<FromDest>,
        counters: &[Arc<DeviceCounters>],
    ) -> Result<Link, MigrationError> {
        let stop = CancelToken::default();
        let rctl = Ctl::new(stop.clone(), ctl.stall);
        let (m, c, fd, cnt) = (
            main.clone(),
            ctl.clone(),
            from_dest.clone(),
            counters.to_vec(),
        );
        let handle = worker::spawn("mig-main-reader", ctl, move || {
            main_reader(&m, &rctl, &c, &fd, &cnt);
            Ok(())
        })?;
        let reader = MainReader {
            stop,
            handle: Some(handle),
        };
        let keepalive = Keepalive::spawn(main.clone(), ctl.clone());
        Ok(Link {
            main,
            keepalive,
            reader,
        })
    }

    /// After a failure (the migration already aborted): sends ABORT with
    /// `err` unless `committed` or the error is the destination's own, lets
    /// the reader pick up the destination's ERROR for up to a second, shuts
    /// the connection down and joins the reader and the keepalive. Returns
    /// the error to report: the destination's message replaces a mere
    /// connection error.
    pub fn abort(self, err: MigrationError, committed: bool, fd: &FromDest) -> MigrationError {
        if !matches!(err, MigrationError::Remote(_)) && !committed {
            self.main
                .send_message(|len| Frame::Abort { len }, &err.to_string());
        }
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until && self.reader.is_running() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.main.stream.tcp().shutdown(Shutdown::Both);
        let Link {
            main,
            keepalive,
            reader,
        } = self;
        drop(reader);
        drop(keepalive);
        drop(main);
        remote_cause(err, fd)
    }
}

/// Replaces a connection-level error by the destination's ERROR message,
/// if one arrived (it names the real cause).
pub fn remote_cause(err: MigrationError, fd: &FromDest) -> MigrationError {
    if matches!(
        err,
        MigrationError::Io { .. }
            | MigrationError::PeerClosed(_)
            | MigrationError::Stalled(_)
            | MigrationError::Aborted
    ) {
        if let Some(m) = lock(&fd.remote_error).take() {
            return MigrationError::Remote(m);
        }
    }
    err
}

/// Reads the destination's frames on the main connection until RESUMED,
/// ERROR, EOF or stop; reports problems through `ctl`. READY is accepted
/// once and only after STATE was sent, RESUMED only after COMMIT was sent; RATE updates a device's load
/// rate (the convergence estimate reads it).
fn main_reader(
    main: &MainConn,
    rctl: &Ctl,
    ctl: &Ctl,
    fd: &FromDest,
    counters: &[Arc<DeviceCounters>],
) {
    let what = "reading the main connection";
    let mut last = Instant::now();
    loop {
        let env = match crate::net::recv_frame(&main.stream, rctl, true, what) {
            Err(MigrationError::Aborted) => return,
            Err(e) => {
                ctl.fail(e);
                fd.notify.notify();
                return;
            }
            Ok(Recv::Idle) => {
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
            Ok(Recv::Eof) => {
                let pending = lock(&fd.resumed).is_none()
                    || (fd.postcopy.load(SeqCst) && lock(&fd.done).is_none());
                if pending {
                    ctl.fail(MigrationError::PeerClosed(
                        "destination closed the main connection".into(),
                    ));
                }
                fd.notify.notify();
                return;
            }
            Ok(Recv::Frame(env)) => env,
        };
        last = Instant::now();
        ctl.touch_peer();
        let res: Result<bool, MigrationError> = (|| {
            if env.session != main.session {
                return Err(MigrationError::proto(
                    "frame of another session on the main connection",
                ));
            }
            match env.frame {
                Frame::Keepalive => Ok(false),
                Frame::Ack {
                    dev,
                    bytes,
                    load_us,
                } => {
                    let dev = dev as usize;
                    let mut acks = lock(&fd.acks);
                    let slot = acks.get_mut(dev).ok_or_else(|| {
                        MigrationError::proto(format!("ack for unknown device {dev}"))
                    })?;
                    *slot = Some((bytes, load_us));
                    if let Some(c) = counters.get(dev) {
                        c.initial_loaded.store(true, Relaxed);
                        if let Some(rate) = bytes.saturating_mul(1_000_000).checked_div(load_us) {
                            c.load_rate.store(rate, Relaxed);
                        }
                        log::debug!("device {}: destination loaded its initial data", c.id);
                    }
                    Ok(false)
                }
                Frame::Rate { dev, rate_bps, .. } => {
                    let c = counters.get(dev as usize).ok_or_else(|| {
                        MigrationError::proto(format!("load rate for unknown device {dev}"))
                    })?;
                    if rate_bps > 0 {
                        c.load_rate.store(rate_bps, Relaxed);
                    }
                    Ok(false)
                }
                Frame::HostLoad { migrations } => {
                    fd.host_load.store(migrations as u64, Relaxed);
                    Ok(false)
                }
                Frame::Ready => {
                    if !fd.state_sent.load(SeqCst) {
                        return Err(MigrationError::proto(
                            "READY from the destination before STATE was sent",
                        ));
                    }
                    if fd.ready.swap(true, SeqCst) {
                        return Err(MigrationError::proto(
                            "duplicate READY from the destination",
                        ));
                    }
                    log::debug!("destination restored the VM state and is ready to start it");
                    Ok(false)
                }
                Frame::Resumed { resume_us } => {
                    if !fd.commit_sent.load(SeqCst) {
                        return Err(MigrationError::proto("RESUMED before COMMIT"));
                    }
                    *lock(&fd.resumed) = Some(resume_us);
                    // In post-copy the destination goes on asking for pages.
                    Ok(!fd.postcopy.load(SeqCst))
                }
                Frame::PageRequest { gpa, npages } => {
                    let server = fd
                        .server
                        .get()
                        .ok_or_else(|| MigrationError::proto("PAGE_REQUEST outside post-copy"))?;
                    server.serve(gpa, npages)?;
                    Ok(false)
                }
                Frame::PostcopyDone {
                    requests,
                    p50_us,
                    p99_us,
                } => {
                    if fd.server.get().is_none() || lock(&fd.resumed).is_none() {
                        return Err(MigrationError::proto("POSTCOPY_DONE before post-copy ran"));
                    }
                    *lock(&fd.done) = Some((requests, p50_us, p99_us));
                    Ok(true)
                }
                Frame::Error { len } => {
                    let m = wire::message_text(&recv_payload(&main.stream, len, rctl, what)?);
                    *lock(&fd.remote_error) = Some(m.clone());
                    ctl.fail(MigrationError::Remote(m));
                    Ok(true)
                }
                Frame::Discarded { len } => {
                    let m = wire::message_text(&recv_payload(&main.stream, len, rctl, what)?);
                    *lock(&fd.remote_error) = Some(m.clone());
                    fd.discarded.store(true, SeqCst);
                    ctl.fail(MigrationError::Remote(m));
                    Ok(true)
                }
                f => Err(MigrationError::proto(format!(
                    "unexpected {:?} frame from the destination",
                    f.kind()
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
