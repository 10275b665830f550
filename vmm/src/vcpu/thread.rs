//! The body of a vCPU thread: it owns its `VcpuFd`, serves events while
//! not running guest code, and runs the KVM_RUN loop with exit handling.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::{VcpuExit, VcpuFd};
use log::{debug, error, info, warn};

use super::kick::{eat_kicks, setup_kick_mask, KickTarget};
use super::throttle::{Next, SliceClock, SliceTimer};
use super::{VcpuContext, VcpuEvent, VcpuResponse, VmEnd};
use crate::pci::io::Buses;
use crate::pio::PioAction;
use crate::state::{restore_vcpu, save_vcpu};
use crate::VmmEvent;

/// Phase of a vCPU thread; each variant owns what that phase needs.
enum Phase {
    /// Created: registers and state can be set; no devices yet.
    Created,
    /// Started and paused.
    Paused(Arc<Buses>),
    /// Running guest code.
    Running(Arc<Buses>),
    /// The thread ends.
    Done,
}

struct VcpuThread {
    fd: VcpuFd,
    ctx: VcpuContext,
    events: Receiver<VcpuEvent>,
    responses: Sender<VcpuResponse>,
    /// The throttle's timeslices (see [`super::throttle`]).
    clock: SliceClock,
    /// Ends a slice inside `KVM_RUN`; created at the first throttled run.
    timer: TimerSlot,
}

/// The slice timer of a vCPU thread, created on first use.
enum TimerSlot {
    /// Not needed yet.
    None,
    /// Created; armed only while a slice runs.
    Ready(SliceTimer),
    /// Creation failed (logged once): slices then end at the guest's own
    /// exits only, so the throttle is coarser but still holds on average.
    Failed,
}

impl TimerSlot {
    fn arm(&mut self, id: u8, d: std::time::Duration) {
        if matches!(self, TimerSlot::None) {
            *self = match SliceTimer::new() {
                Ok(t) => TimerSlot::Ready(t),
                Err(e) => {
                    warn!("vCPU {id}: no throttle slice timer ({e}); the throttle is coarser");
                    TimerSlot::Failed
                }
            };
        }
        if let TimerSlot::Ready(t) = self {
            if let Err(e) = t.arm(d) {
                warn!("vCPU {id}: arming the throttle slice timer: {e}");
            }
        }
    }

    fn disarm(&mut self, id: u8) {
        if let TimerSlot::Ready(t) = self {
            if let Err(e) = t.disarm() {
                warn!("vCPU {id}: disarming the throttle slice timer: {e}");
            }
        }
    }
}

pub(super) fn thread_main(
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
    // Clears the kick target on every way out; after a panic it also
    // reports the VM as ended, so the VMM does not go on with a dead vCPU.
    let _end = ThreadEnd {
        target,
        events: ctx.events.clone(),
        vm_id: ctx.vm_id,
        id: ctx.id,
    };
    let mut t = VcpuThread {
        fd,
        ctx,
        events,
        responses,
        clock: SliceClock::default(),
        timer: TimerSlot::None,
    };
    let mut phase = Phase::Created;
    loop {
        phase = match phase {
            Phase::Running(buses) => t.run(buses),
            Phase::Done => break,
            other => t.wait(other),
        };
    }
    // `_end` drops here: after it no kick is sent to this thread; the fd
    // closes after it.
}

/// See `thread_main`.
struct ThreadEnd<'a> {
    target: &'a KickTarget,
    events: crate::control::EventSink,
    vm_id: u64,
    id: u8,
}

impl Drop for ThreadEnd<'_> {
    fn drop(&mut self) {
        self.target.set(None);
        if std::thread::panicking() {
            let msg = format!("vCPU {}: its thread panicked", self.id);
            error!("{msg}");
            self.events.send(VmmEvent::VmEnded {
                vm_id: self.vm_id,
                end: VmEnd::Error(msg),
            });
        }
    }
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
                (VcpuEvent::Resume, Phase::Paused(buses)) => {
                    self.answer(VcpuResponse::Resumed);
                    return Phase::Running(buses);
                }
                (VcpuEvent::Resume, p) => {
                    self.answer(VcpuResponse::Refused("not started"));
                    p
                }
                (VcpuEvent::Pause, p) => {
                    self.answer(VcpuResponse::Paused);
                    p
                }
                (VcpuEvent::Throttle(pct), p) => {
                    // Kept for when the vCPU runs again; a paused vCPU
                    // stays paused.
                    self.clock.set(pct);
                    self.answer(VcpuResponse::Throttled);
                    p
                }
                (VcpuEvent::Start(buses), Phase::Created) => {
                    self.answer(VcpuResponse::Started);
                    Phase::Paused(buses)
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

    /// Runs guest code until an event or the end of the VM; a throttled
    /// vCPU runs in slices and naps in between (see [`super::throttle`]).
    fn run(&mut self, buses: Arc<Buses>) -> Phase {
        let next = self.run_slices(buses);
        // Whatever ended the run, no slice timer stays armed and the next
        // run starts a fresh slice.
        self.timer.disarm(self.ctx.id);
        self.clock.stop();
        eat_kicks();
        next
    }

    fn run_slices(&mut self, buses: Arc<Buses>) -> Phase {
        // Kicks left pending from while the vCPU was paused are stale.
        eat_kicks();
        let mut pending = false;
        loop {
            match self.events.try_recv() {
                Ok(ev) => {
                    if let Some(next) = self.on_event(ev, pending, &buses) {
                        return next;
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => {
                    self.answer(VcpuResponse::Exited);
                    return Phase::Done;
                }
                Err(TryRecvError::Empty) => {}
            }
            match self.clock.before_run(Instant::now()) {
                Next::Run(None) => {}
                Next::Run(Some(slice)) => self.timer.arm(self.ctx.id, slice),
                Next::Nap(d) => {
                    // The slice is over: its timer may still be armed (the
                    // slice ended at an exit) or have fired; neither may
                    // cut the next slice short.
                    self.timer.disarm(self.ctx.id);
                    eat_kicks();
                    // The nap ends at once with any event (pause, exit, a
                    // new throttle): never a blind sleep.
                    match self.events.recv_timeout(d) {
                        Ok(ev) => {
                            if let Some(next) = self.on_event(ev, pending, &buses) {
                                return next;
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            self.answer(VcpuResponse::Exited);
                            return Phase::Done;
                        }
                    }
                    continue;
                }
            }
            match self.fd.run() {
                Ok(exit) => match handle_exit(exit, &buses) {
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

    /// Serves one event while the vCPU runs (or naps between slices);
    /// returns the next phase if the event ends the run.
    fn on_event(&mut self, ev: VcpuEvent, pending: bool, buses: &Arc<Buses>) -> Option<Phase> {
        match ev {
            VcpuEvent::Pause => {
                if let Some(end) = self.complete_pending(pending, buses) {
                    self.report_end(end);
                    self.answer(VcpuResponse::Paused);
                    return Some(Phase::Done);
                }
                self.answer(VcpuResponse::Paused);
                Some(Phase::Paused(buses.clone()))
            }
            VcpuEvent::Exit => {
                self.answer(VcpuResponse::Exited);
                Some(Phase::Done)
            }
            VcpuEvent::Resume => {
                self.answer(VcpuResponse::Resumed);
                None
            }
            VcpuEvent::Throttle(pct) => {
                self.clock.set(pct);
                if !self.clock.in_slice() {
                    self.timer.disarm(self.ctx.id);
                }
                self.answer(VcpuResponse::Throttled);
                None
            }
            _ => {
                self.answer(VcpuResponse::Refused("the vCPU is running"));
                None
            }
        }
    }

    /// Completes a pending I/O or MMIO access without running further guest
    /// instructions, so that a saved state is consistent. Returns the end
    /// of the VM if the access ended it.
    fn complete_pending(&mut self, mut pending: bool, buses: &Buses) -> Option<VmEnd> {
        self.fd.set_kvm_immediate_exit(1);
        let mut rounds = 0;
        let mut end = None;
        while pending && rounds < 64 {
            rounds += 1;
            pending = match self.fd.run() {
                Ok(exit) => match handle_exit(exit, buses) {
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
        if let VmEnd::Reset(why) = &end {
            if why.starts_with("triple fault") {
                warn!("vCPU {id}: {}", fault_state(&mut self.fd));
            }
        }
        match &end {
            VmEnd::Reset(why) => info!("vCPU {id}: guest ended the VM: {why}"),
            VmEnd::Error(msg) => error!("{msg}"),
        }
        self.ctx.events.send(VmmEvent::VmEnded {
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

fn handle_exit(exit: VcpuExit<'_>, buses: &Buses) -> Handled {
    match exit {
        VcpuExit::IoIn(port, data) => {
            buses.io_in(port, data);
            Handled::Continue(true)
        }
        VcpuExit::IoOut(port, data) => match buses.io_out(port, data) {
            PioAction::Continue => Handled::Continue(true),
            PioAction::End(why) => Handled::End(VmEnd::Reset(why.into())),
        },
        VcpuExit::MmioRead(addr, data) => {
            buses.mmio_read(addr, data);
            Handled::Continue(true)
        }
        VcpuExit::MmioWrite(addr, data) => {
            buses.mmio_write(addr, data);
            Handled::Continue(true)
        }
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

/// The registers that tell where and why a guest triple-faulted, for the
/// log: the last instruction, the paging and descriptor-table state, and the
/// event KVM had pending.
fn fault_state(fd: &mut VcpuFd) -> String {
    let regs = match fd.get_regs() {
        Ok(r) => format!("RIP {:#x} RSP {:#x} RFLAGS {:#x}", r.rip, r.rsp, r.rflags),
        Err(e) => format!("registers unavailable: {e}"),
    };
    let sregs = match fd.get_sregs() {
        Ok(s) => format!(
            "CS {:#x} CR0 {:#x} CR2 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x} IDT {:#x}/{:#x} GDT {:#x}/{:#x}",
            s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit,
            s.gdt.base, s.gdt.limit
        ),
        Err(e) => format!("special registers unavailable: {e}"),
    };
    let events = match fd.get_vcpu_events() {
        Ok(ev) => format!(
            "exception {}/{} vector {} error {:#x}, interrupt {}/{}, nmi {}",
            ev.exception.injected,
            ev.exception.pending,
            ev.exception.nr,
            ev.exception.error_code,
            ev.interrupt.injected,
            ev.interrupt.nr,
            ev.nmi.injected
        ),
        Err(e) => format!("events unavailable: {e}"),
    };
    format!("state at the triple fault: {regs}; {sregs}; {events}")
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
