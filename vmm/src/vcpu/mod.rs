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
//!
//! Throttling ([`throttle`], auto-converge): [`VcpuEvent::Throttle`] sets
//! the share of time taken from a vCPU. A throttled vCPU runs slices of
//! [`throttle::SLICE`], ended inside `KVM_RUN` by a per-thread timer that
//! sends the kick signal, and naps between them on its event channel, so
//! every event (pause, exit, a new throttle) is served at once. A paused
//! vCPU keeps the throttle for when it runs again.

mod kick;
mod thread;
pub mod throttle;

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use kvm_ioctls::VcpuFd;
use log::{debug, warn};

use crate::pci::io::Buses;
use crate::state::{StateError, VcpuState, VcpuStateSpec};
use crate::vm::{BootRegs, VmError};
use crate::EventSink;
use kick::KickTarget;
pub use kick::{install_kick_handler, kick_signal};

/// The control side of one vCPU thread.
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
    Start(Arc<Buses>),
    /// Stop running guest code (completing a pending I/O first).
    Pause,
    /// Run guest code again.
    Resume,
    /// Take this percent (0..=99, larger is clamped) of the vCPU's time
    /// while it runs guest code; 0 ends the throttle. Valid in any phase.
    Throttle(u32),
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
    /// The new throttle is in force (from the next instruction run).
    Throttled,
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
    pub events: EventSink,
}

/// How long [`VcpuHandle`] waits for an answer to a pause or exit before it
/// kicks again (a guard: one kick is enough).
const REKICK: Duration = Duration::from_millis(50);

/// The control side of one vCPU thread.
///
/// Invariant: `tx`/`rx` are the event and response channels of the thread
/// that `thread` joins; requests are strictly one event, one response, so a
/// handle is used by one requester at a time (the VM keeps its handles
/// under one lock).
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
            .spawn(move || thread::thread_main(fd, ctx, events, responses, &t))?;
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

/// Sets the throttle of every vCPU of `vcpus` (all told and kicked
/// first) and returns once each has it in force or has ended. A paused
/// vCPU stays paused.
pub fn throttle_all(vcpus: &[VcpuHandle], percent: u32) {
    let sent: Vec<bool> = vcpus
        .iter()
        .map(|v| v.send(VcpuEvent::Throttle(percent)))
        .collect();
    for (v, s) in vcpus.iter().zip(&sent) {
        if *s {
            v.kick();
        }
    }
    for (v, s) in vcpus.iter().zip(&sent) {
        if *s {
            match v.recv(true) {
                Some(VcpuResponse::Throttled) | None => {}
                Some(_) => warn!("vCPU {}: unexpected answer to a throttle", v.id),
            }
        }
    }
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
pub fn start_all(vcpus: &[VcpuHandle], buses: &Arc<Buses>) -> Result<(), VmError> {
    for v in vcpus {
        match v.request(VcpuEvent::Start(buses.clone())) {
            Some(VcpuResponse::Started) => {}
            other => return Err(v.unexpected(other)),
        }
    }
    Ok(())
}
