//! Socket plumbing shared by both sides: the abort/cancel control block,
//! socket options, and read/write loops that never block longer than
//! [`POLL_INTERVAL`] without checking for abort, cancel and stalls.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::wire::{self, Header, Kind, HEADER_LEN};

/// Longest time any blocking socket call runs before re-checking abort.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// No progress for this long on a connection that should move fails it.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval of KEEPALIVE frames on the main connection.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Socket buffer size requested for data connections (when the host allows).
pub const SOCKET_BUFFER: usize = 8 << 20;
/// Largest iovec count of one `readv`/`writev` call.
const IOV_MAX: usize = 1024;

/// Locks a mutex, ignoring poisoning (a panicked worker must not take the
/// cleanup path down with it; the data protected stays consistent because
/// every critical section here is a plain update).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Control block of one side of one migration: the first error, the abort
/// flag every worker polls, the user's cancel token, and the sockets to shut
/// down to wake blocked workers.
///
/// Invariant: once `abort` is set it stays set; `first` holds the first
/// error reported through [`Ctl::fail`], which is the migration's cause.
/// Once `committed` is set (the switch-over commit point, see
/// [`Ctl::commit_point`]) it stays set, and from then on neither the cancel
/// token nor the deadline can fail the migration: only a real failure
/// (connection, peer, protocol) sets `abort`.
#[derive(Debug)]
pub struct Ctl {
    abort: AtomicBool,
    committed: AtomicBool,
    first: Mutex<Option<MigrationError>>,
    cancel: CancelToken,
    sockets: Mutex<Vec<TcpStream>>,
    deadline: Mutex<Option<(Instant, String)>>,
    peer_seen: Mutex<Option<Instant>>,
    /// Stall timeout in force.
    pub stall: Duration,
}

impl Ctl {
    /// A fresh control block.
    pub fn new(cancel: CancelToken, stall: Duration) -> Arc<Ctl> {
        Arc::new(Ctl {
            abort: AtomicBool::new(false),
            committed: AtomicBool::new(false),
            first: Mutex::new(None),
            cancel,
            sockets: Mutex::new(Vec::new()),
            deadline: Mutex::new(None),
            peer_seen: Mutex::new(None),
            stall,
        })
    }

    /// Makes every blocking loop fail with [`MigrationError::Timeout`]
    /// (`why`) after `at`.
    pub fn set_deadline(&self, at: Instant, why: String) {
        *lock(&self.deadline) = Some((at, why));
    }

    /// Records that the peer just proved to be alive (a frame arrived on the
    /// main connection).
    pub fn touch_peer(&self) {
        *lock(&self.peer_seen) = Some(Instant::now());
    }

    /// Whether a blocked write should count as stalled: no progress for the
    /// stall timeout and no sign of life from the peer for as long (a live
    /// destination may back-pressure for long while devices load slowly).
    fn write_stalled(&self, last_progress: Instant) -> bool {
        last_progress.elapsed() > self.stall && unset_or_older(*lock(&self.peer_seen), self.stall)
    }

    /// Registers a socket to be shut down on abort.
    pub fn register(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            lock(&self.sockets).push(c);
        }
    }

    /// Records `e` (if it is the first) and stops everything: sets the abort
    /// flag and shuts down the registered sockets.
    pub fn fail(&self, e: MigrationError) {
        self.fail_inner(e, false);
    }

    /// Records `e` and aborts like [`Ctl::fail`], unless `soft` and the commit
    /// point was passed (a cancel or deadline that lost the race against
    /// [`Ctl::commit_point`] is ignored). The commit flag is read under the
    /// same lock that `commit_point` takes, so the two are linearized.
    fn fail_inner(&self, e: MigrationError, soft: bool) {
        {
            let mut f = lock(&self.first);
            if soft && self.is_committed() {
                log::warn!("ignored after the switch-over was committed: {e}");
                return;
            }
            if f.is_none() && !matches!(e, MigrationError::Aborted) {
                log::warn!("migration failing: {e}");
                *f = Some(e);
            }
            self.abort.store(true, Ordering::SeqCst);
        }
        self.shutdown_all();
    }

    /// Shuts down every registered socket (wakes blocked readers/writers).
    pub fn shutdown_all(&self) {
        for s in lock(&self.sockets).iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Passes the switch-over commit point: from now on cancel and the
    /// deadline are ignored (it is too late to go back), only failures abort.
    ///
    /// Fails with [`MigrationError::Aborted`] (and commits nothing) if the
    /// migration was already aborted, cancelled or past its deadline: then
    /// the caller must not commit. A cancel either lands before this call
    /// (and fails it) or after it (and is ignored): both paths take the
    /// lock of the first error.
    pub fn commit_point(&self) -> Result<(), MigrationError> {
        self.check()?;
        {
            let _f = lock(&self.first);
            if !self.abort.load(Ordering::SeqCst) && !self.cancel.is_cancelled() {
                self.committed.store(true, Ordering::SeqCst);
                return Ok(());
            }
        }
        // Cancelled between the check and the lock: honour it.
        self.fail(MigrationError::Cancelled);
        Err(MigrationError::Aborted)
    }

    /// Whether [`Ctl::commit_point`] was passed.
    pub fn is_committed(&self) -> bool {
        self.committed.load(Ordering::SeqCst)
    }

    /// Whether workers must stop (abort, or cancel before the commit point).
    pub fn stopped(&self) -> bool {
        self.abort.load(Ordering::SeqCst) || (self.cancel.is_cancelled() && !self.is_committed())
    }

    /// Ok while running; turns a cancel or an expired deadline into the
    /// migration's error (both only before the commit point).
    pub fn check(&self) -> Result<(), MigrationError> {
        let committed = self.is_committed();
        if !committed && self.cancel.is_cancelled() && !self.abort.load(Ordering::SeqCst) {
            self.fail_inner(MigrationError::Cancelled, true);
        }
        let expired = match &*lock(&self.deadline) {
            Some((at, why)) if !committed && Instant::now() >= *at => Some(why.clone()),
            _ => None,
        };
        if let Some(why) = expired {
            if !self.abort.load(Ordering::SeqCst) {
                self.fail_inner(MigrationError::Timeout(why), true);
            }
        }
        if self.abort.load(Ordering::SeqCst) {
            return Err(MigrationError::Aborted);
        }
        Ok(())
    }

    /// Takes the first recorded error.
    pub fn take_error(&self) -> Option<MigrationError> {
        lock(&self.first).take()
    }
}

/// Whether `t` is unset or older than `age`.
fn unset_or_older(t: Option<Instant>, age: Duration) -> bool {
    t.map_or(true, |t| t.elapsed() > age)
}

/// Reads `/proc/sys/net/core/{r,w}mem_max`; `None` if unreadable.
fn core_max(which: &str) -> Option<usize> {
    std::fs::read_to_string(format!("/proc/sys/net/core/{which}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn setsockopt_int(fd: i32, level: i32, name: i32, v: i32) {
    // SAFETY: plain setsockopt with a valid pointer to an int of the right size.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        log::debug!(
            "setsockopt({level}, {name}, {v}) failed: {}",
            io::Error::last_os_error()
        );
    }
}

/// Requests big socket buffers when the host allows at least
/// [`SOCKET_BUFFER`]; otherwise leaves kernel autotuning alone (a small
/// fixed buffer would be slower than autotuning).
pub fn set_big_buffers(fd: &impl AsRawFd) {
    let fd = fd.as_raw_fd();
    if core_max("wmem_max").is_some_and(|m| m >= SOCKET_BUFFER) {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, SOCKET_BUFFER as i32);
    }
    if core_max("rmem_max").is_some_and(|m| m >= SOCKET_BUFFER) {
        setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, SOCKET_BUFFER as i32);
    }
}

/// Prepares a connected stream: blocking with [`POLL_INTERVAL`] timeouts,
/// TCP_NODELAY for the main connection only, big buffers for data.
pub fn prepare_stream(s: &TcpStream, data: bool) -> Result<(), MigrationError> {
    let e = |err| MigrationError::io("configuring a migration socket", err);
    s.set_nonblocking(false).map_err(e)?;
    s.set_read_timeout(Some(POLL_INTERVAL)).map_err(e)?;
    s.set_write_timeout(Some(POLL_INTERVAL)).map_err(e)?;
    s.set_nodelay(!data).map_err(e)?;
    if data {
        set_big_buffers(s);
    }
    Ok(())
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// What [`read_start`] found at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
pub enum Start {
    /// The whole buffer was filled.
    Full,
    /// Nothing arrived within one [`POLL_INTERVAL`] (only when `idle_ok`).
    Idle,
    /// The peer closed the connection at a frame boundary.
    Eof,
}

/// Fills `buf` from `s`. With `idle_ok`, returns [`Start::Idle`] when not a
/// byte arrived within one poll interval, and [`Start::Eof`] on a clean close
/// before the first byte. Once a byte arrived, reads until full: EOF is then
/// an error, and no progress for `ctl.stall` is a stall.
pub fn read_start(
    mut s: &TcpStream,
    buf: &mut [u8],
    ctl: &Ctl,
    idle_ok: bool,
    what: &str,
) -> Result<Start, MigrationError> {
    let mut got = 0;
    let mut last = Instant::now();
    while got < buf.len() {
        ctl.check()?;
        match s.read(&mut buf[got..]) {
            Ok(0) if got == 0 && idle_ok => return Ok(Start::Eof),
            Ok(0) => return Err(MigrationError::PeerClosed(what.to_string())),
            Ok(n) => {
                got += n;
                last = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                if got == 0 && idle_ok {
                    return Ok(Start::Idle);
                }
                if last.elapsed() > ctl.stall {
                    return Err(MigrationError::Stalled(format!(
                        "no data for {:?} {what}",
                        ctl.stall
                    )));
                }
            }
            Err(e) => return Err(MigrationError::io(what, e)),
        }
    }
    Ok(Start::Full)
}

/// Fills `buf` completely (EOF is an error).
pub fn read_full(
    s: &TcpStream,
    buf: &mut [u8],
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    read_start(s, buf, ctl, false, what).map(|_| ())
}

/// Writes all of `buf`, polling abort between timeouts; fails after no
/// progress for `ctl.stall`.
pub fn write_full(
    mut s: &TcpStream,
    buf: &[u8],
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    let mut done = 0;
    let mut last = Instant::now();
    while done < buf.len() {
        ctl.check()?;
        match s.write(&buf[done..]) {
            Ok(0) => return Err(MigrationError::PeerClosed(what.to_string())),
            Ok(n) => {
                done += n;
                last = Instant::now();
            }
            Err(e) if is_timeout(&e) => {
                if ctl.write_stalled(last) {
                    return Err(MigrationError::Stalled(format!(
                        "cannot write for {:?} {what}",
                        ctl.stall
                    )));
                }
            }
            Err(e) => return Err(MigrationError::io(what, e)),
        }
    }
    Ok(())
}

/// Drops `n` bytes from the front of an iovec list.
fn advance(iovs: &mut [libc::iovec], start: &mut usize, mut n: usize) {
    while n > 0 && *start < iovs.len() {
        let v = &mut iovs[*start];
        if n >= v.iov_len {
            n -= v.iov_len;
            *start += 1;
        } else {
            // SAFETY: stays within the buffer the iovec describes.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    while *start < iovs.len() && iovs[*start].iov_len == 0 {
        *start += 1;
    }
}

/// Direction of [`vectored_full`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// `writev` from the buffers.
    Write,
    /// `readv` into the buffers.
    Read,
}

/// Moves every byte described by `iovs` with `writev`/`readv`, advancing over
/// partial transfers. Polls abort between socket timeouts, fails after no
/// progress for `ctl.stall`, and treats EOF as an error.
///
/// # Safety
/// Every iovec must describe memory valid for the whole call (readable for
/// [`Dir::Write`], writable for [`Dir::Read`]).
pub unsafe fn vectored_full(
    s: &TcpStream,
    iovs: &mut [libc::iovec],
    dir: Dir,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    let fd = s.as_raw_fd();
    let mut start = 0;
    advance(iovs, &mut start, 0);
    let mut last = Instant::now();
    while start < iovs.len() {
        ctl.check()?;
        let cnt = (iovs.len() - start).min(IOV_MAX) as i32;
        let p = iovs[start..].as_ptr();
        // SAFETY: the caller guarantees the buffers; `p` points to `cnt` iovecs.
        let r = unsafe {
            match dir {
                Dir::Write => libc::writev(fd, p, cnt),
                Dir::Read => libc::readv(fd, p, cnt),
            }
        };
        if r > 0 {
            advance(iovs, &mut start, r as usize);
            last = Instant::now();
            continue;
        }
        if r == 0 {
            return Err(MigrationError::PeerClosed(what.to_string()));
        }
        let e = io::Error::last_os_error();
        if !is_timeout(&e) {
            return Err(MigrationError::io(what, e));
        }
        let stalled = match dir {
            Dir::Write => ctl.write_stalled(last),
            Dir::Read => last.elapsed() > ctl.stall,
        };
        if stalled {
            return Err(MigrationError::Stalled(format!(
                "no progress for {:?} {what}",
                ctl.stall
            )));
        }
    }
    Ok(())
}

/// Writes one frame: header plus optional payload.
pub fn send_frame(
    s: &TcpStream,
    h: &Header,
    payload: &[u8],
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    let h = h.with_len(payload.len() as u64);
    if payload.is_empty() {
        return write_full(s, &h.encode(), ctl, what);
    }
    let head = h.encode();
    let mut iovs = vec![
        libc::iovec {
            iov_base: head.as_ptr() as *mut libc::c_void,
            iov_len: HEADER_LEN,
        },
        libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: payload.len(),
        },
    ];
    // SAFETY: both buffers live until the call returns and are only read.
    unsafe { vectored_full(s, &mut iovs, Dir::Write, ctl, what) }
}

/// Reads and decodes one header (`idle_ok` as in [`read_start`]).
/// Returns `None` on idle or clean EOF (the caller tells them apart with
/// the returned [`Start`]).
pub fn recv_header(
    s: &TcpStream,
    ctl: &Ctl,
    idle_ok: bool,
    what: &str,
) -> Result<(Start, Option<Header>), MigrationError> {
    let mut b = [0u8; HEADER_LEN];
    match read_start(s, &mut b, ctl, idle_ok, what)? {
        Start::Full => Ok((Start::Full, Some(Header::decode(&b)?))),
        st => Ok((st, None)),
    }
}

/// Reads a payload of `len` bytes (already bounded by header validation).
pub fn recv_payload(
    s: &TcpStream,
    len: u64,
    ctl: &Ctl,
    what: &str,
) -> Result<Vec<u8>, MigrationError> {
    let mut v = vec![0u8; len as usize];
    read_full(s, &mut v, ctl, what)?;
    Ok(v)
}

/// Sends an ERROR (destination) or ABORT (source) frame with `msg`, best
/// effort: one try bounded by a short stall, errors ignored.
pub fn send_message(s: &TcpStream, kind: Kind, session: u128, msg: &str) {
    let ctl = Ctl::new(CancelToken::default(), Duration::from_secs(1));
    let msg = wire::bounded_message(msg);
    let _ = send_frame(
        s,
        &Header::new(kind, session),
        msg.as_bytes(),
        &ctl,
        "sending an error frame",
    );
}

/// Wall-clock microseconds since the Unix epoch (for cross-process downtime).
pub fn epoch_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A flag plus condvar to wake a waiting state machine when workers progress.
#[derive(Debug, Default)]
pub struct Notify {
    gen: Mutex<u64>,
    cv: std::sync::Condvar,
}

impl Notify {
    /// Wakes waiters.
    pub fn notify(&self) {
        *lock(&self.gen) += 1;
        self.cv.notify_all();
    }
    /// Current generation (pass to [`Notify::wait`]).
    pub fn generation(&self) -> u64 {
        *lock(&self.gen)
    }
    /// Waits until the generation moves past `seen` or `timeout` expires.
    pub fn wait(&self, seen: u64, timeout: Duration) {
        let g = lock(&self.gen);
        if *g != seen {
            return;
        }
        let _ = self.cv.wait_timeout(g, timeout);
    }
}

/// The main (control) connection with a write lock, so that the state
/// machine and the keepalive thread never interleave frames.
///
/// Invariant: every frame on the main connection is written while holding
/// `wlock`; reads happen on one thread only.
#[derive(Debug)]
pub struct MainConn {
    /// The stream (poll timeouts set).
    pub stream: TcpStream,
    wlock: Mutex<()>,
    /// Session id stamped on frames.
    pub session: u128,
}

impl MainConn {
    /// Wraps a connected main stream.
    pub fn new(stream: TcpStream, session: u128) -> Arc<MainConn> {
        Arc::new(MainConn {
            stream,
            wlock: Mutex::new(()),
            session,
        })
    }

    /// Sends one frame of `kind` with args and payload.
    pub fn send(
        &self,
        kind: Kind,
        args: (u64, u64, u64),
        payload: &[u8],
        ctl: &Ctl,
        what: &str,
    ) -> Result<(), MigrationError> {
        let h = Header::new(kind, self.session).args(args.0, args.1, args.2);
        let _g = lock(&self.wlock);
        send_frame(&self.stream, &h, payload, ctl, what)
    }

    /// Best-effort ERROR/ABORT frame (ignores failures).
    pub fn send_message(&self, kind: Kind, msg: &str) {
        let _g = lock(&self.wlock);
        send_message(&self.stream, kind, self.session, msg);
    }
}

/// Starts a thread that sends KEEPALIVE on `main` every
/// [`KEEPALIVE_INTERVAL`] until `stop` is set or a send fails.
pub fn spawn_keepalive(
    main: Arc<MainConn>,
    ctl: Arc<Ctl>,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mig-keepalive".into())
        .spawn(move || {
            let mut last = Instant::now();
            while !stop.load(Ordering::SeqCst) && !ctl.stopped() {
                std::thread::sleep(Duration::from_millis(20));
                if last.elapsed() >= KEEPALIVE_INTERVAL {
                    last = Instant::now();
                    if main
                        .send(Kind::Keepalive, (0, 0, 0), &[], &ctl, "sending a keepalive")
                        .is_err()
                    {
                        break;
                    }
                }
            }
        })
        .ok()
}
