//! Socket plumbing shared by both sides, split by concern:
//!
//! * `ctl`: the abort/cancel control block of one migration ([`Ctl`]),
//!   deadlines, the commit point, and [`Notify`];
//! * `io`: socket options and the read/write loops (whole buffers, typed
//!   frames, zero-copy `writev`/`readv` over [`crate::guest_mem::IoVecs`])
//!   that never block longer than [`POLL_INTERVAL`] without checking for
//!   abort, cancel and stalls;
//! * `sock`: the socket under a connection, TCP or UNIX ([`Sock`], [`Listener`]);
//! * `channel`: one connection, plain or mutual TLS ([`Channel`]);
//! * `conn`: the main connection ([`MainConn`]) and its keepalive thread;
//! * `zerocopy`, `zctrack`: `MSG_ZEROCOPY` sends and their completions
//!   ([`ZeroCopy`], [`ZcCounters`]).

mod channel;
mod conn;
mod ctl;
mod io;
mod record;
mod sock;
mod zctrack;
mod zerocopy;

pub use channel::{Channel, TlsError, TlsFailure};
pub use conn::{Keepalive, MainConn};
pub use ctl::{Ctl, Notify};
pub use io::{
    drain, is_timeout, poll_fd, prepare_stream, read_full, read_vecs, recv_frame, recv_payload,
    send_frame, send_message, set_big_buffers, wait_readable, write_vecs, Recv,
};
pub use sock::{Listener, Sock};
pub use zerocopy::{check_memlock, memlock_limit, memlock_need, ZcCounters, ZeroCopy, ZC_WINDOW};

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Longest time any blocking socket call runs before re-checking abort.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// No progress for this long on a connection that should move fails it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of KEEPALIVE frames on the main connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Socket buffer size requested for data connections (when the host allows).
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Locks a mutex, ignoring poisoning (a panicked worker must not take the
/// cleanup path down with it; the data protected stays consistent because
/// every critical section here is a plain update).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wall-clock microseconds since the Unix epoch (for cross-process downtime).
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}
