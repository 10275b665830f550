//! Receiving on the main connection and the switch-over on the destination:
//! acks and rates to the source, STATE, the wait for the last pass and the
//! device loads, restore, READY, COMMIT, start, RESUMED.

use std::sync::atomic::{Ordering::Relaxed, Ordering::SeqCst};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::devices::Ack;
use super::reader::ReaderCtx;
use super::{close_ready, or_fail, Ctx, Failed, Phase, Ready, Receiving, StateInfo, StateMsg};
use crate::api::{CancelToken, DeviceStateMode};
use crate::error::MigrationError;
use crate::host::{MAX_HOST_MIGRATIONS, SHARE_INTERVAL};
use crate::net::{
    epoch_us, read_full, recv_frame, recv_payload, Ctl, MainConn, Recv, POLL_INTERVAL,
};
use crate::testhook::{self, Point};
use crate::traits::{DestinationVm, MigState};
use crate::wire::{self, Frame};

/// Interval of RATE frames (device load rates) while receiving.
const RATE_INTERVAL: Duration = Duration::from_millis(250);

/// Sends the switch-over acks the load threads produced and refuses
/// newcomers.
fn pump(ctx: &Ctx, main: &MainConn, acks: &mpsc::Receiver<Ack>) -> Result<(), MigrationError> {
    let acks: Vec<Ack> = acks.try_iter().collect();
    for (dev, bytes, load_us) in acks {
        let frame = Frame::Ack {
            dev: dev as u32,
            bytes,
            load_us,
        };
        main.send(&frame, &[], &ctx.ctl, "sending a switch-over ack")?;
    }
    ctx.refuse_newcomers();
    Ok(())
}

/// The frame that follows on main when it is not KEEPALIVE; `None` when
/// nothing arrived within one poll.
fn next_main(
    ctx: &Ctx,
    main: &MainConn,
    what: &str,
    eof: &str,
) -> Result<Option<Frame>, MigrationError> {
    match recv_frame(&main.stream, &ctx.ctl, true, what)? {
        Recv::Frame(env) => {
            if env.session != main.session {
                return Err(MigrationError::proto(
                    "frame of another session on the main connection",
                ));
            }
            Ok(Some(env.frame))
        }
        Recv::Eof => Err(MigrationError::PeerClosed(eof.into())),
        Recv::Idle => Ok(None),
    }
}

impl Receiving {
    /// Every [`RATE_INTERVAL`]: sends RATE for each device whose measured
    /// load rate changed, so the source's estimate uses fresh figures.
    fn send_rates(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        if self.rates.0.elapsed() < RATE_INTERVAL {
            return Ok(());
        }
        self.rates.0 = Instant::now();
        self.rates.1.resize(self.p.counters.len(), 0);
        for (i, c) in self.p.counters.iter().enumerate() {
            let rate = c.load_rate.load(Relaxed);
            if rate != 0 && rate != self.rates.1[i] {
                self.rates.1[i] = rate;
                let frame = Frame::Rate {
                    dev: i as u32,
                    rate_bps: rate,
                    loaded: c.transferred.load(Relaxed),
                };
                self.p
                    .s
                    .main
                    .send(&frame, &[], &ctx.ctl, "sending a device load rate")?;
            }
        }
        Ok(())
    }

    /// Every [`SHARE_INTERVAL`] (first at once): sends HOST_LOAD with the
    /// incoming migrations on this host, for the source's share of the host
    /// bandwidth. Nothing without a registration.
    fn send_host_load(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        if self
            .host_load_at
            .is_some_and(|t| t.elapsed() < SHARE_INTERVAL)
        {
            return Ok(());
        }
        self.host_load_at = Some(Instant::now());
        let n = match ctx.host_slot.borrow().as_ref().map(|s| s.count()) {
            None => return Ok(()),
            Some(Ok(n)) => n.clamp(1, MAX_HOST_MIGRATIONS as u32),
            Some(Err(e)) => {
                log::debug!("counting this host's migrations: {e}");
                return Ok(());
            }
        };
        ctx.stats.set_host_migrations(0, n);
        self.p.s.main.send(
            &Frame::HostLoad { migrations: n },
            &[],
            &ctx.ctl,
            "sending the host load",
        )
    }

    /// Handles what arrived on main; `Some` once STATE arrived.
    fn receive(&mut self, ctx: &Ctx) -> Result<Option<StateMsg>, MigrationError> {
        pump(ctx, &self.p.s.main, &self.p.ack_rx)?;
        self.p.inbox.check_loading()?;
        self.send_rates(ctx)?;
        self.send_host_load(ctx)?;
        self.rx.tick(&ctx.stats);
        let main = &self.p.s.main;
        let what = "reading the main connection";
        let Some(frame) = next_main(ctx, main, what, "source closed the main connection")? else {
            if self.last_main.elapsed() > ctx.ctl.stall {
                return Err(MigrationError::Stalled(format!(
                    "source silent for {:?}",
                    ctx.ctl.stall
                )));
            }
            return Ok(None);
        };
        self.last_main = Instant::now();
        match frame {
            Frame::Keepalive => Ok(None),
            Frame::Device {
                dev,
                seq,
                item,
                len,
            } => {
                if self.p.mode != DeviceStateMode::Main {
                    return Err(MigrationError::proto(
                        "device data on the main connection in channels mode",
                    ));
                }
                let chunk_max = self.p.chunk_max;
                if len > chunk_max {
                    return Err(MigrationError::proto(format!(
                        "device chunk of {len} bytes over {chunk_max}"
                    )));
                }
                let inbox = &self.p.inbox;
                // One device after another, in order: anything else is a
                // protocol error here.
                let mut t = inbox.admit(dev as usize, seq, item, len, true)?;
                read_full(&main.stream, t.payload_mut(), &ctx.ctl, what)?;
                inbox.deliver(t)?;
                // The single-channel path is sequential end to end: the next
                // frame is read only once this chunk is in the device.
                inbox.wait_applied(dev as usize)?;
                Ok(None)
            }
            Frame::State {
                final_pass,
                user_paused,
                pause_us,
                len,
            } => {
                let data = recv_payload(&main.stream, len, &ctx.ctl, "reading the VM state")?;
                log::info!(
                    "switch-over: the source paused the VM; final pass {final_pass}, VM state of \
                     {len} bytes received, {:.1} MiB of RAM so far",
                    ctx.stats.transferred_bytes.load(Relaxed) as f64 / 1048576.0
                );
                let info = StateInfo {
                    final_pass,
                    paused: user_paused,
                    pause_us,
                };
                Ok(Some(StateMsg { info, state: data }))
            }
            Frame::Postcopy {
                final_pass,
                missing,
                len,
            } => {
                let data = recv_payload(&main.stream, len, &ctx.ctl, "reading the missing pages")?;
                if self.post.is_some() {
                    return Err(MigrationError::proto("second POSTCOPY frame"));
                }
                let maps = wire::decode_bitmap(&data, &self.p.rctx.ram.layout, missing)?;
                log::info!("switching to post-copy: {missing} pages to pull after the start");
                let _ = self.p.rctx.stale.set(std::sync::Arc::new(maps.clone()));
                self.post = Some(Box::new(super::pcrun::PostMsg { final_pass, maps }));
                Ok(None)
            }
            Frame::Abort { len } => {
                let m = recv_payload(&main.stream, len, &ctx.ctl, what)?;
                Err(MigrationError::PeerAborted(wire::message_text(&m)))
            }
            f => Err(MigrationError::proto(format!(
                "unexpected {:?} frame on the main connection",
                f.kind()
            ))),
        }
    }

    /// Receive → Receive, or Complete once STATE arrived.
    pub fn step(mut self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        Ok(match or_fail!(self.receive(ctx), Phase::Receive(self)) {
            Some(msg) => Phase::Complete(self, Box::new(msg)),
            None => Phase::Receive(self),
        })
    }

    /// Waits for every pass up to the final one and every device load
    /// (event driven: readers and load threads notify).
    pub(super) fn await_all(&mut self, ctx: &Ctx, final_pass: u64) -> Result<(), MigrationError> {
        let rctx = self.p.rctx.clone();
        let inbox = self.p.inbox.clone();
        if final_pass == 0 || final_pass < rctx.barrier.completed() {
            return Err(MigrationError::proto(format!(
                "final pass {final_pass} is invalid"
            )));
        }
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
            ctx.ctl.check()?;
            let g = ctx.notify.generation();
            pump(ctx, &self.p.s.main, &self.p.ack_rx)?;
            self.rx.tick(&ctx.stats);
            let done = rctx.barrier.completed();
            if done >= final_pass {
                if !ended_checked {
                    inbox.check_all_ended()?;
                    ended_checked = true;
                }
                if inbox.all_done() {
                    return Ok(());
                }
            }
            let now = progress(&rctx);
            if now != last.1 {
                last = (Instant::now(), now);
            } else if last.0.elapsed() > ctx.ctl.stall {
                return Err(MigrationError::Stalled(if done < final_pass {
                    "final pass not completing".into()
                } else {
                    "device state not loading".into()
                }));
            }
            ctx.notify.wait(g, POLL_INTERVAL);
        }
    }

    /// Complete → AwaitCommit: all data in, readers sealed and joined, the
    /// VM state restored, READY sent.
    pub fn complete(mut self: Box<Self>, ctx: &Ctx, msg: Box<StateMsg>) -> Result<Phase, Failed> {
        if self.post.is_some() {
            return self.complete_postcopy(ctx, msg);
        }
        or_fail!(
            self.await_all(ctx, msg.info.final_pass),
            Phase::Complete(self, msg)
        );
        let StateMsg { info, state } = *msg;
        // Seal: no reader applies anything from now on; wake and join them.
        let Receiving {
            keepalive,
            readers,
            p,
            ..
        } = *self;
        p.rctx.sealed.store(true, SeqCst);
        ctx.ctl.shutdown_all();
        let _ = readers.join();
        p.inbox.join();
        let r = Box::new(Ready {
            keepalive,
            s: p.s,
            inbox: p.inbox,
            ack_rx: p.ack_rx,
            info,
            vm: p.vm,
            post: None,
        });
        r.restore_and_announce(ctx, &state)
    }
}

/// Puts every device back in RUNNING (from STOP, where loading its state
/// left it) before the vCPUs start, so that the guest finds its devices
/// running. Also when the VM arrives paused: as on the source, a user pause
/// stops the vCPUs only.
fn run_devices(vm: &dyn DestinationVm) -> Result<(), MigrationError> {
    for d in vm.devices() {
        d.set_state(MigState::Running)
            .map_err(|e| MigrationError::device(d.id(), format!("returning to RUNNING: {e}")))?;
    }
    Ok(())
}

impl Ready {
    /// Restores the VM state and tells the source READY; then waits for
    /// COMMIT (pre-copy and post-copy alike).
    pub(super) fn restore_and_announce(
        self: Box<Self>,
        ctx: &Ctx,
        state: &[u8],
    ) -> Result<Phase, Failed> {
        let r = self;
        or_fail!(
            r.vm.vm
                .restore_state(state)
                .map_err(|e| MigrationError::vm("restoring the VM state", e)),
            Phase::AwaitCommit(r, Instant::now())
        );
        or_fail!(
            r.s.main.send(&Frame::Ready, &[], &ctx.ctl, "sending READY"),
            Phase::AwaitCommit(r, Instant::now())
        );
        Ok(Phase::AwaitCommit(r, Instant::now()))
    }

    /// Waits for COMMIT on the main connection, bounded by the stall timeout
    /// since READY; cancel, ABORT, EOF and errors fail (the VM is discarded
    /// and the source, which did not write COMMIT, resumes). `true` once
    /// COMMIT arrived.
    fn commit_arrived(&self, ctx: &Ctx, since: Instant) -> Result<bool, MigrationError> {
        pump(ctx, &self.s.main, &self.ack_rx)?;
        let main = &self.s.main;
        let what = "waiting for COMMIT";
        let eof = "source closed the main connection before COMMIT";
        let Some(frame) = next_main(ctx, main, what, eof)? else {
            if since.elapsed() > ctx.ctl.stall {
                return Err(MigrationError::Timeout(format!(
                    "no COMMIT within {:?} of READY",
                    ctx.ctl.stall
                )));
            }
            return Ok(false);
        };
        match frame {
            Frame::Keepalive => Ok(false),
            Frame::Commit => {
                // From here on cancel is ignored: the source never resumes.
                ctx.ctl.commit_point()?;
                Ok(true)
            }
            Frame::Abort { len } => {
                let m = recv_payload(&main.stream, len, &ctx.ctl, what)?;
                Err(MigrationError::PeerAborted(wire::message_text(&m)))
            }
            f => Err(MigrationError::proto(format!(
                "unexpected {:?} frame while waiting for COMMIT",
                f.kind()
            ))),
        }
    }

    /// AwaitCommit → AwaitCommit, or Start once COMMIT arrived.
    pub fn await_commit(self: Box<Self>, ctx: &Ctx, since: Instant) -> Result<Phase, Failed> {
        if or_fail!(
            self.commit_arrived(ctx, since),
            Phase::AwaitCommit(self, since)
        ) {
            return Ok(Phase::Start(self));
        }
        Ok(Phase::AwaitCommit(self, since))
    }

    /// After COMMIT: puts the devices in RUNNING, starts the VM and sends
    /// RESUMED, then closes everything and hands the VM over (`Ok`), or,
    /// in post-copy, goes on pulling pages (`Err`: the post-copy phase). A
    /// failure to send RESUMED does not undo the start (the source stays
    /// paused).
    #[allow(clippy::type_complexity)]
    pub fn start(
        self: Box<Self>,
        ctx: &Ctx,
    ) -> Result<Result<std::sync::Arc<dyn DestinationVm>, Box<super::pcrun::PcRun>>, Failed> {
        let info = self.info;
        or_fail!(run_devices(&*self.vm.vm), Phase::Start(self));
        or_fail!(
            self.vm
                .vm
                .start(info.paused)
                .map_err(|e| MigrationError::vm("starting the VM", e)),
            Phase::Start(self)
        );
        let resume_us = epoch_us();
        testhook::fire(Point::BeforeResumed, self.s.main.stream.tcp());
        // A private control block: an abort seen by another thread (e.g. a
        // failed keepalive) must not suppress RESUMED.
        let ctl = Ctl::new(CancelToken::default(), ctx.ctl.stall);
        if let Err(e) =
            self.s
                .main
                .send(&Frame::Resumed { resume_us }, &[], &ctl, "sending RESUMED")
        {
            // The VM runs here now; the source wrote COMMIT and stays paused
            // with an uncertain outcome -- log loudly.
            log::error!("VM started but the source was not told: {e}");
        }
        let mut this = self;
        if let Some(post) = this.post.take() {
            return Ok(Err(super::pcrun::PcRun::begin(
                ctx, *this, *post, resume_us,
            )));
        }
        ctx.stats.complete(info.pause_us, resume_us, None);
        let s = ctx.stats.snapshot();
        log::info!(
            "incoming migration completed in {} ms: {} passes, downtime {} ms{}, {:.1} MiB \
             received, {:.0} Mbit/s average",
            s.total_time_ms.unwrap_or(0),
            info.final_pass,
            resume_us.saturating_sub(info.pause_us) / 1000,
            if info.paused { " (started paused)" } else { "" },
            s.transferred_bytes as f64 / 1048576.0,
            s.throughput_mbit_s
        );
        Ok(Ok(close_ready(ctx, *this).into_started()))
    }
}
