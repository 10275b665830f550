//! Auto-converge (issue #10): a guest that dirties memory faster than the
//! migration's bandwidth cap converges only because its vCPUs are
//! throttled, and the throttle ends with the migration however it ends.
//!
//! The stamp guest rewrites its whole region every pass (29 instructions a
//! 4 KiB page; measured here, under PVM's instruction emulator and next to
//! the sender: a 256 MiB pass every ~2.5 s, ~100 MiB/s dirtied; a 64 MiB
//! pass every ~0.35 s), so with `max_bandwidth_mib_s` at or below that, no
//! pass makes lasting progress until the throttle takes its time. Witnesses: the guest's own
//! checks (0 MISMATCH, passes numbered on across hosts) and its pass
//! counter (how fast it runs); the throttle is read from the source's
//! event log (`throttle-changed`) and status (`cpu_throttle_percent`).

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::*;

/// Follows `vmm`'s event log (`vm.events` long polls) on a thread until
/// its API goes away or `stop` is set; the events read so far are in the
/// returned vector.
struct EventTap {
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EventTap {
    fn follow(vmm: &Vmm) -> EventTap {
        let sock = vmm.sock.clone();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ev, st) = (events.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut since = 0u64;
            while !st.load(std::sync::atomic::Ordering::SeqCst) {
                let path = format!("vm.events?since={since}&wait_s=1");
                let body = match try_api_raw(&sock, "GET", &path, None, Duration::from_secs(10)) {
                    Ok((200, Value::String(s))) => s,
                    Ok((200, v)) => v.to_string(),
                    Ok(_) | Err(_) => break,
                };
                for line in body.lines().filter(|l| !l.trim().is_empty()) {
                    if let Ok(v) = serde_json::from_str::<Value>(line) {
                        if let Some(seq) = v["seq"].as_u64() {
                            since = since.max(seq + 1);
                        }
                        ev.lock().unwrap().push(v);
                    }
                }
            }
        });
        EventTap {
            events,
            stop,
            thread: Some(thread),
        }
    }

    /// The events named `name` read so far.
    fn named(&self, name: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == name)
            .cloned()
            .collect()
    }

    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for EventTap {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The highest `percent` among `throttle-changed` events.
fn max_throttle(tap: &EventTap) -> u64 {
    tap.named("throttle-changed")
        .iter()
        .filter_map(|e| e["percent"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Send parameters: plain TCP, a bandwidth cap, auto-converge on.
fn converge_params(port: u16, bandwidth_mib_s: f64) -> Value {
    let mut p = send_params(port, 2);
    let m = p.as_object_mut().unwrap();
    m.remove("max_bandwidth_mbps");
    m.insert("max_bandwidth_mib_s".into(), json!(bandwidth_mib_s));
    m.insert("auto_converge".into(), json!(true));
    m.insert("downtime_ms".into(), json!(300));
    p
}

/// Passes the guest completes in `window`.
fn passes_in(vm: &Vmm, window: Duration) -> u64 {
    let a = vm.serial.last_pass().unwrap_or(0);
    thread::sleep(window);
    vm.serial.last_pass().unwrap_or(0) - a
}

/// A 256 MiB working set against a 100 MiB/s cap: the migration
/// converges (remaining state within `downtime_ms: 300`) once the throttle
/// has slowed the guest enough, and the guest moves intact.
///
/// The policy is the default (minimal-downtime) with its default stall
/// limit and throttle steps (20 %, +10 % a busy pass). With
/// `auto_converge`, stalls do not raise the downtime while the throttle can
/// still rise, so the switch-over is the throttle's doing within the asked
/// 300 ms. Without throttling this guest never converges here (measured:
/// 28 passes, then forced by the schedule at 1.5 s after 56 s).
#[test]
fn auto_converge_makes_a_busy_guest_converge() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair("region=256 passes=0", &["--memory", "size=1G"], 1);
    let mut tap = EventTap::follow(&src);
    let t0 = Instant::now();
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let mut p = converge_params(port, 100.0);
    p["timeout_s"] = json!(120);
    start_send(&src, p);
    let m = finish_migration(&mut src, &dst, Some(recv));
    let total = t0.elapsed();
    tap.stop();
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);

    let throttles: Vec<u64> = tap
        .named("throttle-changed")
        .iter()
        .filter_map(|e| e["percent"].as_u64())
        .collect();
    let passes = tap.named("pass-completed");
    let switchover = tap.named("switchover");
    eprintln!(
        "auto-converge: {} passes, throttle steps {:?}, switch-over {:?}, \
         downtime {} ms, total {:.1?}",
        passes.len(),
        throttles,
        switchover.first().map(|s| s["reason"].clone()),
        m.dest_status["downtime_ms"],
        total
    );
    for p in &passes {
        eprintln!(
            "  pass {}: {} MiB moved, {} MiB dirty, expected downtime {} ms (allowed {})",
            p["pass"],
            p["bytes"].as_u64().unwrap_or(0) >> 20,
            p["dirty_bytes"].as_u64().unwrap_or(0) >> 20,
            p["expected_downtime_ms"],
            p["allowed_downtime_ms"]
        );
    }
    assert!(
        max_throttle(&tap) > 0,
        "no throttle-changed event with a percent > 0: {:?}",
        tap.named("throttle-changed")
    );
    // Throttled to the end of the live passes, and back to 0 at the
    // switch-over.
    assert_eq!(throttles.last(), Some(&0), "{throttles:?}");
    assert_eq!(
        switchover.first().map(|s| s["reason"].clone()),
        Some(json!("converged")),
        "the migration must converge within downtime_ms, not be forced: {switchover:?}"
    );
}

/// Cancelling a throttled migration removes the throttle: the status says
/// `cpu_throttle_percent: 0` and the guest runs at full speed again.
#[test]
fn cancel_removes_the_throttle() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (src, dst) = start_pair("region=64 passes=0", &[], 2);
    let window = Duration::from_secs(4);
    let before = passes_in(&src, window);
    let mut tap = EventTap::follow(&src);
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    // 20 MiB/s against ~100 MiB/s dirtied: every pass is busy; a strong
    // first throttle so that the guest's slowdown is plain to see.
    let mut p = converge_params(port, 20.0);
    p["throttle_initial_percent"] = json!(90);
    p["throttle_max_percent"] = json!(90);
    // Throttled to 90 % the guest dirties less than the link carries, and
    // with 300 ms allowed it could converge before the cancel (it did, once
    // in three full runs): 1 ms keeps it from converging, so the cancel
    // always meets a throttled, running migration.
    p["downtime_ms"] = json!(1);
    start_send(&src, p);
    let throttled = poll(LONG, || {
        let s = src.migration_status()?;
        assert_eq!(mig_state(&s), "active", "{s}");
        (s["cpu_throttle_percent"].as_u64().unwrap_or(0) > 0).then_some(s)
    })
    .unwrap_or_else(|| panic!("no throttle within {LONG:?}: {:?}", src.migration_status()));
    assert_eq!(throttled["cpu_throttle_percent"], 90, "{throttled}");
    let slow = passes_in(&src, window);

    src.api_ok("PUT", "vm.migration-cancel", None);
    let s = expect_migration_end(&src, &["cancelled"], LONG);
    assert_eq!(
        s["cpu_throttle_percent"], 0,
        "throttle left after cancel: {s}"
    );
    let after = passes_in(&src, window);
    tap.stop();
    eprintln!(
        "passes in {window:?}: {before} before, {slow} throttled 90 %, {after} after the cancel; \
         throttle events {:?}",
        tap.named("throttle-changed")
    );
    assert_eq!(max_throttle(&tap), 90);
    assert_eq!(
        tap.named("throttle-changed")
            .last()
            .map(|e| e["percent"].clone()),
        Some(json!(0))
    );
    // Generous factors: 90 % takes ~10x, full speed comes back.
    assert!(
        slow * 2 < before.max(2),
        "throttled {slow} vs before {before}"
    );
    assert!(
        after > slow * 2 && after * 3 >= before,
        "after {after}, throttled {slow}, before {before}"
    );
    assert_guest_runs(&src, 1);
    assert_eq!(src.serial.mismatch(), None);
}
