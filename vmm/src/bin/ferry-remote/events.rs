//! `events`: prints the VMM's events as JSON lines, following new ones
//! with long polls of `vm.events`.

use std::io::Write;
use std::time::Duration;

use anyhow::Result;
use serde_json::Value;
use vmm::client::Client;

/// One long poll of `vm.events` lasts at most this long.
const EVENTS_POLL_S: u64 = 30;

/// Prints events from `since` (or `now`), following with long polls
/// unless `once`.
pub fn follow(client: &Client, since: Option<u64>, now: bool, once: bool) -> Result<()> {
    let mut from = match (since, now) {
        (Some(n), _) => n.to_string(),
        (None, true) => "now".to_string(),
        (None, false) => "1".to_string(),
    };
    let wait = if once { 1 } else { EVENTS_POLL_S };
    let mut out = std::io::stdout();
    loop {
        let target = format!("/api/v1/vm.events?since={from}&wait_s={wait}");
        let r = vmm::client::request_target(
            &client.socket,
            "GET",
            &target,
            None,
            Duration::from_secs(wait + 10),
        )?
        .checked()?;
        for line in r.body.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "{line}")?;
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            if let Some(seq) = v.get("seq").and_then(Value::as_u64) {
                from = (seq + 1).to_string();
            }
        }
        out.flush()?;
        if once {
            return Ok(());
        }
    }
}
