//! vCPU threads: the KVM_RUN loop, exit handling, and pause/resume.
//!
//! Each vCPU runs on its own thread holding its `VcpuFd` lock while it runs.
//! Pausing sets a flag, writes `immediate_exit` into the vCPU's `kvm_run`
//! and kicks the thread with a real-time signal whose handler does nothing;
//! the thread completes any pending I/O (one more KVM_RUN with
//! `immediate_exit` set), releases its `VcpuFd` and parks on a condvar.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, warn};

use crate::pio::{PioAction, PioBus};
use crate::VmmEvent;

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler of [`kick_signal`]; idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    })
    .map_err(std::io::Error::from_raw_os_error)
}

/// Why a VM ended by itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// The guest asked for a reset or shutdown (i8042, triple fault, PSCI-like
    /// system event). `ferry` exits 0.
    Reset(String),
    /// KVM could not run the guest. `ferry` exits non-zero.
    Error(String),
}

/// One vCPU.
///
/// Invariant: `run_ptr` points at the `kvm_run` mapping of `fd`, valid as
/// long as this object lives; `pthread` is set once the thread is spawned
/// and `alive` is true exactly while that thread runs its loop.
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub id: u8,
    fd: Mutex<VcpuFd>,
    run_ptr: usize,
    pthread: Mutex<Option<libc::pthread_t>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    alive: AtomicBool,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Wraps a created vCPU fd.
    pub fn new(id: u8, mut fd: VcpuFd) -> Vcpu {
        let run_ptr = fd.get_kvm_run() as *mut kvm_run as usize;
        Vcpu {
            id,
            fd: Mutex::new(fd),
            run_ptr,
            pthread: Mutex::new(None),
            thread: Mutex::new(None),
            alive: AtomicBool::new(false),
        }
    }

    /// Locks the vCPU fd. Blocks while the vCPU thread runs guest code, so
    /// callers must pause the VM first (or the thread must not be started).
    pub fn lock(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the thread runs its loop.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn kick(&self) {
        // SAFETY: run_ptr is the live kvm_run mapping of our fd (invariant);
        // a volatile byte store to immediate_exit is how KVM expects it to be
        // set, and the vCPU thread re-reads it on every KVM_RUN.
        unsafe {
            let run = self.run_ptr as *mut kvm_run;
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1);
        }
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.is_alive() {
            return;
        }
        if let Some(t) = *self.pthread.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: t is the pthread of our vCPU thread, which is never
            // joined while the Vcpu can still be kicked (join happens in
            // `join`, after the loop ended).
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Joins the thread if it has ended or was told to stop.
    pub fn join(&self) {
        let h = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = h {
            if h.join().is_err() {
                warn!("vCPU {} thread panicked", self.id);
            }
        }
    }
}

#[derive(Debug, Default)]
struct CtlState {
    paused: bool,
    stop: bool,
    parked: usize,
    alive: usize,
}

/// Run control shared by the vCPUs of one VM.
///
/// Invariant: `parked <= alive`; when `paused` is set and `parked == alive`
/// no vCPU thread executes guest code.
#[derive(Debug, Default)]
pub struct RunControl {
    pause_flag: AtomicBool,
    state: Mutex<CtlState>,
    cv: Condvar,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, CtlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a pause (or stop) was requested.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Requests a pause (`start_paused` for threads not yet started).
    pub fn set_paused(&self, paused: bool) {
        let mut s = self.lock();
        s.paused = paused;
        self.pause_flag.store(paused || s.stop, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Pauses every vCPU; returns once none runs guest code.
    pub fn pause(&self, vcpus: &[Arc<Vcpu>]) {
        {
            let mut s = self.lock();
            s.paused = true;
            self.pause_flag.store(true, Ordering::SeqCst);
            if s.parked >= s.alive {
                return;
            }
        }
        let start = std::time::Instant::now();
        loop {
            for v in vcpus {
                v.kick();
            }
            let s = self.lock();
            let (s, _) = self
                .cv
                .wait_timeout_while(s, Duration::from_millis(2), |s| s.parked < s.alive)
                .unwrap_or_else(|p| p.into_inner());
            if s.parked >= s.alive {
                break;
            }
        }
        debug!("vCPUs paused in {:?}", start.elapsed());
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.set_paused(false);
    }

    /// Tells every vCPU thread to end, kicks them, and joins them.
    pub fn stop(&self, vcpus: &[Arc<Vcpu>]) {
        {
            let mut s = self.lock();
            s.stop = true;
            self.pause_flag.store(true, Ordering::SeqCst);
            self.cv.notify_all();
        }
        loop {
            for v in vcpus {
                v.kick();
            }
            let s = self.lock();
            let (s, _) = self
                .cv
                .wait_timeout_while(s, Duration::from_millis(5), |s| s.alive > 0)
                .unwrap_or_else(|p| p.into_inner());
            if s.alive == 0 {
                break;
            }
        }
        for v in vcpus {
            v.join();
        }
    }

    /// Parks the calling vCPU thread while paused; returns `false` if the
    /// thread must end.
    fn park(&self) -> bool {
        let mut s = self.lock();
        s.parked += 1;
        self.cv.notify_all();
        while s.paused && !s.stop {
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
        !s.stop
    }
}

/// What a vCPU thread needs besides its own fd.
///
/// Invariant: `vm_id` identifies the VM in events sent to the VMM.
#[derive(Clone)]
pub struct VcpuContext {
    /// Id of the VM in [`VmmEvent`]s.
    pub vm_id: u64,
    /// Run control of the VM.
    pub ctl: Arc<RunControl>,
    /// Port I/O devices.
    pub pio: Arc<PioBus>,
    /// Where the end of the VM is reported.
    pub events: Sender<VmmEvent>,
}

enum Handled {
    /// Keep running; `true` if KVM must be re-entered to complete an access.
    Continue(bool),
    End(VmEnd),
}

fn handle_exit(exit: VcpuExit<'_>, pio: &PioBus) -> Handled {
    match exit {
        VcpuExit::IoIn(port, data) => {
            pio.io_in(port, data);
            Handled::Continue(true)
        }
        VcpuExit::IoOut(port, data) => match pio.io_out(port, data) {
            PioAction::Continue => Handled::Continue(true),
            PioAction::End(why) => Handled::End(VmEnd::Reset(why.into())),
        },
        VcpuExit::MmioRead(_, data) => {
            data.fill(0);
            Handled::Continue(true)
        }
        VcpuExit::MmioWrite(..) => Handled::Continue(true),
        VcpuExit::Hlt => Handled::Continue(false),
        VcpuExit::Shutdown => Handled::End(VmEnd::Reset("triple fault (KVM_EXIT_SHUTDOWN)".into())),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                Handled::End(VmEnd::Reset("system event: shutdown".into()))
            }
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                Handled::End(VmEnd::Reset("system event: reset".into()))
            }
            kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                Handled::End(VmEnd::Error("guest crashed (system event)".into()))
            }
            other => {
                debug!("ignoring system event {other}");
                Handled::Continue(false)
            }
        },
        VcpuExit::InternalError => Handled::End(VmEnd::Error("KVM internal error".into())),
        VcpuExit::FailEntry(reason, cpu) => Handled::End(VmEnd::Error(format!(
            "KVM entry failure (hardware reason {reason:#x} on host cpu {cpu})"
        ))),
        VcpuExit::IrqWindowOpen | VcpuExit::Intr => Handled::Continue(false),
        other => Handled::End(VmEnd::Error(format!("unexpected vCPU exit {other:?}"))),
    }
}

fn describe_error(fd: &mut VcpuFd, vcpu: u8, what: &str) -> String {
    let suberror = {
        let run = fd.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` union member is valid.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            match internal.suberror {
                kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => " (emulation failure)".to_string(),
                s => format!(" (suberror {s})"),
            }
        } else {
            String::new()
        }
    };
    match fd.get_regs() {
        Ok(r) => format!("vCPU {vcpu}: {what}{suberror} at RIP {:#x}", r.rip),
        Err(e) => format!("vCPU {vcpu}: {what}{suberror} (RIP unavailable: {e})"),
    }
}

/// Spawns the thread of `vcpu`. The thread parks first if the VM is paused.
pub fn spawn(vcpu: Arc<Vcpu>, ctx: VcpuContext) -> std::io::Result<()> {
    {
        let mut s = ctx.ctl.lock();
        s.alive += 1;
    }
    vcpu.alive.store(true, Ordering::SeqCst);
    let v = vcpu.clone();
    let c = ctx.clone();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{}", vcpu.id))
        .spawn(move || {
            run_loop(&v, &c);
            v.alive.store(false, Ordering::SeqCst);
            let mut s = c.ctl.lock();
            s.alive -= 1;
            c.ctl.cv.notify_all();
        });
    match handle {
        Ok(h) => {
            use std::os::unix::thread::JoinHandleExt;
            *vcpu.pthread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.as_pthread_t());
            *vcpu.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
            Ok(())
        }
        Err(e) => {
            vcpu.alive.store(false, Ordering::SeqCst);
            let mut s = ctx.ctl.lock();
            s.alive -= 1;
            ctx.ctl.cv.notify_all();
            Err(e)
        }
    }
}

fn run_loop(vcpu: &Vcpu, ctx: &VcpuContext) {
    let mut fd = vcpu.lock();
    let mut pending = false;
    loop {
        if ctx.ctl.pause_flag.load(Ordering::SeqCst) {
            // Complete a pending I/O or MMIO access without running further
            // guest instructions, so that the saved state is consistent.
            fd.set_kvm_immediate_exit(1);
            let mut rounds = 0;
            while pending && rounds < 64 {
                rounds += 1;
                pending = match fd.run() {
                    Ok(exit) => match handle_exit(exit, &ctx.pio) {
                        Handled::Continue(p) => p,
                        Handled::End(end) => {
                            report_end(vcpu, ctx, &mut fd, end);
                            return;
                        }
                    },
                    Err(_) => false,
                };
            }
            fd.set_kvm_immediate_exit(0);
            drop(fd);
            if !ctx.ctl.park() {
                return;
            }
            fd = vcpu.lock();
            continue;
        }
        match fd.run() {
            Ok(exit) => match handle_exit(exit, &ctx.pio) {
                Handled::Continue(p) => pending = p,
                Handled::End(end) => {
                    report_end(vcpu, ctx, &mut fd, end);
                    return;
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                pending = false;
                // The kicker sets immediate_exit; clear it unless a pause is
                // still wanted (checked at the top of the loop).
                if !ctx.ctl.pause_flag.load(Ordering::SeqCst) {
                    fd.set_kvm_immediate_exit(0);
                }
            }
            Err(e) => {
                let msg = describe_error(&mut fd, vcpu.id, &format!("KVM_RUN failed: {e}"));
                report_end(vcpu, ctx, &mut fd, VmEnd::Error(msg));
                return;
            }
        }
    }
}

fn report_end(vcpu: &Vcpu, ctx: &VcpuContext, fd: &mut VcpuFd, end: VmEnd) {
    let end = match end {
        VmEnd::Error(msg) if !msg.starts_with("vCPU ") => {
            VmEnd::Error(describe_error(fd, vcpu.id, &msg))
        }
        e => e,
    };
    match &end {
        VmEnd::Reset(why) => info!("vCPU {}: guest ended the VM: {why}", vcpu.id),
        VmEnd::Error(msg) => error!("{msg}"),
    }
    // The receiver may be gone when the process is exiting; nothing to do then.
    let _ = ctx.events.send(VmmEvent::VmEnded {
        vm_id: ctx.vm_id,
        end,
    });
}
