//! The TLS benchmark of issue #9: a 4 GiB guest of random data over 4
//! connections, mutual TLS against plain TCP, alternating in the same run.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::report::{f, met, min_max, table};
use crate::suites::{
    col, fails, first_error, header, med, one_run, series_chart, total_s, Section,
};
use crate::svg;
use crate::vmm::{self, Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const GIB: u64 = 1 << 30;

/// Plain and TLS migrations, alternating run by run so that both see the
/// same machine; reports the TLS/plain throughput ratio (target ≥ 0.7).
pub fn tls(env: &Env, opts: &Opts) -> Section {
    let guest = 4 * GIB;
    let conns = 4;
    let file = PathBuf::from("/dev/shm/ferry-bench-4g.img");
    let pki = ferry_tests::Pki::new("bench");
    let tls_dirs = (pki.host("src.bench", &pki), pki.host("dst.bench", &pki));
    env.log(&format!(
        "writing 4 GiB of xorshift output to {}",
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
        memory: format!("size=4G,file={}", file.display()),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: true,
    };
    let mut plain = Vec::new();
    let mut tls = Vec::new();
    for i in 0..opts.runs {
        for with_tls in [false, true] {
            let mut spec = MigrateSpec::new(conns);
            if with_tls {
                spec.tls = Some(tls_dirs.clone());
            }
            env.log(&format!(
                "tls: {}, {conns} connections, run {}",
                if with_tls { "mutual TLS" } else { "plain TCP" },
                i + 1
            ));
            let r = one_run(env, &src, Some("size=4G,prefault=on"), Some(guest), &spec);
            if r.ok {
                env.log(&format!(
                    "   {:.3} s, {:.2} GiB/s, cpu src {} s dst {} s, transport {}",
                    total_s(&r).unwrap_or(0.0),
                    guest as f64 / GIB as f64 / total_s(&r).unwrap_or(f64::NAN),
                    f(r.src_cpu_s, 2),
                    f(r.dst_cpu_s, 2),
                    r.src_status["transport"].as_str().unwrap_or("?")
                ));
            }
            if with_tls {
                tls.push(r)
            } else {
                plain.push(r)
            }
        }
    }
    if !opts.keep_file {
        let _ = std::fs::remove_file(&file);
    }
    let g = guest as f64;
    let bps = move |r: &RunResult| total_s(r).map(|t| g / t);
    let p: Vec<&RunResult> = plain.iter().collect();
    let t: Vec<&RunResult> = tls.iter().collect();
    let (mp, mt) = (med(&p, bps), med(&t, bps));
    let ratio = mp.zip(mt).map(|(a, b)| b / a);
    let mut md = header(
        "TLS: 4 GiB of random data, 4 connections, warm destination, mutual TLS 1.3 against plain TCP",
    );
    let row = |name: &str, runs: &[&RunResult]| {
        let m = med(runs, bps);
        let (lo, hi) = min_max(&col(runs, bps)).unwrap_or((f64::NAN, f64::NAN));
        vec![
            name.to_string(),
            fails(runs),
            f(m.map(|x| x / GIB as f64), 2),
            format!("{:.2}–{:.2}", lo / GIB as f64, hi / GIB as f64),
            f(med(runs, total_s), 3),
            f(med(runs, |r| r.stat("downtime_ms")), 1),
            f(med(runs, |r| r.src_cpu_s), 2),
            f(med(runs, |r| r.dst_cpu_s), 2),
            f(med(runs, |r| Some(r.loadavg)), 2),
        ]
    };
    md.push_str(&table(
        &[
            "transport",
            "runs",
            "GiB/s (median)",
            "min–max",
            "total (s)",
            "downtime (ms)",
            "CPU src (s)",
            "CPU dst (s)",
            "load",
        ],
        &[row("plain TCP", &p), row("mutual TLS", &t)],
    ));
    for (name, runs) in [("plain", &p), ("TLS", &t)] {
        if med(runs, bps).is_none() {
            if let Some(e) = first_error(runs) {
                md.push_str(&format!("\n{name} failed: {e}\n"));
            }
        }
    }
    md.push_str("\nTarget:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[vec![
            "TLS throughput ≥ 0.7 × plain TCP (same run)".into(),
            format!("{}×", f(ratio, 2)),
            met(ratio.map(|r| r >= 0.7)).into(),
        ]],
    ));
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    let series: Vec<svg::Series> = [("plain TCP", &plain), ("mutual TLS", &tls)]
        .iter()
        .enumerate()
        .map(|(i, (name, runs))| {
            svg::per_run(
                name.to_string(),
                svg::COLORS[i],
                runs.iter().map(|r| bps(r).map(|b| b / GIB as f64)),
            )
        })
        .collect();
    let chart = svg::line_chart(
        "4 GiB random, 4 connections: plain TCP and mutual TLS, run by run",
        "run (plain and TLS alternate)",
        "throughput (GiB/s)",
        &(1..=opts.runs).map(|k| k as f64).collect::<Vec<_>>(),
        &series,
        mp.map(|m| ("0.7 × plain median", 0.7 * m / GIB as f64)),
    );
    let _ = std::fs::write(img.join("tls-vs-plain.svg"), chart);
    md.push_str("\n![TLS vs plain](img/tls-vs-plain.svg)\n");
    md.push_str(&series_chart(
        opts,
        "tls",
        "4 GiB random, 4 connections, mutual TLS",
        "mutual TLS, the median total",
        &t,
    ));
    let failed = plain.iter().chain(&tls).filter(|r| !r.ok).count();
    Section {
        markdown: md,
        json: json!({
            "plain": plain.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "tls": tls.iter().map(RunResult::to_json).collect::<Vec<_>>(),
            "ratio": ratio,
        }),
        failed_runs: failed,
    }
}
