//! Live migration statistics: atomics updated by the workers, snapshotted
//! into the serde [`MigrationStatus`] that `GET /api/v1/vm.migration` returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::host::HostMigrations;
use crate::live::{LiveParams, MigrationParameters, SwitchoverReason};
use crate::net::lock;

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
    fn from_u8(v: u8) -> Self {
        match v {
            1 => MigrationState::Active,
            2 => MigrationState::Completed,
            3 => MigrationState::Failed,
            4 => MigrationState::Cancelled,
            _ => MigrationState::None,
        }
    }
    fn to_u8(self) -> u8 {
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
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(SourceVmOutcome::Resumed),
            2 => Some(SourceVmOutcome::Migrated),
            3 => Some(SourceVmOutcome::PausedUncertain),
            4 => Some(SourceVmOutcome::PostcopyPaused),
            _ => None,
        }
    }
    fn to_u8(self) -> u8 {
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
    /// Destination load rate in bytes/s, once measured (0 = unknown).
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
    /// How the connections are carried: "tls" (mutual TLS 1.3) or "tcp"
    /// (plain, only with an explicit `"tls": false`); None before the
    /// parameters were accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Current (or last) RAM pass, starting at 1.
    pub iteration: u64,
    /// Data connections.
    pub connections: u32,
    /// Guest RAM size.
    pub total_bytes: u64,
    /// RAM bytes on the wire so far (headers, range tables and page data).
    pub transferred_bytes: u64,
    /// Source: RAM bytes still to send (queued-but-unsent while a pass drains,
    /// then dirty at the last pass decision). Destination: always 0 (n/a).
    pub remaining_bytes: u64,
    /// Pages sent (or received) as zero markers instead of data.
    pub zero_pages: u64,
    /// Source: RAM throughput on the wire (EWMA per pass). Destination: live
    /// RAM receive throughput (bytes received over the last ~0.5 s interval).
    pub throughput_bps: u64,
    /// Rate at which the guest dirties RAM (source only; 0 = n/a on the
    /// destination).
    pub dirty_rate_bps: u64,
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
}

/// A latency histogram with buckets 1/16 of a power of two wide: values
/// 0..16 µs have one bucket each; a larger value `v` with highest bit `e`
/// lands in bucket `16 + (e - 4) * 16 + (v >> (e - 4)) & 15`.
///
/// Invariant: `buckets[i]` counts the samples recorded into bucket `i`.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Vec<AtomicU64>,
}

const LAT_BUCKETS: usize = 16 + 60 * 16;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: (0..LAT_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl LatencyHistogram {
    fn bucket(v: u64) -> usize {
        if v < 16 {
            return v as usize;
        }
        let e = 63 - v.leading_zeros() as usize;
        16 + (e - 4) * 16 + ((v >> (e - 4)) & 15) as usize
    }

    /// The largest value of bucket `i`.
    fn upper(i: usize) -> u64 {
        if i < 16 {
            return i as u64;
        }
        let e = (i - 16) / 16 + 4;
        let sub = ((i - 16) % 16) as u64;
        (((16 + sub + 1) as u128) << (e - 4))
            .saturating_sub(1)
            .min(u64::MAX as u128) as u64
    }

    /// Records one sample of `us` microseconds.
    pub fn record(&self, us: u64) {
        self.buckets[Self::bucket(us)].fetch_add(1, Relaxed);
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The `q`-quantile (0 < q ≤ 1) as its bucket's upper bound; `None`
    /// without samples.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(Self::upper(i));
            }
        }
        None
    }

    /// Forgets every sample.
    pub fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Relaxed);
        }
    }
}

/// Counters of one device. Updated by its save/load thread and the writers.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Device id.
    pub id: String,
    /// Bytes moved.
    pub transferred: AtomicU64,
    /// Estimated bytes remaining.
    pub remaining: AtomicU64,
    /// Load rate in bytes/s (0 = unknown).
    pub load_rate: AtomicU64,
    /// Initial data loaded.
    pub initial_loaded: AtomicBool,
}

/// Optional counters store `value + 1`; 0 means "not known yet", so that
/// `Default` is the empty state.
fn set_opt(a: &AtomicU64, v: u64) {
    a.store(v.saturating_add(1), Relaxed);
}

/// Live counters updated by the workers; read through [`MigrationStats::snapshot`].
///
/// Invariant: only `send`/`receive` (and [`MigrationStats::begin`] /
/// [`MigrationStats::reset_for_new`]) change `state`; a final state
/// (completed/failed/cancelled) is set exactly once per migration.
#[derive(Debug, Default)]
pub struct MigrationStats {
    state: AtomicU8,
    role: AtomicU8,
    transport: AtomicU8,
    source_vm: AtomicU8,
    error: Mutex<Option<String>>,
    started: Mutex<Option<Instant>>,
    pub(crate) iteration: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) total_bytes: AtomicU64,
    pub(crate) transferred_bytes: AtomicU64,
    pub(crate) remaining_bytes: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) throughput_bps: AtomicU64,
    pub(crate) dirty_rate_bps: AtomicU64,
    pub(crate) expected_downtime_ms: AtomicU64,
    devices: RwLock<Vec<Arc<DeviceCounters>>>,
    setup_time_ms: AtomicU64,
    total_time_ms: AtomicU64,
    downtime_ms: AtomicU64,
    pause_to_ack_ms: AtomicU64,
    pause_time_us: AtomicU64,
    resume_time_us: AtomicU64,
    live: Mutex<Option<Arc<LiveParams>>>,
    pub(crate) allowed_downtime_ms: AtomicU64,
    pub(crate) cpu_throttle_percent: AtomicU64,
    pub(crate) stalls: AtomicU64,
    switchover_reason: Mutex<Option<SwitchoverReason>>,
    connections_reason: Mutex<Option<String>>,
    share_mib_s: Mutex<Option<f64>>,
    /// Outgoing migrations on the source host (0: unknown).
    host_source: AtomicU64,
    /// Incoming migrations on the destination host (0: unknown).
    host_destination: AtomicU64,
    postcopy: AtomicU8,
    pub(crate) postcopy_requests: AtomicU64,
    pub(crate) postcopy_bytes: AtomicU64,
    pub(crate) postcopy_missing_pages: AtomicU64,
    pub(crate) postcopy_resumes: AtomicU64,
    /// Fault latency measured here (destination).
    pub(crate) fault_latency: LatencyHistogram,
    /// The destination's p50/p99 as the source learnt them (value + 1).
    postcopy_p50: AtomicU64,
    postcopy_p99: AtomicU64,
}

/// Where a post-copy is (the `postcopy` status field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostcopyPhase {
    Active = 1,
    Paused = 2,
    Completed = 3,
}

/// Live receive throughput on the destination: samples
/// `transferred_bytes` at most every [`RX_SAMPLE`] and stores the rate of the
/// last interval in `throughput_bps`.
///
/// Invariant: `bytes` is the counter value at `at`; `transferred_bytes` only
/// grows during a migration, so the difference never underflows (saturating
/// anyway).
#[derive(Debug)]
pub(crate) struct RxMeter {
    at: Instant,
    bytes: u64,
}

/// Minimum interval of an [`RxMeter`] sample.
const RX_SAMPLE: std::time::Duration = std::time::Duration::from_millis(500);

impl RxMeter {
    pub(crate) fn new() -> Self {
        RxMeter {
            at: Instant::now(),
            bytes: 0,
        }
    }

    /// Updates `stats.throughput_bps` if a sample interval has passed.
    pub(crate) fn tick(&mut self, stats: &MigrationStats) {
        let dt = self.at.elapsed();
        if dt < RX_SAMPLE {
            return;
        }
        let now = stats.transferred_bytes.load(Relaxed);
        let rate = now.saturating_sub(self.bytes) as f64 / dt.as_secs_f64();
        stats.throughput_bps.store(rate as u64, Relaxed);
        self.at = Instant::now();
        self.bytes = now;
    }
}

/// Role stored in the stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Source = 1,
    Destination = 2,
}

fn opt(v: &AtomicU64) -> Option<u64> {
    v.load(Relaxed).checked_sub(1)
}

impl MigrationStats {
    /// Clears every counter and sets the state to `none`.
    pub fn reset_for_new(&self) {
        self.state.store(0, Relaxed);
        self.role.store(0, Relaxed);
        self.transport.store(0, Relaxed);
        self.source_vm.store(0, Relaxed);
        *lock(&self.error) = None;
        *lock(&self.started) = None;
        *lock(&self.live) = None;
        *lock(&self.switchover_reason) = None;
        *lock(&self.connections_reason) = None;
        *lock(&self.share_mib_s) = None;
        self.postcopy.store(0, Relaxed);
        self.fault_latency.reset();
        for a in [
            &self.postcopy_requests,
            &self.postcopy_bytes,
            &self.postcopy_missing_pages,
            &self.postcopy_resumes,
            &self.postcopy_p50,
            &self.postcopy_p99,
        ] {
            a.store(0, Relaxed);
        }
        for a in [
            &self.host_source,
            &self.host_destination,
            &self.iteration,
            &self.connections,
            &self.total_bytes,
            &self.transferred_bytes,
            &self.remaining_bytes,
            &self.zero_pages,
            &self.throughput_bps,
            &self.dirty_rate_bps,
            &self.expected_downtime_ms,
            &self.allowed_downtime_ms,
            &self.cpu_throttle_percent,
            &self.stalls,
        ] {
            a.store(0, Relaxed);
        }
        for a in [
            &self.setup_time_ms,
            &self.total_time_ms,
            &self.downtime_ms,
            &self.pause_to_ack_ms,
            &self.pause_time_us,
            &self.resume_time_us,
        ] {
            a.store(0, Relaxed);
        }
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Resets the counters and marks the migration active (the VMM may call
    /// it before spawning the worker so that the API shows `active` at once;
    /// `send`/`receive` call it again themselves).
    pub fn begin(&self) {
        self.reset_for_new();
        *lock(&self.started) = Some(Instant::now());
        self.state.store(MigrationState::Active.to_u8(), Relaxed);
    }

    /// Current state.
    pub fn state(&self) -> MigrationState {
        MigrationState::from_u8(self.state.load(Relaxed))
    }

    /// Shows `live`'s values as `parameters` from now on.
    pub(crate) fn set_live(&self, live: &Arc<LiveParams>) {
        *lock(&self.live) = Some(live.clone());
    }

    /// Records why the source switched over.
    pub(crate) fn set_switchover_reason(&self, r: SwitchoverReason) {
        *lock(&self.switchover_reason) = Some(r);
    }

    /// Records where the post-copy is.
    pub(crate) fn set_postcopy(&self, p: PostcopyPhase) {
        self.postcopy.store(p as u8, Relaxed);
    }

    /// Records the destination's fault latency figures (source side).
    pub(crate) fn set_remote_latency(&self, p50_us: u64, p99_us: u64) {
        set_opt(&self.postcopy_p50, p50_us);
        set_opt(&self.postcopy_p99, p99_us);
    }

    /// Why the source switched over, once it did.
    pub fn switchover_reason(&self) -> Option<SwitchoverReason> {
        *lock(&self.switchover_reason)
    }

    /// Records how the number of connections was chosen.
    pub(crate) fn set_connections_reason(&self, why: String) {
        *lock(&self.connections_reason) = Some(why);
    }

    /// Records this migration's share of the host bandwidth (MiB/s).
    pub(crate) fn set_share(&self, mib_s: Option<f64>) {
        *lock(&self.share_mib_s) = mib_s;
    }

    /// The share of the host bandwidth last recorded (MiB/s).
    pub fn share_mib_s(&self) -> Option<f64> {
        *lock(&self.share_mib_s)
    }

    /// Records the migrations counted on the source host (outgoing) or the
    /// destination host (incoming); 0 leaves a count unknown.
    pub(crate) fn set_host_migrations(&self, source: u32, destination: u32) {
        if source > 0 {
            self.host_source.store(source as u64, Relaxed);
        }
        if destination > 0 {
            self.host_destination.store(destination as u64, Relaxed);
        }
    }

    fn host_migrations(&self) -> Option<HostMigrations> {
        let get = |a: &AtomicU64| u32::try_from(a.load(Relaxed)).ok().filter(|n| *n > 0);
        let h = HostMigrations {
            source: get(&self.host_source),
            destination: get(&self.host_destination),
        };
        (h != HostMigrations::default()).then_some(h)
    }

    pub(crate) fn set_role(&self, r: Role) {
        self.role.store(r as u8, Relaxed);
    }

    /// Records the transport in use (`tls`: mutual TLS, else plain TCP).
    pub(crate) fn set_transport(&self, tls: bool) {
        self.transport.store(if tls { 2 } else { 1 }, Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        lock(&self.started)
            .map(|s| s.elapsed().as_millis() as u64)
            .unwrap_or(0)
    }

    /// Records what became of the source VM (set before the final state).
    pub(crate) fn set_source_vm(&self, o: SourceVmOutcome) {
        self.source_vm.store(o.to_u8(), Relaxed);
    }

    /// What became of the source VM, once a send ended.
    pub fn source_vm(&self) -> Option<SourceVmOutcome> {
        SourceVmOutcome::from_u8(self.source_vm.load(Relaxed))
    }

    pub(crate) fn mark_setup_done(&self) {
        set_opt(&self.setup_time_ms, self.elapsed_ms());
    }

    /// Sets the device list (ids in order) and returns their counters.
    pub(crate) fn set_devices(&self, ids: &[String]) -> Vec<Arc<DeviceCounters>> {
        let v: Vec<Arc<DeviceCounters>> = ids
            .iter()
            .map(|id| {
                Arc::new(DeviceCounters {
                    id: id.clone(),
                    ..Default::default()
                })
            })
            .collect();
        *self.devices.write().unwrap_or_else(|e| e.into_inner()) = v.clone();
        v
    }

    /// Records a completed migration with its timings.
    pub(crate) fn complete(&self, pause_us: u64, resume_us: u64, pause_to_ack_ms: Option<u64>) {
        set_opt(&self.pause_time_us, pause_us);
        set_opt(&self.resume_time_us, resume_us);
        set_opt(&self.downtime_ms, resume_us.saturating_sub(pause_us) / 1000);
        if let Some(p) = pause_to_ack_ms {
            set_opt(&self.pause_to_ack_ms, p);
        }
        set_opt(&self.total_time_ms, self.elapsed_ms());
        self.remaining_bytes.store(0, Relaxed);
        self.state.store(MigrationState::Completed.to_u8(), Relaxed);
    }

    /// Records the final error (cancelled or failed).
    pub(crate) fn fail(&self, e: &crate::error::MigrationError) {
        *lock(&self.error) = Some(e.to_string());
        let st = if matches!(
            e,
            crate::error::MigrationError::Cancelled | crate::error::MigrationError::NoProgress(_)
        ) {
            MigrationState::Cancelled
        } else {
            MigrationState::Failed
        };
        set_opt(&self.total_time_ms, self.elapsed_ms());
        self.state.store(st.to_u8(), Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MigrationStatus {
        let devs = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let devices: Vec<DeviceStatus> = devs
            .iter()
            .map(|d| DeviceStatus {
                id: d.id.clone(),
                bytes_transferred: d.transferred.load(Relaxed),
                bytes_remaining: d.remaining.load(Relaxed),
                load_rate_bps: d.load_rate.load(Relaxed),
                initial_loaded: d.initial_loaded.load(Relaxed),
            })
            .collect();
        let role = match self.role.load(Relaxed) {
            1 => Some("source".to_string()),
            2 => Some("destination".to_string()),
            _ => None,
        };
        let state = self.state();
        let total = opt(&self.total_time_ms);
        MigrationStatus {
            state,
            error: lock(&self.error).clone(),
            source_vm: self.source_vm(),
            role,
            transport: match self.transport.load(Relaxed) {
                1 => Some("tcp".to_string()),
                2 => Some("tls".to_string()),
                _ => None,
            },
            iteration: self.iteration.load(Relaxed),
            connections: self.connections.load(Relaxed) as u32,
            total_bytes: self.total_bytes.load(Relaxed),
            transferred_bytes: self.transferred_bytes.load(Relaxed),
            remaining_bytes: self.remaining_bytes.load(Relaxed),
            zero_pages: self.zero_pages.load(Relaxed),
            throughput_bps: self.throughput_bps.load(Relaxed),
            dirty_rate_bps: self.dirty_rate_bps.load(Relaxed),
            expected_downtime_ms: self.expected_downtime_ms.load(Relaxed),
            device_bytes_transferred: devices.iter().map(|d| d.bytes_transferred).sum(),
            device_bytes_remaining: devices.iter().map(|d| d.bytes_remaining).sum(),
            devices,
            elapsed_ms: if state == MigrationState::Active {
                self.elapsed_ms()
            } else {
                total.unwrap_or(0)
            },
            setup_time_ms: opt(&self.setup_time_ms),
            total_time_ms: if state == MigrationState::Active {
                None
            } else {
                total
            },
            downtime_ms: opt(&self.downtime_ms),
            pause_to_ack_ms: opt(&self.pause_to_ack_ms),
            pause_time_us: opt(&self.pause_time_us),
            resume_time_us: opt(&self.resume_time_us),
            parameters: lock(&self.live).as_ref().map(|l| l.get()),
            allowed_downtime_ms: self.allowed_downtime_ms.load(Relaxed),
            cpu_throttle_percent: self.cpu_throttle_percent.load(Relaxed),
            stalls: self.stalls.load(Relaxed),
            switchover_reason: self.switchover_reason(),
            connections_reason: lock(&self.connections_reason).clone(),
            bandwidth_share_mib_s: self.share_mib_s(),
            host_migrations: self.host_migrations(),
            postcopy: match self.postcopy.load(Relaxed) {
                1 => Some("active".into()),
                2 => Some("paused".into()),
                3 => Some("completed".into()),
                _ => None,
            },
            postcopy_requests: self.postcopy_requests.load(Relaxed),
            postcopy_bytes: self.postcopy_bytes.load(Relaxed),
            postcopy_missing_pages: self.postcopy_missing_pages.load(Relaxed),
            postcopy_fault_latency_us_p50: self
                .fault_latency
                .quantile(0.5)
                .or_else(|| opt(&self.postcopy_p50)),
            postcopy_fault_latency_us_p99: self
                .fault_latency
                .quantile(0.99)
                .or_else(|| opt(&self.postcopy_p99)),
            postcopy_resumes: self.postcopy_resumes.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let h = LatencyHistogram::default();
        assert_eq!(h.quantile(0.5), None);
        for v in [0u64, 15, 16, 17, 31, 32, 1000, 1 << 40, u64::MAX] {
            let b = LatencyHistogram::bucket(v);
            assert!(b < LAT_BUCKETS, "{v}");
            let up = LatencyHistogram::upper(b);
            assert!(up >= v, "{v}: bucket {b} ends at {up}");
            assert!(up as f64 <= v as f64 * 1.07 + 1.0, "{v}: {up}");
            if b > 0 {
                assert!(LatencyHistogram::upper(b - 1) < v, "{v}");
            }
        }
        for v in 1..=100 {
            h.record(v * 10);
        }
        let p50 = h.quantile(0.5).unwrap();
        assert!((500..=535).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((990..=1060).contains(&p99), "{p99}");
        assert_eq!(h.count(), 100);
    }
}
