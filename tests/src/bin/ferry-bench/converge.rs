//! The busy-guest benchmark of issue #10: the stamp guest rewriting a
//! 256 MiB working set in 1 GiB of RAM, migrated under a 100 MiB/s cap over
//! the namespace link, with pre-copy only, auto-converge, post-copy on
//! request, the `post-copy` policy and post-copy from the start, against a
//! reference measured in the same run (the same guest paused: its RAM moved
//! once over the same link at the same cap). The tables and plots are in
//! `converge_report.rs`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::{mig_state, start_receive_with, tcp_url_of, try_api, try_api_raw};
use serde_json::{json, Value};

use crate::series::Series;
use crate::vmm::{self, num, Env, SourceSpec};

/// The busy guest's command line: 256 MiB rewritten without pause.
pub const BUSY: &str = "region=256 passes=0";
/// Guest RAM.
pub const MEMORY: &str = "size=1G";
/// `max_bandwidth_mib_s` of every run.
pub const CAP_MIB_S: f64 = 100.0;
/// Data connections of every run.
pub const CONNS: u32 = 4;
/// How long pre-copy alone is given before the bench cancels it (QEMU's
/// reference run gave up after 90 s too).
pub const PRECOPY_LIMIT: Duration = Duration::from_secs(90);
/// Bound for every other mode (a run past it is a failure).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Status sampling period (remaining bytes over time).
const SAMPLE: Duration = Duration::from_millis(100);

/// One way of migrating the busy guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The guest paused after its first pass: its RAM moved once (the reference).
    Reference,
    /// `policy: legacy`: pre-copy with a fixed 300 ms downtime.
    PreCopy,
    /// `auto_converge: true` under the default policy (minimal-downtime).
    AutoConverge,
    /// Pre-copy, switched with `technique: "post-copy"` once pass 1 ended.
    PostCopyRequest,
    /// `policy: post-copy` (default `stall_limit_s`): pre-copy until it stalls.
    PostCopyPolicy,
    /// `technique: "post-copy"` in the send request: no pre-copy pass.
    PostCopyStart,
}

impl Mode {
    /// Every mode, in the order of a round.
    pub const ALL: [Mode; 6] = [
        Mode::Reference,
        Mode::PreCopy,
        Mode::AutoConverge,
        Mode::PostCopyRequest,
        Mode::PostCopyPolicy,
        Mode::PostCopyStart,
    ];

    /// Short name (JSON, file names).
    pub fn key(self) -> &'static str {
        match self {
            Mode::Reference => "reference",
            Mode::PreCopy => "pre-copy",
            Mode::AutoConverge => "auto-converge",
            Mode::PostCopyRequest => "post-copy-request",
            Mode::PostCopyPolicy => "post-copy-policy",
            Mode::PostCopyStart => "post-copy-start",
        }
    }

    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Reference => "reference: paused guest, RAM moved once",
            Mode::PreCopy => "pre-copy only (`legacy`)",
            Mode::AutoConverge => "auto-converge (`auto_converge: true`)",
            Mode::PostCopyRequest => "post-copy on request (after pass 1)",
            Mode::PostCopyPolicy => "`post-copy` policy",
            Mode::PostCopyStart => "post-copy from the start",
        }
    }

    /// The fields this mode adds to `vm.send-migration`.
    fn params(self) -> Value {
        match self {
            Mode::Reference | Mode::PreCopy => json!({ "policy": "legacy" }),
            Mode::AutoConverge => json!({ "auto_converge": true }),
            Mode::PostCopyRequest => json!({}),
            Mode::PostCopyPolicy => json!({ "policy": "post-copy" }),
            Mode::PostCopyStart => json!({ "technique": "post-copy" }),
        }
    }
}

/// Everything recorded in one run.
#[derive(Debug, Clone)]
pub struct ConvRun {
    pub mode: Mode,
    /// Migrated (or, pre-copy only, cancelled as planned) and witnessed by the guest.
    pub ok: bool,
    pub error: Option<String>,
    /// The migration completed (pre-copy only: it converged within the limit).
    pub completed: bool,
    /// Pre-copy only: when the bench cancelled it (s since the send).
    pub cancelled_at_s: Option<f64>,
    /// Post-copy on request: when the switch was asked (s since the send).
    pub switch_asked_at_s: Option<f64>,
    /// 1-min load average before the source booted (the gate) and at the send.
    pub load_gate: f64,
    pub load_send: f64,
    pub wall_s: f64,
    /// The source's last status read, and its `completed` one if read.
    pub src_last: Value,
    pub src_final: Option<Value>,
    pub dst_status: Value,
    /// The source's status every 100 ms from the send.
    pub series: Series,
    /// The destination's log lines about the post-copy switch and stale
    /// pre-copy data (debug level, `RUST_LOG=migration::recv=debug`).
    pub dst_log: Vec<String>,
    /// The source's lines of the same kind.
    pub src_log: Vec<String>,
    /// The source's events (`vm.events`), oldest first.
    pub events: Vec<Value>,
    /// What the guest showed afterwards.
    pub witness: String,
}

impl ConvRun {
    fn new(mode: Mode, load_gate: f64) -> ConvRun {
        ConvRun {
            mode,
            ok: false,
            error: None,
            completed: false,
            cancelled_at_s: None,
            switch_asked_at_s: None,
            load_gate,
            load_send: f64::NAN,
            wall_s: 0.0,
            src_last: Value::Null,
            src_final: None,
            dst_status: Value::Null,
            series: Series::new(Duration::ZERO),
            dst_log: Vec::new(),
            src_log: Vec::new(),
            events: Vec::new(),
            witness: String::new(),
        }
    }

    /// The events named `name`.
    pub fn named(&self, name: &str) -> impl Iterator<Item = &Value> {
        let name = name.to_string();
        self.events
            .iter()
            .filter(move |e| e["event"] == *name.as_str())
    }

    /// The source's `total_time_ms` (from the send), in s: its
    /// `migration-completed` event, else its completed status.
    pub fn total_s(&self) -> Option<f64> {
        if !self.completed {
            return None;
        }
        self.named("migration-completed")
            .find(|e| e["role"] == "source")
            .and_then(|e| e["total_time_ms"].as_f64())
            .or_else(|| {
                self.src_final
                    .as_ref()
                    .and_then(|s| num(s, "total_time_ms"))
            })
            .map(|ms| ms / 1000.0)
    }

    /// Downtime in ms from the pause/resume timestamps (µs), else `downtime_ms`.
    pub fn downtime_ms(&self) -> Option<f64> {
        if !self.completed {
            return None;
        }
        let src = self.src_final.as_ref().unwrap_or(&self.src_last);
        for v in [&self.dst_status, src] {
            if let (Some(p), Some(r)) = (num(v, "pause_time_us"), num(v, "resume_time_us")) {
                if r >= p && p > 0.0 {
                    return Some((r - p) / 1000.0);
                }
            }
        }
        num(&self.dst_status, "downtime_ms")
    }

    /// The highest throttle seen (status samples and `throttle-changed`).
    pub fn max_throttle(&self) -> u64 {
        let ev = self
            .named("throttle-changed")
            .filter_map(|e| e["percent"].as_u64());
        ev.chain([self.series.max_throttle()]).max().unwrap_or(0)
    }

    /// `switchover_reason` (the `switchover` event, else the status).
    pub fn switchover_reason(&self) -> Option<String> {
        self.named("switchover")
            .find_map(|e| e["reason"].as_str().map(str::to_string))
            .or_else(|| {
                let s = self.src_final.as_ref().unwrap_or(&self.src_last);
                s["switchover_reason"].as_str().map(str::to_string)
            })
    }

    /// Pre-copy passes completed.
    pub fn passes(&self) -> u64 {
        self.named("pass-completed").count() as u64
    }

    /// `stalled` events seen.
    pub fn stalls(&self) -> u64 {
        self.named("stalled").count() as u64
    }

    /// Bytes moved: the destination's `transferred_bytes` when completed,
    /// else the source's last.
    pub fn bytes(&self) -> Option<f64> {
        if self.completed {
            num(&self.dst_status, "transferred_bytes")
        } else {
            num(&self.src_last, "transferred_bytes")
        }
    }

    /// A destination post-copy figure (`postcopy_bytes`, `postcopy_requests`,
    /// `postcopy_fault_latency_us_p50`, ...), when post-copy ran.
    pub fn post(&self, key: &str) -> Option<f64> {
        self.dst_status.get("postcopy")?;
        num(&self.dst_status, key)
    }

    /// The destination's wait at the post-copy switch for the pre-copy data
    /// and devices still in flight (ms), from its debug log line
    /// "post-copy switch: pre-copy data and devices in after D".
    pub fn switch_wait_ms(&self) -> Option<f64> {
        self.dst_log.iter().find_map(|l| {
            let rest = l.split("pre-copy data and devices in after ").nth(1)?;
            parse_duration_ms(rest.split([',', ' ']).next()?)
        })
    }

    /// Stale pre-copy RAM the destination read and threw away (bytes): per
    /// data connection the highest count its "SYNC(n) in; N bytes of stale
    /// pre-copy RAM thrown away" lines give, summed.
    pub fn stale_bytes(&self) -> Option<f64> {
        let mut per: Vec<(String, f64)> = Vec::new();
        for l in &self.dst_log {
            let Some((head, tail)) = l.split_once(": SYNC(") else {
                continue;
            };
            let conn = head
                .rsplit("data connection ")
                .next()
                .unwrap_or("")
                .to_string();
            let Some(n) = tail
                .split("; ")
                .nth(1)
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse::<f64>().ok())
            else {
                continue;
            };
            match per.iter_mut().find(|(c, _)| *c == conn) {
                Some((_, v)) => *v = v.max(n),
                None => per.push((conn, n)),
            }
        }
        (!per.is_empty()).then(|| per.iter().map(|x| x.1).sum())
    }

    pub fn to_json(&self) -> Value {
        json!({
            "switch_wait_ms": self.switch_wait_ms(), "stale_bytes": self.stale_bytes(),
            "mode": self.mode.key(), "ok": self.ok, "error": self.error,
            "completed": self.completed, "cancelled_at_s": self.cancelled_at_s,
            "switch_asked_at_s": self.switch_asked_at_s,
            "loadavg_gate": self.load_gate, "loadavg_send": self.load_send,
            "wall_s": self.wall_s,
            "total_s": self.total_s(), "downtime_ms": self.downtime_ms(),
            "max_throttle_percent": self.max_throttle(), "passes": self.passes(), "stalls": self.stalls(),
            "switchover_reason": self.switchover_reason(),
            "src_last_status": self.src_last, "src_final_status": self.src_final,
            "dst_status": self.dst_status,
            "series": self.series.to_json(), "dst_log": self.dst_log, "src_log": self.src_log,
            "events": self.events, "witness": self.witness,
        })
    }
}

/// Follows a VMM's event log (`vm.events` long polls) on a thread.
struct EventTap {
    events: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EventTap {
    fn follow(sock: PathBuf) -> EventTap {
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (ev, st) = (events.clone(), stop.clone());
        let thread = thread::spawn(move || {
            let mut since = 1u64;
            while !st.load(Ordering::SeqCst) {
                let path = format!("vm.events?since={since}&wait_s=1");
                let body = match try_api_raw(&sock, "GET", &path, None, Duration::from_secs(10)) {
                    Ok((200, Value::String(s))) => s,
                    // An empty long poll: nothing happened within wait_s.
                    Ok((200, Value::Null)) => continue,
                    Ok((200, v)) => v.to_string(),
                    Ok(_) | Err(_) => break,
                };
                for line in body.lines().filter(|l| !l.trim().is_empty()) {
                    if let Ok(v @ Value::Object(_)) = serde_json::from_str::<Value>(line) {
                        if let Some(seq) = v["seq"].as_u64() {
                            since = since.max(seq + 1);
                        }
                        if let Ok(mut e) = ev.lock() {
                            e.push(v);
                        }
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

    fn has(&self, name: &str) -> bool {
        self.events
            .lock()
            .map(|e| e.iter().any(|v| v["event"] == name))
            .unwrap_or(false)
    }

    fn finish(mut self) -> Vec<Value> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// How long the load gate may wait in one round, all its runs together:
/// past it, runs start at once (and their `load_gate` shows the load).
pub const ROUND_WAIT: Duration = Duration::from_secs(600);

/// Waits until the 1-minute load average is below `max`, for at most
/// `budget` (which it reduces by the time waited; once it is spent, goes on
/// at once with a warning). Returns the load it ended with.
pub fn wait_for_load(env: &Env, max: f64, budget: &mut Duration) -> f64 {
    let t = Instant::now();
    let mut said = false;
    let l = loop {
        let l = vmm::loadavg();
        if l < max || l.is_nan() {
            break l;
        }
        if t.elapsed() >= *budget {
            env.log(&format!(
                "   warning: load {l:.2} still ≥ {max}; the round's wait budget is spent, running anyway"
            ));
            break l;
        }
        if !said {
            env.log(&format!(
                "   waiting for the 1-min load ({l:.2}) to fall below {max} (budget left {:.0} s)",
                budget.saturating_sub(t.elapsed()).as_secs_f64()
            ));
            said = true;
        }
        thread::sleep(Duration::from_secs(2));
    };
    *budget = budget.saturating_sub(t.elapsed());
    l
}

/// One migration of the busy guest in `mode`. Waits for the load gate
/// first (within `budget`, see [`wait_for_load`]), then boots the source
/// and the destination.
pub fn run(env: &Env, mode: Mode, max_load: f64, budget: &mut Duration) -> ConvRun {
    let mut r = ConvRun::new(mode, wait_for_load(env, max_load, budget));
    let t_all = Instant::now();
    if let Err(e) = drive(env, &mut r) {
        env.log(&format!("   run failed: {e}"));
        r.error = Some(e);
        r.ok = false;
    }
    if r.wall_s == 0.0 {
        r.wall_s = t_all.elapsed().as_secs_f64();
    }
    r
}

fn drive(env: &Env, r: &mut ConvRun) -> Result<(), String> {
    let mode = r.mode;
    let spec = SourceSpec {
        memory: MEMORY.into(),
        cmdline: BUSY.into(),
        extra: vec![],
        pause: false,
    };
    let mut src = vmm::boot_source(env, &spec)?;
    // Pass 1 written the whole 256 MiB: the working set is all in RAM.
    src.serial
        .wait_for_pass(1, Duration::from_secs(120))
        .ok_or_else(|| format!("source guest: no pass 1: {}", src.serial.tail(3)))?;
    if mode == Mode::Reference {
        let (st, v) = try_api(&src.sock, "PUT", "vm.pause", None)?;
        if !ferry_tests::ok(st) {
            return Err(format!("vm.pause: {st} {v}"));
        }
    }
    let mut dst = vmm::start_destination(env, None, &[], None)?;
    let port = ferry_tests::free_tcp_port();
    let sock = dst.sock.clone();
    let recv = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        start_receive_with(&dst, port, json!({ "tls": false }))
    }))
    .map_err(|_| "vm.receive-migration failed".to_string())?;
    env.settle();
    r.load_send = vmm::loadavg();
    let mut body = json!({
        "destination_url": tcp_url_of(&dst, port),
        "connections": CONNS,
        "downtime_ms": 300,
        "max_bandwidth_mib_s": CAP_MIB_S,
        "timeout_s": 600,
        "device_state": "channels",
        "tls": false,
    });
    if let Value::Object(m) = mode.params() {
        for (k, v) in m {
            body[k] = v;
        }
    }
    let tap = EventTap::follow(src.sock.clone());
    let t0 = Instant::now();
    r.series.start(t0);
    let (st, v) = try_api(&src.sock, "PUT", "vm.send-migration", Some(&body))?;
    if !ferry_tests::ok(st) {
        return Err(format!("vm.send-migration: {st} {v}"));
    }
    let limit = if mode == Mode::PreCopy {
        PRECOPY_LIMIT
    } else {
        RUN_LIMIT
    };
    let mut outcome = "";
    while outcome.is_empty() {
        let t = t0.elapsed();
        if !src.is_running() {
            outcome = "exited";
            break;
        }
        if let Some(s) = src.migration_status() {
            r.series.record(&s);
            match mig_state(&s) {
                "completed" => r.src_final = Some(s.clone()),
                "failed" => {
                    r.src_last = s.clone();
                    return Err(format!("source: migration failed: {}", s["error"]));
                }
                "cancelled" => outcome = "cancelled",
                _ => {}
            }
            r.src_last = s;
        }
        if mode == Mode::PostCopyRequest
            && r.switch_asked_at_s.is_none()
            && tap.has("pass-completed")
        {
            let p = json!({ "technique": "post-copy" });
            let (st, v) = try_api(&src.sock, "PUT", "vm.migration-set-parameters", Some(&p))?;
            if !ferry_tests::ok(st) {
                return Err(format!("set-parameters technique post-copy: {st} {v}"));
            }
            r.switch_asked_at_s = Some(t0.elapsed().as_secs_f64());
        }
        if t > limit && r.cancelled_at_s.is_none() {
            if mode != Mode::PreCopy {
                r.error = Some(format!("not completed within {limit:?}"));
            }
            env.log(&format!("   {:.0} s: cancelling", t.as_secs_f64()));
            let _ = try_api(&src.sock, "PUT", "vm.migration-cancel", None);
            r.cancelled_at_s = Some(t.as_secs_f64());
        }
        if t > limit + Duration::from_secs(60) {
            return Err("the cancel did not end the migration within 60 s".into());
        }
        thread::sleep(SAMPLE);
    }
    r.wall_s = t0.elapsed().as_secs_f64();
    if outcome == "exited" {
        match src.wait_exit(Duration::from_secs(30)) {
            Some(s) if s.success() => {}
            s => return Err(format!("source exited {s:?}")),
        }
        r.events = tap.finish();
        let d = ferry_tests::poll(Duration::from_secs(60), || {
            let d = try_api(&sock, "GET", "vm.migration", None).ok()?.1;
            matches!(mig_state(&d), "completed" | "failed" | "cancelled").then_some(d)
        })
        .ok_or("destination did not report completion")?;
        r.dst_status = d;
        if mig_state(&r.dst_status) != "completed" {
            return Err(format!("destination: {}", r.dst_status));
        }
        r.completed = true;
        if mode == Mode::Reference {
            // Paused at the source, so paused at the destination: resume it.
            let (st, v) = try_api(&sock, "PUT", "vm.resume", None)?;
            if !ferry_tests::ok(st) {
                return Err(format!("destination vm.resume: {st} {v}"));
            }
        }
        // The guest runs on at the destination and finds every page intact.
        let before = src.serial.last_pass().unwrap_or(0);
        let after = dst
            .serial
            .wait_for_pass(before + 1, Duration::from_secs(60))
            .ok_or_else(|| format!("no pass on the destination: {}", dst.serial.tail(3)))?;
        if let Some(m) = dst.serial.mismatch() {
            return Err(format!("destination guest: {m}"));
        }
        r.witness = format!("source passes 1..={before}, destination pass {after}, 0 MISMATCH");
        if mode == Mode::PreCopy {
            env.log("   pre-copy only converged within the limit");
        }
    } else {
        // Cancelled: the source runs on, unthrottled and intact.
        r.events = tap.finish();
        let s = &r.src_last;
        if s["cpu_throttle_percent"].as_u64().unwrap_or(0) != 0 {
            return Err(format!("throttle left after the cancel: {s}"));
        }
        let info = try_api(&src.sock, "GET", "vm.info", None)?.1;
        if info["state"] != "running" {
            return Err(format!("source VM not running after the cancel: {info}"));
        }
        let before = src.serial.last_pass().unwrap_or(0);
        src.serial
            .wait_for_pass(before + 1, Duration::from_secs(60))
            .ok_or("the source guest made no pass after the cancel")?;
        if let Some(m) = src.serial.mismatch() {
            return Err(format!("source guest: {m}"));
        }
        r.witness = format!(
            "cancelled; source ran on to pass {}, 0 MISMATCH",
            before + 1
        );
        dst.kill();
    }
    r.dst_log = switch_lines(&dst.stderr());
    r.src_log = switch_lines(&src.stderr());
    drop(recv);
    r.ok = r.error.is_none();
    Ok(())
}

/// A side's log lines about the switch-over: the post-copy switch timing
/// and the stale pre-copy data thrown away (at most 40). They are there
/// only as far as `RUST_LOG` lets them through: run the bench with
/// `RUST_LOG=info,migration::recv=debug` to get them all.
pub fn switch_lines(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains("post-copy switch")
                || l.contains("paused for post-copy")
                || l.contains("stale pre-copy")
                || l.contains("switch-over")
                || l.contains("switchover")
        })
        .take(40)
        .map(|l| l.chars().take(400).collect())
        .collect()
}

/// A `Debug`-printed `Duration` ("37.15ms", "1.2s", "850µs", "12ns") in ms.
pub fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let cut = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(cut);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "s" => 1000.0,
        "ms" => 1.0,
        "µs" | "us" => 1e-3,
        "ns" => 1e-6,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_switch_lines() {
        assert_eq!(parse_duration_ms("37.5ms"), Some(37.5));
        assert_eq!(parse_duration_ms("1.5s"), Some(1500.0));
        assert_eq!(parse_duration_ms("250µs"), Some(0.25));
        assert_eq!(parse_duration_ms("ms"), None);
        assert_eq!(parse_duration_ms("12parsecs"), None);
        let log = "\
[t DEBUG ferry migration::recv::reader] data connection 3: SYNC(2) in; 100 bytes of stale pre-copy RAM thrown away
[t DEBUG ferry migration::recv::reader] data connection 3: SYNC(3) in; 300 bytes of stale pre-copy RAM thrown away
[t DEBUG ferry migration::recv::reader] data connection 0: SYNC(3) in; 5 bytes of stale pre-copy RAM thrown away
[t DEBUG ferry migration::recv::pcrun] post-copy switch: pre-copy data and devices in after 37.156895ms, stale pages dropped after 37.55ms, RAM registered after 37.57ms
unrelated line";
        let mut r = ConvRun::new(Mode::PostCopyStart, 0.0);
        r.dst_log = switch_lines(log);
        assert_eq!(r.dst_log.len(), 4);
        assert_eq!(r.switch_wait_ms(), Some(37.156895));
        assert_eq!(r.stale_bytes(), Some(305.0));
        r.dst_log.clear();
        assert_eq!(r.switch_wait_ms(), None);
        assert_eq!(r.stale_bytes(), None);
    }
}
