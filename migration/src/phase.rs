//! What the two state machines (`send/`, `recv/`) share: a step takes its
//! phase by value and, when it fails, hands back the error together with
//! everything the phase held, so that the caller's `abort` can release it
//! in order.

use crate::error::MigrationError;

/// A step failed: the error and the phase (with its resources) at that
/// moment.
///
/// Invariant: `phase` is the phase the failing step was given (or the one
/// it had reached), never a phase whose resources were already released.
pub(crate) struct Failed<P> {
    /// What the state machine held.
    pub(crate) phase: P,
    /// Why the step failed.
    pub(crate) err: MigrationError,
}

impl<P> Failed<P> {
    /// Pairs `err` with `phase`.
    pub(crate) fn new(phase: P, err: MigrationError) -> Failed<P> {
        Failed { phase, err }
    }
}

/// `r`'s value, or returns [`Failed`] with `phase` (evaluated only on error,
/// after `r` released its borrows).
macro_rules! or_fail {
    ($r:expr, $phase:expr) => {
        match $r {
            Ok(v) => v,
            Err(e) => return Err($crate::phase::Failed::new($phase, e)),
        }
    };
}
pub(crate) use or_fail;
