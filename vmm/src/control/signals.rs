//! SIGINT, SIGTERM and SIGHUP through a signalfd, as a subscriber of the
//! control loop: the process ends with 128 + the signal number.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{error, info};
use vmm_sys_util::epoll::EventSet;

use super::Shared;

/// The signals that end the process.
pub const TERM_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A signalfd for [`TERM_SIGNALS`].
///
/// Invariant: the signals are blocked in the thread that created it, and
/// so in every thread it spawns later (the mask is inherited): they are
/// only ever read from `fd`.
pub struct BlockedSignals {
    fd: OwnedFd,
}

fn term_set() -> std::io::Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(&TERM_SIGNALS)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

impl BlockedSignals {
    /// Blocks [`TERM_SIGNALS`] in the calling thread and opens the
    /// signalfd. Call it before any other thread is spawned.
    pub fn block() -> std::io::Result<BlockedSignals> {
        let set = term_set()?;
        // SAFETY: a valid set; changes only this thread's mask.
        let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if r != 0 {
            return Err(std::io::Error::from_raw_os_error(r));
        }
        // An inherited SIG_IGN (e.g. SIGINT of a background job) would
        // discard the signal before it could be read: use the default
        // disposition, which never acts while the signal is blocked.
        for sig in TERM_SIGNALS {
            // SAFETY: SIG_DFL is a valid disposition for these signals.
            if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
        }
        // SAFETY: -1 asks for a new fd; `set` is a valid set.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(BlockedSignals { fd })
    }

    /// Reads one pending signal, if any.
    fn read(&self) -> Option<u32> {
        // SAFETY: an all-zero signalfd_siginfo is valid.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which has them.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        (n == size as isize).then_some(info.ssi_signo)
    }
}

/// The control loop's subscriber for [`BlockedSignals`].
///
/// Invariant: a signal read sets the loop's exit code to 128 + its number.
pub(super) struct SignalSubscriber {
    pub(super) signals: BlockedSignals,
    pub(super) decisions: Shared,
}

impl MutEventSubscriber for SignalSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Some(sig) = self.signals.read() {
            info!("signal {sig} received; exiting");
            self.decisions.borrow_mut().exit(128 + sig as i32);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.signals.fd, EventSet::IN)) {
            error!("control loop: cannot watch signals: {e}");
            self.decisions.borrow_mut().exit(1);
        }
    }
}
