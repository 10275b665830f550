//! The memory file descriptors of a handover, over the main UNIX
//! connection with SCM_RIGHTS: the HANDOVER frame's header carries them.
//!
//! Everything received is hostile until checked: the number of
//! descriptors is bounded by the control buffer ([`MAX_HANDOVER_FDS`],
//! more is `MSG_CTRUNC` and refused), descriptors may only ride on the
//! first byte of the frame, every received descriptor is owned at once (so
//! it is closed on every error path), and each must be a read-write regular
//! file (or memfd) large enough for its region ([`validate_fd`]).

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::error::MigrationError;
use crate::net::is_timeout;
use crate::wire::{HEADER_LEN, MAX_HANDOVER_REGIONS};

/// Bound of the descriptors one HANDOVER frame carries (and of the control
/// buffer receiving them).
pub const MAX_HANDOVER_FDS: usize = MAX_HANDOVER_REGIONS as usize;

/// The descriptors a HANDOVER header brought, owned.
pub type HandoverFds = Vec<OwnedFd>;

/// Sends `bytes` (a HANDOVER header and its payload) with `fds` attached to
/// the first byte. The caller holds the main connection's write lock.
pub fn send_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
    deadline: Instant,
) -> Result<(), MigrationError> {
    if fds.is_empty() || fds.len() > MAX_HANDOVER_FDS || bytes.is_empty() {
        return Err(MigrationError::Internal(format!(
            "handing over {} descriptors with {} bytes",
            fds.len(),
            bytes.len()
        )));
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let data_len = std::mem::size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let sent = loop {
        let mut iov = libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers set below stay
        // valid for the sendmsg call (iov, cbuf live on this frame).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` bytes, enough for one
        // header with `data_len` bytes (CMSG_SPACE); CMSG_FIRSTHDR is then
        // non-null and CMSG_DATA has room for `raw`.
        let r = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
            libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
        };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if !is_timeout(&e) || Instant::now() > deadline {
            return Err(MigrationError::io("handing the memory descriptors over", e));
        }
    };
    // The descriptors went with the first byte; the rest is plain data.
    if sent < bytes.len() {
        (&*sock)
            .write_all(&bytes[sent..])
            .map_err(|e| MigrationError::io("handing the memory descriptors over", e))?;
    }
    Ok(())
}

/// Reads one frame header into `head`, with the descriptors that ride on
/// its first byte (at most [`MAX_HANDOVER_FDS`]; more fails). Fails at
/// `deadline` or when `stopped()`.
pub fn recv_fds(
    sock: &UnixStream,
    head: &mut [u8; HEADER_LEN],
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<HandoverFds, MigrationError> {
    let mut fds: HandoverFds = Vec::new();
    let mut got = 0usize;
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_HANDOVER_FDS * 4) as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    while got < HEADER_LEN {
        if stopped() {
            return Err(MigrationError::Aborted);
        }
        if Instant::now() > deadline {
            return Err(MigrationError::Timeout(
                "waiting for the memory descriptors".into(),
            ));
        }
        let rest = &mut head[got..];
        let mut iov = libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        };
        // SAFETY: an all-zero msghdr is valid; iov and cbuf outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: recvmsg writes at most iov_len bytes into `rest` and at
        // most msg_controllen bytes into `cbuf`, both valid and writable.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if is_timeout(&e) {
                continue;
            }
            return Err(MigrationError::io("receiving the memory descriptors", e));
        }
        // Own whatever arrived before judging it (closed on any error).
        let before = fds.len();
        take_rights(&msg, &mut fds);
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(MigrationError::proto(format!(
                "the source handed over more than {MAX_HANDOVER_FDS} descriptors"
            )));
        }
        if fds.len() > before && got > 0 {
            return Err(MigrationError::proto(
                "descriptors arrived inside a frame header",
            ));
        }
        if r == 0 {
            return Err(MigrationError::PeerClosed(
                "waiting for the memory descriptors".into(),
            ));
        }
        got += r as usize;
    }
    Ok(fds)
}

/// Moves every SCM_RIGHTS descriptor of `msg` into `out` (owned).
fn take_rights(msg: &libc::msghdr, out: &mut HandoverFds) {
    // SAFETY: `msg` was filled by recvmsg; the CMSG_* walk stays within
    // msg_controllen (CMSG_NXTHDR returns null past it), and each
    // SCM_RIGHTS payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors
    // that the kernel just installed in this process and nothing else owns.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let p = libc::CMSG_DATA(c).cast::<RawFd>();
                for i in 0..bytes / std::mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(p.add(i));
                    if fd >= 0 {
                        out.push(OwnedFd::from_raw_fd(fd));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
}

/// Checks a received descriptor before it is mapped: a regular file (a
/// memfd is one) open read-write, at least `need` bytes long. The error
/// says what it is instead.
pub fn validate_fd(fd: BorrowedFd<'_>, need: u64) -> Result<(), String> {
    // SAFETY: fstat on a descriptor we own into a zeroed stat buffer.
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_fd().as_raw_fd(), &mut st) != 0 {
            return Err(format!("fstat: {}", io::Error::last_os_error()));
        }
        st
    };
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG {
        let what = match kind {
            libc::S_IFSOCK => "a socket",
            libc::S_IFIFO => "a pipe",
            libc::S_IFDIR => "a directory",
            libc::S_IFCHR => "a character device",
            libc::S_IFBLK => "a block device",
            _ => "not a regular file",
        };
        return Err(format!(
            "the descriptor is {what}, not a memory file (memfd or regular file)"
        ));
    }
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 || fl & libc::O_ACCMODE != libc::O_RDWR {
        return Err("the memory file is not open read-write".into());
    }
    let size = u64::try_from(st.st_size).unwrap_or(0);
    if size < need {
        return Err(format!(
            "the memory file holds {size} bytes, the region needs {need}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::Duration;

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: valid NUL-terminated name; the fd is checked and owned.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor nothing else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).unwrap();
        f.into()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn validate_accepts_a_big_enough_memfd() {
        let m = memfd(1 << 20);
        validate_fd(m.as_fd(), 1 << 20).unwrap();
        let e = validate_fd(m.as_fd(), (1 << 20) + 4096).unwrap_err();
        assert!(e.contains("holds 1048576 bytes"), "{e}");
    }

    #[test]
    fn validate_refuses_wrong_kinds() {
        let (a, _b) = UnixStream::pair().unwrap();
        let e = validate_fd(a.as_fd(), 0).unwrap_err();
        assert!(e.contains("a socket"), "{e}");
        let mut p = [0i32; 2];
        // SAFETY: pipe into a valid 2-int array; both ends owned below.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors nothing else owns.
        let (r, _w) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        assert!(validate_fd(r.as_fd(), 0).unwrap_err().contains("a pipe"));
        let d = File::open("/").unwrap();
        assert!(validate_fd(d.as_fd(), 0)
            .unwrap_err()
            .contains("a directory"));
        let n = File::open("/dev/null").unwrap();
        assert!(validate_fd(n.as_fd(), 0)
            .unwrap_err()
            .contains("character device"));
        let dir = std::env::temp_dir().join(format!("ferry-fds-{}", std::process::id()));
        std::fs::write(&dir, vec![0u8; 8192]).unwrap();
        let ro = File::open(&dir).unwrap();
        let e = validate_fd(ro.as_fd(), 4096).unwrap_err();
        assert!(e.contains("read-write"), "{e}");
        let _ = std::fs::remove_file(&dir);
    }

    #[test]
    fn descriptors_round_trip_on_the_first_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        let m1 = memfd(4096);
        let m2 = memfd(8192);
        let mut bytes = vec![7u8; HEADER_LEN];
        bytes.extend_from_slice(&[9u8; 48]);
        send_fds(&a, &bytes, &[m1.as_fd(), m2.as_fd()], soon()).unwrap();
        let mut head = [0u8; HEADER_LEN];
        let fds = recv_fds(&b, &mut head, soon(), &|| false).unwrap();
        assert_eq!(fds.len(), 2);
        assert_eq!(head, [7u8; HEADER_LEN]);
        validate_fd(fds[1].as_fd(), 8192).unwrap();
        let mut rest = [0u8; 48];
        std::io::Read::read_exact(&mut &b, &mut rest).unwrap();
        assert_eq!(rest, [9u8; 48]);
    }

    #[test]
    fn too_many_descriptors_are_refused_and_closed() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = memfd(4096);
        let many: Vec<BorrowedFd<'_>> = (0..MAX_HANDOVER_FDS + 4).map(|_| m.as_fd()).collect();
        // Our own sender refuses to send that many...
        assert!(send_fds(&a, &[0u8; HEADER_LEN], &many, soon()).is_err());
        // ...a hostile one is cut off by the control buffer.
        raw_send(&a, &[0u8; HEADER_LEN], &many);
        let mut head = [0u8; HEADER_LEN];
        let e = recv_fds(&b, &mut head, soon(), &|| false).unwrap_err();
        assert!(e.to_string().contains("more than 16"), "{e}");
    }

    #[test]
    fn a_silent_or_closed_peer_fails() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut head = [0u8; HEADER_LEN];
        let past = Instant::now() + Duration::from_millis(60);
        assert!(matches!(
            recv_fds(&b, &mut head, past, &|| false),
            Err(MigrationError::Timeout(_))
        ));
        drop(a);
        assert!(matches!(
            recv_fds(&b, &mut head, soon(), &|| false),
            Err(MigrationError::PeerClosed(_))
        ));
    }

    /// sendmsg without the bound our sender applies (a hostile source).
    fn raw_send(sock: &UnixStream, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let data_len = std::mem::size_of_val(raw.as_slice());
        // SAFETY: as in `send_fds`: buffers sized by CMSG_SPACE, valid
        // for the call.
        unsafe {
            let space = libc::CMSG_SPACE(data_len as u32) as usize;
            let mut cbuf = vec![0u8; space];
            let mut iov = libc::iovec {
                iov_base: bytes.as_ptr() as *mut libc::c_void,
                iov_len: bytes.len(),
            };
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), data_len);
            assert!(libc::sendmsg(sock.as_raw_fd(), &msg, 0) > 0);
        }
    }
}
