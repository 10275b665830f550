//! Live rates: a sliding window over the RAM counters, ticked by whoever
//! runs (the sender's pass loop, the destination's main loop, every status
//! read), so that the rates in a status are never older than its read.

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::MigrationStats;

/// Width of the window the live rates are measured over.
pub(crate) const RATE_WINDOW: Duration = Duration::from_millis(500);
/// Samples are kept at least this far apart.
const SAMPLE_SPACING: Duration = Duration::from_millis(50);
/// A rate is computed only over at least this span (shorter: the previous
/// rate stays).
const MIN_SPAN: Duration = Duration::from_millis(100);

/// One sample of the RAM counters.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    bytes: u64,
    pages: u64,
}

/// The samples of the last [`RATE_WINDOW`] (plus the one just before it,
/// the base of the rate).
///
/// Invariant: samples are in time order, at least [`SAMPLE_SPACING`] apart,
/// and at most one is older than [`RATE_WINDOW`]; the counters they record
/// only grow during a migration (differences saturate anyway).
#[derive(Debug, Default)]
pub(crate) struct RateWindow {
    samples: VecDeque<Sample>,
}

impl RateWindow {
    /// Forgets every sample.
    pub(crate) fn clear(&mut self) {
        self.samples.clear();
    }

    /// Adds the counters `(bytes, pages)` seen at `now` and returns the
    /// rates (bytes/s, pages/s) over the window ending now, or `None` while
    /// the window spans less than [`MIN_SPAN`].
    pub(crate) fn tick(&mut self, now: Instant, bytes: u64, pages: u64) -> Option<(f64, f64)> {
        let cur = Sample {
            at: now,
            bytes,
            pages,
        };
        if self
            .samples
            .back()
            .is_none_or(|b| now.saturating_duration_since(b.at) >= SAMPLE_SPACING)
        {
            self.samples.push_back(cur);
        }
        while self.samples.len() > 2
            && now.saturating_duration_since(self.samples[1].at) >= RATE_WINDOW
        {
            self.samples.pop_front();
        }
        let base = *self.samples.front()?;
        let span = now.saturating_duration_since(base.at);
        if span < MIN_SPAN {
            return None;
        }
        let s = span.as_secs_f64();
        Some((
            bytes.saturating_sub(base.bytes) as f64 / s,
            pages.saturating_sub(base.pages) as f64 / s,
        ))
    }
}

/// The destination's handle on the live rates, ticked from its loops; it
/// also logs the info line of each pass received.
///
/// Invariant: `logged` is the last pass logged; `at`/`bytes` are the time
/// and `transferred_bytes` when it was logged (or when the meter started).
#[derive(Debug)]
pub(crate) struct RxMeter {
    logged: u64,
    at: Instant,
    bytes: u64,
}

impl RxMeter {
    pub(crate) fn new() -> Self {
        RxMeter {
            logged: 0,
            at: Instant::now(),
            bytes: 0,
        }
    }

    /// A meter that logs no pass completed before now (post-copy).
    pub(crate) fn after_passes(stats: &MigrationStats) -> Self {
        RxMeter {
            logged: stats.iteration.load(Relaxed),
            ..RxMeter::new()
        }
    }

    /// Brings the live rates up to date and logs the passes completed
    /// since the last tick.
    pub(crate) fn tick(&mut self, stats: &MigrationStats) {
        stats.tick_rates();
        let pass = stats.iteration.load(Relaxed);
        if pass <= self.logged {
            return;
        }
        let bytes = stats.transferred_bytes.load(Relaxed);
        let moved = bytes.saturating_sub(self.bytes);
        let secs = self.at.elapsed().as_secs_f64();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        log::info!(
            "pass {pass} received: {:.1} MiB in {secs:.2} s ({:.1} MiB/s), {:.1} MiB in all",
            mib(moved),
            mib((moved as f64 / secs.max(1e-3)) as u64),
            mib(bytes)
        );
        self.logged = pass;
        self.at = Instant::now();
        self.bytes = bytes;
    }
}

impl MigrationStats {
    /// Brings `throughput_bytes_per_s` and `pages_per_s` up to date (while
    /// active; an ended migration keeps its averages).
    pub(crate) fn tick_rates(&self) {
        if self.state() != super::MigrationState::Active {
            return;
        }
        let bytes = self.transferred_bytes.load(Relaxed);
        let pages = self.zero_pages.load(Relaxed) + self.normal_pages.load(Relaxed);
        let r = crate::net::lock(&self.rates).tick(Instant::now(), bytes, pages);
        if let Some((b, p)) = r {
            self.throughput.store(b as u64, Relaxed);
            self.pages_per_s.store(p as u64, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_rates() {
        let mut w = RateWindow::default();
        let t0 = Instant::now();
        assert_eq!(w.tick(t0, 0, 0), None);
        let ms = |m| t0 + Duration::from_millis(m);
        assert_eq!(w.tick(ms(60), 60, 6), None);
        let (b, p) = w.tick(ms(200), 200, 20).unwrap();
        assert!(
            (b - 1000.0).abs() < 1.0 && (p - 100.0).abs() < 0.1,
            "{b} {p}"
        );
        // A steady 1000 bytes/s, then 4000: the old samples leave the window.
        for m in (250..=1000).step_by(50) {
            w.tick(ms(m), m, 0);
        }
        for m in (1050..=2000).step_by(50) {
            let (b, _) = w.tick(ms(m), 1000 + (m - 1000) * 4, 0).unwrap();
            if m >= 1600 {
                assert!((b - 4000.0).abs() < 1.0, "{m}: {b}");
            }
        }
        assert!(w.samples.len() <= 12);
    }
}
