//! `migration-status --csv`: a time series of the migration for the
//! operator's own plots, one row per sample until the migration ends.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use migration::api::MigrationState;
use vmm::client::status::Progress;
use vmm::client::Client;

/// How long `--csv` waits for a migration to begin before it gives up
/// (a send just asked for begins within milliseconds).
pub const START_GRACE: Duration = Duration::from_secs(2);

/// The header: every column with its unit in its name.
pub const HEADER: &str = "elapsed_ms,pass,remaining_bytes,transferred_bytes,\
throughput_bytes_per_s,dirty_rate_bytes_per_s,cpu_throttle_percent,state";

/// One row for `p`, sampled `since_start` after the first sample:
/// `elapsed_ms` is the VMM's (time since the migration began) when it
/// says, else the client's; an unknown `remaining_bytes` is empty.
pub fn row(p: &Progress, since_start: Duration) -> String {
    let elapsed = p
        .elapsed_ms
        .filter(|&e| e > 0.0)
        .map(|e| e.round() as u64)
        .unwrap_or(since_start.as_millis() as u64);
    let remaining = p.remaining().map(|r| r.to_string()).unwrap_or_default();
    // State names are snake_case words; anything else is quoted.
    let state = p.state_name();
    let state = if state
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        state.to_string()
    } else {
        format!("\"{}\"", state.replace('"', "\"\""))
    };
    format!(
        "{elapsed},{},{remaining},{},{},{},{},{state}",
        p.pass(),
        p.transferred(),
        p.throughput(),
        p.dirty_rate(),
        p.throttle(),
    )
}

/// Prints the header, then a row every `interval` until the migration
/// ended (or, when none runs, for [`START_GRACE`]).
pub fn dump(client: &Client, interval: Duration) -> Result<()> {
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    writeln!(out, "{HEADER}")?;
    loop {
        let at = Instant::now();
        let r = client.call_empty("GET", "vm.migration")?;
        let p = Progress::parse(&r.body).context("unreadable vm.migration answer")?;
        writeln!(out, "{}", row(&p, at - start))?;
        out.flush()?;
        // Ended, or none runs (after a grace period for one that was
        // just asked for, whose job has not begun); a state this client
        // does not know (a newer VMM's) is followed like `active`.
        let none = p.state.is_none() || p.state() == Some(MigrationState::None);
        if p.is_finished() || (none && start.elapsed() >= START_GRACE) {
            return Ok(());
        }
        std::thread::sleep(interval.saturating_sub(at.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_match_the_header() {
        let n = HEADER.split(',').count();
        let p = Progress::parse(
            r#"{"state":"active","iteration":2,"elapsed_ms":1500,"remaining_bytes":4096,
                "transferred_bytes":8192,"throughput_bytes_per_s":100,"dirty_rate_bps":7,
                "cpu_throttle_percent":30}"#,
        )
        .unwrap();
        let r = row(&p, Duration::from_millis(3));
        assert_eq!(r, "1500,2,4096,8192,100,7,30,active");
        assert_eq!(r.split(',').count(), n);
        let p = Progress::parse(r#"{"state":"active","remaining_bytes":0}"#).unwrap();
        assert_eq!(row(&p, Duration::from_millis(3)), "3,0,,0,0,0,0,active");
        let p = Progress::parse(r#"{"state":"odd, state"}"#).unwrap();
        assert!(row(&p, Duration::ZERO).ends_with(",\"odd, state\""));
    }
}
