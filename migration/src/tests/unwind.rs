//! Unwinding: a worker that panics fails the migration with the panic's
//! message, and a panic on the thread running `send` still undoes dirty
//! logging, the pause and the devices (the phases' guards).

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::*;

#[test]
fn panicking_worker_fails_the_migration_with_its_message() {
    let src = source_with_device();
    src.devices[0].panic_in_info.store(true, SeqCst);
    let dest = start_dest(factory_for(&src));
    let p = params(dest.port, 2);
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), &p, &stats, &CancelToken::default()).unwrap_err();
    assert!(matches!(e, MigrationError::Internal(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("mig-save-0 panicked: fake device exploded"),
        "{msg}"
    );
    assert!(!msg.contains("protocol"), "{msg}");
    assert_source_running(&src);
    assert_eq!(src.stop_log_calls.load(SeqCst), 1);
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Failed);
    assert_eq!(s.source_vm, Some(SourceVmOutcome::Resumed));
    // The destination fails too. Its message is the source's ABORT reason
    // (the panic) or, when the data connections' shutdown reaches it before
    // the ABORT frame, its own view of that shutdown: both are failures.
    let re = rerr(dest.handle.join().unwrap()).to_string();
    assert!(
        re.contains("fake device exploded") || re.contains("ended before pass"),
        "{re}"
    );
    assert!(dest.factory.last().discarded.load(SeqCst));
}

#[test]
fn panic_while_paused_resumes_the_source() {
    let src = source_with_device();
    // Panics inside fetch_dirty on the sending thread, once the VM is
    // paused (the final pass).
    src.set_hook(|s, _| {
        if s.paused.load(SeqCst) {
            panic!("backend exploded while paused");
        }
    });
    let dest = start_dest(factory_for(&src));
    let p = params(dest.port, 2);
    let stats = Arc::new(MigrationStats::default());
    let s2 = src.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        send(s2, &p, &stats, &CancelToken::default())
    }));
    assert!(r.is_err(), "the panic propagates to the caller");
    assert_eq!(src.pauses.load(SeqCst), 1);
    assert_source_running(&src);
    assert_eq!(src.stop_log_calls.load(SeqCst), 1);
    let re = rerr(dest.handle.join().unwrap());
    assert!(!matches!(re, MigrationError::Internal(_)), "{re:?}");
    assert!(dest.factory.last().discarded.load(SeqCst));
}
