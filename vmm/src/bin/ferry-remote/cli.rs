//! The command line of `ferry-remote` (clap) and its translation into the
//! migration crate's request types ([`SendParams`], [`ReceiveParams`],
//! [`ParametersUpdate`]).

use std::path::PathBuf;

use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use clap_complete::Shell;
use migration::api::{
    Connections, DeviceStateMode, ParametersUpdate, Policy, ReceiveParams, SendParams, Technique,
};
use vmm::logging::LogArgs;

/// The `--help` epilogue: exit codes, logging, completions.
pub const EPILOGUE: &str = "\
Exit codes:
  0    success (with --wait: the migration completed)
  1    failure: the VMM answered with an error, or could not be reached
  2    bad command line
  3    --wait: the migration failed (the source VM runs on)
  4    --wait: the migration was cancelled (the source VM runs on)
  5    --wait: the migration failed and the source VM was left paused
       (source_vm paused_uncertain or postcopy_paused): act by hand
  130  --wait: interrupted (Ctrl-C) without cancelling; the migration goes on

Errors print the VMM's `error` and `kind`. Logging: warnings by default;
-v info, -vv debug, -vvv trace; RUST_LOG (env_logger syntax) sets
per-module levels.";

/// `ferry-remote`: talks to a `ferry` API socket.
#[derive(Parser, Debug)]
#[command(
    name = "ferry-remote",
    version,
    about = "Control a ferry VMM through its API socket",
    arg_required_else_help = true,
    after_help = EPILOGUE
)]
pub struct Args {
    /// The VMM's API socket (required except for `completions` and `man`).
    #[arg(long, value_name = "PATH", global = true)]
    pub api_socket: Option<PathBuf>,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How the migration connections are carried: one of the two is required,
/// so that plain TCP is always an explicit choice.
#[derive(ClapArgs, Debug)]
#[group(required = true, multiple = false)]
pub struct Transport {
    /// Mutual TLS 1.3: a directory holding ca.pem, cert.pem and key.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<String>,
    /// Plain TCP, unauthenticated and unencrypted (trusted networks only).
    #[arg(long)]
    pub no_tls: bool,
}

impl Transport {
    /// `(tls_dir, tls)` of a request.
    fn fields(&self) -> (Option<String>, Option<bool>) {
        match &self.tls_dir {
            Some(d) => (Some(d.clone()), None),
            None => (None, Some(false)),
        }
    }
}

/// `--policy` (the names of [`Policy`]).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PolicyArg {
    /// Pre-copy with a fixed downtime.
    Legacy,
    /// Pre-copy; the allowed downtime grows in steps at each stall (the
    /// VMM's default).
    MinimalDowntime,
    /// The downtime schedule, then auto-converge.
    SuspendWorkloadIfNeeded,
    /// Pre-copy until the first stall, then post-copy.
    PostCopy,
}

impl From<PolicyArg> for Policy {
    fn from(p: PolicyArg) -> Policy {
        match p {
            PolicyArg::Legacy => Policy::Legacy,
            PolicyArg::MinimalDowntime => Policy::MinimalDowntime,
            PolicyArg::SuspendWorkloadIfNeeded => Policy::SuspendWorkloadIfNeeded,
            PolicyArg::PostCopy => Policy::PostCopy,
        }
    }
}

/// `--technique` (the names of [`Technique`]).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TechniqueArg {
    /// Iterate while the guest runs, then stop and copy the rest (default).
    PreCopy,
    /// Start the guest on the destination now; pull the missing pages.
    PostCopy,
}

impl From<TechniqueArg> for Technique {
    fn from(t: TechniqueArg) -> Technique {
        match t {
            TechniqueArg::PreCopy => Technique::PreCopy,
            TechniqueArg::PostCopy => Technique::PostCopy,
        }
    }
}

/// The parameters that can also change while a migration runs
/// (`vm.migration-set-parameters`); each is sent only when given, and the
/// VMM keeps its current value otherwise (the defaults named are those of
/// a fresh VMM).
#[derive(ClapArgs, Debug, Default)]
pub struct LiveArgs {
    /// Convergence policy [VMM default: minimal-downtime].
    #[arg(long, value_enum)]
    pub policy: Option<PolicyArg>,
    /// Allowed downtime in milliseconds [VMM default: 300].
    #[arg(long)]
    pub downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s, 0 for none [VMM default: no cap].
    #[arg(long, value_name = "MIB_S")]
    pub max_bandwidth_mib_s: Option<f64>,
    /// Throttle the vCPUs when passes make no progress [VMM default: false].
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    pub auto_converge: Option<bool>,
    /// First throttle step, percent of vCPU time taken away [VMM default: 20].
    #[arg(long, value_name = "PERCENT")]
    pub throttle_initial_percent: Option<u32>,
    /// Throttle increase per further busy pass, percent [VMM default: 10].
    #[arg(long, value_name = "PERCENT")]
    pub throttle_increment_percent: Option<u32>,
    /// Highest throttle, percent [VMM default: 99].
    #[arg(long, value_name = "PERCENT")]
    pub throttle_max_percent: Option<u32>,
    /// Seconds without progress that count as one stall [VMM default: 5].
    #[arg(long, value_name = "S")]
    pub stall_limit_s: Option<u64>,
    /// Cancel the migration after this many seconds without progress, 0 for
    /// never [VMM default: never].
    #[arg(long, value_name = "S")]
    pub progress_timeout_s: Option<u64>,
    /// pre-copy, or post-copy (while running: switch to post-copy now)
    /// [VMM default: pre-copy].
    #[arg(long, value_enum)]
    pub technique: Option<TechniqueArg>,
}

impl LiveArgs {
    /// The parameters given, as a change.
    pub fn update(&self) -> ParametersUpdate {
        ParametersUpdate {
            policy: self.policy.map(Policy::from),
            downtime_ms: self.downtime_ms,
            max_bandwidth_mib_s: self.max_bandwidth_mib_s,
            auto_converge: self.auto_converge,
            throttle_initial_percent: self.throttle_initial_percent,
            throttle_increment_percent: self.throttle_increment_percent,
            throttle_max_percent: self.throttle_max_percent,
            stall_limit_s: self.stall_limit_s,
            progress_timeout_s: self.progress_timeout_s,
            technique: self.technique.map(Technique::from),
        }
    }
}

/// `--device-state`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DeviceStateArg {
    /// Multiplexed onto the data connections (default).
    Channels,
    /// Sequentially on the main connection during downtime.
    Main,
}

/// `--compression`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CompressionArg {
    /// RAM goes as is (default).
    None,
    /// Each RAM packet compressed with zstd in the writer threads.
    Zstd,
}

impl CompressionArg {
    /// The request's value.
    pub fn to_api(self) -> migration::api::Compression {
        match self {
            CompressionArg::None => migration::api::Compression::None,
            CompressionArg::Zstd => migration::api::Compression::Zstd,
        }
    }
}

/// How `--wait` reacts to Ctrl-C.
#[derive(ClapArgs, Debug, Default, Clone, Copy)]
pub struct WaitArgs {
    /// Wait for the end of the migration, showing progress (a bar on a
    /// terminal, plain lines otherwise, on stderr), then print the final
    /// status; the exit code tells how it ended.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: Ctrl-C cancels the migration at once (default: ask on
    /// a terminal; elsewhere stop waiting and let it go on).
    #[arg(long, requires = "wait")]
    pub cancel_on_interrupt: bool,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// GET vmm.ping: version and pid.
    Ping,
    /// GET vm.info: state, configuration, vCPUs, memory, devices.
    Info,
    /// PUT vm.pause.
    Pause,
    /// PUT vm.resume.
    Resume,
    /// PUT vm.shutdown: stop the VM.
    Shutdown,
    /// PUT vmm.shutdown: end the ferry process.
    ShutdownVmm,
    /// PUT vm.receive-migration: listen for an incoming VM.
    #[command(after_help = EPILOGUE)]
    ReceiveMigration {
        /// tcp:HOST:PORT to listen on, or unix:PATH (a destination on this host).
        #[arg(value_name = "URL")]
        url: String,
        /// The destination's one budget for device state in memory, in
        /// bytes (all devices and connections; 16 MiB to 4 GiB)
        /// [default: 67108864, 64 MiB].
        #[arg(long, value_name = "BYTES")]
        device_buffer_bytes: Option<u64>,
        #[command(flatten)]
        transport: Transport,
        /// Accept only a source certificate naming this subject (common
        /// name or DNS name); repeatable [default: any certificate of the
        /// CA].
        #[arg(long, value_name = "NAME", requires = "tls_dir")]
        tls_allow_subject: Vec<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// PUT vm.send-migration: migrate the VM to a receiving ferry.
    #[command(after_help = EPILOGUE)]
    SendMigration {
        /// tcp:HOST:PORT of the destination, or unix:PATH (same host: memory handover).
        #[arg(value_name = "URL")]
        url: String,
        /// Data connections: 1..=64, or `auto` (chosen from the outgoing
        /// link's speed and the vCPUs; the status says why) [default: 4].
        #[arg(long, value_parser = parse_connections, value_name = "N|auto")]
        connections: Option<Connections>,
        /// Resume a post-copy migration that lost its connections: reconnect
        /// to the destination (which must still be waiting) and finish.
        #[arg(long)]
        resume: bool,
        /// Accept devices that write guest memory by DMA and cannot log it:
        /// every populated page is re-sent after they stop (longer downtime).
        /// Without it such a migration is refused.
        #[arg(long)]
        allow_untracked_dma: bool,
        /// Send RAM with MSG_ZEROCOPY on every data connection (with TLS:
        /// the ciphertext buffers). Needs 4 MiB of locked memory per
        /// connection (RLIMIT_MEMLOCK) unless ferry has CAP_IPC_LOCK.
        #[arg(long)]
        zero_copy: bool,
        /// Compress RAM (the destination must support it) [default: none].
        #[arg(long, value_enum)]
        compression: Option<CompressionArg>,
        /// zstd level, 1 to 19 [default: 1].
        #[arg(long, value_name = "LEVEL", requires = "compression")]
        compression_level: Option<i64>,
        #[command(flatten)]
        live: LiveArgs,
        /// Deprecated alias of --max-bandwidth-mib-s (the value is MiB/s).
        #[arg(long, hide = true, conflicts_with = "max_bandwidth_mib_s")]
        max_bandwidth_mbps: Option<f64>,
        /// Give up after this many seconds; the source then runs on
        /// [default: 3600].
        #[arg(long, value_name = "S")]
        timeout_s: Option<u64>,
        /// Where device state travels [default: channels].
        #[arg(long, value_enum)]
        device_state: Option<DeviceStateArg>,
        /// Do not pre-copy device state [default: pre-copy it].
        #[arg(long)]
        no_device_precopy: bool,
        /// Device chunk size in bytes, 4096 to 16 MiB [default: 1048576,
        /// 1 MiB].
        #[arg(long, value_name = "BYTES")]
        device_chunk_bytes: Option<u64>,
        #[command(flatten)]
        transport: Transport,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// GET vm.migration: progress or result of the last migration.
    MigrationStatus {
        /// Print a CSV time series (one row per sample, header with units)
        /// until the migration ends, instead of one JSON status.
        #[arg(long)]
        csv: bool,
        /// With --csv: the sampling interval in milliseconds (10 to 60000).
        #[arg(long, default_value_t = 500, value_name = "MS", requires = "csv",
              value_parser = clap::value_parser!(u64).range(10..=60_000))]
        interval_ms: u64,
    },
    /// PUT vm.migration-cancel.
    MigrationCancel,
    /// PUT vm.migration-set-parameters: change the running migration (or
    /// the defaults of the next one).
    MigrationSet {
        #[command(flatten)]
        live: LiveArgs,
    },
    /// GET vm.migration-parameters: the effective parameters.
    MigrationParameters,
    /// GET vm.events: print the VMM's events as JSON lines, following new
    /// ones until interrupted.
    Events {
        /// Start at this event number [default: the oldest kept].
        #[arg(long, conflicts_with = "now")]
        since: Option<u64>,
        /// Only events from now on.
        #[arg(long)]
        now: bool,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        once: bool,
    },
    /// Print the shell completion script of ferry-remote (install: see the
    /// README, "Command line").
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the man page of ferry-remote and its subcommands (roff; view
    /// with `ferry-remote man | man -l -`).
    Man,
}

/// `--connections`: `auto` or a number of data connections (the VMM
/// checks the range and names it in its error).
fn parse_connections(s: &str) -> Result<Connections, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Connections::Auto);
    }
    s.parse::<u32>()
        .map(Connections::Count)
        .map_err(|_| format!("{s:?} is neither a number of connections nor \"auto\""))
}

/// The body of `vm.send-migration` for `send-migration`'s arguments.
#[allow(clippy::too_many_arguments)]
pub fn send_params(
    url: &str,
    connections: Option<Connections>,
    resume: bool,
    live: &LiveArgs,
    max_bandwidth_mbps: Option<f64>,
    timeout_s: Option<u64>,
    device_state: Option<DeviceStateArg>,
    no_device_precopy: bool,
    device_chunk_bytes: Option<u64>,
    transport: &Transport,
) -> SendParams {
    let mut p = SendParams::to(url);
    let u = live.update();
    let (tls_dir, tls) = transport.fields();
    p.tls_dir = tls_dir;
    p.tls = tls;
    if let Some(c) = connections {
        p.connections = c;
    }
    p.resume = resume;
    p.policy = u.policy;
    p.downtime_ms = u.downtime_ms;
    p.max_bandwidth_mib_s = u.max_bandwidth_mib_s.or(max_bandwidth_mbps);
    p.auto_converge = u.auto_converge;
    p.throttle_initial_percent = u.throttle_initial_percent;
    p.throttle_increment_percent = u.throttle_increment_percent;
    p.throttle_max_percent = u.throttle_max_percent;
    p.stall_limit_s = u.stall_limit_s;
    p.progress_timeout_s = u.progress_timeout_s;
    p.technique = u.technique;
    if let Some(t) = timeout_s {
        p.timeout_s = t;
    }
    if let Some(d) = device_state {
        p.device_state = match d {
            DeviceStateArg::Channels => DeviceStateMode::Channels,
            DeviceStateArg::Main => DeviceStateMode::Main,
        };
    }
    p.device_precopy = !no_device_precopy;
    if let Some(c) = device_chunk_bytes {
        p.device_chunk_bytes = c;
    }
    p
}

/// The body of `vm.receive-migration` for `receive-migration`'s arguments.
pub fn receive_params(
    url: &str,
    device_buffer_bytes: Option<u64>,
    transport: &Transport,
    tls_allow_subject: &[String],
) -> ReceiveParams {
    let (tls_dir, tls) = transport.fields();
    ReceiveParams {
        receiver_url: url.to_string(),
        device_buffer_bytes,
        tls_dir,
        tls,
        tls_allowed_subjects: tls_allow_subject.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use migration::api::{MigrationParameters, DEFAULT_DEVICE_BUFFER};

    fn help_of(sub: &str) -> String {
        let mut cmd = Args::command();
        cmd.build();
        cmd.find_subcommand_mut(sub)
            .unwrap_or_else(|| panic!("no subcommand {sub}"))
            .render_long_help()
            .to_string()
    }

    #[test]
    fn definitions_are_consistent() {
        Args::command().debug_assert();
    }

    /// The defaults `--help` names are the crate's.
    #[test]
    fn help_shows_the_defaults() {
        let send = help_of("send-migration");
        let d = SendParams::to("tcp:x:1");
        let p = MigrationParameters::default();
        for want in [
            format!("[default: {}]", d.connections),
            format!("[default: {}]", d.timeout_s),
            format!("[default: {}, 1 MiB]", d.device_chunk_bytes),
            "[default: channels]".to_string(),
            format!("[VMM default: {}]", p.downtime_ms),
            format!("[VMM default: {}]", p.throttle_initial_percent),
            format!("[VMM default: {}]", p.throttle_increment_percent),
            format!("[VMM default: {}]", p.throttle_max_percent),
            format!("[VMM default: {}]", p.stall_limit_s),
            format!("[VMM default: {}]", p.auto_converge),
            "[VMM default: minimal-downtime]".to_string(),
            "[VMM default: pre-copy]".to_string(),
            "[VMM default: no cap]".to_string(),
            "[VMM default: never]".to_string(),
        ] {
            assert!(send.contains(&want), "{want:?} missing:\n{send}");
        }
        assert_eq!(p.policy, Policy::MinimalDowntime);
        assert_eq!(p.technique, Technique::PreCopy);
        assert_eq!(d.device_state, DeviceStateMode::Channels);
        let recv = help_of("receive-migration");
        assert!(
            recv.contains(&format!("[default: {DEFAULT_DEVICE_BUFFER}, 64 MiB]")),
            "{recv}"
        );
        let status = help_of("migration-status");
        assert!(status.contains("[default: 500]"), "{status}");
    }

    #[test]
    fn requests_use_the_crate_types() {
        let a = Args::try_parse_from([
            "ferry-remote",
            "--api-socket",
            "/s",
            "send-migration",
            "tcp:127.0.0.1:1",
            "--no-tls",
            "--connections",
            "auto",
            "--downtime-ms",
            "50",
            "--policy",
            "post-copy",
            "--no-device-precopy",
            "--compression",
            "zstd",
            "--compression-level",
            "3",
        ])
        .unwrap();
        let Cmd::SendMigration {
            url,
            connections,
            resume,
            live,
            max_bandwidth_mbps,
            timeout_s,
            device_state,
            no_device_precopy,
            device_chunk_bytes,
            transport,
            compression,
            compression_level,
            ..
        } = &a.cmd
        else {
            panic!("{a:?}")
        };
        assert!(matches!(compression, Some(CompressionArg::Zstd)));
        assert_eq!(*compression_level, Some(3));
        let p = send_params(
            url,
            *connections,
            *resume,
            live,
            *max_bandwidth_mbps,
            *timeout_s,
            *device_state,
            *no_device_precopy,
            *device_chunk_bytes,
            transport,
        );
        assert_eq!(p.connections, Connections::Auto);
        assert_eq!(p.downtime_ms, Some(50));
        assert_eq!(p.policy, Some(Policy::PostCopy));
        assert_eq!(p.tls, Some(false));
        assert!(!p.device_precopy);
        p.validate().unwrap();
        // What goes on the wire reads back as the same request.
        let back: SendParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
    }
}
