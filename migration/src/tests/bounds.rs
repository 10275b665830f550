//! Bounds against hostile or broken peers (issue #9, section 4): the
//! switch-over order (READY only after STATE; an ERROR that says the
//! destination discarded its VM unstarted resumes the source even after
//! COMMIT), the stall timer of `device_state = main`, and the destination's
//! one budget for device state in memory. A raw destination
//! ([`raw_dest`]) plays the hostile peer against the real source.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::hostile::raw_send;
use super::*;
use crate::api::*;
use crate::wire::{Frame, Header, Kind, HEADER_LEN};

const MIB: u64 = 1 << 20;

/// Reads one frame (header and payload) from a raw peer's connection;
/// `None` at EOF or on an error.
pub fn raw_frame(mut s: &TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).ok()?;
    let h = Header::decode(&b).ok()?;
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// Reads frames until one of `kind` (returned) or EOF (`None`).
pub fn raw_until(s: &TcpStream, kind: Kind) -> Option<Header> {
    loop {
        let (h, _) = raw_frame(s)?;
        if h.kind == kind {
            return Some(h);
        }
    }
}

/// A raw destination on a fresh port: accepts the main connection and
/// SETUP (then sends `early`, if any, on main) and the data connections
/// (each drained on its own thread), then runs `script` on the main
/// connection with the session id. The main connection is read to EOF
/// afterwards (the source's ABORT and close).
pub fn raw_dest(
    early: Option<Frame>,
    script: impl FnOnce(&TcpStream, u128) + Send + 'static,
) -> (u16, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let accept = || {
            let (s, _) = l.accept().unwrap();
            // No Nagle: a frame right behind OK must not wait for an ACK.
            s.set_nodelay(true).unwrap();
            let (h, _) = raw_frame(&s).unwrap();
            assert_eq!(h.kind, Kind::Hello);
            raw_send(&s, Header::new(Kind::Ok, h.session), &[]);
            (s, h)
        };
        let (main, hello) = accept();
        let (setup, _) = raw_frame(&main).unwrap();
        assert_eq!(setup.kind, Kind::Setup);
        raw_send(&main, Header::new(Kind::Ok, hello.session), &[]);
        if let Some(f) = early {
            raw_send(&main, f.header(hello.session), &[]);
        }
        let drains: Vec<_> = (0..hello.c)
            .map(|_| {
                let (s, _) = accept();
                std::thread::spawn(move || while raw_frame(&s).is_some() {})
            })
            .collect();
        script(&main, hello.session);
        while raw_frame(&main).is_some() {}
        for d in drains {
            let _ = d.join();
        }
    });
    (port, h)
}

/// A 1 MiB source with one device that does not pre-copy (its state goes
/// at the switch-over only, so a raw destination never has to ack it).
fn small_source() -> Arc<FakeSource> {
    let mut s = FakeSource::new(&[(0, MIB)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        "dev0",
        false,
        pattern(1, 3000),
        pattern(2, 2000),
    ))];
    fill(&s, 0, 5, 1);
    Arc::new(s)
}

fn send_to(src: &Arc<FakeSource>, port: u16) -> (Result<(), MigrationError>, MigrationStatus) {
    let stats = Arc::new(MigrationStats::default());
    let r = send(
        src.clone(),
        &params(port, 2),
        &stats,
        &CancelToken::default(),
    );
    (r, stats.snapshot())
}

fn assert_resumed_and_failed(src: &FakeSource, s: &MigrationStatus) {
    assert_source_running(src);
    assert_eq!(s.state, MigrationState::Failed);
    assert_eq!(s.source_vm, Some(SourceVmOutcome::Resumed));
}

/// READY before the source sent STATE is a protocol error: the source
/// fails and resumes at once (before the fix it took READY as given, wrote
/// COMMIT after STATE and ended "uncertain" with its VM paused).
#[test]
fn ready_before_state_is_a_protocol_error() {
    // READY goes out right after SETUP was accepted: it is on the main
    // connection before the source's reader starts.
    let (port, dest) = raw_dest(Some(Frame::Ready), |_, _| {});
    let src = small_source();
    let (r, s) = send_to(&src, port);
    let e = r.unwrap_err();
    assert!(
        matches!(e, MigrationError::Protocol(_)) && e.to_string().contains("READY"),
        "{e}"
    );
    assert!(e.to_string().contains("before STATE"), "{e}");
    assert_resumed_and_failed(&src, &s);
    dest.join().unwrap();
}

/// Plays the destination up to COMMIT, then answers with `reply` (an
/// ERROR frame) instead of starting the guest.
fn error_after_commit(reply: Frame) -> (Arc<FakeSource>, MigrationError, MigrationStatus) {
    let (port, dest) = raw_dest(None, move |main, session| {
        raw_until(main, Kind::State).unwrap();
        raw_send(main, Header::new(Kind::Ready, session), &[]);
        raw_until(main, Kind::Commit).unwrap();
        let msg = b"cancelled while waiting for COMMIT";
        raw_send(main, reply.header(session), msg);
    });
    let src = small_source();
    let (r, s) = send_to(&src, port);
    dest.join().unwrap();
    (src, r.unwrap_err(), s)
}

/// An ERROR after READY that says the destination discarded its VM
/// without starting it resumes the source even though COMMIT was written
/// (the two crossed on the wire): the migration failed, it is not
/// uncertain, and the source runs.
#[test]
fn discarded_after_commit_resumes_the_source() {
    let (src, e, s) = error_after_commit(Frame::Discarded { len: 34 });
    assert!(!e.is_commit_uncertain(), "{e}");
    assert!(matches!(e, MigrationError::Remote(_)), "{e}");
    assert!(e.to_string().contains("cancelled while waiting"), "{e}");
    assert_resumed_and_failed(&src, &s);
    assert!(s.error.unwrap().contains("cancelled while waiting"));
    assert_eq!(src.pauses.load(SeqCst), 1);
}

/// A plain ERROR after COMMIT (e.g. `start` failed: the guest may have run)
/// still leaves the source paused with an uncertain outcome.
#[test]
fn plain_error_after_commit_stays_uncertain() {
    let (src, e, s) = error_after_commit(Frame::Error { len: 34 });
    assert!(e.is_commit_uncertain(), "{e}");
    assert!(src.paused.load(SeqCst));
    assert_eq!(src.resumes.load(SeqCst), 0);
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Stop, "device {}", d.id);
    }
    assert_eq!(s.source_vm, Some(SourceVmOutcome::PausedUncertain));
}

/// The real destination, cancelled after READY while it waits for COMMIT,
/// discards its VM unstarted and says so: the source resumes and reports
/// the failure, whether it saw the ERROR before writing COMMIT or after.
#[test]
fn destination_failing_after_ready_resumes_the_source() {
    let src = source_with_device();
    let dest = start_dest(factory_for(&src));
    let dcancel = dest.cancel.clone();
    let stats = Arc::new(MigrationStats::default());
    let st = stats.clone();
    let s2 = src.clone();
    let port = dest.port;
    let r = std::thread::spawn(move || {
        crate::testhook::set(move |p, _| {
            if p == crate::testhook::Point::BeforeCommit {
                dcancel.cancel();
                // Let the destination fail and send its ERROR first.
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        });
        send(s2, &params(port, 2), &st, &CancelToken::default())
    })
    .join()
    .unwrap();
    let e = r.unwrap_err();
    assert!(!e.is_commit_uncertain(), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_resumed_and_failed(&src, &stats.snapshot());
    let re = rerr(dest.handle.join().unwrap());
    assert!(matches!(re, MigrationError::Cancelled), "{re}");
    let d = dest.factory.last();
    assert!(
        d.started.lock().unwrap().is_none(),
        "started without COMMIT"
    );
    assert!(d.discarded.load(SeqCst));
}
