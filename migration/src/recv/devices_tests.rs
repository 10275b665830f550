//! Unit tests of the destination's device reorder buffers, budget and
//! payload-buffer cache.

use std::sync::mpsc::channel;

use super::*;
use crate::api::CancelToken;
use crate::tests::{pattern, FakeDevice};

const MIB: u64 = 1 << 20;

fn inbox(n: usize, bound: u64) -> (Arc<DeviceInbox>, Vec<Arc<FakeDevice>>) {
    let devs: Vec<Arc<FakeDevice>> = (0..n)
        .map(|i| Arc::new(FakeDevice::new(&format!("d{i}"), true, vec![], vec![])))
        .collect();
    let ctl = Ctl::new(CancelToken::default(), Duration::from_secs(2));
    let (tx, _) = channel();
    let inbox = DeviceInbox::new(
        devs.iter()
            .map(|d| d.clone() as Arc<dyn MigratableDevice>)
            .collect(),
        (0..n)
            .map(|_| Arc::new(DeviceCounters::default()))
            .collect(),
        bound,
        ctl,
        tx,
        Arc::new(Notify::default()),
    );
    (inbox, devs)
}

fn put(inbox: &Arc<DeviceInbox>, dev: usize, seq: u64, kind: DevItemKind, data: Vec<u8>) {
    let mut t = inbox
        .admit(dev, seq, kind, data.len() as u64, false)
        .unwrap();
    t.payload_mut().copy_from_slice(&data);
    inbox.deliver(t).unwrap();
}

/// Two devices' streams of 1 MiB chunks from four "connections" (each
/// in its own order, like the source's per-connection FIFOs) under a
/// 32 MiB budget: everything loads, in order, and the memory held never
/// exceeded the budget.
#[test]
fn one_budget_for_all_devices_and_readers() {
    let (inbox, devs) = inbox(2, 32 * MIB);
    let chunks = 48u64;
    let readers: Vec<_> = (0..4u64)
        .map(|r| {
            let inbox = inbox.clone();
            std::thread::spawn(move || {
                for seq in (0..chunks).filter(|s| s % 4 == r) {
                    for dev in 0..2 {
                        let data = pattern((seq + dev as u64) as u8, MIB as usize);
                        put(&inbox, dev, seq, DevItemKind::PrecopyData, data);
                    }
                }
            })
        })
        .collect();
    for r in readers {
        r.join().unwrap();
    }
    for dev in 0..2 {
        put(&inbox, dev, chunks, DevItemKind::End, vec![]);
    }
    while !inbox.all_done() {
        inbox.ctl.check().unwrap();
        std::thread::sleep(Duration::from_millis(10));
    }
    inbox.join();
    for (dev, d) in devs.iter().enumerate() {
        let want: Vec<u8> = (0..chunks)
            .flat_map(|seq| pattern((seq + dev as u64) as u8, MIB as usize))
            .collect();
        assert!(*d.loaded.lock().unwrap() == Some(want), "device {dev}");
    }
    let peak = inbox.peak_bytes();
    assert!(peak > 0 && peak <= 32 * MIB, "peak {peak}");
    assert_eq!(lock(&inbox.budget).used, 0, "budget given back");
}

/// A peer that sends only chunks a device cannot apply yet (its chunk 0
/// never comes) fills the budget's ordinary part and then gets a
/// protocol error naming the budget; nothing beyond it was taken.
#[test]
fn chunks_that_cannot_be_applied_exhaust_the_budget_with_a_clear_error() {
    let (inbox, _devs) = inbox(1, 32 * MIB);
    let mut err = None;
    for seq in 1..=40 {
        match inbox.admit(0, seq, DevItemKind::PrecopyData, MIB, false) {
            Ok(mut t) => {
                t.payload_mut().fill(7);
                inbox.deliver(t).unwrap()
            }
            Err(e) => {
                err = Some((seq, e));
                break;
            }
        }
    }
    let (seq, e) = err.expect("the budget never ran out");
    assert_eq!(seq, 17, "16 MiB admitted (32 MiB less the headroom)");
    let m = e.to_string();
    assert!(
        matches!(e, MigrationError::Protocol(_))
            && m.contains("budget of 33554432 bytes")
            && m.contains("d0")
            && m.contains("needs chunk 0"),
        "{m}"
    );
    assert_eq!(inbox.peak_bytes(), 16 * MIB);
    // The item the device needs next is still admitted (headroom).
    let t = inbox
        .admit(0, 0, DevItemKind::PrecopyData, MIB, false)
        .unwrap();
    drop(t);
    assert_eq!(
        lock(&inbox.budget).used,
        16 * MIB,
        "an unused admission is given back"
    );
    inbox.ctl.fail(MigrationError::Aborted);
    inbox.join();
}

/// On the main connection (`device_state = main`) items come in order.
#[test]
fn main_connection_items_must_be_in_order() {
    let (inbox, _devs) = inbox(1, 32 * MIB);
    let e = inbox
        .admit(0, 3, DevItemKind::PrecopyData, 10, true)
        .err()
        .unwrap();
    assert!(e.to_string().contains("out of order"), "{e}");
    inbox.ctl.fail(MigrationError::Aborted);
    inbox.join();
}

/// `used + cached` of the budget, and `cached`.
fn held(inbox: &DeviceInbox) -> (u64, u64) {
    let b = lock(&inbox.budget);
    (b.used + b.cached, b.cached)
}

/// Admits, fills and delivers chunk `seq` of device 0 (`len` bytes of
/// `seq`'s pattern); returns the address of the buffer it was read into.
fn put_at(inbox: &Arc<DeviceInbox>, seq: u64, len: u64) -> usize {
    let mut t = inbox
        .admit(0, seq, DevItemKind::PrecopyData, len, false)
        .unwrap();
    let p = t.payload_mut();
    assert_eq!(p.len() as u64, len);
    p.copy_from_slice(&pattern(seq as u8, len as usize));
    let at = p.as_ptr() as usize;
    inbox.deliver(t).unwrap();
    at
}

/// Chunks applied one after another reuse the same payload buffers (no
/// allocation per chunk), the device still gets exactly what was sent, and
/// the cached buffers count against the budget.
#[test]
fn payload_buffers_are_reused_within_the_budget() {
    let (inbox, devs) = inbox(1, 32 * MIB);
    let mut seen = std::collections::HashSet::new();
    let mut fresh = 0;
    for seq in 0..20 {
        if seen.insert(put_at(&inbox, seq, MIB)) {
            fresh += 1;
        }
        inbox.wait_applied(0).unwrap();
        let (total, cached) = held(&inbox);
        assert!(total <= 32 * MIB && cached >= MIB, "{total} {cached}");
    }
    assert!(fresh <= 2, "{fresh} buffers allocated for 20 chunks");
    put_at(&inbox, 20, MIB / 2);
    let mut t = inbox.admit(0, 21, DevItemKind::End, 0, false).unwrap();
    assert!(t.payload_mut().is_empty());
    inbox.deliver(t).unwrap();
    while !inbox.all_done() {
        inbox.ctl.check().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    inbox.join();
    let mut want: Vec<u8> = (0..20)
        .flat_map(|seq| pattern(seq as u8, MIB as usize))
        .collect();
    want.extend(pattern(20, (MIB / 2) as usize));
    assert!(*devs[0].loaded.lock().unwrap() == Some(want));
    assert_eq!(lock(&inbox.budget).used, 0);
}

/// A small chunk never takes a large cached buffer: it gets one of its own
/// size, so the memory an item holds stays near the budget it was charged.
#[test]
fn a_small_chunk_never_takes_a_large_buffer() {
    let (inbox, _devs) = inbox(1, 32 * MIB);
    put_at(&inbox, 0, MIB);
    inbox.wait_applied(0).unwrap();
    assert_eq!(held(&inbox).1, MIB, "the applied chunk's buffer is cached");
    let mut t = inbox
        .admit(0, 5, DevItemKind::PrecopyData, 1000, false)
        .unwrap();
    assert_eq!(t.payload_mut().len(), 1000);
    assert!(t.buf.capacity() < 2000, "{}", t.buf.capacity());
    assert_eq!(held(&inbox).1, MIB, "the large buffer stays in the cache");
    drop(t);
    inbox.ctl.fail(MigrationError::Aborted);
    inbox.join();
}

/// Cached buffers never crowd out an admission: chunks the cache cannot
/// serve (another size) evict cached buffers, and `used + cached` never
/// exceeds the bound; the ordinary part of the budget still admits exactly
/// as much as without a cache.
#[test]
fn cached_buffers_are_evicted_for_admissions() {
    let (inbox, _devs) = inbox(1, 32 * MIB);
    // 24 chunks in order, then all applied: as many 1 MiB buffers cached
    // as were in flight at once (at least one; how many depends on how fast
    // the load thread ran).
    for seq in 0..24 {
        put_at(&inbox, seq, MIB);
    }
    inbox.wait_applied(0).unwrap();
    let (_, cached) = held(&inbox);
    assert!(cached >= MIB, "{cached} cached");
    // Chunks of 600 KiB that cannot be applied (24 never comes): no
    // cached 1 MiB buffer fits them, so the cache makes room.
    let len = 600 << 10;
    let mut n = 0;
    loop {
        let seq = 25 + n;
        match inbox.admit(0, seq, DevItemKind::PrecopyData, len, false) {
            Ok(t) => inbox.deliver(t).unwrap(),
            Err(e) => {
                assert!(e.to_string().contains("budget"), "{e}");
                break;
            }
        }
        n += 1;
        let (total, _) = held(&inbox);
        assert!(total <= 32 * MIB, "{total} held after {n} chunks");
    }
    assert_eq!(n, 16 * MIB / len, "the ordinary part admits as before");
    inbox.ctl.fail(MigrationError::Aborted);
    inbox.join();
}
