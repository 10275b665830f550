//! The serde types of `GET /api/v1/vm.migration`: [`MigrationStatus`] and
//! its parts.

use serde::{Deserialize, Serialize};

use crate::host::HostMigrations;
use crate::live::{MigrationParameters, SwitchoverReason};

/// Overall state of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MigrationState {
    /// Nothing has run yet.
    #[default]
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

impl MigrationState {
    pub(crate) fn from_u8(v: u8) -> Self {
        match v {
            1 => MigrationState::Active,
            2 => MigrationState::Completed,
            3 => MigrationState::Failed,
            4 => MigrationState::Cancelled,
            _ => MigrationState::None,
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            MigrationState::None => 0,
            MigrationState::Active => 1,
            MigrationState::Completed => 2,
            MigrationState::Failed => 3,
            MigrationState::Cancelled => 4,
        }
    }
}

/// What became of the source VM when a send ended (`source_vm` in a
/// [`MigrationStatus`]; absent while running and on the destination).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceVmOutcome {
    /// The migration failed or was cancelled before the commit point; the VM
    /// runs again here (or stays paused if the user had paused it).
    Resumed,
    /// The migration completed; the VM stays paused for good and runs on the
    /// destination.
    Migrated,
    /// The switch-over was committed but not confirmed
    /// ([`crate::MigrationError::CommitUncertain`]): the VM was left paused
    /// here so that it never runs twice; resume it only by hand.
    PausedUncertain,
    /// Post-copy was interrupted ([`crate::MigrationError::PostcopyPaused`]):
    /// the guest runs on the destination; this VM stays paused for good and
    /// keeps the pages the destination still lacks until a send with
    /// `"resume": true` delivers them.
    PostcopyPaused,
}

impl SourceVmOutcome {
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(SourceVmOutcome::Resumed),
            2 => Some(SourceVmOutcome::Migrated),
            3 => Some(SourceVmOutcome::PausedUncertain),
            4 => Some(SourceVmOutcome::PostcopyPaused),
            _ => None,
        }
    }
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            SourceVmOutcome::Resumed => 1,
            SourceVmOutcome::Migrated => 2,
            SourceVmOutcome::PausedUncertain => 3,
            SourceVmOutcome::PostcopyPaused => 4,
        }
    }
}

/// Per-device progress in a [`MigrationStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeviceStatus {
    /// Device id.
    pub id: String,
    /// Device state bytes moved so far (sent on the source, loaded on the
    /// destination).
    pub bytes_transferred: u64,
    /// Estimated bytes still to move (source only).
    pub bytes_remaining: u64,
    /// Destination load rate in bytes/s, once measured (0 = unknown);
    /// the source learns it from the destination's RATE reports.
    #[serde(default)]
    pub load_rate_bytes_per_s: u64,
    /// Deprecated (to be removed after one release): the same value as
    /// `load_rate_bytes_per_s`, under its old name.
    pub load_rate_bps: u64,
    /// Whether the initial pre-copy data was loaded (switch-over ack).
    pub initial_loaded: bool,
}

/// Snapshot returned by `GET /api/v1/vm.migration` (both sides).
/// Byte counters are bytes; rates are bytes per second.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct MigrationStatus {
    /// Overall state.
    pub state: MigrationState,
    /// Reason, when failed or cancelled.
    pub error: Option<String>,
    /// Source only, once the send ended: what became of the source VM.
    /// `paused_uncertain` means the VM is paused and must not be resumed
    /// automatically (see [`SourceVmOutcome::PausedUncertain`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_vm: Option<SourceVmOutcome>,
    /// "source" or "destination" (None before anything started).
    pub role: Option<String>,
    /// How the connections are carried: "tls" (mutual TLS 1.3), "tcp"
    /// (plain, only with an explicit `"tls": false`) or "unix" (a
    /// `unix:PATH` destination on the same host); None before the
    /// parameters were accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// `unix:` with shareable RAM: the memory file descriptors were handed
    /// over and no page was copied (absent when false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_handover: bool,
    /// Current (or last) RAM pass, starting at 1.
    pub iteration: u64,
    /// Data connections.
    pub connections: u32,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// RAM bytes on the wire so far (headers, range tables and page data).
    pub transferred_bytes: u64,
    /// Source, live: RAM bytes still to send in the current pass (its pages
    /// not yet handed to the wire, the queued backlog included) plus the
    /// pages known dirty since (fetched from the dirty log and not queued
    /// yet). Pass 1 starts at the populated RAM size. In post-copy: the
    /// pages the destination still lacks. 0 once completed. Destination:
    /// always 0 (n/a).
    pub remaining_bytes: u64,
    /// Pages sent (or received) as zero markers instead of data.
    pub zero_pages: u64,
    /// Pages sent (or received) with their data (non-zero pages), pre-copy
    /// and post-copy.
    #[serde(default)]
    pub normal_pages: u64,
    /// The guest page size these counters use (4096).
    #[serde(default)]
    pub page_size_bytes: u64,
    /// Live RAM throughput on the wire (both sides: bytes sent or received
    /// over the last ~0.5 s, sampled at least every 250 ms while active).
    /// Once ended: the average over the transfer (total time minus setup).
    #[serde(default)]
    pub throughput_bytes_per_s: u64,
    /// `throughput_bytes_per_s` in Mbit/s (10^6 bits per second).
    #[serde(default)]
    pub throughput_mbit_s: f64,
    /// Deprecated (to be removed after one release): the same value as
    /// `throughput_bytes_per_s`, under its old name.
    pub throughput_bps: u64,
    /// Pages (data and zero) sent or received per second, live like
    /// `throughput_bytes_per_s` (once ended: the average).
    #[serde(default)]
    pub pages_per_s: u64,
    /// Source only: the rate at which the guest dirties RAM, measured at
    /// each dirty-log fetch (pages newly found dirty over the time since the
    /// previous fetch, moving average). The sender fetches at each pass end
    /// and peeks at the log about once a second during a pass, pass 1
    /// included; 0 until the first fetch. Destination: 0 (n/a).
    #[serde(default)]
    pub dirty_rate_bytes_per_s: u64,
    /// Deprecated (to be removed after one release): the same value as
    /// `dirty_rate_bytes_per_s`, under its old name.
    pub dirty_rate_bps: u64,
    /// Source only: dirty-log fetches so far (pass ends and peeks). 0 on the
    /// destination (n/a).
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Source only: pages the devices reported written by DMA so far
    /// (summed over devices; merged into the dirty set). 0 on the
    /// destination (n/a).
    #[serde(default)]
    pub dma_dirty_pages: u64,
    /// Source only: RAM bytes on the wire while the guest ran on the source
    /// (every pass before the switch-over). 0 on the destination (n/a).
    #[serde(default)]
    pub precopy_bytes: u64,
    /// Source only: RAM and device state bytes moved while the VM was
    /// paused for the stop-copy (the final pass, the devices' stop-copy
    /// data and the VM state); post-copy bytes after the switch are in
    /// `postcopy_bytes` instead. 0 on the destination (n/a).
    #[serde(default)]
    pub downtime_bytes: u64,
    /// The other side's `IP:PORT` of the main connection (the destination
    /// on the source, the source on the destination); absent before it
    /// connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_address: Option<String>,
    /// Downtime predicted by the convergence policy (source only; 0 = n/a on
    /// the destination).
    pub expected_downtime_ms: u64,
    /// Device state bytes moved so far, all devices.
    pub device_bytes_transferred: u64,
    /// Estimated device state bytes still to move, all devices.
    pub device_bytes_remaining: u64,
    /// Per-device progress, in device order.
    pub devices: Vec<DeviceStatus>,
    /// Time since the migration began.
    pub elapsed_ms: u64,
    /// From connect to the first RAM byte, once known.
    pub setup_time_ms: Option<u64>,
    /// Whole migration, on completion.
    pub total_time_ms: Option<u64>,
    /// The same in µs (`total_time_ms` is this truncated to whole ms).
    pub total_time_us: Option<u64>,
    /// Actual downtime: source pause → destination resume (wall clock).
    pub downtime_ms: Option<u64>,
    /// Source-measured pause → "resumed" reply (source only).
    pub pause_to_ack_ms: Option<u64>,
    /// Source pause time, µs since the Unix epoch.
    pub pause_time_us: Option<u64>,
    /// Destination resume time, µs since the Unix epoch.
    pub resume_time_us: Option<u64>,
    /// Source only: the parameters in force (changed live by
    /// `vm.migration-set-parameters`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<MigrationParameters>,
    /// Source only: the downtime the policy allows now, in ms (grows with
    /// the `minimal-downtime` schedule).
    #[serde(default)]
    pub allowed_downtime_ms: u64,
    /// Source only: percent of vCPU time taken away by auto-converge now
    /// (0 once the migration ended, however it ended).
    #[serde(default)]
    pub cpu_throttle_percent: u64,
    /// Source only: stalls seen (each `stall_limit_s` without progress).
    #[serde(default)]
    pub stalls: u64,
    /// Why the source switched over, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_reason: Option<SwitchoverReason>,
    /// Source only: how `connections` was chosen (`requested`, or the
    /// `auto` rule with the link speed and vCPUs it saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_reason: Option<String>,
    /// Source only, with a host budget (`--host-migration-bandwidth-mib-s`):
    /// this migration's share of it now, in MiB/s (the operator's
    /// `max_bandwidth_mib_s` still applies when lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_share_mib_s: Option<f64>,
    /// Migrations running now on the source host (outgoing) and on the
    /// destination host (incoming), as far as this side knows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_migrations: Option<HostMigrations>,
    /// Post-copy: `active` (the guest runs on the destination and pulls its
    /// missing pages), `paused` (a connection was lost: faulting vCPUs wait,
    /// the source keeps its copy until a resume), `completed`; absent
    /// without post-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<String>,
    /// Post-copy page requests: sent for faulting vCPUs (destination),
    /// served (source).
    #[serde(default)]
    pub postcopy_requests: u64,
    /// Post-copy RAM bytes on the wire after the switch (requested pages and
    /// the background push), headers and range tables included.
    #[serde(default)]
    pub postcopy_bytes: u64,
    /// Pages missing when post-copy started.
    #[serde(default)]
    pub postcopy_missing_pages: u64,
    /// Median time a vCPU waited for a missing page (fault read until the
    /// page was placed), µs: the upper bound of its histogram bucket
    /// (buckets are 1/16 of a power of two wide). The destination measures
    /// it; the source shows the destination's figure once post-copy ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_fault_latency_us_p50: Option<u64>,
    /// 99th percentile of that wait, µs (same buckets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_fault_latency_us_p99: Option<u64>,
    /// Post-copy recoveries (a paused post-copy resumed by a new
    /// connection).
    #[serde(default)]
    pub postcopy_resumes: u64,
    /// Source only, with `"zero_copy": true`: what the kernel did with the
    /// zero-copy sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero_copy: Option<ZeroCopyStatus>,
    /// RAM compression, when this migration uses it (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionStatus>,
}

/// Zero-copy send in a [`MigrationStatus`] (source, `"zero_copy": true`).
///
/// Invariant: `zero_copy_bytes + copied_bytes + in_flight_bytes ==
/// sent_bytes` (up to sends dropped with a failed connection).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ZeroCopyStatus {
    /// Data connections on which `MSG_ZEROCOPY` is in use.
    pub connections: u32,
    /// Bytes handed to the kernel with `MSG_ZEROCOPY` (RAM pages on plain
    /// TCP; every sealed record with TLS).
    pub sent_bytes: u64,
    /// Completed bytes the NIC took from our pages without a copy.
    pub zero_copy_bytes: u64,
    /// Completed bytes the kernel copied after all
    /// (`SO_EE_CODE_ZEROCOPY_COPIED`: loopback and veth always copy).
    pub copied_bytes: u64,
    /// Bytes sent and not completed yet.
    pub in_flight_bytes: u64,
    /// Completion notifications read from the error queues.
    pub notifications: u64,
    /// Why zero-copy is not (or only partly) used, or what it applies to
    /// (TLS: the ciphertext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The `compression` object of a [`MigrationStatus`]: page data of the RAM
/// packets before and after compression (range tables and headers are in
/// neither; `transferred_bytes` has everything on the wire).
///
/// Invariant: `wire_bytes <= raw_bytes`; `ratio` is `raw_bytes /
/// wire_bytes` (1 while nothing was sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CompressionStatus {
    /// `"zstd"`.
    pub algorithm: String,
    /// The zstd level (source only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<i32>,
    /// Page data bytes of the RAM packets, raw (zero pages are not data
    /// and are in neither count).
    pub raw_bytes: u64,
    /// Those bytes as they went on the wire (compressed, or as is for a
    /// packet that did not shrink).
    pub wire_bytes: u64,
    /// `raw_bytes / wire_bytes`.
    pub ratio: f64,
    /// Packets sent (received) compressed.
    pub compressed_packets: u64,
    /// Packets sent (received) as is because they did not shrink.
    pub uncompressed_packets: u64,
}
