//! Entry points and the types the VMM's API exposes.
//! (Stubs: the protocol implementation replaces the bodies.)

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::traits::{DestinationFactory, DestinationVm, SourceVm};

/// Errors of a migration. The display text is what the API reports.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Not implemented yet.
    #[error("migration is not implemented")]
    Unsupported,
    /// The parameters were refused before anything started.
    #[error("invalid migration parameters: {0}")]
    InvalidParams(String),
    /// The migration was cancelled.
    #[error("migration cancelled")]
    Cancelled,
}

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
    /// Switch-over target in milliseconds.
    #[serde(default = "default_downtime_ms")]
    pub downtime_ms: u64,
    /// Optional throughput cap in MiB/s.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<f64>,
    /// Give up after this many seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Where device state travels.
    #[serde(default)]
    pub device_state: DeviceStateMode,
    /// Whether devices pre-copy while the VM runs.
    #[serde(default = "default_true")]
    pub device_precopy: bool,
    /// Device chunk size in bytes.
    #[serde(default = "default_chunk")]
    pub device_chunk_bytes: u64,
}

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
    /// Per-device reorder buffer bound in bytes.
    #[serde(default)]
    pub device_buffer_bytes: Option<u64>,
}

/// Overall state of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Nothing has run yet.
    None,
    /// Running.
    Active,
    /// Finished; the guest runs on the destination.
    Completed,
    /// Failed; `error` says why.
    Failed,
    /// Cancelled by the user.
    Cancelled,
}

/// Snapshot returned by `GET /api/v1/vm.migration`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Overall state.
    pub state: MigrationState,
    /// Reason, when failed.
    pub error: Option<String>,
}

/// Live counters updated by the workers; read through [`MigrationStats::snapshot`].
#[derive(Debug, Default)]
pub struct MigrationStats {}

impl MigrationStats {
    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MigrationStatus {
        MigrationStatus {
            state: MigrationState::None,
            error: None,
        }
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

/// Runs a migration on the source. On success the VM is paused for good and
/// the caller should exit; on error the VM runs again (unless the user had
/// paused it), dirty logging is off, devices are RUNNING and every thread
/// and socket is closed.
pub fn send(
    _vm: Arc<dyn SourceVm>,
    _params: &SendParams,
    _stats: &Arc<MigrationStats>,
    _cancel: &CancelToken,
) -> Result<(), MigrationError> {
    Err(MigrationError::Unsupported)
}

/// Receives one migration on `listener`. On success the VM has been started
/// ([`DestinationVm::start`]) and is returned; on error it was discarded and
/// every thread and socket is closed, so the caller can receive again.
pub fn receive(
    _listener: TcpListener,
    _factory: &dyn DestinationFactory,
    _params: &ReceiveParams,
    _stats: &Arc<MigrationStats>,
    _cancel: &CancelToken,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    Err(MigrationError::Unsupported)
}
