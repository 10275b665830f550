//! Socket options and the blocking loops: whole buffers, typed frames and
//! zero-copy vectored transfers. No call blocks longer than
//! [`POLL_INTERVAL`] without checking abort, cancel and stalls.

use super::Sock;
use std::io::{self, ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::{Channel, Ctl, POLL_INTERVAL, SOCKET_BUFFER};
use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::guest_mem::{Gather, IoVecs, Scatter};
use crate::wire::{self, Envelope, Frame, HEADER_LEN};

/// Largest iovec count of one `readv`/`writev` call.
const IOV_MAX: usize = 1024;

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
/// TCP_NODELAY on every connection (a data connection's small frames, SYNC
/// above all, must not wait behind Nagle for the peer's delayed ACK: that
/// held the post-copy switch up by ~40 ms; RAM goes out in large `writev`s
/// either way), big buffers for data.
pub fn prepare_stream(s: &Sock, data: bool) -> Result<(), MigrationError> {
    let e = |err| MigrationError::io("configuring a migration socket", err);
    s.set_nonblocking(false).map_err(e)?;
    s.set_read_timeout(Some(POLL_INTERVAL)).map_err(e)?;
    s.set_write_timeout(Some(POLL_INTERVAL)).map_err(e)?;
    s.set_nodelay(true).map_err(e)?;
    if data {
        set_big_buffers(s);
    }
    Ok(())
}

/// Whether `e` only says that nothing happened within a socket timeout
/// (or the call was interrupted): try again after checking abort.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Waits until `fd` is readable (for a listener: a connection is ready to
/// accept), an error or hang-up is pending, or `timeout` passed; returns
/// whether it became ready. An interrupted or failed poll counts as not
/// ready: the caller's loop tries again.
pub fn wait_readable(fd: &impl std::os::fd::AsRawFd, timeout: Duration) -> bool {
    poll_fd(fd.as_raw_fd(), libc::POLLIN, timeout).is_ok_and(|r| r != 0)
}

/// poll(2) of one descriptor for `events`, for up to `timeout` (whole ms,
/// at most `i32::MAX`): the `revents` (0: timed out; POLLERR, POLLHUP and
/// POLLNVAL come without being asked), or the error, EINTR included.
pub fn poll_fd(fd: std::os::fd::RawFd, events: i16, timeout: Duration) -> io::Result<i16> {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd that lives across the call, and the
    // count passed is 1; poll writes only `p.revents`. A descriptor that
    // is not open is reported in `revents` (POLLNVAL), not undefined.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.revents)
    }
}

/// Reads and discards what the peer still sends, for up to `limit` or
/// until it closes or `stopped()`: after our last words (an ERROR frame, a
/// TLS alert) and our write shutdown, so that closing with unread input
/// does not turn into a reset that loses them.
pub fn drain(tcp: &Sock, limit: Duration, stopped: &dyn Fn() -> bool) {
    let until = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < until && !stopped() {
        match (&*tcp).read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(_) => break,
        }
    }
}

/// What [`read_start`] found at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
enum Start {
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
fn read_start(
    s: &Channel,
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
pub fn read_full(s: &Channel, buf: &mut [u8], ctl: &Ctl, what: &str) -> Result<(), MigrationError> {
    read_start(s, buf, ctl, false, what).map(|_| ())
}

/// Writes all of `buf` (and, with TLS, pushes it out of the session's
/// buffer), polling abort between timeouts; fails after no progress for
/// `ctl.stall`.
pub fn write_full(s: &Channel, buf: &[u8], ctl: &Ctl, what: &str) -> Result<(), MigrationError> {
    let mut done = 0;
    write_loop(s, ctl, what, || {
        (done < buf.len()).then(|| {
            s.write_some(&buf[done..]).map(|n| {
                done += n;
                done >= buf.len()
            })
        })
    })
}

/// [`write_vecs`] over TLS: the bytes are sealed from where they lie into
/// the channel's send queue, then flushed.
fn write_vecs_tls(
    s: &Channel,
    v: &mut IoVecs<'_, Gather>,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    write_loop(s, ctl, what, || {
        (!v.is_empty()).then(|| s.write_vecs_some(v).map(|_| v.is_empty()))
    })
}

/// Calls `step` (one bounded attempt to move bytes, `Ok(true)` once that
/// attempt took the last of them; `None` when nothing was left) until
/// done, then flushes a TLS channel's queue. Polls abort before attempts,
/// never after the last byte was taken: a frame that is on the wire is
/// reported written, even if the peer's answer to it already failed the
/// migration (a COMMIT must never read as unsent once it was sent). A
/// timeout error from an attempt means no progress, and no progress for
/// `ctl.stall` (see [`Ctl::write_stalled`]) fails.
fn write_loop(
    s: &Channel,
    ctl: &Ctl,
    what: &str,
    mut step: impl FnMut() -> Option<io::Result<bool>>,
) -> Result<(), MigrationError> {
    let mut last = Instant::now();
    let stalled = |last: Instant| {
        if ctl.write_stalled(last) {
            Err(MigrationError::Stalled(format!(
                "cannot write for {:?} {what}",
                ctl.stall
            )))
        } else {
            Ok(())
        }
    };
    // Abort is polled before the first attempt and after each attempt that
    // moved nothing, never between a write that took the last bytes and the
    // return: a frame handed whole to the kernel (COMMIT!) must never be
    // reported as failed because another thread aborted meanwhile.
    ctl.check()?;
    loop {
        match step() {
            None | Some(Ok(true)) => break,
            Some(Ok(false)) => {
                last = Instant::now();
                ctl.check()?;
            }
            Some(Err(e)) if is_timeout(&e) => {
                stalled(last)?;
                ctl.check()?;
            }
            Some(Err(e)) if e.kind() == ErrorKind::WriteZero => {
                return Err(MigrationError::PeerClosed(what.to_string()))
            }
            Some(Err(e)) => return Err(MigrationError::io(what, e)),
        }
    }
    if !s.is_tls() {
        return Ok(());
    }
    loop {
        match s.flush_some() {
            Ok(true) => return Ok(()),
            Ok(false) => last = Instant::now(),
            Err(e) if is_timeout(&e) => {
                stalled(last)?;
                ctl.check()?;
            }
            Err(e) => return Err(MigrationError::io(what, e)),
        }
    }
}

/// [`read_vecs`] over TLS: each record's plaintext is copied from where
/// it was opened straight into the scatter list.
fn read_vecs_tls(
    s: &Channel,
    v: &mut IoVecs<'_, Scatter>,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    let mut last = Instant::now();
    while !v.is_empty() {
        ctl.check()?;
        match s.read_with(|p| v.copy_in(p)) {
            Ok(0) => return Err(MigrationError::PeerClosed(what.to_string())),
            Ok(_) => last = Instant::now(),
            Err(e) if is_timeout(&e) => {
                if last.elapsed() > ctl.stall {
                    return Err(MigrationError::Stalled(format!(
                        "no progress for {:?} {what}",
                        ctl.stall
                    )));
                }
            }
            Err(e) => return Err(MigrationError::io(what, e)),
        }
    }
    Ok(())
}

/// Moves every byte of `v` with `writev` (`write`) or `readv`, advancing
/// over partial transfers. Polls abort between socket timeouts, fails after
/// no progress for the stall timeout, and treats EOF as an error.
fn vectored<D>(
    s: &Channel,
    v: &mut IoVecs<'_, D>,
    write: bool,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    let fd = s.tcp().as_raw_fd();
    let mut last = Instant::now();
    while !v.is_empty() {
        ctl.check()?;
        let (p, cnt) = v.pending(IOV_MAX);
        // SAFETY: `p` points to `cnt` iovecs that, by the IoVecs invariant,
        // describe memory valid for the list's lifetime (which outlives this
        // call): readable for a gather list (`write`), writable for a scatter
        // list (read).
        let r = unsafe {
            if write {
                libc::writev(fd, p, cnt)
            } else {
                libc::readv(fd, p, cnt)
            }
        };
        if r > 0 {
            v.advance(r as usize);
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
        let stalled = if write {
            ctl.write_stalled(last)
        } else {
            last.elapsed() > ctl.stall
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

/// Writes every byte of a gather list (`writev`, zero-copy from guest
/// memory and local buffers).
pub fn write_vecs(
    s: &Channel,
    v: &mut IoVecs<'_, Gather>,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    if s.is_tls() {
        return write_vecs_tls(s, v, ctl, what);
    }
    vectored(s, v, true, ctl, what)
}

/// Fills every byte of a scatter list (`readv` straight into guest memory).
pub fn read_vecs(
    s: &Channel,
    v: &mut IoVecs<'_, Scatter>,
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    if s.is_tls() {
        return read_vecs_tls(s, v, ctl, what);
    }
    vectored(s, v, false, ctl, what)
}

/// Writes one frame of `session`: header plus its payload (whose length
/// must be the frame's [`Frame::payload_len`]).
pub fn send_frame(
    s: &Channel,
    session: u128,
    frame: &Frame,
    payload: &[u8],
    ctl: &Ctl,
    what: &str,
) -> Result<(), MigrationError> {
    if frame.payload_len() != payload.len() as u64 {
        return Err(MigrationError::Internal(format!(
            "{:?} frame announces {} bytes, payload has {}",
            frame.kind(),
            frame.payload_len(),
            payload.len()
        )));
    }
    let head = frame.encode_v(session, s.version());
    if payload.is_empty() {
        return write_full(s, &head, ctl, what);
    }
    let mut v = IoVecs::with_storage(Vec::with_capacity(2));
    v.push_bytes(&head);
    v.push_bytes(payload);
    write_vecs(s, &mut v, ctl, what)
}

/// What [`recv_frame`] found at a frame boundary.
#[derive(Debug, PartialEq, Eq)]
pub enum Recv {
    /// A validated frame header (its payload, if any, follows).
    Frame(Envelope),
    /// Nothing arrived within one [`POLL_INTERVAL`] (only when `idle_ok`).
    Idle,
    /// The peer closed the connection at a frame boundary (only when
    /// `idle_ok`).
    Eof,
}

/// Reads and decodes one frame header (`idle_ok` as in [`read_start`]).
pub fn recv_frame(
    s: &Channel,
    ctl: &Ctl,
    idle_ok: bool,
    what: &str,
) -> Result<Recv, MigrationError> {
    let mut b = [0u8; HEADER_LEN];
    Ok(match read_start(s, &mut b, ctl, idle_ok, what)? {
        Start::Full => Recv::Frame(Frame::decode(&b)?),
        Start::Idle => Recv::Idle,
        Start::Eof => Recv::Eof,
    })
}

/// Reads a payload of `len` bytes (already bounded by header validation).
pub fn recv_payload(
    s: &Channel,
    len: u64,
    ctl: &Ctl,
    what: &str,
) -> Result<Vec<u8>, MigrationError> {
    let mut v = vec![0u8; len as usize];
    read_full(s, &mut v, ctl, what)?;
    Ok(v)
}

/// Sends an ERROR (destination) or ABORT (source) frame with `msg`, best
/// effort: one try bounded by a short stall, errors ignored. `frame` builds
/// the frame from the message length (`|len| Frame::Error { len }`).
pub fn send_message(s: &Channel, session: u128, frame: fn(u64) -> Frame, msg: &str) {
    let ctl = Ctl::new(CancelToken::default(), Duration::from_secs(1));
    let msg = wire::bounded_message(msg);
    let _ = send_frame(
        s,
        session,
        &frame(msg.len() as u64),
        msg.as_bytes(),
        &ctl,
        "sending an error frame",
    );
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn poll_fd_reports_readiness_timeouts_and_hangups() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let fd = b.as_raw_fd();
        assert_eq!(poll_fd(fd, libc::POLLIN, Duration::ZERO).unwrap(), 0);
        assert!(!wait_readable(&b, Duration::ZERO));
        a.write_all(b"x").unwrap();
        assert_eq!(
            poll_fd(fd, libc::POLLIN, Duration::from_secs(60)).unwrap() & libc::POLLIN,
            libc::POLLIN
        );
        assert!(wait_readable(&b, Duration::from_secs(60)));
        drop(a);
        let r = poll_fd(fd, 0, Duration::from_secs(60)).unwrap();
        assert_ne!(r & libc::POLLHUP, 0, "revents {r:#x}");
    }
}
