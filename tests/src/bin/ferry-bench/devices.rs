//! The device-state benchmark of issues #4 and #12: downtime of 4 simulated
//! VFIO devices in `device_state = main` (sequential on the main
//! connection, the reference) against `channels` (multiplexed on the data
//! connections), over a range of connection counts, and against the number
//! of devices at 6 connections. Every ratio is taken against the `main`
//! figure measured in the same invocation.

use serde_json::json;

use crate::report::{f, met, min_max, table};
use crate::suites::{col, fails, header, med, one_run, series_chart, Section};
use crate::svg;
use crate::vmm::{Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const MIB: f64 = (1u64 << 20) as f64;
/// Connection counts of the main table (unless `--conns` is given).
const CONNS: [u32; 5] = [1, 4, 6, 8, 16];
/// Device counts of the second table (unless `--devices` is given).
const DEVICES: [usize; 3] = [1, 2, 4];
/// The connection count of the targets and of the device-count table.
const REF_CONNS: u32 = 6;
/// The device count of the connection table.
const REF_DEVICES: usize = 4;
const MODES: [&str; 2] = ["main", "channels"];

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

/// One measured cell: devices, connections, mode, its runs.
struct Cell {
    devs: usize,
    conns: u32,
    mode: &'static str,
    runs: Vec<RunResult>,
}

fn dt(r: &RunResult) -> Option<f64> {
    r.stat("downtime_ms")
}

fn find<'a>(cells: &'a [Cell], devs: usize, conns: u32, mode: &str) -> Vec<&'a RunResult> {
    cells
        .iter()
        .find(|c| c.devs == devs && c.conns == conns && c.mode == mode)
        .map(|c| c.runs.iter().collect())
        .unwrap_or_default()
}

fn range(v: &[&RunResult]) -> String {
    min_max(&col(v, dt))
        .map(|(a, b)| format!(" ({a:.1}–{b:.1})"))
        .unwrap_or_default()
}

pub fn devices(env: &Env, opts: &Opts) -> Section {
    let n = opts.runs;
    let conns: Vec<u32> = if opts.conns_given {
        opts.conns.clone()
    } else {
        CONNS.to_vec()
    };
    let devs_sweep: Vec<usize> = opts.devices.clone().unwrap_or_else(|| DEVICES.to_vec());
    // Every (devices, connections) pair to measure, each in both modes;
    // the rounds interleave the modes so that a change of load hits both.
    let mut pairs: Vec<(usize, u32)> = conns.iter().map(|&c| (REF_DEVICES, c)).collect();
    for &d in &devs_sweep {
        if !pairs.contains(&(d, REF_CONNS)) {
            pairs.push((d, REF_CONNS));
        }
    }
    let mut cells: Vec<Cell> = Vec::new();
    for &(devs, c) in &pairs {
        for mode in MODES {
            cells.push(Cell {
                devs,
                conns: c,
                mode,
                runs: Vec::new(),
            });
        }
    }
    for i in 0..n {
        for cell in cells.iter_mut() {
            env.log(&format!(
                "devices: {} x 100 MiB, device_state={}, {} connections, run {}",
                cell.devs,
                cell.mode,
                cell.conns,
                i + 1
            ));
            let mut spec = MigrateSpec::new(cell.conns);
            spec.device_state = Some(cell.mode.into());
            spec.device_precopy = Some(true);
            let r = one_run(env, &device_source(cell.devs), None, None, &spec);
            if r.ok {
                env.log(&format!(
                    "   downtime {} ms (load {:.2})",
                    f(dt(&r), 1),
                    r.loadavg
                ));
            }
            cell.runs.push(r);
        }
    }

    let failed: usize = cells
        .iter()
        .map(|c| c.runs.iter().filter(|r| !r.ok).count())
        .sum();
    let loads: Vec<f64> = cells
        .iter()
        .flat_map(|c| c.runs.iter().map(|r| r.loadavg))
        .collect();
    let (lmin, lmax) = min_max(&loads).unwrap_or((0.0, 0.0));
    let main_ref = med(&find(&cells, REF_DEVICES, REF_CONNS, "main"), dt);

    let mut md = header(
        "Device state (issues #4, #12): 1 GiB guest, devices of 100 MiB (precopy 10 MiB, save 2000 MiB/s, load 250 MiB/s)",
    );
    md.push_str(&format!(
        "1-min load average before the runs: {lmin:.2}–{lmax:.2}. Reference: `main` with \
         {REF_DEVICES} devices over {REF_CONNS} connections, {} ms, measured in this run.\n\n",
        f(main_ref, 1)
    ));
    md.push_str(&format!(
        "Downtime vs connections, {REF_DEVICES} devices, median of {n} runs (min–max):\n\n"
    ));
    let mut rows = Vec::new();
    let mut chan_meds = Vec::new();
    for &c in &conns {
        let (m, ch) = (
            find(&cells, REF_DEVICES, c, "main"),
            find(&cells, REF_DEVICES, c, "channels"),
        );
        let (mm, cm) = (med(&m, dt), med(&ch, dt));
        if let Some(x) = cm {
            chan_meds.push((c, x));
        }
        rows.push(vec![
            c.to_string(),
            fails(&ch),
            format!("{}{}", f(mm, 1), range(&m)),
            format!("{}{}", f(cm, 1), range(&ch)),
            f(mm.zip(cm).map(|(a, b)| b / a), 2),
            f(main_ref.zip(cm).map(|(a, b)| b / a), 2),
            f(med(&ch, |r| r.stat("total_time_ms")), 0),
            f(med(&ch, |r| r.dst_cpu_s), 2),
            f(med(&ch, |r| r.src_cpu_s), 2),
        ]);
    }
    md.push_str(&table(
        &[
            "connections",
            "runs",
            "main: downtime (ms)",
            "channels: downtime (ms)",
            "channels / main (same count)",
            &format!("channels / main@{REF_CONNS}"),
            "total (ms, channels)",
            "dst CPU s (channels)",
            "src CPU s (channels)",
        ],
        &rows,
    ));

    md.push_str(&format!(
        "\nDowntime vs number of devices, {REF_CONNS} connections, median of {n} runs (min–max):\n\n"
    ));
    let mut rows = Vec::new();
    let mut dev_pts: Vec<Vec<svg::Point>> = vec![Vec::new(), Vec::new()];
    for &d in &devs_sweep {
        let (m, ch) = (
            find(&cells, d, REF_CONNS, "main"),
            find(&cells, d, REF_CONNS, "channels"),
        );
        let (mm, cm) = (med(&m, dt), med(&ch, dt));
        for (i, (v, x)) in [(&m, mm), (&ch, cm)].into_iter().enumerate() {
            if let Some(x) = x {
                dev_pts[i].push((d as f64, x, min_max(&col(v, dt))));
            }
        }
        rows.push(vec![
            d.to_string(),
            format!("{}{}", f(mm, 1), range(&m)),
            format!("{}{}", f(cm, 1), range(&ch)),
            f(mm.zip(cm).map(|(a, b)| b / a), 2),
            f(
                med(&ch, |r| r.stat("device_bytes_transferred")).map(|x| x / MIB),
                0,
            ),
            f(med(&ch, |r| r.stat("total_time_ms")), 0),
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

    let chan_ref = med(&find(&cells, REF_DEVICES, REF_CONNS, "channels"), dt);
    let best = chan_meds.iter().min_by(|a, b| a.1.total_cmp(&b.1)).copied();
    let at16 = chan_meds.iter().find(|x| x.0 == 16).map(|x| x.1);
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                format!(
                    "{REF_DEVICES} devices, {REF_CONNS} connections: channels downtime ≤ 0.35 × main"
                ),
                format!(
                    "{} / {} ms = {}",
                    f(chan_ref, 1),
                    f(main_ref, 1),
                    f(chan_ref.zip(main_ref).map(|(a, b)| a / b), 2)
                ),
                met(chan_ref.zip(main_ref).map(|(a, b)| a <= 0.35 * b)).into(),
            ],
            vec![
                "channels downtime at 16 connections within 10% of the best count".into(),
                format!(
                    "{} ms vs best {} ms ({} connections) = {}",
                    f(at16, 1),
                    f(best.map(|b| b.1), 1),
                    best.map(|b| b.0.to_string()).unwrap_or_else(|| "–".into()),
                    f(at16.zip(best).map(|(a, b)| a / b.1), 2)
                ),
                met(at16.zip(best).map(|(a, b)| a <= 1.10 * b.1)).into(),
            ],
        ],
    ));

    // Plots.
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    let conn_series: Vec<svg::Series> = MODES
        .iter()
        .enumerate()
        .map(|(i, mode)| svg::Series {
            name: format!("device_state={mode}"),
            color: svg::COLORS[i],
            points: conns
                .iter()
                .filter_map(|&c| {
                    let v = find(&cells, REF_DEVICES, c, mode);
                    med(&v, dt).map(|m| (c as f64, m, min_max(&col(&v, dt))))
                })
                .collect(),
        })
        .collect();
    let s_conn = svg::line_chart(
        &format!("Downtime vs connections ({REF_DEVICES} devices of 100 MiB)"),
        "connections",
        "downtime (ms), median with min–max",
        &conns.iter().map(|&c| c as f64).collect::<Vec<_>>(),
        &conn_series,
        main_ref.map(|m| ("0.35 × main@6 (target)", 0.35 * m)),
    );
    let dev_series: Vec<svg::Series> = MODES
        .iter()
        .zip(dev_pts)
        .enumerate()
        .map(|(i, (mode, points))| svg::Series {
            name: format!("device_state={mode}"),
            color: svg::COLORS[i],
            points,
        })
        .collect();
    let s_dev = svg::line_chart(
        &format!("Downtime vs devices (100 MiB each, {REF_CONNS} connections)"),
        "devices",
        "downtime (ms), median with min–max",
        &devs_sweep.iter().map(|&d| d as f64).collect::<Vec<_>>(),
        &dev_series,
        None,
    );
    let _ = std::fs::write(img.join("downtime-vs-connections.svg"), s_conn);
    let _ = std::fs::write(img.join("downtime-vs-devices.svg"), s_dev);
    md.push_str(
        "\n![downtime vs connections](img/downtime-vs-connections.svg)\n\
         ![downtime vs devices](img/downtime-vs-devices.svg)\n",
    );

    let chan_ref_runs = find(&cells, REF_DEVICES, REF_CONNS, "channels");
    md.push_str(&series_chart(
        opts,
        "devices",
        "1 GiB guest, 4 devices of 100 MiB, channels, 6 connections",
        "4 devices, device_state=channels, 6 connections, the median total",
        &chan_ref_runs,
    ));
    let records: Vec<_> = cells
        .iter()
        .flat_map(|c| {
            c.runs.iter().map(move |r| {
                json!({"devices": c.devs, "device_state": c.mode, "connections": c.conns,
                       "result": r.to_json()})
            })
        })
        .collect();
    Section {
        markdown: md,
        json: json!({"runs": records}),
        failed_runs: failed,
    }
}
