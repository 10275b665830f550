//! The source side: one state machine whose phases own their resources.
//!
//! ```text
//! Connecting -> Connected(main) -> Linked(main link, data plane)
//!   -> Streaming (dirty log, device streams; pass 1, 2, ...)
//!   --(converged/forced, all acks)--> Stopped (VM paused; final pass)
//!   -> SendState -> AwaitReady (devices stop-copied) --READY, COMMIT written--> Committed
//!   --RESUMED--> done
//! any phase before Committed --error/cancel/peer death--> abort: ABORT frame,
//!   threads joined, devices RUNNING, VM resumed, dirty log off -> Failed
//! Committed --peer death/ERROR/stall--> abort: threads joined, devices STOP,
//!   VM LEFT PAUSED, dirty log off -> Failed(CommitUncertain)
//! Committed --ERROR flagged "discarded" (the destination never started the
//!   guest)--> abort as before COMMIT (no ABORT frame) -> Failed
//! ```
//!
//! Each [`Phase`] variant owns exactly the resources of that phase, and the
//! undoable ones are guards (`guards`): dirty logging ([`DirtyLog`]), the
//! paused VM ([`PausedVm`], resumed if dropped before COMMIT), devices out of
//! RUNNING ([`RestoreDevices`] / [`StopDevices`]), started workers
//! ([`crate::worker::Workers`], aborted and joined if dropped). A step takes
//! its phase by value and returns the next one, or [`Failed`] with whatever
//! it holds at that moment, which [`abort`] tears down in order.
//!
//! The split-brain rule: once COMMIT has been written to the main connection
//! (phase `Committed`), the destination may start the guest at any moment,
//! so this side never resumes its VM again; cancel and the deadline are
//! ignored from then on (see `Ctl::commit_point`).

mod devices;
mod dirty;
mod dma;
mod guards;
mod hostshare;
mod link;
mod passes;
mod policy;
mod pool;
mod postcopy;
mod push;
mod setup;
mod switchover;
mod writer;
mod zerocopy;
mod zstd;

pub use dirty::runs_of;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{CancelToken, Hooks, SendParams};
use crate::error::MigrationError;
use crate::events::EventLog;
use crate::guest_mem::GuestMemory;
use crate::handshake::{parse_url, url_host, Dial};
use crate::live::LiveParams;
use crate::net::{lock, Channel, Ctl, MainConn};
use crate::stats::{DeviceCounters, MigrationStats, Role, SourceVmOutcome};
use crate::traits::{MigratableDevice, SourceVm};
use crate::wire::Frame;
use crate::worker::Workers;
use guards::{DirtyLog, PausedVm, RestoreDevices, StopDevices};
use link::{remote_cause, FromDest, Link};
use passes::Passes;
use pool::Pool;

/// Queue bound per connection (bytes of guest pages / device data).
const CONN_QUEUE_BYTES: u64 = 8 << 20;
/// Bound of device bytes queued and not yet written, all devices.
const DEVICE_INFLIGHT_BYTES: u64 = 32 << 20;
/// Poll interval while waiting for a pass to reach the wire.
const PASS_POLL: Duration = Duration::from_millis(5);
/// How long the destination may take to build its VM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// What every phase of one send shares (nothing in it changes with the
/// phase).
struct Ctx {
    vm: Arc<dyn SourceVm>,
    p: SendParams,
    stats: Arc<MigrationStats>,
    ctl: Arc<Ctl>,
    mem: Arc<GuestMemory>,
    devices: Vec<Arc<dyn MigratableDevice>>,
    counters: Vec<Arc<DeviceCounters>>,
    session: u128,
    from_dest: Arc<FromDest>,
    start: Instant,
    /// How to reach the destination (addresses, TLS).
    dial: Dial,
    /// The parameters, read at each decision (the API changes them).
    live: Arc<LiveParams>,
    /// Where events are reported.
    events: Arc<EventLog>,
    /// Data connections of this send (`p.connections` resolved).
    conns: u32,
    /// This send's registration on the host, if any.
    host_slot: Option<Arc<dyn crate::host::HostSlot>>,
    /// The host's migration budget in MiB/s (`None`: no sharing).
    host_max: Option<f64>,
    /// Where a paused post-copy leaves what a resume needs.
    resume: Arc<Mutex<Option<crate::api::ResumeToken>>>,
    /// The VMM refused a throttle once (it is not logged again).
    throttle_refused: std::sync::atomic::AtomicBool,
    /// The devices that write guest memory by DMA.
    dma: dma::DmaPlan,
    /// A post-copy request was refused once (it is not logged again).
    postcopy_refused: std::sync::atomic::AtomicBool,
    /// The VM of a `unix:` send, engaged when the destination accepted the
    /// memory handover (`None` over TCP).
    handover: Option<Arc<crate::handover::HandoverSource>>,
    /// The thread switching dirty logging on, started with the send so
    /// that the kernel's part (it grows with the guest's size) overlaps
    /// with connecting; joined by `link`, or by the teardown of a send
    /// that failed before it.
    dirty_on: Mutex<Option<std::thread::JoinHandle<Result<DirtyLog, MigrationError>>>>,
}

impl Drop for Ctx {
    /// However the send ended (a panic too), the thread switching dirty
    /// logging on is joined and its log stopped: it never outlives the
    /// send to stop the log of a later one.
    fn drop(&mut self) {
        self.drop_dirty_log();
    }
}

impl Ctx {
    /// Starts switching dirty logging on, on a thread (inline if no thread
    /// can be had: [`Ctx::dirty_log`] then starts it).
    fn start_dirty_log(&self) {
        let vm = self.vm.clone();
        let h = std::thread::Builder::new()
            .name("mig-dirty-on".into())
            .spawn(move || DirtyLog::start(&vm));
        match h {
            Ok(h) => *lock(&self.dirty_on) = Some(h),
            Err(e) => log::debug!("no thread to start dirty logging on ({e}); starting it later"),
        }
    }

    /// The dirty log, on: waits for the thread of [`Ctx::start_dirty_log`],
    /// or starts it here.
    fn dirty_log(&self) -> Result<DirtyLog, MigrationError> {
        match lock(&self.dirty_on).take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(MigrationError::Internal(
                    "the thread starting dirty logging panicked".into(),
                ))
            }),
            None => DirtyLog::start(&self.vm),
        }
    }

    /// A send that failed before `link`: waits for the thread of
    /// [`Ctx::start_dirty_log`] and switches dirty logging off again.
    fn drop_dirty_log(&self) {
        if let Some(h) = lock(&self.dirty_on).take() {
            drop(h.join());
        }
    }

    /// The parameters a pass decision uses: the live ones, except that with
    /// a device that writes guest memory by DMA a request for post-copy is
    /// refused (logged once) and pre-copy goes on.
    fn decision_params(&self) -> crate::live::MigrationParameters {
        let mut p = self.live.get();
        let asked = p.technique == crate::live::Technique::PostCopy
            || p.policy == crate::live::Policy::PostCopy;
        if asked {
            if let Some(why) = self.dma.postcopy_blocker(&self.devices) {
                if !self.postcopy_refused.swap(true, Relaxed) {
                    log::warn!("post-copy refused, pre-copy goes on: {why}");
                    self.events
                        .emit("postcopy-refused", serde_json::json!({ "reason": why }));
                }
                p.technique = crate::live::Technique::PreCopy;
                if p.policy == crate::live::Policy::PostCopy {
                    p.policy = crate::live::Policy::MinimalDowntime;
                }
            }
        }
        p
    }

    /// Throttles the vCPUs to `pct` percent, records it and reports it; a
    /// VMM that cannot throttle is logged once and the migration goes on.
    fn set_throttle(&self, pct: u32) {
        let old = self.stats.cpu_throttle_percent.load(Relaxed);
        if old == pct as u64 {
            return;
        }
        match self.vm.set_throttle(pct) {
            Ok(()) => {
                self.stats.cpu_throttle_percent.store(pct as u64, Relaxed);
                log::info!("vCPU throttle {old}% -> {pct}%");
                self.events
                    .emit("throttle-changed", serde_json::json!({ "percent": pct }));
            }
            Err(e) => {
                if !self.throttle_refused.swap(true, Relaxed) {
                    log::warn!(
                        "cannot throttle the vCPUs to {pct}%: {e}; auto-converge has no effect"
                    );
                }
            }
        }
    }

    /// Fails with the overall timeout once `timeout_s` has passed.
    fn check_timeout(&self) -> Result<(), MigrationError> {
        if self.start.elapsed() > Duration::from_secs(self.p.timeout_s) {
            return Err(MigrationError::Timeout(format!(
                "migration took longer than {} s",
                self.p.timeout_s
            )));
        }
        Ok(())
    }
}

/// The data connections with their queues and writer threads.
///
/// Invariant: dropping it aborts (if they still run) and joins the writers
/// before the sockets close.
struct DataPlane {
    /// Keeps the host's share and the operator's cap applied to `limiter`.
    _share: hostshare::ShareTicker,
    pool: Arc<Pool>,
    /// The writers' shared bandwidth bucket (changed live).
    limiter: Arc<pool::RateLimiter>,
    /// What the writers share (post-copy installs its push set there).
    wctx: Arc<writer::WriterCtx>,
    writers: Workers,
    _streams: Vec<Arc<Channel>>,
}

/// The main link and the data plane: what setup builds first.
struct Linked {
    link: Link,
    data: DataPlane,
    /// On from the start of the setup (see `setup::link`).
    dirty: DirtyLog,
}

/// Where device state streams from while the VM runs.
enum DeviceStreams {
    /// One save thread per device, onto the data connections.
    Channels(devices::DeviceSavers),
    /// Sequentially on the main connection; the pre-copy fds.
    Main(devices::MainModeDevices),
}

/// Pages stream while the VM runs.
struct Streaming {
    link: Link,
    data: DataPlane,
    devs: DeviceStreams,
    restore: RestoreDevices,
    dirty: DirtyLog,
    passes: Passes,
}

/// The VM is paused; the final pass is queued, devices still stream.
struct Stopped {
    link: Link,
    data: DataPlane,
    devs: DeviceStreams,
    restore: RestoreDevices,
    paused: PausedVm,
    dirty: DirtyLog,
    passes: Passes,
    /// When the VM was paused (monotonic, and µs since the epoch).
    pause_at: (Instant, u64),
    /// Post-copy follows instead of the final pass.
    post: Option<Box<postcopy::Plan>>,
}

/// Devices are stopped and copied; the VM state goes out, READY comes
/// back, COMMIT is written.
struct Switching {
    link: Link,
    data: DataPlane,
    restore: RestoreDevices,
    paused: PausedVm,
    dirty: DirtyLog,
    pass: u64,
    pause_at: (Instant, u64),
    post: Option<Box<postcopy::Plan>>,
}

/// COMMIT was written: the VM stays paused here whatever happens.
struct Committed {
    link: Link,
    data: DataPlane,
    stop: StopDevices,
    /// Off already in a resumed post-copy.
    dirty: Option<DirtyLog>,
    pass: u64,
    pause_at: (Instant, u64),
    commit_at: Instant,
    post: Option<Box<postcopy::Plan>>,
}

/// The phases of the sender; each variant owns that phase's resources.
enum Phase {
    /// Nothing acquired yet.
    Connecting,
    /// The main connection completed HELLO.
    Connected(Arc<MainConn>),
    /// SETUP accepted, data connections, main reader, keepalive and writers
    /// up.
    Linked(Box<Linked>),
    /// Passes while the VM runs.
    Streaming(Box<Streaming>),
    /// VM paused, final pass queued: devices stop-copy next.
    Stopped(Box<Stopped>),
    /// Devices done: the VM state is sent next.
    SendState(Box<Switching>),
    /// VM state sent: waiting for READY, then COMMIT.
    AwaitReady(Box<Switching>),
    /// COMMIT written: waiting for RESUMED.
    Committed(Box<Committed>),
    /// Post-copy: the guest runs on the destination, which pulls the
    /// missing pages; waiting for POSTCOPY_DONE.
    Postcopy(Box<Committed>),
    /// A send with `"resume": true`: reconnecting a paused post-copy.
    Resume(Box<crate::api::ResumeToken>),
}

/// A failed step of this state machine (see [`crate::phase::Failed`]).
type Failed = crate::phase::Failed<Phase>;
use crate::phase::or_fail;

/// Resolves the destination URL and loads the TLS configuration.
fn dial_for(p: &SendParams) -> Result<Dial, MigrationError> {
    if crate::handover::is_unix(&p.destination_url) {
        let path = crate::handover::parse_unix(&p.destination_url)?;
        p.client_tls()?;
        return Ok(Dial {
            addrs: Vec::new(),
            unix: Some(path),
            tls: None,
            version: p.wire_version(),
        });
    }
    let addrs = parse_url(&p.destination_url)?;
    let tls = match p.client_tls()? {
        Some(t) => Some((t, url_host(&p.destination_url)?)),
        None => None,
    };
    Ok(Dial {
        addrs,
        unix: None,
        tls,
        version: p.wire_version(),
    })
}

/// Runs a migration on the source (see [`crate::send()`]).
pub fn run(
    vm: Arc<dyn SourceVm>,
    p: &SendParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
    hooks: &Hooks,
) -> Result<(), MigrationError> {
    let ctl = Ctl::new(cancel.clone(), crate::testhook::stall_timeout());
    let dial = match dial_for(p) {
        Ok(d) => d,
        Err(e) => {
            stats.begin();
            stats.fail(&e);
            return Err(e);
        }
    };
    let handover = dial
        .unix
        .is_some()
        .then(|| crate::handover::HandoverSource::new(vm.clone()));
    let vm: Arc<dyn SourceVm> = match &handover {
        Some(h) => h.clone(),
        None => vm,
    };
    let devices = vm.devices();
    let dma = dma::DmaPlan::of(&devices);
    let refused = dma.check(&devices, p.allow_untracked_dma).and_then(|()| {
        let post = p.technique == Some(crate::live::Technique::PostCopy)
            || p.policy == Some(crate::live::Policy::PostCopy);
        match dma.postcopy_blocker(&devices) {
            Some(why) if post => Err(MigrationError::InvalidParams(format!(
                "post-copy is refused: {why}"
            ))),
            _ => Ok(()),
        }
    });
    if let Err(e) = refused {
        stats.begin();
        stats.fail(&e);
        log::error!("migration refused: {e}");
        return Err(e);
    }
    let mem = Arc::new(GuestMemory::of_source(&vm));
    let token = if p.resume {
        let t = lock(&hooks.resume).take();
        match t {
            Some(t) => Some(Box::new(t)),
            None => {
                let e = MigrationError::InvalidParams(
                    "\"resume\": true, but no post-copy of this VM is paused".into(),
                );
                stats.begin();
                stats.fail(&e);
                return Err(e);
            }
        }
    } else {
        None
    };
    stats.begin();
    stats.set_role(Role::Source);
    stats.set_transport(dial.tls.is_some());
    if dial.unix.is_some() {
        stats.set_unix_transport();
    }
    let (conns, why) = hostshare::choose_connections(p, &*vm, &dial, hooks);
    stats.connections.store(conns as u64, Relaxed);
    stats.set_connections_reason(why.clone());
    let host_slot = hostshare::register(hooks);
    stats
        .total_bytes
        .store(mem.regions().iter().map(|r| r.size()).sum(), Relaxed);
    let ids: Vec<String> = devices.iter().map(|d| d.id().to_string()).collect();
    let counters = stats.set_devices(&ids);
    let n = devices.len();
    let ctx = Ctx {
        vm,
        p: p.clone(),
        stats: stats.clone(),
        ctl,
        mem,
        devices,
        counters,
        session: token
            .as_ref()
            .map(|t| t.session)
            .unwrap_or_else(|| rand::random::<u128>() | 1),
        from_dest: Arc::new(FromDest {
            acks: Mutex::new(vec![None; n]),
            ..Default::default()
        }),
        start: Instant::now(),
        dial,
        live: hooks.live.clone(),
        events: hooks.events.clone(),
        conns,
        host_slot,
        host_max: hooks.host_max_mib_s,
        resume: hooks.resume.clone(),
        throttle_refused: Default::default(),
        dma,
        postcopy_refused: Default::default(),
        handover,
        dirty_on: Mutex::new(None),
    };
    ctx.stats.set_live(&ctx.live);
    ctx.events.emit(
        "migration-started",
        serde_json::json!({
            "role": "source",
            "destination_url": p.destination_url,
            "connections": conns,
            "connections_reason": why,
            "parameters": ctx.live.get(),
        }),
    );
    ctx.ctl.set_deadline(
        ctx.start + Duration::from_secs(p.timeout_s),
        format!("migration took longer than {} s", p.timeout_s),
    );
    let r = match token {
        Some(t) => drive_from(&ctx, Phase::Resume(t)),
        None => {
            ctx.start_dirty_log();
            drive_from(&ctx, Phase::Connecting)
        }
    };
    // The guest never stays slowed, however the migration ended.
    ctx.set_throttle(0);
    match r {
        Ok(c) => {
            c.finish();
            // The figures of the status (taken when the destination
            // reported the VM running), not the time until this event:
            // the dirty log is switched off in between.
            let us = ctx.stats.total_time_us();
            ctx.events.emit(
                "migration-completed",
                serde_json::json!({
                    "role": "source",
                    "total_time_ms": us.map(|u| u / 1000),
                    "total_time_us": us,
                }),
            );
            Ok(())
        }
        Err(f) => {
            let e = abort(&ctx, f);
            ctx.events.emit(
                if matches!(e, MigrationError::Cancelled | MigrationError::NoProgress(_)) {
                    "migration-cancelled"
                } else {
                    "migration-failed"
                },
                serde_json::json!({ "role": "source", "error": e.to_string() }),
            );
            ctx.stats.set_source_vm(match e {
                MigrationError::CommitUncertain { .. } => SourceVmOutcome::PausedUncertain,
                MigrationError::PostcopyPaused { .. } => SourceVmOutcome::PostcopyPaused,
                _ => SourceVmOutcome::Resumed,
            });
            ctx.stats.fail(&e);
            log::error!("migration failed: {e}");
            Err(e)
        }
    }
}

/// Runs the phases from `phase` until RESUMED arrived after COMMIT (and,
/// in post-copy, POSTCOPY_DONE).
fn drive_from(ctx: &Ctx, mut phase: Phase) -> Result<Box<Committed>, Failed> {
    loop {
        let committed = matches!(
            phase,
            Phase::Committed(_) | Phase::Postcopy(_) | Phase::Resume(_)
        );
        let checked = ctx.ctl.check().and_then(|()| {
            if committed {
                Ok(())
            } else {
                ctx.check_timeout()
            }
        });
        or_fail!(checked, phase);
        phase = match phase {
            Phase::Connecting => Phase::Connected(or_fail!(setup::connect_main(ctx), phase)),
            Phase::Connected(main) => setup::link(ctx, main)?,
            Phase::Linked(l) => setup::start_streaming(ctx, l)?,
            Phase::Streaming(s) => s.iterate(ctx)?,
            Phase::Stopped(s) => s.stop_copy(ctx)?,
            Phase::SendState(s) => s.send_state(ctx)?,
            Phase::AwaitReady(s) => s.commit(ctx)?,
            Phase::Committed(c) => {
                or_fail!(c.await_resumed(ctx), Phase::Committed(c));
                if c.post.is_none() {
                    return Ok(c);
                }
                Phase::Postcopy(c)
            }
            Phase::Postcopy(c) => {
                or_fail!(c.await_done(ctx), Phase::Postcopy(c));
                return Ok(c);
            }
            Phase::Resume(t) => postcopy::reconnect(ctx, t)?,
        };
    }
}

/// Stops everything after a failure and returns the error to report.
/// Before the commit point the VM runs again and devices are RUNNING; after
/// it (phase `Committed`) the VM stays paused, devices go to STOP and the
/// error is [`MigrationError::CommitUncertain`], unless the destination
/// reported that it discarded its VM without starting the guest
/// ([`Frame::Discarded`]): then the VM runs again as before the commit
/// point, and the error is the destination's. The phase's resources are
/// released in this order: main link (ABORT, reader, keepalive), writers,
/// device streams, devices, the paused VM, dirty logging.
fn abort(ctx: &Ctx, f: Failed) -> MigrationError {
    let err = ctx.ctl.take_error().unwrap_or(f.err);
    ctx.ctl.fail(MigrationError::Aborted);
    let err = release(ctx, f.phase, err);
    // A worker that panicked records its error only once its unwinding
    // reached `worker::spawn`, which can be after a consequence of the panic
    // (a peer that saw the stream end) was taken above. The teardown joined
    // every worker, so a panic is known now, and it is the cause to report.
    match ctx.ctl.take_error() {
        Some(panic @ MigrationError::Internal(_))
            if !matches!(
                err,
                MigrationError::Internal(_)
                    | MigrationError::CommitUncertain { .. }
                    | MigrationError::PostcopyPaused { .. }
            ) =>
        {
            log::warn!("reporting the panic rather than its consequence ({err})");
            panic
        }
        _ => err,
    }
}

/// Releases the resources of `phase` in the order [`abort`] documents and
/// returns the error to report.
fn release(ctx: &Ctx, phase: Phase, err: MigrationError) -> MigrationError {
    let fd = &*ctx.from_dest;
    match phase {
        Phase::Connecting => {
            ctx.drop_dirty_log();
            err
        }
        Phase::Connected(main) => {
            ctx.drop_dirty_log();
            if !matches!(err, MigrationError::Remote(_)) {
                main.send_message(|len| Frame::Abort { len }, &err.to_string());
            }
            let _ = main.stream.tcp().shutdown(std::net::Shutdown::Both);
            remote_cause(err, fd)
        }
        Phase::Linked(l) => {
            let Linked { link, data, dirty } = *l;
            let err = link.abort(err, false, fd);
            drop(data);
            drop(dirty);
            err
        }
        Phase::Streaming(s) => {
            let Streaming {
                link,
                data,
                devs,
                restore,
                dirty,
                passes,
            } = *s;
            let err = link.abort(err, false, fd);
            drop(data);
            drop(devs);
            drop(restore);
            drop(dirty);
            drop(passes);
            err
        }
        Phase::Stopped(s) => {
            let Stopped {
                link,
                data,
                devs,
                restore,
                paused,
                dirty,
                ..
            } = *s;
            let err = link.abort(err, false, fd);
            drop(data);
            drop(devs);
            drop(restore);
            drop(paused);
            drop(dirty);
            err
        }
        Phase::SendState(s) | Phase::AwaitReady(s) => {
            let Switching {
                link,
                data,
                restore,
                paused,
                dirty,
                ..
            } = *s;
            let err = link.abort(err, false, fd);
            drop(data);
            drop(restore);
            drop(paused);
            drop(dirty);
            err
        }
        Phase::Committed(c) => {
            let Committed {
                link,
                data,
                stop,
                dirty,
                pause_at,
                post,
                ..
            } = *c;
            let err = link.abort(err, true, fd);
            drop(data);
            // The reader was joined: whether the destination reported a
            // discarded, never started VM is final now.
            if fd.discarded.load(std::sync::atomic::Ordering::SeqCst) {
                log::warn!("the destination discarded its VM without starting it; resuming here");
                drop(stop.reclaim());
                drop(PausedVm::reclaim(&ctx.vm));
                drop(dirty);
                return err;
            }
            drop(stop);
            drop(dirty);
            if post.is_some() {
                // Post-copy: if the destination started the guest it waits
                // for a resume; the pages stay here.
                return postcopy::paused(ctx, err, pause_at.1, None, 0, 0);
            }
            let err = match err {
                e @ MigrationError::CommitUncertain { .. } => e,
                cause => MigrationError::CommitUncertain {
                    cause: Box::new(cause),
                },
            };
            log::error!("{err}; the source VM stays paused");
            err
        }
        Phase::Postcopy(c) => {
            let Committed {
                link,
                data,
                stop,
                dirty,
                pause_at,
                post,
                ..
            } = *c;
            let err = link.abort(err, true, fd);
            drop(data);
            drop(stop);
            drop(dirty);
            let (resume_us, ack_ms, epoch) =
                post.as_ref().map(|p| p.times()).unwrap_or((None, 0, 0));
            postcopy::paused(ctx, err, pause_at.1, resume_us, ack_ms, epoch)
        }
        Phase::Resume(t) => postcopy::paused(ctx, err, t.pause_us, t.resume_us, t.ack_ms, t.epoch),
    }
}
