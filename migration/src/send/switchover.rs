//! The switch-over on the source: device stop-copy, the VM state, READY,
//! the COMMIT point, RESUMED, and the end of a successful send.

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use super::pool::{Item, Pool};
use super::{or_fail, Committed, Ctx, DeviceStreams, Failed, Phase, Stopped, Switching};
use crate::error::MigrationError;
use crate::net::{lock, MainConn};
use crate::stats::SourceVmOutcome;
use crate::testhook::{self, Point};
use crate::traits::BackendError;
use crate::wire::{self, Frame};

impl DeviceStreams {
    /// Stops every device (STOP_COPY entry) with the VM paused, before the
    /// final fetch of the dirty log: a device writes no guest memory after
    /// this, so the final DMA reports are complete.
    pub(super) fn quiesce(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        match self {
            DeviceStreams::Channels(savers) => savers.quiesce(&ctx.ctl, || ctx.check_timeout()),
            DeviceStreams::Main(mm) => mm.quiesce(&ctx.devices),
        }
    }

    /// Finishes the device streams with the VM paused and closes the data
    /// connections after the final pass (unless post-copy follows, `close`
    /// false: the writers then push missing pages): channels mode joins the
    /// save threads (which stop-copy) before the final SYNC; main mode queues
    /// the final SYNC and CLOSE first, then stop-copies every device on the
    /// main connection.
    fn stop_copy(
        self,
        ctx: &Ctx,
        pool: &Pool,
        main: &MainConn,
        pass: u64,
        close: bool,
    ) -> Result<(), MigrationError> {
        match self {
            DeviceStreams::Channels(savers) => {
                savers.join()?;
                pool.push_all(|| Item::Sync { pass });
                if close {
                    pool.push_all(|| Item::Close);
                }
            }
            DeviceStreams::Main(mm) => {
                pool.push_all(|| Item::Sync { pass });
                if close {
                    pool.push_all(|| Item::Close);
                }
                mm.stop_copy(
                    &ctx.devices,
                    &ctx.counters,
                    main,
                    &ctx.ctl,
                    ctx.p.device_chunk_bytes as usize,
                )?;
            }
        }
        Ok(())
    }
}

impl Stopped {
    /// Stopped → SendState: the devices' stop-copy data and the end of
    /// their streams.
    pub fn stop_copy(self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        let Stopped {
            link,
            data,
            devs,
            restore,
            paused,
            dirty,
            passes,
            pause_at,
            post,
        } = *self;
        let close = post.is_none();
        let sw = Box::new(Switching {
            link,
            data,
            restore,
            paused,
            dirty,
            pass: passes.pass,
            pause_at,
            post,
        });
        or_fail!(
            devs.stop_copy(ctx, &sw.data.pool, &sw.link.main, sw.pass, close),
            Phase::SendState(sw)
        );
        Ok(Phase::SendState(sw))
    }
}

impl Switching {
    /// SendState → AwaitReady: sends the VM state.
    pub fn send_state(self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        or_fail!(self.send_state_frame(ctx), Phase::SendState(self));
        Ok(Phase::AwaitReady(self))
    }

    fn send_state_frame(&self, ctx: &Ctx) -> Result<(), MigrationError> {
        let state = ctx
            .vm
            .save_state()
            .map_err(|e| MigrationError::vm("saving the VM state", e))?;
        if state.len() as u64 > wire::MAX_STATE_LEN {
            return Err(MigrationError::vm(
                "saving the VM state",
                BackendError::new("state too large"),
            ));
        }
        if let Some(post) = &self.post {
            post.send_missing(ctx, &self.link.main, self.pass)?;
        }
        let frame = Frame::State {
            final_pass: self.pass,
            user_paused: ctx.vm.user_paused(),
            pause_us: self.pause_at.1,
            len: state.len() as u64,
        };
        // Before the write: READY can come back before `send` returns.
        ctx.from_dest.state_sent.store(true, SeqCst);
        self.link
            .main
            .send(&frame, &state, &ctx.ctl, "sending the VM state")?;
        ctx.stats
            .state_bytes
            .fetch_add(state.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn await_ready(&self, ctx: &Ctx) -> Result<(), MigrationError> {
        let fd = &ctx.from_dest;
        loop {
            ctx.ctl.check()?;
            if fd.ready.load(SeqCst) {
                return Ok(());
            }
            ctx.check_timeout()?;
            let g = fd.notify.generation();
            if !fd.ready.load(SeqCst) {
                fd.notify.wait(g, Duration::from_millis(50));
            }
        }
    }

    /// AwaitReady → Committed: waits for READY, then passes the commit point
    /// and writes COMMIT. Cancel, the deadline and any failure before the
    /// COMMIT write completed fail in this phase (the VM resumes here): a
    /// COMMIT whose write failed never reached the destination whole, so it
    /// cannot have started the guest.
    pub fn commit(self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        or_fail!(self.await_ready(ctx), Phase::AwaitReady(self));
        if let Some(post) = &self.post {
            // The destination registered its RAM: pages may be placed now.
            post.arm(ctx, &self.link.main, &self.data);
        }
        // Zero-copy: the kernel no longer reads any page of this side.
        or_fail!(
            self.data
                .wctx
                .await_zero_copy(self.pass, &|| ctx.check_timeout()),
            Phase::AwaitReady(self)
        );
        testhook::fire(Point::BeforeCommit, self.link.main.stream.tcp());
        // Cancel and the deadline are honoured up to here and ignored after.
        or_fail!(ctx.ctl.commit_point(), Phase::AwaitReady(self));
        ctx.from_dest.commit_sent.store(true, SeqCst);
        or_fail!(
            self.link
                .main
                .send(&Frame::Commit, &[], &ctx.ctl, "sending COMMIT"),
            Phase::AwaitReady(self)
        );
        let Switching {
            link,
            data,
            restore,
            paused,
            dirty,
            pass,
            pause_at,
            post,
        } = *self;
        paused.keep_paused();
        if post.is_some() {
            data.pool.push_all(|| Item::Postcopy);
        }
        let c = Box::new(Committed {
            link,
            data,
            stop: restore.committed(),
            dirty: Some(dirty),
            pass,
            pause_at,
            commit_at: Instant::now(),
            post,
        });
        log::debug!("switch-over committed; waiting for the destination to start the VM");
        testhook::fire(Point::AfterCommit, c.link.main.stream.tcp());
        Ok(Phase::Committed(c))
    }
}

impl Committed {
    /// Waits for RESUMED, bounded by the stall timeout since COMMIT. Any
    /// failure here becomes [`MigrationError::CommitUncertain`].
    pub fn await_resumed(&self, ctx: &Ctx) -> Result<(), MigrationError> {
        let fd = &ctx.from_dest;
        loop {
            if let Some(ts) = *lock(&fd.resumed) {
                if let Some(post) = &self.post {
                    post.started(ctx, self.pause_at, ts);
                    return Ok(());
                }
                let (pi, pu) = self.pause_at;
                let ack_ms = pi.elapsed().as_millis() as u64;
                ctx.stats.set_source_vm(SourceVmOutcome::Migrated);
                ctx.stats.complete(pu, ts, Some(ack_ms));
                let s = ctx.stats.snapshot();
                log::info!(
                    "migration completed in {} ms: downtime {} ms (pause→ack {ack_ms} ms), {} \
                     passes, {:.1} MiB on the wire ({:.1} MiB pre-copy, {:.1} MiB while paused), \
                     {:.0} Mbit/s average",
                    s.total_time_ms.unwrap_or(0),
                    ts.saturating_sub(pu) / 1000,
                    self.pass,
                    s.transferred_bytes as f64 / 1048576.0,
                    s.precopy_bytes as f64 / 1048576.0,
                    s.downtime_bytes as f64 / 1048576.0,
                    s.throughput_mbit_s
                );
                return Ok(());
            }
            // Ignores cancel and the deadline (committed); fails on a real
            // failure reported by the main reader.
            ctx.ctl.check()?;
            if self.commit_at.elapsed() > ctx.ctl.stall {
                return Err(MigrationError::Timeout(format!(
                    "no RESUMED within {:?} of COMMIT",
                    ctx.ctl.stall
                )));
            }
            let g = fd.notify.generation();
            if lock(&fd.resumed).is_none() {
                fd.notify.wait(g, Duration::from_millis(50));
            }
        }
    }

    /// The end of a successful send: writers (done after CLOSE), keepalive
    /// and reader joined, devices STOP, dirty logging off; the VM stays
    /// paused.
    pub fn finish(self: Box<Self>) {
        let Committed {
            link,
            data,
            stop,
            dirty,
            ..
        } = *self;
        let _ = data.writers.join();
        drop(link);
        stop.migrated();
        drop(dirty);
    }
}
