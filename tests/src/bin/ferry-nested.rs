//! Runs one scenario in the nested Linux test bed and streams the L1
//! console (see `ferry_tests::nested`).
//!
//! ```text
//! ferry-nested [--smp N] [--mem MIB] [--timeout SECONDS] [--all] SCRIPT
//! ```
//!
//! It echoes the scenario's own lines (`say`, `dump`); `--all` echoes the
//! whole L1 console (kernel messages included).
//!
//! SCRIPT is a busybox `sh` file run inside L1 after `/lib.sh`
//! (tests/nested/lib.sh) is sourced, with `/dev/kvm` ready and `ferry`,
//! `ferry-remote` on the PATH. Exits with the scenario's exit code (3 when
//! it did not finish, 4 when QEMU is not installed).

use std::process::ExitCode;
use std::time::Duration;

use ferry_tests::nested::{bed_or_skip, Echo, Scenario};

fn usage() -> ExitCode {
    eprintln!("usage: ferry-nested [--smp N] [--mem MIB] [--timeout SECONDS] [--all] SCRIPT");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut smp, mut mem, mut timeout, mut script) = (1u8, 2048u32, 600u64, None);
    let mut echo = Echo::Scenario;
    while let Some(a) = args.next() {
        let mut num = |what: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("ferry-nested: {what} needs a number");
            }
            v
        };
        match a.as_str() {
            "--smp" => match num("--smp").and_then(|n| u8::try_from(n).ok()) {
                Some(n) if n > 0 => smp = n,
                _ => return usage(),
            },
            "--mem" => match num("--mem").and_then(|n| u32::try_from(n).ok()) {
                Some(n) => mem = n,
                None => return usage(),
            },
            "--timeout" => match num("--timeout") {
                Some(n) => timeout = n,
                None => return usage(),
            },
            "--all" => echo = Echo::All,
            "-h" | "--help" => {
                usage();
                return ExitCode::SUCCESS;
            }
            s if script.is_none() && !s.starts_with('-') => script = Some(s.to_string()),
            _ => return usage(),
        }
    }
    let Some(path) = script else { return usage() };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ferry-nested: reading {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let Some(bed) = bed_or_skip() else {
        return ExitCode::from(4);
    };
    let name = std::path::Path::new(&path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("scenario")
        .to_string();
    let mut sc = Scenario::new(&name, &text);
    sc.smp = smp;
    sc.mem_mib = mem;
    sc.timeout = Duration::from_secs(timeout);
    sc.echo = echo;
    let run = bed.run(&sc);
    match run.exit_code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1).max(1)),
        None => ExitCode::from(3),
    }
}
