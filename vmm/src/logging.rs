//! Logging of the `ferry` and `ferry-remote` binaries: one format, one
//! place that sets it up ([`init`]), and the command-line flags for it
//! ([`LogArgs`]: `-v`/`-vv`/`-vvv` and `--log-file`).
//!
//! The libraries log through the `log` facade only; the binaries print to
//! stderr directly nothing but their final `PROG: error: ...` line (and
//! clap's usage), so that everything else a user sees has this format:
//!
//! ```text
//! [2026-12-03T12:00:00.123Z WARN  ferry vmm::control] message
//! ```
//!
//! The filter: warnings by default; `RUST_LOG` (env_logger's syntax, e.g.
//! `RUST_LOG=info,migration=debug`) replaces that default; `-v` (info),
//! `-vv` (debug) or `-vvv` (trace) then set the level of every module that
//! `RUST_LOG` does not name.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;

use std::sync::atomic::{AtomicBool, Ordering};

use log::LevelFilter;

/// Whether [`init`] sent the log to a file (`--log-file`).
static TO_FILE: AtomicBool = AtomicBool::new(false);

/// Whether the installed log goes to a file rather than stderr: a binary
/// then also logs its final error line, which it prints to stderr anyway.
pub fn logs_to_file() -> bool {
    TO_FILE.load(Ordering::Relaxed)
}

/// Logs `msg` at error level when the log goes to a file (on stderr the
/// caller's own `PROG: error:` line says it already).
pub fn error_to_file(msg: &dyn std::fmt::Display) {
    if logs_to_file() {
        log::error!("{msg}");
    }
}

/// The logging flags shared by `ferry` and `ferry-remote`.
///
/// Invariant: none beyond the types; `verbose` above 3 means trace.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct LogArgs {
    /// More log output: -v info, -vv debug, -vvv trace (default: warnings
    /// and errors only; RUST_LOG, in env_logger's syntax, sets per-module
    /// levels).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true,
          help_heading = "Logging")]
    pub verbose: u8,
    /// Append the log to this file instead of writing it to stderr (the
    /// final error line still goes to stderr too).
    #[arg(long, value_name = "PATH", global = true, help_heading = "Logging")]
    pub log_file: Option<PathBuf>,
}

impl LogArgs {
    /// The level `-v` asks for, `None` without `-v`.
    pub fn level(&self) -> Option<LevelFilter> {
        match self.verbose {
            0 => None,
            1 => Some(LevelFilter::Info),
            2 => Some(LevelFilter::Debug),
            _ => Some(LevelFilter::Trace),
        }
    }
}

/// Errors setting up the log.
///
/// Invariant: the message names the log file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `--log-file` cannot be opened for appending.
    #[error("cannot open the log file {path}: {source}")]
    File {
        /// The path as given.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Builds the logger of program `prog` (without installing it): the
/// filter described in the module documentation, with `rust_log` standing
/// for the value of `RUST_LOG`.
pub fn builder(
    prog: &'static str,
    args: &LogArgs,
    rust_log: Option<&str>,
) -> Result<env_logger::Builder, LogError> {
    let mut b = env_logger::Builder::new();
    b.filter_level(LevelFilter::Warn);
    if let Some(filters) = rust_log.filter(|s| !s.trim().is_empty()) {
        b.parse_filters(filters);
    }
    if let Some(level) = args.level() {
        // Replaces the default directive only; modules that RUST_LOG
        // names keep their level.
        b.filter_level(level);
    }
    b.format(move |f, rec| {
        writeln!(
            f,
            "[{} {:<5} {prog} {}] {}",
            f.timestamp_micros(),
            rec.level(),
            rec.target(),
            rec.args()
        )
    });
    if let Some(path) = &args.log_file {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| LogError::File {
                path: path.display().to_string(),
                source,
            })?;
        b.target(env_logger::Target::Pipe(Box::new(file)));
        b.write_style(env_logger::WriteStyle::Never);
    }
    Ok(b)
}

/// Installs the logger of program `prog` (once per process; a second call
/// changes nothing).
pub fn init(prog: &'static str, args: &LogArgs) -> Result<(), LogError> {
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut b = builder(prog, args, rust_log.as_deref())?;
    // A logger already installed (a second call) is not an error here.
    if b.try_init().is_ok() {
        TO_FILE.store(args.log_file.is_some(), Ordering::Relaxed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        log: LogArgs,
    }

    #[test]
    fn verbosity_levels() {
        let lv = |a: &[&str]| {
            let mut v = vec!["t"];
            v.extend_from_slice(a);
            T::parse_from(v).log.level()
        };
        assert_eq!(lv(&[]), None);
        assert_eq!(lv(&["-v"]), Some(LevelFilter::Info));
        assert_eq!(lv(&["-vv"]), Some(LevelFilter::Debug));
        assert_eq!(lv(&["-v", "-v", "-v"]), Some(LevelFilter::Trace));
        assert_eq!(lv(&["-vvvvv"]), Some(LevelFilter::Trace));
        let t = T::parse_from(["t", "--log-file", "/tmp/x.log"]);
        assert_eq!(t.log.log_file, Some(PathBuf::from("/tmp/x.log")));
    }

    #[test]
    fn filters() {
        let max = |v: u8, rust_log: Option<&str>| {
            let a = LogArgs {
                verbose: v,
                log_file: None,
            };
            builder("t", &a, rust_log).unwrap().build().filter()
        };
        assert_eq!(max(0, None), LevelFilter::Warn);
        assert_eq!(max(1, None), LevelFilter::Info);
        assert_eq!(max(2, None), LevelFilter::Debug);
        assert_eq!(max(0, Some("debug")), LevelFilter::Debug);
        assert_eq!(max(0, Some("migration=trace")), LevelFilter::Trace);
        // -v replaces RUST_LOG's default level, not its module directives.
        assert_eq!(max(1, Some("error")), LevelFilter::Info);
    }

    #[test]
    fn log_file_errors_name_the_file() {
        let a = LogArgs {
            verbose: 0,
            log_file: Some(PathBuf::from("/nonexistent-dir/ferry.log")),
        };
        let Err(e) = builder("t", &a, None) else {
            panic!("must fail")
        };
        assert!(e.to_string().contains("/nonexistent-dir/ferry.log"), "{e}");
    }
}
