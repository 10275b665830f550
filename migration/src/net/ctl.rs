//! The control block of one side of one migration: first error, abort flag,
//! cancel token, deadline, commit point; and [`Notify`], the wake-up of a
//! waiting state machine.

use std::net::Shutdown;

use super::Sock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::lock;
use crate::api::CancelToken;
use crate::error::MigrationError;

/// Control block of one side of one migration: the first error, the abort
/// flag every worker polls, the user's cancel token, and the sockets to shut
/// down to wake blocked workers.
///
/// Invariant: once `abort` is set it stays set; `first` holds the first
/// error reported through [`Ctl::fail`], which is the migration's cause.
/// Once `committed` is set (the switch-over commit point, see
/// [`Ctl::commit_point`]) it stays set, and from then on neither the cancel
/// token nor the deadline can fail the migration: only a real failure
/// (connection, peer, protocol) sets `abort`.
#[derive(Debug)]
pub struct Ctl {
    abort: AtomicBool,
    committed: AtomicBool,
    first: Mutex<Option<MigrationError>>,
    cancel: CancelToken,
    sockets: Mutex<Vec<Sock>>,
    deadline: Mutex<Option<(Instant, String)>>,
    peer_seen: Mutex<Option<Instant>>,
    /// Stall timeout in force.
    pub stall: Duration,
}

impl Ctl {
    /// A fresh control block.
    pub fn new(cancel: CancelToken, stall: Duration) -> Arc<Ctl> {
        Arc::new(Ctl {
            abort: AtomicBool::new(false),
            committed: AtomicBool::new(false),
            first: Mutex::new(None),
            cancel,
            sockets: Mutex::new(Vec::new()),
            deadline: Mutex::new(None),
            peer_seen: Mutex::new(None),
            stall,
        })
    }

    /// Makes every blocking loop fail with [`MigrationError::Timeout`]
    /// (`why`) after `at`.
    pub fn set_deadline(&self, at: Instant, why: String) {
        *lock(&self.deadline) = Some((at, why));
    }

    /// Records that the peer just proved to be alive (a frame arrived on the
    /// main connection).
    pub fn touch_peer(&self) {
        *lock(&self.peer_seen) = Some(Instant::now());
    }

    /// Whether a blocked write should count as stalled: no progress for the
    /// stall timeout and no sign of life from the peer for as long (a live
    /// destination may back-pressure for long while devices load slowly).
    pub(super) fn write_stalled(&self, last_progress: Instant) -> bool {
        last_progress.elapsed() > self.stall && unset_or_older(*lock(&self.peer_seen), self.stall)
    }

    /// Registers a socket to be shut down on abort.
    pub fn register(&self, s: &Sock) {
        if let Ok(c) = s.try_clone() {
            lock(&self.sockets).push(c);
        }
    }

    /// Records `e` (if it is the first) and stops everything: sets the abort
    /// flag and shuts down the registered sockets. A bare
    /// [`MigrationError::Aborted`] (a worker that saw the abort flag) once the
    /// migration is already aborted changes nothing.
    pub fn fail(&self, e: MigrationError) {
        self.fail_inner(e, false);
    }

    /// Records `e` and aborts like [`Ctl::fail`], unless `soft` and the commit
    /// point was passed (a cancel or deadline that lost the race against
    /// [`Ctl::commit_point`] is ignored). The commit flag is read under the
    /// same lock that `commit_point` takes, so the two are linearized.
    fn fail_inner(&self, e: MigrationError, soft: bool) {
        {
            let mut f = lock(&self.first);
            if soft && self.is_committed() {
                log::warn!("ignored after the switch-over was committed: {e}");
                return;
            }
            if matches!(e, MigrationError::Aborted) && self.abort.load(Ordering::SeqCst) {
                // A worker that stopped because of an abort already under
                // way: whoever set it chose whether the sockets go down
                // (a cancel keeps them up until the peer was told why).
                return;
            }
            if f.is_none() && !matches!(e, MigrationError::Aborted) {
                log::warn!("migration failing: {e}");
                *f = Some(e);
            }
            self.abort.store(true, Ordering::SeqCst);
        }
        // A cancel or a deadline is this side's decision: the sockets stay
        // up so that the state machine tells the peer why (ABORT, ERROR)
        // before it closes them; every worker sees the abort flag within
        // one poll interval. Shutting them down here let the peer see a
        // closed data connection before the reason on the main one.
        if !soft {
            self.shutdown_all();
        }
    }

    /// Shuts down every registered socket (wakes blocked readers/writers).
    pub fn shutdown_all(&self) {
        for s in lock(&self.sockets).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Passes the switch-over commit point: from now on cancel and the
    /// deadline are ignored (it is too late to go back), only failures abort.
    ///
    /// Fails with [`MigrationError::Aborted`] (and commits nothing) if the
    /// migration was already aborted, cancelled or past its deadline: then
    /// the caller must not commit. A cancel either lands before this call
    /// (and fails it) or after it (and is ignored): both paths take the
    /// lock of the first error.
    pub fn commit_point(&self) -> Result<(), MigrationError> {
        self.check()?;
        {
            let _f = lock(&self.first);
            if !self.abort.load(Ordering::SeqCst) && !self.cancel.is_cancelled() {
                self.committed.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
        // Cancelled between the check and the lock: honour it.
        self.fail(MigrationError::Cancelled);
        Err(MigrationError::Aborted)
    }

    /// Whether [`Ctl::commit_point`] was passed.
    pub fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// Whether workers must stop (abort, or cancel before the commit point).
    pub fn stopped(&self) -> bool {
        self.abort.load(Ordering::SeqCst) || (self.cancel.is_cancelled() && !self.is_committed())
    }

    /// Ok while running; turns a cancel or an expired deadline into the
    /// migration's error (both only before the commit point).
    pub fn check(&self) -> Result<(), MigrationError> {
        let committed = self.is_committed();
        if !committed && self.cancel.is_cancelled() && !self.abort.load(Ordering::SeqCst) {
            self.fail_inner(MigrationError::Cancelled, true);
        }
        let expired = match &*lock(&self.deadline) {
            Some((at, why)) if !committed && Instant::now() >= *at => Some(why.clone()),
            _ => None,
        };
        if let Some(why) = expired {
            if !self.abort.load(Ordering::SeqCst) {
                self.fail_inner(MigrationError::Timeout(why), true);
            }
        }
        if self.abort.load(Ordering::SeqCst) {
            return Err(MigrationError::Aborted);
        }
        Ok(())
    }

    /// Takes the first recorded error.
    pub fn take_error(&self) -> Option<MigrationError> {
        lock(&self.first).take()
    }
}

/// Whether `t` is unset or older than `age`.
fn unset_or_older(t: Option<Instant>, age: Duration) -> bool {
    t.is_none_or(|t| t.elapsed() > age)
}

/// A flag plus condvar to wake a waiting state machine when workers progress.
#[derive(Debug, Default)]
pub struct Notify {
    gen: Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Notify {
    /// Wakes waiters.
    pub fn notify(&self) {
        *lock(&self.gen) += 1;
        self.cv.notify_all();
    }
    /// Current generation (pass to [`Notify::wait`]).
    pub fn generation(&self) -> u64 {
        *lock(&self.gen)
    }
    /// Waits until the generation moves past `seen` or `timeout` expires.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.gen);
        if *g != seen {
            return;
        }
        let _ = self.cv.wait_timeout(g, timeout);
    }
}
