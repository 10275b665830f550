//! Worker threads of a migration: started so that a panic fails the
//! migration with the panic's message instead of vanishing, and kept in a
//! [`Workers`] guard that stops and joins them when dropped.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::error::MigrationError;
use crate::net::Ctl;

/// A started worker: its result is `Err` when it failed (the cause was
/// reported through the migration's [`Ctl`]) or panicked.
pub type Worker = JoinHandle<Result<(), MigrationError>>;

/// The text of a panic payload.
fn panic_text(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// The error of a worker that panicked.
fn panicked(name: &str, p: &(dyn Any + Send)) -> MigrationError {
    MigrationError::Internal(format!("thread {name} panicked: {}", panic_text(p)))
}

/// Starts thread `name` running `f`. If `f` panics, the migration fails
/// (`ctl.fail`) with the panic message and the worker's result is
/// [`MigrationError::Aborted`]. `f` reports its own errors through `ctl`.
pub fn spawn<F>(name: &str, ctl: &Arc<Ctl>, f: F) -> Result<Worker, MigrationError>
where
    F: FnOnce() -> Result<(), MigrationError> + Send + 'static,
{
    let ctl = ctl.clone();
    let n = name.to_string();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => {
                let e = panicked(&n, &*p);
                log::error!("{e}");
                ctl.fail(e);
                Err(MigrationError::Aborted)
            }
        })
        .map_err(|e| MigrationError::io(format!("spawning thread {name}"), e))
}

/// Joins `h`; a worker that unwound anyway becomes an error.
pub fn join(h: Worker) -> Result<(), MigrationError> {
    h.join()
        .unwrap_or_else(|p| Err(panicked("(migration worker)", &*p)))
}

/// A set of started workers of one migration.
///
/// Invariant: when the guard is dropped, every worker has been asked to
/// stop (the migration is aborted if one still runs) and is joined; the
/// success path uses [`Workers::join`], which waits without aborting.
pub struct Workers {
    ctl: Arc<Ctl>,
    handles: Vec<Worker>,
}

impl Workers {
    /// An empty set whose workers obey `ctl`.
    pub fn new(ctl: &Arc<Ctl>) -> Workers {
        Workers {
            ctl: ctl.clone(),
            handles: Vec::new(),
        }
    }

    /// Starts one more worker (see [`spawn`]).
    pub fn spawn<F>(&mut self, name: &str, f: F) -> Result<(), MigrationError>
    where
        F: FnOnce() -> Result<(), MigrationError> + Send + 'static,
    {
        self.handles.push(spawn(name, &self.ctl, f)?);
        Ok(())
    }

    /// Whether every worker has ended.
    pub fn all_finished(&self) -> bool {
        self.handles.iter().all(|h| h.is_finished())
    }

    /// Waits for every worker; the first error, if any.
    pub fn join(mut self) -> Result<(), MigrationError> {
        let mut first = Ok(());
        for h in self.handles.drain(..) {
            let r = join(h);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        if !self.all_finished() {
            self.ctl.fail(MigrationError::Aborted);
        }
        for h in self.handles.drain(..) {
            let _ = join(h);
        }
    }
}
