//! The zero-copy benchmark of issue #13: a 2 GiB guest of random data over
//! 4 connections between the test bed's two network namespaces (veth,
//! `--netns-rate`, default 10gbit), copied against `"zero_copy": true`, on
//! plain TCP and with mutual TLS, alternating in the same run. Reports the
//! throughput, the source's CPU time and what the kernel did with the
//! zero-copy sends (sent from our pages, or copied: veth delivers to a
//! local socket).

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::report::{f, table};
use crate::suites::{fails, first_error, header, med, one_run, total_s, Section};
use crate::svg;
use crate::vmm::{self, Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const GIB: u64 = 1 << 30;

/// The modes, in the order they alternate: (name, TLS, zero-copy).
const MODES: [(&str, bool, bool); 4] = [
    ("plain TCP, copied", false, false),
    ("plain TCP, zero_copy", false, true),
    ("mutual TLS, copied", true, false),
    ("mutual TLS, zero_copy", true, true),
];

fn zc(r: &RunResult, field: &str) -> Option<f64> {
    r.src_status["zero_copy"][field].as_u64().map(|v| v as f64)
}

/// Runs every mode `opts.runs` times, alternating, and reports ratios
/// against the copied mode of the same transport.
pub fn zerocopy(env: &Env, opts: &Opts) -> Section {
    let guest = 2 * GIB;
    let conns = 4;
    let file = PathBuf::from("/dev/shm/ferry-bench-zc-2g.img");
    let pki = ferry_tests::Pki::new("bench-zc");
    // The destination's certificate must name the host of its URL: its
    // address inside the namespace pair (an IP SAN), or 127.0.0.1.
    let dst_name = env
        .net
        .as_ref()
        .map(|n| n.dst_ip.clone())
        .unwrap_or_else(|| "dst.bench".into());
    let tls_dirs = (pki.host("src.bench", &pki), pki.host(&dst_name, &pki));
    env.log(&format!(
        "writing 2 GiB of xorshift output to {}",
        file.display()
    ));
    if let Err(e) = vmm::random_file(&file, guest, 2) {
        return Section {
            markdown: format!("Could not create {}: {e}\n", file.display()),
            json: Value::Null,
            failed_runs: 1,
        };
    }
    let src = SourceSpec {
        memory: format!("size=2G,file={}", file.display()),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: true,
    };
    let mut results: Vec<Vec<RunResult>> = vec![Vec::new(); MODES.len()];
    for i in 0..opts.runs {
        for (m, (name, tls, zero_copy)) in MODES.iter().enumerate() {
            let mut spec = MigrateSpec::new(conns);
            if *tls {
                spec.tls = Some(tls_dirs.clone());
            }
            spec.zero_copy = *zero_copy;
            env.log(&format!(
                "zerocopy: {name}, {conns} connections, run {}",
                i + 1
            ));
            let r = one_run(env, &src, Some("size=2G,prefault=on"), Some(guest), &spec);
            if r.ok {
                env.log(&format!(
                    "   {:.3} s, cpu src {} s, zero_copy {}",
                    total_s(&r).unwrap_or(0.0),
                    f(r.src_cpu_s, 2),
                    r.src_status["zero_copy"]
                ));
            }
            results[m].push(r);
        }
    }
    if !opts.keep_file {
        let _ = std::fs::remove_file(&file);
    }
    let g = guest as f64;
    let bps = move |r: &RunResult| total_s(r).map(|t| g / t);
    let refs: Vec<Vec<&RunResult>> = results.iter().map(|v| v.iter().collect()).collect();
    let rate = env
        .net
        .as_ref()
        .map(|n| n.rate.clone())
        .unwrap_or_else(|| "loopback".into());
    let mut md = header(&format!(
        "Zero-copy send: 2 GiB of random data, 4 connections, between two network namespaces \
         (veth shaped to {rate}), copied against `\"zero_copy\": true`"
    ));
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for (m, (name, _, zero_copy)) in MODES.iter().enumerate() {
        let runs = &refs[m];
        let base = &refs[m - m % 2];
        let tput = med(runs, bps);
        let cpu = med(runs, |r| r.src_cpu_s);
        let (t_ratio, c_ratio) = if *zero_copy {
            let r = (
                tput.zip(med(base, bps)).map(|(a, b)| a / b),
                cpu.zip(med(base, |r| r.src_cpu_s)).map(|(a, b)| a / b),
            );
            ratios.push(json!({ "mode": name, "throughput": r.0, "cpu_src": r.1 }));
            r
        } else {
            (None, None)
        };
        let share = |field: &str| {
            med(runs, |r| {
                zc(r, field)
                    .zip(zc(r, "sent_bytes"))
                    .map(|(a, s)| if s > 0.0 { 100.0 * a / s } else { 0.0 })
            })
        };
        rows.push(vec![
            name.to_string(),
            fails(runs),
            f(tput.map(|x| x / GIB as f64), 2),
            f(med(runs, total_s), 3),
            f(cpu, 2),
            f(med(runs, |r| r.dst_cpu_s), 2),
            if *zero_copy {
                format!("{}× / {}×", f(t_ratio, 2), f(c_ratio, 2))
            } else {
                "1 / 1 (reference)".into()
            },
            f(
                med(runs, |r| zc(r, "sent_bytes").map(|b| b / GIB as f64)),
                2,
            ),
            if *zero_copy {
                format!(
                    "{} / {}",
                    f(share("zero_copy_bytes"), 1),
                    f(share("copied_bytes"), 1)
                )
            } else {
                "–".into()
            },
            f(med(runs, |r| Some(r.loadavg)), 2),
        ]);
    }
    md.push_str(&table(
        &[
            "mode",
            "runs",
            "GiB/s (median)",
            "total (s)",
            "CPU src (s)",
            "CPU dst (s)",
            "vs copied: throughput / CPU src",
            "zero-copy sent (GiB)",
            "% from our pages / % copied by the kernel",
            "load",
        ],
        &rows,
    ));
    for (m, (name, _, _)) in MODES.iter().enumerate() {
        if med(&refs[m], bps).is_none() {
            if let Some(e) = first_error(&refs[m]) {
                md.push_str(&format!("\n{name} failed: {e}\n"));
            }
        }
    }
    md.push_str(&chart(opts, &refs, bps, &rate));
    let failed = results.iter().flatten().filter(|r| !r.ok).count();
    Section {
        markdown: md,
        json: json!({
            "rate": rate,
            "modes": MODES.iter().map(|m| m.0).collect::<Vec<_>>(),
            "runs": results
                .iter()
                .map(|v| v.iter().map(RunResult::to_json).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
            "ratios": ratios,
        }),
        failed_runs: failed,
    }
}

/// `docs/img/zerocopy.svg`: every run's throughput, one line per mode, and
/// the Markdown that shows it.
fn chart(
    opts: &Opts,
    refs: &[Vec<&RunResult>],
    bps: impl Fn(&RunResult) -> Option<f64>,
    rate: &str,
) -> String {
    let series: Vec<svg::Series> = MODES
        .iter()
        .zip(refs)
        .enumerate()
        .map(|(m, ((name, _, _), runs))| {
            svg::per_run(
                name.to_string(),
                svg::COLORS[m % svg::COLORS.len()],
                runs.iter().map(|r| bps(r).map(|b| b / GIB as f64)),
            )
        })
        .collect();
    let chart = svg::line_chart(
        &format!("2 GiB of random data over veth ({rate}), 4 connections: throughput per run"),
        "run",
        "GiB/s",
        &(1..=opts.runs).map(|k| k as f64).collect::<Vec<_>>(),
        &series,
        None,
    );
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    match std::fs::write(img.join("zerocopy.svg"), chart) {
        Ok(()) => "\n![zero-copy: throughput per run](img/zerocopy.svg)\n".into(),
        Err(e) => format!("\n(the chart could not be written: {e})\n"),
    }
}
