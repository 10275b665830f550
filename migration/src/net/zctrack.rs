//! Completion bookkeeping of `MSG_ZEROCOPY` sends on one socket, without
//! any system call (unit-tested here).
//!
//! The kernel numbers the successful zero-copy `sendmsg` calls of a socket
//! 0, 1, 2, ... in a `u32` that wraps, and reports their completion on the
//! socket's error queue as inclusive ranges `[ee_info, ee_data]` of those
//! numbers. Adjacent notifications may be merged into one range, and
//! ranges are usually, but not always, in order. A call that moved no byte
//! (an error, a timeout) gets no number.

use std::collections::VecDeque;

use crate::error::MigrationError;

/// One zero-copy send the kernel has not reported complete yet.
#[derive(Debug, Clone, Copy)]
struct Pending {
    /// Bytes the call moved.
    bytes: u64,
    /// Locked memory the kernel charged for it (by the size asked).
    charge: u64,
    /// Its completion arrived (it stays here until every earlier one did).
    done: bool,
}

/// What completions changed: bytes sent without a copy, bytes the kernel
/// copied (`SO_EE_CODE_ZEROCOPY_COPIED`), sends completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Completed {
    /// Bytes the NIC took from our pages.
    pub zero_copy: u64,
    /// Bytes the kernel copied after all (loopback, veth, no SG).
    pub copied: u64,
    /// Sends completed.
    pub sends: u64,
}

/// The zero-copy sends of one socket that have not completed.
///
/// Invariant: `pending[i]` is the send numbered `base + i` (wrapping); the
/// front entry is never `done` (completed entries at the front are popped
/// at once), so every number before `base` has completed; `open` counts
/// the entries not `done` and `charged` sums their charge. The number of
/// entries is bounded by the caller's window, far below 2^31, so wrapping
/// differences are unambiguous.
#[derive(Debug, Default)]
pub struct Tracker {
    base: u32,
    pending: VecDeque<Pending>,
    open: usize,
    charged: u64,
}

impl Tracker {
    /// A tracker for a socket on which no zero-copy send happened yet
    /// (the kernel's counter starts at 0).
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// A tracker whose next send is numbered `next` (tests of wrapping).
    #[cfg(test)]
    fn starting_at(next: u32) -> Tracker {
        Tracker {
            base: next,
            ..Tracker::default()
        }
    }

    /// The number the next successful send gets.
    pub fn next_id(&self) -> u32 {
        self.base.wrapping_add(self.pending.len() as u32)
    }

    /// Records a send that moved `bytes` and was charged `charge`; returns
    /// its number.
    pub fn sent(&mut self, bytes: u64, charge: u64) -> u32 {
        let id = self.next_id();
        self.pending.push_back(Pending {
            bytes,
            charge,
            done: false,
        });
        self.open += 1;
        self.charged += charge;
        id
    }

    /// Sends not completed.
    pub fn in_flight(&self) -> usize {
        self.open
    }

    /// Locked memory charged for the sends not completed.
    pub fn charged(&self) -> u64 {
        self.charged
    }

    /// Bytes moved by sends not completed.
    pub fn in_flight_bytes(&self) -> u64 {
        self.pending
            .iter()
            .filter(|p| !p.done)
            .map(|p| p.bytes)
            .sum()
    }

    /// Whether every send numbered up to and including `id` has completed
    /// (`id` must be a number this tracker handed out).
    pub fn done_through(&self, id: u32) -> bool {
        // Before `base` (a negative wrapping distance): completed.
        (id.wrapping_sub(self.base) as i32) < 0
    }

    /// Applies the notification `[lo, hi]` (inclusive, wrapping); `copied`
    /// when the kernel flagged it `SO_EE_CODE_ZEROCOPY_COPIED` (the kernel
    /// merges adjacent notifications under the first one's flag, so the
    /// split is as exact as the kernel reports it). A range naming sends
    /// that were never made, or that completed long ago, is an error
    /// (nothing is changed); a send reported twice counts once.
    pub fn complete(
        &mut self,
        lo: u32,
        hi: u32,
        copied: bool,
    ) -> Result<Completed, MigrationError> {
        let first = lo.wrapping_sub(self.base) as usize;
        let count = hi.wrapping_sub(lo) as usize + 1;
        let len = self.pending.len();
        if first >= len || count > len - first {
            return Err(MigrationError::Internal(format!(
                "zero-copy completion {lo}..={hi} names sends not in flight (in flight: {}..{})",
                self.base,
                self.next_id()
            )));
        }
        let mut c = Completed::default();
        for p in self.pending.range_mut(first..first + count) {
            if p.done {
                continue;
            }
            p.done = true;
            self.open -= 1;
            self.charged -= p.charge;
            c.sends += 1;
            if copied {
                c.copied += p.bytes;
            } else {
                c.zero_copy += p.bytes;
            }
        }
        while self.pending.front().is_some_and(|p| p.done) {
            self.pending.pop_front();
            self.base = self.base.wrapping_add(1);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_merged_ranges() {
        let mut t = Tracker::new();
        for i in 0..5 {
            assert_eq!(t.sent(100 + i, 1000), i as u32);
        }
        assert_eq!(t.in_flight(), 5);
        assert_eq!(t.charged(), 5000);
        let c = t.complete(0, 0, false).unwrap();
        assert_eq!(
            c,
            Completed {
                zero_copy: 100,
                copied: 0,
                sends: 1
            }
        );
        // A merged range of three, copied by the kernel.
        let c = t.complete(1, 3, true).unwrap();
        assert_eq!(
            c,
            Completed {
                zero_copy: 0,
                copied: 101 + 102 + 103,
                sends: 3
            }
        );
        assert!(t.done_through(3));
        assert!(!t.done_through(4));
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.in_flight_bytes(), 104);
        assert_eq!(t.charged(), 1000);
        t.complete(4, 4, false).unwrap();
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.charged(), 0);
        assert_eq!(t.next_id(), 5);
    }

    #[test]
    fn out_of_order_completions_keep_the_floor() {
        let mut t = Tracker::new();
        for _ in 0..4 {
            t.sent(10, 1);
        }
        // 2..=3 before 0..=1: nothing before 0 is done yet.
        assert_eq!(t.complete(2, 3, false).unwrap().sends, 2);
        assert!(!t.done_through(0));
        assert!(!t.done_through(3), "3 done, but 0 and 1 are not");
        assert_eq!(t.in_flight(), 2);
        assert_eq!(t.complete(1, 1, false).unwrap().sends, 1);
        assert!(!t.done_through(1));
        assert_eq!(t.complete(0, 0, true).unwrap().copied, 10);
        assert!(t.done_through(3));
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.next_id(), 4);
    }

    #[test]
    fn wrapping_counters() {
        let mut t = Tracker::starting_at(u32::MAX - 1);
        let ids: Vec<u32> = (0..4).map(|_| t.sent(1, 1)).collect();
        assert_eq!(ids, vec![u32::MAX - 1, u32::MAX, 0, 1]);
        // One range across the wrap.
        let c = t.complete(u32::MAX, 0, false).unwrap();
        assert_eq!(c.sends, 2);
        assert!(!t.done_through(u32::MAX - 1));
        t.complete(u32::MAX - 1, u32::MAX - 1, false).unwrap();
        assert!(t.done_through(0));
        assert!(!t.done_through(1));
        t.complete(1, 1, false).unwrap();
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.next_id(), 2);
    }

    #[test]
    fn bogus_and_repeated_ranges() {
        let mut t = Tracker::new();
        t.sent(5, 1);
        t.sent(5, 1);
        // Never sent.
        assert!(t.complete(2, 2, false).is_err());
        // Reaching past the last send.
        assert!(t.complete(1, 2, false).is_err());
        // hi before lo: a wrapping range of 2^32 - 1 sends.
        assert!(t.complete(1, 0, false).is_err());
        assert_eq!(t.in_flight(), 2, "a refused range changes nothing");
        t.complete(1, 1, false).unwrap();
        // Reported twice: counted once.
        assert_eq!(t.complete(1, 1, false).unwrap().sends, 0);
        t.complete(0, 0, false).unwrap();
        // Completed long ago (before the floor).
        assert!(t.complete(0, 0, false).is_err());
        assert_eq!(t.in_flight(), 0);
    }
}
