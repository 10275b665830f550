//! The source side: one state machine driving connections, passes, device
//! streams, switch-over and cleanup.
//!
//! ```text
//! Connect -> Setup -> FirstPass -> Iterate --(converged/forced, all acks)--> StopVm
//!   -> DeviceStopCopy -> SendState -> AwaitReady --READY, COMMIT written--> AwaitResumed -> Done
//! any state before COMMIT --error/cancel/peer death--> cleanup (abort frame,
//!   threads joined, devices RUNNING, VM resumed, dirty log off) -> Failed
//! AwaitResumed --peer death/ERROR/stall--> cleanup (threads joined, devices
//!   STOP, VM LEFT PAUSED, dirty log off) -> Failed(CommitUncertain)
//! ```
//!
//! The split-brain rule: once COMMIT has been written to the main connection
//! (`committed`), the destination may start the guest at any moment, so this
//! side never resumes its VM again; cancel and the deadline are ignored from
//! then on (see `Ctl::commit_point`).

use std::sync::atomic::{AtomicBool, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::{CancelToken, DeviceStateMode, SendParams};
use crate::convergence::{Convergence, Decision};
use crate::devsend::{does_precopy, DeviceSavers, MainModeDevices};
use crate::dirty::{count_dirty, merge, Packetizer};
use crate::error::MigrationError;
use crate::handshake::{await_reply, connect, parse_url};
use crate::net::{self, epoch_us, lock, Ctl, MainConn, STALL_TIMEOUT};
use crate::pool::{Item, Pool, RateLimiter};
use crate::srcmain::{main_reader, FromDest};
use crate::stats::{DeviceCounters, MigrationStats, Role, SourceVmOutcome};
use crate::traits::{DirtyBitmap, MigState, MigratableDevice, RamRegion, SourceVm, PAGE_SIZE};
use crate::wire::{self, DeviceDesc, Kind, Setup, ROLE_DATA, ROLE_MAIN};
use crate::writer::{spawn_writers, WriterCtx};

/// Passes after which switch-over is forced (with a warning).
pub const MAX_PASSES: u64 = 30;
/// Queue bound per connection (bytes of guest pages / device data).
const CONN_QUEUE_BYTES: u64 = 8 << 20;
/// Bound of device bytes queued and not yet written, all devices.
const DEVICE_INFLIGHT_BYTES: u64 = 32 << 20;
/// Poll interval while waiting for a pass to reach the wire.
const PASS_POLL: Duration = Duration::from_millis(5);
/// How long the destination may take to build its VM.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// States of the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SendState {
    Connect,
    Setup,
    FirstPass,
    Iterate,
    StopVm,
    DeviceStopCopy,
    SendVmState,
    AwaitReady,
    AwaitResumed,
    Done,
}

struct Sender {
    vm: Arc<dyn SourceVm>,
    p: SendParams,
    stats: Arc<MigrationStats>,
    ctl: Arc<Ctl>,
    regions: Vec<RamRegion>,
    devices: Vec<Arc<dyn MigratableDevice>>,
    counters: Vec<Arc<DeviceCounters>>,
    session: u128,
    main: Option<Arc<MainConn>>,
    from_dest: Arc<FromDest>,
    reader_stop: CancelToken,
    reader: Option<JoinHandle<()>>,
    ka_stop: Arc<AtomicBool>,
    keepalive: Option<JoinHandle<()>>,
    pool: Option<Arc<Pool>>,
    writers: Vec<JoinHandle<()>>,
    data: Vec<std::net::TcpStream>,
    savers: Option<DeviceSavers>,
    mainmode: MainModeDevices,
    dirty_log: bool,
    paused: bool,
    /// COMMIT was written: the VM must never be resumed here again.
    committed: bool,
    pause_at: Option<(Instant, u64)>,
    commit_at: Option<Instant>,
    start: Instant,
    pass: u64,
    /// RAM pages queued by all passes so far. Invariant: a pass is fully on
    /// the wire once `pool.pages_done >= pages_queued` (writers count every
    /// page of a RAM item, data or zero marker, exactly once).
    pages_queued: u64,
    held: Vec<DirtyBitmap>,
    conv: Convergence,
    last_sample: (Instant, u64, u64),
    last_fetch: Instant,
    forced_warned: bool,
}

/// Runs a migration on the source (see [`crate::send`]).
pub fn run(
    vm: Arc<dyn SourceVm>,
    p: &SendParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
) -> Result<(), MigrationError> {
    let ctl = Ctl::new(cancel.clone(), STALL_TIMEOUT);
    let devices = vm.devices();
    let regions = vm.ram();
    stats.begin();
    stats.set_role(Role::Source);
    stats.connections.store(p.connections as u64, Relaxed);
    stats
        .total_bytes
        .store(regions.iter().map(|r| r.size).sum(), Relaxed);
    let ids: Vec<String> = devices.iter().map(|d| d.id().to_string()).collect();
    let counters = stats.set_devices(&ids);
    let n = devices.len();
    let mut s = Sender {
        vm,
        p: p.clone(),
        stats: stats.clone(),
        ctl,
        regions,
        mainmode: MainModeDevices::new(n),
        devices,
        counters,
        session: rand::random::<u128>() | 1,
        main: None,
        from_dest: Arc::new(FromDest {
            acks: Mutex::new(vec![None; n]),
            ..Default::default()
        }),
        reader_stop: CancelToken::default(),
        reader: None,
        ka_stop: Arc::new(AtomicBool::new(false)),
        keepalive: None,
        pool: None,
        writers: Vec::new(),
        data: Vec::new(),
        savers: None,
        dirty_log: false,
        paused: false,
        committed: false,
        pause_at: None,
        commit_at: None,
        start: Instant::now(),
        pass: 0,
        pages_queued: 0,
        held: Vec::new(),
        conv: Convergence::new(Duration::from_millis(p.downtime_ms), MAX_PASSES),
        last_sample: (Instant::now(), 0, 0),
        last_fetch: Instant::now(),
        forced_warned: false,
    };
    s.ctl.set_deadline(
        s.start + Duration::from_secs(p.timeout_s),
        format!("migration took longer than {} s", p.timeout_s),
    );
    match s.drive() {
        Ok(()) => {
            s.finish_ok();
            Ok(())
        }
        Err(e) => {
            let e = s.cleanup(e);
            s.stats.set_source_vm(if s.committed {
                SourceVmOutcome::PausedUncertain
            } else {
                SourceVmOutcome::Resumed
            });
            s.stats.fail(&e);
            log::error!("migration failed: {e}");
            Err(e)
        }
    }
}

impl Sender {
    fn drive(&mut self) -> Result<(), MigrationError> {
        let mut st = SendState::Connect;
        while st != SendState::Done {
            log::debug!("sender: {st:?}");
            self.ctl.check()?;
            if !self.committed && self.start.elapsed() > Duration::from_secs(self.p.timeout_s) {
                return Err(MigrationError::Timeout(format!(
                    "migration took longer than {} s",
                    self.p.timeout_s
                )));
            }
            st = match st {
                SendState::Connect => self.connect_main()?,
                SendState::Setup => self.setup()?,
                SendState::FirstPass => self.first_pass()?,
                SendState::Iterate => self.iterate()?,
                SendState::StopVm => self.stop_vm()?,
                SendState::DeviceStopCopy => self.device_stop_copy()?,
                SendState::SendVmState => self.send_state()?,
                SendState::AwaitReady => self.await_ready_and_commit()?,
                SendState::AwaitResumed => self.await_resumed()?,
                SendState::Done => SendState::Done,
            };
        }
        Ok(())
    }

    fn main(&self) -> Result<&Arc<MainConn>, MigrationError> {
        self.main
            .as_ref()
            .ok_or_else(|| MigrationError::proto("main connection missing"))
    }

    fn pool(&self) -> Result<Arc<Pool>, MigrationError> {
        self.pool
            .clone()
            .ok_or_else(|| MigrationError::proto("data connections missing"))
    }

    fn connect_main(&mut self) -> Result<SendState, MigrationError> {
        let addrs = parse_url(&self.p.destination_url)?;
        let n = self.p.connections as u64;
        let s = connect(&addrs, self.session, ROLE_MAIN, 0, n, &self.ctl)?;
        self.main = Some(MainConn::new(s, self.session));
        Ok(SendState::Setup)
    }

    fn setup(&mut self) -> Result<SendState, MigrationError> {
        let config = self
            .vm
            .config()
            .map_err(|e| MigrationError::vm("serializing the VM configuration", e))?;
        if config.len() as u64 > wire::MAX_CONFIG_LEN {
            return Err(MigrationError::InvalidParams(format!(
                "VM configuration of {} bytes is too large",
                config.len()
            )));
        }
        let setup = Setup {
            config,
            regions: self.regions.iter().map(|r| (r.gpa, r.size)).collect(),
            devices: self
                .devices
                .iter()
                .map(|d| DeviceDesc {
                    id: d.id().to_string(),
                    caps: d.caps(),
                })
                .collect(),
            chunk_bytes: self.p.device_chunk_bytes,
            device_mode: self.p.device_state,
        };
        let main = self.main()?.clone();
        main.send(
            Kind::Setup,
            (0, 0, 0),
            &setup.encode(),
            &self.ctl,
            "sending the VM configuration",
        )?;
        await_reply(
            &main.stream,
            self.session,
            &self.ctl,
            SETUP_TIMEOUT,
            "waiting for the destination to accept the configuration",
        )?;

        let addrs = parse_url(&self.p.destination_url)?;
        let n = self.p.connections as u64;
        for i in 0..n {
            let s = connect(&addrs, self.session, ROLE_DATA, i, n, &self.ctl)?;
            self.ctl.register(&s);
            self.data.push(s);
        }
        // Threads: main reader, keepalive, writers, device savers.
        let rctl = Ctl::new(self.reader_stop.clone(), STALL_TIMEOUT);
        let (m, c, fd, cnt) = (
            main.clone(),
            self.ctl.clone(),
            self.from_dest.clone(),
            self.counters.clone(),
        );
        self.reader = Some(
            std::thread::Builder::new()
                .name("mig-main-reader".into())
                .spawn(move || main_reader(&m, &rctl, &c, &fd, &cnt))
                .map_err(|e| MigrationError::io("spawning the main reader", e))?,
        );
        self.keepalive = net::spawn_keepalive(main.clone(), self.ctl.clone(), self.ka_stop.clone());
        let pool = Pool::new(
            n as usize,
            self.devices.len(),
            CONN_QUEUE_BYTES,
            DEVICE_INFLIGHT_BYTES,
            self.ctl.clone(),
        );
        let limiter = self
            .p
            .max_bandwidth_mbps
            .map(|m| RateLimiter::new(m * 1024.0 * 1024.0));
        let ctx = Arc::new(WriterCtx {
            pool: pool.clone(),
            regions: self.regions.clone(),
            session: self.session,
            stats: self.stats.clone(),
            devs: self.counters.clone(),
            limiter,
            ctl: self.ctl.clone(),
        });
        let streams = self
            .data
            .iter()
            .map(|s| {
                s.try_clone()
                    .map_err(|e| MigrationError::io("cloning a data socket", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.writers = spawn_writers(ctx, streams)?;
        self.pool = Some(pool.clone());
        self.stats.mark_setup_done();
        log::info!(
            "migration to {} set up: {} data connections, {} devices",
            self.p.destination_url,
            n,
            self.devices.len()
        );
        self.vm
            .start_dirty_log()
            .map_err(|e| MigrationError::vm("starting dirty logging", e))?;
        self.dirty_log = true;
        let chunk = self.p.device_chunk_bytes as usize;
        match self.p.device_state {
            DeviceStateMode::Channels => {
                self.savers = Some(DeviceSavers::spawn(
                    &self.devices,
                    &pool,
                    &self.ctl,
                    &self.counters,
                    chunk,
                    self.p.device_precopy,
                )?);
            }
            DeviceStateMode::Main => {
                let (devs, cnt, pre) = (
                    self.devices.clone(),
                    self.counters.clone(),
                    self.p.device_precopy,
                );
                self.mainmode
                    .precopy(&devs, &cnt, &main, &self.ctl, chunk, pre)?;
            }
        }
        Ok(SendState::FirstPass)
    }

    fn first_pass(&mut self) -> Result<SendState, MigrationError> {
        let pool = self.pool()?;
        self.pass = 1;
        self.stats.iteration.store(1, Relaxed);
        self.last_fetch = Instant::now();
        self.last_sample = (Instant::now(), 0, 0);
        let mut pk = Packetizer::new(&pool, &*self.vm, &self.regions, 1);
        for i in 0..self.regions.len() {
            let ranges = self
                .vm
                .populated(i)
                .map_err(|e| MigrationError::vm("listing populated memory", e))?;
            pk.add_populated(i, &ranges)?;
        }
        let pages = pk.finish()?;
        self.pages_queued += pages;
        pool.push_all(|| Item::Sync { pass: 1 });
        log::info!("pass 1: {pages} populated pages queued");
        Ok(SendState::Iterate)
    }

    fn fetch_all(&mut self) -> Result<u64, MigrationError> {
        let mut pages = 0;
        self.held.resize(self.regions.len(), DirtyBitmap::default());
        for i in 0..self.regions.len() {
            let bm = self
                .vm
                .fetch_dirty(i)
                .map_err(|e| MigrationError::vm("fetching the dirty log", e))?;
            merge(&mut self.held[i], &bm);
            pages += count_dirty(&self.held[i], self.regions[i].pages());
        }
        Ok(pages)
    }

    fn precopy_devices(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|&i| does_precopy(&*self.devices[i], self.p.device_precopy))
            .collect()
    }

    fn acks_complete(&self) -> bool {
        let acks = lock(&self.from_dest.acks);
        self.precopy_devices()
            .iter()
            .all(|&i| acks.get(i).is_some_and(|a| a.is_some()))
    }

    fn device_estimate(&self) -> (u64, Duration) {
        let mut bytes = 0;
        let mut load = Duration::ZERO;
        for c in &self.counters {
            let r = c.remaining.load(Relaxed);
            bytes += r;
            let rate = c.load_rate.load(Relaxed);
            if rate > 0 {
                load = load.max(Duration::from_secs_f64(r as f64 / rate as f64));
            }
        }
        (bytes, load)
    }

    fn send_held(&mut self, pass: u64) -> Result<u64, MigrationError> {
        let pool = self.pool()?;
        let held = std::mem::take(&mut self.held);
        let mut pk = Packetizer::new(&pool, &*self.vm, &self.regions, pass);
        for (i, bm) in held.iter().enumerate() {
            pk.add_bitmap(i, bm)?;
        }
        let pages = pk.finish()?;
        self.pages_queued += pages;
        Ok(pages)
    }

    /// Waits until every RAM page queued so far has been written (the
    /// previous pass is complete), polling cancel/deadline/peer failure.
    ///
    /// Without this wait a pass would be "done" as soon as it was queued:
    /// with a slow link (e.g. `max_bandwidth_mbps`) the bounded queues still
    /// hold megabytes of pass 1, the estimate counts that backlog, never
    /// fits, and passes that find nothing dirty are counted at CPU speed
    /// until the forced switch-over, which then has to drain the backlog
    /// with the VM paused.
    fn await_pass_drained(&self, pool: &Pool) -> Result<(), MigrationError> {
        loop {
            let done = pool.pages_done.load(Relaxed);
            self.stats
                .remaining_bytes
                .store(self.pages_queued.saturating_sub(done) * PAGE_SIZE, Relaxed);
            if done >= self.pages_queued {
                return Ok(());
            }
            self.ctl.check()?;
            if self.start.elapsed() > Duration::from_secs(self.p.timeout_s) {
                return Err(MigrationError::Timeout(format!(
                    "migration took longer than {} s",
                    self.p.timeout_s
                )));
            }
            std::thread::sleep(PASS_POLL);
        }
    }

    fn iterate(&mut self) -> Result<SendState, MigrationError> {
        let pool = self.pool()?;
        self.await_pass_drained(&pool)?;
        let now = Instant::now();
        let (t0, p0, b0) = self.last_sample;
        let (p1, b1) = (pool.pages_done.load(Relaxed), pool.sent_bytes.load(Relaxed));
        self.conv
            .record_transfer((p1 - p0) * PAGE_SIZE, b1 - b0, now - t0);
        self.last_sample = (now, p1, b1);

        let dirty_pages = self.fetch_all()?;
        let dirty = dirty_pages * PAGE_SIZE;
        self.conv.record_dirty(dirty, self.last_fetch.elapsed());
        self.last_fetch = Instant::now();
        let (dev_bytes, dev_load) = self.device_estimate();
        let est = self
            .conv
            .estimate(dirty + pool.backlog() + dev_bytes, dev_load);
        let st = &self.stats;
        st.remaining_bytes.store(dirty, Relaxed);
        st.throughput_bps
            .store(self.conv.wire_rate() as u64, Relaxed);
        st.dirty_rate_bps
            .store(self.conv.dirty_rate() as u64, Relaxed);
        st.expected_downtime_ms
            .store(est.as_millis() as u64, Relaxed);
        let decision = self.conv.decide(self.pass, est);
        let acks = self.acks_complete();
        log::debug!(
            "after pass {}: {dirty} dirty bytes, estimate {est:?}, {decision:?}, acks {acks}",
            self.pass
        );
        if decision != Decision::Continue && acks {
            if decision == Decision::Forced {
                log::warn!(
                    "migration is not converging after {} passes (estimated downtime {est:?} > {} ms): forcing switch-over",
                    self.pass,
                    self.p.downtime_ms
                );
            }
            return Ok(SendState::StopVm);
        }
        if decision != Decision::Continue {
            if !self.forced_warned {
                log::info!(
                    "converged; waiting for the destination to load the devices' initial data"
                );
                self.forced_warned = true;
            }
            if dirty_pages == 0 {
                let g = self.from_dest.notify.generation();
                self.from_dest.notify.wait(g, Duration::from_millis(20));
            }
        }
        self.pass += 1;
        self.stats.iteration.store(self.pass, Relaxed);
        let queued = self.send_held(self.pass)?;
        let pass = self.pass;
        pool.push_all(|| Item::Sync { pass });
        log::debug!("pass {pass}: {queued} pages queued");
        Ok(SendState::Iterate)
    }

    fn stop_vm(&mut self) -> Result<SendState, MigrationError> {
        self.vm
            .pause()
            .map_err(|e| MigrationError::vm("pausing the VM", e))?;
        self.paused = true;
        self.pause_at = Some((Instant::now(), epoch_us()));
        self.fetch_all()?;
        self.pass += 1;
        self.stats.iteration.store(self.pass, Relaxed);
        let pages = self.send_held(self.pass)?;
        log::info!(
            "VM paused; final pass {} with {pages} pages queued",
            self.pass
        );
        Ok(SendState::DeviceStopCopy)
    }

    fn device_stop_copy(&mut self) -> Result<SendState, MigrationError> {
        let pool = self.pool()?;
        let pass = self.pass;
        match self.p.device_state {
            DeviceStateMode::Channels => {
                if let Some(s) = self.savers.take() {
                    s.join()?;
                }
                pool.push_all(|| Item::Sync { pass });
                pool.push_all(|| Item::Close);
            }
            DeviceStateMode::Main => {
                pool.push_all(|| Item::Sync { pass });
                pool.push_all(|| Item::Close);
                let main = self.main()?.clone();
                let (devs, cnt) = (self.devices.clone(), self.counters.clone());
                self.mainmode.stop_copy(
                    &devs,
                    &cnt,
                    &main,
                    &self.ctl,
                    self.p.device_chunk_bytes as usize,
                )?;
            }
        }
        Ok(SendState::SendVmState)
    }

    fn send_state(&mut self) -> Result<SendState, MigrationError> {
        let state = self
            .vm
            .save_state()
            .map_err(|e| MigrationError::vm("saving the VM state", e))?;
        if state.len() as u64 > wire::MAX_STATE_LEN {
            return Err(MigrationError::vm(
                "saving the VM state",
                crate::traits::BackendError::new("state too large"),
            ));
        }
        let pause_us = self.pause_at.map(|p| p.1).unwrap_or(0);
        let up = self.vm.user_paused() as u64;
        self.main()?.send(
            Kind::State,
            (self.pass, up, pause_us),
            &state,
            &self.ctl,
            "sending the VM state",
        )?;
        Ok(SendState::AwaitReady)
    }

    /// Waits for READY, then passes the commit point and writes COMMIT.
    /// Cancel, the deadline and any failure before the COMMIT write
    /// completed lead to the normal cleanup (the VM resumes here): a COMMIT
    /// whose write failed never reached the destination whole, so it cannot
    /// have started the guest.
    fn await_ready_and_commit(&mut self) -> Result<SendState, MigrationError> {
        loop {
            self.ctl.check()?;
            if self.from_dest.ready.load(SeqCst) {
                break;
            }
            if self.start.elapsed() > Duration::from_secs(self.p.timeout_s) {
                return Err(MigrationError::Timeout(format!(
                    "migration took longer than {} s",
                    self.p.timeout_s
                )));
            }
            let g = self.from_dest.notify.generation();
            if !self.from_dest.ready.load(SeqCst) {
                self.from_dest.notify.wait(g, Duration::from_millis(50));
            }
        }
        let main = self.main()?.clone();
        crate::testhook::fire(crate::testhook::Point::BeforeCommit, &main.stream);
        // Cancel and the deadline are honoured up to here and ignored after.
        self.ctl.commit_point()?;
        self.from_dest.commit_sent.store(true, SeqCst);
        main.send(Kind::Commit, (0, 0, 0), &[], &self.ctl, "sending COMMIT")?;
        self.committed = true;
        self.commit_at = Some(Instant::now());
        log::info!("switch-over committed; waiting for the destination to start the VM");
        crate::testhook::fire(crate::testhook::Point::AfterCommit, &main.stream);
        Ok(SendState::AwaitResumed)
    }

    /// After COMMIT: waits for RESUMED, bounded by the stall timeout. Any
    /// failure here becomes [`MigrationError::CommitUncertain`] in cleanup.
    fn await_resumed(&mut self) -> Result<SendState, MigrationError> {
        let since = self.commit_at.unwrap_or_else(Instant::now);
        loop {
            if let Some(ts) = *lock(&self.from_dest.resumed) {
                let (pi, pu) = self.pause_at.unwrap_or((Instant::now(), ts));
                let ack_ms = pi.elapsed().as_millis() as u64;
                self.stats.set_source_vm(SourceVmOutcome::Migrated);
                self.stats.complete(pu, ts, Some(ack_ms));
                log::info!(
                    "migration completed: downtime {} ms (pause→ack {ack_ms} ms), {} passes",
                    ts.saturating_sub(pu) / 1000,
                    self.pass
                );
                return Ok(SendState::Done);
            }
            // Ignores cancel and the deadline (committed); fails on a real
            // failure reported by the main reader.
            self.ctl.check()?;
            if since.elapsed() > self.ctl.stall {
                return Err(MigrationError::Timeout(format!(
                    "no RESUMED within {:?} of COMMIT",
                    self.ctl.stall
                )));
            }
            let g = self.from_dest.notify.generation();
            if lock(&self.from_dest.resumed).is_none() {
                self.from_dest.notify.wait(g, Duration::from_millis(50));
            }
        }
    }

    fn join_threads(&mut self) {
        self.ka_stop.store(true, SeqCst);
        for h in self.writers.drain(..) {
            let _ = h.join();
        }
        if let Some(s) = self.savers.take() {
            let _ = s.join();
        }
        if let Some(h) = self.keepalive.take() {
            let _ = h.join();
        }
    }

    fn finish_ok(&mut self) {
        self.join_threads();
        self.reader_stop.cancel();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        for d in &self.devices {
            if let Err(e) = d.set_state(MigState::Stop) {
                log::warn!("device {}: STOP after migration: {e}", d.id());
            }
        }
        if let Err(e) = self.vm.stop_dirty_log() {
            log::warn!("stopping dirty logging: {e}");
        }
        self.dirty_log = false;
    }

    /// Stops everything after `e`; returns the error to report. Before the
    /// commit point the VM runs again and devices are RUNNING; after it
    /// (`committed`) the VM stays paused, devices go to STOP and the error is
    /// [`MigrationError::CommitUncertain`].
    fn cleanup(&mut self, e: MigrationError) -> MigrationError {
        let mut err = match self.ctl.take_error() {
            Some(first) => first,
            None => e,
        };
        self.ctl.fail(MigrationError::Aborted);
        if let Some(m) = &self.main {
            // After COMMIT an ABORT would be read after the COMMIT and ignored.
            if !matches!(err, MigrationError::Remote(_)) && !self.committed {
                m.send_message(Kind::Abort, &err.to_string());
            }
            // Let the reader pick up the destination's own error message.
            let until = Instant::now() + Duration::from_secs(1);
            while Instant::now() < until && self.reader.as_ref().is_some_and(|h| !h.is_finished()) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = m.stream.shutdown(std::net::Shutdown::Both);
        }
        self.reader_stop.cancel();
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        if matches!(
            err,
            MigrationError::Io { .. }
                | MigrationError::PeerClosed(_)
                | MigrationError::Stalled(_)
                | MigrationError::Aborted
        ) {
            if let Some(m) = lock(&self.from_dest.remote_error).take() {
                err = MigrationError::Remote(m);
            }
        }
        self.join_threads();
        self.mainmode.close();
        if self.committed {
            return self.cleanup_committed(err);
        }
        for d in &self.devices {
            match d.state() {
                Ok(MigState::Running) => {}
                _ => {
                    if let Err(e) = d.set_state(MigState::Running) {
                        log::error!("device {}: back to RUNNING failed: {e}", d.id());
                    }
                }
            }
        }
        if self.paused {
            if let Err(e) = self.vm.resume() {
                log::error!("resuming the VM after a failed migration: {e}");
            }
        }
        if self.dirty_log {
            if let Err(e) = self.vm.stop_dirty_log() {
                log::error!("stopping dirty logging: {e}");
            }
        }
        self.data.clear();
        self.main = None;
        err
    }

    /// The end of [`Sender::cleanup`] after COMMIT: the destination may run
    /// the guest, so the VM is left paused (never resumed here), devices are
    /// stopped (a RUNNING device could DMA or transmit while the destination
    /// runs), dirty logging is turned off.
    fn cleanup_committed(&mut self, err: MigrationError) -> MigrationError {
        for d in &self.devices {
            if !matches!(d.state(), Ok(MigState::Stop)) {
                if let Err(e) = d.set_state(MigState::Stop) {
                    log::error!(
                        "device {}: STOP after an uncertain switch-over: {e}",
                        d.id()
                    );
                }
            }
        }
        if self.dirty_log {
            if let Err(e) = self.vm.stop_dirty_log() {
                log::error!("stopping dirty logging: {e}");
            }
            self.dirty_log = false;
        }
        self.data.clear();
        self.main = None;
        let err = match err {
            e @ MigrationError::CommitUncertain { .. } => e,
            cause => MigrationError::CommitUncertain {
                cause: Box::new(cause),
            },
        };
        log::error!("{err}; the source VM stays paused");
        err
    }
}
