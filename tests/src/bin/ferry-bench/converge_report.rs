//! The `converge` part (issue #10): rounds of every [`Mode`] of the busy
//! guest, then the tables, the targets and the plots of remaining bytes
//! over time (`docs/img/converge-*.svg`).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::converge::{self, ConvRun, Mode, CAP_MIB_S, CONNS, PRECOPY_LIMIT};
use crate::report::{f, median, met, min_max, table};
use crate::series_svg;
use crate::suites::{header, Section};
use crate::svg;
use crate::vmm::Env;
use crate::Opts;

const MIB: f64 = (1u64 << 20) as f64;

/// Creates a file while it lives (`--hold-file`: tells others on the
/// machine that timed runs are going on) and removes it on drop.
struct Hold(Option<PathBuf>);

impl Hold {
    fn new(env: &Env, p: Option<&PathBuf>) -> Hold {
        if let Some(p) = p {
            match std::fs::write(
                p,
                format!("ferry-bench converge, pid {}\n", std::process::id()),
            ) {
                Ok(()) => env.log(&format!("created {}", p.display())),
                Err(e) => env.log(&format!("warning: cannot create {}: {e}", p.display())),
            }
        }
        Hold(p.cloned())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_file(p);
            eprintln!("[ferry-bench] removed {}", p.display());
        }
    }
}

/// `opts.runs` rounds of every mode (one hold of `--hold-file` per round,
/// a 30 s gap between rounds), then the section.
pub fn converge(env: &Env, opts: &Opts) -> Section {
    let max_load = opts.max_load.unwrap_or(1.0);
    let modes: Vec<Mode> = Mode::ALL
        .into_iter()
        .filter(|m| {
            opts.modes
                .as_ref()
                .is_none_or(|v| v.iter().any(|k| k == m.key()))
        })
        .collect();
    if let Some(v) = &opts.modes {
        for k in v
            .iter()
            .filter(|k| !Mode::ALL.iter().any(|m| m.key() == *k))
        {
            env.log(&format!("warning: --modes: no mode {k:?}"));
        }
    }
    let mut runs: Vec<ConvRun> = Vec::new();
    for round in 0..opts.runs {
        if round > 0 {
            env.log("gap of 30 s between rounds");
            std::thread::sleep(Duration::from_secs(30));
        }
        let _hold = Hold::new(env, opts.hold_file.as_ref());
        let mut budget = converge::ROUND_WAIT;
        for &mode in &modes {
            env.log(&format!("converge: {}, round {}", mode.key(), round + 1));
            let r = converge::run(env, mode, max_load, &mut budget);
            env.log(&format!(
                "   {}: total {} s, downtime {} ms, throttle {} %, {} passes, switch-over {:?}, \
                 load {:.2}/{:.2}, {}",
                if r.ok { "ok" } else { "FAILED" },
                f(r.total_s(), 2),
                f(r.downtime_ms(), 1),
                r.max_throttle(),
                r.passes(),
                r.switchover_reason(),
                r.load_gate,
                r.load_send,
                r.witness
            ));
            runs.push(r);
        }
    }
    section(opts, &runs)
}

/// "median (min–max)" of the values, "–" without any.
fn span(v: &[f64], prec: usize) -> String {
    match (median(v), min_max(v)) {
        (Some(m), Some((lo, hi))) if v.len() > 1 => {
            format!(
                "{} ({}–{})",
                f(Some(m), prec),
                f(Some(lo), prec),
                f(Some(hi), prec)
            )
        }
        (Some(m), _) => f(Some(m), prec),
        _ => "–".into(),
    }
}

fn of(runs: &[&ConvRun], g: impl Fn(&ConvRun) -> Option<f64>) -> Vec<f64> {
    runs.iter().filter(|r| r.ok).filter_map(|r| g(r)).collect()
}

fn reasons(runs: &[&ConvRun]) -> String {
    let mut seen: Vec<(String, usize)> = Vec::new();
    for r in runs.iter().filter(|r| r.ok) {
        let why = r.switchover_reason().unwrap_or_else(|| "none".into());
        match seen.iter_mut().find(|(w, _)| *w == why) {
            Some((_, n)) => *n += 1,
            None => seen.push((why, 1)),
        }
    }
    let v: Vec<String> = seen.iter().map(|(w, n)| format!("{w} ×{n}")).collect();
    if v.is_empty() {
        "–".into()
    } else {
        v.join(", ")
    }
}

fn section(opts: &Opts, all: &[ConvRun]) -> Section {
    let by = |m: Mode| -> Vec<&ConvRun> { all.iter().filter(|r| r.mode == m).collect() };
    let reference = median(&of(&by(Mode::Reference), ConvRun::total_s));
    let mut md = header(&format!(
        "Busy guest (issue #10): `{}` in 1 GiB, {CAP_MIB_S} MiB/s cap, {CONNS} connections, \
         namespace link",
        converge::BUSY
    ));
    md.push_str(&format!(
        "Rounds of every mode, one run of each per round ({} rounds); before each run the bench \
         waited for the 1-min load average to fall below {:.1} (\"load\" column: at that gate / \
         at the send, when the guest's own vCPU had been busy for ~10 s). Total = the source's \
         `total_time_ms` (from the send request); downtime = pause → resume timestamps; throttle \
         = highest `cpu_throttle_percent` seen (status every 100 ms and `throttle-changed` \
         events); fault latency, requests and post-copy bytes = the destination's status; bytes \
         moved = the destination's `transferred_bytes` (pre-copy only: the source's at the \
         cancel); switch wait = how long the destination waited at the post-copy switch for \
         the pre-copy data and devices still in flight, and stale MiB dropped = the pre-copy RAM \
         it read and threw away meanwhile (both from its debug log, \
         `RUST_LOG=info,migration::recv=debug`; \"–\" without it). Pre-copy only is cancelled after {} s. Every completed run was witnessed by \
         the guest (a further pass on the destination, 0 MISMATCH); every cancelled one by the \
         source guest running on.\n\n",
        opts.runs,
        opts.max_load.unwrap_or(1.0),
        PRECOPY_LIMIT.as_secs()
    ));
    let mut rows = Vec::new();
    for m in Mode::ALL {
        let runs = by(m);
        if runs.is_empty() {
            continue;
        }
        let failed = runs.iter().filter(|r| !r.ok).count();
        let done = runs.iter().filter(|r| r.ok && r.completed).count();
        let tot = of(&runs, ConvRun::total_s);
        let total = if m == Mode::PreCopy && done == 0 {
            format!("did not converge in {} s", PRECOPY_LIMIT.as_secs())
        } else {
            span(&tot, 2)
        };
        let ratio = median(&tot).zip(reference).map(|(t, r)| t / r);
        let p50 = span(&of(&runs, |r| r.post("postcopy_fault_latency_us_p50")), 0);
        let p99 = span(&of(&runs, |r| r.post("postcopy_fault_latency_us_p99")), 0);
        let bytes = span(&of(&runs, |r| r.bytes().map(|b| b / MIB)), 0);
        let pbytes = span(&of(&runs, |r| r.post("postcopy_bytes").map(|b| b / MIB)), 0);
        rows.push(vec![
            m.label().to_string(),
            if failed > 0 {
                format!("{} ({failed} failed)", runs.len())
            } else {
                format!("{}", runs.len())
            },
            format!("{done}"),
            total,
            if m == Mode::Reference {
                "1".into()
            } else {
                f(ratio, 2)
            },
            span(&of(&runs, ConvRun::downtime_ms), 1),
            span(&of(&runs, |r| Some(r.max_throttle() as f64)), 0),
            span(&of(&runs, |r| Some(r.passes() as f64)), 0),
            reasons(&runs),
            format!("{p50} / {p99}"),
            span(&of(&runs, |r| r.post("postcopy_requests")), 0),
            format!(
                "{} / {}",
                span(&of(&runs, ConvRun::switch_wait_ms), 1),
                span(&of(&runs, |r| r.stale_bytes().map(|b| b / MIB)), 1)
            ),
            format!("{bytes} ({pbytes})"),
            format!(
                "{} / {}",
                span(&of(&runs, |r| Some(r.load_gate)), 2),
                span(&of(&runs, |r| Some(r.load_send)), 2)
            ),
        ]);
    }
    md.push_str(&table(
        &[
            "mode",
            "runs",
            "completed",
            "total (s), median (min–max)",
            "× one RAM pass",
            "downtime (ms)",
            "throttle max (%)",
            "passes",
            "switchover_reason",
            "fault latency p50 / p99 (µs)",
            "post-copy requests",
            "switch wait (ms) / stale MiB dropped",
            "MiB moved (in post-copy)",
            "load gate / send",
        ],
        &rows,
    ));
    for r in all.iter().filter(|r| !r.ok) {
        md.push_str(&format!(
            "\nFailed run ({}): {}\n",
            r.mode.key(),
            r.error.clone().unwrap_or_default()
        ));
    }
    let gate = opts.max_load.unwrap_or(1.0);
    let busy: Vec<&ConvRun> = all.iter().filter(|r| r.load_gate >= gate).collect();
    if !busy.is_empty() {
        md.push_str(&format!(
            "\n**Busy machine:** {} of {} runs started with the 1-min load at or above {gate:.1} \
             (the gate's wait budget of {} s per round was spent; loads {}): their figures are \
             from a busy machine.\n",
            busy.len(),
            all.len(),
            converge::ROUND_WAIT.as_secs(),
            busy.iter()
                .map(|r| format!("{} {:.2}", r.mode.key(), r.load_gate))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(b) = &opts.baseline {
        md.push_str(&before_after(b, opts.baseline_note.as_deref(), &by));
    }
    md.push_str(&targets(&by, reference));
    md.push_str(&charts(opts, &by));
    let failed = all.iter().filter(|r| !r.ok).count();
    Section {
        markdown: md,
        json: json!({
            "guest": converge::BUSY, "memory": converge::MEMORY, "max_bandwidth_mib_s": CAP_MIB_S,
            "connections": CONNS, "precopy_limit_s": PRECOPY_LIMIT.as_secs(),
            "reference_total_s": reference,
            "runs": all.iter().map(ConvRun::to_json).collect::<Vec<Value>>(),
        }),
        failed_runs: failed,
    }
}

/// A mode's ok runs in an earlier raw JSON: (downtime ms, total s) values.
fn baseline_of(old: &Value, m: Mode) -> (Vec<f64>, Vec<f64>, usize) {
    let runs: Vec<&Value> = old["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["mode"] == m.key() && r["ok"] == true)
        .collect();
    let get = |k: &str| {
        runs.iter()
            .filter_map(|r| r[k].as_f64())
            .collect::<Vec<f64>>()
    };
    (get("downtime_ms"), get("total_s"), runs.len())
}

/// The "before" table: the medians of `path` (an earlier `converge` raw
/// JSON) beside this run's.
fn before_after<'a>(
    path: &std::path::Path,
    note: Option<&str>,
    by: &dyn Fn(Mode) -> Vec<&'a ConvRun>,
) -> String {
    let old = match std::fs::read_to_string(path)
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_str::<Value>(&t).map_err(|e| e.to_string()))
    {
        Ok(v) => v,
        Err(e) => return format!("\n_Baseline {}: {e}._\n", path.display()),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for m in Mode::ALL {
        let (bd, bt, bn) = baseline_of(&old, m);
        let runs = by(m);
        let n = runs.iter().filter(|r| r.ok).count();
        if bn == 0 && n == 0 {
            continue;
        }
        let d = of(&runs, ConvRun::downtime_ms);
        let t = of(&runs, ConvRun::total_s);
        rows.push(vec![
            m.label().to_string(),
            format!("{bn} / {n}"),
            span(&bd, 1),
            span(&d, 1),
            span(&bt, 2),
            span(&t, 2),
        ]);
    }
    let mut s = format!(
        "\nBefore and after{}: \"before\" = `resources/bench/results/{name}`, \"after\" = this \
         run (medians, min–max; ok runs only):\n\n",
        note.map(|n| format!(" ({n})")).unwrap_or_default()
    );
    s.push_str(&table(
        &[
            "mode",
            "ok runs before / after",
            "downtime before (ms)",
            "downtime after (ms)",
            "total before (s)",
            "total after (s)",
        ],
        &rows,
    ));
    s
}

fn targets<'a>(by: &dyn Fn(Mode) -> Vec<&'a ConvRun>, reference: Option<f64>) -> String {
    let med = |m: Mode, g: &dyn Fn(&ConvRun) -> Option<f64>| median(&of(&by(m), g));
    let mut rows = Vec::new();
    let ac_t = med(Mode::AutoConverge, &ConvRun::total_s);
    let ac_d = med(Mode::AutoConverge, &ConvRun::downtime_ms);
    rows.push(vec![
        "auto-converge completes in ≤ 20 s".into(),
        format!("{} s", f(ac_t, 1)),
        met(ac_t.map(|t| t <= 20.0)).into(),
    ]);
    rows.push(vec![
        "auto-converge downtime ≤ 300 ms".into(),
        format!("{} ms", f(ac_d, 1)),
        met(ac_d.map(|d| d <= 300.0)).into(),
    ]);
    for m in [
        Mode::PostCopyRequest,
        Mode::PostCopyPolicy,
        Mode::PostCopyStart,
    ] {
        let d = med(m, &ConvRun::downtime_ms);
        let p99 = med(m, &|r| r.post("postcopy_fault_latency_us_p99"));
        let t = med(m, &ConvRun::total_s);
        let ratio = t.zip(reference).map(|(t, r)| t / r);
        rows.push(vec![
            format!("{}: downtime ≤ 10 ms", m.label()),
            format!("{} ms", f(d, 1)),
            met(d.map(|d| d <= 10.0)).into(),
        ]);
        rows.push(vec![
            format!("{}: fault latency p99 ≤ 5 ms", m.label()),
            format!("{} ms", f(p99.map(|p| p / 1000.0), 2)),
            met(p99.map(|p| p <= 5000.0)).into(),
        ]);
        rows.push(vec![
            format!("{}: total ≤ 1.3 × one RAM pass", m.label()),
            format!("{} s / {} s = {}×", f(t, 2), f(reference, 2), f(ratio, 2)),
            met(ratio.map(|r| r <= 1.3)).into(),
        ]);
    }
    let mut s = String::from(
        "\nTargets (medians; \"one RAM pass\" = the reference row, measured in the same run):\n\n",
    );
    s.push_str(&table(&["target", "measured", "status"], &rows));
    s.push_str(
        "\nQEMU 7.2, measured by the issue's author on the same guest (`region=256`, 1 GiB, \
         100 MiB/s cap, loopback; not re-measured here):\n\n",
    );
    s.push_str(&table(
        &["mode", "QEMU 7.2", "Ferry here (median)"],
        &[
            vec![
                "pre-copy only".into(),
                "never converged in 90 s".into(),
                if med(Mode::PreCopy, &ConvRun::total_s).is_some() {
                    format!(
                        "converged in {} s",
                        f(med(Mode::PreCopy, &ConvRun::total_s), 1)
                    )
                } else {
                    format!("did not converge in {} s", PRECOPY_LIMIT.as_secs())
                },
            ],
            vec![
                "auto-converge".into(),
                "39 s, throttle 90 %, downtime 28 ms".into(),
                format!(
                    "{} s, throttle {} %, downtime {} ms",
                    f(ac_t, 1),
                    f(
                        med(Mode::AutoConverge, &|r| Some(r.max_throttle() as f64)),
                        0
                    ),
                    f(ac_d, 1)
                ),
            ],
            vec![
                "post-copy".into(),
                "2.9 s, downtime 4 ms".into(),
                format!(
                    "on request after pass 1: {} s, {} ms; from the start: {} s, {} ms",
                    f(med(Mode::PostCopyRequest, &ConvRun::total_s), 1),
                    f(med(Mode::PostCopyRequest, &ConvRun::downtime_ms), 1),
                    f(med(Mode::PostCopyStart, &ConvRun::total_s), 1),
                    f(med(Mode::PostCopyStart, &ConvRun::downtime_ms), 1)
                ),
            ],
        ],
    ));
    s
}

/// Tick positions 0, step, ... covering `max`.
fn ticks(max: f64) -> Vec<f64> {
    let step = [0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0]
        .into_iter()
        .find(|s| max / s <= 10.0)
        .unwrap_or(60.0);
    let n = (max / step).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

fn line(name: String, color: &'static str, r: &ConvRun) -> svg::Series {
    svg::Series {
        name,
        color,
        points: r
            .series
            .samples
            .iter()
            .filter_map(|s| {
                s.remaining_bytes
                    .map(|b| (s.elapsed_ms / 1000.0, b as f64 / MIB, None))
            })
            .collect(),
    }
}

fn charts<'a>(opts: &Opts, by: &dyn Fn(Mode) -> Vec<&'a ConvRun>) -> String {
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    let mut md = String::from(
        "\nRemaining bytes over time (the source's `remaining_bytes`, read every 100 ms from \
         the send; in post-copy it counts the pages the destination still misses):\n\n",
    );
    let tmax = |runs: &[&ConvRun]| {
        runs.iter()
            .map(|r| r.series.end_ms() / 1000.0)
            .fold(1.0f64, f64::max)
    };
    // All modes on one chart: the run of each with the median total (or the first).
    let mut series = Vec::new();
    let mut reps: Vec<&ConvRun> = Vec::new();
    let mut rep_of: Vec<(Mode, &ConvRun)> = Vec::new();
    for (i, m) in Mode::ALL.into_iter().enumerate() {
        let runs: Vec<&ConvRun> = by(m)
            .into_iter()
            .filter(|r| !r.series.samples.is_empty())
            .collect();
        let tot = of(&runs, ConvRun::total_s);
        let rep = median(&tot)
            .and_then(|t| runs.iter().find(|r| r.total_s() == Some(t)))
            .or_else(|| {
                // An even count: the run nearest the median.
                median(&tot).and_then(|t| {
                    runs.iter().min_by(|a, b| {
                        let d = |r: &&&ConvRun| (r.total_s().unwrap_or(f64::MAX) - t).abs();
                        d(a).partial_cmp(&d(b)).unwrap_or(std::cmp::Ordering::Equal)
                    })
                })
            })
            .or_else(|| runs.first())
            .copied();
        if let Some(r) = rep {
            series.push(line(m.key().to_string(), svg::COLORS[i % 6], r));
            reps.push(r);
            rep_of.push((m, r));
        }
    }
    let chart = svg::line_chart(
        "Busy guest, 100 MiB/s cap: remaining bytes, every mode",
        "seconds since the send",
        "remaining (MiB)",
        &ticks(tmax(&reps)),
        &series,
        None,
    );
    let _ = std::fs::write(img.join("converge-all.svg"), chart);
    md.push_str("![remaining bytes, every mode](img/converge-all.svg)\n");
    for m in Mode::ALL {
        let runs: Vec<&ConvRun> = by(m)
            .into_iter()
            .filter(|r| !r.series.samples.is_empty())
            .collect();
        if runs.is_empty() {
            continue;
        }
        let series: Vec<svg::Series> = runs
            .iter()
            .enumerate()
            .map(|(k, r)| line(format!("run {}", k + 1), svg::COLORS[k % 6], r))
            .collect();
        let chart = svg::line_chart(
            &format!("Busy guest: {}", m.key()),
            "seconds since the send",
            "remaining (MiB)",
            &ticks(tmax(&runs)),
            &series,
            None,
        );
        let name = format!("converge-{}.svg", m.key());
        let _ = std::fs::write(img.join(&name), chart);
        md.push_str(&format!("![{}](img/{name})\n", m.key()));
    }
    md.push_str(&series_charts(opts, &rep_of));
    md
}

/// The time series of each mode's representative run (remaining bytes,
/// throughput, dirty rate, pass starts, throttle): `converge-series.svg`
/// for auto-converge, `converge-MODE-series.svg` for every mode.
fn series_charts(opts: &Opts, reps: &[(Mode, &ConvRun)]) -> String {
    let img = opts.root.join("docs/img");
    let mut md = String::new();
    if let Some((_, r)) = reps.iter().find(|(m, _)| *m == Mode::AutoConverge) {
        md.push_str(&series_svg::write_suite(
            &opts.root,
            "converge",
            "Busy guest, auto-converge: remaining, rates, passes, throttle",
            "auto-converge, the run with the median total",
            &r.series,
        ));
    }
    let mut links = Vec::new();
    for (m, r) in reps {
        if r.series.samples.is_empty() {
            continue;
        }
        let name = format!("converge-{}-series.svg", m.key());
        let chart = series_svg::chart(&format!("Busy guest, {}: time series", m.key()), &r.series);
        if std::fs::write(img.join(&name), chart).is_ok() {
            links.push(format!("[{}](img/{name})", m.key()));
        }
    }
    if !links.is_empty() {
        md.push_str(&format!(
            "\nThe same chart for the run of each mode drawn above: {}.\n",
            links.join(", ")
        ));
    }
    md
}
