//! The VMM of one `ferry` process: its VM (if any), its migration job, and
//! its life cycle ([`Lifecycle`]). Requests from the API are executed here
//! ([`Vmm::execute`], on the control loop's thread); when the process ends
//! is decided by the control loop ([`crate::control`]) from what this
//! module reports.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use log::{info, warn};

use crate::config::VmmConfig;
use crate::control::{EventSink, EventSource};
use crate::device_set::{validate_args, DeviceSet};
use crate::jobs::migration::{Direction, Job, JobResult, Progress};
use crate::memory::GuestRam;
use crate::vcpu::VmEnd;
use crate::vm::{Vm, VmDescription, VmShell};

/// With `--exit-after-migration`: how long a source waits, after a
/// completed send, for someone to read `vm.migration` before it exits
/// anyway (it exits right after the first read that reports completion).
pub const EXIT_GRACE: Duration = Duration::from_millis(1500);

/// Why `ferry` could not run; decides the exit code.
///
/// Invariant: `BadInput` is reserved for problems with what the user gave
/// (exit code 2); everything else is `Failed` (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Refused input (kernel, initramfs, devices, socket path...).
    #[error("{0}")]
    BadInput(String),
    /// The host or KVM failed.
    #[error("{0}")]
    Failed(String),
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::BadInput(_) => 2,
            RunError::Failed(_) => 1,
        }
    }
}

/// Where the VMM is in its life.
///
/// Invariant: the VM named by a variant is the VMM's VM: its "VM ended"
/// events end the process; every other VM's are ignored. A variant
/// changes only under the VMM's lock.
pub enum Lifecycle {
    /// No VM: an API-only VMM waiting for requests, or after `vm.shutdown`.
    Empty,
    /// A receive job runs and its VM has not started yet.
    Receiving,
    /// The VM runs here (or is paused by the user).
    Active(Arc<Vm>),
    /// A send job runs.
    Sending(Arc<Vm>),
    /// A send failed after COMMIT: the guest may run on the destination, so
    /// the VM is held paused here (devices in STOP) until the user resumes
    /// it (taking responsibility that the destination did not start it) or
    /// shuts it down. No new send is accepted.
    CommitUncertain(Arc<Vm>),
    /// A post-copy was interrupted: the guest runs on the destination and
    /// waits for pages only this VM holds. The VM stays paused (it must
    /// never run here again); a send with `"resume": true` finishes the
    /// migration.
    PostcopyPaused(Arc<Vm>),
    /// A send completed at `since` (QEMU's postmigrate): the VM stays paused
    /// for good (its vCPUs never run here again; `vm.resume` is refused),
    /// and the VMM keeps serving its API (the final `vm.migration` record)
    /// until `vmm.shutdown`. With `--exit-after-migration` the process
    /// exits instead once the completion was read or [`EXIT_GRACE`] passed.
    MigratedOut {
        /// The sent VM.
        vm: Arc<Vm>,
        /// When the job ended.
        since: Instant,
    },
}

impl Lifecycle {
    /// The VMM's VM, if any.
    pub fn vm(&self) -> Option<&Arc<Vm>> {
        match self {
            Lifecycle::Empty | Lifecycle::Receiving => None,
            Lifecycle::Active(vm)
            | Lifecycle::Sending(vm)
            | Lifecycle::CommitUncertain(vm)
            | Lifecycle::PostcopyPaused(vm)
            | Lifecycle::MigratedOut { vm, .. } => Some(vm),
        }
    }

    /// The `state` string of `vm.info` (for a VMM with a VM).
    pub fn vm_state(&self, user_paused: bool) -> &'static str {
        match self {
            Lifecycle::MigratedOut { .. } => "migrated",
            Lifecycle::PostcopyPaused(_) => "postcopy-paused",
            Lifecycle::Sending(_) => "migrating",
            _ if user_paused => "paused",
            _ => "running",
        }
    }
}

/// Mutable VMM state.
///
/// Invariant: `job` is the current or last migration; while it runs,
/// `state` is `Sending` (a send) or `Receiving`/`Active` (a receive, before
/// and after its VM started), unless the user shut the VM down.
pub struct Inner {
    /// Where the VMM is in its life.
    pub state: Lifecycle,
    /// The current or last migration.
    pub job: Option<Job>,
}

impl Inner {
    /// Moves the life cycle on once the current job has ended; does nothing
    /// while it runs or once applied (each step leaves the state it
    /// matches).
    pub fn reap_job(&mut self) {
        let Some(job) = &self.job else { return };
        let Progress::Ended(result) = job.progress() else {
            return;
        };
        let state = std::mem::replace(&mut self.state, Lifecycle::Empty);
        self.state = match (job.direction, state, result) {
            (Direction::Send, Lifecycle::Sending(vm), JobResult::Completed) => {
                Lifecycle::MigratedOut {
                    vm,
                    since: Instant::now(),
                }
            }
            (
                Direction::Send,
                Lifecycle::Sending(vm),
                JobResult::Failed {
                    postcopy_paused: true,
                    ..
                },
            ) => Lifecycle::PostcopyPaused(vm),
            (
                Direction::Send,
                Lifecycle::Sending(vm),
                JobResult::Failed {
                    commit_uncertain: true,
                    ..
                },
            ) => Lifecycle::CommitUncertain(vm),
            (Direction::Send, Lifecycle::Sending(vm), JobResult::Failed { .. }) => {
                Lifecycle::Active(vm)
            }
            (Direction::Receive, Lifecycle::Receiving, _) => Lifecycle::Empty,
            (_, other, _) => other,
        };
    }
}

/// What an API-only VMM started with `--memory` prepares for an incoming
/// migration, on a background thread so that the API is up at once: the
/// RAM (faulted in with `prefault=on`), and a KVM VM with its memory slots
/// over it ([`VmShell`]), whose cost grows with the guest's size and would
/// otherwise fall inside the migration.
///
/// Invariant: `done` becomes true once, when the thread finished
/// (successfully or not); the RAM is usable either way, and `shell`, if
/// any, maps exactly this RAM.
pub struct Provisioned {
    ram: GuestRam,
    shell: Mutex<Option<VmShell>>,
    done: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Provisioned {
    /// Maps `cfg`'s memory and starts preparing it on a thread.
    fn start(cfg: &crate::config::MemoryConfig) -> Result<Arc<Provisioned>, RunError> {
        let ram = GuestRam::new(cfg).map_err(|e| RunError::Failed(e.to_string()))?;
        let p = Arc::new(Provisioned {
            ram,
            shell: Mutex::new(None),
            done: Mutex::new(false),
            cv: std::sync::Condvar::new(),
        });
        let q = p.clone();
        let (size, prefault) = (cfg.size, cfg.prefault);
        std::thread::Builder::new()
            .name("provision".into())
            .spawn(move || {
                let t = Instant::now();
                match VmShell::new(q.ram.clone()) {
                    Ok(shell) => {
                        *q.shell.lock().unwrap_or_else(|p| p.into_inner()) = Some(shell);
                        info!(
                            "KVM VM of {} MiB prepared for an incoming migration in {:?}",
                            size >> 20,
                            t.elapsed()
                        );
                    }
                    Err(e) => warn!(
                        "preparing the KVM VM for an incoming migration: {e}; it will be made \
                         when the migration arrives"
                    ),
                }
                if prefault {
                    match q.ram.prefault() {
                        Ok(()) => info!(
                            "{} MiB of RAM provisioned for an incoming migration",
                            size >> 20
                        ),
                        Err(e) => warn!("{e}; pages will be faulted in on first use"),
                    }
                }
                *q.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
                q.cv.notify_all();
            })
            .map_err(|e| RunError::Failed(format!("spawning the provisioning thread: {e}")))?;
        Ok(p)
    }

    /// Waits until the thread finished.
    fn wait(&self) {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*d {
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// The VMM of one `ferry` process.
///
/// Invariant: `provisioned` is the RAM prepared at start (API-only VMM with
/// `--memory`), shared by every VM received into it;
/// `events` reaches this VMM's control loop.
pub struct Vmm {
    cfg: VmmConfig,
    events: EventSink,
    /// Migration parameters (defaults between migrations, live during one)
    /// and the event log of `vm.events`; they live as long as the VMM.
    hooks: migration::Hooks,
    inner: Mutex<Inner>,
    provisioned: Option<Arc<Provisioned>>,
}

impl Vmm {
    /// The live migration parameters and the event log.
    pub fn hooks(&self) -> &migration::Hooks {
        &self.hooks
    }

    /// A VMM without VM for `cfg`, and the loop side of its event channel.
    /// RAM is pre-provisioned (in the background) for an API-only VMM
    /// started with `--memory` (and faulted in with `prefault=on`).
    pub fn new(cfg: VmmConfig) -> Result<(Arc<Vmm>, EventSource), RunError> {
        let (sink, source) = crate::control::event_channel()
            .map_err(|e| RunError::Failed(format!("creating the event channel: {e}")))?;
        let provisioned = if cfg.boot.is_none() && cfg.memory_explicit {
            Some(Provisioned::start(&cfg.memory)?)
        } else {
            None
        };
        let hooks = migration::Hooks {
            host: Some(Arc::new(crate::host::HostResources::new(
                cfg.migration_registry.clone(),
            ))),
            host_max_mib_s: cfg.host_migration_bandwidth_mib_s,
            ..Default::default()
        };
        let vmm = Arc::new(Vmm {
            cfg,
            hooks,
            events: sink,
            inner: Mutex::new(Inner {
                state: Lifecycle::Empty,
                job: None,
            }),
            provisioned,
        });
        Ok((vmm, source))
    }

    /// The validated command line.
    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    /// Locks the mutable state.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where events for the control loop go.
    pub fn event_sink(&self) -> EventSink {
        self.events.clone()
    }

    /// Pre-provisioned RAM, if any; waits until it is prepared.
    pub fn provisioned_ram(&self) -> Option<GuestRam> {
        self.provisioned.as_ref().map(|p| {
            p.wait();
            p.ram.clone()
        })
    }

    /// The prepared KVM VM over the provisioned RAM, once: the first VM
    /// received takes it; later ones (after a failed attempt) make their
    /// own.
    pub fn take_vm_shell(&self) -> Option<VmShell> {
        let p = self.provisioned.as_ref()?;
        p.wait();
        let mut shell = p.shell.lock().unwrap_or_else(|p| p.into_inner());
        shell.take()
    }

    /// Whether RAM was pre-provisioned (without waiting for it).
    pub fn has_provisioned_ram(&self) -> bool {
        self.provisioned.is_some()
    }

    /// Whether this process booted its own VM (`--kernel`).
    pub fn booted(&self) -> bool {
        self.cfg.boot.is_some()
    }

    /// Makes a received VM this VMM's VM (before its vCPUs start).
    pub fn install_received_vm(&self, vm: Arc<Vm>) {
        self.lock().state = Lifecycle::Active(vm);
    }

    /// Forgets VM `id` if it is this VMM's VM (a received VM discarded by
    /// its still running job).
    pub fn uninstall_vm(&self, id: u64) {
        let mut g = self.lock();
        if g.state.vm().is_some_and(|v| v.id == id) {
            g.state = Lifecycle::Receiving;
        }
    }

    /// Stops and forgets the VM (`vm.shutdown`), cancelling a running job.
    /// Pre-provisioned RAM is zeroed for the next receive.
    pub fn shutdown_vm(&self) -> Result<(), String> {
        let vm = {
            let mut g = self.lock();
            if let Some(job) = &g.job {
                if job.running() {
                    job.cancel.cancel();
                }
            }
            let vm = g
                .state
                .vm()
                .cloned()
                .ok_or_else(|| "no VM has been created".to_string())?;
            g.state = Lifecycle::Empty;
            vm
        };
        vm.stop();
        if self.has_provisioned_ram() {
            vm.ram().zero();
        }
        info!("VM {} shut down", vm.id);
        Ok(())
    }

    /// What the end of VM `vm_id` means for the process: the exit code, or
    /// `None` if that VM is not this VMM's VM.
    pub fn vm_ended(&self, vm_id: u64, end: VmEnd) -> Option<i32> {
        let current = self.lock().state.vm().map(|v| v.id);
        if current != Some(vm_id) {
            info!("ignoring the end of VM {vm_id}, not the current VM");
            return None;
        }
        match end {
            VmEnd::Reset(why) => {
                info!("guest ended the VM ({why}); exiting");
                Some(0)
            }
            VmEnd::Error(msg) => {
                log::error!("the VM ended with an error: {msg}");
                Some(1)
            }
        }
    }

    /// Applies the end of the current job to the life cycle.
    pub fn reap_job(&self) {
        self.lock().reap_job();
    }

    /// When the process must exit on its own (with
    /// `--exit-after-migration`, a completed send whose status nobody
    /// read), if it must.
    pub fn exit_deadline(&self) -> Option<Instant> {
        if !self.cfg.exit_after_migration {
            return None;
        }
        match &self.lock().state {
            Lifecycle::MigratedOut { since, .. } => Some(*since + EXIT_GRACE),
            _ => None,
        }
    }
}

fn run_error(e: crate::vm::VmError) -> RunError {
    if e.is_bad_input() {
        RunError::BadInput(e.to_string())
    } else {
        RunError::Failed(e.to_string())
    }
}

/// Creates and boots the VM of `--kernel`, if given; its vCPUs do not run.
pub(crate) fn build_boot_vm(vmm: &Vmm) -> Result<Option<Arc<Vm>>, RunError> {
    let cfg = &vmm.cfg;
    let Some(boot) = &cfg.boot else {
        return Ok(None);
    };
    let specs =
        validate_args(&cfg.sim_vfio, &cfg.vfio).map_err(|e| RunError::BadInput(e.to_string()))?;
    let devices = DeviceSet::create(&specs, true).map_err(|e| RunError::BadInput(e.to_string()))?;
    let ram = GuestRam::new(&cfg.memory).map_err(|e| RunError::Failed(e.to_string()))?;
    if cfg.memory.prefault {
        ram.prefault()
            .map_err(|e| RunError::Failed(e.to_string()))?;
    }
    let serial = cfg
        .serial
        .clone()
        .unwrap_or(crate::config::SerialConfig::Tty);
    let desc = VmDescription {
        boot: Some(boot.clone()),
        serial: serial.clone(),
        migrated_in: false,
    };
    let vm =
        Vm::create(ram, cfg.cpus, serial, desc, devices, vmm.event_sink()).map_err(run_error)?;
    vm.boot(boot).map_err(run_error)?;
    let vm = Arc::new(vm);
    vmm.lock().state = Lifecycle::Active(vm.clone());
    Ok(Some(vm))
}
