//! userfaultfd in MISSING mode, with hand-written bindings of the kernel's
//! uAPI (`linux/userfaultfd.h`): `UFFDIO_API`, `UFFDIO_REGISTER`,
//! `UFFDIO_UNREGISTER`, `UFFDIO_WAKE`, `UFFDIO_COPY`, `UFFDIO_ZEROPAGE` and
//! the 32-byte fault messages. Six ioctls and one message layout do not
//! justify the `userfaultfd` crate, whose `-sys` crate runs bindgen (and so
//! needs libclang) at build time on every machine and in CI.
//!
//! The descriptor is created without `UFFD_USER_MODE_ONLY`: the faults that
//! matter are taken by KVM inside `KVM_RUN` (kernel mode). That needs
//! `CAP_SYS_PTRACE` (root) or access to `/dev/userfaultfd`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFDIO_COPY_BIT: u64 = 1 << 3;
const UFFDIO_ZEROPAGE_BIT: u64 = 1 << 4;
const UFFDIO_WAKE_BIT: u64 = 1 << 2;

/// `_IOC(dir, 0xAA, nr, size)`.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const IOC_READ: u64 = 2;
const IOC_RW: u64 = 3;
const UFFDIO_API: u64 = ioc(IOC_RW, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(IOC_RW, 0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(IOC_RW, 0x03, std::mem::size_of::<UffdioCopy>());
const UFFDIO_ZEROPAGE: u64 = ioc(IOC_RW, 0x04, std::mem::size_of::<UffdioZeropage>());
/// `USERFAULTFD_IOC_NEW` of `/dev/userfaultfd`: `_IO(0xAA, 0)`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

const PAGE: u64 = 4096;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg` (32 bytes); for a page fault `arg[0]` is the flags and
/// `arg[1]` the faulting address.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    arg: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);

/// One userfaultfd descriptor (non-blocking, close-on-exec), after the API
/// handshake.
///
/// Invariant: `fd` is a userfaultfd on which `UFFDIO_API` succeeded with
/// the features in `features`.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    /// Features the kernel granted.
    pub features: u64,
}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Uffd {
    /// Opens a userfaultfd (the syscall, else `/dev/userfaultfd`) and
    /// negotiates the API, asking for missing-page faults on shared memory
    /// too.
    pub fn new() -> io::Result<Uffd> {
        // SAFETY: a plain syscall with flags only; the result is checked.
        let raw =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) }
                as i32;
        let raw = if raw >= 0 {
            raw
        } else {
            let first = last_err();
            Self::from_dev().map_err(|e| {
                io::Error::new(
                    first.kind(),
                    format!("userfaultfd(2): {first}; /dev/userfaultfd: {e}"),
                )
            })?
        };
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features: UFFD_FEATURE_MISSING_SHMEM,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API on our userfaultfd with a valid, writable
        // struct of the size the ioctl number encodes.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if rc != 0 {
            return Err(last_err());
        }
        Ok(Uffd {
            fd,
            features: api.features,
        })
    }

    fn from_dev() -> io::Result<i32> {
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")?;
        // SAFETY: USERFAULTFD_IOC_NEW on the opened device takes the flags
        // as its argument and returns a new descriptor, checked below.
        let raw = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                USERFAULTFD_IOC_NEW as _,
                libc::O_CLOEXEC | libc::O_NONBLOCK,
            )
        };
        if raw < 0 {
            return Err(last_err());
        }
        Ok(raw)
    }

    /// Registers `[addr, addr + len)` (page-aligned, a mapping of this
    /// process) for missing-page faults; fails unless COPY, ZEROPAGE and
    /// WAKE are available on it.
    pub fn register(&self, addr: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER with a valid struct; registering only
        // changes how missing pages of the range fault (the kernel checks
        // that the range is mapped).
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) };
        if rc != 0 {
            return Err(last_err());
        }
        let need = UFFDIO_COPY_BIT | UFFDIO_ZEROPAGE_BIT | UFFDIO_WAKE_BIT;
        if r.ioctls & need != need {
            let _ = self.unregister(addr, len);
            return Err(io::Error::other(format!(
                "the kernel offers ioctls {:#x} on this memory, post-copy needs COPY, ZEROPAGE and WAKE",
                r.ioctls
            )));
        }
        Ok(())
    }

    fn range_ioctl(&self, req: u64, addr: u64, len: u64) -> io::Result<()> {
        let mut r = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER / UFFDIO_WAKE with a valid range struct.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as _, &mut r) };
        if rc != 0 {
            return Err(last_err());
        }
        Ok(())
    }

    /// Unregisters the range (waking every thread waiting in it).
    pub fn unregister(&self, addr: u64, len: u64) -> io::Result<()> {
        self.range_ioctl(UFFDIO_UNREGISTER, addr, len)
    }

    /// Wakes threads waiting for pages of the range.
    pub fn wake(&self, addr: u64, len: u64) -> io::Result<()> {
        self.range_ioctl(UFFDIO_WAKE, addr, len)
    }

    /// Fills `[dst, dst + len)` (registered, page-aligned) atomically from
    /// `src` (`UFFDIO_COPY`) or with zeroes (`src` = `None`,
    /// `UFFDIO_ZEROPAGE`), waking waiters. Pages already present are left
    /// as they are (`EEXIST`) and their addresses appended to `present`.
    ///
    /// # Safety
    /// `src`, if given, must point to `len` readable bytes.
    pub unsafe fn fill(
        &self,
        dst: u64,
        src: Option<*const u8>,
        len: u64,
        present: &mut Vec<u64>,
    ) -> io::Result<()> {
        let mut done = 0u64;
        let mut retries = 0;
        while done < len {
            let (rc, moved) = match src {
                Some(p) => {
                    let mut c = UffdioCopy {
                        dst: dst + done,
                        // SAFETY (of the pointer arithmetic): done < len, so
                        // the offset stays inside the caller's buffer.
                        src: p as u64 + done,
                        len: len - done,
                        mode: 0,
                        copy: 0,
                    };
                    // SAFETY: UFFDIO_COPY reads `len - done` bytes from the
                    // caller's buffer (the contract above) and writes only
                    // missing pages of the registered range.
                    let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
                    (rc, c.copy)
                }
                None => {
                    let mut z = UffdioZeropage {
                        range: UffdioRange {
                            start: dst + done,
                            len: len - done,
                        },
                        mode: 0,
                        zeropage: 0,
                    };
                    // SAFETY: UFFDIO_ZEROPAGE maps zero pages at missing pages
                    // of the registered range only.
                    let rc =
                        unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
                    (rc, z.zeropage)
                }
            };
            if rc == 0 {
                return Ok(());
            }
            let e = last_err();
            match e.raw_os_error() {
                Some(libc::EAGAIN) if moved > 0 => done += moved as u64,
                Some(libc::EAGAIN) if retries < 1000 => retries += 1,
                Some(libc::EEXIST) => {
                    present.push(dst + done);
                    done += PAGE;
                }
                _ => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for faults and appends their (page-aligned)
    /// addresses to `out`.
    pub fn read_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> io::Result<()> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = last_err();
            return if e.raw_os_error() == Some(libc::EINTR) {
                Ok(())
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Ok(());
        }
        let mut msgs = [UffdMsg::default(); 64];
        // SAFETY: reads at most the size of `msgs` into it; the kernel
        // writes whole 32-byte messages.
        let r = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr() as *mut libc::c_void,
                std::mem::size_of_val(&msgs),
            )
        };
        if r < 0 {
            let e = last_err();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(()),
                _ => Err(e),
            };
        }
        let n = r as usize / std::mem::size_of::<UffdMsg>();
        for m in &msgs[..n] {
            if m.event == UFFD_EVENT_PAGEFAULT {
                out.push(m.arg[1] & !(PAGE - 1));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A mapping for the test: anonymous, or a memfd shared mapping.
    struct Map {
        addr: u64,
        len: u64,
    }

    impl Map {
        fn new(len: u64, shared: bool) -> Map {
            let (flags, fd) = if shared {
                // SAFETY: memfd_create with a static name; checked.
                let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), 0) };
                assert!(fd >= 0);
                // SAFETY: sizing our own fresh memfd.
                assert_eq!(unsafe { libc::ftruncate(fd, len as i64) }, 0);
                (libc::MAP_SHARED, fd)
            } else {
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)
            };
            // SAFETY: a fresh mapping, checked below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            if fd >= 0 {
                // SAFETY: the mapping keeps the memfd's pages alive.
                unsafe { libc::close(fd) };
            }
            Map {
                addr: p as u64,
                len,
            }
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: our mapping.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }

    /// A thread reading a missing page blocks until it is copied in; a
    /// second copy is refused (EEXIST) and reported; zero pages work; on
    /// anonymous and on shared memory.
    #[test]
    fn missing_pages_fault_and_are_filled_once() {
        for shared in [false, true] {
            let m = Map::new(16 * PAGE, shared);
            let u = Uffd::new().expect("userfaultfd");
            u.register(m.addr, m.len).expect("register");
            let addr = m.addr;
            let reader = std::thread::spawn(move || {
                // SAFETY: reads inside the live registered mapping (page 3).
                unsafe { std::ptr::read_volatile((addr + 3 * PAGE + 8) as *const u64) }
            });
            let mut faults = Vec::new();
            while faults.is_empty() {
                u.read_faults(Duration::from_millis(100), &mut faults)
                    .unwrap();
            }
            assert_eq!(faults, vec![m.addr + 3 * PAGE], "shared {shared}");
            let data = vec![0x5au8; 2 * PAGE as usize];
            let mut present = Vec::new();
            // SAFETY: `data` holds 2 pages.
            unsafe { u.fill(m.addr + 3 * PAGE, Some(data.as_ptr()), PAGE, &mut present) }.unwrap();
            assert_eq!(reader.join().unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
            // Pages 2..4: page 3 is present, 2 is filled.
            let other = vec![0x11u8; 2 * PAGE as usize];
            // SAFETY: `other` holds 2 pages.
            unsafe {
                u.fill(
                    m.addr + 2 * PAGE,
                    Some(other.as_ptr()),
                    2 * PAGE,
                    &mut present,
                )
            }
            .unwrap();
            assert_eq!(present, vec![m.addr + 3 * PAGE]);
            // SAFETY: page 3 is present now; a plain read.
            let v = unsafe { std::ptr::read_volatile((m.addr + 3 * PAGE) as *const u8) };
            assert_eq!(v, 0x5a, "the first copy wins");
            // SAFETY: zero pages for 5..7.
            unsafe { u.fill(m.addr + 5 * PAGE, None, 2 * PAGE, &mut present) }.unwrap();
            // SAFETY: page 5 is present now.
            let v = unsafe { std::ptr::read_volatile((m.addr + 5 * PAGE) as *const u8) };
            assert_eq!(v, 0);
            u.unregister(m.addr, m.len).unwrap();
            // Unregistered: missing pages read zero as usual.
            // SAFETY: inside the live mapping.
            let v = unsafe { std::ptr::read_volatile((m.addr + 9 * PAGE) as *const u8) };
            assert_eq!(v, 0);
        }
    }
}
