//! The destination side: one state machine whose phases own their
//! resources, accepting the connections, checking compatibility, running
//! the readers and device loads, and completing (restore, start, RESUMED)
//! or tearing down.
//!
//! ```text
//! WaitMain -> Negotiate(main) -> AcceptData(VM built) -> Receive(readers, keepalive)
//!   --STATE--> Complete (restore, READY) -> AwaitCommit --COMMIT--> Start (start, RESUMED)
//! Negotiate --SETUP refused or peer lost--> (ERROR frame, main closed) WaitMain
//! any phase before Start completes --error/cancel/abort/peer death--> abort
//!   (ERROR frame, threads joined, sockets closed, vm.discard()) -> Failed;
//!   from Receive up to Start the ERROR is flagged "discarded" (the guest
//!   never started here), so that the source may resume even after COMMIT
//! ```
//!
//! The VM is started only after COMMIT arrived; from then on cancel is
//! ignored and a failure to send RESUMED leaves the VM running (the source,
//! which wrote COMMIT, stays paused and reports an uncertain outcome). The
//! half-built VM is a guard ([`BuiltVm`]) that discards it when dropped.

mod barrier;
mod devices;
mod pcrun;
pub(crate) mod postcopy;
mod reader;
mod setup;
mod switchover;
mod unzstd;

use std::cell::Cell;
use std::net::Shutdown;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::api::{CancelToken, DeviceStateMode, Hooks, ReceiveParams, DEFAULT_DEVICE_BUFFER};
use crate::error::MigrationError;
use crate::events::EventLog;
use crate::handshake::{Acceptor, Incoming};
use crate::net::{recv_frame, recv_payload, Ctl, Keepalive, MainConn, Notify, Recv};
use crate::stats::{DeviceCounters, MigrationStats, Role, RxMeter};
use crate::traits::{DestinationFactory, DestinationVm};
use crate::wire::{self, Frame};
use crate::worker::Workers;
use devices::{Ack, DeviceInbox};
use reader::ReaderCtx;

/// What every phase of one receive shares.
struct Ctx<'a> {
    factory: &'a dyn DestinationFactory,
    bound: u64,
    stats: Arc<MigrationStats>,
    ctl: Arc<Ctl>,
    acceptor: Acceptor,
    notify: Arc<Notify>,
    /// An ERROR frame naming the failure was already sent on main.
    error_sent: Cell<bool>,
    /// Where events are reported.
    #[allow(dead_code)]
    events: Arc<EventLog>,
    /// The host's registry of migrations, if any.
    host: Option<Arc<dyn crate::host::Host>>,
    /// This receive's registration, from SETUP accepted to the end.
    host_slot: std::cell::RefCell<Option<Box<dyn crate::host::HostSlot>>>,
}

impl Ctx<'_> {
    fn refuse(&self, inc: Incoming, msg: &str) {
        self.acceptor
            .refuse(inc.stream, inc.session, msg.to_string());
    }

    fn next_incoming(&self, timeout: Duration) -> Option<Incoming> {
        self.acceptor.rx.recv_timeout(timeout).ok()
    }

    /// Refuses every newcomer waiting now.
    fn refuse_newcomers(&self) {
        while let Some(inc) = self.next_incoming(Duration::ZERO) {
            self.refuse(inc, "a migration is already in progress");
        }
    }
}

/// The half-built destination VM: discarded when dropped, unless
/// [`BuiltVm::into_started`] handed it over.
struct BuiltVm {
    vm: Arc<dyn DestinationVm>,
    _discard: DiscardOnDrop,
}

/// Calls [`DestinationVm::discard`] when dropped, unless disarmed.
struct DiscardOnDrop(Option<Arc<dyn DestinationVm>>);

impl Drop for DiscardOnDrop {
    fn drop(&mut self) {
        if let Some(vm) = self.0.take() {
            vm.discard();
        }
    }
}

impl BuiltVm {
    fn new(vm: Arc<dyn DestinationVm>) -> BuiltVm {
        BuiltVm {
            _discard: DiscardOnDrop(Some(vm.clone())),
            vm,
        }
    }

    /// The VM was started: it belongs to the caller now.
    fn into_started(self) -> Arc<dyn DestinationVm> {
        let BuiltVm { vm, mut _discard } = self;
        _discard.0 = None;
        vm
    }
}

/// The main connection of the session.
struct Session {
    main: Arc<MainConn>,
    session: u128,
    /// Data connections announced by the source.
    n: usize,
}

/// SETUP accepted: the VM is built and the data path prepared.
///
/// Invariant: `vm`'s RAM layout and devices match what SETUP announced.
struct Prepared {
    s: Session,
    inbox: Arc<DeviceInbox>,
    ack_rx: mpsc::Receiver<Ack>,
    rctx: Arc<ReaderCtx>,
    counters: Vec<Arc<DeviceCounters>>,
    mode: DeviceStateMode,
    chunk_max: u64,
    vm: BuiltVm,
}

/// Pages and device data arrive.
struct Receiving {
    keepalive: Keepalive,
    readers: Workers,
    p: Prepared,
    last_main: Instant,
    /// Last RATE round and the rate last sent per device.
    rates: (Instant, Vec<u64>),
    /// Ticks the live rates (`throughput_bytes_per_s`, `pages_per_s`) and
    /// logs each pass received.
    rx: RxMeter,
    /// When HOST_LOAD was last sent (`None`: not yet).
    host_load_at: Option<Instant>,
    /// POSTCOPY arrived: the final pass and the missing set.
    post: Option<Box<pcrun::PostMsg>>,
}

/// What STATE announced.
#[derive(Debug, Clone, Copy)]
struct StateInfo {
    final_pass: u64,
    paused: bool,
    pause_us: u64,
}

/// A received STATE frame: its arguments and payload.
struct StateMsg {
    info: StateInfo,
    state: Vec<u8>,
}

/// The VM state is restored and READY sent (or about to be).
struct Ready {
    keepalive: Keepalive,
    s: Session,
    inbox: Arc<DeviceInbox>,
    ack_rx: mpsc::Receiver<Ack>,
    info: StateInfo,
    vm: BuiltVm,
    /// Post-copy follows the start (RAM registered, readers still running).
    post: Option<Box<pcrun::PostRun>>,
}

/// The phases of the receiver; each variant owns that phase's resources.
enum Phase {
    /// Waiting for a main connection.
    WaitMain,
    /// Main connection accepted; SETUP next.
    Negotiate(Box<Session>),
    /// VM built; the data connections are accepted next.
    AcceptData(Box<Prepared>),
    /// Receiving passes and device data.
    Receive(Box<Receiving>),
    /// STATE received: passes and devices finish, then the state is
    /// restored and READY sent.
    Complete(Box<Receiving>, Box<StateMsg>),
    /// Restored and READY sent at the given time: waiting for COMMIT.
    AwaitCommit(Box<Ready>, Instant),
    /// COMMIT arrived: start the VM.
    Start(Box<Ready>),
    /// The VM runs and pulls its missing pages (post-copy); also while a
    /// lost connection waits for a resume.
    Postcopy(Box<pcrun::PcRun>),
}

impl Phase {
    /// The main connection, once there is one.
    fn main(&self) -> Option<&Arc<MainConn>> {
        match self {
            Phase::WaitMain => None,
            Phase::Negotiate(s) => Some(&s.main),
            Phase::AcceptData(p) => Some(&p.s.main),
            Phase::Receive(r) | Phase::Complete(r, ..) => Some(&r.p.s.main),
            Phase::AwaitCommit(r, _) | Phase::Start(r) => Some(&r.s.main),
            Phase::Postcopy(r) => r.main(),
        }
    }
}

/// A failed step of this state machine (see [`crate::phase::Failed`]).
type Failed = crate::phase::Failed<Phase>;
use crate::phase::or_fail;

/// Receives one migration (see [`crate::receive`]).
pub fn run(
    listener: crate::net::Listener,
    factory: &dyn DestinationFactory,
    params: &ReceiveParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
    hooks: &Hooks,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    stats.begin();
    stats.set_role(Role::Destination);
    let bound = params
        .device_buffer_bytes
        .unwrap_or(DEFAULT_DEVICE_BUFFER)
        .max(wire::MAX_DEVICE_CHUNK);
    let tls = params.server_tls()?;
    stats.set_transport(tls.is_some());
    if matches!(listener, crate::net::Listener::Unix(..)) {
        stats.set_unix_transport();
    }
    let ctx = Ctx {
        factory,
        bound,
        stats: stats.clone(),
        ctl: Ctl::new(cancel.clone(), crate::testhook::stall_timeout()),
        acceptor: Acceptor::start(listener, tls)?,
        notify: Arc::new(Notify::default()),
        error_sent: Cell::new(false),
        events: hooks.events.clone(),
        host: hooks.host.clone(),
        host_slot: std::cell::RefCell::new(None),
    };
    ctx.events.emit(
        "migration-started",
        serde_json::json!({ "role": "destination", "receiver_url": params.receiver_url }),
    );
    let r = drive(&ctx);
    let r = match r {
        Ok(vm) => {
            ctx.events.emit(
                "migration-completed",
                serde_json::json!({ "role": "destination" }),
            );
            Ok(vm)
        }
        Err(f) => {
            let e = abort(&ctx, f);
            ctx.stats.fail(&e);
            log::error!("incoming migration failed: {e}");
            ctx.events.emit(
                if cancel.is_cancelled() {
                    "migration-cancelled"
                } else {
                    "migration-failed"
                },
                serde_json::json!({ "role": "destination", "error": e.to_string() }),
            );
            Err(e)
        }
    };
    ctx.acceptor.stop();
    r
}

/// Runs the phases until the VM was started.
fn drive(ctx: &Ctx) -> Result<Arc<dyn DestinationVm>, Failed> {
    let mut phase = Phase::WaitMain;
    loop {
        // After COMMIT the VM is started whatever else failed meanwhile; a
        // post-copy handles its own failures (it never discards the VM).
        if !matches!(phase, Phase::Start(_) | Phase::Postcopy(_)) {
            or_fail!(ctx.ctl.check(), phase);
        }
        phase = match phase {
            Phase::WaitMain => match or_fail!(setup::wait_main(ctx), Phase::WaitMain) {
                Some(s) => Phase::Negotiate(Box::new(s)),
                None => Phase::WaitMain,
            },
            Phase::Negotiate(s) => match setup::negotiate(ctx, s) {
                Ok(p) => p,
                Err(f) => wait_again(ctx, f)?,
            },
            Phase::AcceptData(p) => setup::accept_data(ctx, p)?,
            Phase::Receive(r) => r.step(ctx)?,
            Phase::Complete(r, msg) => r.complete(ctx, msg)?,
            Phase::AwaitCommit(r, since) => r.await_commit(ctx, since)?,
            Phase::Start(r) => match r.start(ctx)? {
                Ok(vm) => return Ok(vm),
                Err(run) => Phase::Postcopy(run),
            },
            Phase::Postcopy(r) => match r.step(ctx) {
                Ok(vm) => return Ok(vm),
                Err(run) => Phase::Postcopy(run),
            },
        };
    }
}

/// A source refused at SETUP (its configuration did not fit this
/// destination) or lost before SETUP was accepted leaves nothing behind:
/// no VM was kept, no data connection accepted. The peer was told why (an
/// ERROR frame), its connection is closed, and the receive goes back to
/// waiting for a main connection, so whoever connects first cannot end
/// it. A cancel or an expired deadline still ends the receive.
fn wait_again(ctx: &Ctx, f: Failed) -> Result<Phase, Failed> {
    if ctx.ctl.check().is_err() {
        return Err(f);
    }
    let Failed { phase, err } = f;
    let Phase::Negotiate(s) = phase else {
        return Err(Failed::new(phase, err));
    };
    if !ctx.error_sent.get() && !is_connection_error(&err) {
        s.main
            .send_message(|len| Frame::Error { len }, &err.to_string());
    }
    ctx.error_sent.set(false);
    close_main(*s);
    log::warn!("incoming migration refused before it started: {err}; waiting for another source");
    Ok(Phase::WaitMain)
}

fn is_connection_error(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::Io { .. }
            | MigrationError::PeerClosed(_)
            | MigrationError::Stalled(_)
            | MigrationError::Aborted
    )
}

/// The error to report, from the first one a worker recorded and the one
/// the state machine stopped with: the first, unless it is a mere
/// connection error and the state machine read the source's ABORT. A
/// source that gives up may close a data connection before its ABORT on
/// the main connection is read here (the two are read by different
/// threads); its reason is the cause, the closed connection a consequence.
fn cause(first: Option<MigrationError>, direct: MigrationError) -> MigrationError {
    match first {
        Some(e) if is_connection_error(&e) && matches!(direct, MigrationError::PeerAborted(_)) => {
            log::debug!("the source's ABORT explains {e}");
            direct
        }
        Some(e) => e,
        None => direct,
    }
}

/// Looks briefly for the source's ABORT message after a connection error.
fn peer_abort_message(main: &MainConn) -> Option<String> {
    let ctl = Ctl::new(CancelToken::default(), Duration::from_millis(500));
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(500) {
        match recv_frame(&main.stream, &ctl, true, "reading an abort") {
            Ok(Recv::Frame(env)) => {
                let len = env.frame.payload_len();
                let p = recv_payload(&main.stream, len, &ctl, "reading an abort").ok()?;
                if let Frame::Abort { .. } = env.frame {
                    return Some(wire::message_text(&p));
                }
            }
            Ok(Recv::Idle) => {}
            _ => return None,
        }
    }
    None
}

/// Shuts the main connection down (after the threads using it stopped).
fn close_main(s: Session) {
    let _ = s.main.stream.tcp().shutdown(Shutdown::Both);
}

/// Tears a [`Receiving`] down: keepalive, every socket, readers, device
/// loads, main connection; the VM guard is returned to the caller.
fn close_receiving(ctx: &Ctx, r: Receiving) -> BuiltVm {
    let Receiving {
        keepalive,
        readers,
        p,
        ..
    } = r;
    drop(keepalive);
    ctx.ctl.shutdown_all();
    drop(readers);
    close_prepared(p)
}

fn close_prepared(p: Prepared) -> BuiltVm {
    let Prepared { s, inbox, vm, .. } = p;
    inbox.join();
    close_main(s);
    vm
}

/// Tears a [`Ready`] down like [`close_receiving`] (its readers are gone).
fn close_ready(ctx: &Ctx, r: Ready) -> BuiltVm {
    let Ready {
        keepalive,
        s,
        inbox,
        vm,
        post,
        ..
    } = r;
    drop(keepalive);
    ctx.ctl.shutdown_all();
    drop(post);
    inbox.join();
    close_main(s);
    vm
}

/// Stops everything after a failure and returns the error to report: the
/// source's ABORT message replaces a mere connection error; an ERROR frame
/// tells the source why (unless it aborted itself or was told already);
/// threads are joined, sockets closed, and the VM is discarded last.
fn abort(ctx: &Ctx, f: Failed) -> MigrationError {
    let mut err = cause(ctx.ctl.take_error(), f.err);
    ctx.ctl.fail(MigrationError::Aborted);
    if let Some(main) = f.phase.main() {
        if is_connection_error(&err) {
            if let Some(m) = peer_abort_message(main) {
                err = MigrationError::PeerAborted(m);
            }
        }
        if !matches!(err, MigrationError::PeerAborted(_)) && !ctx.error_sent.get() {
            // Once the source's main reader listens (data flows), tell it
            // whether the guest can have started here: only `start` itself
            // may have run it; before, the VM is discarded unstarted and the
            // source may resume even if it already wrote COMMIT.
            let unstarted = matches!(
                f.phase,
                Phase::Receive(_) | Phase::Complete(..) | Phase::AwaitCommit(..)
            );
            let frame: fn(u64) -> Frame = if unstarted {
                |len| Frame::Discarded { len }
            } else {
                |len| Frame::Error { len }
            };
            main.send_message(frame, &err.to_string());
        }
    }
    let vm = match f.phase {
        Phase::WaitMain => None,
        Phase::Negotiate(s) => {
            close_main(*s);
            None
        }
        Phase::AcceptData(p) => {
            ctx.ctl.shutdown_all();
            Some(close_prepared(*p))
        }
        Phase::Receive(r) | Phase::Complete(r, ..) => Some(close_receiving(ctx, *r)),
        Phase::AwaitCommit(r, _) | Phase::Start(r) => Some(close_ready(ctx, *r)),
        Phase::Postcopy(r) => {
            // Not reached (a post-copy never fails as a whole): the guest
            // runs, so the VM is not discarded.
            r.close(ctx);
            None
        }
    };
    drop(vm);
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sources_abort_explains_a_closed_data_connection() {
        let closed = || Some(MigrationError::PeerClosed("data connection 1 ended".into()));
        let aborted = || MigrationError::PeerAborted("cancelled".into());
        assert!(matches!(
            cause(closed(), aborted()),
            MigrationError::PeerAborted(_)
        ));
        // A real failure recorded first stays the cause.
        let proto = Some(MigrationError::proto("bad frame"));
        assert!(matches!(
            cause(proto, aborted()),
            MigrationError::Protocol(_)
        ));
        // Otherwise the first error wins over what the state machine saw.
        assert!(matches!(
            cause(closed(), MigrationError::Aborted),
            MigrationError::PeerClosed(_)
        ));
        assert!(matches!(
            cause(None, aborted()),
            MigrationError::PeerAborted(_)
        ));
    }
}
