//! vCPU threads: each thread owns its `VcpuFd` and is driven by events.
//!
//! A vCPU thread is spawned when its VM is created and takes its `VcpuFd`
//! by value: nothing else ever touches the fd. Other threads talk to it
//! through a [`VcpuHandle`]: an event channel ([`VcpuEvent`]: boot
//! registers, state save/restore, start, pause, resume, exit) and a
//! response channel ([`VcpuResponse`]). Each event gets exactly one
//! response, or the response channel closes because the thread ended.
//!
//! Kicking: the kick signal ([`kick_signal`]) is blocked on the vCPU thread
//! at all times except inside `KVM_RUN` (the thread hands KVM the mask to use
//! there with `KVM_SET_SIGNAL_MASK`). A kick that arrives while the thread
//! runs guest code makes `KVM_RUN` return `EINTR`; one that arrives just
//! before stays pending and makes the next `KVM_RUN` return `EINTR` at once.
//! The thread then consumes the pending kicks and reads its channel. No
//! other thread writes into the vCPU's `kvm_run`. The handle keeps the
//! thread's pthread id under a lock that the thread clears before it ends,
//! and joins only after that, so a kick never reaches an ended thread.

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, warn};

use crate::pio::{PioAction, PioBus};
use crate::state::{restore_vcpu, save_vcpu, StateError, VcpuState, VcpuStateSpec};
use crate::vm::{BootRegs, VmError};
use crate::VmmEvent;

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a no-op handler for [`kick_signal`] (vCPU threads keep the
/// signal blocked, so it only guards against its default action); idempotent.
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

/// A request to a vCPU thread.
///
/// Invariant: the thread answers each event with exactly one
/// [`VcpuResponse`] (in order), unless it ended.
pub enum VcpuEvent {
    /// Set the boot registers (before the VM starts).
    Boot(Box<BootRegs>),
    /// `KVM_SET_TSC_KHZ` (before the VM starts).
    SetTscKhz(u32),
    /// Save the vCPU state (paused or not started).
    SaveState,
    /// Restore a vCPU state (not started).
    RestoreState(Box<VcpuState>),
    /// Leave the "created" phase: run with these devices once resumed.
    Start(Arc<PioBus>),
    /// Stop running guest code (completing a pending I/O first).
    Pause,
    /// Run guest code again.
    Resume,
    /// End the thread.
    Exit,
}

/// The answer of a vCPU thread to one [`VcpuEvent`].
///
/// Invariant: the variant matches the event it answers, or is `Refused`.
pub enum VcpuResponse {
    /// Boot registers set (or why not).
    Booted(Result<(), VmError>),
    /// TSC frequency set (or why not).
    TscSet(Result<(), VmError>),
    /// The saved state (or why not).
    Saved(Result<Box<VcpuState>, VmError>),
    /// State restored (or why not).
    Restored(Result<(), StateError>),
    /// The thread has its devices and is paused.
    Started,
    /// No guest code runs on this vCPU.
    Paused,
    /// Guest code runs (or will run at once).
    Resumed,
    /// The thread ends now.
    Exited,
    /// The event does not fit the thread's phase.
    Refused(&'static str),
}

/// What a vCPU thread needs besides its own fd.
///
/// Invariant: `vm_id` identifies the VM in events sent to the VMM; `spec`
/// is the VM's choice of optional state, shared by all its vCPUs.
#[derive(Clone)]
pub struct VcpuContext {
    /// vCPU index (= APIC id).
    pub id: u8,
    /// Id of the VM in [`VmmEvent`]s.
    pub vm_id: u64,
    /// What a save or restore covers.
    pub spec: Arc<VcpuStateSpec>,
    /// Where the end of the VM is reported.
    pub events: Sender<VmmEvent>,
}

/// How long [`VcpuHandle`] waits for an answer to a pause or exit before it
/// kicks again (a guard: one kick is enough).
const REKICK: Duration = Duration::from_millis(50);

/// The pthread id of a live vCPU thread.
///
/// Invariant: `Some` exactly from the thread's first instruction of its
/// body until just before it returns; the thread clears it under the lock,
/// so whoever holds the lock and sees `Some` can signal a live thread.
#[derive(Default)]
struct KickTarget(Mutex<Option<libc::pthread_t>>);

impl KickTarget {
    fn set(&self, t: Option<libc::pthread_t>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    fn alive(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    fn kick(&self) {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *g {
            // SAFETY: `t` is the pthread id of a thread that has not yet
            // cleared it (invariant): the thread still runs, so the id is
            // valid. The signal is blocked there outside KVM_RUN, so it only
            // interrupts KVM_RUN or stays pending.
            let r = unsafe { libc::pthread_kill(t, kick_signal()) };
            if r != 0 {
                warn!("kicking a vCPU thread failed: errno {r}");
            }
        }
    }
}

/// The control side of one vCPU thread.
///
/// Invariant: `tx`/`rx` are the event and response channels of the thread
/// that `thread` joins; requests are strictly one event, one response, so a
/// handle is used by one requester at a time (`&mut self`).
pub struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuEvent>,
    rx: Receiver<VcpuResponse>,
    target: Arc<KickTarget>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for VcpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuHandle").field("id", &self.id).finish()
    }
}

impl VcpuHandle {
    /// Spawns the thread of vCPU `ctx.id`, moving `fd` into it. The thread
    /// starts in the "created" phase (no guest code runs until
    /// [`VcpuEvent::Start`] and [`VcpuEvent::Resume`]).
    pub fn spawn(fd: VcpuFd, ctx: VcpuContext) -> std::io::Result<VcpuHandle> {
        let (tx, events) = channel();
        let (responses, rx) = channel();
        let target = Arc::new(KickTarget::default());
        let t = target.clone();
        let id = ctx.id;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || thread_main(fd, ctx, events, responses, &t))?;
        Ok(VcpuHandle {
            id,
            tx,
            rx,
            target,
            thread: Some(thread),
        })
    }

    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Whether the thread runs (has not ended).
    pub fn is_alive(&self) -> bool {
        self.target.alive()
    }

    /// Queues `ev`; `false` if the thread has ended.
    pub fn send(&self, ev: VcpuEvent) -> bool {
        self.tx.send(ev).is_ok()
    }

    /// Interrupts `KVM_RUN` so that the thread reads its channel.
    pub fn kick(&self) {
        self.target.kick();
    }

    /// The response to the oldest unanswered event; `None` if the thread
    /// ended. With `kick`, kicks again while waiting (pause, exit).
    pub fn recv(&self, kick: bool) -> Option<VcpuResponse> {
        loop {
            match self.rx.recv_timeout(REKICK) {
                Ok(r) => return Some(r),
                Err(RecvTimeoutError::Disconnected) => return None,
                Err(RecvTimeoutError::Timeout) => {
                    if kick {
                        self.kick();
                    }
                }
            }
        }
    }

    /// Sends `ev` and waits for its response (no kick: for events that
    /// are only valid while no guest code runs).
    pub fn request(&self, ev: VcpuEvent) -> Option<VcpuResponse> {
        if !self.send(ev) {
            return None;
        }
        self.recv(false)
    }

    /// Sets the boot registers.
    pub fn boot(&self, regs: BootRegs) -> Result<(), VmError> {
        match self.request(VcpuEvent::Boot(Box::new(regs))) {
            Some(VcpuResponse::Booted(r)) => r,
            other => Err(self.unexpected(other)),
        }
    }

    /// Sets the TSC frequency.
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), VmError> {
        match self.request(VcpuEvent::SetTscKhz(khz)) {
            Some(VcpuResponse::TscSet(r)) => r,
            other => Err(self.unexpected(other)),
        }
    }

    /// Saves the vCPU state (the vCPU must be paused or not started).
    pub fn save(&self) -> Result<VcpuState, VmError> {
        match self.request(VcpuEvent::SaveState) {
            Some(VcpuResponse::Saved(r)) => r.map(|b| *b),
            other => Err(self.unexpected(other)),
        }
    }

    /// Restores a vCPU state (the vCPU must not be started).
    pub fn restore(&self, s: &VcpuState) -> Result<(), StateError> {
        match self.request(VcpuEvent::RestoreState(Box::new(s.clone()))) {
            Some(VcpuResponse::Restored(r)) => r,
            other => Err(StateError::Vm(self.unexpected(other))),
        }
    }

    fn unexpected(&self, r: Option<VcpuResponse>) -> VmError {
        VmError::State(match r {
            None => format!("vCPU {}: its thread has ended", self.id),
            Some(VcpuResponse::Refused(why)) => format!("vCPU {}: {why}", self.id),
            Some(_) => format!("vCPU {}: unexpected answer", self.id),
        })
    }

    /// Ends the thread (if it still runs) and joins it.
    pub fn exit_and_join(&mut self) {
        if self.send(VcpuEvent::Exit) {
            self.kick();
        }
        self.join_exited();
    }

    /// Joins the thread after an [`VcpuEvent::Exit`] was sent (or the
    /// thread ended by itself).
    fn join_exited(&mut self) {
        if self.thread.is_none() {
            return;
        }
        // Drain until Exited or the channel closes.
        while let Some(r) = self.recv(true) {
            if matches!(r, VcpuResponse::Exited) {
                break;
            }
        }
        // Joining waits for the very end of the thread; by then it cleared
        // its pthread id, so no kick can reach it.
        if let Some(h) = self.thread.take() {
            if h.join().is_err() {
                warn!("vCPU {} thread panicked", self.id);
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.exit_and_join();
    }
}

/// Pauses every vCPU of `vcpus` at once: all are told, then all kicked,
/// then all answers collected. Returns once none runs guest code.
pub fn pause_all(vcpus: &[VcpuHandle]) {
    let start = std::time::Instant::now();
    let sent: Vec<bool> = vcpus.iter().map(|v| v.send(VcpuEvent::Pause)).collect();
    for (v, s) in vcpus.iter().zip(&sent) {
        if *s {
            v.kick();
        }
    }
    for (v, s) in vcpus.iter().zip(&sent) {
        if *s {
            // An ended thread runs no guest code either.
            let _ = v.recv(true);
        }
    }
    debug!("vCPUs paused in {:?}", start.elapsed());
}

/// Lets paused vCPUs of `vcpus` run again.
pub fn resume_all(vcpus: &[VcpuHandle]) {
    let sent: Vec<bool> = vcpus.iter().map(|v| v.send(VcpuEvent::Resume)).collect();
    for (v, s) in vcpus.iter().zip(&sent) {
        if *s {
            let _ = v.recv(false);
        }
    }
}

/// Ends every vCPU thread of `vcpus` (all told and kicked first) and joins
/// them.
pub fn exit_all(vcpus: &mut [VcpuHandle]) {
    for v in vcpus.iter() {
        if v.send(VcpuEvent::Exit) {
            v.kick();
        }
    }
    for v in vcpus.iter_mut() {
        v.join_exited();
    }
}

/// Saves the state of every vCPU of `vcpus`, all threads at once (the
/// vCPUs must be paused or not started). Every answer is collected, also
/// after a failure.
pub fn save_all(vcpus: &[VcpuHandle]) -> Result<Vec<VcpuState>, VmError> {
    let sent: Vec<bool> = vcpus.iter().map(|v| v.send(VcpuEvent::SaveState)).collect();
    let mut out = Vec::with_capacity(vcpus.len());
    let mut first_err = None;
    for (v, s) in vcpus.iter().zip(&sent) {
        let r = if *s { v.recv(false) } else { None };
        match r {
            Some(VcpuResponse::Saved(Ok(st))) => out.push(*st),
            Some(VcpuResponse::Saved(Err(e))) => {
                first_err.get_or_insert(e);
            }
            other => {
                first_err.get_or_insert(v.unexpected(other));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Gives every vCPU of `vcpus` its devices (they stay paused).
pub fn start_all(vcpus: &[VcpuHandle], pio: &Arc<PioBus>) -> Result<(), VmError> {
    for v in vcpus {
        match v.request(VcpuEvent::Start(pio.clone())) {
            Some(VcpuResponse::Started) => {}
            other => return Err(v.unexpected(other)),
        }
    }
    Ok(())
}

// ---- the vCPU thread ----

/// `struct kvm_signal_mask` with room for the kernel's 64-bit sigset.
#[repr(C)]
struct KvmSignalMask {
    len: u32,
    sigset: [u8; 8],
}

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_SIGNAL_MASK,
        kvm_bindings::KVMIO,
        0x8b,
        kvm_bindings::kvm_signal_mask
    );
}
use ioctls::KVM_SET_SIGNAL_MASK;

fn kick_set() -> std::io::Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(&[kick_signal()])
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Tells KVM to run this thread with the kick signal unblocked (keeping the
/// rest of the thread's mask), then blocks it outside KVM_RUN. If KVM
/// refuses, the signal stays unblocked: its no-op handler then interrupts
/// KVM_RUN, and the handle's re-kicks cover a kick that came just before it.
fn setup_kick_mask(fd: &VcpuFd) -> std::io::Result<()> {
    let set = kick_set()?;
    // SAFETY: an all-zero sigset_t is a valid (empty) set.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads this thread's mask into a valid set (no change).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut cur) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: `cur` is a valid set and the signal number is valid.
    unsafe { libc::sigdelset(&mut cur, kick_signal()) };
    let mut mask = KvmSignalMask {
        len: 8,
        sigset: [0; 8],
    };
    // SAFETY: glibc's sigset_t starts with the kernel's 64-bit signal set
    // (bit n-1 for signal n) and is larger than 8 bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts((&cur as *const libc::sigset_t).cast::<u8>(), 8) };
    mask.sigset.copy_from_slice(bytes);
    // SAFETY: KVM_SET_SIGNAL_MASK reads `len` and then `len` (8) bytes of
    // sigset from the struct we pass, which holds exactly that.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_SET_SIGNAL_MASK(), &mask) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a valid set; changes only this thread's mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Consumes the kicks pending on this thread (they are queued while the
/// signal is blocked).
fn eat_kicks() {
    let Ok(set) = kick_set() else { return };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: valid set and timeout; a null info pointer is allowed.
        let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
        if r < 0 {
            break;
        }
    }
}

/// Phase of a vCPU thread; each variant owns what that phase needs.
enum Phase {
    /// Created: registers and state can be set; no devices yet.
    Created,
    /// Started and paused.
    Paused(Arc<PioBus>),
    /// Running guest code.
    Running(Arc<PioBus>),
    /// The thread ends.
    Done,
}

struct VcpuThread {
    fd: VcpuFd,
    ctx: VcpuContext,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
}

fn thread_main(
    fd: VcpuFd,
    ctx: VcpuContext,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    target: &KickTarget,
) {
    if let Err(e) = setup_kick_mask(&fd) {
        // Without the mask a kick could be lost; the handle re-kicks, so
        // the vCPU still pauses, only later.
        warn!("vCPU {}: KVM_SET_SIGNAL_MASK failed: {e}", ctx.id);
    }
    // SAFETY: pthread_self has no preconditions.
    target.set(Some(unsafe { libc::pthread_self() }));
    let mut t = VcpuThread {
        fd,
        ctx,
        events,
        responses,
    };
    let mut phase = Phase::Created;
    loop {
        phase = match phase {
            Phase::Running(pio) => t.run(pio),
            Phase::Done => break,
            other => t.wait(other),
        };
    }
    // After this no kick is sent to this thread; the fd closes after it.
    target.set(None);
}

impl VcpuThread {
    fn answer(&self, r: VcpuResponse) {
        // The handle may be gone when the VM is being dropped.
        let _ = self.responses.send(r);
    }

    /// Not running guest code: serve events until the phase changes.
    fn wait(&mut self, mut phase: Phase) -> Phase {
        loop {
            let Ok(ev) = self.events.recv() else {
                return Phase::Done;
            };
            phase = match (ev, phase) {
                (VcpuEvent::Exit, _) => {
                    self.answer(VcpuResponse::Exited);
                    return Phase::Done;
                }
                (VcpuEvent::Resume, Phase::Paused(pio)) => {
                    self.answer(VcpuResponse::Resumed);
                    return Phase::Running(pio);
                }
                (VcpuEvent::Resume, p) => {
                    self.answer(VcpuResponse::Refused("not started"));
                    p
                }
                (VcpuEvent::Pause, p) => {
                    self.answer(VcpuResponse::Paused);
                    p
                }
                (VcpuEvent::Start(pio), Phase::Created) => {
                    self.answer(VcpuResponse::Started);
                    Phase::Paused(pio)
                }
                (VcpuEvent::Start(_), p) => {
                    self.answer(VcpuResponse::Refused("already started"));
                    p
                }
                (VcpuEvent::SaveState, p) => {
                    let r = save_vcpu(&self.ctx.spec, &self.fd).map(Box::new);
                    self.answer(VcpuResponse::Saved(r));
                    p
                }
                (VcpuEvent::RestoreState(s), Phase::Created) => {
                    let r = restore_vcpu(&self.ctx.spec, self.ctx.id, &self.fd, &s);
                    self.answer(VcpuResponse::Restored(r));
                    Phase::Created
                }
                (VcpuEvent::Boot(b), Phase::Created) => {
                    let r = crate::vm::setup_boot_regs(&self.fd, &b);
                    self.answer(VcpuResponse::Booted(r));
                    Phase::Created
                }
                (VcpuEvent::SetTscKhz(khz), Phase::Created) => {
                    let r = self
                        .fd
                        .set_tsc_khz(khz)
                        .map_err(crate::vm::kvm_err(format!("KVM_SET_TSC_KHZ {khz}")));
                    self.answer(VcpuResponse::TscSet(r));
                    Phase::Created
                }
                (VcpuEvent::RestoreState(_) | VcpuEvent::Boot(_) | VcpuEvent::SetTscKhz(_), p) => {
                    self.answer(VcpuResponse::Refused("the vCPU has already started"));
                    p
                }
            };
        }
    }

    /// Runs guest code until an event or the end of the VM.
    fn run(&mut self, pio: Arc<PioBus>) -> Phase {
        // Kicks left pending from while the vCPU was paused are stale.
        eat_kicks();
        let mut pending = false;
        loop {
            match self.events.try_recv() {
                Ok(VcpuEvent::Pause) => {
                    if let Some(end) = self.complete_pending(pending, &pio) {
                        self.report_end(end);
                        self.answer(VcpuResponse::Paused);
                        return Phase::Done;
                    }
                    self.answer(VcpuResponse::Paused);
                    return Phase::Paused(pio);
                }
                Ok(VcpuEvent::Exit) | Err(TryRecvError::Disconnected) => {
                    self.answer(VcpuResponse::Exited);
                    return Phase::Done;
                }
                Ok(VcpuEvent::Resume) => self.answer(VcpuResponse::Resumed),
                Ok(_) => self.answer(VcpuResponse::Refused("the vCPU is running")),
                Err(TryRecvError::Empty) => {}
            }
            match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &pio) {
                    Handled::Continue(p) => pending = p,
                    Handled::End(end) => {
                        self.report_end(end);
                        return Phase::Done;
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    pending = false;
                    eat_kicks();
                }
                Err(e) => {
                    let msg =
                        describe_error(&mut self.fd, self.ctx.id, &format!("KVM_RUN failed: {e}"));
                    self.report_end(VmEnd::Error(msg));
                    return Phase::Done;
                }
            }
        }
    }

    /// Completes a pending I/O or MMIO access without running further guest
    /// instructions, so that a saved state is consistent. Returns the end
    /// of the VM if the access ended it.
    fn complete_pending(&mut self, mut pending: bool, pio: &PioBus) -> Option<VmEnd> {
        self.fd.set_kvm_immediate_exit(1);
        let mut rounds = 0;
        let mut end = None;
        while pending && rounds < 64 {
            rounds += 1;
            pending = match self.fd.run() {
                Ok(exit) => match handle_exit(exit, pio) {
                    Handled::Continue(p) => p,
                    Handled::End(e) => {
                        end = Some(e);
                        break;
                    }
                },
                Err(_) => false,
            };
        }
        self.fd.set_kvm_immediate_exit(0);
        eat_kicks();
        end
    }

    fn report_end(&mut self, end: VmEnd) {
        let id = self.ctx.id;
        let end = match end {
            VmEnd::Error(msg) if !msg.starts_with("vCPU ") => {
                VmEnd::Error(describe_error(&mut self.fd, id, &msg))
            }
            e => e,
        };
        match &end {
            VmEnd::Reset(why) => info!("vCPU {id}: guest ended the VM: {why}"),
            VmEnd::Error(msg) => error!("{msg}"),
        }
        // The receiver may be gone when the process is exiting; nothing to do then.
        let _ = self.ctx.events.send(VmmEvent::VmEnded {
            vm_id: self.ctx.vm_id,
            end,
        });
    }
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
            PioAction::Reset => Handled::End(VmEnd::Reset("i8042 reset".into())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_mask_ioctl_number() {
        // _IOW(KVMIO, 0x8b, struct kvm_signal_mask) from <linux/kvm.h>.
        assert_eq!(KVM_SET_SIGNAL_MASK(), 0x4004_ae8b);
        assert_eq!(std::mem::size_of::<KvmSignalMask>(), 12);
    }
}
