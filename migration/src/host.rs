//! What a migration knows about its host: the other migrations running on
//! it (to share the host's migration bandwidth, oVirt's rule) and the link
//! it leaves through (to choose `connections: "auto"`).
//!
//! The arithmetic lives here; the host itself (a registry of running
//! migrations, interface speeds) is the VMM's, reached through [`Host`].
//!
//! * **Share**: each migration gets `host_max / max(migrations out of the
//!   source host, migrations into the destination host)`, never less than
//!   [`SHARE_FLOOR_MIB_S`] (nor more than `host_max`); the operator's cap
//!   (`max_bandwidth_mib_s`) still applies on top, whichever is lower. The
//!   source recomputes it every [`SHARE_INTERVAL`]; the destination reports
//!   its count as often in `HOST_LOAD` frames.
//! * **Auto connections**: `min(link speed / 10 Gbit/s, vCPUs)`, at most
//!   [`AUTO_MAX_CONNECTIONS`]; 1 where that is below
//!   [`AUTO_MIN_CONNECTIONS`].

use std::fmt::Debug;
use std::net::IpAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Smallest share of the host's bandwidth a migration gets, MiB/s.
pub const SHARE_FLOOR_MIB_S: f64 = 8.0;
/// How often the source recomputes its share and the destination reports
/// its count of migrations.
pub const SHARE_INTERVAL: Duration = Duration::from_millis(500);
/// Bound of a migration count on the wire (`HOST_LOAD`).
pub const MAX_HOST_MIGRATIONS: u64 = 65_536;
/// Link bandwidth per data connection of `connections: "auto"`, Mbit/s.
pub const AUTO_MBIT_PER_CONNECTION: u64 = 10_000;
/// Fewest connections `auto` chooses when it uses more than one.
pub const AUTO_MIN_CONNECTIONS: u32 = 2;
/// Most connections `auto` chooses.
pub const AUTO_MAX_CONNECTIONS: u32 = 16;

const MIB: f64 = 1024.0 * 1024.0;

/// Which way a migration goes, as the host's registry counts it: the share
/// divides by the outgoing migrations of the source host and the incoming
/// ones of the destination host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// This host sends a VM.
    Outgoing,
    /// This host receives a VM.
    Incoming,
}

/// A registered running migration; it counts until dropped.
pub trait HostSlot: Send + Sync {
    /// Migrations of this slot's direction running on the host now, this
    /// one included (so at least 1).
    fn count(&self) -> Result<u32, String>;
}

/// The speed of the interface a destination is reached through.
///
/// Invariant: `mbit_s` is `Ok` only with a positive speed the host reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSpeed {
    /// The outgoing interface, if the route lookup found it.
    pub interface: Option<String>,
    /// Its speed in Mbit/s, or why it is not known (e.g. veth and lo
    /// report none).
    pub mbit_s: Result<u64, String>,
}

/// The host resources a migration uses, implemented by the VMM.
pub trait Host: Send + Sync + Debug {
    /// Registers a running migration of direction `dir` on this host.
    fn register(&self, dir: Direction) -> Result<Box<dyn HostSlot>, String>;
    /// The outgoing interface towards `dest` and its speed.
    fn link_speed(&self, dest: IpAddr) -> LinkSpeed;
}

/// How many migrations share each host now (`host_migrations` in the
/// status; a count not known yet is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HostMigrations {
    /// Outgoing migrations on the source host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<u32>,
    /// Incoming migrations on the destination host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<u32>,
}

/// The share of one migration in MiB/s under `host_max` MiB/s with `src`
/// outgoing migrations on the source host and `dst` incoming ones on the
/// destination host (counts of 0 count as 1): `host_max / max(src, dst)`,
/// at least `min(SHARE_FLOOR_MIB_S, host_max)`.
pub fn share_mib_s(host_max: f64, src: u32, dst: u32) -> f64 {
    let n = src.max(dst).max(1) as f64;
    (host_max / n).max(SHARE_FLOOR_MIB_S.min(host_max))
}

/// [`share_mib_s`] in bytes/s.
pub fn share_bytes_s(host_max: f64, src: u32, dst: u32) -> f64 {
    share_mib_s(host_max, src, dst) * MIB
}

/// The number of data connections `connections: "auto"` chooses for a link
/// of `link` and `vcpus` vCPUs, with the reason shown in the status.
///
/// `min(link Mbit/s / AUTO_MBIT_PER_CONNECTION, vCPUs)` (each bound only when
/// known; 1 when neither is), capped at [`AUTO_MAX_CONNECTIONS`], and 1 when
/// it comes out below [`AUTO_MIN_CONNECTIONS`].
pub fn auto_connections(link: &LinkSpeed, vcpus: Option<u32>) -> (u32, String) {
    let iface = link.interface.as_deref().unwrap_or("(unknown interface)");
    let (by_link, link_text) = match &link.mbit_s {
        Ok(m) => {
            let n = m / AUTO_MBIT_PER_CONNECTION;
            (
                Some(n.min(u32::MAX as u64) as u32),
                format!(
                    "link {iface} at {m} Mbit/s gives {n} (one per {} Gbit/s)",
                    AUTO_MBIT_PER_CONNECTION / 1000
                ),
            )
        }
        Err(why) => (
            None,
            format!("link speed of {iface} unknown ({why}), so not counted"),
        ),
    };
    let cpu_text = match vcpus {
        Some(v) => format!("{v} vCPU(s)"),
        None => "vCPU count unknown".to_string(),
    };
    let raw = match (by_link, vcpus) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let (n, rule) = match raw {
        None => (1, "nothing known: 1".to_string()),
        Some(r) if r < AUTO_MIN_CONNECTIONS => (1, format!("min {r} < {AUTO_MIN_CONNECTIONS}: 1")),
        Some(r) if r > AUTO_MAX_CONNECTIONS => (
            AUTO_MAX_CONNECTIONS,
            format!("min {r} capped at {AUTO_MAX_CONNECTIONS}"),
        ),
        Some(r) => (r, format!("min {r}")),
    };
    (n, format!("auto: {link_text}; {cpu_text}; {rule}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_divides_by_the_busier_host_with_a_floor() {
        assert_eq!(share_mib_s(64.0, 1, 1), 64.0);
        assert_eq!(share_mib_s(64.0, 2, 2), 32.0);
        assert_eq!(share_mib_s(64.0, 1, 4), 16.0);
        assert_eq!(share_mib_s(64.0, 4, 1), 16.0);
        assert_eq!(share_mib_s(64.0, 0, 0), 64.0, "unknown counts count as 1");
        assert_eq!(share_mib_s(64.0, 16, 1), SHARE_FLOOR_MIB_S, "floor");
        assert_eq!(share_mib_s(64.0, 1000, 3), SHARE_FLOOR_MIB_S);
        assert_eq!(
            share_mib_s(4.0, 3, 1),
            4.0,
            "the floor never exceeds host_max"
        );
        assert_eq!(share_bytes_s(1.0, 1, 1), MIB);
    }

    fn link(m: Result<u64, &str>) -> LinkSpeed {
        LinkSpeed {
            interface: Some("eth0".into()),
            mbit_s: m.map_err(str::to_string),
        }
    }

    #[test]
    fn auto_connections_follow_the_rule() {
        let n = |m, v| auto_connections(&link(m), v).0;
        assert_eq!(n(Ok(1_000), Some(8)), 1, "1 Gbit/s: 0 < 2");
        assert_eq!(n(Ok(10_000), Some(8)), 1, "10 Gbit/s: 1 < 2");
        assert_eq!(n(Ok(25_000), Some(8)), 2);
        assert_eq!(n(Ok(100_000), Some(8)), 8, "vCPUs bound");
        assert_eq!(n(Ok(100_000), Some(32)), 10, "link bound");
        assert_eq!(n(Ok(400_000), Some(64)), 16, "capped");
        assert_eq!(n(Ok(100_000), Some(1)), 1, "one vCPU");
        assert_eq!(n(Err("no speed"), Some(4)), 4, "link unknown: vCPUs");
        assert_eq!(n(Err("no speed"), Some(40)), 16);
        assert_eq!(n(Err("no speed"), None), 1, "nothing known");
        assert_eq!(n(Ok(40_000), None), 4, "vCPUs unknown: link");
        assert_eq!(n(Ok(u64::MAX), Some(u32::MAX)), 16);
        let (_, why) = auto_connections(&link(Ok(1_000)), Some(2));
        assert!(why.contains("eth0") && why.contains("1000 Mbit/s"), "{why}");
        assert!(why.contains("2 vCPU") && why.ends_with(": 1"), "{why}");
        let (_, why) = auto_connections(&link(Err("veth reports no speed")), Some(2));
        assert!(why.contains("unknown (veth reports no speed)"), "{why}");
    }
}
