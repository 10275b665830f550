//! The time series of one migration (issue #11 §8): what the bench read
//! from the source's `GET vm.migration` while it polled, one [`Sample`] per
//! read, kept in the suite's raw JSON and drawn by [`crate::series_svg`].
//!
//! Reading is lenient: a field missing from a status (or of the wrong type)
//! is `None` in the sample and `null` in the JSON, never a failure, so that
//! the series works with older and newer status layouts alike (the
//! `throughput_bytes_per_s` / `dirty_rate_bytes_per_s` names, falling back
//! to the deprecated `throughput_bps` / `dirty_rate_bps`).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The JSON column names of a series, in [`Sample::row`] order.
pub const COLUMNS: [&str; 8] = [
    "elapsed_ms",
    "pass",
    "remaining_bytes",
    "transferred_bytes",
    "throughput_bytes_per_s",
    "dirty_rate_bytes_per_s",
    "cpu_throttle_percent",
    "state",
];

/// One status read of the source. Invariant: `elapsed_ms` is measured from
/// the send request on the bench's clock; every other field is what the
/// status said, `None` where it said nothing usable.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub elapsed_ms: f64,
    /// `iteration`: the pre-copy pass under way (0 before the first).
    pub pass: Option<u64>,
    pub remaining_bytes: Option<u64>,
    pub transferred_bytes: Option<u64>,
    pub throughput_bytes_per_s: Option<f64>,
    pub dirty_rate_bytes_per_s: Option<f64>,
    pub cpu_throttle_percent: Option<u64>,
    pub state: Option<String>,
}

/// A number at the top level of `v`, else under `stats` (older layouts).
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
        .filter(|x| !x.is_null())
        .or_else(|| v.get("stats").and_then(|s| s.get(key)))
        .filter(|x| !x.is_null())
}

fn uint(v: &Value, key: &str) -> Option<u64> {
    field(v, key).and_then(|x| {
        x.as_u64()
            .or_else(|| x.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
    })
}

fn float(v: &Value, keys: &[&str]) -> Option<f64> {
    keys.iter()
        .find_map(|k| field(v, k).and_then(Value::as_f64))
        .filter(|f| f.is_finite())
}

impl Sample {
    /// Reads one `GET vm.migration` reply taken `elapsed_ms` after the send.
    pub fn parse(elapsed_ms: f64, v: &Value) -> Sample {
        Sample {
            elapsed_ms,
            pass: uint(v, "iteration"),
            remaining_bytes: uint(v, "remaining_bytes"),
            transferred_bytes: uint(v, "transferred_bytes"),
            throughput_bytes_per_s: float(v, &["throughput_bytes_per_s", "throughput_bps"]),
            dirty_rate_bytes_per_s: float(v, &["dirty_rate_bytes_per_s", "dirty_rate_bps"]),
            cpu_throttle_percent: uint(v, "cpu_throttle_percent"),
            state: field(v, "state")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// The sample as a JSON row, in [`COLUMNS`] order.
    pub fn row(&self) -> Value {
        json!([
            (self.elapsed_ms * 10.0).round() / 10.0,
            self.pass,
            self.remaining_bytes,
            self.transferred_bytes,
            self.throughput_bytes_per_s.map(f64::round),
            self.dirty_rate_bytes_per_s.map(f64::round),
            self.cpu_throttle_percent,
            self.state,
        ])
    }

    /// Reads a row written by [`Sample::row`] (nulls and short rows are
    /// `None`s); `None` if it is not an array or has no time.
    #[cfg(test)]
    pub fn from_row(r: &Value) -> Option<Sample> {
        let a = r.as_array()?;
        let at = |i: usize| a.get(i).filter(|x| !x.is_null());
        let u = |i: usize| at(i).and_then(Value::as_u64);
        Some(Sample {
            elapsed_ms: at(0)?.as_f64()?,
            pass: u(1),
            remaining_bytes: u(2),
            transferred_bytes: u(3),
            throughput_bytes_per_s: at(4).and_then(Value::as_f64),
            dirty_rate_bytes_per_s: at(5).and_then(Value::as_f64),
            cpu_throttle_percent: u(6),
            state: at(7).and_then(Value::as_str).map(str::to_string),
        })
    }
}

/// The samples of one migration, in time order. Invariant: `elapsed_ms`
/// never decreases from one sample to the next (the bench's clock).
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub samples: Vec<Sample>,
    t0: Option<Instant>,
    /// Reads closer than this to the last kept one are dropped (except
    /// state changes); zero keeps every read.
    min_gap_ms: f64,
}

impl Series {
    /// An empty series keeping at most one read every `min_gap` (and every
    /// change of state).
    pub fn new(min_gap: Duration) -> Series {
        Series {
            samples: Vec::new(),
            t0: None,
            min_gap_ms: min_gap.as_secs_f64() * 1000.0,
        }
    }

    /// Starts the clock: call right before the send request.
    pub fn start(&mut self, t0: Instant) {
        self.t0 = Some(t0);
    }

    /// Records a status read now (the clock starts here if not started).
    pub fn record(&mut self, v: &Value) {
        let t0 = *self.t0.get_or_insert_with(Instant::now);
        self.push(Sample::parse(t0.elapsed().as_secs_f64() * 1000.0, v));
    }

    /// Adds a sample, subject to the gap rule.
    pub fn push(&mut self, s: Sample) {
        if let Some(last) = self.samples.last() {
            if s.elapsed_ms < last.elapsed_ms {
                return;
            }
            if s.elapsed_ms - last.elapsed_ms < self.min_gap_ms && s.state == last.state {
                return;
            }
        }
        self.samples.push(s);
    }

    /// `{"columns": [...], "rows": [[...], ...]}`.
    pub fn to_json(&self) -> Value {
        json!({
            "columns": COLUMNS,
            "rows": self.samples.iter().map(Sample::row).collect::<Vec<_>>(),
        })
    }

    /// Reads what [`Series::to_json`] wrote (bad rows are skipped).
    #[cfg(test)]
    pub fn from_json(v: &Value) -> Series {
        let mut s = Series::new(Duration::ZERO);
        for r in v["rows"].as_array().into_iter().flatten() {
            if let Some(x) = Sample::from_row(r) {
                s.push(x);
            }
        }
        s
    }

    /// The times (ms) at which a new pass began: where `pass` rose above the
    /// previous sample's, with that pass.
    pub fn pass_starts(&self) -> Vec<(f64, u64)> {
        let mut out = Vec::new();
        let mut prev: Option<u64> = None;
        for s in &self.samples {
            if let Some(p) = s.pass {
                if prev.is_some_and(|q| p > q) || (prev.is_none() && p > 0) {
                    out.push((s.elapsed_ms, p));
                }
                prev = Some(p);
            }
        }
        out
    }

    /// The times (ms) at which `state` changed, with the new state (the
    /// first sample's state included).
    pub fn state_changes(&self) -> Vec<(f64, String)> {
        let mut out: Vec<(f64, String)> = Vec::new();
        for s in &self.samples {
            if let Some(st) = &s.state {
                if out.last().map(|(_, l)| l != st).unwrap_or(true) {
                    out.push((s.elapsed_ms, st.clone()));
                }
            }
        }
        out
    }

    /// The highest throttle seen (0 without any).
    pub fn max_throttle(&self) -> u64 {
        self.samples
            .iter()
            .filter_map(|s| s.cpu_throttle_percent)
            .max()
            .unwrap_or(0)
    }

    /// The last sample's time in ms (0 when empty).
    pub fn end_ms(&self) -> f64 {
        self.samples.last().map(|s| s.elapsed_ms).unwrap_or(0.0)
    }
}

/// The item whose `key` is nearest the median of the keys (the
/// representative run of a group), else the first item; `None` if empty.
pub fn median_pick<'a, T>(items: &[&'a T], key: impl Fn(&T) -> Option<f64>) -> Option<&'a T> {
    let keys: Vec<f64> = items.iter().filter_map(|x| key(x)).collect();
    let Some(m) = crate::report::median(&keys) else {
        return items.first().copied();
    };
    items
        .iter()
        .filter_map(|x| key(x).map(|k| (x, (k - m).abs())))
        .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal))
        .map(|(x, _)| *x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_new_and_old_names_leniently() {
        let new = json!({
            "state": "active", "iteration": 2, "remaining_bytes": 1000,
            "transferred_bytes": 5000, "throughput_bytes_per_s": 104857600,
            "dirty_rate_bytes_per_s": 2.5e8, "cpu_throttle_percent": 20,
            "throughput_bps": 1, "dirty_rate_bps": 1,
        });
        let s = Sample::parse(12.5, &new);
        assert_eq!(s.pass, Some(2));
        assert_eq!(s.remaining_bytes, Some(1000));
        assert_eq!(s.throughput_bytes_per_s, Some(104857600.0));
        assert_eq!(s.dirty_rate_bytes_per_s, Some(2.5e8));
        assert_eq!(s.cpu_throttle_percent, Some(20));
        assert_eq!(s.state.as_deref(), Some("active"));

        let old = json!({"state": "active", "throughput_bps": 7, "dirty_rate_bps": 9,
                         "stats": {"remaining_bytes": 3}});
        let s = Sample::parse(0.0, &old);
        assert_eq!(s.throughput_bytes_per_s, Some(7.0));
        assert_eq!(s.dirty_rate_bytes_per_s, Some(9.0));
        assert_eq!(s.remaining_bytes, Some(3));
        assert_eq!(s.pass, None);

        // Missing, null or mistyped fields are None, never a panic.
        let odd = json!({"iteration": "x", "remaining_bytes": null, "state": 3,
                         "throughput_bytes_per_s": null, "throughput_bps": 5});
        let s = Sample::parse(1.0, &odd);
        assert_eq!(s.pass, None);
        assert_eq!(s.remaining_bytes, None);
        assert_eq!(s.state, None);
        assert_eq!(s.throughput_bytes_per_s, Some(5.0));
        for v in [Value::Null, json!([1, 2]), json!("text")] {
            assert_eq!(Sample::parse(0.0, &v).pass, None);
        }
    }

    #[test]
    fn json_round_trip_and_boundaries() {
        let mut s = Series::new(Duration::ZERO);
        for (t, pass, st) in [
            (0.0, 0, "setup"),
            (100.0, 1, "active"),
            (200.0, 1, "active"),
            (300.0, 2, "active"),
            (400.0, 3, "active"),
            (500.0, 3, "completed"),
        ] {
            s.push(Sample::parse(
                t,
                &json!({"iteration": pass, "state": st, "remaining_bytes": 10 - pass}),
            ));
        }
        assert_eq!(s.pass_starts(), vec![(100.0, 1), (300.0, 2), (400.0, 3)]);
        let states: Vec<String> = s.state_changes().into_iter().map(|x| x.1).collect();
        assert_eq!(states, ["setup", "active", "completed"]);
        let back = Series::from_json(&s.to_json());
        assert_eq!(back.samples, s.samples);
        assert_eq!(s.to_json()["columns"][4], "throughput_bytes_per_s");
        // Rows that are not arrays, or have no time, are skipped.
        let junk = json!({"rows": [1, [], [null, 1], [5.0]]});
        assert_eq!(Series::from_json(&junk).samples.len(), 1);
    }

    #[test]
    fn median_pick_takes_the_middle() {
        let v = [5.0, 1.0, 3.0, f64::NAN];
        let r: Vec<&f64> = v.iter().collect();
        assert_eq!(median_pick(&r, |x| x.is_finite().then_some(*x)), Some(&3.0));
        assert_eq!(median_pick(&r, |_| None), Some(&5.0));
        let none: Vec<&f64> = Vec::new();
        assert_eq!(median_pick(&none, |x| Some(*x)), None);
    }

    #[test]
    fn gap_rule_keeps_state_changes() {
        let mut s = Series::new(Duration::from_millis(100));
        for (t, st) in [
            (0.0, "active"),
            (10.0, "active"),
            (20.0, "completed"),
            (150.0, "completed"),
        ] {
            s.push(Sample::parse(t, &json!({ "state": st })));
        }
        let t: Vec<f64> = s.samples.iter().map(|x| x.elapsed_ms).collect();
        assert_eq!(t, [0.0, 20.0, 150.0]);
        // Time never runs backwards.
        s.push(Sample::parse(50.0, &json!({})));
        assert_eq!(s.samples.len(), 3);
    }
}
