//! Convergence policy: measures the transfer rate and the dirty rate and
//! decides when the remaining state fits in the downtime target.

use std::time::Duration;

/// Rate assumed before the first measurement (bytes/s), deliberately low.
const DEFAULT_RATE: f64 = 128.0 * 1024.0 * 1024.0;
/// Weight of a new sample in the moving averages.
const ALPHA: f64 = 0.5;
/// Intervals that moved fewer bytes than this are latency-bound, not rate
/// samples.
const MIN_SAMPLE_BYTES: u64 = 1 << 20;

/// Moving averages of the rates (bytes/s) and the downtime estimate (the
/// decisions are the policy's, `send/policy.rs`).
///
/// Invariant: rates are finite and positive once set.
#[derive(Debug, Clone)]
pub struct Convergence {
    rate: Option<f64>,
    dirty_rate: Option<f64>,
}

fn ewma(old: Option<f64>, sample: f64) -> Option<f64> {
    if !sample.is_finite() || sample <= 0.0 {
        return old;
    }
    Some(match old {
        Some(o) => o * (1.0 - ALPHA) + sample * ALPHA,
        None => sample,
    })
}

impl Convergence {
    /// No measurement yet.
    pub fn new() -> Self {
        Convergence {
            rate: None,
            dirty_rate: None,
        }
    }

    /// Records an interval in which the writers handled `page_bytes` of guest
    /// pages (zero or not) and put `_wire_bytes` on the wire (the live wire
    /// throughput is the statistics' own, `stats::meter`).
    pub fn record_transfer(&mut self, page_bytes: u64, _wire_bytes: u64, elapsed: Duration) {
        let s = elapsed.as_secs_f64();
        if s <= 0.0 {
            return;
        }
        if page_bytes >= MIN_SAMPLE_BYTES {
            self.rate = ewma(self.rate, page_bytes as f64 / s);
        }
    }

    /// Records `bytes` dirtied during `interval`.
    pub fn record_dirty(&mut self, bytes: u64, interval: Duration) {
        let s = interval.as_secs_f64();
        if s > 0.0 {
            self.dirty_rate = Some(ewma(self.dirty_rate, bytes as f64 / s).unwrap_or(0.0));
        }
    }

    /// Transfer rate used for decisions.
    pub fn rate(&self) -> f64 {
        self.rate.unwrap_or(DEFAULT_RATE)
    }

    /// Dirty rate (0 until measured).
    pub fn dirty_rate(&self) -> f64 {
        self.dirty_rate.unwrap_or(0.0)
    }

    /// Predicted downtime to move `bytes` over the network while the slowest
    /// device loads for `device_load`; both run in parallel.
    pub fn estimate(&self, bytes: u64, device_load: Duration) -> Duration {
        let net = Duration::from_secs_f64(bytes as f64 / self.rate());
        net.max(device_load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates() {
        let mut c = Convergence::new();
        c.record_transfer(1 << 30, 1 << 30, Duration::from_secs(1));
        assert_eq!(
            c.estimate(100 << 20, Duration::ZERO),
            Duration::from_secs_f64(100.0 / 1024.0)
        );
        assert_eq!(
            c.estimate(1, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        c.record_transfer(10, 10, Duration::from_secs(1)); // too small: ignored
        assert!((c.rate() - (1u64 << 30) as f64).abs() < 1.0);
    }
}
