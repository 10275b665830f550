//! Zero-copy send (issue #13 §1), witnessed by the stamp guest: over 4
//! connections, with TLS, between two network namespaces (veth), and the
//! locked-memory limit named with the amount needed when it is too small.
//!
//! On loopback and veth the kernel delivers to a local socket and copies
//! every zero-copy send (`SO_EE_CODE_ZEROCOPY_COPIED`); the tests check
//! that every byte sent zero-copy completed and is accounted as either,
//! and print the split the kernel reported.

use std::process::Command;
use std::time::Duration;

use ferry_tests::*;

const GUEST: &str = "region=32 passes=0";

/// Checks the `zero_copy` part of the source's last status and prints it.
fn check_zero_copy(m: &Migration, conns: u64, what: &str) {
    let Some(s) = &m.source_status else {
        panic!("no source status read");
    };
    let z = &s["zero_copy"];
    eprintln!("{what}: zero_copy status {z}");
    assert_eq!(z["connections"], conns, "{s}");
    let sent = z["sent_bytes"].as_u64().unwrap_or(0);
    let zc = z["zero_copy_bytes"].as_u64().unwrap_or(0);
    let copied = z["copied_bytes"].as_u64().unwrap_or(0);
    assert!(sent > 0, "{z}");
    assert_eq!(z["in_flight_bytes"], 0, "completions outstanding: {z}");
    assert_eq!(zc + copied, sent, "{z}");
    // The status with its zero_copy part is what docs/openapi.yaml says.
    ferry_tests::openapi::Spec::load()
        .validate_named("MigrationStatus", s)
        .unwrap_or_else(|e| panic!("{what}: the status does not match the spec: {e}\n{s}"));
}

fn zc_params(conns: u32) -> Value {
    let mut p = send_params(0, conns);
    p["zero_copy"] = json!(true);
    p
}

#[test]
fn zero_copy_over_4_connections() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let m = migrate_and_check(&mut src, &dst, zc_params(4), &[]);
    check_zero_copy(&m, 4, "loopback, 4 connections");
}

#[test]
fn zero_copy_with_tls() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let ca = Pki::new("zc");
    let dst_dir = ca.host("dst.ferry.test", &ca);
    let src_dir = ca.host("src.ferry.test", &ca);
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive_with(&dst, port, json!({ "tls_dir": dst_dir }));
    let mut p = zc_params(4);
    p["destination_url"] = json!(tcp_url(port));
    p["tls_dir"] = json!(src_dir);
    p.as_object_mut().map(|o| o.remove("tls"));
    start_send(&src, p);
    let m = finish_migration(&mut src, &dst, Some(recv));
    m.check_completed();
    assert_eq!(m.dest_status["transport"], "tls", "{}", m.dest_status);
    check_guest_moved(&[&src.serial], &dst);
    check_zero_copy(&m, 4, "TLS, 4 connections");
    let note = m
        .source_status
        .as_ref()
        .map(|s| s["zero_copy"]["note"].to_string());
    assert!(
        note.unwrap_or_default().contains("TLS"),
        "the status says what TLS did"
    );
}

/// The CapEff bits of process `pid`.
fn cap_eff(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or(0)
}

/// Sets the soft RLIMIT_MEMLOCK of `pid` (the hard limit is left: raising
/// it needs CAP_SYS_RESOURCE, which the test bed may not have).
fn set_memlock(pid: u32, soft: u64) {
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--memlock={soft}:")])
        .output()
        .expect("prlimit");
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The hard RLIMIT_MEMLOCK of `pid`.
fn hard_memlock(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("Max locked memory"))
        .and_then(|l| l.split_whitespace().nth(4))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// A source without CAP_IPC_LOCK (the kernel then charges zero-copy
/// sends to RLIMIT_MEMLOCK) and a 1 MiB limit: the request is refused
/// with the limit and the need; with the limit raised to exactly the need
/// of 2 connections (8 MiB, the usual default), the same source migrates
/// zero-copy: the kernel's charge stays within the writers' bound.
#[test]
fn zero_copy_memlock_limit_is_named() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let wrap = [
        "setpriv",
        "--inh-caps=-ipc_lock",
        "--bounding-set=-ipc_lock",
        "--",
    ];
    let mut src = Vmm::boot_wrapped("src", &wrap, GUEST, &[]);
    src.wait_pass(2);
    let pid = src.pid();
    assert_eq!(cap_eff(pid) & (1 << 14), 0, "setpriv left CAP_IPC_LOCK");
    set_memlock(pid, 1 << 20);
    let dst = Vmm::destination("dst", &[]);
    for (conns, need) in [(4, "needs 16777216 bytes"), (1, "needs 4194304 bytes")] {
        let mut p = zc_params(conns);
        p["destination_url"] = json!(tcp_url(free_tcp_port()));
        let (st, v) = src.api("PUT", "vm.send-migration", Some(p));
        assert!(!ok(st), "refused at the request: {st} {v}");
        let e = v.to_string();
        eprintln!("refusal: {e}");
        assert!(e.contains("RLIMIT_MEMLOCK is 1048576 bytes"), "{e}");
        assert!(e.contains(need), "{e}");
        assert!(e.contains(&format!("x {conns} connections")), "{e}");
    }
    assert_eq!(src.state(), "running");
    let need = 8 << 20;
    if hard_memlock(pid) < need {
        eprintln!("SKIPPED the migration part: hard RLIMIT_MEMLOCK below {need}");
        return;
    }
    set_memlock(pid, need);
    let m = migrate_and_check(&mut src, &dst, zc_params(2), &[]);
    check_zero_copy(
        &m,
        2,
        "without CAP_IPC_LOCK, RLIMIT_MEMLOCK 8 MiB, 2 connections",
    );
}

/// Between the test bed's two namespaces over veth (shaped to 10 Gbit/s):
/// what the kernel did with the zero-copy sends, reported as measured.
#[test]
fn zero_copy_between_namespaces() {
    skip_unless_kvm!();
    if skip_unless_netns() {
        return;
    }
    let _g = serial_guard();
    let net = NetPair::new("10gbit").expect("network namespaces");
    let guest = stamp_guest().to_str().unwrap().to_string();
    let mut src = Vmm::spawn_netns(
        "src",
        &net.src_ns,
        &net.src_ip,
        &["--kernel", &guest, "--cmdline", GUEST],
    );
    src.wait_api();
    src.wait_pass(2);
    let dst = Vmm::spawn_netns("dst", &net.dst_ns, &net.dst_ip, &[]);
    dst.wait_api();
    let m = migrate(&mut src, &dst, zc_params(4));
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);
    check_zero_copy(&m, 4, "veth between namespaces, 4 connections");
    drop(dst);
    drop(src);
    drop(net);
    std::thread::sleep(Duration::from_millis(10));
}
