//! The convergence policy of a running pre-copy: stall detection, the
//! downtime schedule, auto-converge, the switch to post-copy, and the
//! progress timeout. It reads the live parameters at every decision, so a
//! change through `vm.migration-set-parameters` takes effect at the next
//! pass boundary.
//!
//! Definitions (also in the README):
//! * **progress**: the bytes still to move at a pass boundary (dirty pages
//!   plus queued backlog plus device state) reach a new low, at least
//!   [`PROGRESS_MARGIN`] below the previous low. During pass 1, every page
//!   written counts as progress.
//! * **stall**: `stall_limit_s` without progress. Each further
//!   `stall_limit_s` without progress is another stall.
//! * **busy pass** (QEMU's auto-converge trigger): the guest dirtied at
//!   least [`BUSY_RATIO`] of what the pass moved.
//! * Auto-converge (`auto_converge`, or the `suspend-workload-if-needed`
//!   policy once its schedule is spent) throttles at the second busy pass
//!   in a row by `throttle_initial_percent`, and adds
//!   `throttle_increment_percent` at every further busy pass, up to
//!   `throttle_max_percent`. The throttle never goes down during a
//!   migration and is removed when it ends. Under `minimal-downtime` with
//!   `auto_converge`, stalls do not raise the downtime while the throttle
//!   can still rise.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::error::MigrationError;
use crate::live::{MigrationParameters, Policy, SwitchoverReason, Technique};

/// Factors of `downtime_ms` that the downtime schedule allows after the
/// first, second, ... stall (the last one stays).
pub const DOWNTIME_SCHEDULE: [f64; 5] = [1.5, 2.0, 3.0, 4.0, 5.0];
/// The schedule grows from at least this many ms (so that it also helps
/// `downtime_ms: 0`).
pub const SCHEDULE_BASE_MS: u64 = 100;
/// A new low must be this much below the previous one to count as
/// progress.
pub const PROGRESS_MARGIN: f64 = 0.95;
/// A pass is busy when the guest dirtied this share of what it moved.
pub const BUSY_RATIO: f64 = 0.5;

/// What the pass that just ended found.
#[derive(Debug, Clone, Copy)]
pub struct PassReport {
    /// The pass that ended.
    pub pass: u64,
    /// Bytes still to move (dirty pages, backlog, device state).
    pub remaining: u64,
    /// Bytes the guest dirtied during the pass.
    pub dirty: u64,
    /// Bytes of guest pages the pass moved.
    pub moved: u64,
    /// Predicted downtime to move `remaining`.
    pub estimate: Duration,
    /// Whether the devices' switch-over acks are all in.
    pub acks: bool,
}

/// What the policy asks for after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Another pass.
    Continue,
    /// Pause and copy the rest.
    SwitchOver(SwitchoverReason),
    /// Switch to post-copy.
    PostCopy(SwitchoverReason),
}

/// Side effects the policy wants, returned with the verdict so that the
/// caller (which owns the VM and the event log) carries them out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Effects {
    /// A new throttle percentage.
    pub throttle: Option<u32>,
    /// Events to emit: name and fields.
    pub events: Vec<(&'static str, serde_json::Value)>,
}

/// The policy's memory between passes.
///
/// Invariant: `low` is the least `remaining` seen at a pass boundary (or
/// `None` before the first), `low_at` when it was reached or when pass 1
/// last wrote a page; `stalls` counts declared stalls since `low_at`
/// in `stall_at` steps; `throttle` only grows.
#[derive(Debug, Clone)]
pub struct Governor {
    low: Option<u64>,
    low_at: Instant,
    stall_at: Instant,
    /// Stalls declared in this migration.
    pub stalls: u64,
    busy_in_row: u32,
    /// Current throttle percentage.
    pub throttle: u32,
    /// Schedule steps taken (index into [`DOWNTIME_SCHEDULE`] + 1).
    steps: usize,
}

impl Governor {
    /// A policy at the start of pass 1.
    pub fn new(now: Instant) -> Governor {
        Governor {
            low: None,
            low_at: now,
            stall_at: now,
            stalls: 0,
            busy_in_row: 0,
            throttle: 0,
            steps: 0,
        }
    }

    /// Pass 1 wrote pages at `now`: that is progress.
    pub fn first_pass_progress(&mut self, now: Instant) {
        if self.low.is_none() {
            self.low_at = now;
            self.stall_at = now;
        }
    }

    /// The downtime allowed now under `p`: `downtime_ms`, or after the
    /// `k`-th stall under a scheduling policy, `DOWNTIME_SCHEDULE[k - 1]`
    /// times `max(downtime_ms, SCHEDULE_BASE_MS)`.
    pub fn allowed_downtime(&self, p: &MigrationParameters) -> Duration {
        let ms = match (p.policy, self.steps) {
            (Policy::Legacy | Policy::PostCopy, _) | (_, 0) => p.downtime_ms as f64,
            (_, s) => {
                DOWNTIME_SCHEDULE[(s - 1).min(DOWNTIME_SCHEDULE.len() - 1)]
                    * p.downtime_ms.max(SCHEDULE_BASE_MS) as f64
            }
        };
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// Whether auto-converge is on under `p` now.
    fn auto_converge(&self, p: &MigrationParameters) -> bool {
        p.auto_converge
            || (p.policy == Policy::SuspendWorkloadIfNeeded && self.steps > DOWNTIME_SCHEDULE.len())
    }

    /// Fails when `progress_timeout_s` passed without progress.
    ///
    /// Progress is judged at pass ends (a new low of the remaining bytes);
    /// within a pass, whose end cannot be judged yet, `moved_at` (when the
    /// last page was written) also counts, so only a pass that moves
    /// nothing at all for the timeout ends the migration early.
    pub fn check_progress(
        &self,
        p: &MigrationParameters,
        now: Instant,
        moved_at: Option<Instant>,
    ) -> Result<(), MigrationError> {
        if let Some(t) = p.progress_timeout_s {
            let since = moved_at.map_or(self.low_at, |m| m.max(self.low_at));
            let idle = now.saturating_duration_since(since);
            if idle >= Duration::from_secs(t) {
                return Err(MigrationError::NoProgress(format!(
                    "no progress for {} s (progress_timeout_s = {t}); the migration was cancelled \
                     and the VM runs on here",
                    idle.as_secs()
                )));
            }
        }
        Ok(())
    }

    /// Decides after a pass, under the parameters `p` in force.
    pub fn after_pass(
        &mut self,
        p: &MigrationParameters,
        r: &PassReport,
        now: Instant,
    ) -> (Verdict, Effects) {
        let mut fx = Effects::default();
        // Progress and stalls.
        let progressed = match self.low {
            None => true,
            Some(low) => (r.remaining as f64) < low as f64 * PROGRESS_MARGIN,
        };
        if progressed {
            self.low = Some(r.remaining);
            self.low_at = now;
            self.stall_at = now;
        } else {
            self.low = Some(self.low.unwrap_or(r.remaining).min(r.remaining));
        }
        let stall_limit = Duration::from_secs(p.stall_limit_s.max(1));
        let mut stalled = false;
        while now.saturating_duration_since(self.stall_at) >= stall_limit {
            self.stall_at += stall_limit;
            self.stalls += 1;
            stalled = true;
            // With auto-converge asked for under minimal-downtime, the
            // throttle goes first: the downtime only grows once it is at
            // its maximum (the asked downtime is kept while the guest can
            // still be slowed).
            let throttle_first = p.policy == Policy::MinimalDowntime
                && p.auto_converge
                && self.throttle < p.throttle_max_percent;
            if matches!(
                p.policy,
                Policy::MinimalDowntime | Policy::SuspendWorkloadIfNeeded
            ) && !throttle_first
            {
                self.steps += 1;
            }
        }
        if stalled {
            fx.events.push((
                "stalled",
                json!({
                    "pass": r.pass,
                    "stalls": self.stalls,
                    "seconds_without_progress": now.saturating_duration_since(self.low_at).as_secs(),
                    "remaining_bytes": r.remaining,
                    "allowed_downtime_ms": self.allowed_downtime(p).as_millis() as u64,
                    "policy": p.policy,
                }),
            ));
        }
        // Auto-converge.
        let busy = r.moved > 0 && r.dirty as f64 >= r.moved as f64 * BUSY_RATIO;
        self.busy_in_row = if busy { self.busy_in_row + 1 } else { 0 };
        if self.auto_converge(p) && busy && self.busy_in_row >= 2 {
            let next = if self.throttle == 0 {
                p.throttle_initial_percent
            } else {
                self.throttle + p.throttle_increment_percent
            }
            .min(p.throttle_max_percent)
            .max(self.throttle);
            if next != self.throttle {
                self.throttle = next;
                fx.throttle = Some(next);
            }
        }
        // The verdict.
        if p.technique == Technique::PostCopy {
            return (Verdict::PostCopy(SwitchoverReason::User), fx);
        }
        if p.policy == Policy::PostCopy && self.stalls > 0 {
            return (Verdict::PostCopy(SwitchoverReason::PostCopy), fx);
        }
        if r.acks {
            if r.estimate <= Duration::from_millis(p.downtime_ms) {
                return (Verdict::SwitchOver(SwitchoverReason::Converged), fx);
            }
            if r.estimate <= self.allowed_downtime(p) {
                return (Verdict::SwitchOver(SwitchoverReason::ForcedByPolicy), fx);
            }
        }
        (Verdict::Continue, fx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(pass: u64, remaining: u64, dirty: u64, moved: u64, est_ms: u64) -> PassReport {
        PassReport {
            pass,
            remaining,
            dirty,
            moved,
            estimate: Duration::from_millis(est_ms),
            acks: true,
        }
    }

    #[test]
    fn converges_when_the_estimate_fits() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters::default();
        let (v, _) = g.after_pass(&p, &report(1, 1 << 20, 1 << 20, 1 << 30, 10), t0);
        assert_eq!(v, Verdict::SwitchOver(SwitchoverReason::Converged));
    }

    #[test]
    fn the_schedule_grows_with_stalls_and_forces() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            stall_limit_s: 1,
            ..Default::default()
        };
        // 400 ms needed, 300 allowed: continue, no progress afterwards.
        let (v, fx) = g.after_pass(&p, &report(1, 100, 100, 100, 400), t0);
        assert_eq!(v, Verdict::Continue);
        assert!(fx.events.is_empty());
        let t1 = t0 + Duration::from_millis(1100);
        let (v, fx) = g.after_pass(&p, &report(2, 100, 100, 100, 400), t1);
        assert_eq!(g.stalls, 1);
        assert_eq!(fx.events[0].0, "stalled");
        assert_eq!(g.allowed_downtime(&p), Duration::from_millis(450));
        assert_eq!(v, Verdict::SwitchOver(SwitchoverReason::ForcedByPolicy));
    }

    #[test]
    fn legacy_never_forces_and_progress_resets_stalls() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            policy: Policy::Legacy,
            stall_limit_s: 1,
            ..Default::default()
        };
        g.after_pass(&p, &report(1, 1000, 100, 100, 400), t0);
        let (v, _) = g.after_pass(
            &p,
            &report(2, 1000, 100, 100, 400),
            t0 + Duration::from_secs(5),
        );
        assert_eq!(v, Verdict::Continue);
        assert_eq!(g.stalls, 5);
        assert_eq!(g.allowed_downtime(&p), Duration::from_millis(300));
        // A new low: progress, the stall clock restarts.
        let t = t0 + Duration::from_millis(5500);
        g.after_pass(&p, &report(3, 500, 100, 100, 400), t);
        assert_eq!(g.stalls, 5);
        g.after_pass(
            &p,
            &report(4, 500, 100, 100, 400),
            t + Duration::from_millis(900),
        );
        assert_eq!(g.stalls, 5);
    }

    #[test]
    fn auto_converge_throttles_busy_passes_up_to_the_max() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            auto_converge: true,
            throttle_initial_percent: 30,
            throttle_increment_percent: 40,
            throttle_max_percent: 90,
            ..Default::default()
        };
        let busy = |pass| report(pass, 1000, 900, 1000, 5000);
        assert_eq!(g.after_pass(&p, &busy(1), t0).1.throttle, None);
        assert_eq!(g.after_pass(&p, &busy(2), t0).1.throttle, Some(30));
        assert_eq!(g.after_pass(&p, &busy(3), t0).1.throttle, Some(70));
        assert_eq!(g.after_pass(&p, &busy(4), t0).1.throttle, Some(90));
        assert_eq!(g.after_pass(&p, &busy(5), t0).1.throttle, None);
        // A quiet pass breaks the run but keeps the throttle.
        g.after_pass(&p, &report(6, 10, 1, 1000, 5000), t0);
        assert_eq!(g.throttle, 90);
    }

    #[test]
    fn suspend_workload_throttles_only_after_the_schedule() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            policy: Policy::SuspendWorkloadIfNeeded,
            stall_limit_s: 1,
            downtime_ms: 1,
            ..Default::default()
        };
        let busy = |pass| report(pass, 1000, 900, 1000, 5000);
        for i in 1..=5 {
            let (_, fx) = g.after_pass(&p, &busy(i), t0 + Duration::from_secs(i - 1));
            assert_eq!(fx.throttle, None, "pass {i}");
        }
        let (_, fx) = g.after_pass(&p, &busy(6), t0 + Duration::from_secs(6));
        assert_eq!(fx.throttle, Some(20));
    }

    #[test]
    fn post_copy_policy_switches_at_the_first_stall_and_user_at_once() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            policy: Policy::PostCopy,
            stall_limit_s: 1,
            ..Default::default()
        };
        let (v, _) = g.after_pass(&p, &report(1, 1000, 900, 1000, 5000), t0);
        assert_eq!(v, Verdict::Continue);
        let (v, _) = g.after_pass(
            &p,
            &report(2, 1000, 900, 1000, 5000),
            t0 + Duration::from_secs(1),
        );
        assert_eq!(v, Verdict::PostCopy(SwitchoverReason::PostCopy));
        let q = MigrationParameters {
            technique: Technique::PostCopy,
            ..Default::default()
        };
        let (v, _) = Governor::new(t0).after_pass(&q, &report(1, 1, 1, 1, 1), t0);
        assert_eq!(v, Verdict::PostCopy(SwitchoverReason::User));
    }

    #[test]
    fn progress_timeout() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            progress_timeout_s: Some(3),
            ..Default::default()
        };
        g.after_pass(&p, &report(1, 1000, 900, 1000, 5000), t0);
        g.check_progress(&p, t0 + Duration::from_secs(2), None)
            .unwrap();
        let e = g
            .check_progress(&p, t0 + Duration::from_secs(3), None)
            .unwrap_err();
        assert!(e.to_string().contains("no progress for 3 s"), "{e}");
        // Within a pass that still writes pages, only a halt counts.
        let t5 = t0 + Duration::from_secs(5);
        g.check_progress(&p, t5, Some(t5 - Duration::from_secs(1)))
            .unwrap();
        g.check_progress(&p, t5, Some(t5 - Duration::from_secs(3)))
            .unwrap_err();
        g.check_progress(
            &MigrationParameters::default(),
            t0 + Duration::from_secs(99),
            None,
        )
        .unwrap();
    }

    #[test]
    fn throttle_goes_before_the_schedule_under_minimal_downtime() {
        let t0 = Instant::now();
        let mut g = Governor::new(t0);
        let p = MigrationParameters {
            auto_converge: true,
            stall_limit_s: 1,
            throttle_initial_percent: 50,
            throttle_increment_percent: 49,
            ..Default::default()
        };
        let base = p.downtime_ms;
        g.after_pass(&p, &report(1, 1000, 1000, 1000, 5000), t0);
        for i in 2..=4u64 {
            let t = t0 + Duration::from_secs(i);
            g.after_pass(&p, &report(i, 1000, 1000, 1000, 5000), t);
        }
        // Throttle 50 then 99 (max); the downtime stayed until then.
        assert_eq!(g.throttle, 99);
        assert!(g.stalls >= 2);
        let before = g.allowed_downtime(&p).as_millis() as u64;
        assert!(
            before <= (base as f64 * DOWNTIME_SCHEDULE[0]) as u64,
            "{before}"
        );
        g.after_pass(
            &p,
            &report(5, 1000, 1000, 1000, 5000),
            t0 + Duration::from_secs(6),
        );
        assert!(g.allowed_downtime(&p).as_millis() as u64 > before);
    }
}
