//! Turning zero-copy send on for a send's data connections (`"zero_copy":
//! true`), and what the status says about it.
//!
//! Plain TCP: RAM pages go from guest memory with `MSG_ZEROCOPY`. TLS: the
//! record layer must read every plaintext byte to encrypt it, so the pages
//! cannot go to the NIC as they are; what can skip the kernel's copy is the
//! ciphertext, and the channel sends its sealed-record buffers with
//! `MSG_ZEROCOPY`, keeping each until its completion. (kTLS, which could
//! encrypt in the kernel, is neither used by Ferry's own record layer nor
//! available on the hosts measured here.)

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::Ctx;
use crate::error::MigrationError;
use crate::net::{check_memlock, memlock_limit, memlock_need, Channel, ZC_WINDOW};

/// Refuses when the locked-memory limit is too small for `streams`, then
/// sets `SO_ZEROCOPY` on each; a connection whose kernel refuses it sends
/// with copies, and the status says why.
pub(super) fn enable(ctx: &Ctx, streams: &[Arc<Channel>]) -> Result<(), MigrationError> {
    let zc = &ctx.stats.zero_copy;
    zc.requested.store(true, Relaxed);
    let n = streams.len() as u32;
    let limit = memlock_limit();
    check_memlock(limit, n)?;
    let mut refused = None;
    for s in streams {
        if let Err(e) = s.enable_zero_copy(zc, n) {
            refused = Some(e);
        }
    }
    if let Some(e) = refused {
        zc.note(format!(
            "the kernel refused SO_ZEROCOPY ({e}): RAM goes with copies on {} of {n} connections",
            n as u64 - zc.connections.load(Relaxed)
        ));
    } else if ctx.dial.tls.is_some() {
        zc.note(
            "TLS: the sealed records (ciphertext) go with MSG_ZEROCOPY, each buffer kept until \
             its completion; the plaintext is read from guest memory by the cipher (no kTLS)"
                .into(),
        );
    }
    log::info!(
        "zero-copy on {} of {n} data connections ({} in flight per connection, locked memory \
         needed {} bytes, RLIMIT_MEMLOCK {})",
        zc.connections.load(Relaxed),
        ZC_WINDOW,
        memlock_need(n),
        limit.map_or(
            "not applied (unlimited or CAP_IPC_LOCK)".into(),
            |l| format!("{l} bytes")
        )
    );
    Ok(())
}
