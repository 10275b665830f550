//! `--wait`: follows a migration until it ends, showing its progress on
//! stderr (an indicatif bar on a terminal, one plain line per second or
//! pass otherwise), and handles Ctrl-C (ask, cancel, or stop waiting).

use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use migration::api::{MigrationState, SourceVmOutcome};
use vmm::client::status::Progress;
use vmm::client::Client;

use crate::exit::{Exit, EXIT_CANCELLED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_SOURCE_HELD};

/// How often the status is read.
const POLL: Duration = Duration::from_millis(200);
/// A plain progress line at least this often (and at each new pass).
const LINE_EVERY: Duration = Duration::from_secs(1);

const MIB: f64 = 1024.0 * 1024.0;

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

/// `s` seconds as `M:SS` (or `H:MM:SS`).
fn clock(s: u64) -> String {
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// The figures of one sample, as words: pass, what is left (or that it is
/// not known yet), rate, ETA, dirty rate, throttle.
pub fn figures(p: &Progress) -> String {
    let mut parts = vec![format!("pass {}", p.pass())];
    if p.is_destination() {
        parts.push(format!("{:.0} MiB received", mib(p.transferred())));
    } else {
        parts.push(format!(
            "{:.0}/{:.0} MiB sent",
            mib(p.transferred()),
            mib(p.total())
        ));
        parts.push(match p.remaining() {
            Some(r) => format!("{:.0} MiB left", mib(r)),
            None => "remaining not known yet".to_string(),
        });
    }
    parts.push(format!(
        "{:.0} MiB/s ({:.0} Mbit/s)",
        mib(p.throughput()),
        p.mbit_s()
    ));
    if let Some(pps) = p.pages_per_s.filter(|&v| v > 0.0) {
        parts.push(format!("{pps:.0} pages/s"));
    }
    if let Some(eta) = p.eta_s() {
        parts.push(format!("ETA {}", clock(eta)));
    }
    if !p.is_destination() {
        parts.push(format!("dirtying {:.0} MiB/s", mib(p.dirty_rate())));
        if p.throttle() > 0 {
            parts.push(format!("throttle {}%", p.throttle()));
        }
    }
    if let Some(pc) = &p.postcopy {
        parts.push(format!("post-copy {pc}"));
    }
    parts.join(", ")
}

/// One plain progress line.
pub fn line(p: &Progress) -> String {
    format!("{}: {}", p.state_name(), figures(p))
}

/// Where progress goes.
enum Display {
    /// A bar on a terminal; `known` tells which style it has now.
    Bar { bar: ProgressBar, known: bool },
    /// Plain lines to stderr.
    Lines {
        last: Option<Instant>,
        last_pass: u64,
    },
}

fn style(known: bool) -> ProgressStyle {
    let t = if known {
        "{spinner} {elapsed_precise} [{bar:30}] {percent:>3}% {msg}"
    } else {
        "{spinner} {elapsed_precise} [{bar:30}]   ?% {msg}"
    };
    // The templates are constants: a parse error is a bug caught by tests.
    ProgressStyle::with_template(t)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("#>.")
}

impl Display {
    fn new(tty: bool) -> Display {
        if tty {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            bar.set_style(style(false));
            bar.enable_steady_tick(Duration::from_millis(120));
            Display::Bar { bar, known: false }
        } else {
            Display::Lines {
                last: None,
                last_pass: u64::MAX,
            }
        }
    }

    fn show(&mut self, p: &Progress) {
        match self {
            Display::Bar { bar, known } => {
                let remaining = p.remaining();
                if remaining.is_some() != *known {
                    *known = remaining.is_some();
                    bar.set_style(style(*known));
                }
                // The share of the bytes sent so far among those plus what
                // is left (zero pages cost little, so the guest's size
                // would overstate it); unknown: an empty bar, never 100 %.
                let sent = p.transferred();
                match remaining {
                    Some(r) => {
                        bar.set_length(sent.saturating_add(r).max(1));
                        bar.set_position(sent);
                    }
                    None => {
                        bar.set_length(1);
                        bar.set_position(0);
                    }
                }
                bar.set_message(format!("{}: {}", p.state_name(), figures(p)));
            }
            Display::Lines { last, last_pass } => {
                let due = last.is_none_or(|t| t.elapsed() >= LINE_EVERY);
                if due || p.pass() != *last_pass || p.is_finished() {
                    let mut err = std::io::stderr().lock();
                    // Progress is best effort: a closed stderr stops nothing.
                    let _ = writeln!(err, "{}", line(p));
                    *last = Some(Instant::now());
                    *last_pass = p.pass();
                }
            }
        }
    }

    /// Runs `f` with the bar out of the way (a prompt, a message).
    fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match self {
            Display::Bar { bar, .. } => bar.suspend(f),
            Display::Lines { .. } => f(),
        }
    }

    fn finish(&self) {
        if let Display::Bar { bar, .. } = self {
            bar.finish();
        }
    }
}

/// Ctrl-C while waiting: the flag a first SIGINT sets; a second one while
/// it is set ends the process at once with [`EXIT_INTERRUPTED`].
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    use signal_hook::consts::SIGINT;
    // Registered first, so it sees the flag as the previous SIGINT left it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, EXIT_INTERRUPTED, flag.clone())
        .context("cannot handle SIGINT")?;
    signal_hook::flag::register(SIGINT, flag.clone()).context("cannot handle SIGINT")?;
    Ok(flag)
}

/// What to do about a Ctrl-C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnInterrupt {
    /// Cancel the migration and wait for it to end.
    Cancel,
    /// Ask on the terminal.
    Ask,
    /// Stop waiting; the migration goes on.
    Leave,
}

/// Asks on the terminal whether to cancel; `true` for yes.
fn ask_cancel(display: &Display) -> bool {
    display.suspend(|| {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "Cancel the migration? [y/N] (Ctrl-C again: stop waiting, the migration goes on) "
        );
        let _ = err.flush();
        drop(err);
        let mut answer = String::new();
        match std::io::stdin().lock().read_line(&mut answer) {
            Ok(_) => matches!(answer.trim(), "y" | "Y" | "yes" | "Yes" | "YES"),
            Err(_) => false,
        }
    })
}

/// The exit for a finished migration, printing its final status (the
/// whole JSON answer) on stdout.
fn ended(p: &Progress, body: &str) -> Result<()> {
    let pretty = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| body.trim().to_string());
    println!("{pretty}");
    let why = p.error.as_deref().unwrap_or("no reason given");
    // "migration cancelled: migration cancelled" says it twice.
    let said = |what: &str| {
        if why.starts_with(what) {
            why.to_string()
        } else {
            format!("{what}: {why}")
        }
    };
    match p.state() {
        Some(MigrationState::Completed) => Ok(()),
        Some(MigrationState::Cancelled) => {
            Err(Exit::new(EXIT_CANCELLED, said("migration cancelled")).into())
        }
        _ => match p.source_vm() {
            Some(SourceVmOutcome::PausedUncertain | SourceVmOutcome::PostcopyPaused) => {
                Err(Exit::new(
                    EXIT_SOURCE_HELD,
                    format!(
                        "{}; the source VM was left paused (source_vm {}): do not resume \
                         it before checking the destination",
                        said("migration failed"),
                        p.source_vm.as_deref().unwrap_or("?")
                    ),
                )
                .into())
            }
            _ => Err(Exit::new(EXIT_FAILED, said("migration failed")).into()),
        },
    }
}

/// Follows the migration of the VMM behind `client` until it ends; `side`
/// names it in messages (`source` or `destination`).
pub fn wait(client: &Client, side: &str, cancel_on_interrupt: bool) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let on_interrupt = if cancel_on_interrupt {
        OnInterrupt::Cancel
    } else if tty && std::io::stdin().is_terminal() {
        OnInterrupt::Ask
    } else {
        OnInterrupt::Leave
    };
    let interrupted = interrupt_flag()?;
    let mut display = Display::new(tty);
    let mut cancel_sent = false;
    loop {
        let r = client
            .call_empty("GET", "vm.migration")
            .with_context(|| format!("lost contact with the {side} VMM while waiting"))?;
        let p = Progress::parse(&r.body).context("unreadable vm.migration answer")?;
        display.show(&p);
        if p.is_finished() {
            display.finish();
            return ended(&p, &r.body);
        }
        let until = Instant::now() + POLL;
        while Instant::now() < until && !interrupted.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !interrupted.load(Ordering::SeqCst) || cancel_sent {
            continue;
        }
        let cancel = match on_interrupt {
            OnInterrupt::Cancel => true,
            OnInterrupt::Ask => ask_cancel(&display),
            OnInterrupt::Leave => {
                display.finish();
                return Err(Exit::new(
                    EXIT_INTERRUPTED,
                    "interrupted: stopped waiting; the migration goes on \
                     (cancel it with `ferry-remote migration-cancel`)",
                )
                .into());
            }
        };
        if cancel {
            display.suspend(|| log::warn!("cancelling the migration"));
            client
                .call_empty("PUT", "vm.migration-cancel")
                .context("cancelling the migration")?;
            cancel_sent = true;
        }
        // Re-armed: the next Ctrl-C asks again (or, once cancelled, the
        // second one within the wait ends the process).
        interrupted.store(cancel_sent, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_parse() {
        assert!(ProgressStyle::with_template(
            "{spinner} {elapsed_precise} [{bar:30}] {percent:>3}% {msg}"
        )
        .is_ok());
    }

    #[test]
    fn lines_never_say_0_left_when_unknown() {
        let p = Progress::parse(
            r#"{"state":"active","role":"source","iteration":1,"total_bytes":536870912,
                "transferred_bytes":1048576,"remaining_bytes":0,"throughput_bps":10485760}"#,
        )
        .unwrap();
        let l = line(&p);
        assert!(l.contains("remaining not known yet"), "{l}");
        assert!(!l.contains("0 MiB left") && !l.contains("ETA"), "{l}");
        let p = Progress::parse(
            r#"{"state":"active","role":"source","iteration":2,"total_bytes":536870912,
                "transferred_bytes":536870912,"remaining_bytes":20971520,
                "throughput_bytes_per_s":10485760,"dirty_rate_bytes_per_s":1048576,
                "cpu_throttle_percent":20}"#,
        )
        .unwrap();
        let l = line(&p);
        for want in [
            "active: pass 2",
            "20 MiB left",
            "10 MiB/s (84 Mbit/s)",
            "ETA 0:02",
            "dirtying 1 MiB/s",
            "throttle 20%",
        ] {
            assert!(l.contains(want), "{want:?} not in {l}");
        }
        let p = Progress::parse(
            r#"{"state":"active","role":"destination","iteration":2,"transferred_bytes":2097152}"#,
        )
        .unwrap();
        let l = line(&p);
        assert!(l.contains("2 MiB received") && !l.contains("left"), "{l}");
    }

    #[test]
    fn clocks() {
        assert_eq!(clock(5), "0:05");
        assert_eq!(clock(65), "1:05");
        assert_eq!(clock(3725), "1:02:05");
    }
}
