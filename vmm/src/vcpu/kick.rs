//! Kicking a vCPU thread out of KVM_RUN (see the module docs of
//! [`super`]): the kick signal, the pthread id kept for it, and the signal
//! mask the vCPU thread runs KVM_RUN with.

use std::sync::Mutex;

use kvm_ioctls::VcpuFd;
use log::warn;

/// Signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs a no-op handler for [`kick_signal`] (vCPU threads keep the
/// signal blocked, so it only guards against its default action); idempotent.
pub fn install_kick_handler() -> std::io::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
            .map_err(|e| e.errno())
    })
    .map_err(std::io::Error::from_raw_os_error)
}

/// The pthread id of a live vCPU thread.
///
/// Invariant: `Some` exactly from the thread's first instruction of its
/// body until just before it returns; the thread clears it under the lock,
/// so whoever holds the lock and sees `Some` can signal a live thread.
#[derive(Default)]
pub(super) struct KickTarget(Mutex<Option<libc::pthread_t>>);

impl KickTarget {
    pub(super) fn set(&self, t: Option<libc::pthread_t>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    pub(super) fn alive(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    pub(super) fn kick(&self) {
        let g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = *g {
            // SAFETY: `t` is the pthread id of a thread that has not yet
            // cleared it (invariant): the thread still runs, so the id is
            // valid. The signal is blocked there outside KVM_RUN, so it only
            // interrupts KVM_RUN or stays pending.
            let r = unsafe { libc::pthread_kill(t, kick_signal()) };
            if r != 0 {
                warn!("kicking a vCPU thread failed: errno {r}");
            }
        }
    }
}

/// `struct kvm_signal_mask` with room for the kernel's 64-bit sigset.
#[repr(C)]
struct KvmSignalMask {
    len: u32,
    sigset: [u8; 8],
}

mod ioctls {
    #![allow(missing_docs)]
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_SIGNAL_MASK,
        kvm_bindings::KVMIO,
        0x8b,
        kvm_bindings::kvm_signal_mask
    );
}
use ioctls::KVM_SET_SIGNAL_MASK;

fn kick_set() -> std::io::Result<libc::sigset_t> {
    vmm_sys_util::signal::create_sigset(&[kick_signal()])
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Tells KVM to run this thread with the kick signal unblocked (keeping the
/// rest of the thread's mask), then blocks it outside KVM_RUN. If KVM
/// refuses, the signal stays unblocked: its no-op handler then interrupts
/// KVM_RUN, and the handle's re-kicks cover a kick that came just before it.
pub(super) fn setup_kick_mask(fd: &VcpuFd) -> std::io::Result<()> {
    let set = kick_set()?;
    // SAFETY: an all-zero sigset_t is a valid (empty) set.
    let mut cur: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: reads this thread's mask into a valid set (no change).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut cur) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: `cur` is a valid set and the signal number is valid.
    unsafe { libc::sigdelset(&mut cur, kick_signal()) };
    let mut mask = KvmSignalMask {
        len: 8,
        sigset: [0; 8],
    };
    // SAFETY: glibc's sigset_t starts with the kernel's 64-bit signal set
    // (bit n-1 for signal n) and is larger than 8 bytes.
    let bytes =
        unsafe { std::slice::from_raw_parts((&cur as *const libc::sigset_t).cast::<u8>(), 8) };
    mask.sigset.copy_from_slice(bytes);
    // SAFETY: KVM_SET_SIGNAL_MASK reads `len` and then `len` (8) bytes of
    // sigset from the struct we pass, which holds exactly that.
    let r = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, KVM_SET_SIGNAL_MASK(), &mask) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a valid set; changes only this thread's mask.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

/// Consumes the kicks pending on this thread (they are queued while the
/// signal is blocked).
pub(super) fn eat_kicks() {
    let Ok(set) = kick_set() else { return };
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        // SAFETY: valid set and timeout; a null info pointer is allowed.
        let r = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &zero) };
        if r < 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_mask_ioctl_number() {
        // _IOW(KVMIO, 0x8b, struct kvm_signal_mask) from <linux/kvm.h>.
        assert_eq!(KVM_SET_SIGNAL_MASK(), 0x4004_ae8b);
        assert_eq!(std::mem::size_of::<KvmSignalMask>(), 12);
    }
}
