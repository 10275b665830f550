//! The READY/COMMIT switch-over handshake: a broken main connection before
//! COMMIT resumes the source and discards the destination; after COMMIT the
//! source stays paused with an uncertain outcome; cancel after COMMIT is
//! ignored. Faults are injected at exact points with `testhook`.

use std::net::{Shutdown, TcpListener};

use crate::net::Sock;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::hostile::{raw_reply_skip, raw_send, RawSource};
use super::*;
use crate::api::*;
use crate::testhook::{self, Point};
use crate::wire::{DevItemKind, Kind, RangeEntry};

const MIB: u64 = 1 << 20;

fn factory() -> FakeFactory {
    let f = FakeFactory::new(vec![(0, 4 * MIB)]);
    *f.devices.lock().unwrap() = vec![Arc::new(FakeDevice::new("dev0", true, vec![], vec![]))];
    f
}

/// Like `start_dest`, with `hook` installed on the receiver's thread.
fn start_dest_hooked(f: FakeFactory, hook: impl Fn(Point, &Sock) + Send + 'static) -> Dest {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let factory = Arc::new(f);
    let stats = Arc::new(MigrationStats::default());
    let cancel = CancelToken::default();
    let (f, s, c) = (factory.clone(), stats.clone(), cancel.clone());
    let handle = std::thread::spawn(move || {
        testhook::set(hook);
        let p = ReceiveParams {
            receiver_url: "tcp:127.0.0.1:0".into(),
            device_buffer_bytes: None,
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        };
        receive(l, &*f, &p, &s, &c)
    });
    Dest {
        port,
        factory,
        stats,
        cancel,
        handle,
    }
}

/// Runs a send on a fresh thread with `hook` installed there.
fn send_hooked(
    src: Arc<FakeSource>,
    port: u16,
    cancel: CancelToken,
    hook: impl Fn(Point, &Sock) + Send + 'static,
) -> (Result<(), MigrationError>, Arc<MigrationStats>) {
    let stats = Arc::new(MigrationStats::default());
    let st = stats.clone();
    let r = std::thread::spawn(move || {
        testhook::set(hook);
        send(src, &params(port, 2), &st, &cancel)
    })
    .join()
    .unwrap();
    (r, stats)
}

fn assert_source_resumed(src: &FakeSource, stats: &MigrationStats) {
    assert!(!src.paused.load(SeqCst), "source VM paused");
    assert_eq!(src.pauses.load(SeqCst), src.resumes.load(SeqCst));
    assert!(!src.logging.load(SeqCst));
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Running, "device {}", d.id);
    }
    assert_eq!(stats.snapshot().source_vm, Some(SourceVmOutcome::Resumed));
}

fn assert_dest_discarded_unstarted(dest: &FakeDest) {
    assert!(
        dest.restored.lock().unwrap().is_some(),
        "state was restored before READY"
    );
    assert!(
        dest.started.lock().unwrap().is_none(),
        "VM started without COMMIT"
    );
    assert!(dest.discarded.load(SeqCst));
}

#[test]
fn cut_between_ready_and_commit_resumes_the_source_with_device() {
    let src = source_with_device();
    let dest = start_dest(factory());
    let (r, stats) = send_hooked(src.clone(), dest.port, CancelToken::default(), |p, s| {
        if p == Point::BeforeCommit {
            let _ = s.shutdown(Shutdown::Both);
        }
    });
    let e = r.unwrap_err();
    assert!(!e.is_commit_uncertain(), "{e}");
    assert_source_resumed(&src, &stats);
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
    let re = rerr(dest.handle.join().unwrap());
    assert!(
        matches!(
            re,
            MigrationError::PeerClosed(_) | MigrationError::Io { .. }
        ),
        "{re}"
    );
    assert_dest_discarded_unstarted(&dest.factory.last());
    assert_eq!(dest.stats.snapshot().state, MigrationState::Failed);
}

#[test]
fn cancel_before_commit_resumes_the_source_with_device() {
    let src = source_with_device();
    let dest = start_dest(factory());
    let cancel = CancelToken::default();
    let c = cancel.clone();
    let (r, stats) = send_hooked(src.clone(), dest.port, cancel, move |p, _| {
        if p == Point::BeforeCommit {
            c.cancel();
        }
    });
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    assert_eq!(stats.snapshot().state, MigrationState::Cancelled);
    assert_source_resumed(&src, &stats);
    let re = rerr(dest.handle.join().unwrap());
    assert!(re.to_string().contains("cancelled"), "{re}");
    assert_dest_discarded_unstarted(&dest.factory.last());
}

#[test]
fn cancel_after_commit_is_ignored() {
    let src = source_with_device();
    let dest = start_dest(factory());
    let cancel = CancelToken::default();
    let c = cancel.clone();
    let (r, stats) = send_hooked(src.clone(), dest.port, cancel, move |p, _| {
        if p == Point::AfterCommit {
            c.cancel();
        }
    });
    r.unwrap();
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed);
    assert_eq!(s.source_vm, Some(SourceVmOutcome::Migrated));
    assert!(s.downtime_ms.is_some());
    assert!(src.paused.load(SeqCst));
    assert_eq!(src.resumes.load(SeqCst), 0);
    assert!(dest.handle.join().unwrap().is_ok());
    let d = dest.factory.last();
    assert_eq!(*d.started.lock().unwrap(), Some(false));
    assert!(!d.discarded.load(SeqCst));
    assert_same_ram(&src, &d);
}

#[test]
fn cut_after_commit_leaves_the_source_paused() {
    let src = source_with_device();
    // The destination starts the VM, then loses the main connection before
    // RESUMED gets out.
    let dest = start_dest_hooked(factory(), |p, s| {
        if p == Point::BeforeResumed {
            let _ = s.shutdown(Shutdown::Both);
        }
    });
    let stats = Arc::new(MigrationStats::default());
    let e = send(
        src.clone(),
        &params(dest.port, 2),
        &stats,
        &CancelToken::default(),
    )
    .unwrap_err();
    assert!(e.is_commit_uncertain(), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("uncertain") && text.contains("left paused"),
        "{text}"
    );
    // Never resumed here: the guest runs on the destination.
    assert!(src.paused.load(SeqCst), "source VM resumed after COMMIT");
    assert_eq!(src.pauses.load(SeqCst), 1);
    assert_eq!(src.resumes.load(SeqCst), 0);
    assert!(!src.logging.load(SeqCst), "dirty logging still on");
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Stop, "device {}", d.id);
    }
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Failed);
    assert_eq!(s.source_vm, Some(SourceVmOutcome::PausedUncertain));
    assert!(s.error.unwrap().contains("uncertain"));
    let json = serde_json::to_value(stats.snapshot()).unwrap();
    assert_eq!(json["source_vm"], "paused_uncertain");
    // The destination runs the guest.
    assert!(dest.handle.join().unwrap().is_ok());
    let d = dest.factory.last();
    assert_eq!(*d.started.lock().unwrap(), Some(false));
    assert!(!d.discarded.load(SeqCst));
    assert_same_ram(&src, &d);
}

#[test]
fn destination_ignores_cancel_after_commit() {
    let src = source_with_device();
    let dc = Arc::new(Mutex::new(None::<CancelToken>));
    let d2 = dc.clone();
    let dest = start_dest_hooked(factory(), move |p, _| {
        if p == Point::BeforeResumed {
            if let Some(c) = &*d2.lock().unwrap() {
                c.cancel();
            }
        }
    });
    *dc.lock().unwrap() = Some(dest.cancel.clone());
    let stats = Arc::new(MigrationStats::default());
    send(
        src.clone(),
        &params(dest.port, 2),
        &stats,
        &CancelToken::default(),
    )
    .unwrap();
    assert_eq!(stats.snapshot().source_vm, Some(SourceVmOutcome::Migrated));
    assert!(dest.handle.join().unwrap().is_ok());
    assert_eq!(dest.stats.snapshot().state, MigrationState::Completed);
    assert!(!dest.factory.last().discarded.load(SeqCst));
}

/// A raw source that dies after READY: the destination never starts the VM.
#[test]
fn source_gone_after_ready_destination_discards() {
    let dest = start_dest(FakeFactory::new(vec![(0, MIB)]));
    let rs = RawSource::start(
        dest.port,
        2,
        &[(0, MIB)],
        &[],
        DeviceStateMode::Channels,
        4096,
    );
    rs.ram(
        0,
        1,
        &[RangeEntry {
            gpa: 0,
            npages: 1,
            flags: 0,
        }],
        &pattern(3, 4096),
    );
    rs.sync_all(1);
    raw_send(
        &rs.main,
        rs.h(Kind::State).args(1, 0, crate::net::epoch_us()),
        b"state",
    );
    assert_eq!(raw_reply_skip(&rs.main).unwrap().kind, Kind::Ready);
    drop(rs);
    let e = rerr(dest.handle.join().unwrap());
    assert!(
        matches!(e, MigrationError::PeerClosed(_) | MigrationError::Io { .. }),
        "{e}"
    );
    assert_dest_discarded_unstarted(&dest.factory.last());
}

/// COMMIT out of order (before STATE/READY) is a protocol error.
#[test]
fn early_commit_is_refused() {
    let dest = start_dest(FakeFactory::new(vec![(0, MIB)]));
    let rs = RawSource::start(
        dest.port,
        1,
        &[(0, MIB)],
        &[],
        DeviceStateMode::Channels,
        4096,
    );
    raw_send(&rs.main, rs.h(Kind::Commit), &[]);
    let e = rerr(dest.handle.join().unwrap()).to_string();
    assert!(e.contains("unexpected Commit"), "{e}");
    assert!(rs.main_error().contains("unexpected Commit"));
    assert!(dest.factory.last().started.lock().unwrap().is_none());
}

/// The destination reports device load rates on the main connection while
/// the device loads (RATE: device index, bytes/s, bytes loaded).
#[test]
fn destination_reports_device_load_rates() {
    let f = FakeFactory::new(vec![(0, MIB)]);
    *f.devices.lock().unwrap() = vec![Arc::new(FakeDevice::new("d0", true, vec![], vec![]))];
    let dest = start_dest(f);
    let rs = RawSource::start(
        dest.port,
        1,
        &[(0, MIB)],
        &["d0"],
        DeviceStateMode::Channels,
        MIB,
    );
    for seq in 0..8 {
        rs.device(
            0,
            0,
            seq,
            DevItemKind::PrecopyData,
            &pattern(seq as u8, MIB as usize),
        );
    }
    let h = loop {
        let h = super::hostile::raw_reply(&rs.main).unwrap();
        if h.kind == Kind::Rate {
            break h;
        }
        assert!(matches!(h.kind, Kind::Keepalive | Kind::HostLoad), "{h:?}");
    };
    assert_eq!(h.a, 0);
    assert!(h.b > 0);
    assert!(h.c > 0 && h.c <= 8 * MIB, "{h:?}");
    dest.cancel.cancel();
    let _ = dest.handle.join().unwrap();
}
