//! vCPU throttling (auto-converge): a throttled vCPU runs guest code in
//! timeslices of [`SLICE`] and naps `p / (100 - p)` times the slice it
//! just ran, so that it gets `100 - p` percent of its time.
//!
//! The arithmetic is [`SliceClock`] (pure, unit-tested); the thread body
//! asks it before every `KVM_RUN` and naps on its event channel, so a
//! pause, an exit or a new throttle ends a nap at once. What ends a slice
//! while the guest runs is a per-thread POSIX timer ([`SliceTimer`]) that
//! sends the kick signal to the vCPU thread itself: `KVM_RUN` returns
//! `EINTR` exactly as for a kick.

use std::time::{Duration, Instant};

use super::kick::kick_signal;

/// Length of one timeslice of a throttled vCPU (QEMU's
/// `CPU_THROTTLE_TIMESLICE_NS`).
pub const SLICE: Duration = Duration::from_millis(10);

/// The highest throttle in percent (100 would stop the guest).
pub const MAX_PERCENT: u32 = 99;

/// Longest single nap: a slice that overran (no timer, or a long exit)
/// is not paid back beyond this.
pub const MAX_NAP: Duration = Duration::from_secs(1);

/// How long a vCPU throttled by `percent` naps after it ran for `ran`:
/// `ran * p / (100 - p)` with `p = min(percent, MAX_PERCENT)`, at most
/// [`MAX_NAP`]; zero when `percent` is 0.
pub fn nap_for(ran: Duration, percent: u32) -> Duration {
    let p = u128::from(percent.min(MAX_PERCENT));
    if p == 0 {
        return Duration::ZERO;
    }
    let ns = ran.as_nanos().saturating_mul(p) / (100 - p);
    let cap = MAX_NAP.as_nanos();
    Duration::from_nanos(ns.min(cap) as u64)
}

/// Where a throttled vCPU is in its slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not throttled, or no slice started yet.
    Idle,
    /// Running guest code since this instant.
    Running(Instant),
    /// Napping until this instant.
    Napping(Instant),
}

/// What the vCPU thread does next, as [`SliceClock::before_run`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Enter `KVM_RUN`; with `Some(d)`, first arm the slice timer to fire
    /// in `d` (a new slice starts).
    Run(Option<Duration>),
    /// Nap this long (on the event channel), then ask again. The slice
    /// timer must be disarmed.
    Nap(Duration),
}

/// The timeslice arithmetic of one vCPU.
///
/// Invariant: `percent <= MAX_PERCENT`; `state` is `Idle` whenever
/// `percent` is 0, and after any change of `percent` or a pause (a new
/// slice then starts at the next run).
#[derive(Debug, Clone)]
pub struct SliceClock {
    percent: u32,
    state: State,
}

impl Default for SliceClock {
    fn default() -> Self {
        SliceClock {
            percent: 0,
            state: State::Idle,
        }
    }
}

impl SliceClock {
    /// The throttle in force, in percent.
    pub fn percent(&self) -> u32 {
        self.percent
    }

    /// Sets the throttle (clamped to [`MAX_PERCENT`]); a change cuts the
    /// current slice or nap short.
    pub fn set(&mut self, percent: u32) {
        let p = percent.min(MAX_PERCENT);
        if p != self.percent {
            self.percent = p;
            self.state = State::Idle;
        }
    }

    /// The vCPU stops running guest code (paused, ended): the next run
    /// starts a fresh slice. The throttle stays.
    pub fn stop(&mut self) {
        self.state = State::Idle;
    }

    /// Whether a slice is under way (the slice timer may be armed).
    pub fn in_slice(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    /// Decides, at `now`, before the thread would enter `KVM_RUN`.
    pub fn before_run(&mut self, now: Instant) -> Next {
        if self.percent == 0 {
            self.state = State::Idle;
            return Next::Run(None);
        }
        match self.state {
            State::Running(since) => {
                let ran = now.saturating_duration_since(since);
                if ran < SLICE {
                    return Next::Run(None);
                }
                let nap = nap_for(ran, self.percent);
                self.state = State::Napping(now + nap);
                Next::Nap(nap)
            }
            State::Napping(until) if now < until => Next::Nap(until - now),
            State::Idle | State::Napping(_) => {
                self.state = State::Running(now);
                Next::Run(Some(SLICE))
            }
        }
    }
}

/// A one-shot POSIX timer that sends the kick signal to the thread that
/// created it.
///
/// Invariant: `id` is a live timer of this process whose signal goes to
/// the creating thread (the vCPU thread, which blocks the kick signal
/// outside `KVM_RUN`); it is deleted on drop. Not `Send` (the raw timer
/// id is a pointer), so it never leaves that thread.
pub struct SliceTimer {
    id: libc::timer_t,
}

impl SliceTimer {
    /// Creates the timer for the calling thread (disarmed).
    pub fn new() -> std::io::Result<SliceTimer> {
        // SAFETY: an all-zero sigevent is a valid value; the fields the
        // kernel reads for SIGEV_THREAD_ID are set below.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `sev` and `id` are valid for the call; the kernel writes
        // the new timer's id into `id`.
        let r = unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(SliceTimer { id })
    }

    /// Fires once after `d` (zero disarms).
    pub fn arm(&self, d: Duration) -> std::io::Result<()> {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `id` is a live timer (invariant) and `spec` is valid; no
        // old value is asked for.
        let r = unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops a pending expiry.
    pub fn disarm(&self) -> std::io::Result<()> {
        self.arm(Duration::ZERO)
    }
}

impl Drop for SliceTimer {
    fn drop(&mut self) {
        // SAFETY: `id` is a live timer (invariant), deleted only here.
        unsafe { libc::timer_delete(self.id) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn nap_arithmetic() {
        assert_eq!(nap_for(SLICE, 0), Duration::ZERO);
        assert_eq!(nap_for(SLICE, 50), SLICE);
        assert_eq!(nap_for(SLICE, 20), Duration::from_micros(2500));
        assert_eq!(nap_for(SLICE, 80), 40 * MS);
        assert_eq!(nap_for(SLICE, 99), 990 * MS);
        // Clamped to 99 %, and to MAX_NAP for an overrun slice.
        assert_eq!(nap_for(SLICE, 100), 990 * MS);
        assert_eq!(nap_for(SLICE, u32::MAX), 990 * MS);
        assert_eq!(nap_for(Duration::from_secs(5), 99), MAX_NAP);
        assert_eq!(nap_for(Duration::MAX, 99), MAX_NAP);
        // The share of time the guest keeps is 100 - p percent.
        for p in [10u32, 25, 50, 75, 90] {
            let nap = nap_for(SLICE, p);
            let share = SLICE.as_secs_f64() / (SLICE + nap).as_secs_f64();
            assert!((share - f64::from(100 - p) / 100.0).abs() < 1e-6, "{p}");
        }
    }

    #[test]
    fn unthrottled_never_naps_or_arms() {
        let mut c = SliceClock::default();
        let t0 = Instant::now();
        for i in 0..5 {
            assert_eq!(c.before_run(t0 + i * SLICE * 10), Next::Run(None));
        }
        assert!(!c.in_slice());
    }

    #[test]
    fn a_slice_then_a_nap_then_a_new_slice() {
        let mut c = SliceClock::default();
        c.set(75);
        let t0 = Instant::now();
        assert_eq!(c.before_run(t0), Next::Run(Some(SLICE)));
        assert!(c.in_slice());
        // An early exit (I/O, a kick) inside the slice: run on.
        assert_eq!(c.before_run(t0 + 3 * MS), Next::Run(None));
        // The timer fired: nap 3 times the 10 ms that ran.
        let t1 = t0 + SLICE;
        assert_eq!(c.before_run(t1), Next::Nap(30 * MS));
        assert!(!c.in_slice());
        // Woken early by an event that changed nothing: nap the rest.
        assert_eq!(c.before_run(t1 + 10 * MS), Next::Nap(20 * MS));
        // The nap is over: a new slice.
        assert_eq!(c.before_run(t1 + 30 * MS), Next::Run(Some(SLICE)));
        // A slice that overran (a long exit) pays back what it ran.
        assert_eq!(c.before_run(t1 + 50 * MS), Next::Nap(60 * MS));
    }

    #[test]
    fn a_change_or_a_pause_restarts_the_slice_and_zero_resets() {
        let mut c = SliceClock::default();
        let t0 = Instant::now();
        c.set(99);
        assert_eq!(c.before_run(t0), Next::Run(Some(SLICE)));
        assert_eq!(c.before_run(t0 + SLICE), Next::Nap(990 * MS));
        // Lowering the throttle ends the long nap at once.
        c.set(50);
        assert_eq!(c.percent(), 50);
        assert_eq!(c.before_run(t0 + 20 * MS), Next::Run(Some(SLICE)));
        // A pause keeps the throttle but forgets the slice.
        c.stop();
        assert_eq!(c.percent(), 50);
        assert!(!c.in_slice());
        assert_eq!(c.before_run(t0 + 40 * MS), Next::Run(Some(SLICE)));
        // Back to 0: full speed from the next run on, even mid-nap.
        assert_eq!(c.before_run(t0 + 50 * MS), Next::Nap(10 * MS));
        c.set(0);
        assert_eq!(c.before_run(t0 + 51 * MS), Next::Run(None));
        assert!(!c.in_slice());
        // Setting the same value again does not cut a nap short.
        c.set(50);
        c.before_run(t0);
        assert_eq!(c.before_run(t0 + SLICE), Next::Nap(SLICE));
        c.set(50);
        assert_eq!(c.before_run(t0 + SLICE + MS), Next::Nap(9 * MS));
        // Out of range is clamped.
        c.set(250);
        assert_eq!(c.percent(), MAX_PERCENT);
    }
}
