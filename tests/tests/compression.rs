//! zstd compression of RAM (issue #13 §2) between two ferry processes,
//! witnessed by the stamp guest: its pages hold a few stamp words each
//! (the rest zero), so they compress well, and every page it finds stale
//! after the migration shows up as `stamp: MISMATCH`.

use std::time::Instant;

use ferry_tests::*;

const GUEST: &str = "region=32 passes=0";

/// Checks the `compression` object of both sides' final status: zstd at
/// `level` on the source, packets compressed, fewer bytes on the wire.
fn check_compression(m: &Migration, level: u64) {
    let spec = ferry_tests::openapi::Spec::load();
    spec.validate_named("MigrationStatus", &m.dest_status)
        .unwrap_or_else(|e| panic!("destination status against the spec: {e}"));
    if let Some(s) = &m.source_status {
        spec.validate_named("MigrationStatus", s)
            .unwrap_or_else(|e| panic!("source status against the spec: {e}"));
    }
    let d = &m.dest_status["compression"];
    assert_eq!(d["algorithm"], "zstd", "{}", m.dest_status);
    assert!(d["compressed_packets"].as_u64().unwrap_or(0) > 0, "{d}");
    let (raw, wire) = (
        d["raw_bytes"].as_u64().unwrap_or(0),
        d["wire_bytes"].as_u64().unwrap_or(u64::MAX),
    );
    assert!(wire < raw, "{d}");
    eprintln!(
        "compression: {raw} raw bytes, {wire} on the wire (ratio {}), {} packets compressed, {} as is",
        d["ratio"], d["compressed_packets"], d["uncompressed_packets"]
    );
    if let Some(s) = &m.source_status {
        let c = &s["compression"];
        assert_eq!(c["level"].as_u64(), Some(level), "{s}");
        assert_eq!(c["raw_bytes"], d["raw_bytes"], "{s}");
        assert_eq!(c["wire_bytes"], d["wire_bytes"], "{s}");
    }
}

#[test]
fn zstd_over_4_connections() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let mut p = send_params(0, 4);
    p["compression"] = json!("zstd");
    let m = migrate_and_check(&mut src, &dst, p, &[]);
    check_compression(&m, 1);
    assert_eq!(dst.serial.mismatch(), None, "MISMATCH on the destination");
}

#[test]
fn zstd_with_mutual_tls_through_ferry_remote() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let ca = Pki::new("zstd");
    let dst_dir = ca.host("dst.ferry.test", &ca);
    let src_dir = ca.host("src.ferry.test", &ca);
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive_with(&dst, port, json!({ "tls_dir": dst_dir }));
    let out = src.remote(&[
        "send-migration",
        &tcp_url(port),
        "--tls-dir",
        &src_dir,
        "--connections",
        "4",
        "--compression",
        "zstd",
        "--compression-level",
        "3",
    ]);
    assert!(
        out.status.success(),
        "ferry-remote send-migration: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = finish_migration(&mut src, &dst, Some(recv));
    m.check_completed();
    assert_eq!(m.dest_status["transport"], "tls", "{}", m.dest_status);
    check_compression(&m, 3);
    check_guest_moved(&[&src.serial], &dst);
    assert_eq!(dst.serial.mismatch(), None, "MISMATCH on the destination");
}

/// Post-copy from the start with compression: the background push sends
/// compressed PAGES on the data connections while the guest faults in
/// what it needs first (requested pages go as is).
#[test]
fn zstd_with_postcopy() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let (mut src, dst) = start_pair("region=256 passes=0", &[], 2);
    let mut p = send_params(0, 4);
    p["compression"] = json!("zstd");
    p["technique"] = json!("post-copy");
    p["max_bandwidth_mib_s"] = json!(100);
    p["max_bandwidth_mbps"] = Value::Null;
    let m = migrate_and_check(&mut src, &dst, p, &[]);
    assert_eq!(m.dest_status["postcopy"], "completed", "{}", m.dest_status);
    check_compression(&m, 1);
    assert_eq!(dst.serial.mismatch(), None, "MISMATCH on the destination");
    eprintln!("zstd post-copy: {:.1?}", t0.elapsed());
}

/// Bad values are refused at the request, naming the field.
#[test]
fn bad_compression_requests_are_refused() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = Vmm::boot("src", GUEST, &[]);
    src.wait_pass(1);
    for (extra, want) in [
        (json!({ "compression": "lz4" }), "lz4"),
        (
            json!({ "compression": "zstd", "compression_level": 25 }),
            "compression_level must be in 1..=19",
        ),
        (json!({ "compression_level": 3 }), "compression_level needs"),
    ] {
        let mut p = send_params(free_tcp_port(), 4);
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        let (st, v) = src.api("PUT", "vm.send-migration", Some(p));
        assert!(!ok(st), "{extra} accepted: {v}");
        assert!(v.to_string().contains(want), "{extra}: {st} {v}");
    }
    assert_eq!(src.state(), "running");
}
