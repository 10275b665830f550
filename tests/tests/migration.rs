//! Live migration tests (issue #3).
//!
//! Every test runs the stamp guest, which rewrites a region and checks, page
//! by page, that it still holds what the previous pass wrote: a page lost or
//! stale after migration shows up as `stamp: MISMATCH`. The concatenated
//! serial output of all hosts the guest ran on must read as one run with
//! passes numbered 1, 2, 3, ... ([`check_stream`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::Duration;

use ferry_tests::*;
use migration::wire::{Header, Kind, HEADER_LEN, ROLE_DATA, ROLE_MAIN};

/// Boots a source guest running forever and waits for its first passes.
fn boot_source(name: &str, cmdline: &str, extra: &[&str]) -> Vmm {
    let vm = Vmm::boot(name, cmdline, extra);
    vm.wait_pass(2);
    vm
}

/// The guest of most tests: a 32 MiB region rewritten forever.
const GUEST: &str = "region=32 passes=0";

fn basic_migration(connections: u32) {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let m = migrate_and_check(&mut src, &dst, send_params(0, connections), &[]);
    assert!(
        m.dest_status["transferred_bytes"].as_u64().unwrap_or(0) > 0,
        "{}",
        m.dest_status
    );
    assert!(!src.sock.exists(), "source API socket not removed on exit");
    assert_eq!(src.serial.boot(), Some((512, 32)));
    assert_eq!(
        dst.serial.boot(),
        None,
        "the guest must not reboot on the destination"
    );
}

#[test]
fn migrate_1_connection() {
    basic_migration(1);
}

#[test]
fn migrate_2_connections() {
    basic_migration(2);
}

#[test]
fn migrate_4_connections() {
    basic_migration(4);
}

#[test]
fn migrate_8_connections() {
    basic_migration(8);
}

#[test]
fn migrate_two_vcpus_shared_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(
        GUEST,
        &["--cpus", "boot=2", "--memory", "size=512M,shared=on"],
        2,
    );
    migrate_and_check(&mut src, &dst, send_params(0, 4), &[]);
    let info = dst.info();
    assert!(!info["vcpus"].is_null(), "{}", info);
}

#[test]
fn migrate_with_ferry_remote() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let url = tcp_url(port);
    let out = dst.remote(&["receive-migration", &url, "--no-tls"]);
    assert!(
        out.status.success(),
        "ferry-remote receive-migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        poll(LONG, || tcp_listening(port).then_some(())).is_some(),
        "destination not listening"
    );
    let out = src.remote(&[
        "send-migration",
        &url,
        "--connections",
        "2",
        "--downtime-ms",
        "300",
        "--device-state",
        "channels",
        "--no-tls",
        "--wait",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ferry-remote send-migration --wait: {}\n{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not JSON ({}): {:?}", e, stdout));
    assert_eq!(mig_state(&v), "completed", "{}", v);
    end_migrated_source(&mut src);
    let out = dst.remote(&["migration-status"]);
    assert!(out.status.success());
    let v: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("JSON");
    assert_eq!(mig_state(&v), "completed", "{}", v);
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn paused_vm_stays_paused_on_destination() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    src.api_ok("PUT", "vm.pause", None);
    thread::sleep(Duration::from_millis(300));
    let paused_at = src.serial.last_pass().unwrap();
    // Checked in two steps: the guest only moves on once resumed.
    migrate(&mut src, &dst, send_params(0, 4)).check_completed();
    assert_eq!(
        dst.state(),
        "paused",
        "a paused VM must stay paused on the destination"
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dst.serial.passes(),
        Vec::<u64>::new(),
        "the paused guest ran on the destination"
    );
    assert_eq!(dst.state(), "paused");
    let passes = check_stream(&[&src.serial, &dst.serial]);
    assert_eq!(passes.last().copied(), Some(paused_at));

    dst.api_ok("PUT", "vm.resume", None);
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn migrate_back_and_forth() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut a, mut b) = start_pair(GUEST, &[], 2);
    migrate_and_check(&mut a, &b, send_params(0, 4), &[]);

    let a2 = Vmm::destination("a2", &[]);
    migrate_and_check(&mut b, &a2, send_params(0, 2), &[&a.serial]);
}

/// A source with a big dirty region, so a bandwidth-capped migration runs
/// long, and an empty destination.
fn start_big_pair() -> (Vmm, Vmm) {
    start_pair("region=512 passes=0", &["--memory", "size=1G"], 1)
}

fn slow_params(port: u16) -> Value {
    let mut p = send_params(port, 4);
    p["max_bandwidth_mbps"] = json!(20);
    p
}

#[test]
fn cancel_midway_then_migrate_again() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_big_pair();
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    start_send(&src, slow_params(port));
    wait_transfer_started(&src);

    // A second migration while one runs is a state conflict.
    let (st, body) = src.api(
        "PUT",
        "vm.send-migration",
        Some(slow_params(free_tcp_port())),
    );
    assert_eq!(st, 409, "second send-migration while active: {}", body);

    src.api_ok("PUT", "vm.migration-cancel", None);
    let s = expect_migration_end(&src, &["cancelled"], LONG);
    assert_eq!(mig_state(&s), "cancelled");
    assert_guest_runs(&src, 1);

    // The destination notices and can receive again.
    let d = wait_migration_state(&dst, &["failed", "cancelled"], LONG);
    assert!(
        d["error"].is_string() || mig_state(&d) == "cancelled",
        "{}",
        d
    );
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);

    let mut p = send_params(0, 4);
    p["downtime_ms"] = json!(500);
    migrate_and_check(&mut src, &dst, p, &[]);
}

#[test]
fn destination_killed_midway() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, mut dst) = start_big_pair();
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    start_send(&src, slow_params(port));
    wait_transfer_started(&src);
    dst.kill();

    let s = expect_migration_end(&src, &["failed"], Duration::from_secs(120));
    let err = s["error"].as_str().unwrap_or("");
    assert!(!err.is_empty(), "a failed migration must say why: {}", s);
    assert_guest_runs(&src, 1);

    // And it can still migrate somewhere else.
    let dst2 = Vmm::destination("dst2", &[]);
    migrate_and_check(&mut src, &dst2, send_params(0, 4), &[]);
}

#[test]
fn source_killed_midway() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_big_pair();
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    start_send(&src, slow_params(port));
    wait_transfer_started(&src);
    src.kill();

    let d = wait_migration_state(&dst, &["failed"], Duration::from_secs(120));
    assert!(
        !d["error"].as_str().unwrap_or("").is_empty(),
        "a failed migration must say why: {}",
        d
    );
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);
    assert_eq!(
        dst.serial.passes(),
        Vec::<u64>::new(),
        "no guest may run after a failed receive"
    );

    // It accepts a new migration.
    let mut src2 = boot_source("src2", GUEST, &[]);
    migrate_and_check(&mut src2, &dst, send_params(0, 4), &[]);
}

fn garbage_connection(port: u16, bytes: &[u8]) {
    if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
        s.set_write_timeout(Some(Duration::from_secs(10))).ok();
        let _ = s.write_all(bytes);
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn receiver_refuses_garbage_and_stays_usable() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let mut port = free_tcp_port();
    let mut recv = Some(start_receive(&dst, port));

    let mut wrong_magic = Vec::new();
    wrong_magic.extend_from_slice(b"FERRYMIG");
    wrong_magic.extend_from_slice(&[0xff; 56]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random_bytes(64 << 10)),
        ("zeros", vec![0u8; 4096]),
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("a wrong magic", wrong_magic),
        ("nothing", Vec::new()),
        ("a huge length", [0x7fu8; 64].to_vec()),
        ("a wrong protocol version", {
            let mut h = Header::new(Kind::Hello, 42).args(ROLE_MAIN, 0, 1).encode();
            h[4] = 99;
            h.to_vec()
        }),
        (
            "a data connection of no session",
            Header::new(Kind::Hello, 0xdead)
                .args(ROLE_DATA, 0, 4)
                .encode()
                .to_vec(),
        ),
        (
            "a main HELLO, then silence",
            Header::new(Kind::Hello, 0xbeef)
                .args(ROLE_MAIN, 0, 1)
                .encode()
                .to_vec(),
        ),
        ("a main HELLO, then a bogus SETUP", {
            let mut v = Header::new(Kind::Hello, 0xf00d)
                .args(ROLE_MAIN, 0, 1)
                .encode()
                .to_vec();
            v.extend_from_slice(&Header::new(Kind::Setup, 0xf00d).with_len(16).encode());
            v.extend_from_slice(&[0xa5; 16]);
            v
        }),
        (
            "a frame of the wrong kind first",
            Header::new(Kind::Ram, 7).encode().to_vec(),
        ),
    ];
    for (what, bytes) in &cases {
        garbage_connection(port, bytes);
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            dst.api("GET", "vmm.ping", None).0,
            200,
            "destination API after {}",
            what
        );
        assert!(dst.is_running(), "destination died after {}", what);
        let st = dst
            .migration_status()
            .map(|s| mig_state(&s).to_string())
            .unwrap_or_default();
        assert_ne!(
            st, "completed",
            "garbage ({}) was accepted as a migration",
            what
        );
        if st == "failed" || st == "cancelled" || !tcp_listening(port) {
            // The receive was refused as a whole: ask again.
            port = free_tcp_port();
            recv = Some(start_receive(&dst, port));
        }
    }
    assert_eq!(dst.serial.passes(), Vec::<u64>::new());

    // A real migration to it works.
    start_send(&src, send_params(port, 4));
    finish_migration(&mut src, &dst, recv.take()).check_completed();
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn incompatible_destination_refused() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = boot_source("src", GUEST, &[]);
    let dst = Vmm::destination("dst", &["--memory", "size=1G,prefault=on"]);
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    let (st, body) = src.api("PUT", "vm.send-migration", Some(send_params(port, 4)));
    let err = if ok(st) {
        let s = expect_migration_end(&src, &["failed"], MIGRATION_TIMEOUT);
        s["error"].as_str().unwrap_or("").to_string()
    } else {
        body["error"].as_str().unwrap_or("").to_string()
    };
    assert!(
        err.to_lowercase().contains("memory"),
        "the error should mention memory: {:?}",
        err
    );
    assert_guest_runs(&src, 1);
    assert!(dst.is_running());
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);
    assert_eq!(dst.serial.passes(), Vec::<u64>::new());
}

#[test]
fn migration_to_nowhere_fails_cleanly() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = boot_source("src", GUEST, &[]);
    let port = free_tcp_port(); // nothing listens there
    let (st, body) = src.api("PUT", "vm.send-migration", Some(send_params(port, 4)));
    if ok(st) {
        let s = expect_migration_end(&src, &["failed"], LONG);
        assert!(!s["error"].as_str().unwrap_or("").is_empty(), "{}", s);
    } else {
        assert!(body["error"].is_string(), "{} {}", st, body);
    }
    assert_guest_runs(&src, 1);

    // Then a real one works.
    let dst = Vmm::destination("dst", &[]);
    migrate_and_check(&mut src, &dst, send_params(0, 4), &[]);
}

/// Reads one frame header from `s` (10 s timeout).
fn read_header(s: &mut TcpStream) -> Option<Header> {
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).ok()?;
    Header::decode(&b).ok()
}

#[test]
fn wrong_session_connection_refused_during_migration() {
    skip_unless_kvm!();
    let _g = serial_guard();
    // A paused source dirties nothing, so a bandwidth-capped migration is
    // slow but converges: a window to intrude into.
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    src.api_ok("PUT", "vm.pause", None);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = send_params(port, 2);
    p["max_bandwidth_mbps"] = json!(10);
    start_send(&src, p);
    wait_transfer_started(&src);

    for (what, role) in [("data", ROLE_DATA), ("main", ROLE_MAIN)] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the receiver");
        s.write_all(
            &Header::new(Kind::Hello, 0x5eed_0000_0000_0001)
                .args(role, 0, 2)
                .encode(),
        )
        .unwrap();
        let reply = read_header(&mut s);
        assert!(
            !matches!(reply, Some(Header { kind: Kind::Ok, .. })),
            "a {} connection of another session was accepted: {:?}",
            what,
            reply
        );
        if let Some(h) = reply {
            assert_eq!(h.kind, Kind::Error, "reply to a stranger: {:?}", h);
        }
        // And plain garbage on a fresh connection.
        garbage_connection(port, &random_bytes(4096));
    }

    finish_migration(&mut src, &dst, Some(recv)).check_completed();
    assert_eq!(dst.state(), "paused");
    dst.api_ok("PUT", "vm.resume", None);
    check_guest_moved(&[&src.serial], &dst);
}
