//! The per-pass barrier of the receiver's readers.

use std::sync::{Condvar, Mutex};

use crate::error::MigrationError;
use crate::net::{lock, Ctl, POLL_INTERVAL};

#[derive(Debug)]
struct BarrierState {
    completed: u64,
    arrived: usize,
    exited: Vec<Option<u64>>,
}

/// The per-pass barrier: pass `k + 1` data of one connection is applied
/// only after every connection delivered SYNC(k).
///
/// Invariant: `completed` is the last pass every reader finished; no reader
/// applies a frame of pass `p` unless `completed == p - 1`.
#[derive(Debug)]
pub struct PassBarrier {
    st: Mutex<BarrierState>,
    cv: Condvar,
    n: usize,
}

impl PassBarrier {
    /// A barrier for `n` readers.
    pub fn new(n: usize) -> Self {
        PassBarrier {
            st: Mutex::new(BarrierState {
                completed: 0,
                arrived: 0,
                exited: vec![None; n],
            }),
            cv: Condvar::new(),
            n,
        }
    }

    /// Last pass completed on all connections.
    pub fn completed(&self) -> u64 {
        lock(&self.st).completed
    }

    /// Reader `idx` reached SYNC(`pass`): waits for all others. The last one
    /// to arrive runs `on_last` (consistency checks) before releasing all.
    pub fn wait(
        &self,
        idx: usize,
        pass: u64,
        ctl: &Ctl,
        on_last: &dyn Fn() -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        let mut st = lock(&self.st);
        if pass != st.completed + 1 {
            return Err(MigrationError::proto(format!(
                "SYNC({pass}) while pass {} is open",
                st.completed + 1
            )));
        }
        st.arrived += 1;
        if st.arrived == self.n {
            on_last()?;
            st.completed = pass;
            st.arrived = 0;
            drop(st);
            self.cv.notify_all();
            return Ok(());
        }
        loop {
            if st.completed >= pass {
                return Ok(());
            }
            ctl.check()?;
            if let Some(i) = st.exited.iter().position(|e| e.is_some_and(|c| c < pass)) {
                return Err(MigrationError::PeerClosed(format!(
                    "data connection {i} ended before pass {pass} (reader {idx} waiting)"
                )));
            }
            st = self
                .cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Reader `idx` ended after completing `passes`.
    pub fn exit(&self, idx: usize, passes: u64) {
        lock(&self.st).exited[idx] = Some(passes);
        self.cv.notify_all();
    }
}
