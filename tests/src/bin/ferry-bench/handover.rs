//! `handover` (issue #13 §3): a 16 GiB running stamp guest moved to a
//! destination on the same host over `unix:`, its memory handed over
//! (`shared=on`, `file=`), against the same guest over TCP loopback and an
//! anonymous guest copied over `unix:`, all in the same run.

use std::time::Duration;

use serde_json::{json, Value};

use crate::report::{f, met, table};
use crate::suites::{fails, first_error, header, med, series_chart, total_s, Section};
use crate::vmm::{self, Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

/// The guest: a 32 MiB region rewritten forever, in 16 GiB of RAM.
const CMDLINE: &str = "region=32 passes=0";

/// One mode of the part.
struct Mode {
    name: &'static str,
    memory: String,
    /// The `file=` backing, made afresh (sparse, 16 GiB) before each run.
    file: Option<std::path::PathBuf>,
    unix: bool,
    connections: u32,
    /// The destination's `--memory`: the guest's size, so that its KVM VM
    /// and memory slots are prepared before the migration, as a live
    /// upgrade starts the new binary with the guest's configuration.
    dest_memory: &'static str,
}

/// Boots, migrates, and checks that the guest goes on at the destination
/// (one more pass, no MISMATCH).
fn run(env: &Env, mode: &Mode) -> RunResult {
    let spec = SourceSpec {
        memory: mode.memory.clone(),
        cmdline: CMDLINE.into(),
        extra: vec![],
        pause: false,
    };
    let fail = |e: String| {
        env.log(&format!("   run failed: {e}"));
        vmm::failed_run(e)
    };
    if let Some(p) = &mode.file {
        let _ = std::fs::remove_file(p);
        let made = std::fs::File::create(p).and_then(|f| f.set_len(16 << 30));
        if let Err(e) = made {
            return fail(format!("memory file {}: {e}", p.display()));
        }
    }
    let mut s = match vmm::boot_source(env, &spec) {
        Ok(s) => s,
        Err(e) => return fail(format!("source: {e}")),
    };
    if s.serial
        .wait_for_line(Duration::from_secs(120), |l| l.contains("stamp: pass 2"))
        .is_none()
    {
        return fail("the source guest completed no second pass".into());
    }
    let mut d = match vmm::start_destination(env, Some(mode.dest_memory), &[], None) {
        Ok(d) => d,
        Err(e) => return fail(format!("destination: {e}")),
    };
    let mut mig = MigrateSpec::new(mode.connections);
    mig.unix = mode.unix;
    let mut r = vmm::migrate(env, &mut s, &mut d, &mig);
    if r.ok {
        let pass = d
            .serial
            .wait_for_line(Duration::from_secs(60), |l| l.contains("stamp: pass"));
        if pass.is_none() {
            r.ok = false;
            r.error = Some("the guest completed no pass on the destination".into());
        } else if let Some(line) = d.serial.mismatch() {
            env.log(&format!("   destination guest: {line}"));
            r.ok = false;
            r.error = Some("guest reported MISMATCH on the destination".into());
        }
    }
    if let Some(e) = &r.error {
        env.log(&format!("   run failed: {e}"));
    }
    r
}

pub fn handover(env: &Env, opts: &Opts) -> Section {
    let file =
        std::env::temp_dir().join(format!("ferry-bench-handover-{}.mem", std::process::id()));
    let modes = [
        Mode {
            name: "unix: handover, shared=on",
            memory: "size=16G,shared=on".into(),
            file: None,
            unix: true,
            connections: 1,
            dest_memory: "size=16G,shared=on",
        },
        Mode {
            name: "unix: handover, file=",
            memory: format!("size=16G,file={}", file.display()),
            file: Some(file.clone()),
            unix: true,
            connections: 1,
            dest_memory: "size=16G,shared=on",
        },
        Mode {
            name: "unix: copy, anonymous",
            memory: "size=16G".into(),
            file: None,
            unix: true,
            connections: 4,
            dest_memory: "size=16G",
        },
        Mode {
            name: "TCP loopback (reference), shared=on",
            memory: "size=16G,shared=on".into(),
            file: None,
            unix: false,
            connections: 4,
            dest_memory: "size=16G,shared=on",
        },
    ];
    let mut all: Vec<Vec<RunResult>> = modes.iter().map(|_| Vec::new()).collect();
    // Interleaved: every mode sees the same machine conditions.
    for i in 0..opts.runs {
        for (m, out) in modes.iter().zip(all.iter_mut()) {
            env.log(&format!("handover: {}, run {}", m.name, i + 1));
            let r = run(env, m);
            if r.ok {
                env.log(&format!(
                    "   total {} ms, downtime {} ms, transferred {} bytes, load {:.2}",
                    f(r.stat("total_time_ms"), 1),
                    f(r.stat("downtime_ms"), 2),
                    f(r.stat("transferred_bytes"), 0),
                    r.loadavg
                ));
            }
            out.push(r);
        }
    }
    let _ = std::fs::remove_file(&file);
    let refs: Vec<Vec<&RunResult>> = all.iter().map(|v| v.iter().collect()).collect();
    let total = |i: usize| med(&refs[i], total_s).map(|s| s * 1000.0);
    let down = |i: usize| med(&refs[i], |r| r.stat("downtime_ms"));
    let reference = total(3);
    let mut md = header(
        "Local migration by memory handover: 16 GiB running stamp guest (region=32), same host",
    );
    md.push_str(
        "Median of the runs per mode, interleaved; the source's `total_time_ms`, downtime from \
         its pause/resume timestamps. Every destination is started with the guest's `--memory` \
         (as a live upgrade starts the new binary with the guest's configuration), so its KVM \
         VM and memory slots exist before the migration; handed-over memory is mapped in place \
         of that RAM. The guest must complete a pass on the destination with no MISMATCH.\n\n",
    );
    let rows: Vec<Vec<String>> = modes
        .iter()
        .enumerate()
        .map(|(i, m)| {
            vec![
                m.name.to_string(),
                fails(&refs[i]),
                m.connections.to_string(),
                f(total(i), 1),
                f(down(i), 2),
                f(med(&refs[i], |r| r.stat("setup_time_ms")), 1),
                f(
                    med(&refs[i], |r| r.stat("transferred_bytes")).map(|b| b / (1 << 20) as f64),
                    2,
                ),
                f(total(i).zip(reference).map(|(t, r)| t / r), 2),
                f(med(&refs[i], |r| Some(r.loadavg)), 2),
            ]
        })
        .collect();
    md.push_str(&table(
        &[
            "mode",
            "runs",
            "connections",
            "total (ms)",
            "downtime (ms)",
            "setup (ms)",
            "transferred (MiB)",
            "total / TCP",
            "load",
        ],
        &rows,
    ));
    for (i, m) in modes.iter().enumerate() {
        if total(i).is_none() {
            if let Some(e) = first_error(&refs[i]) {
                md.push_str(&format!("\n{} failed: {e}\n", m.name));
            }
        }
    }
    let handed = all[0]
        .iter()
        .filter(|r| r.ok)
        .all(|r| r.src_status["memory_handover"] == true);
    md.push_str("\nTargets (shared=on handover):\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                "downtime ≤ 5 ms".into(),
                format!("{} ms (median)", f(down(0), 2)),
                met(down(0).map(|d| d <= 5.0)).into(),
            ],
            vec![
                "total time ≤ 50 ms".into(),
                format!("{} ms (median)", f(total(0), 1)),
                met(total(0).map(|t| t <= 50.0)).into(),
            ],
            vec![
                "no RAM copied (memory handed over)".into(),
                format!("memory_handover in every run: {handed}"),
                met(Some(handed && refs[0].iter().any(|r| r.ok))).into(),
            ],
            vec![
                "the guest goes on, 0 MISMATCH".into(),
                fails(&refs[0]),
                met(Some(refs[0].iter().all(|r| r.ok))).into(),
            ],
        ],
    ));
    md.push_str(&series_chart(
        opts,
        "handover",
        "16 GiB guest handed over on unix:",
        "the median total",
        &refs[0],
    ));
    let failed = all.iter().flatten().filter(|r| !r.ok).count();
    Section {
        markdown: md,
        json: json!({
            "modes": modes.iter().zip(&all).map(|(m, runs)| json!({
                "mode": m.name,
                "memory": m.memory,
                "unix": m.unix,
                "connections": m.connections,
                "runs": runs.iter().map(RunResult::to_json).collect::<Vec<Value>>(),
            })).collect::<Vec<Value>>(),
        }),
        failed_runs: failed,
    }
}
