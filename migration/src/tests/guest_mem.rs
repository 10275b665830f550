//! The audited guest-memory module: bounds-checked access, volatile zero
//! scan, and scatter/gather lists that move exactly the bytes they describe.

use std::sync::Arc;

use super::*;
use crate::guest_mem::{Gather, GuestMemory, IoVecs, Scatter};
use crate::traits::SourceVm;

fn source() -> Arc<dyn SourceVm> {
    Arc::new(FakeSource::new(&[(0, 64 << 10), (1 << 20, 16 << 10)]))
}

#[test]
fn zero_scan_sees_every_byte_and_checks_bounds() {
    let fake = Arc::new(FakeSource::new(&[(0, 64 << 10), (1 << 20, 16 << 10)]));
    let vm: Arc<dyn SourceVm> = fake.clone();
    let mem = GuestMemory::of_source(&vm);
    assert_eq!(mem.layout(), vec![(0, 64 << 10), (1 << 20, 16 << 10)]);
    for p in 0..16 {
        assert!(mem.page_is_zero(0, p).unwrap());
    }
    // One non-zero byte anywhere in a page makes it non-zero.
    for (page, off) in [(1u64, 0u64), (2, 4095), (3, 513), (4, 2048 + 7)] {
        fake.write(0, page * 4096 + off, &[1]);
        assert!(
            !mem.page_is_zero(0, page).unwrap(),
            "page {page} byte {off}"
        );
        assert!(mem.page_is_zero(0, page + 8).unwrap());
    }
    fake.write(1, 3 * 4096 + 100, &[9]);
    assert!(!mem.page_is_zero(1, 3).unwrap());
    // Out of range: an internal error, never a wild access.
    for (r, p) in [(0usize, 16u64), (1, 4), (2, 0), (0, u64::MAX)] {
        let e = mem.page_is_zero(r, p).unwrap_err();
        assert!(matches!(e, MigrationError::Internal(_)), "{e:?}");
    }
    assert!(mem.zero_pages(0, 15, 2).is_err());
    mem.zero_pages(0, 1, 4).unwrap();
    for p in 1..5 {
        assert!(mem.page_is_zero(0, p).unwrap());
    }
}

#[test]
fn iovecs_cover_exactly_their_ranges() {
    let vm = source();
    let mem = GuestMemory::of_source(&vm);
    let head = [7u8; 10];
    let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(Vec::new());
    v.push_bytes(&head);
    v.push_bytes(&[]);
    v.push_guest(&mem, 0, 2, 3).unwrap();
    assert!(v.push_guest(&mem, 1, 3, 2).is_err());
    assert!(v.push_guest(&mem, 0, 0, u64::MAX).is_err());
    let (_, n) = v.pending(1024);
    assert_eq!(n, 2, "empty buffers are skipped, bad ranges not added");
    let (_, n) = v.pending(1);
    assert_eq!(n, 1);
    v.advance(4);
    v.advance(6 + 3 * 4096 - 1);
    assert!(!v.is_empty());
    v.advance(1);
    assert!(v.is_empty());
    let storage = v.into_storage();
    let mut s: IoVecs<'_, Scatter> = IoVecs::with_storage(storage);
    assert!(s.is_empty());
    s.push_guest_mut(&mem, 1, 0, 4).unwrap();
    assert!(s.push_guest_mut(&mem, 1, 1, 4).is_err());
    assert_eq!(s.pending(8).1, 1);
}
