//! The compression benchmark of issue #13 §2: a 4 GiB paused guest holding
//! compressible data (repeated text) and one holding random data, each
//! migrated with and without `"compression": "zstd"` over the 1 Gbit/s
//! namespace link (`--netns-rate`, default `1gbit` for this part), plain and
//! zstd alternating run by run in the same run of the bench.
//!
//! Guest memory is filled host-side, as the other RAM benchmarks do: the
//! source's RAM is a file on /dev/shm (`--memory size=4G,file=...`) written
//! here before the source boots (the stamp guest, at ~1.4 M instructions/s
//! under emulation, would need hours to fill 4 GiB itself).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::report::{f, met, min_max, table};
use crate::suites::{col, fails, first_error, header, med, one_run, total_s, Section};
use crate::svg;
use crate::vmm::{self, Env, MigrateSpec, RunResult, SourceSpec};
use crate::Opts;

const GIB: u64 = 1 << 30;

/// Lines the text is made of, in an order drawn by xorshift: "repeated
/// text" (its words and lines recur), not a single repeated block.
const LINES: &[&str] = &[
    "The guest keeps running while its memory moves to the other host.\n",
    "Every page is sent once per pass; pages written again are sent again.\n",
    "2026-12-04 19:00:00 INFO ferry::migration: pass 3 done, 1024 pages dirty\n",
    "Zero pages are skipped before compression and cost sixteen bytes each.\n",
    "A packet that does not shrink is sent as it is, straight from memory.\n",
    "GET /api/v1/vm.migration HTTP/1.1 Host: localhost Accept: */*\n",
    "The destination decompresses in its reader threads, one per connection.\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n",
    "tempor incididunt ut labore et dolore magna aliqua. Ut enim ad minim.\n",
    "{\"state\":\"active\",\"iteration\":2,\"transferred_bytes\":123456789}\n",
    "fn main() { println!(\"hello, world\"); } // a line of source code\n",
    "The switch-over pauses the guest for the last dirty pages and the state.\n",
    "kernel: [ 1234.567890] virtio_net virtio0 eth0: link up, 1000 Mbps\n",
    "Compression trades processor time on both sides for bytes on the link.\n",
    "<tr><td>zstd</td><td>level 1</td><td>writer threads</td></tr>\n",
    "SELECT id, name, created_at FROM guests WHERE host = 'a' ORDER BY id;\n",
];

/// Writes `bytes` of [`LINES`] text to `path` (kept if it has that size).
pub fn text_file(path: &Path, bytes: u64) -> Result<(), String> {
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
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf: Vec<u8> = Vec::with_capacity(chunk as usize + 128);
    let mut off = 0;
    while off < bytes {
        buf.clear();
        while (buf.len() as u64) < chunk {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let l = LINES[(x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 60) as usize];
            buf.extend_from_slice(l.as_bytes());
        }
        let len = chunk.min(bytes - off) as usize;
        f.write_all_at(&buf[..len], off)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        off += len as u64;
    }
    Ok(())
}

/// One data set's runs: (plain, zstd).
type Runs = (Vec<RunResult>, Vec<RunResult>);

fn data_set(env: &Env, opts: &Opts, what: &str, file: &Path, guest: u64) -> Result<Runs, String> {
    let src = SourceSpec {
        memory: format!("size=4G,file={}", file.display()),
        cmdline: "region=1 passes=0".into(),
        extra: vec![],
        pause: true,
    };
    let (mut plain, mut zstd) = (Vec::new(), Vec::new());
    for i in 0..opts.runs {
        for z in [false, true] {
            let mut spec = MigrateSpec::new(4);
            if z {
                spec.compression = Some("zstd".into());
            }
            env.log(&format!(
                "compress: {what}, {}, 4 connections, run {}",
                if z { "zstd" } else { "no compression" },
                i + 1
            ));
            let r = one_run(env, &src, Some("size=4G,prefault=on"), Some(guest), &spec);
            if r.ok {
                env.log(&format!(
                    "   {:.3} s, cpu src {} s dst {} s, ratio {}, load {:.2}",
                    total_s(&r).unwrap_or(0.0),
                    f(r.src_cpu_s, 2),
                    f(r.dst_cpu_s, 2),
                    f(ratio(&r), 2),
                    r.loadavg
                ));
            }
            if z {
                zstd.push(r)
            } else {
                plain.push(r)
            }
        }
    }
    Ok((plain, zstd))
}

fn ratio(r: &RunResult) -> Option<f64> {
    r.src_status["compression"]["ratio"].as_f64()
}

/// Both data sets, with and without zstd.
pub fn compress(env: &Env, opts: &Opts) -> Section {
    let guest = 4 * GIB;
    let file = PathBuf::from("/dev/shm/ferry-bench-compress-4g.img");
    let mut sets: Vec<(&str, Runs)> = Vec::new();
    let mut md = header(
        "Compression (issue #13 §2): 4 GiB paused guest over the 1 Gbit/s namespace link, \
         4 connections, with and without zstd",
    );
    for (what, fill) in [
        ("text", text_file as fn(&Path, u64) -> Result<(), String>),
        ("random", |p: &Path, b: u64| vmm::random_file(p, b, 2)),
    ] {
        let _ = std::fs::remove_file(&file);
        env.log(&format!("writing 4 GiB of {what} to {}", file.display()));
        if let Err(e) = fill(&file, guest) {
            md.push_str(&format!("\nCould not create {}: {e}\n", file.display()));
            continue;
        }
        match data_set(env, opts, what, &file, guest) {
            Ok(r) => sets.push((what, r)),
            Err(e) => md.push_str(&format!("\n{what}: {e}\n")),
        }
    }
    let _ = std::fs::remove_file(&file);

    let mut rows = Vec::new();
    let mut medians = Vec::new();
    for (what, (plain, zstd)) in &sets {
        let p: Vec<&RunResult> = plain.iter().collect();
        let z: Vec<&RunResult> = zstd.iter().collect();
        for (name, runs) in [("none", &p), ("zstd (level 1)", &z)] {
            let (lo, hi) = min_max(&col(runs, total_s)).unwrap_or((f64::NAN, f64::NAN));
            let mut row = vec![
                what.to_string(),
                name.to_string(),
                fails(runs),
                f(med(runs, total_s), 2),
                format!("{lo:.2}–{hi:.2}"),
                f(
                    med(runs, |r| r.stat("transferred_bytes")).map(|b| b / GIB as f64),
                    3,
                ),
                f(med(runs, ratio), 1),
                f(med(runs, |r| r.src_cpu_s), 2),
                f(med(runs, |r| r.dst_cpu_s), 2),
                f(med(runs, |r| Some(r.loadavg)), 2),
            ];
            if med(runs, total_s).is_none() {
                if let Some(e) = first_error(runs) {
                    row[3] = format!(
                        "failed: {}",
                        e.chars().take(80).collect::<String>().replace('|', "/")
                    );
                }
            }
            rows.push(row);
        }
        medians.push((*what, med(&p, total_s), med(&z, total_s)));
    }
    md.push_str(&format!(
        "Medians of {} runs each; time = the source's `total_time_ms`; plain and zstd \
         alternate run by run. Text: lines drawn at random from 16 fixed lines (words and \
         lines recur); random: xorshift output. The destination is warm (prefaulted).\n\n",
        opts.runs
    ));
    md.push_str(&table(
        &[
            "data",
            "compression",
            "runs",
            "total (s)",
            "min–max (s)",
            "on the wire (GiB)",
            "ratio",
            "CPU src (s)",
            "CPU dst (s)",
            "load",
        ],
        &rows,
    ));
    let get = |w: &str| medians.iter().find(|m| m.0 == w).and_then(|m| m.1.zip(m.2));
    let speedup = get("text").map(|(p, z)| p / z);
    let cost = get("random").map(|(p, z)| z / p - 1.0);
    md.push_str("\nTargets:\n\n");
    md.push_str(&table(
        &["target", "measured", "status"],
        &[
            vec![
                "compressible data ≥ 3× faster with zstd".into(),
                format!("{}×", f(speedup, 2)),
                met(speedup.map(|s| s >= 3.0)).into(),
            ],
            vec![
                "random data costs ≤ 5% with zstd".into(),
                format!("{}%", f(cost.map(|c| c * 100.0), 1)),
                met(cost.map(|c| c <= 0.05)).into(),
            ],
        ],
    ));
    let img = opts.root.join("docs/img");
    let _ = std::fs::create_dir_all(&img);
    let mut series = Vec::new();
    for (what, (plain, zstd)) in &sets {
        for (name, runs) in [("none", plain), ("zstd", zstd)] {
            series.push(svg::per_run(
                format!("{what}, {name}"),
                svg::COLORS[series.len() % svg::COLORS.len()],
                runs.iter().map(total_s),
            ));
        }
    }
    let chart = svg::line_chart(
        "4 GiB over 1 Gbit/s, 4 connections: total time with and without zstd",
        "run",
        "total time (s)",
        &(1..=opts.runs).map(|k| k as f64).collect::<Vec<_>>(),
        &series,
        None,
    );
    let _ = std::fs::write(img.join("compression.svg"), chart);
    md.push_str("\n![compression](img/compression.svg)\n");
    let failed = sets
        .iter()
        .flat_map(|(_, (p, z))| p.iter().chain(z))
        .filter(|r| !r.ok)
        .count();
    let js: Value = sets
        .iter()
        .map(|(what, (p, z))| {
            (
                what.to_string(),
                json!({
                    "none": p.iter().map(RunResult::to_json).collect::<Vec<_>>(),
                    "zstd": z.iter().map(RunResult::to_json).collect::<Vec<_>>(),
                }),
            )
        })
        .collect::<serde_json::Map<String, Value>>()
        .into();
    let mut js = js;
    js["speedup_text"] = json!(speedup);
    js["cost_random"] = json!(cost);
    js["guest_bytes"] = guest.into();
    Section {
        markdown: md,
        json: js,
        failed_runs: failed,
    }
}
