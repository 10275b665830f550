//! Mutual TLS between two ferry processes (issue #9), witnessed by the
//! stamp guest: refused peers (a stranger CA, a subject the destination
//! does not allow, plain TCP) get a clear error in the source's
//! `vm.migration` while the armed receive goes on waiting, and the right
//! peer then migrates the guest, which checks every page it wrote.

use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use ferry_tests::*;

const GUEST: &str = "region=32 passes=0";

/// Sends with `body` and returns the source's final status, which must be
/// `failed` (and the source guest must still run).
fn refused_send(src: &Vmm, body: Value) -> Value {
    start_send(src, body);
    let s = expect_migration_end(src, &["failed", "cancelled"], MIGRATION_TIMEOUT);
    assert_eq!(mig_state(&s), "failed", "{s}");
    assert_eq!(src.state(), "running", "the source must run on: {s}");
    s
}

fn error_of(s: &Value) -> String {
    s["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn migrate_over_mutual_tls_refusing_strangers() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let ca = Pki::new("it");
    let stranger_ca = Pki::new("stranger");
    let dst_dir = ca.host("dst.ferry.test", &ca);
    let src_dir = ca.host("src.ferry.test", &ca);
    let intruder = ca.host("intruder.ferry.test", &ca);
    let stranger = stranger_ca.host("src.ferry.test", &stranger_ca);

    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive_with(
        &dst,
        port,
        json!({ "tls_dir": dst_dir, "tls_allowed_subjects": ["src.ferry.test"] }),
    );
    let body = |dir: Option<&str>| {
        let mut b = send_params(port, 4);
        match dir {
            Some(d) => {
                b["tls_dir"] = json!(d);
                b.as_object_mut().map(|o| o.remove("tls"));
            }
            None => b["tls"] = json!(false),
        }
        b
    };

    let s = refused_send(&src, body(Some(&stranger)));
    let e = error_of(&s);
    assert!(e.contains("not signed by the source's CA"), "{e}");
    assert_eq!(s["transport"], "tls", "{s}");

    let e = error_of(&refused_send(&src, body(Some(&intruder))));
    assert!(
        e.contains("intruder.ferry.test") && e.contains("not among"),
        "{e}"
    );

    let s = refused_send(&src, body(None));
    let e = error_of(&s);
    assert!(e.contains("requires TLS"), "{e}");
    assert_eq!(s["transport"], "tcp", "{s}");

    // ferry-remote refuses to guess the transport.
    let out = src.remote(&["send-migration", &tcp_url(port)]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-dir") && err.contains("--no-tls"),
        "{err}"
    );

    // The armed receive is still waiting: the right peer migrates, through
    // ferry-remote.
    assert_eq!(
        mig_state(&dst.migration_status().unwrap_or_default()),
        "active"
    );
    let out = src.remote(&[
        "send-migration",
        &tcp_url(port),
        "--tls-dir",
        &src_dir,
        "--connections",
        "4",
    ]);
    assert!(
        out.status.success(),
        "ferry-remote send-migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = finish_migration(&mut src, &dst, Some(recv));
    m.check_completed();
    assert_eq!(m.dest_status["transport"], "tls", "{}", m.dest_status);
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn a_flood_of_silent_and_trickling_peers_does_not_block_the_migration() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    // 200 connections that say nothing (more than the pending bound), and
    // 8 that trickle one byte of a HELLO header per second: the whole-
    // handshake deadline drops them, the bound drops the excess.
    let silent: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    let tricklers: Vec<_> = (0..8)
        .map(|_| {
            thread::spawn(move || {
                if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                    for b in migration::wire::MAGIC.to_le_bytes().iter().cycle().take(20) {
                        if s.write_all(&[*b]).is_err() {
                            break;
                        }
                        thread::sleep(Duration::from_secs(1));
                    }
                }
            })
        })
        .collect();
    let m = migrate_started(&mut src, &dst, port, recv);
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);
    drop(silent);
    for t in tricklers {
        let _ = t.join();
    }
}

/// Sends to an already armed receive on `port` and waits for completion.
fn migrate_started(
    src: &mut Vmm,
    dst: &Vmm,
    port: u16,
    recv: thread::JoinHandle<Result<ApiResponse, String>>,
) -> Migration {
    start_send(src, send_params(port, 4));
    finish_migration(src, dst, Some(recv))
}
