//! Spawning ferry processes (through the ferry-tests harness) and timing one
//! migration between two of them.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::{mig_state, start_receive_with, tcp_url_of, try_api, Vmm};
use serde_json::{json, Value};

use crate::procfs::{self, Mem, Peaks, Sampler};
use crate::series::Series;

/// Where the helper binary is, and how to behave.
#[derive(Debug, Clone)]
pub struct Env {
    pub first_touch: PathBuf,
    /// Seconds to wait before every timed run (host reclaims freed memory).
    pub settle_s: f64,
    pub verbose: bool,
    /// `--netns-rate`: source and destination run in two network
    /// namespaces joined by a veth pair shaped to that rate.
    pub net: Option<std::sync::Arc<ferry_tests::NetPair>>,
}

impl Env {
    pub fn settle(&self) {
        if self.settle_s > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(self.settle_s));
        }
    }
    pub fn log(&self, msg: &str) {
        eprintln!("[ferry-bench {:>8.1}s] {msg}", crate::elapsed());
    }
}

/// Runs a harness call that panics on failure, turning the panic into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what}: {}", msg.lines().next().unwrap_or(""))
    })
}

fn stderr_tail(v: &Vmm) -> String {
    let s = v.stderr();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(3)..].join(" / ")
}

pub fn mem(v: &Vmm) -> Mem {
    procfs::mem(v.pid()).unwrap_or_default()
}

/// How to boot a source VM.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    /// `--memory` value.
    pub memory: String,
    /// Guest command line, e.g. `region=1 passes=0`.
    pub cmdline: String,
    /// Extra arguments (`--sim-vfio ...`; the destination declares the same devices).
    pub extra: Vec<String>,
    /// Pause the guest right after its boot line.
    pub pause: bool,
}

/// Boots a source and waits for the guest's boot line (`stamp: boot ...`).
/// The source exits on its own once its send completed
/// (`--exit-after-migration`): its CPU time and exit code are measured.
pub fn boot_source(env: &Env, spec: &SourceSpec) -> Result<Vmm, String> {
    let mut extra: Vec<&str> = vec!["--memory", &spec.memory, "--exit-after-migration"];
    extra.extend(spec.extra.iter().map(String::as_str));
    if env.verbose {
        env.log(&format!(
            "source: --cmdline {:?} {}",
            spec.cmdline,
            extra.join(" ")
        ));
    }
    let ns = env
        .net
        .as_ref()
        .map(|n| (n.src_ns.as_str(), n.src_ip.as_str()));
    let vm = Vmm::boot_in("bench-src", ns, &spec.cmdline, &extra);
    guarded("source API", || vm.wait_api())?;
    vm.serial
        .wait_for_line(Duration::from_secs(120), |l| {
            l.starts_with("stamp: boot") || l.contains("stamp: pass")
        })
        .ok_or_else(|| {
            format!(
                "no boot line on the source: {} {}",
                vm.serial.tail(3),
                stderr_tail(&vm)
            )
        })?;
    if spec.pause {
        let (st, v) = try_api(&vm.sock, "PUT", "vm.pause", None)?;
        if !ferry_tests::ok(st) {
            return Err(format!("vm.pause: {st} {v}"));
        }
    }
    Ok(vm)
}

/// Starts a destination VMM declaring the devices of `devices` (the
/// source's `--sim-vfio ...` arguments: a destination accepts only the
/// devices it declares). With `prefault_bytes`, waits until that much is
/// resident.
pub fn start_destination(
    env: &Env,
    memory: Option<&str>,
    devices: &[String],
    prefault_bytes: Option<u64>,
) -> Result<Vmm, String> {
    let mut args: Vec<&str> = devices.iter().map(String::as_str).collect();
    if let Some(m) = memory {
        args.push("--memory");
        args.push(m);
        // Info level: the line that says the prepared VM is ready.
        args.push("-v");
    }
    let vm = match &env.net {
        Some(n) => Vmm::spawn_netns("bench-dst", &n.dst_ns, &n.dst_ip, &args),
        None => Vmm::spawn("bench-dst", &args),
    };
    guarded("destination API", || vm.wait_api())?;
    if memory.is_some() {
        // A destination given its guest's memory prepares the KVM VM in the
        // background; a run measures the migration, not that preparation.
        let t = Instant::now();
        while !vm.stderr().contains("prepared for an incoming migration") {
            if t.elapsed() > Duration::from_secs(30) {
                return Err("the destination did not prepare its VM within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    if let Some(b) = prefault_bytes {
        let t = Instant::now();
        let (mut last, mut since) = (0u64, Instant::now());
        loop {
            let m = mem(&vm);
            if m.anon + m.shmem >= b / 100 * 97 {
                break;
            }
            if m.anon + m.shmem != last {
                (last, since) = (m.anon + m.shmem, Instant::now());
            }
            // Stop waiting once residency has not moved for 3 s (prefault done or not done this way).
            if t.elapsed() > Duration::from_secs(120)
                || since.elapsed() > Duration::from_secs(3)
                || !vm.is_running()
            {
                env.log(&format!(
                    "warning: destination resident {} MiB < prefault target",
                    (m.anon + m.shmem) >> 20
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(vm)
}

/// Migration parameters (body of `vm.send-migration`, minus the URL).
#[derive(Debug, Clone)]
pub struct MigrateSpec {
    pub connections: u32,
    pub downtime_ms: u64,
    pub device_state: Option<String>,
    pub device_precopy: Option<bool>,
    pub timeout: Duration,
    /// Mutual TLS: (source tls_dir, destination tls_dir); None: plain TCP.
    pub tls: Option<(String, String)>,
    /// `"zero_copy": true` in the send request.
    pub zero_copy: bool,
    /// `compression` of the request (None: not sent, i.e. none).
    pub compression: Option<String>,
    /// Migrate over `unix:PATH` (a socket in the destination's temp dir)
    /// instead of TCP.
    pub unix: bool,
}

impl MigrateSpec {
    pub fn new(connections: u32) -> Self {
        MigrateSpec {
            connections,
            downtime_ms: 300,
            device_state: None,
            device_precopy: None,
            timeout: Duration::from_secs(600),
            tls: None,
            zero_copy: false,
            compression: None,
            unix: false,
        }
    }
}

/// Everything measured in one migration.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub ok: bool,
    pub error: Option<String>,
    /// Last `GET vm.migration` of each side.
    pub src_status: Value,
    pub dst_status: Value,
    /// Wall time from the send request to completion, as seen by the bench.
    pub wall_s: f64,
    pub src_cpu_s: Option<f64>,
    pub dst_cpu_s: Option<f64>,
    pub src_before: Mem,
    pub dst_before: Mem,
    pub src_peak: Peaks,
    pub dst_peak: Peaks,
    pub dst_after: Mem,
    /// 1-minute load average right before the send.
    pub loadavg: f64,
    /// The source's status over time (every read, at most one per 20 ms).
    pub series: Series,
}

impl RunResult {
    /// A counter from the source's final statistics when the bench read them
    /// (the source exits right after completing), else the destination's.
    /// `total_time_ms` only from the source (the destination's counts from the
    /// receive request, i.e. includes the settle wait), in fractional ms from
    /// its `total_time_us` when present, else the bench's wall time;
    /// `downtime_ms` from the pause/resume timestamps (µs) when present.
    pub fn stat(&self, key: &str) -> Option<f64> {
        let src_done = self.src_status.get("state").and_then(Value::as_str) == Some("completed");
        match key {
            "total_time_ms" => {
                if src_done {
                    num(&self.src_status, "total_time_us")
                        .map(|us| us / 1000.0)
                        .or_else(|| num(&self.src_status, key))
                } else if self.ok {
                    Some(self.wall_s * 1000.0)
                } else {
                    None
                }
            }
            "downtime_ms" => {
                for v in [&self.src_status, &self.dst_status] {
                    if let (Some(p), Some(r)) = (num(v, "pause_time_us"), num(v, "resume_time_us"))
                    {
                        if r >= p && p > 0.0 {
                            return Some((r - p) / 1000.0);
                        }
                    }
                }
                num(&self.dst_status, key).or_else(|| num(&self.src_status, key))
            }
            _ if src_done => num(&self.src_status, key).or_else(|| num(&self.dst_status, key)),
            _ => num(&self.dst_status, key).or_else(|| num(&self.src_status, key)),
        }
    }

    pub fn to_json(&self) -> Value {
        let m = |m: &Mem| json!({"rss": m.rss, "anon": m.anon, "shmem": m.shmem, "hwm": m.hwm});
        let p = |p: &Peaks| {
            json!({"max_rss": p.max_rss, "max_anon": p.max_anon, "max_anon_shmem": p.max_anon_shmem,
                   "max_hwm": p.max_hwm, "samples": p.samples})
        };
        json!({
            "ok": self.ok, "error": self.error,
            "src_status": self.src_status, "dst_status": self.dst_status,
            "wall_s": self.wall_s, "loadavg": self.loadavg, "src_cpu_s": self.src_cpu_s, "dst_cpu_s": self.dst_cpu_s,
            "src_before": m(&self.src_before), "dst_before": m(&self.dst_before), "dst_after": m(&self.dst_after),
            "src_peak": p(&self.src_peak), "dst_peak": p(&self.dst_peak),
            "series": self.series.to_json(),
        })
    }
}

/// The result of a run that failed before its migration (`error`).
pub fn failed_run(error: String) -> RunResult {
    not_run(Some(error))
}

/// A run that has not moved anything yet: not ok, nothing measured but the
/// load average now.
fn not_run(error: Option<String>) -> RunResult {
    RunResult {
        ok: false,
        error,
        src_status: Value::Null,
        dst_status: Value::Null,
        wall_s: 0.0,
        src_cpu_s: None,
        dst_cpu_s: None,
        src_before: Mem::default(),
        dst_before: Mem::default(),
        src_peak: Peaks::default(),
        dst_peak: Peaks::default(),
        dst_after: Mem::default(),
        loadavg: loadavg(),
        series: Series::new(SERIES_GAP),
    }
}

/// Reads a number at the top level of a status object (or under `stats`).
pub fn num(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64).or_else(|| {
        v.get("stats")
            .and_then(|s| s.get(key))
            .and_then(Value::as_f64)
    })
}

/// The shortest gap between two kept samples of [`RunResult::series`].
const SERIES_GAP: Duration = Duration::from_millis(20);

/// Runs one migration from `src` to `dst` (both up; the settle wait is done here).
pub fn migrate(env: &Env, src: &mut Vmm, dst: &mut Vmm, spec: &MigrateSpec) -> RunResult {
    let port = ferry_tests::free_tcp_port();
    let mut res = not_run(None);
    // The receive request may answer only at the end: the harness runs it on a thread.
    let recv_body = match &spec.tls {
        Some((_, d)) => json!({ "tls_dir": d }),
        None => json!({ "tls": false }),
    };
    let sock = ferry_tests::unix_sock_of(dst);
    let url = if spec.unix {
        format!("unix:{}", sock.display())
    } else {
        tcp_url_of(dst, port)
    };
    let recv = match guarded("vm.receive-migration", || {
        if spec.unix {
            ferry_tests::start_receive_unix(dst, &sock)
        } else {
            start_receive_with(dst, port, recv_body)
        }
    }) {
        Ok(h) => h,
        Err(e) => {
            res.error = Some(e);
            return res;
        }
    };
    env.settle();
    res.loadavg = loadavg();

    let mut body = json!({
        "destination_url": url,
        "connections": spec.connections,
        "downtime_ms": spec.downtime_ms,
    });
    if let Some(ds) = &spec.device_state {
        body["device_state"] = ds.clone().into();
    }
    if let Some(p) = spec.device_precopy {
        body["device_precopy"] = p.into();
    }
    match &spec.tls {
        Some((s, _)) => body["tls_dir"] = json!(s),
        None if spec.unix => {}
        None => body["tls"] = json!(false),
    }
    if spec.zero_copy {
        body["zero_copy"] = json!(true);
    }
    if let Some(c) = &spec.compression {
        body["compression"] = json!(c);
    }

    let (spid, dpid) = (src.pid(), dst.pid());
    res.src_before = mem(src);
    res.dst_before = mem(dst);
    let src_cpu0 = procfs::cpu_seconds(spid);
    let dst_cpu0 = procfs::cpu_seconds(dpid);
    let sampler = Sampler::start(vec![spid, dpid], Duration::from_millis(10));
    let t0 = Instant::now();
    res.series.start(t0);
    match try_api(&src.sock, "PUT", "vm.send-migration", Some(&body)) {
        Ok((st, _)) if ferry_tests::ok(st) => {}
        Ok((st, v)) => res.error = Some(format!("vm.send-migration: {st} {v}")),
        Err(e) => res.error = Some(format!("vm.send-migration: {e}")),
    }
    // Poll both sides until the destination says completed (or anything fails).
    let mut done = false;
    let mut src_cpu1 = None;
    while res.error.is_none() && t0.elapsed() < spec.timeout {
        if src.is_running() {
            if let Some(v) = src.migration_status() {
                res.series.record(&v);
                if matches!(mig_state(&v), "failed" | "cancelled") {
                    res.error = Some(format!(
                        "source: {}",
                        v.get("error").cloned().unwrap_or(Value::Null)
                    ));
                }
                res.src_status = v;
            }
        } else if src_cpu1.is_none() {
            // Exited but not reaped yet: /proc/PID/stat still has its CPU times.
            src_cpu1 = procfs::cpu_seconds(spid);
            match src.wait_exit(Duration::from_secs(10)) {
                Some(s) if s.success() => {}
                s => res.error = Some(format!("source exited {s:?}: {}", stderr_tail(src))),
            }
        }
        match dst.migration_status() {
            Some(v) => {
                let st = mig_state(&v).to_string();
                res.dst_status = v;
                if st == "completed" {
                    done = true;
                    break;
                }
                if st == "failed" || st == "cancelled" {
                    let e = res.dst_status.get("error").cloned().unwrap_or(Value::Null);
                    res.error = Some(format!("destination: {e}"));
                }
            }
            None if !dst.is_running() => {
                res.error = Some(format!("destination died: {}", stderr_tail(dst)))
            }
            None => {}
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    res.wall_s = t0.elapsed().as_secs_f64();
    let dst_cpu1 = procfs::cpu_seconds(dpid);
    res.dst_after = mem(dst);
    if done {
        // The destination may report completion before the bench saw the
        // source's: its final status holds the figures (total time, setup)
        // the run is measured by, and reading it lets the source exit.
        if mig_state(&res.src_status) != "completed" && src.is_running() {
            if let Some(v) = src.migration_status() {
                res.series.record(&v);
                res.src_status = v;
            }
        }
        let t = Instant::now();
        while src.is_running() && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(5));
        }
        if src_cpu1.is_none() {
            src_cpu1 = procfs::cpu_seconds(spid);
        }
        match src.wait_exit(Duration::from_secs(1)) {
            Some(s) if s.success() => res.ok = true,
            Some(s) => {
                res.error = Some(format!(
                    "source exited {s} after completion: {}",
                    stderr_tail(src)
                ))
            }
            None => res.error = Some("source did not exit after completion".into()),
        }
    } else if res.error.is_none() {
        res.error = Some(format!("timed out after {:?}", spec.timeout));
    }
    if !recv.is_finished() && !done {
        // The receive thread holds a request open; ending the destination ends it.
        dst.kill();
    }
    let peaks = sampler.finish();
    res.src_peak = peaks[0];
    res.dst_peak = peaks[1];
    res.src_cpu_s = src_cpu0
        .zip(src_cpu1.or(res.src_peak.last_cpu))
        .map(|(a, b)| b - a);
    res.dst_cpu_s = dst_cpu0.zip(dst_cpu1).map(|(a, b)| b - a);
    res
}

/// /proc/loadavg's 1-minute figure (other engineers' builds share the machine).
pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

/// Fills `path` with `bytes` of xorshift64* output (incompressible, no zero pages).
pub fn random_file(path: &Path, bytes: u64, threads: usize) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    if std::fs::metadata(path)
        .map(|m| m.len() == bytes)
        .unwrap_or(false)
    {
        return Ok(());
    }
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.set_len(bytes).map_err(|e| e.to_string())?;
    let chunk = 8u64 << 20;
    let chunks = bytes.div_ceil(chunk);
    let per = chunks.div_ceil(threads as u64);
    let err = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for t in 0..threads as u64 {
            let (f, err) = (&f, &err);
            s.spawn(move || {
                let mut x: u64 =
                    0x9E37_79B9_7F4A_7C15 ^ (t + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let mut buf = vec![0u8; chunk as usize];
                for c in t * per..((t + 1) * per).min(chunks) {
                    for w in buf.chunks_exact_mut(8) {
                        x ^= x >> 12;
                        x ^= x << 25;
                        x ^= x >> 27;
                        w.copy_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
                    }
                    let off = c * chunk;
                    let len = chunk.min(bytes - off) as usize;
                    if let Err(e) = f.write_all_at(&buf[..len], off) {
                        *err.lock().unwrap() = Some(e.to_string());
                        return;
                    }
                }
            });
        }
    });
    match err.into_inner().unwrap() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
