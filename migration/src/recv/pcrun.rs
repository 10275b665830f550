//! The post-copy phases of the destination: the switch (missing pages
//! dropped, RAM registered, fault thread started, state restored, READY),
//! then, once the VM runs, the main connection's PAGES until every missing
//! page is placed, POSTCOPY_DONE, and the end. A lost connection pauses the
//! post-copy: the faulting vCPUs wait in their faults and the VM is kept
//! (never discarded: the guest ran here) until a source resumes.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::devices::DeviceInbox;
use super::postcopy::{FaultThread, PcDest};
use super::reader::ReaderCtx;
use super::{or_fail, Ctx, Failed, Phase, Ready, Receiving, StateInfo, StateMsg};
use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::handshake::Incoming;
use crate::net::{recv_frame, recv_payload, Ctl, Keepalive, MainConn, Recv};
use crate::stats::{PostcopyPhase, RxMeter};
use crate::traits::{DestinationVm, PAGE_SIZE};
use crate::wire::{self, decode_ranges, ConnRole, Frame, HEADER_LEN, RANGE_ENTRY_LEN};
use crate::worker::Workers;

/// What POSTCOPY announced.
pub struct PostMsg {
    /// The last pre-copy pass on the data connections.
    pub final_pass: u64,
    /// The missing pages, one bitmap per region.
    pub maps: Vec<Vec<u64>>,
}

/// Post-copy between READY and the start: RAM registered, the fault
/// thread and the data readers running.
pub struct PostRun {
    pcd: Arc<PcDest>,
    faults: FaultThread,
    readers: Workers,
    rctx: Arc<ReaderCtx>,
}

/// One set of connections of a running post-copy.
///
/// Invariant: dropping it stops the keepalive, shuts every socket of `ctl`
/// down and joins the readers.
struct Epoch {
    ctl: Arc<Ctl>,
    main: Arc<MainConn>,
    keepalive: Option<Keepalive>,
    readers: Option<Workers>,
    rctx: Arc<ReaderCtx>,
    last_main: Instant,
}

impl Drop for Epoch {
    fn drop(&mut self) {
        drop(self.keepalive.take());
        // What readers see from now on is no failure of the migration.
        self.rctx.sealed.store(true, SeqCst);
        self.ctl.fail(MigrationError::Aborted);
        self.ctl.shutdown_all();
        drop(self.readers.take());
        let _ = self.main.stream.tcp().shutdown(std::net::Shutdown::Both);
    }
}

/// The VM runs here and pulls its missing pages.
///
/// Invariant: the VM was started (never discarded from here on); `epoch`
/// is `None` while the post-copy is paused (no connection).
pub struct PcRun {
    pcd: Arc<PcDest>,
    faults: Option<FaultThread>,
    vm: Arc<dyn DestinationVm>,
    inbox: Arc<DeviceInbox>,
    info: StateInfo,
    resume_us: u64,
    session: u128,
    epoch: Option<Epoch>,
    rx: RxMeter,
    buf: Vec<ResolvedBuf>,
    /// Guest RAM as the readers see it (kept for the next epoch's).
    ram: Arc<super::reader::DestRam>,
    /// The current (or last) connection epoch.
    epoch_no: u64,
}

/// Scratch space for decoding PAGES on main.
type ResolvedBuf = wire::ResolvedRange;

impl Receiving {
    /// Complete → AwaitCommit for post-copy: every pre-copy pass and device
    /// load done, the missing pages dropped, the RAM registered for faults,
    /// the fault thread started, the VM state restored, READY sent. The
    /// readers stay: they carry the background push after COMMIT.
    pub fn complete_postcopy(
        mut self: Box<Self>,
        ctx: &Ctx,
        msg: Box<StateMsg>,
    ) -> Result<Phase, Failed> {
        let final_pass = self.post.as_ref().map(|p| p.final_pass).unwrap_or(0);
        if final_pass != msg.info.final_pass {
            let e = MigrationError::proto(format!(
                "POSTCOPY names pass {final_pass}, STATE pass {}",
                msg.info.final_pass
            ));
            return Err(Failed::new(Phase::Complete(self, msg), e));
        }
        let t0 = Instant::now();
        or_fail!(self.await_all(ctx, final_pass), Phase::Complete(self, msg));
        let waited = t0.elapsed();
        let StateMsg { info, state } = *msg;
        let Receiving {
            keepalive,
            readers,
            p,
            post,
            ..
        } = *self;
        let maps = post.map(|p| p.maps).unwrap_or_default();
        let vm = p.vm;
        let mut r = Box::new(Ready {
            keepalive,
            s: p.s,
            inbox: p.inbox,
            ack_rx: p.ack_rx,
            info,
            vm,
            post: None,
        });
        let run = (|| {
            let pc =
                r.vm.vm
                    .postcopy()
                    .map_err(|e| MigrationError::vm("preparing post-copy", e))?;
            for (region, m) in maps.iter().enumerate() {
                let bm = crate::traits::DirtyBitmap { words: m.clone() };
                let pages = p.rctx.ram.layout[region].1 / PAGE_SIZE;
                for (first, n) in crate::send::runs_of(&bm, pages) {
                    pc.discard(region, first, n)
                        .map_err(|e| MigrationError::vm("dropping stale pages", e))?;
                }
            }
            let discarded = t0.elapsed();
            pc.register()
                .map_err(|e| MigrationError::vm("registering guest RAM for post-copy", e))?;
            log::debug!(
                "post-copy switch: pre-copy data and devices in after {waited:?}, stale pages \
                 dropped after {discarded:?}, RAM registered after {:?}",
                t0.elapsed()
            );
            let pcd = Arc::new(PcDest::new(
                pc,
                p.rctx.ram.layout.clone(),
                maps,
                ctx.stats.clone(),
                ctx.notify.clone(),
            ));
            ctx.stats.postcopy_missing_pages.store(pcd.total(), Relaxed);
            let _ = p.rctx.postcopy.set(pcd.clone());
            let faults = FaultThread::spawn(pcd.clone())?;
            Ok(PostRun {
                pcd,
                faults,
                readers,
                rctx: p.rctx.clone(),
            })
        })();
        r.post = Some(Box::new(or_fail!(
            run,
            Phase::AwaitCommit(r, Instant::now())
        )));
        r.restore_and_announce(ctx, &state)
    }
}

impl PcRun {
    /// The VM started and RESUMED was sent: post-copy runs on the
    /// connections of the switch-over (epoch 0).
    pub fn begin(ctx: &Ctx, r: Ready, post: PostRun, resume_us: u64) -> Box<PcRun> {
        let Ready {
            keepalive,
            s,
            inbox,
            info,
            vm,
            ..
        } = r;
        let vm = vm.into_started();
        let PostRun {
            pcd,
            faults,
            readers,
            rctx,
        } = post;
        let ram = rctx.ram.clone();
        ctx.stats.set_postcopy(PostcopyPhase::Active);
        ctx.events.emit(
            "postcopy-started",
            json!({ "role": "destination", "missing_pages": pcd.total() }),
        );
        pcd.set_main(Some((s.main.clone(), ctx.ctl.clone())));
        Box::new(PcRun {
            pcd,
            faults: Some(faults),
            vm,
            inbox,
            info,
            resume_us,
            session: s.session,
            epoch: Some(Epoch {
                ctl: ctx.ctl.clone(),
                main: s.main,
                keepalive: Some(keepalive),
                readers: Some(readers),
                rctx,
                last_main: Instant::now(),
            }),
            rx: RxMeter::after_passes(&ctx.stats),
            buf: Vec::new(),
            ram,
            epoch_no: 0,
        })
    }

    /// The main connection of the current epoch.
    pub fn main(&self) -> Option<&Arc<MainConn>> {
        self.epoch.as_ref().map(|e| &e.main)
    }

    /// One step: `Ok(vm)` once every page is here (post-copy completed),
    /// `Err(self)` to be called again.
    pub fn step(mut self: Box<Self>, ctx: &Ctx) -> Result<Arc<dyn DestinationVm>, Box<PcRun>> {
        if self.pcd.complete() && self.epoch.is_some() {
            return Ok(self.finish(ctx));
        }
        if self.epoch.is_none() {
            self.wait_resume(ctx);
            return Err(self);
        }
        self.rx.tick(&ctx.stats);
        ctx.refuse_newcomers();
        if let Err(e) = self.receive() {
            self.lose(ctx, e);
        }
        Err(self)
    }

    /// Handles what the main connection carries now.
    fn receive(&mut self) -> Result<(), MigrationError> {
        let Some(e) = self.epoch.as_mut() else {
            return Ok(());
        };
        e.ctl.check()?;
        let what = "reading the main connection in post-copy";
        let env = match recv_frame(&e.main.stream, &e.ctl, true, what)? {
            Recv::Frame(env) => env,
            Recv::Idle => {
                if e.last_main.elapsed() > e.ctl.stall {
                    return Err(MigrationError::Stalled(format!(
                        "source silent for {:?}",
                        e.ctl.stall
                    )));
                }
                return Ok(());
            }
            Recv::Eof => {
                return Err(MigrationError::PeerClosed(
                    "source closed the main connection during post-copy".into(),
                ))
            }
        };
        e.last_main = Instant::now();
        if env.session != self.session {
            return Err(MigrationError::proto(
                "frame of another session on the main connection",
            ));
        }
        match env.frame {
            Frame::Keepalive => Ok(()),
            Frame::Pages {
                ranges,
                data_len,
                zstd_len,
                ..
            } => {
                if zstd_len > 0 {
                    // Requested pages are never compressed (a vCPU waits).
                    return Err(MigrationError::proto(
                        "compressed PAGES on the main connection",
                    ));
                }
                let len = env.frame.payload_len();
                let data = recv_payload(&e.main.stream, len, &e.ctl, what)?;
                let split = ranges as usize * RANGE_ENTRY_LEN;
                let (table, pages) = data.split_at(split.min(data.len()));
                decode_ranges(table, data_len, &self.pcd.layout, &mut self.buf)?;
                self.pcd.accept_all(&self.buf, pages)?;
                let wire = HEADER_LEN as u64 + len;
                let st = self.pcd.stats();
                st.postcopy_bytes.fetch_add(wire, Relaxed);
                st.transferred_bytes.fetch_add(wire, Relaxed);
                let (zero, normal) = crate::recv::reader::count_pages(&self.buf);
                st.zero_pages.fetch_add(zero, Relaxed);
                st.normal_pages.fetch_add(normal, Relaxed);
                Ok(())
            }
            Frame::Abort { len } => {
                let m = recv_payload(&e.main.stream, len, &e.ctl, what)?;
                Err(MigrationError::PeerAborted(wire::message_text(&m)))
            }
            f => Err(MigrationError::proto(format!(
                "unexpected {:?} frame during post-copy",
                f.kind()
            ))),
        }
    }

    /// The connections failed: post-copy pauses. The faulting vCPUs wait
    /// in their faults; the VM is kept for a resume.
    fn lose(&mut self, ctx: &Ctx, e: MigrationError) {
        let e = match self.epoch.as_ref().and_then(|ep| ep.ctl.take_error()) {
            Some(first) => first,
            None => e,
        };
        log::error!(
            "post-copy paused: {e}; the vCPUs that need a missing page wait until a source resumes"
        );
        self.pcd.set_main(None);
        self.epoch = None;
        ctx.stats.set_postcopy(PostcopyPhase::Paused);
        ctx.events.emit(
            "postcopy-paused",
            json!({ "role": "destination", "error": e.to_string() }),
        );
    }

    /// Paused: waits one poll interval for the source of this session to
    /// reconnect (HELLO with the session id, RESUME); refuses anyone else.
    fn wait_resume(&mut self, ctx: &Ctx) {
        let Some(inc) = ctx.next_incoming(crate::net::POLL_INTERVAL) else {
            return;
        };
        if inc.session != self.session || inc.role != ConnRole::Main {
            ctx.refuse(
                inc,
                "a post-copy is paused here: only its source may reconnect (send-migration with \"resume\": true)",
            );
            return;
        }
        match self.resume(ctx, inc) {
            Ok(()) => {}
            Err(e) => log::warn!("post-copy resume refused: {e}; still waiting"),
        }
    }

    /// Accepts a resuming source: OK to its HELLO, RESUME, RESUME_ACK with
    /// the pages still missing, then its data connections and their readers;
    /// waiting faults are asked for again.
    fn resume(&mut self, ctx: &Ctx, inc: Incoming) -> Result<(), MigrationError> {
        let n = inc.connections as usize;
        let ectl = Ctl::new(CancelToken::default(), ctx.ctl.stall);
        let s = inc.stream;
        crate::net::prepare_stream(s.tcp(), false)?;
        ectl.register(s.tcp());
        let main = MainConn::new(s, self.session);
        main.send(&Frame::Ok, &[], &ectl, "accepting the resuming source")?;
        let what = "waiting for RESUME";
        let since = Instant::now();
        let epoch = loop {
            match recv_frame(&main.stream, &ectl, true, what)? {
                Recv::Frame(env) => match env.frame {
                    Frame::Resume { epoch } if env.session == self.session => break epoch,
                    Frame::Keepalive => {}
                    f => {
                        let e =
                            MigrationError::proto(format!("expected RESUME, got {:?}", f.kind()));
                        main.send_message(|len| Frame::Error { len }, &e.to_string());
                        return Err(e);
                    }
                },
                Recv::Idle if since.elapsed() > Duration::from_secs(5) => {
                    return Err(MigrationError::Timeout(what.into()))
                }
                Recv::Idle => {}
                Recv::Eof => return Err(MigrationError::PeerClosed(what.into())),
            }
        };
        if epoch <= self.epoch_no {
            let e = MigrationError::proto(format!(
                "RESUME of epoch {epoch}, this side is at epoch {}",
                self.epoch_no
            ));
            main.send_message(|len| Frame::Error { len }, &e.to_string());
            return Err(e);
        }
        let still = self.pcd.still_missing();
        let missing = still.iter().flatten().map(|w| w.count_ones() as u64).sum();
        let bitmap = wire::encode_bitmap(&self.pcd.layout, &still);
        main.send(
            &Frame::ResumeAck {
                epoch,
                missing,
                len: bitmap.len() as u64,
            },
            &bitmap,
            &ectl,
            "sending the pages still missing",
        )?;
        let streams = super::setup::accept_data_of(ctx, self.session, n, &ectl)?;
        let rctx = Arc::new(ReaderCtx {
            ram: self.ram.clone(),
            barrier: Arc::new(super::barrier::PassBarrier::new(n)),
            inbox: None,
            session: self.session,
            ctl: ectl.clone(),
            stats: ctx.stats.clone(),
            chunk_max: 0,
            notify: ctx.notify.clone(),
            sealed: std::sync::atomic::AtomicBool::new(false),
            postcopy: std::sync::OnceLock::new(),
            stale: std::sync::OnceLock::new(),
            // A resumed post-copy sends as is (a resume has no SETUP).
            zstd: false,
        });
        let _ = rctx.postcopy.set(self.pcd.clone());
        let mut readers = Workers::new(&ectl);
        super::reader::spawn_readers(&rctx, streams, &mut readers)?;
        main.stream
            .tcp()
            .set_read_timeout(Some(Duration::from_millis(10)))
            .map_err(|e| MigrationError::io("configuring the main connection", e))?;
        let keepalive = Keepalive::spawn(main.clone(), ectl.clone());
        self.epoch_no = epoch;
        self.epoch = Some(Epoch {
            ctl: ectl.clone(),
            main: main.clone(),
            keepalive: Some(keepalive),
            readers: Some(readers),
            rctx,
            last_main: Instant::now(),
        });
        self.pcd.set_main(Some((main, ectl)));
        ctx.stats.postcopy_resumes.store(epoch, Relaxed);
        ctx.stats.set_postcopy(PostcopyPhase::Active);
        log::info!("post-copy resumed (epoch {epoch}): {missing} pages still missing");
        ctx.events.emit(
            "postcopy-resumed",
            json!({ "role": "destination", "epoch": epoch, "missing_pages": missing }),
        );
        Ok(())
    }

    /// Every page is here: unregisters the RAM, stops the fault thread,
    /// sends POSTCOPY_DONE, lets the source close the data connections, and
    /// hands the running VM over.
    fn finish(mut self: Box<Self>, ctx: &Ctx) -> Arc<dyn DestinationVm> {
        if let Err(e) = self.pcd.finish() {
            log::error!("{e}");
        }
        drop(self.faults.take());
        let st = &ctx.stats;
        let requests = st.postcopy_requests.load(Relaxed);
        let p50 = st.fault_latency.quantile(0.5).unwrap_or(0);
        let p99 = st.fault_latency.quantile(0.99).unwrap_or(0);
        if let Some(e) = self.epoch.take() {
            let frame = Frame::PostcopyDone {
                requests,
                p50_us: p50,
                p99_us: p99,
            };
            if let Err(err) = e.main.send(&frame, &[], &e.ctl, "sending POSTCOPY_DONE") {
                log::error!("post-copy completed but the source was not told: {err}");
            }
            // The source's writers end their push and close; then we close.
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until && e.readers.as_ref().is_some_and(|r| !r.all_finished()) {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Readers that still run are only reading duplicates.
            drop(e);
        }
        self.inbox.join();
        st.set_postcopy(PostcopyPhase::Completed);
        st.complete(self.info.pause_us, self.resume_us, None);
        log::info!(
            "post-copy completed: {} pages pulled, {requests} page requests, fault latency p50 \
             {p50} µs, p99 {p99} µs",
            self.pcd.total()
        );
        ctx.events.emit(
            "postcopy-completed",
            json!({
                "role": "destination",
                "requests": requests,
                "fault_latency_us_p50": p50,
                "fault_latency_us_p99": p99,
            }),
        );
        self.vm.clone()
    }

    /// Tears everything down without discarding the (running) VM.
    pub fn close(mut self: Box<Self>, _ctx: &Ctx) {
        self.epoch = None;
        drop(self.faults.take());
        self.inbox.join();
    }
}
