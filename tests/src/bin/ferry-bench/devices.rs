//! The device-state benchmark of issue #4: downtime against the number of
//! simulated VFIO devices and against the number of connections.

use serde_json::json;

use crate::report::{f, met, min_max, table};
use crate::suites::{col, fails, header, med, one_run, series_chart, Section};
use crate::svg;
use crate::vmm::{Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const MIB: f64 = (1u64 << 20) as f64;

fn device_source(n: usize) -> SourceSpec {
    let mut extra = Vec::new();
    for i in 0..n {
        extra.push("--sim-vfio".to_string());
        extra.push(format!(
            "id=d{i},state=100M,precopy=10M,save-rate=2000,load-rate=250"
        ));
    }
    SourceSpec {
        memory: "size=1G".into(),
        cmdline: "region=1 passes=0".into(),
        extra,
        pause: false,
    }
}

pub fn devices(env: &Env, opts: &Opts) -> Section {
    let n = opts.runs.max(5);
    let mut records = Vec::new();
    let mut by_dev: Vec<(usize, &'static str, Vec<RunResult>)> = Vec::new();
    for devs in [1usize, 2, 4] {
        for mode in ["main", "channels"] {
            let mut v = Vec::new();
            for i in 0..n {
                env.log(&format!(
                    "devices: {devs} x 100 MiB, device_state={mode}, 6 connections, run {}",
                    i + 1
                ));
                let mut spec = MigrateSpec::new(6);
                spec.device_state = Some(mode.into());
                spec.device_precopy = Some(true);
                let r = one_run(env, &device_source(devs), None, None, &spec);
                if r.ok {
                    env.log(&format!("   downtime {} ms", f(r.stat("downtime_ms"), 1)));
                }
                v.push(r);
            }
            by_dev.push((devs, mode, v));
        }
    }
    let conns = [2u32, 4, 6, 8, 12, 16];
    let mut by_conn: Vec<(u32, Vec<RunResult>)> = Vec::new();
    for &c in &conns {
        if c == 6 {
            // Same condition as "4 devices, channels, 6 connections" above: reuse it.
            let v = by_dev
                .iter()
                .find(|x| x.0 == 4 && x.1 == "channels")
                .map(|x| x.2.clone())
                .unwrap_or_default();
            by_conn.push((c, v));
            continue;
        }
        let mut v = Vec::new();
        for i in 0..n {
            env.log(&format!(
                "devices: 4 x 100 MiB, channels, {c} connections, run {}",
                i + 1
            ));
            let mut spec = MigrateSpec::new(c);
            spec.device_state = Some("channels".into());
            spec.device_precopy = Some(true);
            let r = one_run(env, &device_source(4), None, None, &spec);
            if r.ok {
                env.log(&format!("   downtime {} ms", f(r.stat("downtime_ms"), 1)));
            }
            v.push(r);
        }
        by_conn.push((c, v));
    }

    let dt = |r: &RunResult| r.stat("downtime_ms");
    let mut failed = 0;
    let mut md = header("Device state (issue #4): 1 GiB guest, devices of 100 MiB (precopy 10 MiB, save 2000 MB/s, load 250 MB/s)");
    md.push_str(&format!(
        "Downtime vs number of devices, 6 connections, median of {n} runs (min–max):\n\n"
    ));
    let mut rows = Vec::new();
    for devs in [1usize, 2, 4] {
        let get = |mode: &str| {
            by_dev
                .iter()
                .find(|x| x.0 == devs && x.1 == mode)
                .map(|x| x.2.iter().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let (m, c) = (get("main"), get("channels"));
        failed += m.iter().chain(c.iter()).filter(|r| !r.ok).count();
        let (mm, cm) = (med(&m, dt), med(&c, dt));
        let rng = |v: &[&RunResult]| {
            min_max(&col(v, dt))
                .map(|(a, b)| format!(" ({a:.1}–{b:.1})"))
                .unwrap_or_default()
        };
        rows.push(vec![
            devs.to_string(),
            format!("{}{}", f(mm, 1), rng(&m)),
            format!("{}{}", f(cm, 1), rng(&c)),
            f(mm.zip(cm).map(|(a, b)| b / a), 2),
            f(
                med(&c, |r| r.stat("device_bytes_transferred")).map(|x| x / MIB),
                0,
            ),
            f(med(&c, |r| r.stat("total_time_ms")), 0),
        ]);
    }
    md.push_str(&table(
        &[
            "devices",
            "main: downtime (ms)",
            "channels: downtime (ms)",
            "channels / main",
            "device MiB moved",
            "total (ms, channels)",
        ],
        &rows,
    ));
    md.push_str(&format!(
        "\nDowntime vs connections, 4 devices, device_state=channels, median of {n} runs:\n\n"
    ));
    let mut rows = Vec::new();
    let mut meds = Vec::new();
    for (c, v) in &by_conn {
        let v: Vec<&RunResult> = v.iter().collect();
        if *c != 6 {
            failed += v.iter().filter(|r| !r.ok).count();
        }
        let m = med(&v, dt);
        if let Some(m) = m {
            meds.push((*c, m));
        }
        let rng = min_max(&col(&v, dt))
            .map(|(a, b)| format!("{a:.1}–{b:.1}"))
            .unwrap_or_else(|| "–".into());
        rows.push(vec![
            c.to_string(),
            fails(&v),
            f(m, 1),
            rng,
            f(med(&v, |r| r.stat("total_time_ms")), 0),
        ]);
    }
    md.push_str(&table(
        &[
            "connections",
            "runs",
            "median downtime (ms)",
            "min–max (ms)",
            "total (ms)",
        ],
        &rows,
    ));

    let main4 = by_dev
        .iter()
        .find(|x| x.0 == 4 && x.1 == "main")
        .and_then(|x| med(&x.2.iter().collect::<Vec<_>>(), dt));
    let chan4 = by_dev
        .iter()
        .find(|x| x.0 == 4 && x.1 == "channels")
        .and_then(|x| med(&x.2.iter().collect::<Vec<_>>(), dt));
    let best = meds
        .iter()
        .map(|x| x.1)
        .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.min(b))));
    let at16 = meds.iter().find(|x| x.0 == 16).map(|x| x.1);
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                "4 devices: channels downtime ≤ 0.35 × main".into(),
                format!(
                    "{} / {} ms = {}",
                    f(chan4, 1),
                    f(main4, 1),
                    f(chan4.zip(main4).map(|(a, b)| a / b), 2)
                ),
                met(chan4.zip(main4).map(|(a, b)| a <= 0.35 * b)).into(),
            ],
            vec![
                "downtime at 16 connections within 10% of the best".into(),
                format!("{} ms vs best {} ms", f(at16, 1), f(best, 1)),
                met(at16.zip(best).map(|(a, b)| a <= 1.10 * b)).into(),
            ],
        ],
    ));

    // Plots.
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    let mut series = Vec::new();
    for (i, mode) in ["main", "channels"].iter().enumerate() {
        let mut pts = Vec::new();
        for devs in [1usize, 2, 4] {
            if let Some(x) = by_dev.iter().find(|x| x.0 == devs && x.1 == *mode) {
                let v: Vec<&RunResult> = x.2.iter().collect();
                if let Some(m) = med(&v, dt) {
                    pts.push((devs as f64, m, min_max(&col(&v, dt))));
                }
            }
        }
        series.push(svg::Series {
            name: format!("device_state={mode}"),
            color: svg::COLORS[i],
            points: pts,
        });
    }
    let s1 = svg::line_chart(
        "Downtime vs devices (100 MiB each, 6 connections)",
        "devices",
        "downtime (ms), median with min–max",
        &[1.0, 2.0, 4.0],
        &series,
        None,
    );
    let pts: Vec<svg::Point> = by_conn
        .iter()
        .filter_map(|(c, v)| {
            let v: Vec<&RunResult> = v.iter().collect();
            med(&v, dt).map(|m| (*c as f64, m, min_max(&col(&v, dt))))
        })
        .collect();
    let s2 = svg::line_chart(
        "Downtime vs connections (4 devices, channels)",
        "connections",
        "downtime (ms), median with min–max",
        &conns.iter().map(|&c| c as f64).collect::<Vec<_>>(),
        &[svg::Series {
            name: "device_state=channels".into(),
            color: svg::COLORS[1],
            points: pts,
        }],
        best.map(|b| ("best + 10%", b * 1.1)),
    );
    let _ = std::fs::write(img.join("downtime-vs-devices.svg"), s1);
    let _ = std::fs::write(img.join("downtime-vs-connections.svg"), s2);
    md.push_str("\n![downtime vs devices](img/downtime-vs-devices.svg)\n![downtime vs connections](img/downtime-vs-connections.svg)\n");

    let chan4: Vec<&RunResult> = by_dev
        .iter()
        .filter(|x| x.0 == 4 && x.1 == "channels")
        .flat_map(|x| x.2.iter())
        .collect();
    md.push_str(&series_chart(
        opts,
        "devices",
        "1 GiB guest, 4 devices of 100 MiB, channels, 6 connections",
        "4 devices, device_state=channels, 6 connections, the median total",
        &chan4,
    ));
    for (devs, mode, v) in &by_dev {
        for r in v {
            records.push(json!({"devices": devs, "device_state": mode, "connections": 6, "result": r.to_json()}));
        }
    }
    for (c, v) in &by_conn {
        if *c == 6 {
            continue;
        }
        for r in v {
            records.push(json!({"devices": 4, "device_state": "channels", "connections": c, "result": r.to_json()}));
        }
    }
    Section {
        markdown: md,
        json: json!({"runs": records}),
        failed_runs: failed,
    }
}
