//! Post-copy on the source: the switch from pre-copy, page requests served
//! ahead of the background push over all data connections, and the end.
//!
//! The switch (`Streaming::postcopy`): no more pre-copy RAM is queued (what
//! is queued and not taken yet is dropped), the VM is paused, the RAM in
//! flight reaches the wire, and the last dirty log is fetched. The missing
//! set is that dirty log, plus the whole pass that was interrupted (if the
//! switch came in the middle of one). Then, as in pre-copy's stop-copy: the
//! devices' stop-copy data and the final SYNC on the data connections
//! (which stay open), POSTCOPY (the missing set) and STATE on main, READY,
//! COMMIT. From READY on, page requests are served on the main connection
//! (`push::PageServer`); after COMMIT every writer pushes missing pages
//! until none is left. POSTCOPY_DONE ends it.

use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::pool::Item;
use super::push::{PageServer, PushSet};
use super::{
    or_fail, Committed, Ctx, DataPlane, Failed, PausedVm, Phase, RestoreDevices, Stopped, Streaming,
};
use crate::api::ResumeToken;
use crate::error::MigrationError;
use crate::live::SwitchoverReason;
use crate::net::{epoch_us, lock, recv_frame, recv_payload, MainConn, Recv};
use crate::stats::{PostcopyPhase, SourceVmOutcome};
use crate::traits::{DirtyBitmap, PAGE_SIZE};
use crate::wire::{self, decode_bitmap, encode_bitmap, Frame};

/// What post-copy carries through the switch-over phases.
///
/// Invariant: `push` holds exactly the pages of `maps` not yet claimed;
/// `missing` is the number of pages in `maps`.
pub struct Plan {
    /// Pages still to send.
    pub push: Arc<PushSet>,
    maps: Vec<Vec<u64>>,
    missing: u64,
    reason: SwitchoverReason,
    /// RESUMED's time and pause → RESUMED in ms, once known.
    resumed: Mutex<Option<(u64, u64)>>,
    /// Connection epoch (0: the switch-over's connections).
    epoch: u64,
}

impl Plan {
    /// RESUMED's time (if known), pause → RESUMED in ms, and the epoch.
    pub fn times(&self) -> (Option<u64>, u64, u64) {
        match *lock(&self.resumed) {
            Some((r, a)) => (Some(r), a, self.epoch),
            None => (None, 0, self.epoch),
        }
    }

    /// Sends POSTCOPY (the missing set) on main, before STATE.
    pub fn send_missing(
        &self,
        ctx: &Ctx,
        main: &MainConn,
        final_pass: u64,
    ) -> Result<(), MigrationError> {
        let layout = ctx.mem.layout();
        let bitmap = encode_bitmap(&layout, &self.maps);
        ctx.from_dest.postcopy.store(true, SeqCst);
        main.send(
            &Frame::Postcopy {
                final_pass,
                missing: self.missing,
                len: bitmap.len() as u64,
            },
            &bitmap,
            &ctx.ctl,
            "sending the post-copy page set",
        )
    }

    /// READY arrived: the destination resolves faults now. Installs the push
    /// set for the writers and the page server for the main reader.
    pub fn arm(&self, ctx: &Ctx, main: &Arc<MainConn>, data: &DataPlane) {
        let _ = data.wctx.postcopy.set(self.push.clone());
        let _ = ctx.from_dest.server.set(Arc::new(PageServer {
            push: self.push.clone(),
            mem: ctx.mem.clone(),
            layout: ctx.mem.layout(),
            main: main.clone(),
            limiter: data.limiter.clone(),
            stats: ctx.stats.clone(),
            ctl: ctx.ctl.clone(),
        }));
    }

    /// RESUMED arrived: the guest runs on the destination.
    pub fn started(&self, ctx: &Ctx, pause_at: (Instant, u64), resume_us: u64) {
        let ack_ms = pause_at.0.elapsed().as_millis() as u64;
        *lock(&self.resumed) = Some((resume_us, ack_ms));
        ctx.stats.set_postcopy(PostcopyPhase::Active);
        let downtime = resume_us.saturating_sub(pause_at.1) / 1000;
        log::info!(
            "post-copy started: the guest runs on the destination after {downtime} ms of \
             downtime; {} pages to pull",
            self.missing
        );
        ctx.events.emit(
            "postcopy-started",
            json!({
                "reason": self.reason,
                "missing_pages": self.missing,
                "downtime_ms": downtime,
            }),
        );
    }
}

impl Streaming {
    /// Switches the running pre-copy to post-copy for `reason`: pauses the
    /// VM and computes the missing set (see the module documentation); the
    /// device stop-copy and the switch-over handshake follow as in
    /// pre-copy (`Stopped::stop_copy`).
    pub(super) fn postcopy(
        self: Box<Self>,
        ctx: &Ctx,
        reason: SwitchoverReason,
    ) -> Result<Phase, Failed> {
        let pool = self.data.pool.clone();
        pool.request_switch();
        let drained = pool.drain_ram();
        let paused = or_fail!(PausedVm::pause(&ctx.vm), Phase::Streaming(self));
        let mut st = self.into_stopped(paused);
        match st.plan(ctx, reason, drained) {
            Ok(plan) => {
                st.post = Some(Box::new(plan));
                Ok(Phase::Stopped(st))
            }
            Err(e) => Err(Failed::new(Phase::Stopped(st), e)),
        }
    }
}

impl Stopped {
    /// Waits for the RAM in flight, fetches the last dirty log and builds
    /// the missing set.
    fn plan(
        &mut self,
        ctx: &Ctx,
        reason: SwitchoverReason,
        drained: u64,
    ) -> Result<Plan, MigrationError> {
        let pool = &self.data.pool;
        let ps = &mut self.passes;
        let since = Instant::now();
        // Everything taken by a writer reaches the wire before the final SYNC.
        while pool.pages_done.load(Relaxed) + pool.pages_dropped.load(SeqCst) < ps.pages_queued() {
            ctx.ctl.check()?;
            if since.elapsed() > ctx.ctl.stall {
                return Err(MigrationError::Stalled(
                    "RAM in flight did not reach the wire at the switch to post-copy".into(),
                ));
            }
            let dropped = pool.pages_dropped.load(SeqCst);
            pool.wait_pages(
                ps.pages_queued().saturating_sub(dropped),
                Duration::from_millis(1),
            );
        }
        ps.fetch_all(ctx)?;
        let interrupted = ps.interrupted || pool.pages_dropped.load(SeqCst) > 0;
        let mut held = std::mem::take(ps.held_mut());
        if interrupted {
            for (i, cur) in ps.current.iter().enumerate() {
                if held.len() <= i {
                    held.resize(i + 1, DirtyBitmap::default());
                }
                held[i].merge(cur);
            }
        }
        let pages: Vec<u64> = ctx.mem.regions().iter().map(|r| r.pages()).collect();
        let maps: Vec<Vec<u64>> = held.into_iter().map(|b| b.words).collect();
        let push = Arc::new(PushSet::new(&maps, &pages));
        let missing = push.remaining();
        // The final "pass" carries only the devices' END and its SYNC.
        ps.pass += 1;
        ctx.stats.iteration.store(ps.pass, Relaxed);
        ctx.stats.postcopy_missing_pages.store(missing, Relaxed);
        ctx.stats
            .remaining_bytes
            .store(missing * PAGE_SIZE, Relaxed);
        ctx.stats.stop_live_remaining();
        log::info!(
            "VM paused for post-copy ({reason:?}): {missing} pages missing on the destination{}",
            if interrupted {
                format!(" (pass interrupted, {drained} queued pages dropped)")
            } else {
                String::new()
            }
        );
        Ok(Plan {
            push,
            maps,
            missing,
            reason,
            resumed: Mutex::new(None),
            epoch: 0,
        })
    }
}

impl Committed {
    /// Post-copy runs: waits for POSTCOPY_DONE. Cancel and the deadline are
    /// ignored (the guest runs on the destination); a failure of the
    /// connections ends in [`MigrationError::PostcopyPaused`].
    pub fn await_done(&self, ctx: &Ctx) -> Result<(), MigrationError> {
        let fd = &ctx.from_dest;
        let Some(post) = &self.post else {
            return Ok(());
        };
        loop {
            if let Some((requests, p50, p99)) = *lock(&fd.done) {
                let (resume_us, ack_ms) = (*lock(&post.resumed)).unwrap_or((epoch_us(), 0));
                ctx.stats.set_remote_latency(p50, p99);
                ctx.stats.set_postcopy(PostcopyPhase::Completed);
                ctx.stats.set_source_vm(SourceVmOutcome::Migrated);
                ctx.stats.complete(self.pause_at.1, resume_us, Some(ack_ms));
                log::info!(
                    "post-copy completed: {} requests served here ({requests} sent), fault \
                     latency p50 {p50} µs, p99 {p99} µs, {} bytes after the switch",
                    ctx.stats.postcopy_requests.load(Relaxed),
                    ctx.stats.postcopy_bytes.load(Relaxed)
                );
                ctx.events.emit(
                    "postcopy-completed",
                    json!({
                        "requests": requests,
                        "fault_latency_us_p50": p50,
                        "fault_latency_us_p99": p99,
                        "bytes": ctx.stats.postcopy_bytes.load(Relaxed),
                    }),
                );
                return Ok(());
            }
            ctx.ctl.check()?;
            ctx.stats
                .remaining_bytes
                .store(post.push.remaining() * PAGE_SIZE, Relaxed);
            let g = fd.notify.generation();
            if lock(&fd.done).is_none() {
                fd.notify.wait(g, Duration::from_millis(50));
            }
        }
    }
}

/// The post-copy was interrupted after COMMIT: keeps what a resume needs
/// and returns the error to report ([`MigrationError::PostcopyPaused`]).
pub(super) fn paused(
    ctx: &Ctx,
    err: MigrationError,
    pause_us: u64,
    resume_us: Option<u64>,
    ack_ms: u64,
    epoch: u64,
) -> MigrationError {
    *lock(&ctx.resume) = Some(ResumeToken {
        session: ctx.session,
        epoch,
        pause_us,
        resume_us,
        ack_ms,
    });
    let err = match err {
        e @ MigrationError::PostcopyPaused { .. } => e,
        cause => MigrationError::PostcopyPaused {
            cause: Box::new(cause),
        },
    };
    ctx.stats.set_postcopy(PostcopyPhase::Paused);
    ctx.events.emit(
        "postcopy-paused",
        json!({ "role": "source", "error": err.to_string(), "epoch": epoch }),
    );
    log::error!("{err}");
    err
}

/// Reads RESUME_ACK (epoch `epoch`) and its bitmap of the pages the
/// destination still lacks.
fn await_resume_ack(
    ctx: &Ctx,
    main: &MainConn,
    epoch: u64,
) -> Result<(u64, Vec<Vec<u64>>), MigrationError> {
    let what = "waiting for the destination to accept the resume";
    let since = Instant::now();
    loop {
        let env = match recv_frame(&main.stream, &ctx.ctl, true, what)? {
            Recv::Frame(env) => env,
            Recv::Idle if since.elapsed() > ctx.ctl.stall => {
                return Err(MigrationError::Timeout(what.into()))
            }
            Recv::Idle => continue,
            Recv::Eof => return Err(MigrationError::PeerClosed(what.into())),
        };
        if env.session != ctx.session {
            return Err(MigrationError::proto("frame of another session"));
        }
        match env.frame {
            Frame::Keepalive => {}
            Frame::ResumeAck {
                epoch: e,
                missing,
                len,
            } => {
                if e != epoch {
                    return Err(MigrationError::proto(format!(
                        "RESUME_ACK for epoch {e}, asked {epoch}"
                    )));
                }
                let p = recv_payload(&main.stream, len, &ctx.ctl, what)?;
                let maps = decode_bitmap(&p, &ctx.mem.layout(), missing)?;
                return Ok((missing, maps));
            }
            Frame::Error { len } | Frame::Discarded { len } => {
                let m = recv_payload(&main.stream, len, &ctx.ctl, what)?;
                return Err(MigrationError::Remote(wire::message_text(&m)));
            }
            f => {
                return Err(MigrationError::proto(format!(
                    "unexpected {:?} frame instead of RESUME_ACK",
                    f.kind()
                )))
            }
        }
    }
}

/// Resume → Postcopy: reconnects the main connection (HELLO with the old
/// session, RESUME), learns what the destination still lacks, reconnects
/// the data connections and pushes it; page requests are served again.
pub(super) fn reconnect(ctx: &Ctx, t: Box<ResumeToken>) -> Result<Phase, Failed> {
    // The guest runs on the destination: cancel and the deadline no longer
    // apply (this VM must never run again).
    let _ = ctx.ctl.commit_point();
    let epoch = t.epoch + 1;
    let r = (|| {
        let main = super::setup::connect_main(ctx)?;
        main.send(
            &Frame::Resume { epoch },
            &[],
            &ctx.ctl,
            "asking to resume the post-copy",
        )?;
        let (missing, maps) = await_resume_ack(ctx, &main, epoch)?;
        let data = super::setup::data_plane(ctx)?;
        let pages: Vec<u64> = ctx.mem.regions().iter().map(|r| r.pages()).collect();
        let push = Arc::new(PushSet::new(&maps, &pages));
        let fd = &ctx.from_dest;
        fd.postcopy.store(true, SeqCst);
        fd.state_sent.store(true, SeqCst);
        fd.commit_sent.store(true, SeqCst);
        let resume_us = t.resume_us.unwrap_or_else(epoch_us);
        *lock(&fd.resumed) = Some(resume_us);
        let plan = Plan {
            push,
            maps,
            missing,
            reason: SwitchoverReason::User,
            resumed: Mutex::new(Some((resume_us, t.ack_ms))),
            epoch,
        };
        // Armed before the main reader starts: the destination's vCPUs ask
        // for pages as soon as it accepted the resume.
        plan.arm(ctx, &main, &data);
        let link = super::link::Link::start(main, &ctx.ctl, &ctx.from_dest, &ctx.counters)?;
        Ok((plan, data, link))
    })();
    let (plan, data, link) = or_fail!(r, Phase::Resume(t));
    let missing = plan.missing;
    data.pool.push_all(|| Item::Postcopy);
    ctx.stats.set_postcopy(PostcopyPhase::Active);
    ctx.stats.postcopy_resumes.store(epoch, Relaxed);
    ctx.stats.postcopy_missing_pages.store(missing, Relaxed);
    ctx.stats.mark_setup_done();
    log::info!("post-copy resumed (epoch {epoch}): {missing} pages still missing");
    ctx.events.emit(
        "postcopy-resumed",
        json!({ "role": "source", "epoch": epoch, "missing_pages": missing }),
    );
    Ok(Phase::Postcopy(Box::new(Committed {
        link,
        data,
        stop: RestoreDevices::new(&ctx.devices).committed(),
        dirty: None,
        pass: 0,
        pause_at: (Instant::now(), t.pause_us),
        commit_at: Instant::now(),
        post: Some(Box::new(plan)),
    })))
}
