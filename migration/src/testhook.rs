//! Fault injection at the switch-over, for tests only.
//!
//! A test installs a hook on the thread that runs `send` or `receive`; the
//! state machine calls [`fire`] at the points of [`Point`] with the main
//! connection, so that the test can cut it (or cancel) at an exact moment.
//! In non-test builds [`fire`] is an empty inline function and no hook
//! storage exists.
//!
//! A test may also shorten the stall timeout of the migrations it runs on
//! the current thread ([`set_stall`]), so that a stall is reached in
//! seconds; [`stall_timeout`] is [`STALL_TIMEOUT`] everywhere else.

use crate::net::Sock;
use std::time::Duration;

use crate::net::STALL_TIMEOUT;

/// Where the hook is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Source: READY seen, COMMIT not yet written.
    BeforeCommit,
    /// Source: COMMIT written, RESUMED not yet seen.
    AfterCommit,
    /// Destination: COMMIT received and VM started, RESUMED not yet sent.
    BeforeResumed,
}

#[cfg(test)]
type Hook = Box<dyn Fn(Point, &Sock)>;

#[cfg(test)]
thread_local! {
    static HOOK: std::cell::RefCell<Option<Hook>> = const { std::cell::RefCell::new(None) };
}

/// Installs `f` for migrations run on the current thread (tests only).
#[cfg(test)]
pub fn set(f: impl Fn(Point, &Sock) + 'static) {
    HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
}

/// Calls the current thread's hook, if any.
#[cfg(test)]
pub fn fire(p: Point, s: &Sock) {
    HOOK.with(|h| {
        if let Some(f) = &*h.borrow() {
            f(p, s)
        }
    });
}

/// Calls the current thread's hook (no-op outside tests).
#[cfg(not(test))]
#[inline(always)]
pub fn fire(_p: Point, _s: &Sock) {}

#[cfg(test)]
thread_local! {
    static STALL: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}

/// Sets the stall timeout of migrations run on the current thread (tests
/// only).
#[cfg(test)]
pub fn set_stall(d: Duration) {
    STALL.with(|s| s.set(Some(d)));
}

/// The stall timeout of a migration started on the current thread.
#[cfg(test)]
pub fn stall_timeout() -> Duration {
    STALL.with(|s| s.get()).unwrap_or(STALL_TIMEOUT)
}

/// The stall timeout of a migration: [`STALL_TIMEOUT`].
#[cfg(not(test))]
#[inline(always)]
pub fn stall_timeout() -> Duration {
    STALL_TIMEOUT
}
