//! The benchmarks of issues #3 (RAM) and #4 (devices).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::limits;
use crate::report::{self, f, median, met, min_max, table};
use crate::vmm::{self, Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const GIB: u64 = 1 << 30;
const MIB: f64 = (1u64 << 20) as f64;

/// What a part produces.
pub struct Section {
    pub markdown: String,
    pub json: Value,
    pub failed_runs: usize,
}

pub(crate) fn header(title: &str) -> String {
    let (date, time, _) = report::now();
    format!(
        "### {title}\n\nMeasured {date} {time} UTC on {} (1-min load average at start: {:.2}; \
         the machine is shared with other engineers' builds).\n\n",
        report::machine(),
        vmm::loadavg()
    )
}

/// Boots a source, starts a destination, migrates; the result plus the
/// destination's serial log (to look for MISMATCH lines).
pub(crate) fn one_run(
    env: &Env,
    src: &SourceSpec,
    dst_mem: Option<&str>,
    prefault: Option<u64>,
    mig: &MigrateSpec,
) -> RunResult {
    let fail = |e: String| {
        env.log(&format!("   run failed: {e}"));
        vmm::failed_run(e)
    };
    let mut s = match vmm::boot_source(env, src) {
        Ok(s) => s,
        Err(e) => return fail(format!("source: {e}")),
    };
    let mut d = match vmm::start_destination(env, dst_mem, &src.extra, prefault) {
        Ok(d) => d,
        Err(e) => return fail(format!("destination: {e}")),
    };
    let mut r = vmm::migrate(env, &mut s, &mut d, mig);
    if r.ok {
        // Let the guest run a moment on the destination, then check it found no bad page.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(line) = d.serial.mismatch() {
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

pub(crate) fn total_s(r: &RunResult) -> Option<f64> {
    r.stat("total_time_ms").map(|ms| ms / 1000.0)
}

pub(crate) fn col(runs: &[&RunResult], g: impl Fn(&RunResult) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter(|r| r.ok).filter_map(|r| g(r)).collect()
}

pub(crate) fn med(runs: &[&RunResult], g: impl Fn(&RunResult) -> Option<f64>) -> Option<f64> {
    median(&col(runs, g))
}

pub(crate) fn fails(runs: &[&RunResult]) -> String {
    let n = runs.iter().filter(|r| !r.ok).count();
    if n == 0 {
        format!("{}", runs.len())
    } else {
        format!("{} ({} failed)", runs.len(), n)
    }
}

/// The time-series chart of the representative run of `runs` (the ok run
/// nearest the median total) as `docs/img/SUITE-series.svg`, and the
/// Markdown that shows it.
pub(crate) fn series_chart(
    opts: &Opts,
    suite: &str,
    title: &str,
    what: &str,
    runs: &[&RunResult],
) -> String {
    let ok: Vec<&RunResult> = runs.iter().copied().filter(|r| r.ok).collect();
    let key: fn(&RunResult) -> Option<f64> = if suite == "downtime" {
        |r| r.stat("downtime_ms")
    } else {
        total_s
    };
    let rep = crate::series::median_pick(&ok, key).or_else(|| runs.first().copied());
    match rep {
        Some(r) => crate::series_svg::write_suite(&opts.root, suite, title, what, &r.series),
        None => String::new(),
    }
}

pub(crate) fn first_error(runs: &[&RunResult]) -> Option<String> {
    runs.iter().find_map(|r| r.error.clone())
}

/// Median of `n` measurements (errors are logged and skipped).
fn measure(
    env: &Env,
    what: &str,
    n: usize,
    mut m: impl FnMut() -> Result<f64, String>,
) -> (Option<f64>, Vec<f64>) {
    let mut v = Vec::new();
    for i in 0..n {
        match m() {
            Ok(x) => {
                env.log(&format!("   {what} #{}: {:.3} GB/s", i + 1, x / 1e9));
                v.push(x)
            }
            Err(e) => env.log(&format!("   {what}: {e}")),
        }
    }
    (median(&v), v)
}

// ---------------------------------------------------------------- RAM (#3)

/// RAM throughput: limits, then (with `migrate`) the full-memory migrations.
pub fn ram(env: &Env, opts: &Opts, migrate: bool) -> Section {
    let lim_runs = opts.runs.min(3);
    env.log("limit: first-touch, 1 and 2 threads, 4 GiB");
    let (ft1, ft1_all) = measure(env, "first-touch 1T", lim_runs, || {
        limits::first_touch(env, 4, 1)
    });
    let (ft2, ft2_all) = measure(env, "first-touch 2T", lim_runs, || {
        limits::first_touch(env, 4, 2)
    });
    let mut iperf = Vec::new();
    for &p in &opts.conns {
        env.log(&format!("limit: iperf3 -P {p}"));
        let (m, all) = measure(env, &format!("iperf3 -P{p}"), lim_runs, || {
            limits::iperf3(env, p, 5)
        });
        iperf.push((p, m, all));
    }
    let mut md = if migrate {
        header("RAM throughput (issue #3): full 4 GiB of incompressible memory, paused guest")
    } else {
        header("Host limits")
    };
    md.push_str(&format!("Limits measured in the same run (median of {lim_runs}, each after a 6 s settle; 1 GB = 10^9 bytes; load average {:.2} at the end):\n\n", vmm::loadavg()));
    let span = |all: &[f64]| {
        min_max(all)
            .map(|(a, b)| format!("{:.2}–{:.2}", a / 1e9, b / 1e9))
            .unwrap_or_else(|| "–".into())
    };
    let mut rows = vec![
        vec![
            "first-touch, 1 thread (4 GiB)".into(),
            format!("{} GB/s", f(ft1.map(|x| x / 1e9), 3)),
            span(&ft1_all),
        ],
        vec![
            "first-touch, 2 threads (4 GiB): **cold limit**".into(),
            format!("{} GB/s", f(ft2.map(|x| x / 1e9), 3)),
            span(&ft2_all),
        ],
    ];
    for (p, m, all) in &iperf {
        rows.push(vec![
            format!("iperf3 loopback -P {p}: **warm limit** at {p} conn."),
            format!("{} GB/s", f(m.map(|x| x / 1e9), 2)),
            span(all),
        ]);
    }
    md.push_str(&table(&["limit", "median", "min–max (GB/s)"], &rows));
    let mut js = json!({
        "first_touch_1t_bps": ft1_all, "first_touch_2t_bps": ft2_all,
        "iperf3": iperf.iter().map(|(p, _, a)| json!({"parallel": p, "bps": a})).collect::<Vec<_>>(),
    });
    if !migrate {
        return Section {
            markdown: md,
            json: js,
            failed_runs: 0,
        };
    }

    let guest = 4 * GIB;
    let file = PathBuf::from("/dev/shm/ferry-bench-4g.img");
    env.log(&format!(
        "writing 4 GiB of xorshift output to {}",
        file.display()
    ));
    if let Err(e) = vmm::random_file(&file, guest, 2) {
        md.push_str(&format!("\nCould not create {}: {e}\n", file.display()));
        return Section {
            markdown: md,
            json: js,
            failed_runs: 1,
        };
    }
    let src = SourceSpec {
        memory: format!("size=4G,file={}", file.display()),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: true,
    };
    let mut all: Vec<(bool, u32, RunResult)> = Vec::new();
    for &c in &opts.conns {
        for warm in [true, false] {
            for i in 0..opts.runs {
                env.log(&format!(
                    "ram: {} destination, {c} connection(s), run {}",
                    if warm { "warm" } else { "cold" },
                    i + 1
                ));
                let r = if warm {
                    one_run(
                        env,
                        &src,
                        Some("size=4G,prefault=on"),
                        Some(guest),
                        &MigrateSpec::new(c),
                    )
                } else {
                    one_run(env, &src, None, None, &MigrateSpec::new(c))
                };
                if r.ok {
                    env.log(&format!(
                        "   {:.3} s, {:.2} GiB/s, downtime {} ms, cpu src {} s dst {} s, src anon peak {:.0} MiB",
                        total_s(&r).unwrap_or(0.0),
                        guest as f64 / GIB as f64 / total_s(&r).unwrap_or(f64::NAN),
                        f(r.stat("downtime_ms"), 1),
                        f(r.src_cpu_s, 2),
                        f(r.dst_cpu_s, 2),
                        r.src_peak.max_anon as f64 / MIB
                    ));
                }
                all.push((warm, c, r));
            }
        }
    }
    if !opts.keep_file {
        let _ = std::fs::remove_file(&file);
    }

    let g = guest as f64;
    let bps = move |r: &RunResult| total_s(r).map(|t| g / t);
    let src_extra = |r: &RunResult| Some(r.src_peak.max_anon as f64 / MIB);
    let dst_extra = move |r: &RunResult| Some((r.dst_peak.max_anon_shmem as f64 - g) / MIB);
    let mut rows = Vec::new();
    let mut warm_ratios = Vec::new();
    let mut cold_ratios = Vec::new();
    let mut failed = 0;
    for warm in [true, false] {
        for &c in &opts.conns {
            let runs: Vec<&RunResult> = all
                .iter()
                .filter(|(w, cc, _)| *w == warm && *cc == c)
                .map(|x| &x.2)
                .collect();
            failed += runs.iter().filter(|r| !r.ok).count();
            let m = med(&runs, bps);
            let limit = if warm {
                iperf.iter().find(|x| x.0 == c).and_then(|x| x.1)
            } else {
                ft2
            };
            let ratio = m.zip(limit).map(|(a, b)| a / b);
            if let Some(rt) = ratio {
                if warm {
                    warm_ratios.push((c, rt))
                } else {
                    cold_ratios.push((c, rt))
                }
            }
            let mut row = vec![
                (if warm { "warm" } else { "cold" }).to_string(),
                c.to_string(),
                fails(&runs),
                f(m.map(|x| x / GIB as f64), 2),
                f(med(&runs, total_s), 3),
                f(med(&runs, |r| r.stat("downtime_ms")), 1),
                f(med(&runs, |r| r.src_cpu_s), 2),
                f(med(&runs, |r| r.dst_cpu_s), 2),
                f(med(&runs, src_extra), 0),
                f(med(&runs, dst_extra), 0),
                f(med(&runs, |r| Some(r.loadavg)), 2),
                format!("{} GB/s", f(limit.map(|x| x / 1e9), 2)),
                ratio
                    .map(|r| format!("{:.0}%", r * 100.0))
                    .unwrap_or_else(|| "–".into()),
            ];
            if m.is_none() {
                if let Some(e) = first_error(&runs) {
                    row[3] = format!(
                        "failed: {}",
                        e.chars().take(80).collect::<String>().replace('|', "/")
                    );
                }
            }
            rows.push(row);
        }
    }
    md.push_str("\nMigrations (medians; throughput = 4 GiB / total_time; extra memory = peak during the migration, see method):\n\n");
    md.push_str(&table(
        &[
            "destination",
            "conn.",
            "runs",
            "GiB/s",
            "total (s)",
            "downtime (ms)",
            "CPU src (s)",
            "CPU dst (s)",
            "src extra (MiB)",
            "dst extra (MiB)",
            "load avg",
            "limit",
            "% of limit",
        ],
        &rows,
    ));
    let src_peak = all
        .iter()
        .filter(|x| x.2.ok)
        .map(|x| x.2.src_peak.max_anon as f64 / MIB)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    let fmt_ratios = |v: &[(u32, f64)]| {
        v.iter()
            .map(|(c, r)| format!("{:.0}% at {c}", r * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let warm_ok = if warm_ratios.len() == opts.conns.len() {
        Some(warm_ratios.iter().all(|x| x.1 >= 0.9))
    } else {
        None
    };
    let cold_best = cold_ratios
        .iter()
        .map(|x| x.1)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                "warm ≥ 90% of iperf3 at the same -P".into(),
                fmt_ratios(&warm_ratios),
                met(warm_ok).into(),
            ],
            vec![
                "cold ≥ 90% of 2-thread first-touch".into(),
                fmt_ratios(&cold_ratios),
                met(cold_best.map(|b| b >= 0.9)).into(),
            ],
            vec![
                "sender extra memory < 64 MiB".into(),
                format!("max peak RssAnon {} MiB", f(src_peak, 0)),
                met(src_peak.map(|p| p < 64.0)).into(),
            ],
        ],
    ));
    let c = if opts.conns.contains(&4) {
        4
    } else {
        opts.conns[0]
    };
    let group: Vec<&RunResult> = all
        .iter()
        .filter(|(w, cc, r)| !*w && *cc == c && r.ok)
        .map(|x| &x.2)
        .collect();
    md.push_str(&series_chart(
        opts,
        "ram",
        &format!("4 GiB paused guest, cold destination, {c} connections"),
        &format!("cold destination, {c} connections, the median total"),
        &group,
    ));
    js["guest_bytes"] = guest.into();
    js["runs"] = all
        .iter()
        .map(|(w, c, r)| json!({"destination": if *w {"warm"} else {"cold"}, "connections": c, "result": r.to_json()}))
        .collect();
    Section {
        markdown: md,
        json: js,
        failed_runs: failed,
    }
}

// ---------------------------------------------------------------- idle

/// Untouched guests of 1 GiB and 16 GiB, interleaved run by run so both
/// see the same machine: the cost of a migration must grow with populated
/// memory, not with the guest's size.
pub fn idle(env: &Env, opts: &Opts) -> Section {
    let spec = |size: &str| SourceSpec {
        memory: format!("size={size}"),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: true,
    };
    let (big, small) = (spec("16G"), spec("1G"));
    let mut all_big = Vec::new();
    let mut all_small = Vec::new();
    let mut all_cold = Vec::new();
    for i in 0..opts.runs {
        // The destination is told its guest's memory (`--memory`), as an
        // operator provisions it: it makes the KVM VM before the migration.
        // The last case does not, and makes it when the migration arrives.
        for (name, src, dst, out) in [
            ("1 GiB", &small, Some("size=1G"), &mut all_small),
            ("16 GiB", &big, Some("size=16G"), &mut all_big),
            (
                "16 GiB, destination not provisioned",
                &big,
                None,
                &mut all_cold,
            ),
        ] {
            env.log(&format!("idle: {name} untouched guest, run {}", i + 1));
            let r = one_run(env, src, dst, None, &MigrateSpec::new(4));
            if r.ok {
                env.log(&format!(
                    "   total {} ms, setup {} ms, downtime {} ms, transferred {} bytes",
                    f(r.stat("total_time_ms"), 1),
                    f(r.stat("setup_time_ms"), 1),
                    f(r.stat("downtime_ms"), 1),
                    f(r.stat("transferred_bytes"), 0)
                ));
            }
            out.push(r);
        }
    }
    let runs: Vec<&RunResult> = all_big.iter().collect();
    let runs_small: Vec<&RunResult> = all_small.iter().collect();
    let runs_cold: Vec<&RunResult> = all_cold.iter().collect();
    let t = med(&runs, total_s);
    let t_small = med(&runs_small, total_s);
    let ratio = t.zip(t_small).map(|(b, s)| b / s);
    let xfer = med(&runs, |r| r.stat("transferred_bytes"));
    let row = |name: &str, runs: &[&RunResult]| {
        vec![
            name.to_string(),
            fails(runs),
            f(med(runs, total_s).map(|x| x * 1000.0), 1),
            f(med(runs, |r| r.stat("downtime_ms")), 1),
            f(med(runs, |r| r.stat("setup_time_ms")), 1),
            f(
                med(runs, |r| r.stat("transferred_bytes")).map(|x| x / MIB),
                2,
            ),
            f(med(runs, |r| Some(r.dst_after.rss as f64 / MIB)), 0),
            f(med(runs, |r| r.src_cpu_s), 3),
        ]
    };
    let mut md = header(
        "Idle guests: 1 GiB and 16 GiB never written, paused, 4 connections, destination memory untouched",
    );
    md.push_str(&table(
        &[
            "guest",
            "runs",
            "total time (ms)",
            "downtime (ms)",
            "setup (ms)",
            "transferred (MiB)",
            "dst RSS after (MiB)",
            "CPU src (s)",
        ],
        &[
            row("1 GiB", &runs_small),
            row("16 GiB", &runs),
            row("16 GiB, destination not provisioned", &runs_cold),
        ],
    ));
    if t.is_none() {
        if let Some(e) = first_error(&runs) {
            md.push_str(&format!("\nFailed: {e}\n"));
        }
    }
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                "idle 16 GiB within 1.2x of idle 1 GiB (median totals, same run)".into(),
                format!("{}x", f(ratio, 2)),
                met(ratio.map(|r| r <= 1.2)).into(),
            ],
            vec![
                "no scan of unpopulated memory (transferred small)".into(),
                format!("{} MiB transferred", f(xfer.map(|x| x / MIB), 2)),
                met(xfer.map(|x| x < 64.0 * MIB)).into(),
            ],
        ],
    ));
    md.push_str(&series_chart(
        opts,
        "idle",
        "Idle 16 GiB guest, 4 connections",
        "the median total",
        &runs,
    ));
    let failed = runs
        .iter()
        .chain(&runs_small)
        .chain(&runs_cold)
        .filter(|r| !r.ok)
        .count();
    Section {
        markdown: md,
        json: json!({
            "runs": all_big.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "runs_1g": all_small.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "runs_16g_not_provisioned": all_cold.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "ratio_16g_to_1g": ratio,
        }),
        failed_runs: failed,
    }
}

// ---------------------------------------------------------------- downtime

pub fn downtime(env: &Env, opts: &Opts) -> Section {
    let n = opts.runs.max(5);
    let src = SourceSpec {
        memory: "size=512M".into(),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: false,
    };
    let mut all = Vec::new();
    for i in 0..n {
        env.log(&format!("downtime: running guest region=1, run {}", i + 1));
        let r = one_run(env, &src, None, None, &MigrateSpec::new(4));
        if r.ok {
            env.log(&format!(
                "   downtime {} ms, total {} ms",
                f(r.stat("downtime_ms"), 2),
                f(r.stat("total_time_ms"), 1)
            ));
        }
        all.push(r);
    }
    let runs: Vec<&RunResult> = all.iter().collect();
    let d = med(&runs, |r| r.stat("downtime_ms"));
    let each = col(&runs, |r| r.stat("downtime_ms"))
        .iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut md =
        header("Downtime: running 1-vCPU stamp guest (region=1 passes=0, 512 MiB), 4 connections");
    md.push_str(&table(
        &[
            "runs",
            "median downtime (ms)",
            "each run (ms)",
            "median total (ms)",
            "median passes",
        ],
        &[vec![
            fails(&runs),
            f(d, 2),
            each,
            f(med(&runs, |r| r.stat("total_time_ms")), 1),
            f(med(&runs, |r| r.stat("iteration")), 0),
        ]],
    ));
    if d.is_none() {
        if let Some(e) = first_error(&runs) {
            md.push_str(&format!("\nFailed: {e}\n"));
        }
    }
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[vec![
            "downtime ≤ 10 ms (median)".into(),
            format!("{} ms", f(d, 2)),
            met(d.map(|d| d <= 10.0)).into(),
        ]],
    ));
    md.push_str(&series_chart(
        opts,
        "downtime",
        "Running guest (region=1), 512 MiB, 4 connections",
        "the median downtime",
        &runs,
    ));
    let failed = runs.iter().filter(|r| !r.ok).count();
    Section {
        markdown: md,
        json: json!({"runs": all.iter().map(RunResult::to_json).collect::<Vec<_>>()}),
        failed_runs: failed,
    }
}
