//! What an operator sees (issue #11): live progress in every pass, the
//! first included, and the final record a source keeps after completing.
//!
//! Every migration here is witnessed by the stamp guest (passes numbered on
//! across hosts, no MISMATCH). No test asserts a timing: samples are taken
//! about every 100 ms and only their order is checked.

use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::*;
use serde_json::{json, Value};

/// The guest of the final-record tests: a 32 MiB region rewritten forever.
const GUEST: &str = "region=32 passes=0";

/// The longest run of strictly decreasing values.
fn longest_decreasing(v: &[u64]) -> usize {
    let mut best = usize::from(!v.is_empty());
    let mut run = best;
    for w in v.windows(2) {
        if w[1] < w[0] {
            run += 1;
            best = best.max(run);
        } else {
            run = 1;
        }
    }
    best
}

fn num(s: &Value, f: &str) -> u64 {
    s[f].as_u64().unwrap_or(0)
}

/// A big guest (2 GiB it wrote itself) migrated under a bandwidth cap, so
/// that pass 1 lasts many seconds: sampled every ~100 ms during pass 1,
/// `remaining_bytes` counts down from about the populated size, the
/// throughput and the page rate are live on both sides, and the dirty rate
/// is measured from the dirty-log peeks. The cap is then lifted and the
/// migration completes.
#[test]
fn live_progress_during_pass_1() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair("region=2048 passes=0", &["--memory", "size=3G"], 1);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = send_params(port, 2);
    p["destination_url"] = json!(tcp_url_of(&dst, port));
    p["max_bandwidth_mbps"] = Value::Null;
    p["max_bandwidth_mib_s"] = json!(128);
    p["downtime_ms"] = json!(1000);
    start_send(&src, p);

    let mut samples: Vec<Value> = Vec::new();
    let mut dst_samples: Vec<Value> = Vec::new();
    let start = Instant::now();
    while samples.len() < 30 && start.elapsed() < MIGRATION_TIMEOUT {
        let s = src.migration_status().expect("source status");
        if mig_state(&s) != "active" || num(&s, "iteration") > 1 {
            break;
        }
        if num(&s, "iteration") == 1 && num(&s, "transferred_bytes") > 0 {
            samples.push(s);
            if let Some(d) = dst.migration_status() {
                dst_samples.push(d);
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    // Lift the cap: the rest goes at full speed.
    src.api_ok(
        "PUT",
        "vm.migration-set-parameters",
        Some(json!({ "max_bandwidth_mib_s": 0 })),
    );
    let m = finish_migration(&mut src, &dst, Some(recv));
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);

    let remaining: Vec<u64> = samples.iter().map(|s| num(s, "remaining_bytes")).collect();
    eprintln!(
        "pass 1: {} samples, remaining_bytes {:?}",
        samples.len(),
        remaining
    );
    assert!(samples.len() >= 3, "too few samples during pass 1");
    let total = num(&samples[0], "total_bytes");
    assert!(
        remaining[0] > 1 << 30 && remaining[0] <= total,
        "pass 1 starts near the populated size (2 GiB written, {total} bytes of RAM): {}",
        samples[0]
    );
    let run = longest_decreasing(&remaining);
    assert!(
        run >= 3,
        "remaining_bytes not strictly decreasing over 3 samples: {remaining:?}"
    );
    let last = samples.last().expect("a sample");
    for f in ["throughput_bytes_per_s", "pages_per_s", "normal_pages"] {
        assert!(num(last, f) > 0, "{f} is 0 during pass 1: {last}");
    }
    assert!(
        last["throughput_mbit_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{last}"
    );
    assert_eq!(last["throughput_bps"], last["throughput_bytes_per_s"]);
    assert_eq!(last["page_size_bytes"], 4096);
    assert!(last["peer_address"].is_string(), "{last}");
    // The guest dirties its region all the time; the sender peeks at the
    // dirty log about once a second during a pass.
    assert!(
        samples
            .iter()
            .any(|s| num(s, "dirty_rate_bytes_per_s") > 0 && num(s, "dirty_sync_count") > 0),
        "no dirty rate measured during pass 1: {last}"
    );
    assert!(
        dst_samples
            .iter()
            .any(|d| num(d, "throughput_bytes_per_s") > 0 && num(d, "normal_pages") > 0),
        "the destination showed no live throughput during pass 1: {:?}",
        dst_samples.last()
    );
}

/// After completing, the source keeps serving its final record in the
/// `migrated` state: `vm.migration` answers the same figures every time,
/// `vm.resume` is refused with 409, and `vmm.shutdown` ends it with exit
/// code 0.
#[test]
fn source_keeps_final_record_until_shutdown() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = send_params(port, 2);
    p["destination_url"] = json!(tcp_url_of(&dst, port));
    start_send(&src, p);
    let done = wait_migration_state(
        &src,
        &["completed", "failed", "cancelled"],
        MIGRATION_TIMEOUT,
    );
    check_completed_status(&done, "source");
    let state = poll(LONG, || {
        let s = src.state();
        (s == "migrated").then_some(s)
    });
    assert_eq!(state.as_deref(), Some("migrated"), "source VM state");
    // The event carries the status's figures (it is emitted after the dirty
    // log was switched off, which is not part of the migration's time).
    let ev = src
        .wait_event("migration-completed", LONG)
        .expect("a migration-completed event");
    for f in ["total_time_ms", "total_time_us"] {
        assert_eq!(ev[f], done[f], "{f} of the event and the status: {ev}");
    }
    for _ in 0..5 {
        let s = src.migration_status().expect("the source still answers");
        check_completed_status(&s, "source");
        for f in [
            "total_time_ms",
            "total_time_us",
            "downtime_ms",
            "transferred_bytes",
            "precopy_bytes",
            "downtime_bytes",
            "throughput_bytes_per_s",
        ] {
            assert_eq!(s[f], done[f], "{f} changed after completion: {s}");
        }
        assert!(num(&s, "total_time_us") > 0, "{s}");
        assert_eq!(
            num(&s, "total_time_ms"),
            num(&s, "total_time_us") / 1000,
            "total_time_ms is total_time_us in whole ms: {s}"
        );
        assert_eq!(s["source_vm"], "migrated", "{s}");
        assert_eq!(s["role"], "source", "{s}");
        assert!(num(&s, "precopy_bytes") > 0, "{s}");
        assert!(num(&s, "downtime_bytes") > 0, "{s}");
        assert!(num(&s, "dirty_sync_count") >= 2, "{s}");
        thread::sleep(Duration::from_millis(200));
    }
    let (st, body) = src.api("PUT", "vm.resume", None);
    assert_eq!(st, 409, "vm.resume on a migrated source: {body}");
    assert!(
        body.to_string().contains("migrated"),
        "the refusal says why: {body}"
    );
    assert_eq!(src.state(), "migrated");
    let passes = src.serial.last_pass();
    thread::sleep(Duration::from_millis(300));
    assert_eq!(src.serial.last_pass(), passes, "the migrated VM ran here");

    let d = wait_migration_state(&dst, &["completed"], MIGRATION_TIMEOUT);
    check_completed_status(&d, "destination");
    if let Ok(Err(e)) = recv.join() {
        panic!("vm.receive-migration: {e}");
    }
    check_guest_moved(&[&src.serial], &dst);
    src.api_ok("PUT", "vmm.shutdown", None);
    src.expect_exit_ok(LONG);
}

/// `--exit-after-migration` keeps the old behaviour: the source exits on
/// its own once the send completed, here without anyone reading its status
/// (the grace period).
#[test]
fn exit_after_migration_exits_on_its_own() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &["--exit-after-migration"], 2);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = send_params(port, 2);
    p["destination_url"] = json!(tcp_url_of(&dst, port));
    start_send(&src, p);
    let d = wait_migration_state(
        &dst,
        &["completed", "failed", "cancelled"],
        MIGRATION_TIMEOUT,
    );
    check_completed_status(&d, "destination");
    src.expect_exit_ok(LONG);
    assert!(!src.sock.exists(), "source API socket not removed on exit");
    if let Ok(Err(e)) = recv.join() {
        panic!("vm.receive-migration: {e}");
    }
    check_guest_moved(&[&src.serial], &dst);
}
