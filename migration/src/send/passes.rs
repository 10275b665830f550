//! The pre-copy passes: pass 1 over populated memory, then one pass per
//! dirty-log fetch until the convergence policy (and the devices' switch-over
//! acks) allow the switch-over, which pauses the VM and queues the final
//! pass.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::devices::does_precopy;
use super::dirty::{count_dirty, Packetizer, PACKET_PAGES};
use super::dma::DmaLogs;
use super::policy::{Effects, Governor, PassReport, Verdict};
use super::pool::{Item, Pool, RateLimiter};
use super::{or_fail, Ctx, Failed, PausedVm, Phase, Stopped, Streaming, PASS_POLL};
use crate::convergence::Convergence;
use crate::error::MigrationError;
use crate::live::SwitchoverReason;
use crate::net::{epoch_us, lock};
use crate::traits::{DirtyBitmap, PAGE_SIZE};

/// How often the sender peeks at the dirty log during a pass (for the
/// live dirty rate; the pages found join the next pass).
const DIRTY_PEEK: Duration = Duration::from_secs(1);

/// How long the sender waits, when a pass found no dirty page, before the
/// next pass (unless the destination reports something sooner): without it
/// a guest that dirties nothing while devices still pre-copy would turn
/// the pass loop into a stream of empty passes.
const EMPTY_PASS_WAIT: Duration = Duration::from_millis(20);

/// Bytes as MiB, for log lines.
fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Progress of the passes.
///
/// Invariant: a pass is fully on the wire once `pool.pages_done >=
/// pages_queued` (writers count every page of a RAM item, data or zero
/// marker, exactly once); `held` is the dirty log fetched but not yet
/// queued.
pub struct Passes {
    /// Current pass (1 after the first pass was queued).
    pub pass: u64,
    pages_queued: u64,
    held: Vec<DirtyBitmap>,
    /// Pages set in `held`.
    held_pages: u64,
    /// When the current pass began.
    pass_started: Instant,
    conv: Convergence,
    last_sample: (Instant, u64, u64),
    last_fetch: Instant,
    /// Pages written when the current pass began (pages moved by a pass).
    pass_start_done: u64,
    /// Pages written at the last progress check (pass 1 progress).
    seen_done: u64,
    /// When `seen_done` last grew (a page was written).
    moved_at: Instant,
    waiting_warned: bool,
    gov: Governor,
    /// The pages of the pass being sent (populated ranges in pass 1, the
    /// dirty log after): what the destination may lack if post-copy
    /// interrupts the pass.
    pub(super) current: Vec<DirtyBitmap>,
    /// The bitmaps of the pass before `current`, reused (zeroed) by the
    /// next fetch.
    spare: Vec<DirtyBitmap>,
    /// The switch to post-copy came before the current pass was wholly on
    /// the wire (some of its pages may never have been queued).
    pub(super) interrupted: bool,
    /// The DMA logs merged into every fetch.
    dma: Arc<DmaLogs>,
}

impl Passes {
    /// Before pass 1; `dma` is merged into every fetch of the dirty log.
    pub fn new(dma: Arc<DmaLogs>) -> Passes {
        Passes {
            dma,
            pass: 0,
            pages_queued: 0,
            held: Vec::new(),
            held_pages: 0,
            pass_started: Instant::now(),
            conv: Convergence::new(),
            last_sample: (Instant::now(), 0, 0),
            last_fetch: Instant::now(),
            pass_start_done: 0,
            seen_done: 0,
            moved_at: Instant::now(),
            waiting_warned: false,
            gov: Governor::new(Instant::now()),
            current: Vec::new(),
            spare: Vec::new(),
            interrupted: false,
        }
    }

    /// The dirty log fetched and not queued yet.
    pub(super) fn held_mut(&mut self) -> &mut Vec<DirtyBitmap> {
        &mut self.held
    }

    /// Pages queued so far in all passes.
    pub(super) fn pages_queued(&self) -> u64 {
        self.pages_queued
    }

    /// Fetches every region's dirty log into `held`; returns the dirty pages
    /// held. Records the dirty rate (pages newly found over the time since
    /// the previous fetch) and the fetch in the statistics.
    pub(super) fn fetch_all(&mut self, ctx: &Ctx) -> Result<u64, MigrationError> {
        let regions = ctx.mem.regions();
        let mut pages = 0;
        if self.held.is_empty() {
            self.held = std::mem::take(&mut self.spare);
            for bm in &mut self.held {
                bm.words.fill(0);
            }
        }
        self.held.resize(regions.len(), DirtyBitmap::default());
        for (i, r) in regions.iter().enumerate() {
            ctx.vm
                .fetch_dirty_into(i, &mut self.held[i])
                .map_err(|e| MigrationError::vm("fetching the dirty log", e))?;
            let dma = self.dma.report_into(r, &mut self.held[i])?;
            if dma > 0 {
                ctx.stats.dma_dirty_pages.fetch_add(dma, Relaxed);
            }
            pages += count_dirty(&self.held[i], r.pages());
        }
        let new = pages.saturating_sub(self.held_pages);
        self.conv
            .record_dirty(new * PAGE_SIZE, self.last_fetch.elapsed());
        self.last_fetch = Instant::now();
        self.held_pages = pages;
        let st = &ctx.stats;
        st.dirty_rate.store(self.conv.dirty_rate() as u64, Relaxed);
        st.dirty_syncs.fetch_add(1, Relaxed);
        st.held_pages.store(pages, Relaxed);
        Ok(pages)
    }

    /// Marks every populated page of every region in `held` (the pages an
    /// untracked device may have written); returns the populated pages.
    fn resend_populated(&mut self, ctx: &Ctx) -> Result<u64, MigrationError> {
        let regions = ctx.mem.regions();
        self.held.resize(regions.len(), DirtyBitmap::default());
        let mut n = 0;
        for (i, r) in regions.iter().enumerate() {
            let ranges = ctx
                .vm
                .populated(i)
                .map_err(|e| MigrationError::vm("reading the populated ranges", e))?;
            let bm = ranges_bitmap(&ranges, r.pages());
            n += count_dirty(&bm, r.pages());
            self.held[i].merge(&bm);
        }
        Ok(n)
    }

    /// While a pass runs: brings the live rates up to date and peeks at the
    /// dirty log once [`DIRTY_PEEK`] has passed since the last fetch.
    fn peek(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        ctx.stats.tick_rates();
        if self.last_fetch.elapsed() >= DIRTY_PEEK {
            self.fetch_all(ctx)?;
        }
        Ok(())
    }

    /// Queues the held dirty pages as pass `self.pass`.
    fn send_held(&mut self, ctx: &Ctx, pool: &Pool) -> Result<u64, MigrationError> {
        ctx.stats.begin_pass(self.held_pages);
        self.held_pages = 0;
        self.pass_started = Instant::now();
        let held = std::mem::take(&mut self.held);
        let queued = (|| {
            let mut pk = Packetizer::new(pool, &*ctx.vm, ctx.mem.regions(), self.pass);
            for (i, bm) in held.iter().enumerate() {
                pk.add_bitmap(i, bm)?;
            }
            pk.finish()
        })();
        // The held log becomes the pass being sent (queued or not), and the
        // previous one's buffers take the next fetch (zeroed then): no
        // bitmap of the guest's size is made or copied here, where the VM
        // may be paused.
        self.spare = std::mem::replace(&mut self.current, held);
        let pages = queued?;
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
    ///
    /// Meanwhile it applies a changed bandwidth cap at once, counts pass 1's
    /// writes as progress, and enforces `progress_timeout_s`. Returns
    /// `false` at once when the switch to post-copy was asked for
    /// (`technique: post-copy`): post-copy takes over what is left.
    fn await_drained(
        &mut self,
        ctx: &Ctx,
        pool: &Pool,
        limiter: &RateLimiter,
    ) -> Result<bool, MigrationError> {
        loop {
            if pool.switching() {
                return Ok(false);
            }
            let params = ctx.live.get();
            limiter.set_user(params.max_bandwidth_mib_s.map(|m| m * 1024.0 * 1024.0));
            let done = pool.pages_done.load(Relaxed);
            let now = Instant::now();
            if done > self.seen_done {
                self.moved_at = now;
                if self.pass == 1 {
                    self.gov.first_pass_progress(now);
                }
            }
            self.seen_done = done;
            self.gov.check_progress(&params, now, Some(self.moved_at))?;
            if done >= self.pages_queued {
                return Ok(true);
            }
            self.peek(ctx)?;
            ctx.ctl.check()?;
            ctx.check_timeout()?;
            pool.wait_pages(self.pages_queued, PASS_POLL);
        }
    }
}

/// What follows a completed pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Another live pass.
    Continue,
    /// Pause the VM and copy the rest (pre-copy's stop-copy).
    SwitchOver(SwitchoverReason),
    /// Switch to post-copy.
    PostCopy(SwitchoverReason),
}

/// Carries out what the policy asked for: the throttle and the events.
fn apply(ctx: &Ctx, fx: Effects) {
    for (name, fields) in fx.events {
        if name == "stalled" {
            log::info!("migration stalled: {fields}");
        }
        ctx.events.emit(name, fields);
    }
    if let Some(pct) = fx.throttle {
        ctx.set_throttle(pct);
    }
}

/// The pages of byte `ranges` (rounded out to pages) as a bitmap of a
/// region of `pages` pages.
fn ranges_bitmap(ranges: &[std::ops::Range<u64>], pages: u64) -> DirtyBitmap {
    DirtyBitmap {
        words: crate::bitmap::ranges_words(ranges, pages, PAGE_SIZE),
    }
}

fn precopy_devices(ctx: &Ctx) -> Vec<usize> {
    (0..ctx.devices.len())
        .filter(|&i| does_precopy(&*ctx.devices[i], ctx.p.device_precopy))
        .collect()
}

fn acks_complete(ctx: &Ctx) -> bool {
    let acks = lock(&ctx.from_dest.acks);
    precopy_devices(ctx)
        .iter()
        .all(|&i| acks.get(i).is_some_and(|a| a.is_some()))
}

fn device_estimate(ctx: &Ctx) -> (u64, Duration) {
    let mut bytes = 0;
    let mut load = Duration::ZERO;
    for c in &ctx.counters {
        let r = c.remaining.load(Relaxed);
        bytes += r;
        let rate = c.load_rate.load(Relaxed);
        if rate > 0 {
            load = load.max(Duration::from_secs_f64(r as f64 / rate as f64));
        }
    }
    (bytes, load)
}

impl Streaming {
    /// Queues pass 1: every populated page.
    pub fn first_pass(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        let pool = &self.data.pool;
        let ps = &mut self.passes;
        ps.pass = 1;
        ctx.stats.iteration.store(1, Relaxed);
        ps.last_fetch = Instant::now();
        ps.last_sample = (Instant::now(), 0, 0);
        ps.pass_started = Instant::now();
        let mut pk = Packetizer::new(pool, &*ctx.vm, ctx.mem.regions(), 1);
        ps.current.clear();
        let mut plan = Vec::new();
        let mut planned = 0;
        for (i, r) in ctx.mem.regions().iter().enumerate() {
            let ranges = ctx
                .vm
                .populated(i)
                .map_err(|e| MigrationError::vm("listing populated memory", e))?;
            ps.current.push(ranges_bitmap(&ranges, r.pages()));
            let runs = pk.populated_runs(i, &ranges);
            planned += runs.iter().map(|(s, e)| e - s).sum::<u64>();
            plan.push(runs);
        }
        // remaining_bytes counts down from the populated size from here on.
        ctx.stats.begin_pass(planned);
        for (i, runs) in plan.into_iter().enumerate() {
            for (s, e) in runs {
                let mut first = s;
                while first < e {
                    let n = (e - first).min(PACKET_PAGES);
                    pk.add_run(i, first, n)?;
                    first += n;
                    ps.peek(ctx)?;
                }
            }
        }
        let pages = pk.finish()?;
        ps.pages_queued += pages;
        pool.push_all(|| Item::Sync { pass: 1 });
        log::debug!("pass 1: {pages} populated pages queued");
        Ok(())
    }

    /// After the previous pass drained: fetches the dirty log and decides
    /// what comes next.
    fn pass_done(&mut self, ctx: &Ctx) -> Result<Step, MigrationError> {
        let pool = &self.data.pool;
        let ps = &mut self.passes;
        if !ps.await_drained(ctx, pool, &self.data.limiter)? {
            ps.interrupted = true;
            return Ok(Step::PostCopy(SwitchoverReason::User));
        }
        let now = Instant::now();
        let (t0, p0, b0) = ps.last_sample;
        let (p1, b1) = (pool.pages_done.load(Relaxed), pool.sent_bytes.load(Relaxed));
        ps.conv
            .record_transfer((p1 - p0) * PAGE_SIZE, b1 - b0, now - t0);
        ps.last_sample = (now, p1, b1);
        let moved = p1.saturating_sub(ps.pass_start_done) * PAGE_SIZE;

        let dirty_pages = ps.fetch_all(ctx)?;
        let dirty = dirty_pages * PAGE_SIZE;
        let (dev_bytes, dev_load) = device_estimate(ctx);
        let remaining = dirty + pool.backlog() + dev_bytes;
        let est = ps.conv.estimate(remaining, dev_load);
        let params = ctx.decision_params();
        let report = PassReport {
            pass: ps.pass,
            remaining,
            dirty,
            moved,
            estimate: est,
            acks: acks_complete(ctx),
        };
        let (verdict, fx) = ps.gov.after_pass(&params, &report, now);
        let allowed = ps.gov.allowed_downtime(&params);
        let st = &ctx.stats;
        st.expected_downtime_ms
            .store(est.as_millis() as u64, Relaxed);
        st.allowed_downtime_ms
            .store(allowed.as_millis() as u64, Relaxed);
        st.stalls.store(ps.gov.stalls, Relaxed);
        ctx.events.emit(
            "pass-completed",
            json!({
                "pass": ps.pass,
                "bytes": moved,
                "dirty_bytes": dirty,
                "dirty_rate_bytes_per_s": ps.conv.dirty_rate() as u64,
                "remaining_bytes": remaining,
                "expected_downtime_ms": est.as_millis() as u64,
                "allowed_downtime_ms": allowed.as_millis() as u64,
            }),
        );
        apply(ctx, fx);
        ps.gov.check_progress(&params, now, None)?;
        let secs = now.duration_since(ps.pass_started).as_secs_f64();
        log::info!(
            "pass {} done: {:.1} MiB in {secs:.2} s ({:.1} MiB/s), {:.1} MiB dirty ({:.1} MiB/s), \
             {:.1} MiB remaining, expected downtime {} ms (allowed {} ms){}; {}",
            ps.pass,
            mib(moved),
            mib((moved as f64 / secs.max(1e-3)) as u64),
            mib(dirty),
            mib(ps.conv.dirty_rate() as u64),
            mib(remaining),
            est.as_millis(),
            allowed.as_millis(),
            if report.acks {
                ""
            } else {
                ", device acks pending"
            },
            match verdict {
                Verdict::Continue => "next pass".to_string(),
                Verdict::SwitchOver(r) => format!("switch-over ({r:?})"),
                Verdict::PostCopy(r) => format!("post-copy ({r:?})"),
            }
        );
        match verdict {
            Verdict::SwitchOver(r) => {
                if r == SwitchoverReason::ForcedByPolicy {
                    log::warn!(
                        "switching over with an estimated downtime of {est:?} after {} stall(s): \
                         the {:?} policy allows {allowed:?} now ({} ms asked)",
                        ps.gov.stalls,
                        params.policy,
                        params.downtime_ms
                    );
                }
                return Ok(Step::SwitchOver(r));
            }
            Verdict::PostCopy(r) => return Ok(Step::PostCopy(r)),
            Verdict::Continue => {}
        }
        if est <= allowed && !report.acks && !ps.waiting_warned {
            log::info!("converged; waiting for the destination to load the devices' initial data");
            ps.waiting_warned = true;
        }
        if dirty_pages == 0 {
            // Nothing new for RAM (what remains is device data or the
            // queues): an empty pass would only put a SYNC on every
            // connection ahead of the device chunks. Wait for news from the
            // destination, or a short while, before the next one.
            let g = ctx.from_dest.notify.generation();
            ctx.from_dest.notify.wait(g, EMPTY_PASS_WAIT);
        }
        Ok(Step::Continue)
    }

    /// Queues the next pass from the held dirty log.
    fn next_pass(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        let ps = &mut self.passes;
        ps.pass += 1;
        ps.pass_start_done = self.data.pool.pages_done.load(Relaxed);
        ps.pass_started = Instant::now();
        ctx.stats.iteration.store(ps.pass, Relaxed);
        let queued = ps.send_held(ctx, &self.data.pool)?;
        let pass = ps.pass;
        self.data.pool.push_all(|| Item::Sync { pass });
        log::debug!("pass {pass}: {queued} pages queued");
        Ok(())
    }

    /// One step of the pre-copy: either the next pass, or the switch-over
    /// (the VM is paused and the final pass queued).
    pub fn iterate(mut self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        match or_fail!(self.pass_done(ctx), Phase::Streaming(self)) {
            Step::Continue => {}
            Step::SwitchOver(reason) => {
                ctx.stats.set_switchover_reason(reason);
                ctx.events.emit(
                    "switchover",
                    json!({ "reason": reason, "pass": self.passes.pass }),
                );
                ctx.set_throttle(0);
                return self.pause(ctx);
            }
            Step::PostCopy(reason) => {
                ctx.stats.set_switchover_reason(reason);
                ctx.events.emit(
                    "switchover",
                    json!({ "reason": reason, "pass": self.passes.pass, "technique": "post-copy" }),
                );
                ctx.set_throttle(0);
                return self.postcopy(ctx, reason);
            }
        }
        or_fail!(self.next_pass(ctx), Phase::Streaming(self));
        Ok(Phase::Streaming(self))
    }

    /// The stopped phase of this stream, with the VM `paused` now.
    pub(super) fn into_stopped(self: Box<Self>, paused: PausedVm) -> Box<Stopped> {
        let s = *self;
        s.data.wctx.stats.mark_paused();
        Box::new(Stopped {
            link: s.link,
            data: s.data,
            devs: s.devs,
            restore: s.restore,
            paused,
            dirty: s.dirty,
            passes: s.passes,
            pause_at: (Instant::now(), epoch_us()),
            post: None,
        })
    }

    /// Pauses the VM (the guard resumes it on failure) and queues the
    /// final pass.
    fn pause(self: Box<Self>, ctx: &Ctx) -> Result<Phase, Failed> {
        let paused = or_fail!(PausedVm::pause(&ctx.vm), Phase::Streaming(self));
        let mut st = self.into_stopped(paused);
        or_fail!(st.final_pass(ctx), Phase::Stopped(st));
        Ok(Phase::Stopped(st))
    }
}

impl Stopped {
    /// Stops the devices (no DMA after this), fetches the last dirty pages
    /// (DMA logs included) and queues them as the final pass. With an
    /// untracked DMA device the operator allowed, every populated page is
    /// in the final pass.
    fn final_pass(&mut self, ctx: &Ctx) -> Result<(), MigrationError> {
        self.devs.quiesce(ctx)?;
        let ps = &mut self.passes;
        if !ctx.dma.untracked.is_empty() {
            let n = ps.resend_populated(ctx)?;
            log::warn!(
                "switch-over: a device cannot log its DMA writes; re-sending all {:.1} MiB of \
                 populated RAM (allow_untracked_dma)",
                mib(n * PAGE_SIZE)
            );
        }
        let pages = ps.fetch_all(ctx)?;
        ps.pass += 1;
        ctx.stats.iteration.store(ps.pass, Relaxed);
        let (dev_bytes, _) = device_estimate(ctx);
        log::info!(
            "switch-over ({}): VM paused; final pass {} with {:.1} MiB of RAM and {:.1} MiB of \
             device state, expected downtime {} ms",
            ctx.stats
                .switchover_reason()
                .map(|r| format!("{r:?}"))
                .unwrap_or_default(),
            ps.pass,
            mib(pages * PAGE_SIZE),
            mib(dev_bytes),
            ctx.stats.expected_downtime_ms.load(Relaxed)
        );
        ps.send_held(ctx, &self.data.pool)?;
        Ok(())
    }
}
