//! Migration parameters that can change while a migration runs
//! (`PUT vm.migration-set-parameters`), the policies that use them, and the
//! shared object through which the sender reads them.
//!
//! One [`LiveParams`] lives as long as the VMM. Between migrations it holds
//! the defaults for the next one; `send` overlays the fields its request
//! names ([`MigrationParameters::overlay`]) and from then on the running
//! sender reads the current values at each decision, so a change takes
//! effect at the next pass boundary (the bandwidth cap at once).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::api::{Limit, Range};
use crate::error::MigrationError;
use crate::net::lock;

/// How the migration moves memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Technique {
    /// Pre-copy: iterate while the guest runs, stop, copy the rest.
    #[default]
    PreCopy,
    /// Post-copy: start the guest on the destination now and pull the
    /// missing pages. Setting it while a migration runs switches at once.
    PostCopy,
}

/// Convergence policies, named after oVirt's migration policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Pre-copy with a fixed downtime; a stall is reported, nothing else
    /// changes.
    Legacy,
    /// Pre-copy; each stall of `stall_limit_s` raises the allowed downtime
    /// by one step of the schedule.
    #[default]
    MinimalDowntime,
    /// The downtime schedule, then auto-converge once it is exhausted.
    SuspendWorkloadIfNeeded,
    /// Pre-copy until the first stall, then post-copy.
    PostCopy,
}

/// Why the source switched over (`switchover_reason` in the status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchoverReason {
    /// The remaining state fits in the allowed downtime.
    Converged,
    /// The policy's schedule allowed the downtime the migration needed.
    ForcedByPolicy,
    /// Post-copy started (by the policy or by `technique`).
    PostCopy,
    /// The operator asked for it (`technique: "post-copy"` while running).
    User,
}

/// The effective parameters (`parameters` in `GET vm.migration`).
///
/// Invariant: every field is within its [`PARAM_LIMITS`] entry, and
/// `throttle_initial_percent <= throttle_max_percent`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParameters {
    /// The convergence policy.
    pub policy: Policy,
    /// The allowed downtime in ms (the first step of the schedule).
    pub downtime_ms: u64,
    /// Bandwidth cap in MiB/s shared by all connections; `None`: no cap.
    pub max_bandwidth_mib_s: Option<f64>,
    /// Whether the vCPUs are throttled when the migration stalls
    /// (independent of the policy, which may also turn it on).
    pub auto_converge: bool,
    /// First throttle, in percent of vCPU time taken away.
    pub throttle_initial_percent: u32,
    /// Added at each further stall.
    pub throttle_increment_percent: u32,
    /// Highest throttle.
    pub throttle_max_percent: u32,
    /// Seconds without progress that count as a stall.
    pub stall_limit_s: u64,
    /// Seconds without progress after which the migration is cancelled
    /// (the source runs on); `None`: never.
    pub progress_timeout_s: Option<u64>,
    /// Pre-copy, or post-copy (switch now when set while running).
    pub technique: Technique,
}

impl Default for MigrationParameters {
    fn default() -> Self {
        MigrationParameters {
            policy: Policy::default(),
            downtime_ms: 300,
            max_bandwidth_mib_s: None,
            auto_converge: false,
            throttle_initial_percent: 20,
            throttle_increment_percent: 10,
            throttle_max_percent: 99,
            stall_limit_s: 5,
            progress_timeout_s: None,
            technique: Technique::PreCopy,
        }
    }
}

/// A change of parameters: the body of `PUT vm.migration-set-parameters`
/// and the parameter fields of a send request. `None` leaves a field as it
/// is; `max_bandwidth_mib_s: 0` and `progress_timeout_s: 0` remove the cap
/// and the timeout.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParametersUpdate {
    /// See [`MigrationParameters::policy`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// See [`MigrationParameters::downtime_ms`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// See [`MigrationParameters::max_bandwidth_mib_s`] (0: no cap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_mib_s: Option<f64>,
    /// See [`MigrationParameters::auto_converge`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge: Option<bool>,
    /// See [`MigrationParameters::throttle_initial_percent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_initial_percent: Option<u32>,
    /// See [`MigrationParameters::throttle_increment_percent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_increment_percent: Option<u32>,
    /// See [`MigrationParameters::throttle_max_percent`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_max_percent: Option<u32>,
    /// See [`MigrationParameters::stall_limit_s`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall_limit_s: Option<u64>,
    /// See [`MigrationParameters::progress_timeout_s`] (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_timeout_s: Option<u64>,
    /// See [`MigrationParameters::technique`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub technique: Option<Technique>,
}

/// `downtime_ms`: at most one hour.
pub const LIMIT_DOWNTIME_MS: Limit = Limit {
    field: "downtime_ms",
    range: Range::Int(0, 3_600_000),
};
/// `max_bandwidth_mib_s`: 0 (no cap), or 0.1 (a packet then takes seconds)
/// up to 1 TiB/s (more than any link).
pub const LIMIT_MAX_BANDWIDTH_MIB_S: Limit = Limit {
    field: "max_bandwidth_mib_s",
    range: Range::Float(0.1, 1_048_576.0),
};
/// `throttle_initial_percent`.
pub const LIMIT_THROTTLE_INITIAL: Limit = Limit {
    field: "throttle_initial_percent",
    range: Range::Int(1, 99),
};
/// `throttle_increment_percent`.
pub const LIMIT_THROTTLE_INCREMENT: Limit = Limit {
    field: "throttle_increment_percent",
    range: Range::Int(1, 99),
};
/// `throttle_max_percent`.
pub const LIMIT_THROTTLE_MAX: Limit = Limit {
    field: "throttle_max_percent",
    range: Range::Int(1, 99),
};
/// `stall_limit_s`: one second to one day.
pub const LIMIT_STALL_LIMIT_S: Limit = Limit {
    field: "stall_limit_s",
    range: Range::Int(1, 86_400),
};
/// `progress_timeout_s`: 0 (none), or one second to one week.
pub const LIMIT_PROGRESS_TIMEOUT_S: Limit = Limit {
    field: "progress_timeout_s",
    range: Range::Int(1, crate::api::MAX_TIMEOUT_S),
};

/// The numeric fields of [`ParametersUpdate`] (0 is also accepted for
/// `max_bandwidth_mib_s` and `progress_timeout_s`).
pub const PARAM_LIMITS: &[Limit] = &[
    LIMIT_DOWNTIME_MS,
    LIMIT_MAX_BANDWIDTH_MIB_S,
    LIMIT_THROTTLE_INITIAL,
    LIMIT_THROTTLE_INCREMENT,
    LIMIT_THROTTLE_MAX,
    LIMIT_STALL_LIMIT_S,
    LIMIT_PROGRESS_TIMEOUT_S,
];

impl ParametersUpdate {
    /// Whether the update changes nothing.
    pub fn is_empty(&self) -> bool {
        *self == ParametersUpdate::default()
    }

    /// Checks every given field; the error names the field and its range.
    pub fn validate(&self) -> Result<(), MigrationError> {
        if let Some(v) = self.downtime_ms {
            LIMIT_DOWNTIME_MS.check_int(v)?;
        }
        if let Some(v) = self.max_bandwidth_mib_s {
            if v != 0.0 {
                LIMIT_MAX_BANDWIDTH_MIB_S.check_float(v)?;
            }
        }
        for (l, v) in [
            (LIMIT_THROTTLE_INITIAL, self.throttle_initial_percent),
            (LIMIT_THROTTLE_INCREMENT, self.throttle_increment_percent),
            (LIMIT_THROTTLE_MAX, self.throttle_max_percent),
        ] {
            if let Some(v) = v {
                l.check_int(v as u64)?;
            }
        }
        if let Some(v) = self.stall_limit_s {
            LIMIT_STALL_LIMIT_S.check_int(v)?;
        }
        if let Some(v) = self.progress_timeout_s {
            if v != 0 {
                LIMIT_PROGRESS_TIMEOUT_S.check_int(v)?;
            }
        }
        Ok(())
    }
}

impl MigrationParameters {
    /// These parameters with `u` applied; fails (changing nothing) when a
    /// field is out of range or the result breaks the invariant.
    pub fn overlay(&self, u: &ParametersUpdate) -> Result<MigrationParameters, MigrationError> {
        u.validate()?;
        let mut p = self.clone();
        if let Some(v) = u.policy {
            p.policy = v;
        }
        if let Some(v) = u.downtime_ms {
            p.downtime_ms = v;
        }
        if let Some(v) = u.max_bandwidth_mib_s {
            p.max_bandwidth_mib_s = (v != 0.0).then_some(v);
        }
        if let Some(v) = u.auto_converge {
            p.auto_converge = v;
        }
        if let Some(v) = u.throttle_initial_percent {
            p.throttle_initial_percent = v;
        }
        if let Some(v) = u.throttle_increment_percent {
            p.throttle_increment_percent = v;
        }
        if let Some(v) = u.throttle_max_percent {
            p.throttle_max_percent = v;
        }
        if let Some(v) = u.stall_limit_s {
            p.stall_limit_s = v;
        }
        if let Some(v) = u.progress_timeout_s {
            p.progress_timeout_s = (v != 0).then_some(v);
        }
        if let Some(v) = u.technique {
            p.technique = v;
        }
        if p.throttle_initial_percent > p.throttle_max_percent {
            return Err(MigrationError::InvalidParams(format!(
                "throttle_initial_percent ({}) must not exceed throttle_max_percent ({})",
                p.throttle_initial_percent, p.throttle_max_percent
            )));
        }
        Ok(p)
    }
}

/// The parameters shared by the API and a running sender.
///
/// Two sets: the defaults (changed only by `vm.migration-set-parameters`)
/// and the current values (what a running migration uses). A send starts
/// from the defaults with its request's own fields laid over them
/// ([`LiveParams::begin`]); those fields apply to that migration only. A
/// change through the API applies to both sets. When the send ends
/// ([`LiveParams::end`]) the current values fall back to the defaults, and
/// a technique of post-copy (a one-time switch) falls back to pre-copy.
///
/// Invariant: `generation` grows by one with every accepted change, so a
/// reader that remembers it sees every change; while no migration runs,
/// the current values equal the defaults.
#[derive(Debug, Default)]
pub struct LiveParams {
    sets: Mutex<Sets>,
    generation: AtomicU64,
    running: AtomicBool,
}

#[derive(Debug, Default)]
struct Sets {
    defaults: MigrationParameters,
    current: MigrationParameters,
}

impl LiveParams {
    /// Parameters starting from `p` (as defaults and current values).
    pub fn new(p: MigrationParameters) -> LiveParams {
        LiveParams {
            sets: Mutex::new(Sets {
                defaults: p.clone(),
                current: p,
            }),
            ..Default::default()
        }
    }

    /// The current values.
    pub fn get(&self) -> MigrationParameters {
        lock(&self.sets).current.clone()
    }

    /// The defaults of the next migration.
    pub fn defaults(&self) -> MigrationParameters {
        lock(&self.sets).defaults.clone()
    }

    /// Number of accepted changes so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Applies `u` to the defaults and the current values and returns the
    /// new current values; refuses an out-of-range update, leaving both as
    /// they were.
    pub fn update(&self, u: &ParametersUpdate) -> Result<MigrationParameters, MigrationError> {
        let mut g = lock(&self.sets);
        let d = g.defaults.overlay(u)?;
        let c = g.current.overlay(u)?;
        g.defaults = d;
        g.current = c.clone();
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(c)
    }

    /// Starts a migration: the current values become the defaults with
    /// `request` laid over them (the defaults stay). Refused, changing
    /// nothing, if `request` is out of range.
    pub fn begin(&self, request: &ParametersUpdate) -> Result<MigrationParameters, MigrationError> {
        let mut g = lock(&self.sets);
        let c = g.defaults.overlay(request)?;
        g.current = c.clone();
        self.running.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(c)
    }

    /// Ends a migration: the current values fall back to the defaults;
    /// post-copy, a one-time switch, falls back to pre-copy in both.
    pub fn end(&self) {
        let mut g = lock(&self.sets);
        g.defaults.technique = Technique::PreCopy;
        g.current = g.defaults.clone();
        self.running.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether a migration runs on these parameters now.
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_checks_and_applies() {
        let p = MigrationParameters::default();
        let q = p
            .overlay(&ParametersUpdate {
                downtime_ms: Some(50),
                max_bandwidth_mib_s: Some(100.0),
                technique: Some(Technique::PostCopy),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(q.downtime_ms, 50);
        assert_eq!(q.max_bandwidth_mib_s, Some(100.0));
        assert_eq!(q.technique, Technique::PostCopy);
        let r = q
            .overlay(&ParametersUpdate {
                max_bandwidth_mib_s: Some(0.0),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(r.max_bandwidth_mib_s, None);
        let e = p
            .overlay(&ParametersUpdate {
                throttle_max_percent: Some(100),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("throttle_max_percent"), "{e}");
        let e = p
            .overlay(&ParametersUpdate {
                throttle_initial_percent: Some(50),
                throttle_max_percent: Some(40),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("must not exceed"), "{e}");
    }

    #[test]
    fn names_on_the_wire() {
        let v: ParametersUpdate =
            serde_json_from(r#"{"policy":"suspend-workload-if-needed","technique":"post-copy"}"#);
        assert_eq!(v.policy, Some(Policy::SuspendWorkloadIfNeeded));
        assert_eq!(v.technique, Some(Technique::PostCopy));
    }

    fn serde_json_from(s: &str) -> ParametersUpdate {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn request_fields_apply_to_one_migration_only() {
        let l = LiveParams::default();
        l.update(&ParametersUpdate {
            downtime_ms: Some(100),
            ..Default::default()
        })
        .unwrap();
        let c = l
            .begin(&ParametersUpdate {
                max_bandwidth_mib_s: Some(4.0),
                technique: Some(Technique::PostCopy),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((c.downtime_ms, c.max_bandwidth_mib_s), (100, Some(4.0)));
        assert!(l.running());
        // A change while running reaches both sets.
        l.update(&ParametersUpdate {
            stall_limit_s: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(l.get().stall_limit_s, 2);
        assert_eq!(l.get().max_bandwidth_mib_s, Some(4.0));
        l.end();
        let d = l.get();
        assert!(!l.running());
        assert_eq!((d.downtime_ms, d.stall_limit_s), (100, 2));
        assert_eq!(
            d.max_bandwidth_mib_s, None,
            "the request's cap must not persist"
        );
        assert_eq!(d.technique, Technique::PreCopy);
        assert!(l
            .begin(&ParametersUpdate {
                throttle_max_percent: Some(100),
                ..Default::default()
            })
            .is_err());
        assert_eq!(l.get(), d);
    }
}
