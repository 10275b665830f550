//! Entry points and the types the VMM's API exposes.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use crate::compress::Compression;
pub use crate::error::MigrationError;
pub use crate::events::{EventBatch, EventLog};
pub use crate::host::{Direction, Host, HostMigrations, HostSlot, LinkSpeed};
pub use crate::limits::{Limit, Range};
pub use crate::live::{
    LiveParams, MigrationParameters, ParametersUpdate, Policy, SwitchoverReason, Technique,
};
pub use crate::stats::{
    DeviceStatus, MigrationState, MigrationStats, MigrationStatus, SourceVmOutcome, ZeroCopyStatus,
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
    /// `tcp:HOST:PORT`, or `unix:PATH` for a destination on this host (the
    /// memory handover when RAM is shareable, see [`crate::handover`]).
    pub destination_url: String,
    /// The protocol version to announce, `MIN_VERSION..=VERSION` of
    /// [`crate::wire`] (default: the newest): an older one reaches a
    /// destination running an older `ferry` (no memory handover below 4).
    /// Not serialized when unset, so that a request from this build is
    /// still understood by an older VMM's API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<u16>,
    /// Data connections, 1..=64, or `"auto"` (chosen from the outgoing
    /// link's speed and the vCPUs, see [`crate::host::auto_connections`]).
    #[serde(default)]
    pub connections: Connections,
    /// Allowed downtime in milliseconds (0: switch over only when nothing
    /// is left). `None` keeps the current parameter
    /// ([`crate::live::MigrationParameters::downtime_ms`], 300 by default).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Deprecated name of `max_bandwidth_mib_s` (the unit was always MiB/s);
    /// accepted for one release.
    #[serde(default)]
    pub max_bandwidth_mbps: Option<f64>,
    /// Throughput cap in MiB/s shared by all connections (0: no cap).
    #[serde(default)]
    pub max_bandwidth_mib_s: Option<f64>,
    /// Convergence policy (see [`crate::live::Policy`]).
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Throttle the vCPUs when the migration stalls.
    #[serde(default)]
    pub auto_converge: Option<bool>,
    /// First throttle in percent (1..=99).
    #[serde(default)]
    pub throttle_initial_percent: Option<u32>,
    /// Throttle added at each further stall (1..=99).
    #[serde(default)]
    pub throttle_increment_percent: Option<u32>,
    /// Highest throttle (1..=99).
    #[serde(default)]
    pub throttle_max_percent: Option<u32>,
    /// Seconds without progress that count as a stall.
    #[serde(default)]
    pub stall_limit_s: Option<u64>,
    /// Seconds without progress after which the migration is cancelled (0:
    /// never).
    #[serde(default)]
    pub progress_timeout_s: Option<u64>,
    /// `pre-copy` or `post-copy` (post-copy from the first pass boundary).
    #[serde(default)]
    pub technique: Option<Technique>,
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
    /// Resume a paused post-copy (its connections were lost): reconnect to
    /// `destination_url`, which still runs the guest, and send the pages it
    /// still lacks. Only valid while a post-copy is paused on this VM.
    #[serde(default)]
    pub resume: bool,
    /// Accept devices that write guest memory by DMA and cannot log it:
    /// every populated page is then re-sent in the final pass, after the
    /// devices stopped. Without it such a send is refused.
    #[serde(default)]
    pub allow_untracked_dma: bool,
    /// Send RAM with `MSG_ZEROCOPY` on every data connection (with TLS: the
    /// ciphertext buffers). Needs [`crate::net::ZC_WINDOW`] bytes of
    /// locked memory per connection unless `CAP_IPC_LOCK`; refused with
    /// the limit and the need when `RLIMIT_MEMLOCK` is smaller.
    #[serde(default)]
    pub zero_copy: bool,
    /// `"none"` (default) or `"zstd"`: compress each RAM packet's page data
    /// in the writer threads (sent as is when it does not shrink). The
    /// destination must agree at SETUP; one that does not know compression
    /// refuses the migration there (the source keeps running).
    #[serde(default)]
    pub compression: Compression,
    /// zstd level, [`crate::compress::MIN_ZSTD_LEVEL`]..=
    /// [`crate::compress::MAX_ZSTD_LEVEL`] (default
    /// [`crate::compress::DEFAULT_ZSTD_LEVEL`]); only with `"zstd"`.
    #[serde(default)]
    pub compression_level: Option<i64>,
}

impl SendParams {
    /// A request to `destination_url` with every other field at its default
    /// (plain TCP only if `tls` is then set to `Some(false)`).
    pub fn to(destination_url: impl Into<String>) -> SendParams {
        SendParams {
            destination_url: destination_url.into(),
            protocol_version: None,
            connections: Connections::default(),
            downtime_ms: None,
            max_bandwidth_mbps: None,
            max_bandwidth_mib_s: None,
            policy: None,
            auto_converge: None,
            throttle_initial_percent: None,
            throttle_increment_percent: None,
            throttle_max_percent: None,
            stall_limit_s: None,
            progress_timeout_s: None,
            technique: None,
            timeout_s: default_timeout_s(),
            device_state: DeviceStateMode::default(),
            device_precopy: true,
            device_chunk_bytes: default_chunk(),
            tls_dir: None,
            tls: None,
            resume: false,
            allow_untracked_dma: false,
            zero_copy: false,
            compression: Compression::None,
            compression_level: None,
        }
    }
}

/// Largest `timeout_s` accepted: one week. The deadline is an `Instant`,
/// which cannot hold an arbitrary number of seconds.
pub const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;

/// `connections` of a send request: a number, or `"auto"`.
///
/// Invariant: none beyond the type; [`SendParams::validate`] checks that a
/// count is within [`LIMIT_CONNECTIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// Exactly this many data connections.
    Count(u32),
    /// Chosen when the send starts ([`crate::host::auto_connections`]).
    Auto,
}

impl Default for Connections {
    fn default() -> Self {
        Connections::Count(4)
    }
}

impl From<u32> for Connections {
    fn from(n: u32) -> Self {
        Connections::Count(n)
    }
}

impl std::fmt::Display for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connections::Count(n) => write!(f, "{n}"),
            Connections::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for Connections {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Connections::Count(n) => s.serialize_u32(*n),
            Connections::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Connections {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Connections;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of connections or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Connections, E> {
                u32::try_from(v)
                    .map(Connections::Count)
                    .map_err(|_| E::custom(format!("{v} connections")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Connections, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("{v} connections")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Connections, E> {
                if v == "auto" {
                    Ok(Connections::Auto)
                } else {
                    Err(E::custom(format!(
                        "connections \"{v}\" (a number or \"auto\")"
                    )))
                }
            }
        }
        d.deserialize_any(V)
    }
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
    /// The one budget, in bytes, for device state held in memory on the
    /// destination: every device's reorder buffer and every chunk being
    /// read, all connections together ([`MIN_DEVICE_BUFFER`] to
    /// [`MAX_DEVICE_BUFFER`], default [`DEFAULT_DEVICE_BUFFER`]). A reader
    /// waits while it is spent; the last [`MAX_DEVICE_CHUNK`] of it is kept
    /// for chunks that a device's load thread needs next.
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
        (Some(""), _) => Err(MigrationError::InvalidParams(
            "tls_dir is empty: give the directory holding ca.pem, cert.pem and key.pem".into(),
        )),
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

/// The TLS choice of a `unix:` URL: none (the peer is this host; `tls`
/// unset or false), any request for TLS is refused with the reason.
fn unix_tls<T>(tls_dir: &Option<String>, tls: Option<bool>) -> Result<Option<T>, MigrationError> {
    match (tls_dir, tls) {
        (None, None | Some(false)) => Ok(None),
        _ => Err(crate::handover::tls_refusal()),
    }
}

/// Default of `device_buffer_bytes`: the destination's budget for device
/// state held in memory, all devices and connections together.
pub const DEFAULT_DEVICE_BUFFER: u64 = 64 << 20;
/// Smallest `device_buffer_bytes`: one chunk of the largest size, which is
/// also the headroom kept for the chunk a device needs next.
pub const MIN_DEVICE_BUFFER: u64 = MAX_DEVICE_CHUNK;
/// Largest `device_buffer_bytes`.
pub const MAX_DEVICE_BUFFER: u64 = 4 << 30;

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

/// `connections`: data connections, or `"auto"`.
pub const LIMIT_CONNECTIONS: Limit = Limit {
    field: "connections",
    range: Range::IntOrAuto(1, MAX_CONNECTIONS as u64),
};
pub use crate::live::{LIMIT_DOWNTIME_MS, PARAM_LIMITS};
/// `max_bandwidth_mbps` in MiB/s: 0.1 (a packet then takes seconds) up to
/// 1 TiB/s (more than any link).
pub const LIMIT_MAX_BANDWIDTH_MBPS: Limit = Limit {
    field: "max_bandwidth_mbps",
    range: Range::Float(0.1, 1_048_576.0),
};
/// `timeout_s`: one second to one week.
pub const LIMIT_TIMEOUT_S: Limit = Limit {
    field: "timeout_s",
    range: Range::Int(1, MAX_TIMEOUT_S),
};
/// `device_chunk_bytes`: one page to [`MAX_DEVICE_CHUNK`].
pub const LIMIT_DEVICE_CHUNK_BYTES: Limit = Limit {
    field: "device_chunk_bytes",
    range: Range::Int(4096, MAX_DEVICE_CHUNK),
};
/// `device_buffer_bytes`: the destination's one budget for device state
/// held in memory ([`MIN_DEVICE_BUFFER`] to [`MAX_DEVICE_BUFFER`]).
pub const LIMIT_DEVICE_BUFFER_BYTES: Limit = Limit {
    field: "device_buffer_bytes",
    range: Range::Int(MIN_DEVICE_BUFFER, MAX_DEVICE_BUFFER),
};

/// `compression_level`: zstd's regular levels.
pub const LIMIT_COMPRESSION_LEVEL: Limit = Limit {
    field: "compression_level",
    range: Range::Int(
        crate::compress::MIN_ZSTD_LEVEL as u64,
        crate::compress::MAX_ZSTD_LEVEL as u64,
    ),
};

/// The numeric fields of [`SendParams`].
pub const SEND_LIMITS: &[Limit] = &[
    LIMIT_CONNECTIONS,
    LIMIT_DOWNTIME_MS,
    LIMIT_MAX_BANDWIDTH_MBPS,
    LIMIT_TIMEOUT_S,
    LIMIT_DEVICE_CHUNK_BYTES,
    LIMIT_COMPRESSION_LEVEL,
];
/// The numeric fields of [`ReceiveParams`].
pub const RECEIVE_LIMITS: &[Limit] = &[LIMIT_DEVICE_BUFFER_BYTES];

impl SendParams {
    /// Checks every field; the error names the offending one and its range.
    pub fn validate(&self) -> Result<(), MigrationError> {
        crate::handshake::check_url(&self.destination_url)?;
        // What combines with what is decided in one place.
        crate::combine::check(self)?;
        if let Some(v) = self.protocol_version {
            if !crate::wire::version_accepted(v) {
                return Err(MigrationError::InvalidParams(format!(
                    "protocol_version {v} is outside {}..={}",
                    crate::wire::MIN_VERSION,
                    crate::wire::VERSION
                )));
            }
        }
        if let Connections::Count(n) = self.connections {
            LIMIT_CONNECTIONS.check_int(n as u64)?;
        }
        if let Some(b) = self.max_bandwidth_mbps {
            LIMIT_MAX_BANDWIDTH_MBPS.check_float(b)?;
        }
        self.parameters_update()?.validate()?;
        LIMIT_TIMEOUT_S.check_int(self.timeout_s)?;
        LIMIT_DEVICE_CHUNK_BYTES.check_int(self.device_chunk_bytes)?;
        self.zstd_level()?;
        self.client_tls()?;
        if let (true, Connections::Count(n)) = (self.zero_copy, self.connections) {
            crate::net::check_memlock(crate::net::memlock_limit(), n)?;
        }
        Ok(())
    }

    /// The zstd level this request asks for (`None`: no compression).
    /// Refuses a level without `"compression": "zstd"` and a level out of
    /// [`LIMIT_COMPRESSION_LEVEL`].
    pub fn zstd_level(&self) -> Result<Option<i32>, MigrationError> {
        match (self.compression, self.compression_level) {
            (Compression::None, None) => Ok(None),
            (Compression::None, Some(_)) => Err(MigrationError::InvalidParams(
                "compression_level needs \"compression\": \"zstd\"".into(),
            )),
            (Compression::Zstd, None) => Ok(Some(crate::compress::DEFAULT_ZSTD_LEVEL)),
            (Compression::Zstd, Some(l)) => {
                let v = u64::try_from(l).unwrap_or(u64::MAX);
                if l < 0 {
                    // Negative levels (zstd's "fast" ones) are not offered.
                    return Err(MigrationError::InvalidParams(format!(
                        "compression_level must be in {}, got {l}",
                        LIMIT_COMPRESSION_LEVEL.range
                    )));
                }
                LIMIT_COMPRESSION_LEVEL.check_int(v)?;
                // In range 1..=19: fits an i32.
                Ok(Some(l as i32))
            }
        }
    }

    /// The parameter fields this request names, as a change of the live
    /// parameters (applied when the send starts). Refuses the deprecated
    /// `max_bandwidth_mbps` together with a different `max_bandwidth_mib_s`.
    pub fn parameters_update(&self) -> Result<ParametersUpdate, MigrationError> {
        let bw =
            match (self.max_bandwidth_mib_s, self.max_bandwidth_mbps) {
                (Some(a), Some(b)) if a != b => return Err(MigrationError::InvalidParams(
                    "max_bandwidth_mbps (deprecated) and max_bandwidth_mib_s differ: give only \
                     max_bandwidth_mib_s"
                        .into(),
                )),
                (a, b) => a.or(b),
            };
        Ok(ParametersUpdate {
            policy: self.policy,
            downtime_ms: self.downtime_ms,
            max_bandwidth_mib_s: bw,
            auto_converge: self.auto_converge,
            throttle_initial_percent: self.throttle_initial_percent,
            throttle_increment_percent: self.throttle_increment_percent,
            throttle_max_percent: self.throttle_max_percent,
            stall_limit_s: self.stall_limit_s,
            progress_timeout_s: self.progress_timeout_s,
            technique: self.technique,
        })
    }

    /// The protocol version this send announces.
    pub fn wire_version(&self) -> u16 {
        self.protocol_version.unwrap_or(crate::wire::VERSION)
    }

    /// The TLS configuration this request asks for (`None`: plain TCP),
    /// loaded from `tls_dir`.
    pub fn client_tls(&self) -> Result<Option<ClientTls>, MigrationError> {
        if crate::handover::is_unix(&self.destination_url) {
            return unix_tls(&self.tls_dir, self.tls);
        }
        tls_choice(&self.tls_dir, self.tls)?
            .map(ClientTls::load)
            .transpose()
    }
}

impl ReceiveParams {
    /// Checks every field; the error names the offending one and its range.
    pub fn validate(&self) -> Result<(), MigrationError> {
        if let Some(b) = self.device_buffer_bytes {
            LIMIT_DEVICE_BUFFER_BYTES.check_int(b)?;
        }
        self.server_tls()?;
        Ok(())
    }

    /// The TLS configuration this request asks for (`None`: plain TCP),
    /// loaded from `tls_dir` with the allowed subjects.
    pub fn server_tls(&self) -> Result<Option<ServerTls>, MigrationError> {
        if crate::handover::is_unix(&self.receiver_url) {
            if !self.tls_allowed_subjects.is_empty() {
                return Err(crate::handover::tls_refusal());
            }
            return unix_tls(&self.tls_dir, self.tls);
        }
        let dir = tls_choice(&self.tls_dir, self.tls)?;
        if dir.is_none() && !self.tls_allowed_subjects.is_empty() {
            return Err(MigrationError::InvalidParams(
                "tls_allowed_subjects needs TLS (a tls_dir)".into(),
            ));
        }
        dir.map(|d| ServerTls::load(d, &self.tls_allowed_subjects))
            .transpose()
    }

    /// The listen address of `receiver_url` (`tcp:HOST:PORT` or
    /// `unix:PATH`).
    pub fn listen_addr(&self) -> Result<ListenAddr, MigrationError> {
        if crate::handover::is_unix(&self.receiver_url) {
            return crate::handover::parse_unix(&self.receiver_url).map(ListenAddr::Unix);
        }
        crate::handshake::parse_url(&self.receiver_url)?
            .into_iter()
            .next()
            .map(ListenAddr::Tcp)
            .ok_or_else(|| MigrationError::InvalidParams("receiver_url resolves to nothing".into()))
    }
}

/// Where a destination listens. Invariant: a `Unix` path passed
/// [`crate::handover::parse_unix`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// `tcp:HOST:PORT`.
    Tcp(std::net::SocketAddr),
    /// `unix:PATH` (same host).
    Unix(std::path::PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    /// Binds the listener. A `unix:` path that names a stale socket (one
    /// nobody listens on) is replaced; any other existing file is an error.
    pub fn bind(&self) -> std::io::Result<crate::net::Listener> {
        match self {
            ListenAddr::Tcp(a) => TcpListener::bind(a).map(Into::into),
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    let stale = m.file_type().is_socket()
                        && std::os::unix::net::UnixStream::connect(p).is_err();
                    if !stale {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::AddrInUse,
                            format!("{} exists (and is not a stale socket)", p.display()),
                        ));
                    }
                    std::fs::remove_file(p)?;
                }
                let l = std::os::unix::net::UnixListener::bind(p)?;
                Ok(crate::net::Listener::Unix(l, p.clone()))
            }
        }
    }
}

/// Runs a migration on the source. On success the VM is paused for good and
/// the caller should exit. On error, two cases (see
/// `docs/migration-protocol.md`, "The switch-over commit"):
///
/// * any error except [`MigrationError::CommitUncertain`]: the failure came
///   before the switch-over was committed, or after it with the
///   destination reporting that it discarded its VM without starting the
///   guest; the VM runs again (unless the user had paused it), devices are
///   RUNNING, `stats` shows `source_vm = resumed`;
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
    send_with(vm, params, stats, cancel, &Hooks::default())
}

/// What a VMM shares with a running migration beyond its statistics: the
/// live parameters (defaults between migrations), the event log and the
/// host. `Hooks::default()` gives a migration its own parameters and log,
/// no host and no sharing.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    /// Parameters read at every decision; changed by the API meanwhile.
    pub live: Arc<LiveParams>,
    /// Where the migration reports its events.
    pub events: Arc<EventLog>,
    /// The host: its registry of running migrations and its links
    /// (`None`: the migration counts itself alone, link speeds are unknown).
    pub host: Option<Arc<dyn Host>>,
    /// The bandwidth, in MiB/s, that all migrations of this host share
    /// ([`crate::host::share_mib_s`]); `None`: no sharing.
    pub host_max_mib_s: Option<f64>,
    /// A paused post-copy of this VM (set when its connections were lost;
    /// taken by the send with `"resume": true`).
    pub resume: Arc<std::sync::Mutex<Option<ResumeToken>>>,
}

/// What a send with `"resume": true` needs of a paused post-copy: the
/// session the destination knows, the switch-over's times, the next
/// connection epoch.
///
/// Invariant: set only by a send whose post-copy was interrupted after
/// COMMIT; the source VM stays paused while it exists.
#[derive(Debug, Clone)]
pub struct ResumeToken {
    pub(crate) session: u128,
    pub(crate) epoch: u64,
    pub(crate) pause_us: u64,
    pub(crate) resume_us: Option<u64>,
    pub(crate) ack_ms: u64,
}

impl Hooks {
    /// Whether a post-copy of this VM is paused (and can be resumed).
    pub fn postcopy_paused(&self) -> bool {
        crate::net::lock(&self.resume).is_some()
    }
}

/// [`send`] with the VMM's live parameters and event log. The migration
/// runs on `hooks.live`'s defaults with the parameter fields of `params`
/// laid over them, for this migration only ([`crate::live::LiveParams::begin`]).
pub fn send_with(
    vm: Arc<dyn SourceVm>,
    params: &SendParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
    hooks: &Hooks,
) -> Result<(), MigrationError> {
    let applied = params
        .validate()
        .and_then(|()| params.parameters_update())
        .and_then(|u| hooks.live.begin(&u));
    if let Err(e) = applied {
        stats.begin();
        stats.fail(&e);
        return Err(e);
    }
    let r = crate::send::run(vm, params, stats, cancel, hooks);
    hooks.live.end();
    r
}

/// Receives one migration on `listener`. On success the VM has been started
/// ([`DestinationVm::start`], only after the source's COMMIT) and is returned; on error it was discarded and
/// every thread and socket is closed, so the caller can receive again (on a
/// new or cloned listener). Strangers connecting meanwhile are refused with
/// an ERROR frame without disturbing the migration.
pub fn receive(
    listener: impl Into<crate::net::Listener>,
    factory: &dyn DestinationFactory,
    params: &ReceiveParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    receive_with(listener, factory, params, stats, cancel, &Hooks::default())
}

/// [`receive`] reporting its events to `hooks.events`.
pub fn receive_with(
    listener: impl Into<crate::net::Listener>,
    factory: &dyn DestinationFactory,
    params: &ReceiveParams,
    stats: &Arc<MigrationStats>,
    cancel: &CancelToken,
    hooks: &Hooks,
) -> Result<Arc<dyn DestinationVm>, MigrationError> {
    if let Err(e) = params.validate() {
        stats.begin();
        stats.fail(&e);
        return Err(e);
    }
    crate::recv::run(listener.into(), factory, params, stats, cancel, hooks)
}

#[cfg(test)]
#[path = "api_tests.rs"]
mod tests;
