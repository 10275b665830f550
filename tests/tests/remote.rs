//! `ferry-remote` and the command line of both binaries as a user meets
//! them (issue #11): errors that name what is missing, `--help` with every
//! default and key, completions and man pages, logging flags, `--wait`
//! progress on either side and `migration-status --csv`.
//!
//! The command-line tests need no VM; the migration test boots the stamp
//! guest and checks that it moved without a MISMATCH.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use ferry_tests::*;

const SHORT: Duration = Duration::from_secs(60);

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The non-empty lines of `s`.
fn lines(s: &str) -> Vec<&str> {
    s.lines().filter(|l| !l.trim().is_empty()).collect()
}

/// Runs `ferry-remote args` and expects exit `code` and exactly one line on
/// stderr (`ferry-remote: error: ...`); returns that line.
fn expect_one_error_line(args: &[&str], code: i32) -> String {
    let out = run_remote(args, SHORT);
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry-remote {args:?}: exit {}; stderr:\n{err}",
        out.status
    );
    let l = lines(&err);
    assert_eq!(
        l.len(),
        1,
        "ferry-remote {args:?}: one stderr line expected:\n{err}"
    );
    assert!(l[0].starts_with("ferry-remote: error: "), "{}", l[0]);
    l[0].to_string()
}

#[test]
fn no_arguments_prints_the_usage() {
    let out = run_remote(&[], SHORT);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Usage:"), "no usage:\n{err}");
    assert!(
        err.contains("send-migration"),
        "no subcommands listed:\n{err}"
    );
    assert!(
        !err.contains("error: Control a ferry"),
        "the description is not an error:\n{err}"
    );
}

#[test]
fn a_missing_argument_is_named() {
    let l = expect_one_error_line(
        &["--api-socket", "/x.sock", "send-migration", "--no-tls"],
        2,
    );
    assert!(
        l.contains("the following required arguments were not provided") && l.contains("<URL>"),
        "{l}"
    );
    let l = expect_one_error_line(
        &[
            "--api-socket",
            "/x.sock",
            "receive-migration",
            "tcp:127.0.0.1:1",
        ],
        2,
    );
    assert!(l.contains("--tls-dir") && l.contains("--no-tls"), "{l}");
    let l = expect_one_error_line(&["ping"], 2);
    assert!(l.contains("--api-socket <PATH>"), "{l}");
    let l = expect_one_error_line(&["--api-socket", "/x.sock", "no-such-command"], 2);
    assert!(l.contains("no-such-command"), "{l}");
}

#[test]
fn a_bad_socket_says_the_os_error_once_with_the_path() {
    let l = expect_one_error_line(&["--api-socket", "/nonexistent/ferry.sock", "ping"], 1);
    assert!(l.contains("/nonexistent/ferry.sock"), "{l}");
    assert_eq!(l.matches("No such file or directory").count(), 1, "{l}");
}

#[test]
fn help_shows_defaults_and_device_keys() {
    let out = run_remote(&["send-migration", "--help"], SHORT);
    assert!(out.status.success());
    let h = text(&out.stdout);
    for want in [
        "[default: 4]",
        "[default: 3600]",
        "[default: channels]",
        "[VMM default: 300]",
        "[VMM default: minimal-downtime]",
        "--cancel-on-interrupt",
        "Exit codes:",
    ] {
        assert!(
            h.contains(want),
            "{want:?} missing from send-migration --help:\n{h}"
        );
    }
    let out = run_remote(&["migration-status", "--help"], SHORT);
    assert!(text(&out.stdout).contains("[default: 500]"));
    let out = run_ferry(&["--help"], SHORT);
    assert!(out.status.success());
    let h = text(&out.stdout);
    for want in [
        "id=NAME",
        "state=SIZE",
        "precopy=SIZE",
        "dirty-rate=",
        "save-rate=",
        "load-rate=",
        "fail-save-after=",
        "fail-load=",
        "path=/sys/bus/pci/devices/",
        "default 512M",
        "console=ttyS0",
        "--log-file",
        "RUST_LOG",
        "Exit codes:",
    ] {
        assert!(h.contains(want), "{want:?} missing from ferry --help:\n{h}");
    }
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_remote(&["completions", shell], SHORT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("send-migration"), "{shell}");
        let out = run_ferry(&["--completions", shell], SHORT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("sim-vfio"), "{shell}");
    }
    let out = run_remote(&["man"], SHORT);
    assert!(out.status.success());
    let m = text(&out.stdout);
    assert!(
        m.contains(".TH ferry-remote") && m.contains("ferry-remote-send-migration"),
        "{m}"
    );
    let out = run_ferry(&["--man"], SHORT);
    assert!(out.status.success());
    assert!(text(&out.stdout).contains(".TH ferry"));
}

#[test]
fn a_bad_log_file_is_a_usage_error() {
    let out = run_ferry(
        &[
            "--api-socket",
            "/tmp/unused.sock",
            "--log-file",
            "/nonexistent/dir/ferry.log",
        ],
        SHORT,
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let l = lines(&err);
    assert_eq!(l.len(), 1, "{err}");
    assert!(l[0].contains("/nonexistent/dir/ferry.log"), "{err}");
}

#[test]
fn verbose_logs_go_to_the_log_file() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("logfile");
    let log = dir.join("ferry.log");
    let log_s = log.to_str().unwrap().to_string();
    let mut vm = Vmm::boot_no_wait(
        "logfile",
        "region=4 passes=1",
        &["-v", "--log-file", &log_s],
    );
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(vm.serial.passes(), vec![1]);
    assert_eq!(vm.serial.mismatch(), None);
    let logged = std::fs::read_to_string(&log).expect("log file written");
    let info: Vec<&str> = logged.lines().filter(|l| l.contains(" INFO ")).collect();
    assert!(!info.is_empty(), "no info line with -v:\n{logged}");
    assert!(
        info.iter()
            .all(|l| l.starts_with('[') && l.contains(" ferry ")),
        "one format:\n{logged}"
    );
    assert!(
        !vm.stderr().contains(" INFO "),
        "with --log-file nothing is logged to stderr:\n{}",
        vm.stderr()
    );
}

/// A `ferry-remote` run in the background, its output collected.
struct Background {
    child: std::process::Child,
}

impl Background {
    fn start(sock: &std::path::Path, args: &[&str]) -> Background {
        let child = Command::new(ferry_remote_bin())
            .arg("--api-socket")
            .arg(sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry-remote");
        Background { child }
    }

    /// Waits for the end (killed after `timeout`): exit code, stdout, stderr.
    fn finish(mut self, timeout: Duration) -> (Option<i32>, String, String) {
        let mut out = self.child.stdout.take().unwrap();
        let mut err = self.child.stderr.take().unwrap();
        let to = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let te = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let status = poll(timeout, || self.child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        (
            status.and_then(|s| s.code()),
            to.join().unwrap_or_default(),
            te.join().unwrap_or_default(),
        )
    }
}

/// Checks the plain progress lines of `--wait` (not a terminal): no bar,
/// no cursor tricks, and never "0 MiB left" while running.
fn check_plain_progress(stderr: &str, who: &str, want: &str) {
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{who}: terminal codes in:\n{stderr}"
    );
    let progress: Vec<&str> = stderr.lines().filter(|l| l.contains(": pass ")).collect();
    assert!(!progress.is_empty(), "{who}: no progress line:\n{stderr}");
    assert!(
        progress.iter().any(|l| l.contains(want)),
        "{who}: no {want:?} in:\n{stderr}"
    );
    for l in &progress {
        assert!(l.contains("MiB/s"), "{who}: no rate in {l}");
        if l.starts_with("active:") {
            assert!(
                !l.contains(" 0 MiB left"),
                "{who}: unknown remaining shown as 0: {l}"
            );
        }
    }
}

fn final_state(stdout: &str, who: &str) -> String {
    let v: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{who}: stdout is not one JSON status ({e}):\n{stdout}"));
    mig_state(&v).to_string()
}

/// `receive-migration --wait` and `send-migration --wait` follow one
/// migration from both sides; `migration-status --csv` then records the
/// next hop of the same guest.
#[test]
fn wait_on_both_sides_then_a_csv_series() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (src, dst) = start_pair("region=32 passes=0", &[], 2);

    // Hop 1: src -> dst, both sides with --wait.
    let port = free_tcp_port();
    let url = tcp_url(port);
    let recv = Background::start(
        &dst.sock,
        &["receive-migration", &url, "--no-tls", "--wait"],
    );
    assert!(
        poll(LONG, || tcp_listening(port).then_some(())).is_some(),
        "destination not listening"
    );
    let out = src.remote(&[
        "send-migration",
        &url,
        "--no-tls",
        "--connections",
        "2",
        "--wait",
    ]);
    let (sout, serr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "send --wait:\n{sout}\n{serr}");
    assert_eq!(final_state(&sout, "send --wait"), "completed");
    check_plain_progress(&serr, "send --wait", "MiB left");
    let (code, rout, rerr) = recv.finish(MIGRATION_TIMEOUT);
    assert_eq!(code, Some(0), "receive --wait:\n{rout}\n{rerr}");
    assert_eq!(final_state(&rout, "receive --wait"), "completed");
    check_plain_progress(&rerr, "receive --wait", "MiB received");
    dst.wait_more_passes(2);

    // Hop 2: dst -> dst2, sampled as CSV on the sending side.
    let dst2 = Vmm::destination("dst2", &[]);
    let port = free_tcp_port();
    let url = tcp_url(port);
    let out = dst2.remote(&["receive-migration", &url, "--no-tls"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(poll(LONG, || tcp_listening(port).then_some(())).is_some());
    let out = dst.remote(&["send-migration", &url, "--no-tls", "--connections", "2"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = dst.remote(&["migration-status", "--csv", "--interval-ms", "50"]);
    let csv = text(&out.stdout);
    assert!(out.status.success(), "--csv: {}\n{csv}", text(&out.stderr));
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(
        rows[0],
        "elapsed_ms,pass,remaining_bytes,transferred_bytes,throughput_bytes_per_s,\
         dirty_rate_bytes_per_s,cpu_throttle_percent,state"
    );
    assert!(rows.len() >= 3, "a header and at least two samples:\n{csv}");
    let mut last_elapsed = 0;
    for r in &rows[1..] {
        let c: Vec<&str> = r.split(',').collect();
        assert_eq!(c.len(), 8, "{r}");
        let elapsed: u64 = c[0].parse().unwrap_or_else(|_| panic!("elapsed_ms: {r}"));
        assert!(elapsed >= last_elapsed, "elapsed_ms goes back: {r}\n{csv}");
        last_elapsed = elapsed;
        for (i, n) in [
            (1, "pass"),
            (3, "transferred"),
            (4, "throughput"),
            (5, "dirty"),
            (6, "throttle"),
        ] {
            c[i].parse::<u64>().unwrap_or_else(|_| panic!("{n}: {r}"));
        }
        assert!(
            c[2].is_empty() || c[2].parse::<u64>().is_ok(),
            "remaining: {r}"
        );
    }
    assert_eq!(
        rows.last().unwrap().rsplit(',').next(),
        Some("completed"),
        "{csv}"
    );
    check_guest_moved(&[&src.serial, &dst.serial], &dst2);
}

impl Background {
    /// Sends SIGINT, as Ctrl-C would.
    fn interrupt(&self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let r = unsafe { libc::kill(pid, libc::SIGINT) };
        assert_eq!(r, 0, "kill -INT {pid}");
    }
}

/// Ctrl-C during `--wait` without a terminal: plain `--wait` stops waiting
/// and leaves the migration running (exit 130); `--cancel-on-interrupt`
/// cancels it (exit 4) and the source guest runs on.
#[test]
fn ctrl_c_during_wait() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (src, dst) = start_pair("region=32 passes=0", &[], 2);
    let port = free_tcp_port();
    let url = tcp_url(port);
    let recv = Background::start(
        &dst.sock,
        &["receive-migration", &url, "--no-tls", "--wait"],
    );
    assert!(poll(LONG, || tcp_listening(port).then_some(())).is_some());
    // 2 MiB/s: the 32 MiB the guest writes take well over 10 s.
    let send = Background::start(
        &src.sock,
        &[
            "send-migration",
            &url,
            "--no-tls",
            "--max-bandwidth-mib-s",
            "2",
            "--wait",
            "--cancel-on-interrupt",
        ],
    );
    wait_transfer_started(&src);

    recv.interrupt();
    let (code, out, err) = recv.finish(LONG);
    assert_eq!(
        code,
        Some(130),
        "receive --wait after Ctrl-C:\n{out}\n{err}"
    );
    assert!(err.contains("the migration goes on"), "{err}");
    assert_eq!(
        mig_state(&src.migration_status().unwrap_or_default()),
        "active"
    );

    send.interrupt();
    let (code, out, err) = send.finish(LONG);
    assert_eq!(
        code,
        Some(4),
        "send --wait --cancel-on-interrupt:\n{out}\n{err}"
    );
    assert_eq!(final_state(&out, "send --wait"), "cancelled");
    assert!(
        err.contains("ferry-remote: error: migration cancelled"),
        "{err}"
    );
    assert_guest_runs(&src, 2);
}
