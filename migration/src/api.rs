//! Entry points and the types the VMM's API exposes.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::error::MigrationError;
pub use crate::stats::{
    DeviceStatus, MigrationState, MigrationStats, MigrationStatus, SourceVmOutcome,
};
use crate::tls::{ClientTls, ServerTls};
use crate::traits::{DestinationFactory, DestinationVm, SourceVm};
use crate::wire::{MAX_CONNECTIONS, MAX_DEVICE_CHUNK};

/// Where device state travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStateMode {
    /// Multiplexed onto the shared data connections (default).
    #[default]
    Channels,
    /// Sequentially on the main connection during downtime (for comparison).
    Main,
}

/// Body of `PUT /api/v1/vm.send-migration`. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    /// `tcp:HOST:PORT`.
    pub destination_url: String,
    /// Data connections, 1..=64.
    #[serde(default = "default_connections")]
    pub connections: u32,
    /// Switch-over target in milliseconds (0: only when nothing is left, or
    /// forced after 30 passes).
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Optional throughput cap in MiB/s (> 0), shared by all connections.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<f64>,
    /// Give up after this many seconds (1..=[`MAX_TIMEOUT_S`]); the source
    /// then resumes.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Where device state travels.
    #[serde(default)]
    pub device_state: DeviceStateMode,
    /// Whether devices pre-copy while the VM runs.
    #[serde(default = "default_true")]
    pub device_precopy: bool,
    /// Device chunk size in bytes, 4096..=16 MiB.
    #[serde(default = "default_chunk")]
    pub device_chunk_bytes: u64,
    /// Directory with `ca.pem`, `cert.pem` and `key.pem` (see
    /// [`crate::tls`]): every connection runs mutual TLS 1.3.
    #[serde(default)]
    pub tls_dir: Option<String>,
    /// `false` (explicitly) for plain TCP without `tls_dir`; TLS is
    /// required otherwise.
    #[serde(default)]
    pub tls: Option<bool>,
}

/// Largest `timeout_s` accepted: one week. The deadline is an `Instant`,
/// which cannot hold an arbitrary number of seconds.
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

fn default_connections() -> u32 {
    4
}
fn default_downtime_ms() -> u64 {
    300
}
fn default_timeout_s() -> u64 {
    3600
}
fn default_true() -> bool {
    true
}
fn default_chunk() -> u64 {
    1 << 20
}

/// Body of `PUT /api/v1/vm.receive-migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveParams {
    /// `tcp:HOST:PORT` to listen on.
    pub receiver_url: String,
    /// Per-device reorder buffer bound in bytes (default 64 MiB, at least
    /// 16 MiB). A reader waits when a device's buffer is full, except for the
    /// chunk the device's load thread needs next.
    #[serde(default)]
    pub device_buffer_bytes: Option<u64>,
    /// Directory with `ca.pem`, `cert.pem` and `key.pem` (see
    /// [`crate::tls`]): only sources with a certificate from that CA are
    /// accepted.
    #[serde(default)]
    pub tls_dir: Option<String>,
    /// `false` (explicitly) for plain TCP without `tls_dir`; TLS is
    /// required otherwise.
    #[serde(default)]
    pub tls: Option<bool>,
    /// When not empty, a source certificate must name one of these (common
    /// name or DNS subject alternative name); at most
    /// [`crate::tls::MAX_ALLOWED_SUBJECTS`] entries.
    #[serde(default)]
    pub tls_allowed_subjects: Vec<String>,
}

/// Which transport a request chose: the TLS directory, or `None` for plain
/// TCP (only with an explicit `"tls": false`).
fn tls_choice(tls_dir: &Option<String>, tls: Option<bool>) -> Result<Option<&str>, MigrationError> {
    match (tls_dir.as_deref(), tls) {
        (Some(d), None | Some(true)) if !d.is_empty() => Ok(Some(d)),
        (Some(_), Some(false)) => Err(MigrationError::InvalidParams(
            "tls_dir is given but \"tls\" is false: choose one".into(),
        )),
        (None, Some(false)) => Ok(None),
        _ => Err(MigrationError::InvalidParams(
            "TLS is required: give tls_dir (a directory holding ca.pem, cert.pem and key.pem), \
             or \"tls\": false for plain TCP"
                .into(),
        )),
    }
}

/// Shared cancel flag; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// Asks the migration to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether cancel was asked.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl SendParams {
    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), MigrationError> {
        let bad = |m: String| Err(MigrationError::InvalidParams(m));
        crate::handshake::parse_url(&self.destination_url)?;
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return bad(format!(
                "connections must be 1..={MAX_CONNECTIONS}, got {}",
                self.connections
            ));
        }
        if self.downtime_ms > 3_600_000 {
            return bad(format!("downtime_ms {} is over one hour", self.downtime_ms));
        }
        if let Some(b) = self.max_bandwidth_mbps {
            if !b.is_finite() || b <= 0.0 {
                return bad(format!(
                    "max_bandwidth_mbps must be a positive number, got {b}"
                ));
            }
        }
        if self.timeout_s == 0 || self.timeout_s > MAX_TIMEOUT_S {
            return bad(format!(
                "timeout_s must be 1..={MAX_TIMEOUT_S} (one week), got {}",
                self.timeout_s
            ));
        }
        if self.device_chunk_bytes < 4096 || self.device_chunk_bytes > MAX_DEVICE_CHUNK {
            return bad(format!(
                "device_chunk_bytes must be 4096..={MAX_DEVICE_CHUNK}, got {}",
                self.device_chunk_bytes
            ));
        }
        self.client_tls()?;
        Ok(())
    }

    /// The TLS configuration this request asks for (`None`: plain TCP),
    /// loaded from `tls_dir`.
    pub fn client_tls(&self) -> Result<Option<ClientTls>, MigrationError> {
        tls_choice(&self.tls_dir, self.tls)?
            .map(ClientTls::load)
            .transpose()
    }
}

impl ReceiveParams {
    /// Checks every field; the error names the offending one.
    pub fn validate(&self) -> Result<(), MigrationError> {
        if let Some(b) = self.device_buffer_bytes {
            if b < MAX_DEVICE_CHUNK {
                return Err(MigrationError::InvalidParams(format!(
                    "device_buffer_bytes must be at least {MAX_DEVICE_CHUNK}, got {b}"
                )));
            }
        }
        self.server_tls()?;
        Ok(())
    }

    /// The TLS configuration this request asks for (`None`: plain TCP),
    /// loaded from `tls_dir` with the allowed subjects.
    pub fn server_tls(&self) -> Result<Option<ServerTls>, MigrationError> {
        let dir = tls_choice(&self.tls_dir, self.tls)?;
        if dir.is_none() && !self.tls_allowed_subjects.is_empty() {
            return Err(MigrationError::InvalidParams(
                "tls_allowed_subjects needs TLS (a tls_dir)".into(),
            ));
        }
        dir.map(|d| ServerTls::load(d, &self.tls_allowed_subjects))
            .transpose()
    }

    /// The listen address of `receiver_url` (`tcp:HOST:PORT`).
    pub fn listen_addr(&self) -> Result<std::net::SocketAddr, MigrationError> {
        crate::handshake::parse_url(&self.receiver_url)?
            .into_iter()
            .next()
            .ok_or_else(|| MigrationError::InvalidParams("receiver_url resolves to nothing".into()))
    }
}

/// Runs a migration on the source. On success the VM is paused for good and
/// the caller should exit. On error, two cases (see
/// `docs/migration-protocol.md`, "The switch-over commit"):
///
/// * any error except [`MigrationError::CommitUncertain`]: the failure came
///   before the switch-over was committed; the VM runs again (unless the
///   user had paused it), devices are RUNNING, `stats` shows
///   `source_vm = resumed`;
/// * [`MigrationError::CommitUncertain`]: COMMIT was written but RESUMED never
///   arrived, so the destination may run the guest. The VM was **left
///   paused** (devices STOP) and must be kept, not exited with success nor
///   resumed automatically; `stats` shows `source_vm = paused_uncertain`.
///
/// In every case dirty logging is off and every thread and socket is
/// closed. Cancel is honoured until the commit point and ignored after it.
/// `stats` shows progress meanwhile and the final state afterwards
/// (completed/failed/cancelled, set here).
pub fn send(
    vm: Arc<dyn SourceVm>,
    params: &SendParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
) -> Result<(), MigrationError> {
    if let Err(e) = params.validate() {
        stats.begin();
        stats.fail(&e);
        return Err(e);
    }
    crate::send::run(vm, params, stats, cancel)
}

/// Receives one migration on `listener`. On success the VM has been started
/// ([`DestinationVm::start`], only after the source's COMMIT) and is returned; on error it was discarded and
/// every thread and socket is closed, so the caller can receive again (on a
/// new or cloned listener). Strangers connecting meanwhile are refused with
/// an ERROR frame without disturbing the migration.
pub fn receive(
    listener: TcpListener,
    factory: &dyn DestinationFactory,
    params: &ReceiveParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    if let Err(e) = params.validate() {
        stats.begin();
        stats.fail(&e);
        return Err(e);
    }
    crate::recv::run(listener, factory, params, stats, cancel)
}
