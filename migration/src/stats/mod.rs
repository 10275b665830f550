//! Live migration statistics: atomics updated by the workers, snapshotted
//! into the serde [`MigrationStatus`] that `GET /api/v1/vm.migration` returns.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use crate::host::HostMigrations;
use crate::live::{LiveParams, SwitchoverReason};
use crate::net::lock;
use crate::traits::PAGE_SIZE;

mod compression;
mod histogram;
mod meter;
mod status;

pub use compression::CompressionCounters;
pub use histogram::LatencyHistogram;
pub(crate) use meter::RxMeter;
pub use status::{
    CompressionStatus, DeviceStatus, MigrationState, MigrationStatus, SourceVmOutcome,
    ZeroCopyStatus,
};

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
    /// Remaining bytes as last stored (post-copy, or a source without a
    /// live pre-copy pass); see `live_remaining`.
    pub(crate) remaining_bytes: AtomicU64,
    /// While set (a pre-copy pass runs), `remaining_bytes` is computed live
    /// from `pass_pages`, `pass_base`, `sent_pages` and `held_pages`.
    pub(crate) live_remaining: AtomicBool,
    /// Pages of the current pre-copy pass.
    pub(crate) pass_pages: AtomicU64,
    /// `sent_pages` when the current pass began.
    pub(crate) pass_base: AtomicU64,
    /// Pre-copy RAM pages handed to the wire (data or zero marker).
    pub(crate) sent_pages: AtomicU64,
    /// Dirty pages fetched and not queued yet.
    pub(crate) held_pages: AtomicU64,
    pub(crate) zero_pages: AtomicU64,
    pub(crate) normal_pages: AtomicU64,
    /// Live RAM throughput, bytes/s.
    pub(crate) throughput: AtomicU64,
    pub(crate) pages_per_s: AtomicU64,
    pub(crate) dirty_rate: AtomicU64,
    pub(crate) dirty_syncs: AtomicU64,
    /// Pages the devices' DMA logs reported (per device).
    pub(crate) dma_dirty_pages: AtomicU64,
    /// RAM wire bytes and device bytes at the pause (value + 1; 0: not
    /// paused yet).
    ram_at_pause: AtomicU64,
    dev_at_pause: AtomicU64,
    /// Bytes of the VM state (vCPUs, irqchip, clock) sent while paused.
    pub(crate) state_bytes: AtomicU64,
    peer: Mutex<Option<String>>,
    rates: Mutex<meter::RateWindow>,
    pub(crate) expected_downtime_ms: AtomicU64,
    devices: RwLock<Vec<Arc<DeviceCounters>>>,
    setup_time_ms: AtomicU64,
    /// The whole migration in µs (value + 1; 0: not ended).
    total_time_us: AtomicU64,
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
    /// The guest's memory was handed over (`unix:`, shareable RAM).
    memory_handover: AtomicBool,
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
    /// Zero-copy send (source, `"zero_copy": true`).
    pub(crate) zero_copy: Arc<crate::net::ZcCounters>,
    /// RAM compression (both sides).
    pub(crate) compression: CompressionCounters,
}

/// Where a post-copy is (the `postcopy` status field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PostcopyPhase {
    Active = 1,
    Paused = 2,
    Completed = 3,
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
        self.memory_handover.store(false, Relaxed);
        self.source_vm.store(0, Relaxed);
        *lock(&self.error) = None;
        *lock(&self.started) = None;
        *lock(&self.live) = None;
        *lock(&self.switchover_reason) = None;
        *lock(&self.connections_reason) = None;
        *lock(&self.share_mib_s) = None;
        *lock(&self.peer) = None;
        lock(&self.rates).clear();
        self.live_remaining.store(false, Relaxed);
        self.postcopy.store(0, Relaxed);
        self.fault_latency.reset();
        self.zero_copy.reset();
        self.compression.reset();
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
            &self.pass_pages,
            &self.pass_base,
            &self.sent_pages,
            &self.held_pages,
            &self.zero_pages,
            &self.normal_pages,
            &self.throughput,
            &self.pages_per_s,
            &self.dirty_rate,
            &self.dirty_syncs,
            &self.dma_dirty_pages,
            &self.ram_at_pause,
            &self.dev_at_pause,
            &self.state_bytes,
            &self.expected_downtime_ms,
            &self.allowed_downtime_ms,
            &self.cpu_throttle_percent,
            &self.stalls,
        ] {
            a.store(0, Relaxed);
        }
        for a in [
            &self.setup_time_ms,
            &self.total_time_us,
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

    /// How the number of connections was chosen, once it was.
    pub(crate) fn connections_reason(&self) -> Option<String> {
        lock(&self.connections_reason).clone()
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

    /// Records that the connections are UNIX sockets (`unix:`).
    pub(crate) fn set_unix_transport(&self) {
        self.transport.store(3, Relaxed);
    }

    /// Records that the guest's memory was handed over, not copied.
    pub(crate) fn set_memory_handover(&self) {
        self.memory_handover.store(true, Relaxed);
    }

    /// Records the transport in use (`tls`: mutual TLS, else plain TCP).
    pub(crate) fn set_transport(&self, tls: bool) {
        self.transport.store(if tls { 2 } else { 1 }, Relaxed);
    }

    fn elapsed_ms(&self) -> u64 {
        self.elapsed_us() / 1000
    }

    fn elapsed_us(&self) -> u64 {
        lock(&self.started)
            .map(|s| s.elapsed().as_micros() as u64)
            .unwrap_or(0)
    }

    /// The whole migration in µs, from [`MigrationStats::begin`] to the
    /// final state; `None` while it runs. The status's `total_time_ms` is
    /// this in whole ms (truncated).
    pub fn total_time_us(&self) -> Option<u64> {
        opt(&self.total_time_us)
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
        let total_us = self.elapsed_us();
        set_opt(&self.total_time_us, total_us);
        let total = total_us / 1000;
        self.live_remaining.store(false, Relaxed);
        self.remaining_bytes.store(0, Relaxed);
        self.store_averages(total);
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
        let total_us = self.elapsed_us();
        set_opt(&self.total_time_us, total_us);
        self.store_averages(total_us / 1000);
        self.state.store(st.to_u8(), Relaxed);
    }

    /// Replaces the live rates by the averages over the transfer (total
    /// time minus setup), for the final record.
    fn store_averages(&self, total_ms: u64) {
        let ms = total_ms.saturating_sub(opt(&self.setup_time_ms).unwrap_or(0));
        if ms == 0 {
            return;
        }
        let s = ms as f64 / 1000.0;
        let bytes = self.transferred_bytes.load(Relaxed) as f64;
        let pages = (self.zero_pages.load(Relaxed) + self.normal_pages.load(Relaxed)) as f64;
        self.throughput.store((bytes / s) as u64, Relaxed);
        self.pages_per_s.store((pages / s) as u64, Relaxed);
    }

    /// Records the other side's address of the main connection.
    pub(crate) fn set_peer(&self, addr: Option<std::net::SocketAddr>) {
        *lock(&self.peer) = addr.map(|a| a.to_string());
    }

    /// Starts a pre-copy pass of `pages` pages: `remaining_bytes` is live
    /// from now on (until [`MigrationStats::stop_live_remaining`]).
    pub(crate) fn begin_pass(&self, pages: u64) {
        self.pass_base.store(self.sent_pages.load(Relaxed), Relaxed);
        self.pass_pages.store(pages, Relaxed);
        self.held_pages.store(0, Relaxed);
        self.live_remaining.store(true, Relaxed);
    }

    /// `remaining_bytes` shows the stored value from now on (post-copy).
    pub(crate) fn stop_live_remaining(&self) {
        self.live_remaining.store(false, Relaxed);
    }

    /// Records the pause of the source VM: bytes moved from now on are
    /// downtime bytes.
    pub(crate) fn mark_paused(&self) {
        set_opt(&self.ram_at_pause, self.transferred_bytes.load(Relaxed));
        set_opt(&self.dev_at_pause, self.device_bytes());
    }

    fn device_bytes(&self) -> u64 {
        let devs = self.devices.read().unwrap_or_else(|e| e.into_inner());
        devs.iter().map(|d| d.transferred.load(Relaxed)).sum()
    }

    fn remaining(&self) -> u64 {
        if !self.live_remaining.load(Relaxed) {
            return self.remaining_bytes.load(Relaxed);
        }
        let done = self
            .sent_pages
            .load(Relaxed)
            .saturating_sub(self.pass_base.load(Relaxed));
        let pass = self.pass_pages.load(Relaxed).saturating_sub(done);
        (pass + self.held_pages.load(Relaxed)) * PAGE_SIZE
    }

    /// (precopy_bytes, downtime_bytes) of a source; (0, 0) on the
    /// destination.
    fn precopy_downtime(&self) -> (u64, u64) {
        if self.role.load(Relaxed) != Role::Source as u8 {
            return (0, 0);
        }
        let ram = self.transferred_bytes.load(Relaxed);
        match opt(&self.ram_at_pause) {
            None => (ram.saturating_sub(self.postcopy_bytes.load(Relaxed)), 0),
            Some(at) => {
                let dev = self
                    .device_bytes()
                    .saturating_sub(opt(&self.dev_at_pause).unwrap_or(0));
                let ram_paused = ram
                    .saturating_sub(at)
                    .saturating_sub(self.postcopy_bytes.load(Relaxed));
                (at, ram_paused + dev + self.state_bytes.load(Relaxed))
            }
        }
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MigrationStatus {
        self.tick_rates();
        let devs = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let devices: Vec<DeviceStatus> = devs
            .iter()
            .map(|d| DeviceStatus {
                id: d.id.clone(),
                bytes_transferred: d.transferred.load(Relaxed),
                bytes_remaining: d.remaining.load(Relaxed),
                load_rate_bytes_per_s: d.load_rate.load(Relaxed),
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
        let total_us = opt(&self.total_time_us);
        let total = total_us.map(|us| us / 1000);
        let throughput = self.throughput.load(Relaxed);
        let dirty_rate = self.dirty_rate.load(Relaxed);
        let (precopy_bytes, downtime_bytes) = self.precopy_downtime();
        MigrationStatus {
            state,
            error: lock(&self.error).clone(),
            source_vm: self.source_vm(),
            role,
            transport: match self.transport.load(Relaxed) {
                1 => Some("tcp".to_string()),
                2 => Some("tls".to_string()),
                3 => Some("unix".to_string()),
                _ => None,
            },
            memory_handover: self.memory_handover.load(Relaxed),
            iteration: self.iteration.load(Relaxed),
            connections: self.connections.load(Relaxed) as u32,
            total_bytes: self.total_bytes.load(Relaxed),
            transferred_bytes: self.transferred_bytes.load(Relaxed),
            remaining_bytes: self.remaining(),
            zero_pages: self.zero_pages.load(Relaxed),
            normal_pages: self.normal_pages.load(Relaxed),
            page_size_bytes: PAGE_SIZE,
            throughput_bytes_per_s: throughput,
            throughput_mbit_s: throughput as f64 * 8.0 / 1e6,
            throughput_bps: throughput,
            pages_per_s: self.pages_per_s.load(Relaxed),
            dirty_rate_bytes_per_s: dirty_rate,
            dirty_rate_bps: dirty_rate,
            dirty_sync_count: self.dirty_syncs.load(Relaxed),
            dma_dirty_pages: self.dma_dirty_pages.load(Relaxed),
            precopy_bytes,
            downtime_bytes,
            peer_address: lock(&self.peer).clone(),
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
            total_time_us: if state == MigrationState::Active {
                None
            } else {
                total_us
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
            zero_copy: self.zero_copy_status(),
            compression: self
                .compression
                .status(self.role.load(Relaxed) == Role::Source as u8),
        }
    }

    fn zero_copy_status(&self) -> Option<ZeroCopyStatus> {
        let z = &self.zero_copy;
        z.requested.load(Relaxed).then(|| ZeroCopyStatus {
            connections: z.connections.load(Relaxed) as u32,
            sent_bytes: z.sent.load(Relaxed),
            zero_copy_bytes: z.zero_copy.load(Relaxed),
            copied_bytes: z.copied.load(Relaxed),
            in_flight_bytes: z.in_flight.load(Relaxed),
            notifications: z.notifications.load(Relaxed),
            note: lock(&z.note).clone(),
        })
    }
}
