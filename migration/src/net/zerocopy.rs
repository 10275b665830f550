//! Zero-copy send: `sendmsg(MSG_ZEROCOPY)` on a data connection
//! (`SO_ZEROCOPY`), its completions read from the socket's error queue,
//! and the locked-memory bound they need.
//!
//! With `MSG_ZEROCOPY` the kernel does not copy the bytes into its own
//! buffers: it pins the pages they lie in and lets the NIC read them; the
//! bytes must not change, and the memory must not be reused, until the
//! kernel reports the send complete (the data was acknowledged, or was
//! copied after all: loopback and veth deliver to a local socket, where
//! the kernel copies and says so with `SO_EE_CODE_ZEROCOPY_COPIED`).
//!
//! * Plain TCP: the guest pages of a RAM packet are sent from guest memory
//!   ([`ZeroCopy::send`]); the header and range table go before them with
//!   an ordinary (copying) write, since their buffers are reused at once.
//!   Guest pages may change while in flight: pre-copy sends pages whose
//!   dirty logging is armed, so a page written meanwhile is marked dirty
//!   and sent again in a later pass (the final pass runs with the vCPUs
//!   stopped), exactly as with a copying `writev` that races the guest.
//!   Guest memory stays mapped until the writers joined, and every
//!   completion arrives before the commit point (see `send::writer`).
//! * TLS: the ciphertext buffers of the record layer are sent zero-copy,
//!   and each is kept until its completion (`channel`).
//!
//! Only the writer of a connection waits for its completions (when its
//! window of [`ZC_WINDOW`] charged bytes is full, at pass ends and at the
//! end); vCPUs never wait for anything here.

use std::io::{self, ErrorKind};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::zctrack::{Completed, Tracker};
use super::{is_timeout, lock, poll_fd, Ctl, POLL_INTERVAL};
use crate::error::MigrationError;
use crate::guest_mem::{Gather, IoVecs};

/// `SO_ZEROCOPY` (asm-generic/socket.h).
const SO_ZEROCOPY: i32 = 60;
/// `SO_EE_ORIGIN_ZEROCOPY` (linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED`: the kernel copied the data after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;
/// The kernel's page size for its accounting.
const PAGE: u64 = 4096;
/// Largest iovec count of one call.
const IOV_MAX: usize = 1024;

/// Locked memory one connection may have charged for sends not completed
/// (the kernel charges each call by the size it asks, see [`charge_of`]).
/// 4 MiB covers the bandwidth-delay product of 10 Gbit/s at 3 ms RTT.
pub const ZC_WINDOW: u64 = 4 << 20;
/// No call asks for less than this while sends are in flight (waiting for
/// completions instead): tiny zero-copy calls cost more than they save.
const MIN_CALL: u64 = 64 << 10;

/// What the kernel charges to `RLIMIT_MEMLOCK` for one zero-copy call
/// asking `size` bytes: its pages plus two (`mm_account_pinned_pages`).
pub fn charge_of(size: u64) -> u64 {
    (size / PAGE + 2) * PAGE
}

/// Locked memory a migration with `conns` zero-copy connections needs.
pub fn memlock_need(conns: u32) -> u64 {
    ZC_WINDOW * conns as u64
}

/// The `RLIMIT_MEMLOCK` that applies to zero-copy sends of this process:
/// `None` when none does (unlimited, or `CAP_IPC_LOCK`, with which the
/// kernel charges nothing).
pub fn memlock_limit() -> Option<u64> {
    if has_ipc_lock() {
        return None;
    }
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, exclusively
    // borrowed `r`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return None;
    }
    (r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

/// Whether this process has `CAP_IPC_LOCK` in its effective set.
fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// The error for a locked-memory limit too small for zero-copy: names the
/// limit, the amount needed and how it was computed.
pub fn memlock_error(limit: u64, conns: u32, detail: &str) -> MigrationError {
    let need = memlock_need(conns);
    MigrationError::InvalidParams(format!(
        "zero_copy needs {need} bytes ({} MiB) of locked memory, {ZC_WINDOW} bytes in flight per \
         data connection x {conns} connections, but RLIMIT_MEMLOCK is {limit} bytes ({} KiB){detail}; \
         raise it (ulimit -l {}, LimitMEMLOCK= in systemd, prlimit --memlock), give ferry \
         CAP_IPC_LOCK, use fewer connections, or send without zero_copy",
        need >> 20,
        limit >> 10,
        need.div_ceil(1024)
    ))
}

/// Refuses zero-copy over `conns` connections when `limit` (see
/// [`memlock_limit`]) is below what they need.
pub fn check_memlock(limit: Option<u64>, conns: u32) -> Result<(), MigrationError> {
    match limit {
        Some(l) if l < memlock_need(conns) => Err(memlock_error(l, conns, "")),
        _ => Ok(()),
    }
}

/// Zero-copy counters of one migration (all connections), for the status.
///
/// Invariant: `zero_copy + copied` never exceeds `sent`; `in_flight` is
/// what was sent and has not completed.
#[derive(Debug, Default)]
pub struct ZcCounters {
    /// `"zero_copy": true` was asked.
    pub requested: AtomicBool,
    /// Connections on which `MSG_ZEROCOPY` is in use.
    pub connections: AtomicU64,
    /// Bytes handed to the kernel with `MSG_ZEROCOPY`.
    pub sent: AtomicU64,
    /// Completed bytes the NIC took from our pages.
    pub zero_copy: AtomicU64,
    /// Completed bytes the kernel copied after all.
    pub copied: AtomicU64,
    /// Bytes sent and not completed.
    pub in_flight: AtomicU64,
    /// Completion notifications read.
    pub notifications: AtomicU64,
    /// Why zero-copy is not (or only partly) used, or what it applies to.
    pub note: Mutex<Option<String>>,
}

impl ZcCounters {
    /// Clears everything (a new migration).
    pub fn reset(&self) {
        self.requested.store(false, Relaxed);
        for a in [
            &self.connections,
            &self.sent,
            &self.zero_copy,
            &self.copied,
            &self.in_flight,
            &self.notifications,
        ] {
            a.store(0, Relaxed);
        }
        *lock(&self.note) = None;
    }

    /// Records the note shown in the status (the first one stays).
    pub fn note(&self, why: String) {
        let mut n = lock(&self.note);
        if n.is_none() {
            log::info!("zero-copy: {why}");
            *n = Some(why);
        }
    }

    fn completed(&self, c: Completed) {
        self.zero_copy.fetch_add(c.zero_copy, Relaxed);
        self.copied.fetch_add(c.copied, Relaxed);
        self.in_flight.fetch_sub(c.zero_copy + c.copied, Relaxed);
    }
}

/// The zero-copy state of one connection: the socket, its sends in flight
/// and the counters they feed.
///
/// Invariant: `SO_ZEROCOPY` is set on `fd`; every successful
/// `MSG_ZEROCOPY` call on `fd` went through [`ZeroCopy::send_once`] (so
/// the tracker's numbering is the kernel's); `iov` is scratch, empty
/// between calls.
pub struct ZeroCopy {
    fd: RawFd,
    t: Tracker,
    counters: Arc<ZcCounters>,
    iov: Vec<libc::iovec>,
    conns: u32,
}

// SAFETY: the raw pointers in `iov` are only written and read inside one
// call of `send` and cleared before it returns; nothing else is shared.
unsafe impl Send for ZeroCopy {}

impl std::fmt::Debug for ZeroCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopy")
            .field("fd", &self.fd)
            .field("in_flight", &self.t.in_flight())
            .finish()
    }
}

fn errno_is(e: &io::Error, n: i32) -> bool {
    e.raw_os_error() == Some(n)
}

impl ZeroCopy {
    /// Sets `SO_ZEROCOPY` on `fd` (a connected TCP socket that outlives
    /// the returned value). `conns`: the migration's connections (for the
    /// memlock error text).
    pub fn enable(fd: RawFd, counters: Arc<ZcCounters>, conns: u32) -> io::Result<ZeroCopy> {
        let one: i32 = 1;
        // SAFETY: plain setsockopt with a valid pointer to an int of the
        // right size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                &one as *const i32 as *const libc::c_void,
                std::mem::size_of::<i32>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        counters.connections.fetch_add(1, Relaxed);
        Ok(ZeroCopy {
            fd,
            t: Tracker::new(),
            counters,
            iov: Vec::with_capacity(64),
            conns,
        })
    }

    /// Sends not completed.
    pub fn in_flight(&self) -> usize {
        self.t.in_flight()
    }

    /// Whether every send up to and including `id` completed.
    pub fn done_through(&self, id: u32) -> bool {
        self.t.done_through(id)
    }

    /// Bytes a call may ask now: the window's room, or `None` when the
    /// window is full and sends are in flight (wait for completions).
    fn room(&self) -> Option<u64> {
        let room = ZC_WINDOW.saturating_sub(self.t.charged());
        if room < MIN_CALL + 2 * PAGE && self.t.in_flight() > 0 {
            return None;
        }
        Some(room.max(MIN_CALL + 2 * PAGE) - 2 * PAGE)
    }

    /// One `sendmsg(MSG_ZEROCOPY)` of the `self.iov` entries (`asked`
    /// bytes); returns the bytes moved and the send's number.
    ///
    /// Safety contract (checked by the callers): the entries describe
    /// memory that stays readable and unchanged-or-resent until the send
    /// completes.
    fn send_once(&mut self, asked: usize) -> io::Result<(usize, u32)> {
        // Only call when the socket takes data: a call that times out with
        // nothing sent may leave its charge on the previous send until
        // that one completes (the kernel extends the previous
        // notification's accounting before it blocks).
        let r = poll_fd(self.fd, libc::POLLOUT, POLL_INTERVAL);
        if r.as_ref().is_ok_and(|r| r & libc::POLLOUT == 0) {
            self.iov.clear();
            // POLLERR: completions to read (the callers do), or a failed
            // socket (returned here, so that nobody spins on it).
            return Err(self.socket_error().unwrap_or(ErrorKind::WouldBlock.into()));
        }
        // SAFETY: msghdr is a plain C struct; all-zero is a valid empty one.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = self.iov.as_mut_ptr();
        msg.msg_iovlen = self.iov.len() as _;
        // SAFETY: `msg` names `self.iov`, entries that describe readable
        // memory valid beyond this call (the callers' contract); the
        // kernel only reads them.
        let r = unsafe { libc::sendmsg(self.fd, &msg, libc::MSG_ZEROCOPY | libc::MSG_NOSIGNAL) };
        self.iov.clear();
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        if r == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        let n = r as usize;
        let id = self.t.sent(n as u64, charge_of(asked as u64));
        self.counters.sent.fetch_add(n as u64, Relaxed);
        self.counters.in_flight.fetch_add(n as u64, Relaxed);
        Ok((n, id))
    }

    /// The error for `ENOBUFS` with nothing in flight: the locked memory
    /// is exhausted (or was never enough).
    fn enobufs(&self) -> io::Error {
        let limit = memlock_limit().unwrap_or(0);
        io::Error::other(
            memlock_error(
                limit,
                self.conns,
                " (the kernel refused a zero-copy send with ENOBUFS with nothing in flight; \
                 locked memory of all the processes of this user counts against the limit)",
            )
            .to_string(),
        )
    }

    /// Reads every completion waiting on the error queue; returns whether
    /// any arrived.
    pub fn reap(&mut self) -> io::Result<bool> {
        let mut any = false;
        loop {
            let mut ctrl = [0u64; 16];
            // SAFETY: msghdr is a plain C struct; all-zero is a valid one.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = std::mem::size_of_val(&ctrl) as _;
            // SAFETY: `msg` points to the valid, exclusively borrowed
            // control buffer `ctrl` of the size given; no data iovec.
            let r = unsafe {
                libc::recvmsg(self.fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                if e.kind() == ErrorKind::WouldBlock {
                    return Ok(any);
                }
                return Err(e);
            }
            // SAFETY: `msg` was filled by recvmsg; the CMSG macros stay
            // inside `msg_control[..msg_controllen]`.
            let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !c.is_null() {
                // SAFETY: `c` is non-null and points to a cmsghdr inside
                // the control buffer (CMSG_FIRSTHDR/CMSG_NXTHDR contract).
                let h = unsafe { std::ptr::read_unaligned(c) };
                let want = std::mem::size_of::<libc::sock_extended_err>();
                // SAFETY: CMSG_LEN is pure arithmetic.
                let full = h.cmsg_len as usize >= unsafe { libc::CMSG_LEN(want as u32) } as usize;
                let recverr = (h.cmsg_level == libc::SOL_IP && h.cmsg_type == libc::IP_RECVERR)
                    || (h.cmsg_level == libc::SOL_IPV6 && h.cmsg_type == libc::IPV6_RECVERR);
                if recverr && full {
                    // SAFETY: the message holds a whole sock_extended_err
                    // (length checked above) at CMSG_DATA(c).
                    let ee: libc::sock_extended_err =
                        unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const _) };
                    if ee.ee_origin == SO_EE_ORIGIN_ZEROCOPY && ee.ee_errno == 0 {
                        let copied = ee.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0;
                        let done = self
                            .t
                            .complete(ee.ee_info, ee.ee_data, copied)
                            .map_err(|e| io::Error::other(e.to_string()))?;
                        self.counters.completed(done);
                        self.counters.notifications.fetch_add(1, Relaxed);
                        any = true;
                    } else {
                        log::debug!(
                            "error queue: origin {} errno {} (not a zero-copy completion)",
                            ee.ee_origin,
                            ee.ee_errno
                        );
                    }
                }
                // SAFETY: as for CMSG_FIRSTHDR; returns null past the end.
                c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
            }
        }
    }

    /// Waits up to `timeout` for completions (poll for `POLLERR`), then
    /// reads them; returns whether any arrived. A pending socket error
    /// (also reported as `POLLERR`) is returned as such.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<bool> {
        if self.reap()? {
            return Ok(true);
        }
        let revents = match poll_fd(self.fd, 0, timeout.min(Duration::from_secs(1))) {
            Ok(r) => r,
            Err(e) if e.kind() == ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e),
        };
        if self.reap()? {
            return Ok(true);
        }
        if revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            // Not a completion: the socket failed (or was shut down).
            if let Some(e) = self.socket_error() {
                return Err(e);
            }
            // A shut-down socket reports POLLHUP at once: do not spin.
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(false)
    }

    /// The socket's pending error (`SO_ERROR`, which this clears), if any.
    fn socket_error(&self) -> Option<io::Error> {
        let mut err: i32 = 0;
        let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
        // SAFETY: getsockopt writes one int into the valid `err`, whose
        // size `len` gives.
        unsafe {
            libc::getsockopt(
                self.fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut i32 as *mut libc::c_void,
                &mut len,
            )
        };
        (err != 0).then(|| io::Error::from_raw_os_error(err))
    }

    /// One bounded step of sending `buf` (which must stay unchanged and
    /// allocated until its send completes, see [`ZeroCopy::done_through`]):
    /// waits for completions while the window is full, then one call.
    /// Returns the bytes moved and the send's number; a timeout error when
    /// nothing moved within about one poll interval.
    pub fn send_buf(&mut self, buf: &[u8]) -> io::Result<(usize, u32)> {
        let started = Instant::now();
        loop {
            self.reap()?;
            let Some(room) = self.room() else {
                if started.elapsed() >= POLL_INTERVAL {
                    return Err(ErrorKind::WouldBlock.into());
                }
                self.wait(POLL_INTERVAL / 4)?;
                continue;
            };
            let n = buf.len().min(room as usize);
            self.iov.clear();
            self.iov.push(libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: n,
            });
            match self.send_once(n) {
                Err(e) if errno_is(&e, libc::ENOBUFS) => {
                    if self.t.in_flight() == 0 {
                        return Err(self.enobufs());
                    }
                    if started.elapsed() >= POLL_INTERVAL {
                        return Err(ErrorKind::WouldBlock.into());
                    }
                    self.wait(POLL_INTERVAL / 4)?;
                }
                r => return r,
            }
        }
    }

    /// Sends every byte of the gather list `v` with `MSG_ZEROCOPY` (guest
    /// pages: they stay mapped until the writers joined), in calls bounded
    /// by the window. Only this thread waits when the window is full; no
    /// progress for the stall timeout fails.
    pub fn send(
        &mut self,
        v: &mut IoVecs<'_, Gather>,
        ctl: &Ctl,
        what: &str,
    ) -> Result<(), MigrationError> {
        let io_err = |e| MigrationError::io(what, e);
        let mut last = Instant::now();
        while !v.is_empty() {
            ctl.check()?;
            if self.reap().map_err(io_err)? {
                last = Instant::now();
            }
            let Some(room) = self.room() else {
                if self.wait(POLL_INTERVAL).map_err(io_err)? {
                    last = Instant::now();
                } else if ctl.write_stalled(last) {
                    return Err(stalled(ctl, what));
                }
                continue;
            };
            let mut iov = std::mem::take(&mut self.iov);
            let asked = v.pending_capped(IOV_MAX, room as usize, &mut iov);
            self.iov = iov;
            match self.send_once(asked) {
                Ok((n, _)) => {
                    v.advance(n);
                    last = Instant::now();
                }
                Err(e) if is_timeout(&e) => {
                    if ctl.write_stalled(last) {
                        return Err(stalled(ctl, what));
                    }
                }
                Err(e) if errno_is(&e, libc::ENOBUFS) => {
                    if self.t.in_flight() == 0 {
                        return Err(io_err(self.enobufs()));
                    }
                    self.wait(POLL_INTERVAL).map_err(io_err)?;
                }
                Err(e) if e.kind() == ErrorKind::WriteZero => {
                    return Err(MigrationError::PeerClosed(what.to_string()))
                }
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    /// Waits until every send completed (the peer acknowledged the data);
    /// fails after the stall timeout without a completion.
    pub fn drain(&mut self, ctl: &Ctl, what: &str) -> Result<(), MigrationError> {
        let mut last = Instant::now();
        while self.t.in_flight() > 0 {
            ctl.check()?;
            if self
                .wait(POLL_INTERVAL)
                .map_err(|e| MigrationError::io(what, e))?
            {
                last = Instant::now();
            } else if last.elapsed() > ctl.stall {
                return Err(MigrationError::Stalled(format!(
                    "{} zero-copy sends not completed after {:?} {what}",
                    self.t.in_flight(),
                    ctl.stall
                )));
            }
        }
        Ok(())
    }
}

impl Drop for ZeroCopy {
    fn drop(&mut self) {
        let _ = self.reap();
        let left = self.t.in_flight_bytes();
        self.counters.in_flight.fetch_sub(left, Relaxed);
    }
}

fn stalled(ctl: &Ctl, what: &str) -> MigrationError {
    MigrationError::Stalled(format!("no progress for {:?} {what}", ctl.stall))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn memlock_error_names_the_limit_and_the_need() {
        assert!(check_memlock(None, 64).is_ok());
        assert!(check_memlock(Some(16 << 20), 4).is_ok());
        let e = check_memlock(Some(8 << 20), 4).unwrap_err().to_string();
        assert!(
            e.contains("RLIMIT_MEMLOCK is 8388608 bytes (8192 KiB)"),
            "{e}"
        );
        assert!(e.contains("needs 16777216 bytes (16 MiB)"), "{e}");
        assert!(
            e.contains("4194304 bytes in flight per data connection x 4 connections"),
            "{e}"
        );
        assert!(e.contains("ulimit -l 16384"), "{e}");
    }

    #[test]
    fn charges_follow_the_kernel() {
        assert_eq!(charge_of(0), 2 * PAGE);
        assert_eq!(charge_of(4096), 3 * PAGE);
        assert_eq!(charge_of(4097), 3 * PAGE);
    }

    /// A real socket pair on loopback: every byte completes, and the
    /// kernel reports that it copied them (loopback always copies).
    #[test]
    fn loopback_sends_complete_as_copied() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (mut b, _) = l.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0usize;
            loop {
                match b.read(&mut buf) {
                    Ok(0) => return total,
                    Ok(n) => total += n,
                    Err(e) => panic!("{e}"),
                }
            }
        });
        let counters = Arc::new(ZcCounters::default());
        let mut z = ZeroCopy::enable(a.as_raw_fd(), counters.clone(), 1).unwrap();
        let data = vec![7u8; 16 << 20];
        let ctl = Ctl::new(Default::default(), Duration::from_secs(30));
        let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(Vec::new());
        v.push_bytes(&data);
        z.send(&mut v, &ctl, "test").unwrap();
        z.drain(&ctl, "test").unwrap();
        let sent = counters.sent.load(Relaxed);
        assert_eq!(sent, data.len() as u64);
        assert_eq!(
            counters.zero_copy.load(Relaxed) + counters.copied.load(Relaxed),
            sent
        );
        assert_eq!(counters.in_flight.load(Relaxed), 0);
        assert!(counters.copied.load(Relaxed) > 0, "loopback copies");
        drop(z);
        drop(a);
        assert_eq!(reader.join().unwrap(), data.len());
    }
}
