//! Zero-copy send end to end on loopback (where the kernel copies every
//! zero-copy send and says so): the RAM arrives whole, every byte sent
//! zero-copy completed before the send returned, and the status splits
//! them into sent-from-our-pages and copied-by-the-kernel.

use std::sync::Arc;

use super::*;
use crate::api::*;

const MIB: u64 = 1 << 20;

/// Checks the zero-copy status of a completed send over `conns`.
pub(super) fn check_zero_copy_status(s: &MigrationStatus, conns: u32) -> ZeroCopyStatus {
    let z = s.zero_copy.clone().expect("zero_copy in the status");
    assert_eq!(z.connections, conns, "{z:?}");
    assert!(z.sent_bytes > 0, "{z:?}");
    assert_eq!(z.in_flight_bytes, 0, "completions outstanding: {z:?}");
    assert_eq!(z.zero_copy_bytes + z.copied_bytes, z.sent_bytes, "{z:?}");
    assert!(z.notifications > 0, "{z:?}");
    z
}

#[test]
fn zero_copy_over_four_connections_with_pages_rewritten_between_passes() {
    let src = Arc::new(FakeSource::new(&[(0, 32 * MIB), (64 * MIB, 8 * MIB)]));
    fill(&src, 0, 5, 1);
    fill(&src, 1, 9, 2);
    src.set_hook(|s, n| {
        if n <= 4 {
            for p in (0..8192u64).step_by(3 + n as usize) {
                s.write(0, p * 4096, &pattern(n as u8 * 31, 4096));
            }
        }
    });
    let mut p = params(0, 4);
    p.zero_copy = true;
    p.downtime_ms = Some(0);
    let (r, rr, dest, stats) = migrate_with(src.clone(), FakeFactory::new(src.layout()), &mut p);
    r.unwrap();
    rr.unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed);
    let z = check_zero_copy_status(&s, 4);
    // Only page data goes zero-copy: never more than the RAM on the wire.
    assert!(
        z.sent_bytes <= s.transferred_bytes,
        "{z:?} vs {}",
        s.transferred_bytes
    );
    assert!(z.note.is_none(), "{z:?}");
}

#[test]
fn without_zero_copy_the_status_has_no_zero_copy_part() {
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 1, 1);
    let mut p = params(0, 2);
    let (r, rr, dest, stats) = migrate_with(src.clone(), FakeFactory::new(src.layout()), &mut p);
    r.unwrap();
    rr.unwrap();
    assert_same_ram(&src, &dest.factory.last());
    assert!(stats.snapshot().zero_copy.is_none());
}

/// A cancel in the middle of a zero-copy send: the source runs on, and
/// nothing waits for completions that an aborted connection never gives.
#[test]
fn zero_copy_send_cancelled_in_the_middle() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB)]));
    fill(&src, 0, 2, 1);
    let cancel = CancelToken::default();
    let c = cancel.clone();
    src.set_hook(move |s, n| {
        s.write(0, (n % 100) * 4096, &[n as u8; 64]);
        if n == 3 {
            c.cancel();
        }
    });
    let dest = start_dest(FakeFactory::new(src.layout()));
    let mut p = params(dest.port, 4);
    p.zero_copy = true;
    p.downtime_ms = Some(0);
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), &p, &stats, &cancel).unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert_eq!(stats.snapshot().state, MigrationState::Cancelled);
    assert_source_running(&src);
    let _ = dest.handle.join();
}
