//! The post-copy fault latency histogram.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// A latency histogram with buckets 1/16 of a power of two wide: values
/// 0..16 µs have one bucket each; a larger value `v` with highest bit `e`
/// lands in bucket `16 + (e - 4) * 16 + (v >> (e - 4)) & 15`.
///
/// Invariant: `buckets[i]` counts the samples recorded into bucket `i`.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const LAT_BUCKETS: usize = 16 + 60 * 16;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize;
        16 + (e - 4) * 16 + ((v >> (e - 4)) & 15) as usize
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let e = (i - 16) / 16 + 4;
        let sub = ((i - 16) % 16) as u64;
        (((16 + sub + 1) as u128) << (e - 4))
            .saturating_sub(1)
            .min(u64::MAX as u128) as u64
    }

    /// Records one sample of `us` microseconds.
    pub fn record(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q`-quantile (0 < q ≤ 1) as its bucket's upper bound; `None`
    /// without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i));
            }
        }
        None
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in [0u64, 15, 16, 17, 31, 32, 1000, 1 << 40, u64::MAX] {
            let b = LatencyHistogram::bucket(v);
            assert!(b < LAT_BUCKETS, "{v}");
            let up = LatencyHistogram::upper(b);
            assert!(up >= v, "{v}: bucket {b} ends at {up}");
            assert!(up as f64 <= v as f64 * 1.07 + 1.0, "{v}: {up}");
            if b > 0 {
                assert!(LatencyHistogram::upper(b - 1) < v, "{v}");
            }
        }
        for v in 1..=100 {
            h.record(v * 10);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((500..=535).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((990..=1060).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }
}
