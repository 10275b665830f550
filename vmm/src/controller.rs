//! The VMM process: owns the VM (if any), the migration job, the API
//! server, and the main loop that decides when the process exits.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use log::{info, warn};
use migration::{CancelToken, MigrationStats};

use crate::config::VmmConfig;
use crate::device_set::{validate_args, DeviceSet};
use crate::memory::GuestRam;
use crate::vcpu::VmEnd;
use crate::vm::{Vm, VmDescription};
use crate::VmmEvent;

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

/// Direction of a migration job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This VMM sends its VM.
    Send,
    /// This VMM receives a VM.
    Receive,
}

/// A migration started through the API.
///
/// Invariant: `outcome` is `None` exactly while the worker thread runs.
pub struct Job {
    /// Send or receive.
    pub direction: Direction,
    /// Live counters.
    pub stats: Arc<MigrationStats>,
    /// Cancel flag.
    pub cancel: CancelToken,
    /// Final result, set by the worker.
    pub outcome: Arc<Mutex<Option<Result<(), String>>>>,
}

impl Job {
    /// Whether the worker still runs.
    pub fn running(&self) -> bool {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }
}

/// Mutable VMM state.
///
/// Invariant: `vm` is the VM whose events end the process; `migrated_out`
/// is set once a send completed (the VM stays paused for good).
#[derive(Default)]
pub struct Inner {
    /// The VM, if one exists.
    pub vm: Option<Arc<Vm>>,
    /// The current or last migration.
    pub job: Option<Job>,
    /// A send completed.
    pub migrated_out: bool,
    /// A completed send was reported through `vm.migration`.
    pub completion_reported: bool,
    /// A send failed after COMMIT: the guest may run on the destination, so
    /// the VM is held paused here (devices in STOP) until the user resumes it
    /// (taking responsibility that the destination did not start it) or
    /// shuts it down. No new send is accepted while this is set.
    pub commit_uncertain: bool,
}

/// RAM provisioned at start for incoming migrations, faulted in by a
/// background thread so that the API is up at once.
///
/// Invariant: `done` becomes true once, when the prefault thread finished
/// (successfully or not); the RAM is usable either way.
pub struct Provisioned {
    ram: GuestRam,
    done: Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Provisioned {
    /// Maps `cfg`'s memory and starts faulting it in on a thread.
    fn start(cfg: &crate::config::MemoryConfig) -> Result<Arc<Provisioned>, RunError> {
        let ram = GuestRam::new(cfg).map_err(|e| RunError::Failed(e.to_string()))?;
        let p = Arc::new(Provisioned {
            ram,
            done: Mutex::new(false),
            cv: std::sync::Condvar::new(),
        });
        let q = p.clone();
        let size = cfg.size;
        std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                match q.ram.prefault() {
                    Ok(()) => info!(
                        "{} MiB of RAM provisioned for an incoming migration",
                        size >> 20
                    ),
                    Err(e) => warn!("{e}; pages will be faulted in on first use"),
                }
                *q.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
                q.cv.notify_all();
            })
            .map_err(|e| RunError::Failed(format!("spawning the prefault thread: {e}")))?;
        Ok(p)
    }

    /// The RAM, once faulted in.
    fn wait(&self) -> GuestRam {
        let mut d = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*d {
            d = self.cv.wait(d).unwrap_or_else(|p| p.into_inner());
        }
        self.ram.clone()
    }
}

/// The VMM of one `ferry` process.
///
/// Invariant: `provisioned` is RAM faulted in at start (API-only VMM with
/// `--memory ...,prefault=on`), shared by every VM received into it.
pub struct Vmm {
    cfg: VmmConfig,
    events: Sender<VmmEvent>,
    inner: Mutex<Inner>,
    provisioned: Option<Arc<Provisioned>>,
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_term(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(num, Ordering::SeqCst);
}

impl Vmm {
    /// A VMM without VM for `cfg`, and the receiver of its events. RAM is
    /// pre-provisioned (in the background) for an API-only VMM started with
    /// `--memory ...,prefault=on`.
    pub fn new(cfg: VmmConfig) -> Result<(Arc<Vmm>, Receiver<VmmEvent>), RunError> {
        let (tx, rx) = channel();
        let provisioned = if cfg.boot.is_none() && cfg.memory_explicit && cfg.memory.prefault {
            Some(Provisioned::start(&cfg.memory)?)
        } else {
            None
        };
        let vmm = Arc::new(Vmm {
            cfg,
            events: tx,
            inner: Mutex::new(Inner::default()),
            provisioned,
        });
        Ok((vmm, rx))
    }

    /// The validated command line.
    pub fn config(&self) -> &VmmConfig {
        &self.cfg
    }

    /// Locks the mutable state.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A sender for [`VmmEvent`]s.
    pub fn event_sender(&self) -> Sender<VmmEvent> {
        self.events.clone()
    }

    /// Pre-provisioned RAM, if any; waits until it is faulted in.
    pub fn provisioned_ram(&self) -> Option<GuestRam> {
        self.provisioned.as_ref().map(|p| p.wait())
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
        self.lock().vm = Some(vm);
    }

    /// Forgets VM `id` if it is this VMM's VM.
    pub fn uninstall_vm(&self, id: u64) {
        let mut g = self.lock();
        if g.vm.as_ref().is_some_and(|v| v.id == id) {
            g.vm = None;
        }
    }

    /// Asks the main loop to exit with `code`.
    pub fn request_exit(&self, code: i32) {
        let _ = self.events.send(VmmEvent::Exit(code));
    }

    /// Stops and forgets the VM (`vm.shutdown`). Pre-provisioned RAM is
    /// zeroed for the next receive.
    pub fn shutdown_vm(&self) -> Result<(), String> {
        let vm = {
            let mut g = self.lock();
            if let Some(job) = &g.job {
                if job.running() {
                    job.cancel.cancel();
                }
            }
            g.vm.take()
                .ok_or_else(|| "no VM has been created".to_string())?
        };
        vm.stop();
        if self.has_provisioned_ram() {
            vm.ram().zero();
        }
        info!("VM {} shut down", vm.id);
        Ok(())
    }

    fn handle_event(&self, ev: VmmEvent) -> Option<i32> {
        match ev {
            VmmEvent::Exit(code) => Some(code),
            VmmEvent::VmEnded { vm_id, end } => {
                let current = self.lock().vm.as_ref().map(|v| v.id);
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
                        eprintln!("ferry: error: {msg}");
                        Some(1)
                    }
                }
            }
        }
    }
}

fn build_boot_vm(vmm: &Vmm) -> Result<Option<Arc<Vm>>, RunError> {
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
    let vm = Vm::create(ram, cfg.cpus, serial, desc, devices, vmm.event_sender()).map_err(|e| {
        if e.is_bad_input() {
            RunError::BadInput(e.to_string())
        } else {
            RunError::Failed(e.to_string())
        }
    })?;
    vm.boot(boot).map_err(|e| {
        if e.is_bad_input() {
            RunError::BadInput(e.to_string())
        } else {
            RunError::Failed(e.to_string())
        }
    })?;
    Ok(Some(Arc::new(vm)))
}

fn install_term_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(sig, on_term) {
            warn!("cannot handle signal {sig}: {e}");
        }
    }
}

fn main_loop(vmm: &Vmm, rx: &Receiver<VmmEvent>) -> i32 {
    loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            info!("signal {sig} received; exiting");
            return 128 + sig;
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(ev) => {
                if let Some(code) = vmm.handle_event(ev) {
                    return code;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return 1,
        }
    }
}

/// Runs a VMM for `cfg` until it should exit; returns the exit code.
///
/// Order: API socket, VM (memory, devices, kernel), vCPU threads, then the
/// main loop. Errors before the VM runs are returned (bad input: exit 2).
pub fn run(cfg: VmmConfig) -> Result<i32, RunError> {
    let (vmm, rx) = Vmm::new(cfg)?;
    install_term_handlers();
    // The VM exists before the API answers, so that `vm.info` works as soon
    // as `vmm.ping` does.
    let booted = build_boot_vm(&vmm)?;
    if let Some(vm) = &booted {
        vmm.lock().vm = Some(vm.clone());
    }
    let api = match &vmm.cfg.api_socket {
        Some(path) => Some(
            crate::api::server::ApiServer::start(path, vmm.clone())
                .map_err(|e| RunError::BadInput(e.to_string()))?,
        ),
        None => None,
    };
    // Everything the user gave has been accepted: only now warn about the host.
    crate::warn_if_pvm();
    if let Some(vm) = booted {
        vm.start(false)
            .map_err(|e| RunError::Failed(e.to_string()))?;
    } else {
        info!("no kernel given: waiting for API requests");
    }
    let code = main_loop(&vmm, &rx);
    if let Some(api) = api {
        api.shutdown();
    }
    Ok(code)
}
