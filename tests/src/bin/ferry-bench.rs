//! `ferry-bench`: Ferry's live-migration benchmarks (issues #3 and #4).
//!
//! ```text
//! ferry-bench <ram|idle|downtime|devices|tls|zerocopy|converge|compress|handover|limits|all> [--runs N]
//!             [--out docs/benchmarks.md] [--settle S] [--conns 1,2,4,8]
//!             [--devices 1,2,4] [--keep-file]
//!             [--netns-rate 1gbit] [--max-load L] [--hold-file PATH]
//!             [--baseline OLD.json [--baseline-note TEXT]] [--modes a,b] [-v]
//! ```
//!
//! `--netns-rate RATE` runs every source and destination in two network
//! namespaces joined by a veth pair whose source side is shaped to RATE with
//! `tc ... tbf` (root and iproute2 needed; see `ferry_tests::NetPair`).
//!
//! `compress` (issue #13 §2) runs in the namespaces too (default `1gbit`):
//! 4 GiB of text and of random data, with and without zstd.
//!
//! `converge` (issue #10) always runs in the namespaces (`--netns-rate`,
//! default `1gbit` for it); before each of its runs it waits until the
//! 1-minute load average is below `--max-load` (default 1.0), and with
//! `--hold-file PATH` it creates PATH during each round of timed runs (and
//! removes it after), to tell others on the machine to stay quiet. The load
//! gate waits at most 10 min per round in all; past that, runs go on and the
//! section says the machine was busy. With `--baseline OLD.json` (an earlier
//! `converge` raw JSON) its table gains the earlier medians as "before";
//! `--modes reference,auto-converge,...` runs only those modes.
//!
//! Every migration's time series (the source's `vm.migration`: remaining
//! bytes, throughput, dirty rate, pass, throttle, state) is kept in the raw
//! JSON (`series`), and each part draws one representative run as
//! `docs/img/PART-series.svg` beside its table.
//!
//! `ferry`, `first-touch` and the stamp guest are taken from the same target
//! directory as this binary (the ferry-tests harness locates them;
//! `FERRY_STAMP_GUEST` overrides the guest).
//!
//! `handover` (issue #13 §3) moves a 16 GiB running guest over `unix:`
//! with its memory handed over (`shared=on`, `file=`), against an
//! anonymous guest copied over `unix:` and the shared guest over TCP
//! loopback, interleaved in the same run.
//!
//! ```text
//! ```
//!
//! Every part prints a Markdown section, writes the raw per-run results to
//! `resources/bench/results/PART-DATE.json`, and with `--out` replaces the
//! matching `<!-- ferry-bench:PART begin/end -->` block of that document.
//! The `devices` part (4 devices, `main` against `channels` at 1, 4, 6, 8
//! and 16 connections unless `--conns` says otherwise, then 1, 2 and 4
//! devices at 6 connections unless `--devices` does) also writes
//! `docs/img/downtime-vs-{devices,connections}.svg`.
//!
//! Benchmarks run strictly one at a time, and each timed run is preceded by a
//! settle wait (`--settle`, default 6 s): the host hands freed memory back
//! within seconds, and first-touch costs swing 2-4x without the wait.

#[path = "ferry-bench/compress.rs"]
mod compress;
#[path = "ferry-bench/converge.rs"]
mod converge;
#[path = "ferry-bench/converge_report.rs"]
mod converge_report;
#[path = "ferry-bench/devices.rs"]
mod devices;
#[path = "ferry-bench/handover.rs"]
mod handover;
#[path = "ferry-bench/limits.rs"]
mod limits;
#[path = "ferry-bench/procfs.rs"]
mod procfs;
#[path = "ferry-bench/report.rs"]
mod report;
#[path = "ferry-bench/series.rs"]
mod series;
#[path = "ferry-bench/series_svg.rs"]
mod series_svg;
#[path = "ferry-bench/suites.rs"]
mod suites;
#[path = "ferry-bench/svg.rs"]
mod svg;
#[path = "ferry-bench/tls.rs"]
mod tls;
#[path = "ferry-bench/vmm.rs"]
mod vmm;
#[path = "ferry-bench/zerocopy.rs"]
mod zerocopy;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Seconds since the bench started (for log lines).
pub fn elapsed() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Opts {
    pub part: String,
    pub runs: usize,
    pub out: Option<PathBuf>,
    pub root: PathBuf,
    pub conns: Vec<u32>,
    /// Whether `--conns` was given (the devices part has its own default).
    pub conns_given: bool,
    /// `--devices 1,2,4`: the device counts of the devices part's second
    /// table (default 1, 2, 4).
    pub devices: Option<Vec<usize>>,
    pub keep_file: bool,
    /// `--max-load`: wait for a 1-min load average below this before a run (converge).
    pub max_load: Option<f64>,
    /// `--hold-file`: created during each round of timed runs (converge).
    pub hold_file: Option<PathBuf>,
    /// `--baseline`: an earlier raw JSON of the same part, shown as
    /// "before" beside the new figures (converge).
    pub baseline: Option<PathBuf>,
    /// `--baseline-note`: what the baseline was (e.g. "main before the fix").
    pub baseline_note: Option<String>,
    /// `--modes a,b`: the converge modes to run (default: all).
    pub modes: Option<Vec<String>>,
}

fn usage() -> ! {
    eprintln!(
        "usage: ferry-bench <ram|idle|downtime|devices|tls|zerocopy|converge|compress|handover|limits|all> [--runs N]\n\
         \x20      [--out FILE.md] [--settle SECONDS] [--first-touch PATH]\n\
         \x20      [--conns 1,2,4,8] [--devices 1,2,4] [--root REPO] [--keep-file]\n\
         \x20      [--netns-rate 1gbit]\n\
         \x20      [--max-load 1.0] [--hold-file PATH] [--baseline OLD.json]\n\
         \x20      [--baseline-note TEXT] [--modes reference,pre-copy,...] [-v]"
    );
    std::process::exit(2)
}

fn main() {
    elapsed();
    let mut env = vmm::Env {
        first_touch: ferry_tests::profile_dir().join("first-touch"),
        settle_s: 6.0,
        verbose: false,
        net: None,
    };
    let mut opts = Opts {
        part: String::new(),
        runs: 3,
        out: None,
        root: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")),
        conns: vec![1, 2, 4, 8],
        conns_given: false,
        devices: None,
        keep_file: false,
        max_load: None,
        hold_file: None,
        baseline: None,
        baseline_note: None,
        modes: None,
    };
    let mut netns_rate: Option<String> = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--runs" => opts.runs = val().parse().unwrap_or_else(|_| usage()),
            "--out" => opts.out = Some(PathBuf::from(val())),
            "--root" => opts.root = PathBuf::from(val()),
            "--settle" => env.settle_s = val().parse().unwrap_or_else(|_| usage()),
            "--first-touch" => env.first_touch = PathBuf::from(val()),
            "--conns" => {
                opts.conns = val()
                    .split(',')
                    .map(|c| c.parse().unwrap_or_else(|_| usage()))
                    .collect();
                opts.conns_given = true;
            }
            "--devices" => {
                opts.devices = Some(
                    val()
                        .split(',')
                        .map(|c| c.parse().unwrap_or_else(|_| usage()))
                        .collect(),
                )
            }
            "--keep-file" => opts.keep_file = true,
            "--netns-rate" => netns_rate = Some(val()),
            "--max-load" => opts.max_load = Some(val().parse().unwrap_or_else(|_| usage())),
            "--hold-file" => opts.hold_file = Some(PathBuf::from(val())),
            "--baseline" => opts.baseline = Some(PathBuf::from(val())),
            "--baseline-note" => opts.baseline_note = Some(val()),
            "--modes" => opts.modes = Some(val().split(',').map(str::to_string).collect()),
            "-v" | "--verbose" => env.verbose = true,
            "-h" | "--help" => usage(),
            p if !p.starts_with('-') && opts.part.is_empty() => opts.part = p.to_string(),
            _ => usage(),
        }
    }
    if opts.runs == 0 {
        usage()
    }
    if env.settle_s < 6.0 {
        eprintln!(
            "ferry-bench: warning: --settle {} < 6 s: results may swing 2-4x",
            env.settle_s
        );
    }
    let parts: Vec<&str> = match opts.part.as_str() {
        "all" => vec!["ram", "idle", "downtime", "devices", "tls"],
        "ram" | "idle" | "downtime" | "devices" | "limits" | "tls" | "converge" | "zerocopy"
        | "compress" | "handover" => {
            vec![opts.part.as_str()]
        }
        _ => usage(),
    };
    // Never two benchmarks at once: hold an exclusive lock for the whole run.
    let _lock = lock("/tmp/ferry-bench.lock");
    let load = vmm::loadavg();
    if load > 0.5 {
        eprintln!("ferry-bench: warning: load average {load:.2}: other work shares the 2 cores, results will be low");
    }
    let ferry = ferry_tests::profile_dir().join("ferry");
    if parts.iter().any(|p| *p != "limits") && !ferry.is_file() {
        eprintln!(
            "ferry-bench: {} not found: build the workspace (cargo build --workspace --release)",
            ferry.display()
        );
        std::process::exit(2);
    }
    if (opts.part == "converge" || opts.part == "compress") && netns_rate.is_none() {
        netns_rate = Some("1gbit".into());
    }
    if opts.part == "zerocopy" && netns_rate.is_none() {
        netns_rate = Some("10gbit".into());
    }
    if let Some(rate) = &netns_rate {
        match ferry_tests::NetPair::new(rate) {
            Ok(n) => env.net = Some(std::sync::Arc::new(n)),
            Err(e) => {
                eprintln!("ferry-bench: --netns-rate {rate}: {e}");
                std::process::exit(2);
            }
        }
    }
    if !env.first_touch.is_file() {
        eprintln!(
            "ferry-bench: warning: {} not found",
            env.first_touch.display()
        );
    }
    let mut failed = false;
    for part in parts {
        env.log(&format!("== {part}"));
        let section = match part {
            "ram" => suites::ram(&env, &opts, true),
            "limits" => suites::ram(&env, &opts, false),
            "idle" => suites::idle(&env, &opts),
            "downtime" => suites::downtime(&env, &opts),
            "devices" => devices::devices(&env, &opts),
            "tls" => tls::tls(&env, &opts),
            "zerocopy" => zerocopy::zerocopy(&env, &opts),
            "converge" => converge_report::converge(&env, &opts),
            "compress" => compress::compress(&env, &opts),
            "handover" => handover::handover(&env, &opts),
            _ => unreachable!(),
        };
        let path = report::write_json(
            &opts.root.join("resources/bench/results"),
            part,
            &section.json,
        );
        let md = format!(
            "{}\n\n_Raw results: `{}`._\n",
            section.markdown.trim_end(),
            rel(&opts.root, &path)
        );
        println!("{md}");
        if let Some(out) = &opts.out {
            let out = if out.is_absolute() {
                out.clone()
            } else {
                opts.root.join(out)
            };
            if let Err(e) = report::update_doc(&out, part, &md) {
                eprintln!("ferry-bench: cannot update {}: {e}", out.display());
            }
        }
        failed |= section.failed_runs > 0;
    }
    // exit() runs no destructors: remove the namespaces first.
    drop(env.net.take());
    if failed {
        eprintln!("ferry-bench: some runs failed (see the tables and JSON)");
        std::process::exit(1);
    }
}

/// Takes an exclusive flock on `path`, waiting (with a message) if another bench holds it.
fn lock(path: &str) -> Option<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("ferry-bench: another ferry-bench holds {path}; waiting for it to finish");
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    }
    Some(f)
}

fn rel(root: &Path, p: &str) -> String {
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    Path::new(p)
        .canonicalize()
        .ok()
        .and_then(|p| p.strip_prefix(&root).ok().map(|r| r.display().to_string()))
        .unwrap_or_else(|| p.to_string())
}
