//! The migration job: a worker thread that sends this VMM's VM or receives
//! one, its live counters, its result, and the recovery a failed send needs
//! on the VM itself.
//!
//! The job never changes the VMM's life cycle: when it ends it records its
//! result and tells the control loop ([`VmmEvent::JobEnded`]), which moves
//! the VMM on (see [`crate::controller::Lifecycle`]).

use std::sync::{Arc, Mutex};

use log::{info, warn};
use migration::api::ListenAddr;
use migration::{CancelToken, MigrationState, MigrationStats, ReceiveParams, SendParams};
use serde_json::{json, Value};

use super::adapters::{DestFactory, SourceAdapter};
use crate::control::{EventSink, VmmEvent};
use crate::vm::Vm;
use crate::Vmm;

/// Direction of a migration job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This VMM sends its VM.
    Send,
    /// This VMM receives a VM.
    Receive,
}

/// How a job ended.
///
/// Invariant: `commit_uncertain` is only set for a send that failed after
/// COMMIT (the guest may run on the destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    /// The migration completed.
    Completed,
    /// The migration failed or was cancelled.
    Failed {
        /// Why.
        error: String,
        /// The guest may run on the destination: the VM is held paused.
        commit_uncertain: bool,
        /// A post-copy was interrupted: the guest runs on the destination,
        /// the VM is held paused here until a send with `"resume": true`
        /// finishes the migration (implies `commit_uncertain`).
        postcopy_paused: bool,
    },
}

/// Progress of a job's worker.
///
/// Invariant: `Ended` is set once, by the worker (or by the starter when
/// the worker could not be spawned), and never changes after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The worker runs.
    Running,
    /// The worker has ended.
    Ended(JobResult),
}

/// A migration started through the API.
///
/// How long a new request waits for a worker that has reported its end
/// but still tears down.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Invariant: `progress` is `Running` exactly while the worker thread runs.
pub struct Job {
    /// Send or receive.
    pub direction: Direction,
    /// Live counters.
    pub stats: Arc<MigrationStats>,
    /// Cancel flag.
    pub cancel: CancelToken,
    progress: Arc<Mutex<Progress>>,
}

/// Why a job could not start.
///
/// Invariant: `Bind` is caused by the user's address (HTTP 400), `Spawn` by
/// the host (HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The receive address cannot be listened on.
    #[error("cannot listen on {url}: {source}")]
    Bind {
        /// The receiver URL as given.
        url: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The worker thread could not be spawned.
    #[error("spawning the migration thread: {0}")]
    Spawn(#[source] std::io::Error),
}

impl Job {
    fn new(direction: Direction) -> Job {
        Job {
            direction,
            stats: Arc::new(MigrationStats::default()),
            cancel: CancelToken::default(),
            progress: Arc::new(Mutex::new(Progress::Running)),
        }
    }

    /// A job whose worker already ended with `result` (for tests of the
    /// life cycle).
    #[cfg(test)]
    pub(crate) fn ended(direction: Direction, result: JobResult) -> Job {
        let job = Job::new(direction);
        *job.progress.lock().unwrap_or_else(|p| p.into_inner()) = Progress::Ended(result);
        job
    }

    /// Whether the worker still runs.
    pub fn running(&self) -> bool {
        matches!(self.progress(), Progress::Running)
    }

    /// Whether the worker still holds the migration slot. A worker whose
    /// status already reads failed, cancelled or completed is only tearing
    /// down (closing sockets, dropping memory); this waits up to
    /// `SETTLE_TIMEOUT` for it to end, so a client that saw the terminal
    /// state and starts the next migration is not refused by a race.
    pub fn busy(&self) -> bool {
        if !self.running() {
            return false;
        }
        if matches!(
            self.stats.state(),
            MigrationState::None | MigrationState::Active
        ) {
            return true;
        }
        let deadline = std::time::Instant::now() + SETTLE_TIMEOUT;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            if !self.running() {
                return false;
            }
        }
        log::warn!("the last migration reads ended but its worker has not finished tearing down");
        true
    }

    /// The worker's progress.
    pub fn progress(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Status JSON of the job, with the worker's final result overlaid
    /// (the result wins over counters that were not updated).
    pub fn status(&self) -> Value {
        let mut v = serde_json::to_value(self.stats.snapshot()).unwrap_or_else(|_| json!({}));
        if let Value::Object(m) = &mut v {
            let state = m
                .get("state")
                .and_then(Value::as_str)
                .unwrap_or("none")
                .to_string();
            match self.progress() {
                Progress::Running if state == "none" => {
                    m.insert("state".into(), json!("active"));
                }
                Progress::Running => {}
                Progress::Ended(JobResult::Completed) => {
                    m.insert("state".into(), json!("completed"));
                }
                Progress::Ended(JobResult::Failed { error, .. }) => {
                    if state != "failed" && state != "cancelled" {
                        let s = if self.cancel.is_cancelled() {
                            "cancelled"
                        } else {
                            "failed"
                        };
                        m.insert("state".into(), json!(s));
                    }
                    if m.get("error").is_none_or(Value::is_null) {
                        m.insert("error".into(), json!(error));
                    }
                }
            }
            m.insert(
                "direction".into(),
                json!(match self.direction {
                    Direction::Send => "send",
                    Direction::Receive => "receive",
                }),
            );
        }
        v
    }
}

/// Runs a job's body. A panic becomes a failed result carrying its
/// message, so the life cycle always moves on: the send's guards already
/// resumed the VM while the panic unwound, unless it was past COMMIT, where
/// the VM stays paused and the outcome is treated as uncertain.
fn guarded(vm: Option<&Vm>, f: impl FnOnce() -> JobResult) -> JobResult {
    let p = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => return r,
        Err(p) => p,
    };
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into());
    let error = format!("migration thread panicked: {msg}");
    log::error!("{error}");
    let commit_uncertain = vm.is_some_and(|vm| vm.is_paused() && !vm.user_paused());
    if let Some(vm) = vm.filter(|_| commit_uncertain) {
        vm.mark_user_paused();
    }
    JobResult::Failed {
        error,
        commit_uncertain,
        postcopy_paused: false,
    }
}

/// Sets the VM's vCPU throttle back to 0 when dropped: the guest never
/// stays slowed by a send, however it ended (completed, failed, cancelled,
/// or the send thread panicked). The sender resets it too; this guard
/// covers what the sender cannot (a panic, a bug in its own reset).
///
/// Invariant: lives on the send thread for the whole send, and drops
/// before the job reports its end.
pub(crate) struct ThrottleReset<'a>(pub(crate) &'a Vm);

impl Drop for ThrottleReset<'_> {
    fn drop(&mut self) {
        let pct = self.0.throttle();
        if pct == 0 {
            return;
        }
        match self.0.set_throttle(0) {
            Ok(()) => {
                info!("the migration ended with the vCPUs throttled {pct}%; throttle removed")
            }
            Err(e) => log::error!("removing the vCPU throttle: {e}"),
        }
    }
}

/// Records the end of a job and wakes the control loop.
fn finish(progress: &Mutex<Progress>, events: &EventSink, r: JobResult) {
    *progress.lock().unwrap_or_else(|p| p.into_inner()) = Progress::Ended(r);
    events.send(VmmEvent::JobEnded);
}

/// Starts sending `vm` with `params` (validated) on a worker thread.
pub fn start_send(vmm: &Arc<Vmm>, vm: Arc<Vm>, params: SendParams) -> Result<Job, StartError> {
    let job = Job::new(Direction::Send);
    let (stats, cancel, progress) = (job.stats.clone(), job.cancel.clone(), job.progress.clone());
    let events = vmm.event_sink();
    let hooks = vmm.hooks().clone();
    // The migration logs its own start, passes, switch-over and end.
    log::debug!(
        "sending the VM to {} over {} connection(s)",
        params.destination_url,
        params.connections
    );
    std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            let src = Arc::new(SourceAdapter::new(vm.clone()));
            let throttle = ThrottleReset(&vm);
            let r = guarded(Some(&vm), || {
                match migration::send_with(src, &params, &stats, &cancel, &hooks) {
                    Ok(()) => {
                        log::debug!("migration completed; the VM now runs on the destination");
                        JobResult::Completed
                    }
                    Err(e) if e.keeps_vm_paused() => {
                        // Recovery: the guest may run on the destination, so it
                        // stays paused here; the user decides (vm.resume or
                        // vm.shutdown), or, for an interrupted post-copy, a
                        // send with "resume": true finishes it.
                        vm.mark_user_paused();
                        log::error!("{e}");
                        JobResult::Failed {
                            error: e.to_string(),
                            commit_uncertain: true,
                            postcopy_paused: matches!(
                                e,
                                migration::MigrationError::PostcopyPaused { .. }
                            ),
                        }
                    }
                    Err(e) => {
                        warn!("migration failed: {e}; the VM keeps running here");
                        JobResult::Failed {
                            error: e.to_string(),
                            commit_uncertain: false,
                            postcopy_paused: false,
                        }
                    }
                }
            });
            drop(throttle);
            finish(&progress, &events, r);
        })
        .map_err(StartError::Spawn)?;
    Ok(job)
}

/// Binds `addr` (TCP or `unix:`) and starts receiving a VM into `vmm` on a worker thread.
pub fn start_receive(
    vmm: &Arc<Vmm>,
    addr: ListenAddr,
    params: ReceiveParams,
) -> Result<Job, StartError> {
    let listener = addr.bind().map_err(|source| StartError::Bind {
        url: params.receiver_url.clone(),
        source,
    })?;
    let job = Job::new(Direction::Receive);
    let (stats, cancel, progress) = (job.stats.clone(), job.cancel.clone(), job.progress.clone());
    let events = vmm.event_sink();
    let factory = DestFactory::new(vmm.clone());
    let hooks = vmm.hooks().clone();
    info!("waiting for a migration on {addr}");
    std::thread::Builder::new()
        .name("migration-recv".into())
        .spawn(move || {
            let r = guarded(None, || {
                match migration::receive_with(listener, &factory, &params, &stats, &cancel, &hooks)
                {
                    Ok(_) => {
                        log::debug!("migration received; the VM runs here now");
                        JobResult::Completed
                    }
                    Err(e) => {
                        warn!("receiving a migration failed: {e}");
                        JobResult::Failed {
                            error: e.to_string(),
                            commit_uncertain: false,
                            postcopy_paused: false,
                        }
                    }
                }
            });
            finish(&progress, &events, r);
        })
        .map_err(StartError::Spawn)?;
    Ok(job)
}

#[cfg(test)]
mod guarded_tests {
    use super::{guarded, JobResult};

    #[test]
    fn a_panicking_job_fails_with_its_message() {
        let r = guarded(None, || panic!("backend exploded"));
        match r {
            JobResult::Failed {
                error,
                commit_uncertain,
                ..
            } => {
                assert!(error.contains("backend exploded"), "{error}");
                assert!(!commit_uncertain);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            guarded(None, || JobResult::Completed),
            JobResult::Completed
        ));
    }
}
