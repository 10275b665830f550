//! The main (control) connection and its keepalive thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{io, lock, Channel, Ctl, KEEPALIVE_INTERVAL};
use crate::error::MigrationError;
use crate::wire::Frame;
use crate::worker::Worker;

/// The main (control) connection with a write lock, so that the state
/// machine and the keepalive thread never interleave frames.
///
/// Invariant: every frame on the main connection is written while holding
/// `wlock`; reads happen on one thread only.
#[derive(Debug)]
pub struct MainConn {
    /// The connection (poll timeouts set).
    pub stream: Channel,
    wlock: Mutex<()>,
    /// Session id stamped on frames.
    pub session: u128,
}

impl MainConn {
    /// Wraps a connected main stream.
    pub fn new(stream: Channel, session: u128) -> Arc<MainConn> {
        Arc::new(MainConn {
            stream,
            wlock: Mutex::new(()),
            session,
        })
    }

    /// Sends one frame with its payload.
    pub fn send(
        &self,
        frame: &Frame,
        payload: &[u8],
        ctl: &Ctl,
        what: &str,
    ) -> Result<(), MigrationError> {
        let _g = lock(&self.wlock);
        io::send_frame(&self.stream, self.session, frame, payload, ctl, what)
    }

    /// Runs `f` holding the write lock (a frame written some other way,
    /// such as one carrying descriptors).
    pub fn with_write_lock<R>(&self, f: impl FnOnce() -> R) -> R {
        let _g = lock(&self.wlock);
        f()
    }

    /// Best-effort ERROR/ABORT frame (ignores failures); see
    /// [`io::send_message`].
    pub fn send_message(&self, frame: fn(u64) -> Frame, msg: &str) {
        let _g = lock(&self.wlock);
        io::send_message(&self.stream, self.session, frame, msg);
    }
}

/// The keepalive thread of a main connection: sends KEEPALIVE every
/// [`KEEPALIVE_INTERVAL`] until stopped, the migration stops, or a send
/// fails.
///
/// Invariant: the thread (if it could be started) is stopped and joined
/// when this guard is dropped.
#[derive(Debug)]
pub struct Keepalive {
    stop: Arc<AtomicBool>,
    thread: Option<Worker>,
}

impl Keepalive {
    /// Starts the thread. A thread that cannot be started is logged and
    /// skipped (the peer's stall timeout then covers a silent link).
    pub fn spawn(main: Arc<MainConn>, ctl: Arc<Ctl>) -> Keepalive {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = crate::worker::spawn("mig-keepalive", &ctl.clone(), move || {
            let mut last = Instant::now();
            while !st.load(Ordering::SeqCst) && !ctl.stopped() {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= KEEPALIVE_INTERVAL {
                    last = Instant::now();
                    if main
                        .send(&Frame::Keepalive, &[], &ctl, "sending a keepalive")
                        .is_err()
                    {
                        break;
                    }
                }
            }
            Ok(())
        });
        let thread = match thread {
            Ok(h) => Some(h),
            Err(e) => {
                log::warn!("no keepalive thread: {e}");
                None
            }
        };
        Keepalive { stop, thread }
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            let _ = h.join();
        }
    }
}
