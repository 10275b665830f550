//! The control plane: one event loop (`event-manager`) on the main thread
//! with three subscribers:
//! - the API socket ([`crate::api::server::ApiServer`]): accepts
//!   connections; each is read on a short-lived thread that sends its typed
//!   request here and writes the reply;
//! - signals ([`signals::BlockedSignals`], a signalfd): SIGINT, SIGTERM
//!   and SIGHUP end the process with 128 + the signal number;
//! - VMM events ([`EventSource`], an mpsc channel whose writers ring an
//!   EventFd): "VM ended" from vCPU threads, API requests, "reply
//!   delivered" from connection threads, "job ended" from the migration job.
//!
//! Requests are executed on this thread ([`Vmm::execute`]), and only this
//! loop decides when the process ends.

pub mod requests;
pub mod signals;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use log::{error, info, warn};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmmConfig;
use crate::controller::{build_boot_vm, RunError};
use crate::vcpu::VmEnd;
use crate::Vmm;
use requests::{Outcome, Request};

/// Events delivered to the control loop.
///
/// Invariant: `vm_id` names the VM that produced a VM event; events of a VM
/// that is no longer the VMM's VM are ignored.
#[derive(Debug)]
pub enum VmmEvent {
    /// A VM ended by itself (guest reset/shutdown or a KVM error).
    VmEnded {
        /// Which VM.
        vm_id: u64,
        /// Why.
        end: VmEnd,
    },
    /// An API request; the outcome goes back on `reply`.
    Api {
        /// The request.
        request: Request,
        /// Where the answer goes.
        reply: Sender<Answer>,
    },
    /// The reply with this ticket was written (or could not be).
    ReplyDelivered(u64),
    /// The migration job ended (its result is in the job).
    JobEnded,
}

/// The answer to an [`VmmEvent::Api`] request.
///
/// Invariant: `delivered` is dropped by whoever writes the reply, once it
/// was written (or failed).
#[derive(Debug)]
pub struct Answer {
    /// The outcome.
    pub outcome: Outcome,
    /// Tells the loop that the reply left, when it waits for that.
    pub delivered: Option<DeliveryAck>,
}

/// Sends [`VmmEvent::ReplyDelivered`] when dropped.
///
/// Invariant: `ticket` is the loop's number for one reply.
#[derive(Debug)]
pub struct DeliveryAck {
    sink: EventSink,
    ticket: u64,
}

impl Drop for DeliveryAck {
    fn drop(&mut self) {
        self.sink.send(VmmEvent::ReplyDelivered(self.ticket));
    }
}

/// The writing end of the control loop's event channel.
///
/// Invariant: every event sent is followed by a write to `wake`, which the
/// loop polls.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: Sender<VmmEvent>,
    wake: Arc<EventFd>,
}

impl EventSink {
    /// Queues `ev` and wakes the loop; a loop that is gone is ignored (the
    /// process is exiting).
    pub fn send(&self, ev: VmmEvent) {
        if self.tx.send(ev).is_ok() {
            if let Err(e) = self.wake.write(1) {
                warn!("waking the control loop failed: {e}");
            }
        }
    }
}

/// The loop's end of the event channel.
///
/// Invariant: `wake` is the EventFd of the matching [`EventSink`]s.
#[derive(Debug)]
pub struct EventSource {
    rx: Receiver<VmmEvent>,
    wake: Arc<EventFd>,
}

/// A connected [`EventSink`] and [`EventSource`].
pub fn event_channel() -> std::io::Result<(EventSink, EventSource)> {
    let (tx, rx) = channel();
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
    Ok((
        EventSink {
            tx,
            wake: wake.clone(),
        },
        EventSource { rx, wake },
    ))
}

/// What the loop has decided so far.
///
/// Invariant: `exit` is set once; `exit_on_delivery` holds the tickets of
/// replies after which the process ends.
#[derive(Debug, Default)]
struct Decisions {
    exit: Option<i32>,
    exit_on_delivery: Vec<(u64, i32)>,
    next_ticket: u64,
}

impl Decisions {
    fn exit(&mut self, code: i32) {
        self.exit.get_or_insert(code);
    }
}

type Shared = Rc<RefCell<Decisions>>;

/// The subscriber of [`VmmEvent`]s.
struct EventsSubscriber {
    source: EventSource,
    sink: EventSink,
    vmm: Arc<Vmm>,
    decisions: Shared,
}

impl EventsSubscriber {
    fn handle(&mut self, ev: VmmEvent) {
        match ev {
            VmmEvent::VmEnded { vm_id, end } => {
                if let Some(code) = self.vmm.vm_ended(vm_id, end) {
                    self.decisions.borrow_mut().exit(code);
                }
            }
            VmmEvent::Api { request, reply } => {
                let outcome = execute_guarded(&self.vmm, request);
                let delivered = outcome.exit_after_reply.map(|code| {
                    let mut d = self.decisions.borrow_mut();
                    let ticket = d.next_ticket;
                    d.next_ticket += 1;
                    d.exit_on_delivery.push((ticket, code));
                    DeliveryAck {
                        sink: self.sink.clone(),
                        ticket,
                    }
                });
                // A connection thread that is gone drops the answer, and
                // with it the ack: the loop goes on as if delivered.
                let _ = reply.send(Answer { outcome, delivered });
            }
            VmmEvent::ReplyDelivered(ticket) => {
                let mut d = self.decisions.borrow_mut();
                let code = d
                    .exit_on_delivery
                    .iter()
                    .find(|(t, _)| *t == ticket)
                    .map(|(_, c)| *c);
                if let Some(code) = code {
                    info!("reply delivered; exiting");
                    d.exit(code);
                }
            }
            VmmEvent::JobEnded => self.vmm.reap_job(),
        }
    }
}

/// Executes `request`; a panic becomes an internal error (a 500 of kind
/// `internal`), and the loop, with the VMM's state behind its
/// poison-tolerant lock, goes on serving.
fn execute_guarded(vmm: &Arc<Vmm>, request: Request) -> Outcome {
    let what = format!("{request:?}");
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vmm.execute(request))) {
        Ok(o) => o,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            error!("control loop: request {what} panicked: {msg}");
            Outcome {
                result: Err(requests::RequestError::Internal(format!(
                    "internal error: the request panicked ({msg}); the VMM goes on"
                ))),
                exit_after_reply: None,
            }
        }
    }
}

impl MutEventSubscriber for EventsSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            // Non-blocking: EAGAIN only means a previous pass drained it.
            let _ = self.source.wake.read();
        }
        loop {
            match self.source.rx.try_recv() {
                Ok(ev) => self.handle(ev),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The VMM holds a sink for its whole life: cannot happen.
                    self.decisions.borrow_mut().exit(1);
                    break;
                }
            }
            if self.decisions.borrow().exit.is_some() {
                break;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&*self.source.wake, EventSet::IN)) {
            error!("control loop: cannot watch the event channel: {e}");
            self.decisions.borrow_mut().exit(1);
        }
    }
}

/// Milliseconds from now until `t` (at least 1), or -1 for none.
fn timeout_ms(t: Option<Instant>) -> i32 {
    match t {
        None => -1,
        Some(t) => {
            let ms = t.saturating_duration_since(Instant::now()).as_millis();
            i32::try_from(ms).unwrap_or(i32::MAX).max(1)
        }
    }
}

/// Runs the control loop until it decides that the process ends; returns
/// the exit code.
fn control_loop(
    vmm: &Arc<Vmm>,
    source: EventSource,
    signals: signals::BlockedSignals,
    api: Option<crate::api::server::ApiServer>,
) -> Result<i32, RunError> {
    let decisions: Shared = Rc::new(RefCell::new(Decisions::default()));
    let mut em = EventManager::<Box<dyn MutEventSubscriber>>::new()
        .map_err(|e| RunError::Failed(format!("creating the control loop: {e}")))?;
    em.add_subscriber(Box::new(EventsSubscriber {
        source,
        sink: vmm.event_sink(),
        vmm: vmm.clone(),
        decisions: decisions.clone(),
    }));
    em.add_subscriber(Box::new(signals::SignalSubscriber {
        signals,
        decisions: decisions.clone(),
    }));
    if let Some(api) = api {
        em.add_subscriber(Box::new(api));
    }
    let mut last_state = vmm.state_name();
    loop {
        let state = vmm.state_name();
        if state != last_state {
            info!("VM state: {last_state} -> {state}");
            vmm.hooks().events.emit(
                "vm-state-changed",
                serde_json::json!({"from": last_state, "to": state}),
            );
            last_state = state;
        }
        if let Some(code) = decisions.borrow().exit {
            return Ok(code);
        }
        let deadline = vmm.exit_deadline();
        if deadline.is_some_and(|d| Instant::now() >= d) {
            info!("migration completed and nobody asked for its status; exiting (--exit-after-migration)");
            return Ok(0);
        }
        if let Err(e) = em.run_with_timeout(timeout_ms(deadline)) {
            error!("control loop: {e}");
            return Ok(1);
        }
    }
}

/// Runs a VMM for `cfg` until it should exit; returns the exit code.
///
/// Order: signals blocked (before any thread exists), VM (memory, devices,
/// kernel), API socket, vCPUs, then the control loop. Errors before the VM
/// runs are returned (bad input: exit 2).
pub fn run(cfg: VmmConfig) -> Result<i32, RunError> {
    let signals = signals::BlockedSignals::block()
        .map_err(|e| RunError::Failed(format!("setting up signal handling: {e}")))?;
    let (vmm, source) = Vmm::new(cfg)?;
    // The VM exists before the API answers, so that `vm.info` works as soon
    // as `vmm.ping` does.
    let booted = build_boot_vm(&vmm)?;
    let api = match &vmm.config().api_socket {
        Some(path) => Some(
            crate::api::server::ApiServer::bind(path, vmm.event_sink(), vmm.hooks().events.clone())
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
    // The API server (and its socket file) ends with the loop.
    control_loop(&vmm, source, signals, api)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::client::request;
    use crate::config::Cli;
    use clap::Parser;

    fn api_only(sock: &std::path::Path) -> Arc<Vmm> {
        let cli = Cli::parse_from(["ferry", "--api-socket", sock.to_str().unwrap()]);
        let cfg = VmmConfig::parse(&cli).unwrap();
        Vmm::new(cfg).unwrap().0
    }

    fn subscriber() -> EventsSubscriber {
        let vmm = api_only(std::path::Path::new("/nonexistent/x.sock"));
        let (sink, source) = event_channel().unwrap();
        EventsSubscriber {
            source,
            sink,
            vmm,
            decisions: Rc::default(),
        }
    }

    fn ask(s: &mut EventsSubscriber, request: Request) -> Answer {
        let (tx, rx) = channel();
        s.handle(VmmEvent::Api { request, reply: tx });
        rx.recv().unwrap()
    }

    /// Feeds what the subscriber's own sink queued back into it.
    fn pump(s: &mut EventsSubscriber) {
        while let Ok(ev) = s.source.rx.try_recv() {
            s.handle(ev);
        }
    }

    #[test]
    fn exit_waits_for_the_reply() {
        let mut s = subscriber();
        let a = ask(&mut s, Request::Ping);
        assert!(a.delivered.is_none());
        let a = ask(&mut s, Request::VmmShutdown);
        assert_eq!(a.outcome.exit_after_reply, Some(0));
        pump(&mut s);
        assert_eq!(s.decisions.borrow().exit, None, "exit before delivery");
        drop(a);
        pump(&mut s);
        assert_eq!(s.decisions.borrow().exit, Some(0));
    }

    #[test]
    fn foreign_vm_ends_are_ignored() {
        let mut s = subscriber();
        s.handle(VmmEvent::VmEnded {
            vm_id: u64::MAX,
            end: VmEnd::Error("not ours".into()),
        });
        s.handle(VmmEvent::JobEnded);
        assert_eq!(s.decisions.borrow().exit, None);
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Instant::now())), 1);
        let t = timeout_ms(Some(Instant::now() + Duration::from_secs(2)));
        assert!((1..=2000).contains(&t), "{t}");
    }

    /// The whole control plane in-process: API socket, requests executed
    /// by the loop, and an exit decided after the reply was delivered.
    #[test]
    fn loop_serves_the_api_and_exits_on_shutdown() {
        let dir = PathBuf::from(format!("/tmp/ferry-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let s2 = sock.clone();
        let (ready_tx, ready_rx) = channel();
        let t = std::thread::spawn(move || {
            let signals = signals::BlockedSignals::block().unwrap();
            let cli = Cli::parse_from(["ferry", "--api-socket", s2.to_str().unwrap()]);
            let (vmm, source) = Vmm::new(VmmConfig::parse(&cli).unwrap()).unwrap();
            let api = crate::api::server::ApiServer::bind(
                &s2,
                vmm.event_sink(),
                vmm.hooks().events.clone(),
            )
            .unwrap();
            ready_tx.send(()).unwrap();
            control_loop(&vmm, source, signals, Some(api))
        });
        ready_rx.recv().unwrap();
        let to = Duration::from_secs(10);
        let r = request(&sock, "GET", "vmm.ping", None, to).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let r = request(&sock, "GET", "vm.info", None, to).unwrap();
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(r.body.contains("not_created"), "{}", r.body);
        let r = request(&sock, "PUT", "vm.pause", None, to).unwrap();
        assert_eq!(r.status, 409, "{}", r.body);
        let r = request(&sock, "GET", "vm.nope", None, to).unwrap();
        assert_eq!(r.status, 404, "{}", r.body);
        assert!(r.body.contains(r#""kind":"not-found""#), "{}", r.body);
        // A handler that panics, in the connection thread or on the loop,
        // gives a 500 of kind internal, and the API goes on serving.
        for path in [
            crate::api::server::TEST_PANIC_PATH,
            crate::api::server::TEST_PANIC_IN_LOOP_PATH,
        ] {
            let r = crate::client::request_target(&sock, "GET", path, None, to).unwrap();
            assert_eq!(r.status, 500, "{path}: {}", r.body);
            assert!(r.body.contains(r#""kind":"internal""#), "{}", r.body);
            let r = request(&sock, "GET", "vmm.ping", None, to).unwrap();
            assert_eq!(r.status, 200, "after {path}: {}", r.body);
        }
        let r = request(&sock, "PUT", "vmm.shutdown", None, to).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(t.join().unwrap().unwrap(), 0);
        assert!(!sock.exists(), "socket file left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
