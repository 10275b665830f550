//! The event log behind `GET /api/v1/vm.events`: one JSON object per event,
//! numbered, time-stamped, kept in a bounded ring that readers follow.
//!
//! Writers never block on readers: a reader that falls more than
//! [`EVENT_CAPACITY`] events behind is told how many it missed.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::net::lock;

/// Events kept for readers.
pub const EVENT_CAPACITY: usize = 4096;

/// What a reader got from [`EventLog::read_after`].
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EventBatch {
    /// The events, oldest first, each a JSON object on one line.
    pub lines: Vec<String>,
    /// The sequence number to ask for next.
    pub next: u64,
    /// Events the reader missed because it fell behind the ring.
    pub missed: u64,
}

/// A bounded, numbered log of events.
///
/// Invariant: `ring` holds events `first..next` in order, at most
/// [`EVENT_CAPACITY`] of them; sequence numbers start at 1.
#[derive(Debug, Default)]
pub struct EventLog {
    st: Mutex<Ring>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Ring {
    ring: VecDeque<String>,
    /// Sequence number of `ring[0]`.
    first: u64,
    /// Sequence number of the next event.
    next: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// An empty log.
    pub fn new() -> EventLog {
        EventLog::default()
    }

    /// Records event `event` with `fields` (an object; other values are
    /// put under `"value"`), adding `seq`, `event` and `timestamp_us` (µs
    /// since the Unix epoch). Returns its sequence number.
    pub fn emit(&self, event: &str, fields: Value) -> u64 {
        let mut obj = match fields {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            v => {
                let mut m = Map::new();
                m.insert("value".into(), v);
                m
            }
        };
        let mut st = lock(&self.st);
        if st.next == 0 {
            st.next = 1;
            st.first = 1;
        }
        let seq = st.next;
        obj.insert("seq".into(), json!(seq));
        obj.insert("event".into(), json!(event));
        obj.insert("timestamp_us".into(), json!(now_us()));
        let line = Value::Object(obj).to_string();
        log::debug!("event {line}");
        st.ring.push_back(line);
        st.next += 1;
        while st.ring.len() > EVENT_CAPACITY {
            st.ring.pop_front();
            st.first += 1;
        }
        drop(st);
        self.cv.notify_all();
        seq
    }

    /// Sequence number the next event will get (1 for an empty log): a
    /// reader that starts here sees only events from now on.
    pub fn next_seq(&self) -> u64 {
        lock(&self.st).next.max(1)
    }

    /// Events with sequence numbers `>= from`, waiting up to `wait` for the
    /// first one.
    pub fn read_after(&self, from: u64, wait: Duration) -> EventBatch {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.st);
        loop {
            let next = st.next.max(1);
            if next > from.max(1) {
                let first = st.first.max(1);
                let start = from.max(first);
                let missed = start - from.max(1).min(start);
                let skip = (start - first) as usize;
                let lines = st.ring.iter().skip(skip).cloned().collect();
                return EventBatch {
                    lines,
                    next,
                    missed,
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return EventBatch {
                    lines: Vec::new(),
                    next,
                    missed: 0,
                };
            }
            st = match self.cv.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_bounded_and_followed() {
        let log = EventLog::new();
        assert_eq!(log.next_seq(), 1);
        let b = log.read_after(1, Duration::from_millis(1));
        assert!(b.lines.is_empty());
        assert_eq!(log.emit("a", json!({"x": 1})), 1);
        assert_eq!(log.emit("b", Value::Null), 2);
        let b = log.read_after(1, Duration::ZERO);
        assert_eq!(b.lines.len(), 2);
        assert_eq!(b.next, 3);
        let v: Value = serde_json::from_str(&b.lines[0]).unwrap();
        assert_eq!(v["event"], "a");
        assert_eq!(v["x"], 1);
        assert_eq!(v["seq"], 1);
        assert!(v["timestamp_us"].as_u64().unwrap() > 0);
        for _ in 0..EVENT_CAPACITY + 10 {
            log.emit("c", Value::Null);
        }
        let b = log.read_after(3, Duration::ZERO);
        assert_eq!(b.lines.len(), EVENT_CAPACITY);
        assert_eq!(b.missed, 10);
    }

    #[test]
    fn a_waiting_reader_wakes() {
        let log = std::sync::Arc::new(EventLog::new());
        let l2 = log.clone();
        let t = std::thread::spawn(move || l2.read_after(1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        log.emit("x", Value::Null);
        let b = t.join().unwrap();
        assert_eq!(b.lines.len(), 1);
    }
}
