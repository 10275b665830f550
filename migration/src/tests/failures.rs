//! Refusal, cancel, peer death and timeouts: the source keeps running.

use std::net::TcpListener;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::hostile::{raw_reply, raw_send};
use super::*;
use crate::api::*;
use crate::wire::{Header, Kind, HEADER_LEN};

#[test]
fn destination_refuses_config() {
    let src = source_with_device();
    let mut f = factory_for(&src);
    f.refuse = Some("this host has no AVX-512".into());
    let mut p = params(0, 4);
    let (r, fin, stats) = migrate_refused(src.clone(), f, &mut p);
    let e = r.unwrap_err();
    assert!(matches!(e, MigrationError::Remote(_)), "{e:?}");
    assert!(e.to_string().contains("this host has no AVX-512"), "{e}");
    assert!(fin.factory.created.lock().unwrap().is_empty());
    assert_source_running(&src);
    // Dirty logging starts while the setup runs (its kernel cost then
    // overlaps the network's); refused, it is off again, stopped once.
    assert!(!src.logging.load(SeqCst), "dirty logging left on");
    assert!(src.stop_log_calls.load(SeqCst) <= 1);
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Failed);
    assert!(s.error.unwrap().contains("AVX-512"));
    // The receive went on waiting until cancelled.
    assert_eq!(fin.stats.snapshot().state, MigrationState::Cancelled);
}

#[test]
fn cancel_on_the_source() {
    for paused_phase in [false, true] {
        let src = source_with_device();
        let cancel = CancelToken::default();
        let c = cancel.clone();
        // Keep dirtying so that it never converges; cancel at fetch 3 (live)
        // or after the VM was paused (the final fetch).
        src.set_hook(move |s, n| {
            s.write(0, (n % 100) * 4096, &[n as u8; 64]);
            if (!paused_phase && n == 3) || (paused_phase && s.paused.load(SeqCst)) {
                c.cancel();
            }
        });
        let dest = start_dest(factory_for(&src));
        let mut p = params(dest.port, 4);
        p.downtime_ms = Some(if paused_phase { 100_000 } else { 0 });
        let stats = Arc::new(MigrationStats::default());
        let e = send(src.clone(), &p, &stats, &cancel).unwrap_err();
        assert!(matches!(e, MigrationError::Cancelled), "{e}");
        assert_eq!(stats.snapshot().state, MigrationState::Cancelled);
        assert_source_running(&src);
        let re = rerr(dest.handle.join().unwrap()).to_string();
        assert!(re.contains("cancelled"), "{re}");
        assert!(dest.factory.last().discarded.load(SeqCst));
    }
}

#[test]
fn cancel_on_the_destination() {
    let src = source_with_device();
    let dest = start_dest(factory_for(&src));
    let dc = dest.cancel.clone();
    src.set_hook(move |s, n| {
        s.write(0, (n % 100) * 4096, &[n as u8; 64]);
        if n == 3 {
            dc.cancel();
        }
    });
    let mut p = params(dest.port, 4);
    p.downtime_ms = Some(0);
    let e = send(
        src.clone(),
        &p,
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_source_running(&src);
    let re = rerr(dest.handle.join().unwrap());
    assert!(matches!(re, MigrationError::Cancelled), "{re}");
    assert_eq!(dest.stats.snapshot().state, MigrationState::Cancelled);
    assert!(dest.factory.last().discarded.load(SeqCst));
}

#[test]
fn destination_dies_mid_way() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    // A destination that accepts everything, reads a little data, then dies.
    let h = std::thread::spawn(move || {
        let accept = || {
            let (s, _) = l.accept().unwrap();
            let mut b = [0u8; HEADER_LEN];
            std::io::Read::read_exact(&mut &s, &mut b).unwrap();
            let h = Header::decode(&b).unwrap();
            raw_send(&s, Header::new(Kind::Ok, h.session), &[]);
            (s, h)
        };
        let (main, hello) = accept();
        let mut b = [0u8; HEADER_LEN];
        std::io::Read::read_exact(&mut &main, &mut b).unwrap();
        let setup = Header::decode(&b).unwrap();
        let mut p = vec![0u8; setup.len as usize];
        std::io::Read::read_exact(&mut &main, &mut p).unwrap();
        raw_send(&main, Header::new(Kind::Ok, hello.session), &[]);
        let data: Vec<_> = (0..hello.c).map(|_| accept().0).collect();
        let mut buf = vec![0u8; 300_000];
        std::io::Read::read_exact(&mut &data[0], &mut buf).unwrap();
        drop(data);
        drop(main);
    });
    let src = source_with_device();
    src.set_hook(|s, n| s.write(0, (n % 100) * 4096, &[n as u8; 64]));
    let mut p = params(port, 3);
    p.downtime_ms = Some(0);
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), &p, &stats, &CancelToken::default()).unwrap_err();
    assert!(
        matches!(e, MigrationError::PeerClosed(_) | MigrationError::Io { .. }),
        "{e:?}"
    );
    h.join().unwrap();
    assert_source_running(&src);
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
}

#[test]
fn overall_timeout_fails_and_resumes() {
    let src = source_with_device();
    let dest = start_dest(factory_for(&src));
    let mut p = params(dest.port, 2);
    p.max_bandwidth_mbps = Some(1.0); // 4 MiB at 1 MiB/s: longer than 1 s
    p.timeout_s = 1;
    let e = send(
        src.clone(),
        &p,
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap_err();
    assert!(matches!(e, MigrationError::Timeout(_)), "{e}");
    assert_source_running(&src);
    let re = rerr(dest.handle.join().unwrap()).to_string();
    assert!(re.contains("timed out"), "{re}");
}

#[test]
fn nothing_listening() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let src = source_with_device();
    let e = send(
        src.clone(),
        &params(port, 2),
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("connecting"), "{e}");
    assert_source_running(&src);
    let _ = raw_reply; // shared helper
}
