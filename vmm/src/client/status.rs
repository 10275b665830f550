//! A lenient reader of `GET vm.migration` for clients that show progress
//! ([`Progress`]): it reads what [`migration::api::MigrationStatus`]
//! serializes, ignores fields it does not know and tolerates missing or
//! mistyped ones, so that one `ferry-remote` works with an older and with
//! a newer VMM.
//!
//! Field names: the current ones first (`throughput_bytes_per_s`,
//! `dirty_rate_bytes_per_s`), then the deprecated ones (`throughput_bps`,
//! `dirty_rate_bps`) when a server sends only those.

use migration::api::{MigrationState, SourceVmOutcome};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// A JSON number (integer or float) as `f64`; anything else as `None`.
fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Value::deserialize(d)?.as_f64().filter(|v| v.is_finite()))
}

/// A JSON string; anything else as `None`.
fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Value::deserialize(d)?.as_str().map(str::to_string))
}

/// The progress figures of one `GET vm.migration` answer.
///
/// Invariant: every figure is what the server sent under that name, or
/// `None` when it sent none (or not a number); numbers are finite.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Progress {
    /// `state`: `none`, `active`, `completed`, `failed`, `cancelled` (or a
    /// state a newer server added).
    #[serde(deserialize_with = "string")]
    pub state: Option<String>,
    /// `role`: `source` or `destination`.
    #[serde(deserialize_with = "string")]
    pub role: Option<String>,
    /// `error`: why it failed or was cancelled.
    #[serde(deserialize_with = "string")]
    pub error: Option<String>,
    /// `source_vm`: what became of the source VM.
    #[serde(deserialize_with = "string")]
    pub source_vm: Option<String>,
    /// `postcopy`: `active`, `paused`, `completed`; absent without it.
    #[serde(deserialize_with = "string")]
    pub postcopy: Option<String>,
    /// `iteration`: the RAM pass, from 1.
    #[serde(deserialize_with = "number")]
    pub iteration: Option<f64>,
    /// `elapsed_ms`: time since the migration began.
    #[serde(deserialize_with = "number")]
    pub elapsed_ms: Option<f64>,
    /// `total_bytes`: guest RAM.
    #[serde(deserialize_with = "number")]
    pub total_bytes: Option<f64>,
    /// `transferred_bytes`: RAM bytes on the wire so far.
    #[serde(deserialize_with = "number")]
    pub transferred_bytes: Option<f64>,
    /// `remaining_bytes`: RAM bytes still to send (source).
    #[serde(deserialize_with = "number")]
    pub remaining_bytes: Option<f64>,
    /// `throughput_bytes_per_s`.
    #[serde(deserialize_with = "number")]
    pub throughput_bytes_per_s: Option<f64>,
    /// `throughput_bps`: deprecated name of `throughput_bytes_per_s`.
    #[serde(deserialize_with = "number")]
    pub throughput_bps: Option<f64>,
    /// `dirty_rate_bytes_per_s`.
    #[serde(deserialize_with = "number")]
    pub dirty_rate_bytes_per_s: Option<f64>,
    /// `dirty_rate_bps`: deprecated name of `dirty_rate_bytes_per_s`.
    #[serde(deserialize_with = "number")]
    pub dirty_rate_bps: Option<f64>,
    /// `throughput_mbit_s`.
    #[serde(deserialize_with = "number")]
    pub throughput_mbit_s: Option<f64>,
    /// `pages_per_s`.
    #[serde(deserialize_with = "number")]
    pub pages_per_s: Option<f64>,
    /// `cpu_throttle_percent`.
    #[serde(deserialize_with = "number")]
    pub cpu_throttle_percent: Option<f64>,
}

/// `v` as a whole number (negative and missing figures read 0).
fn whole(v: Option<f64>) -> u64 {
    v.map(|v| v.max(0.0).round() as u64).unwrap_or(0)
}

impl Progress {
    /// Parses an answer; only a body that is not a JSON object (or array)
    /// fails.
    pub fn parse(body: &str) -> Result<Progress, serde_json::Error> {
        serde_json::from_str(body)
    }

    /// The state as the crate's type, `None` for a state this client does
    /// not know (or none sent).
    pub fn state(&self) -> Option<MigrationState> {
        let s = self.state.as_deref()?;
        serde_json::from_value(Value::String(s.to_string())).ok()
    }

    /// The state's name (`?` when none was sent).
    pub fn state_name(&self) -> &str {
        self.state.as_deref().unwrap_or("?")
    }

    /// Whether the migration ended (completed, failed or cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(
            self.state(),
            Some(MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled)
        )
    }

    /// Whether a migration runs now.
    pub fn is_active(&self) -> bool {
        self.state() == Some(MigrationState::Active)
    }

    /// `source_vm` as the crate's type.
    pub fn source_vm(&self) -> Option<SourceVmOutcome> {
        let s = self.source_vm.as_deref()?;
        serde_json::from_value(Value::String(s.to_string())).ok()
    }

    /// Whether this is the destination's status.
    pub fn is_destination(&self) -> bool {
        self.role.as_deref() == Some("destination")
    }

    /// The pass (0 before the first).
    pub fn pass(&self) -> u64 {
        whole(self.iteration)
    }

    /// Guest RAM in bytes (0 when unknown).
    pub fn total(&self) -> u64 {
        whole(self.total_bytes)
    }

    /// RAM bytes moved so far.
    pub fn transferred(&self) -> u64 {
        whole(self.transferred_bytes)
    }

    /// RAM bytes still to send, when known: not on the destination (it
    /// does not know), and not while a running migration says 0 (an older
    /// server does during its first pass, before the pass's size is set),
    /// so that nothing shows "100 %" or "0 MiB left" before it is true.
    pub fn remaining(&self) -> Option<u64> {
        if self.is_destination() {
            return None;
        }
        let r = whole(self.remaining_bytes);
        (self.remaining_bytes.is_some() && (r > 0 || self.is_finished())).then_some(r)
    }

    /// Throughput in bytes/s (the current name, else the deprecated one).
    pub fn throughput(&self) -> u64 {
        whole(self.throughput_bytes_per_s.or(self.throughput_bps))
    }

    /// Dirty rate in bytes/s (the current name, else the deprecated one).
    pub fn dirty_rate(&self) -> u64 {
        whole(self.dirty_rate_bytes_per_s.or(self.dirty_rate_bps))
    }

    /// Throughput in Mbit/s (sent by newer servers; computed otherwise).
    pub fn mbit_s(&self) -> f64 {
        self.throughput_mbit_s
            .unwrap_or(self.throughput() as f64 * 8.0 / 1e6)
    }

    /// The vCPU throttle in percent.
    pub fn throttle(&self) -> u64 {
        whole(self.cpu_throttle_percent)
    }

    /// Seconds until `remaining` is sent at the current throughput, when
    /// both are known and the migration runs.
    pub fn eta_s(&self) -> Option<u64> {
        if self.is_finished() {
            return None;
        }
        let r = self.remaining()?;
        let t = self.throughput();
        (t > 0).then(|| r.div_ceil(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::api::MigrationStatus;

    #[test]
    fn reads_the_crates_own_status() {
        let s = MigrationStatus {
            state: MigrationState::Active,
            role: Some("source".into()),
            iteration: 3,
            total_bytes: 512 << 20,
            transferred_bytes: 100 << 20,
            remaining_bytes: 40 << 20,
            cpu_throttle_percent: 30,
            ..Default::default()
        };
        // The rates go in under whichever name the crate serializes them
        // (the current one, or the deprecated one, or both).
        let mut v = serde_json::to_value(&s).unwrap();
        for (new, old, rate) in [
            ("throughput_bytes_per_s", "throughput_bps", 20u64 << 20),
            ("dirty_rate_bytes_per_s", "dirty_rate_bps", 5 << 20),
        ] {
            let named = [new, old]
                .into_iter()
                .filter(|k| v.get(k).is_some())
                .count();
            assert!(named > 0, "the status has neither {new} nor {old}: {v}");
            for k in [new, old] {
                if v.get(k).is_some() {
                    v[k] = rate.into();
                }
            }
        }
        let p = Progress::parse(&v.to_string()).unwrap();
        assert_eq!(p.state(), Some(MigrationState::Active));
        assert!(p.is_active() && !p.is_finished());
        assert_eq!(p.pass(), 3);
        assert_eq!(p.total(), 512 << 20);
        assert_eq!(p.transferred(), 100 << 20);
        assert_eq!(p.remaining(), Some(40 << 20));
        assert_eq!(p.throughput(), 20 << 20);
        assert_eq!(p.dirty_rate(), 5 << 20);
        assert_eq!(p.throttle(), 30);
        assert_eq!(p.eta_s(), Some(2));
        let p =
            Progress::parse(&serde_json::to_string(&MigrationStatus::default()).unwrap()).unwrap();
        assert_eq!(p.state(), Some(MigrationState::None));
    }

    #[test]
    fn new_names_first_unknown_fields_ignored() {
        let p = Progress::parse(
            r#"{"state":"active","throughput_bytes_per_s":2000,"throughput_bps":1,
                "dirty_rate_bytes_per_s":3.5,"dirty_rate_bps":1,"throughput_mbit_s":0.016,
                "remaining_bytes":10,"something_new":{"a":[1]},"iteration":"x"}"#,
        )
        .unwrap();
        assert_eq!(p.throughput(), 2000);
        assert_eq!(p.dirty_rate(), 4);
        assert_eq!(p.mbit_s(), 0.016);
        assert_eq!(p.pass(), 0, "a mistyped figure reads as missing");
        // A state this client does not know is neither active nor finished.
        let p = Progress::parse(r#"{"state":"device-copy"}"#).unwrap();
        assert_eq!(p.state(), None);
        assert_eq!(p.state_name(), "device-copy");
        assert!(!p.is_finished() && !p.is_active());
        assert!(Progress::parse("3").is_err());
    }

    #[test]
    fn remaining_is_unknown_while_a_running_migration_says_0() {
        let p = Progress::parse(r#"{"state":"active","remaining_bytes":0}"#).unwrap();
        assert_eq!(p.remaining(), None);
        assert_eq!(p.eta_s(), None);
        let p = Progress::parse(r#"{"state":"completed","remaining_bytes":0}"#).unwrap();
        assert_eq!(p.remaining(), Some(0));
        let p = Progress::parse(r#"{"state":"active","role":"destination","remaining_bytes":5}"#)
            .unwrap();
        assert_eq!(p.remaining(), None);
        let p = Progress::parse(r#"{"state":"active"}"#).unwrap();
        assert_eq!(p.remaining(), None);
    }
}
