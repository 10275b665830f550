//! Migration helpers: receiving and sending through the API, waiting for
//! migration states, and the checks every migration test shares
//! ([`start_pair`], [`migrate_and_check`], [`check_guest_moved`]).

use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::{ok, try_api, try_api_raw, ApiResponse};
use crate::guest::{check_stream, SerialLog};
use crate::proc::Vmm;
use crate::util::{free_tcp_port, poll, tcp_listening_of};
use crate::{LONG, MIGRATION_TIMEOUT};

/// `tcp:127.0.0.1:PORT`.
pub fn tcp_url(port: u16) -> String {
    format!("tcp:127.0.0.1:{}", port)
}

/// `tcp:HOST:PORT` for a migration to `dst` (its address, which is not
/// loopback inside a [`crate::NetPair`]).
pub fn tcp_url_of(dst: &Vmm, port: u16) -> String {
    format!("tcp:{}:{}", dst.host, port)
}

/// Asks `dst` to receive a migration on `port` over plain TCP and returns
/// once it listens. The request runs on a thread (in case the API answers
/// only when the migration ends); its handle is returned.
pub fn start_receive(dst: &Vmm, port: u16) -> thread::JoinHandle<Result<ApiResponse, String>> {
    start_receive_with(dst, port, json!({ "tls": false }))
}

/// [`start_receive`] with more request fields (`receiver_url` is added).
pub fn start_receive_with(
    dst: &Vmm,
    port: u16,
    mut body: Value,
) -> thread::JoinHandle<Result<ApiResponse, String>> {
    body["receiver_url"] = json!(tcp_url_of(dst, port));
    let sock = dst.sock.clone();
    let pid = dst.pid();
    let h = thread::spawn(move || {
        try_api_raw(
            &sock,
            "PUT",
            "vm.receive-migration",
            Some(&body.to_string()),
            MIGRATION_TIMEOUT,
        )
    });
    let listening = poll(LONG, || {
        if tcp_listening_of(pid, port) || h.is_finished() {
            Some(())
        } else {
            None
        }
    });
    assert!(
        listening.is_some(),
        "[{}] not listening on port {} within {:?}",
        dst.name,
        port,
        LONG
    );
    if h.is_finished() {
        let r = h.join().unwrap();
        match &r {
            Ok((st, _)) if ok(*st) => {}
            other => panic!(
                "[{}] vm.receive-migration failed: {:?}; stderr:\n{}",
                dst.name,
                other,
                dst.stderr()
            ),
        }
        assert!(
            poll(LONG, || tcp_listening_of(pid, port).then_some(())).is_some(),
            "[{}] receive-migration answered but nothing listens on {}",
            dst.name,
            port
        );
        return thread::spawn(move || r);
    }
    h
}

/// Parameters of `vm.send-migration` with the spec's defaults.
pub fn send_params(port: u16, connections: u32) -> Value {
    json!({
        "destination_url": tcp_url(port),
        "connections": connections,
        "downtime_ms": 300,
        "max_bandwidth_mbps": null,
        "timeout_s": 3600,
        "device_state": "channels",
        "device_precopy": true,
        "tls": false,
    })
}

/// Sends `vm.send-migration` with `params` (must be accepted).
pub fn start_send(src: &Vmm, params: Value) {
    let (st, v) = src.api("PUT", "vm.send-migration", Some(params.clone()));
    assert!(
        ok(st),
        "[{}] vm.send-migration {} -> {} {}",
        src.name,
        params,
        st,
        v
    );
}

/// The `state` field of a migration status.
pub fn mig_state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

/// Waits until `vmm`'s `vm.migration` reports one of `states`; returns the status.
/// Panics (with the last status) after `timeout`.
pub fn wait_migration_state(vmm: &Vmm, states: &[&str], timeout: Duration) -> Value {
    let mut last = Value::Null;
    let r = poll(timeout, || {
        let s = vmm.migration_status()?;
        last = s.clone();
        states.contains(&mig_state(&s)).then_some(s)
    });
    r.unwrap_or_else(|| {
        panic!(
            "[{}] vm.migration did not reach {:?} within {:?}; last: {}\nstderr:\n{}",
            vmm.name,
            states,
            timeout,
            last,
            vmm.stderr()
        )
    })
}

/// Outcome of a successful migration.
#[derive(Debug)]
pub struct Migration {
    /// The source's `vm.migration` once completed (its final record; `None`
    /// only if a source started with `--exit-after-migration` exited before
    /// it was read).
    pub source_status: Option<Value>,
    /// The destination's `vm.migration` once completed.
    pub dest_status: Value,
}

/// Migrates `src` to `dst` with `params` (its `destination_url` is replaced
/// by a fresh port) and waits for completion: the destination reports
/// `completed`, the source reports it too and is ended ([`finish_migration`]).
/// Panics on failure.
pub fn migrate(src: &mut Vmm, dst: &Vmm, mut params: Value) -> Migration {
    let port = free_tcp_port();
    params["destination_url"] = json!(tcp_url_of(dst, port));
    let recv = start_receive(dst, port);
    start_send(src, params);
    finish_migration(src, dst, Some(recv))
}

/// Waits for a started migration to complete (see [`migrate`]): follows
/// the source until it reports `completed` (or, started with
/// `--exit-after-migration`, exits), then [`end_migrated_source`].
pub fn finish_migration(
    src: &mut Vmm,
    dst: &Vmm,
    recv: Option<thread::JoinHandle<Result<ApiResponse, String>>>,
) -> Migration {
    let start = Instant::now();
    let mut source_status = None;
    // Follow the source until it completed; fail fast if it reports a
    // failure.
    loop {
        if let Some(s) = src.migration_status() {
            match mig_state(&s) {
                "completed" => {
                    source_status = Some(s);
                    break;
                }
                "failed" | "cancelled" => panic!(
                    "[{}] migration {}: {}\nsource stderr:\n{}\ndestination stderr:\n{}",
                    src.name,
                    mig_state(&s),
                    s,
                    src.stderr(),
                    dst.stderr()
                ),
                _ => {}
            }
        }
        if !src.is_running() {
            break;
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            panic!(
                "[{}] source still running {:?} after the migration started; last status {:?}",
                src.name,
                MIGRATION_TIMEOUT,
                src.migration_status()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    end_migrated_source(src);
    let dest_status = wait_migration_state(
        dst,
        &["completed", "failed", "cancelled"],
        MIGRATION_TIMEOUT,
    );
    assert_eq!(
        mig_state(&dest_status),
        "completed",
        "[{}] destination status: {}",
        dst.name,
        dest_status
    );
    if let Some(recv) = recv.filter(|r| r.is_finished()) {
        match recv.join().unwrap() {
            Ok((st, v)) => assert!(
                ok(st),
                "[{}] vm.receive-migration -> {} {}",
                dst.name,
                st,
                v
            ),
            Err(e) => panic!("[{}] vm.receive-migration: {}", dst.name, e),
        }
    }
    eprintln!("[{}] source's last status: {:?}", src.name, source_status);
    eprintln!("[{}] migration completed: {}", dst.name, dest_status);
    Migration {
        source_status,
        dest_status,
    }
}

/// Ends a source whose send completed: unless it exited on its own
/// (`--exit-after-migration`), it must be in the `migrated` state, and
/// `vmm.shutdown` must end it with exit code 0.
pub fn end_migrated_source(src: &mut Vmm) {
    if src.is_running() {
        let state = poll(LONG, || {
            let s = match try_api(&src.sock, "GET", "vm.info", None) {
                Ok((_, v)) => v["state"].as_str().unwrap_or("").to_string(),
                Err(_) => String::new(),
            };
            (s == "migrated" || !src.is_running()).then_some(s)
        });
        if src.is_running() {
            assert_eq!(
                state.as_deref(),
                Some("migrated"),
                "[{}] source VM state after completion",
                src.name
            );
            let _ = src.api("PUT", "vmm.shutdown", None);
        }
    }
    src.expect_exit_ok(LONG);
}

/// Boots the stamp guest with `cmdline` and `src_args` on a source VMM
/// named `src`, waits until it completed pass `passes`, and starts a
/// destination VMM named `dst` without a VM that declares the source's
/// devices ([`device_args`]): the start of most migration tests.
pub fn start_pair(cmdline: &str, src_args: &[&str], passes: u64) -> (Vmm, Vmm) {
    let src = Vmm::boot("src", cmdline, src_args);
    src.wait_pass(passes);
    let dst = Vmm::destination("dst", &device_args(src_args));
    (src, dst)
}

/// The device declarations among `args` (each `--sim-vfio X` and
/// `--vfio X` pair): what a destination must declare to receive a VM
/// started with `args`, since it accepts only the devices it declares.
pub fn device_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == "--sim-vfio" || w[0] == "--vfio")
        .flat_map(|w| [w[0], w[1]])
        .collect()
}

impl Migration {
    /// Asserts what every successful migration reports: the destination's
    /// status is `completed` with every documented figure, and so is the
    /// source's when its last status was read.
    pub fn check_completed(&self) {
        check_completed_status(&self.dest_status, "destination");
        if let Some(s) = &self.source_status {
            check_completed_status(s, "source");
        }
    }
}

/// Migrates `src` to `dst` with `params` ([`migrate`]) and checks the
/// outcome: [`Migration::check_completed`], then [`check_guest_moved`]
/// (the guest runs on at `dst`, its passes numbered on from those in
/// `earlier` (the serial logs of the hosts it ran on before `src`, oldest
/// first) and `src`'s). `dst`'s VM must not be paused.
pub fn migrate_and_check(
    src: &mut Vmm,
    dst: &Vmm,
    params: Value,
    earlier: &[&SerialLog],
) -> Migration {
    let m = migrate(src, dst, params);
    m.check_completed();
    let mut logs = earlier.to_vec();
    logs.push(&src.serial);
    check_guest_moved(&logs, dst);
    m
}

/// Asserts that a completed migration status carries the documented figures.
pub fn check_completed_status(s: &Value, who: &str) {
    assert_eq!(mig_state(s), "completed", "{}: {}", who, s);
    for f in [
        "iteration",
        "total_bytes",
        "transferred_bytes",
        "remaining_bytes",
        "zero_pages",
        "normal_pages",
        "page_size_bytes",
        "throughput_bytes_per_s",
        "throughput_mbit_s",
        "throughput_bps",
        "pages_per_s",
        "dirty_rate_bytes_per_s",
        "dirty_rate_bps",
        "dirty_sync_count",
        "dma_dirty_pages",
        "precopy_bytes",
        "downtime_bytes",
        "expected_downtime_ms",
        "total_time_ms",
        "downtime_ms",
        "setup_time_ms",
    ] {
        assert!(
            s[f].is_number(),
            "{}: field {} missing or not a number in {}",
            who,
            f,
            s
        );
    }
    assert_eq!(s["page_size_bytes"], 4096, "{}: {}", who, s);
    assert_eq!(s["remaining_bytes"], 0, "{}: {}", who, s);
    assert!(
        s["peer_address"].is_string(),
        "{}: no peer_address in {}",
        who,
        s
    );
    assert_eq!(s["throughput_bps"], s["throughput_bytes_per_s"], "{}", who);
    assert_eq!(s["dirty_rate_bps"], s["dirty_rate_bytes_per_s"], "{}", who);
    assert!(
        s["normal_pages"].as_u64().unwrap_or(0) > 0,
        "{}: no data pages moved: {}",
        who,
        s
    );
}

/// Waits for a migration on `src` to end in failure (or cancellation when
/// `states` says so) while the source keeps running; returns the status.
pub fn expect_migration_end(src: &Vmm, states: &[&str], timeout: Duration) -> Value {
    let start = Instant::now();
    let mut last = Value::Null;
    let r = poll(timeout, || {
        if !src.is_running() {
            panic!(
                "[{}] source exited although the migration should have ended in {:?}; last status {}\nstderr:\n{}",
                src.name,
                states,
                last,
                src.stderr()
            );
        }
        let s = src.migration_status()?;
        last = s.clone();
        match mig_state(&s) {
            st if states.contains(&st) => Some(s),
            "completed" => panic!(
                "[{}] migration completed but should have ended in {:?}: {}",
                src.name, states, s
            ),
            _ => None,
        }
    });
    let r = r.unwrap_or_else(|| {
        panic!(
            "[{}] migration did not end in {:?} within {:?}; last: {}",
            src.name, states, timeout, last
        )
    });
    eprintln!(
        "[{}] migration ended after {:.1?}: {}",
        src.name,
        start.elapsed(),
        r
    );
    r
}

/// Waits until a running migration on `src` has moved some bytes (or 30 s passed).
pub fn wait_transfer_started(src: &Vmm) -> Value {
    let active = wait_migration_state(src, &["active", "failed", "cancelled", "completed"], LONG);
    assert_eq!(
        mig_state(&active),
        "active",
        "[{}] migration is not active: {}",
        src.name,
        active
    );
    poll(Duration::from_secs(30), || {
        let s = src.migration_status()?;
        (s["transferred_bytes"].as_u64().unwrap_or(0) > 0 || mig_state(&s) != "active").then_some(s)
    })
    .unwrap_or(active)
}

/// Asserts the guest on `vm` runs: its API says running and it completes
/// further passes.
pub fn assert_guest_runs(vm: &Vmm, passes: u64) {
    assert_eq!(vm.state(), "running", "[{}] VM state", vm.name);
    vm.wait_more_passes(passes);
    assert_eq!(vm.serial.mismatch(), None, "[{}] MISMATCH", vm.name);
}

/// Passes the destination must complete after switch-over.
pub const DEST_PASSES: u64 = 3;

/// After a completed migration: the destination runs the guest on, passes
/// numbered on from the source's, no MISMATCH.
pub fn check_guest_moved(logs_before: &[&SerialLog], dst: &Vmm) {
    assert_eq!(dst.state(), "running", "destination VM state");
    let before: Vec<u64> = check_stream(logs_before);
    let last_before = before.last().copied().unwrap_or(0);
    poll(LONG * 2, || {
        (dst.serial.passes().len() as u64 >= DEST_PASSES).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "destination completed fewer than {} passes; serial:\n{}",
            DEST_PASSES,
            dst.serial.tail(10)
        )
    });
    let mut all: Vec<&SerialLog> = logs_before.to_vec();
    all.push(&dst.serial);
    // check_stream proves the numbering runs on without gap across hosts
    // (a line split at switch-over joins up in the concatenation).
    let passes = check_stream(&all);
    assert!(
        passes.len() as u64 >= last_before + DEST_PASSES,
        "the destination did not continue the source's passes (source's last {}, all {:?})",
        last_before,
        passes
    );
    eprintln!(
        "[{}] guest moved: passes 1..={} before, {} after switch-over, no MISMATCH",
        dst.name,
        last_before,
        passes.len() as u64 - last_before
    );
    // The destination keeps serving its API.
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);
}
