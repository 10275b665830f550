//! Live parameters, stalls, the progress timeout and the event stream
//! (issue #10).
//!
//! The guest rewrites a 32 MiB region as fast as it runs; capped at
//! [`SLOW_MIB_S`], a pass moves less than the guest dirties meanwhile, so
//! pre-copy cannot converge until an operator changes course. Every test
//! that completes a migration is witnessed by the stamp guest (passes
//! numbered on across hosts, no MISMATCH).

use std::time::Duration;

use ferry_tests::*;
use serde_json::{json, Value};

/// The busy guest.
const GUEST: &str = "region=32 passes=0";
/// A cap far below the guest's dirty rate (about 100 MB/s here).
const SLOW_MIB_S: f64 = 8.0;

/// Starts a capped, never-converging migration under `policy` with the
/// extra fields in `extra`; returns the pair and the receive thread.
fn start_stuck(
    policy: &str,
    extra: Value,
) -> (
    Vmm,
    Vmm,
    std::thread::JoinHandle<Result<ApiResponse, String>>,
) {
    let (src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = send_params(port, 2);
    p["max_bandwidth_mbps"] = Value::Null;
    p["max_bandwidth_mib_s"] = json!(SLOW_MIB_S);
    p["policy"] = json!(policy);
    if let (Value::Object(m), Value::Object(x)) = (&mut p, extra) {
        m.extend(x);
    }
    start_send(&src, p);
    wait_transfer_started(&src);
    (src, dst, recv)
}

fn names(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["event"].as_str().map(str::to_string))
        .collect()
}

/// `ferry-remote migration-set` changes a running migration: lifting the
/// cap lets the stuck migration converge. The change is visible in the
/// reply, in `vm.migration` and as a `parameters-changed` event.
#[test]
fn parameter_change_while_running() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst, recv) = start_stuck("legacy", json!({}));
    // Still capped: the status shows the effective cap.
    let s = src.migration_status().expect("status");
    assert_eq!(
        s["parameters"]["max_bandwidth_mib_s"],
        json!(SLOW_MIB_S),
        "{s}"
    );
    let sock = src.sock.display().to_string();
    let out = run_remote(
        &[
            "--api-socket",
            &sock,
            "migration-set",
            "--max-bandwidth-mib-s",
            "0",
            "--downtime-ms",
            "500",
        ],
        LONG,
    );
    assert!(
        out.status.success(),
        "migration-set failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reply: Value = serde_json::from_slice(&out.stdout).expect("JSON reply");
    assert_eq!(reply["downtime_ms"], json!(500), "{reply}");
    assert!(reply["max_bandwidth_mib_s"].is_null(), "{reply}");
    assert_eq!(reply["running"], json!(true), "{reply}");
    let changed = src
        .wait_event("parameters-changed", LONG)
        .expect("a parameters-changed event");
    assert_eq!(changed["changed"]["downtime_ms"], json!(500), "{changed}");
    let m = finish_migration(&mut src, &dst, Some(recv));
    let s = m.source_status.expect("the source's final status");
    assert_eq!(s["switchover_reason"], json!("converged"), "{s}");
    assert_eq!(s["parameters"]["downtime_ms"], json!(500), "{s}");
    check_guest_moved(&[&src.serial], &dst);
}

/// A stuck migration reports a stall (status and event) after
/// `stall_limit_s`; under `legacy` nothing else changes, and the
/// migration still completes once the operator lifts the cap.
#[test]
fn stall_event() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst, recv) = start_stuck("legacy", json!({ "stall_limit_s": 1 }));
    let stalled = src
        .wait_event("stalled", LONG)
        .expect("a stalled event while the migration cannot converge");
    assert!(stalled["seq"].is_u64(), "{stalled}");
    assert!(stalled["timestamp_us"].is_u64(), "{stalled}");
    let s = src.migration_status().expect("status");
    assert_eq!(mig_state(&s), "active", "legacy must not switch over: {s}");
    assert!(s["stalls"].as_u64().unwrap_or(0) >= 1, "{s}");
    assert_eq!(
        s["allowed_downtime_ms"],
        json!(300),
        "legacy keeps the downtime: {s}"
    );
    let events = src.events();
    let all = names(&events);
    assert!(all.contains(&"migration-started".to_string()), "{all:?}");
    let pass = events
        .iter()
        .find(|e| e["event"] == "pass-completed")
        .expect("a pass-completed event");
    for f in ["pass", "bytes", "dirty_rate_bytes_per_s", "remaining_bytes"] {
        assert!(pass[f].is_u64(), "{f} in {pass}");
    }
    src.api_ok(
        "PUT",
        "vm.migration-set-parameters",
        Some(json!({ "max_bandwidth_mib_s": 0 })),
    );
    let m = finish_migration(&mut src, &dst, Some(recv));
    let s = m.source_status.expect("the source's final status");
    assert_eq!(s["switchover_reason"], json!("converged"), "{s}");
    check_guest_moved(&[&src.serial], &dst);
}

/// With no progress for `progress_timeout_s`, the migration is cancelled,
/// the source runs on, and `ferry-remote events` shows why.
#[test]
fn progress_timeout_cancels_and_the_source_runs_on() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (src, dst, _recv) = start_stuck(
        "legacy",
        json!({ "stall_limit_s": 1, "progress_timeout_s": 2 }),
    );
    let s = expect_migration_end(&src, &["cancelled"], LONG);
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("progress"), "{s}");
    assert_eq!(s["source_vm"], json!("resumed"), "{s}");
    wait_migration_state(&dst, &["failed", "cancelled"], LONG);
    assert_guest_runs(&src, 2);
    let sock = src.sock.display().to_string();
    let out = run_remote(&["--api-socket", &sock, "events", "--once"], LONG);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let all = names(&events);
    for want in ["migration-started", "stalled", "migration-cancelled"] {
        assert!(all.contains(&want.to_string()), "{want} missing in {all:?}");
    }
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
}

/// Parameters set before a migration are the defaults of the next one;
/// bad values are refused with the field named.
#[test]
fn parameters_before_a_migration_and_bad_values() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = Vmm::boot("src", GUEST, &[]);
    let (st, v) = src.api(
        "PUT",
        "vm.migration-set-parameters",
        Some(json!({ "downtime_ms": 150, "policy": "legacy", "stall_limit_s": 3 })),
    );
    assert!(ok(st), "{st} {v}");
    assert_eq!(v["running"], json!(false), "{v}");
    let p = src.api_ok("GET", "vm.migration-parameters", None);
    assert_eq!(p["downtime_ms"], json!(150), "{p}");
    assert_eq!(p["policy"], json!("legacy"), "{p}");
    for (bad, field) in [
        (
            json!({ "throttle_max_percent": 100 }),
            "throttle_max_percent",
        ),
        (json!({ "stall_limit_s": 0 }), "stall_limit_s"),
        (json!({ "technique": "warp" }), "technique"),
        (json!({ "downtime_ms": -1 }), "downtime_ms"),
        (json!({}), ""),
    ] {
        let (st, v) = src.api("PUT", "vm.migration-set-parameters", Some(bad.clone()));
        assert_eq!(st, 400, "{bad} -> {st} {v}");
        assert!(
            v["error"].as_str().unwrap_or("").contains(field),
            "{bad} -> {v}"
        );
    }
    let ev = src
        .wait_event("parameters-changed", Duration::from_secs(10))
        .expect("parameters-changed event");
    assert_eq!(ev["running"], json!(false), "{ev}");
}
