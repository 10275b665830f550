//! The destination side: one state machine accepting the connections,
//! checking compatibility, running the readers and device loads, and
//! completing (restore, start, "resumed") or cleaning up.
//!
//! ```text
//! WaitMain -> Setup -> AcceptData -> Receive --STATE--> Complete (restore, READY)
//!   -> AwaitCommit --COMMIT--> Start (start, RESUMED) -> Done
//! any state before COMMIT --error/cancel/abort/peer death--> cleanup (ERROR
//!   frame, threads joined, sockets closed, vm.discard()) -> Failed
//! ```
//!
//! The VM is started only after COMMIT arrived; from then on cancel is
//! ignored and a failure to send RESUMED leaves the VM running (the source,
//! which wrote COMMIT, stays paused and reports an uncertain outcome).

use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc::{self, channel, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{CancelToken, DeviceStateMode, ReceiveParams};
use crate::devrecv::{Ack, DeviceInbox};
use crate::error::MigrationError;
use crate::handshake::{Acceptor, Incoming};
use crate::net::{
    self, epoch_us, recv_header, recv_payload, Ctl, MainConn, Notify, Start, POLL_INTERVAL,
    STALL_TIMEOUT,
};
use crate::reader::{spawn_readers, DestRam, PassBarrier, ReaderCtx};
use crate::stats::{DeviceCounters, MigrationStats, Role, RxMeter};
use crate::traits::{DestinationFactory, DestinationVm};
use crate::wire::{self, Header, Kind, Setup, ROLE_DATA, ROLE_MAIN};

/// Default per-device reorder buffer bound.
pub const DEFAULT_DEVICE_BUFFER: u64 = 64 << 20;
/// Read timeout of the main connection while receiving (ack latency).
const MAIN_POLL: Duration = Duration::from_millis(10);
/// Interval of RATE frames (device load rates) while receiving.
const RATE_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecvState {
    WaitMain,
    Setup,
    AcceptData,
    Receive,
    Complete,
    AwaitCommit,
    Start,
    Done,
}

struct Receiver<'a> {
    factory: &'a dyn DestinationFactory,
    bound: u64,
    stats: Arc<MigrationStats>,
    ctl: Arc<Ctl>,
    acceptor: Option<Acceptor>,
    main: Option<Arc<MainConn>>,
    session: u128,
    n: usize,
    setup: Option<Setup>,
    vm: Option<Arc<dyn DestinationVm>>,
    rctx: Option<Arc<ReaderCtx>>,
    inbox: Option<Arc<DeviceInbox>>,
    ack_rx: Option<mpsc::Receiver<Ack>>,
    data: Vec<Option<TcpStream>>,
    readers: Vec<JoinHandle<()>>,
    ka_stop: Arc<AtomicBool>,
    keepalive: Option<JoinHandle<()>>,
    notify: Arc<Notify>,
    last_main: Instant,
    state: Option<(Header, Vec<u8>)>,
    /// After READY: (final pass, start paused, source pause µs, READY time).
    ready: Option<(u64, bool, u64, Instant)>,
    /// Device counters (load rates for RATE frames).
    counters: Vec<Arc<DeviceCounters>>,
    /// Last RATE round and the rate last sent per device.
    rates: (Instant, Vec<u64>),
    /// Live receive throughput shown as `throughput_bps` on this side.
    rx: RxMeter,
    error_sent: std::cell::Cell<bool>,
}

/// Receives one migration (see [`crate::receive`]).
pub fn run(
    listener: TcpListener,
    factory: &dyn DestinationFactory,
    params: &ReceiveParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    stats.begin();
    stats.set_role(Role::Destination);
    let bound = params
        .device_buffer_bytes
        .unwrap_or(DEFAULT_DEVICE_BUFFER)
        .max(wire::MAX_DEVICE_CHUNK);
    let mut r = Receiver {
        factory,
        bound,
        stats: stats.clone(),
        ctl: Ctl::new(cancel.clone(), STALL_TIMEOUT),
        acceptor: Some(Acceptor::start(listener)?),
        main: None,
        session: 0,
        n: 0,
        setup: None,
        vm: None,
        rctx: None,
        inbox: None,
        ack_rx: None,
        data: Vec::new(),
        readers: Vec::new(),
        ka_stop: Arc::new(AtomicBool::new(false)),
        keepalive: None,
        notify: Arc::new(Notify::default()),
        last_main: Instant::now(),
        state: None,
        ready: None,
        counters: Vec::new(),
        rates: (Instant::now(), Vec::new()),
        rx: RxMeter::new(),
        error_sent: std::cell::Cell::new(false),
    };
    match r.drive() {
        Ok(vm) => {
            r.shutdown_threads();
            Ok(vm)
        }
        Err(e) => {
            let e = r.cleanup(e);
            r.stats.fail(&e);
            log::error!("incoming migration failed: {e}");
            Err(e)
        }
    }
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

impl Receiver<'_> {
    fn drive(&mut self) -> Result<Arc<dyn DestinationVm>, MigrationError> {
        let mut st = RecvState::WaitMain;
        loop {
            // After COMMIT the VM is started whatever else failed meanwhile.
            if st != RecvState::Start {
                self.ctl.check()?;
            }
            st = match st {
                RecvState::WaitMain => self.wait_main()?,
                RecvState::Setup => self.do_setup()?,
                RecvState::AcceptData => self.accept_data()?,
                RecvState::Receive => self.receive_step()?,
                RecvState::Complete => self.complete()?,
                RecvState::AwaitCommit => self.await_commit()?,
                RecvState::Start => self.start_vm()?,
                RecvState::Done => break,
            };
        }
        self.vm
            .clone()
            .ok_or_else(|| MigrationError::proto("no VM"))
    }

    fn main(&self) -> Result<Arc<MainConn>, MigrationError> {
        self.main
            .clone()
            .ok_or_else(|| MigrationError::proto("main connection missing"))
    }

    fn refuse(&self, inc: Incoming, msg: &str) {
        if let Some(a) = &self.acceptor {
            a.refuse(inc.stream, inc.hello.session, msg.to_string());
        }
    }

    fn next_incoming(&self, timeout: Duration) -> Option<Incoming> {
        let a = self.acceptor.as_ref()?;
        match a.rx.recv_timeout(timeout) {
            Ok(i) => Some(i),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => None,
        }
    }

    fn wait_main(&mut self) -> Result<RecvState, MigrationError> {
        let Some(inc) = self.next_incoming(POLL_INTERVAL) else {
            return Ok(RecvState::WaitMain);
        };
        if inc.hello.a != ROLE_MAIN {
            self.refuse(inc, "no migration in progress for this data connection");
            return Ok(RecvState::WaitMain);
        }
        let h = inc.hello;
        let s = inc.stream;
        net::prepare_stream(&s, false)?;
        self.session = h.session;
        self.n = h.c as usize;
        let main = MainConn::new(s, h.session);
        main.send(
            Kind::Ok,
            (0, 0, 0),
            &[],
            &self.ctl,
            "accepting the main connection",
        )?;
        self.main = Some(main);
        log::info!(
            "incoming migration: session {:032x}, {} data connections",
            self.session,
            self.n
        );
        Ok(RecvState::Setup)
    }

    /// Sends ERROR(msg) on main and returns `e`.
    fn refuse_setup(&self, e: MigrationError) -> MigrationError {
        if let Some(m) = &self.main {
            m.send_message(Kind::Error, &e.to_string());
            self.error_sent.set(true);
        }
        e
    }

    fn do_setup(&mut self) -> Result<RecvState, MigrationError> {
        let main = self.main()?;
        let what = "reading the VM configuration";
        let start = Instant::now();
        let h = loop {
            match recv_header(&main.stream, &self.ctl, true, what)? {
                (Start::Full, Some(h)) => break h,
                (Start::Eof, _) => return Err(MigrationError::PeerClosed(what.into())),
                _ if start.elapsed() > self.ctl.stall => {
                    return Err(MigrationError::Timeout(what.into()))
                }
                _ => {}
            }
        };
        if h.kind != Kind::Setup || h.session != self.session {
            return Err(self.refuse_setup(MigrationError::proto(format!(
                "expected SETUP, got {:?}",
                h.kind
            ))));
        }
        let payload = recv_payload(&main.stream, h.len, &self.ctl, what)?;
        let setup = Setup::decode(&payload).map_err(|e| self.refuse_setup(e))?;
        let vm = self.factory.create(&setup.config).map_err(|e| {
            self.refuse_setup(MigrationError::Incompatible(format!(
                "VM configuration refused: {e}"
            )))
        })?;
        self.vm = Some(vm.clone());
        let regions = vm.ram();
        let dst: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
        if dst != setup.regions {
            return Err(self.refuse_setup(MigrationError::Incompatible(format!(
                "RAM layout differs: source {:x?}, destination {:x?}",
                setup.regions, dst
            ))));
        }
        let devices = vm.devices();
        let ids: Vec<String> = devices.iter().map(|d| d.id().to_string()).collect();
        let src_ids: Vec<String> = setup.devices.iter().map(|d| d.id.clone()).collect();
        if ids != src_ids {
            return Err(self.refuse_setup(MigrationError::Incompatible(format!(
                "devices differ: source {src_ids:?}, destination {ids:?}"
            ))));
        }
        self.stats
            .total_bytes
            .store(dst.iter().map(|r| r.1).sum(), Relaxed);
        self.stats.connections.store(self.n as u64, Relaxed);
        let counters = self.stats.set_devices(&ids);
        self.counters = counters.clone();
        let (tx, rx) = channel();
        let inbox = DeviceInbox::new(
            devices,
            counters,
            self.bound,
            self.ctl.clone(),
            tx,
            self.notify.clone(),
        );
        self.ack_rx = Some(rx);
        self.inbox = Some(inbox.clone());
        self.rctx = Some(Arc::new(ReaderCtx {
            ram: Arc::new(DestRam::new(regions)),
            barrier: Arc::new(PassBarrier::new(self.n)),
            inbox: (setup.device_mode == DeviceStateMode::Channels).then_some(inbox),
            session: self.session,
            ctl: self.ctl.clone(),
            stats: self.stats.clone(),
            chunk_max: setup.chunk_bytes,
            notify: self.notify.clone(),
            sealed: AtomicBool::new(false),
        }));
        self.setup = Some(setup);
        main.send(
            Kind::Ok,
            (0, 0, 0),
            &[],
            &self.ctl,
            "accepting the VM configuration",
        )?;
        self.data = (0..self.n).map(|_| None).collect();
        Ok(RecvState::AcceptData)
    }

    fn accept_data(&mut self) -> Result<RecvState, MigrationError> {
        let start = Instant::now();
        while self.data.iter().any(|d| d.is_none()) {
            self.ctl.check()?;
            if start.elapsed() > self.ctl.stall {
                return Err(MigrationError::Timeout(
                    "waiting for the data connections".into(),
                ));
            }
            let Some(inc) = self.next_incoming(POLL_INTERVAL) else {
                continue;
            };
            let h = inc.hello;
            let idx = h.b as usize;
            if h.session != self.session {
                self.refuse(inc, "another migration is in progress (session mismatch)");
            } else if h.a != ROLE_DATA || h.c as usize != self.n {
                self.refuse(inc, "unexpected connection role or count for this session");
            } else if !matches!(self.data.get(idx), Some(None)) {
                self.refuse(inc, &format!("duplicate data connection index {idx}"));
            } else {
                let ctl = &self.ctl;
                net::send_frame(
                    &inc.stream,
                    &Header::new(Kind::Ok, self.session),
                    &[],
                    ctl,
                    "accepting a data connection",
                )?;
                ctl.register(&inc.stream);
                self.data[idx] = Some(inc.stream);
            }
        }
        let streams: Vec<TcpStream> = self.data.iter_mut().filter_map(|d| d.take()).collect();
        let rctx = self
            .rctx
            .clone()
            .ok_or_else(|| MigrationError::proto("no reader context"))?;
        self.readers = spawn_readers(&rctx, streams)?;
        let main = self.main()?;
        main.stream
            .set_read_timeout(Some(MAIN_POLL))
            .map_err(|e| MigrationError::io("configuring the main connection", e))?;
        self.keepalive = net::spawn_keepalive(main, self.ctl.clone(), self.ka_stop.clone());
        self.stats.mark_setup_done();
        self.last_main = Instant::now();
        Ok(RecvState::Receive)
    }

    fn pump(&mut self) -> Result<(), MigrationError> {
        if let Some(rx) = &self.ack_rx {
            let acks: Vec<Ack> = rx.try_iter().collect();
            let main = self.main()?;
            for (dev, bytes, us) in acks {
                main.send(
                    Kind::Ack,
                    (dev as u64, bytes, us),
                    &[],
                    &self.ctl,
                    "sending a switch-over ack",
                )?;
            }
        }
        while let Some(inc) = self.next_incoming(Duration::ZERO) {
            self.refuse(inc, "a migration is already in progress");
        }
        Ok(())
    }

    /// Every [`RATE_INTERVAL`]: sends RATE for each device whose measured
    /// load rate changed, so the source's estimate uses fresh figures.
    fn send_rates(&mut self) -> Result<(), MigrationError> {
        if self.rates.0.elapsed() < RATE_INTERVAL {
            return Ok(());
        }
        self.rates.0 = Instant::now();
        self.rates.1.resize(self.counters.len(), 0);
        let main = self.main()?;
        for (i, c) in self.counters.iter().enumerate() {
            let rate = c.load_rate.load(Relaxed);
            if rate != 0 && rate != self.rates.1[i] {
                self.rates.1[i] = rate;
                let loaded = c.transferred.load(Relaxed);
                main.send(
                    Kind::Rate,
                    (i as u64, rate, loaded),
                    &[],
                    &self.ctl,
                    "sending a device load rate",
                )?;
            }
        }
        Ok(())
    }

    fn receive_step(&mut self) -> Result<RecvState, MigrationError> {
        self.pump()?;
        self.send_rates()?;
        self.rx.tick(&self.stats);
        let main = self.main()?;
        let what = "reading the main connection";
        let h = match recv_header(&main.stream, &self.ctl, true, what)? {
            (Start::Full, Some(h)) => h,
            (Start::Eof, _) => {
                return Err(MigrationError::PeerClosed(
                    "source closed the main connection".into(),
                ))
            }
            _ => {
                if self.last_main.elapsed() > self.ctl.stall {
                    return Err(MigrationError::Stalled(format!(
                        "source silent for {:?}",
                        self.ctl.stall
                    )));
                }
                return Ok(RecvState::Receive);
            }
        };
        self.last_main = Instant::now();
        if h.session != self.session {
            return Err(MigrationError::proto(
                "frame of another session on the main connection",
            ));
        }
        match h.kind {
            Kind::Keepalive => Ok(RecvState::Receive),
            Kind::Device => {
                let inbox = self
                    .inbox
                    .clone()
                    .ok_or_else(|| MigrationError::proto("device data without devices"))?;
                let chunk_max = self.setup.as_ref().map(|s| s.chunk_bytes).unwrap_or(0);
                if self.setup.as_ref().map(|s| s.device_mode) != Some(DeviceStateMode::Main) {
                    return Err(MigrationError::proto(
                        "device data on the main connection in channels mode",
                    ));
                }
                if h.len > chunk_max {
                    return Err(MigrationError::proto(format!(
                        "device chunk of {} bytes over {chunk_max}",
                        h.len
                    )));
                }
                inbox.check_index(h.a)?;
                let data = recv_payload(&main.stream, h.len, &self.ctl, what)?;
                inbox.deliver(h.a as usize, h.b, h.dev_item(), data)?;
                // The single-channel path is sequential end to end: the next
                // frame is read only once this chunk is in the device.
                inbox.wait_applied(h.a as usize)?;
                Ok(RecvState::Receive)
            }
            Kind::State => {
                let data = recv_payload(&main.stream, h.len, &self.ctl, "reading the VM state")?;
                self.state = Some((h, data));
                Ok(RecvState::Complete)
            }
            Kind::Abort => {
                let m = recv_payload(&main.stream, h.len, &self.ctl, what)?;
                Err(MigrationError::PeerAborted(wire::message_text(&m)))
            }
            k => Err(MigrationError::proto(format!(
                "unexpected {k:?} frame on the main connection"
            ))),
        }
    }

    fn complete(&mut self) -> Result<RecvState, MigrationError> {
        let (h, state) = self
            .state
            .take()
            .ok_or_else(|| MigrationError::proto("no state"))?;
        let (final_pass, paused, pause_us) = (h.a, h.b != 0, h.c);
        let rctx = self
            .rctx
            .clone()
            .ok_or_else(|| MigrationError::proto("no reader context"))?;
        let inbox = self
            .inbox
            .clone()
            .ok_or_else(|| MigrationError::proto("no inbox"))?;
        if final_pass == 0 || final_pass < rctx.barrier.completed() {
            return Err(MigrationError::proto(format!(
                "final pass {final_pass} is invalid"
            )));
        }
        // Wait for all passes and device loads (event driven: readers and
        // load threads notify).
        let progress = |r: &ReaderCtx| {
            (
                r.barrier.completed(),
                r.stats.transferred_bytes.load(Relaxed),
                inbox.progress(),
            )
        };
        let mut last = (Instant::now(), progress(&rctx));
        let mut ended_checked = false;
        loop {
            self.ctl.check()?;
            let g = self.notify.generation();
            self.pump()?;
            self.rx.tick(&self.stats);
            let done = rctx.barrier.completed();
            if done >= final_pass {
                if !ended_checked {
                    inbox.check_all_ended()?;
                    ended_checked = true;
                }
                if inbox.all_done() {
                    break;
                }
            }
            let now = progress(&rctx);
            if now != last.1 {
                last = (Instant::now(), now);
            } else if last.0.elapsed() > self.ctl.stall {
                return Err(MigrationError::Stalled(if done < final_pass {
                    "final pass not completing".into()
                } else {
                    "device state not loading".into()
                }));
            }
            self.notify.wait(g, POLL_INTERVAL);
        }
        // Seal: no reader applies anything from now on; wake and join them.
        rctx.sealed.store(true, SeqCst);
        self.ctl.shutdown_all();
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
        inbox.join();
        let vm = self
            .vm
            .clone()
            .ok_or_else(|| MigrationError::proto("no VM"))?;
        vm.restore_state(&state)
            .map_err(|e| MigrationError::vm("restoring the VM state", e))?;
        self.main()?
            .send(Kind::Ready, (0, 0, 0), &[], &self.ctl, "sending READY")?;
        self.ready = Some((final_pass, paused, pause_us, Instant::now()));
        Ok(RecvState::AwaitCommit)
    }

    /// Waits for COMMIT on the main connection, bounded by the stall timeout
    /// since READY; cancel, ABORT, EOF and errors fail (the VM is discarded
    /// and the source, which did not write COMMIT, resumes).
    fn await_commit(&mut self) -> Result<RecvState, MigrationError> {
        self.pump()?;
        let since = self.ready.map(|r| r.3).unwrap_or_else(Instant::now);
        let main = self.main()?;
        let what = "waiting for COMMIT";
        let h = match recv_header(&main.stream, &self.ctl, true, what)? {
            (Start::Full, Some(h)) => h,
            (Start::Eof, _) => {
                return Err(MigrationError::PeerClosed(
                    "source closed the main connection before COMMIT".into(),
                ))
            }
            _ => {
                if since.elapsed() > self.ctl.stall {
                    return Err(MigrationError::Timeout(format!(
                        "no COMMIT within {:?} of READY",
                        self.ctl.stall
                    )));
                }
                return Ok(RecvState::AwaitCommit);
            }
        };
        if h.session != self.session {
            return Err(MigrationError::proto(
                "frame of another session on the main connection",
            ));
        }
        match h.kind {
            Kind::Keepalive => Ok(RecvState::AwaitCommit),
            Kind::Commit => {
                // From here on cancel is ignored: the source never resumes.
                self.ctl.commit_point()?;
                Ok(RecvState::Start)
            }
            Kind::Abort => {
                let m = recv_payload(&main.stream, h.len, &self.ctl, what)?;
                Err(MigrationError::PeerAborted(wire::message_text(&m)))
            }
            k => Err(MigrationError::proto(format!(
                "unexpected {k:?} frame while waiting for COMMIT"
            ))),
        }
    }

    /// After COMMIT: starts the VM and sends RESUMED. A failure to send
    /// RESUMED does not undo the start (the source stays paused).
    fn start_vm(&mut self) -> Result<RecvState, MigrationError> {
        let (final_pass, paused, pause_us, _) = self
            .ready
            .ok_or_else(|| MigrationError::proto("COMMIT before READY"))?;
        let vm = self
            .vm
            .clone()
            .ok_or_else(|| MigrationError::proto("no VM"))?;
        vm.start(paused)
            .map_err(|e| MigrationError::vm("starting the VM", e))?;
        let resume_us = epoch_us();
        let main = self.main()?;
        crate::testhook::fire(crate::testhook::Point::BeforeResumed, &main.stream);
        // A private control block: an abort seen by another thread (e.g. a
        // failed keepalive) must not suppress RESUMED.
        let ctl = Ctl::new(CancelToken::default(), self.ctl.stall);
        if let Err(e) = main.send(
            Kind::Resumed,
            (resume_us, 0, 0),
            &[],
            &ctl,
            "sending RESUMED",
        ) {
            // The VM runs here now; the source wrote COMMIT and stays paused
            // with an uncertain outcome -- log loudly.
            log::error!("VM started but the source was not told: {e}");
        }
        self.stats.complete(pause_us, resume_us, None);
        log::info!(
            "incoming migration completed: {} passes, downtime {} ms{}",
            final_pass,
            resume_us.saturating_sub(pause_us) / 1000,
            if paused { " (started paused)" } else { "" }
        );
        Ok(RecvState::Done)
    }

    fn shutdown_threads(&mut self) {
        self.ka_stop.store(true, SeqCst);
        if let Some(h) = self.keepalive.take() {
            let _ = h.join();
        }
        self.ctl.shutdown_all();
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
        if let Some(i) = &self.inbox {
            i.join();
        }
        if let Some(m) = &self.main {
            let _ = m.stream.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.acceptor.take() {
            a.stop();
        }
    }

    /// Looks briefly for the source's ABORT message after a connection error.
    fn peer_abort_message(&self) -> Option<String> {
        let main = self.main.as_ref()?;
        let ctl = Ctl::new(CancelToken::default(), Duration::from_millis(500));
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(500) {
            match recv_header(&main.stream, &ctl, true, "reading an abort") {
                Ok((Start::Full, Some(h))) => {
                    let p = recv_payload(&main.stream, h.len, &ctl, "reading an abort").ok()?;
                    if h.kind == Kind::Abort {
                        return Some(wire::message_text(&p));
                    }
                }
                Ok((Start::Idle, _)) => {}
                _ => return None,
            }
        }
        None
    }

    fn cleanup(&mut self, e: MigrationError) -> MigrationError {
        let mut err = self.ctl.take_error().unwrap_or(e);
        self.ctl.fail(MigrationError::Aborted);
        if is_connection_error(&err) {
            if let Some(m) = self.peer_abort_message() {
                err = MigrationError::PeerAborted(m);
            }
        }
        if let Some(m) = &self.main {
            if !matches!(err, MigrationError::PeerAborted(_)) && !self.error_sent.get() {
                m.send_message(Kind::Error, &err.to_string());
            }
        }
        self.shutdown_threads();
        if let Some(vm) = self.vm.take() {
            vm.discard();
        }
        self.main = None;
        err
    }
}
