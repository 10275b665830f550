//! Command line of `ferry`: parsing (clap) and validation into a [`VmmConfig`].
//!
//! Everything that can be checked before a VM exists is checked here, so that
//! bad input is refused with one clear line before anything starts.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::Parser;
use devices::options::{KeyValues, OptionError};
use serde::{Deserialize, Serialize};

/// Default guest memory size (512 MiB).
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Smallest guest memory accepted (what the boot layout needs).
pub const MIN_MEMORY: u64 = arch::layout::MIN_MEM_SIZE;
/// Largest guest memory accepted.
pub const MAX_MEMORY: u64 = arch::layout::MAX_MEM_SIZE;
/// Largest vCPU count accepted (APIC ids 0..=254; 255 is broadcast).
pub const MAX_CPUS: u8 = 254;
/// Kernel command line used when `--cmdline` is not given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Raw command line of `ferry`, as clap parses it.
///
/// Invariant: fields hold the strings exactly as given; nothing is validated
/// until [`VmmConfig::from_cli`].
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a minimal KVM VMM built for live migration",
    long_about = None
)]
pub struct Cli {
    /// Logging: `-v`/`-vv`/`-vvv` and `--log-file` (under their own
    /// heading in `--help`).
    #[command(flatten)]
    pub log: crate::logging::LogArgs,
    /// Guest kernel: PVH ELF or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk loaded after the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// vCPUs: `boot=N` (default 1).
    #[arg(long, value_name = "boot=N")]
    pub cpus: Option<String>,
    /// Guest memory: `size=SIZE[,shared=on][,file=PATH][,prefault=on]` (default 512M).
    /// Without --kernel: the size and backing of an incoming VM's memory.
    #[arg(long, value_name = "size=SIZE[,..]")]
    pub memory: Option<String>,
    /// Serial console (COM1): `tty`, `off` or `file=PATH` (default tty).
    #[arg(long, value_name = "tty|off|file=PATH")]
    pub serial: Option<String>,
    /// UNIX socket of the HTTP API.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Simulated VFIO device with migratable state (repeatable). Without
    /// --kernel: a device this VMM accepts from an incoming migration.
    #[arg(long, value_name = "id=..,state=..")]
    pub sim_vfio: Vec<String>,
    /// Kernel VFIO device (repeatable; like --sim-vfio without --kernel).
    #[arg(long, value_name = "path=..")]
    pub vfio: Vec<String>,
    /// Directory where this host's running migrations register (one locked
    /// file each) to share the host's bandwidth (default
    /// /run/ferry/migrations).
    #[arg(long, value_name = "DIR")]
    pub migration_registry: Option<PathBuf>,
    /// Bandwidth in MiB/s shared by all migrations of this host: each gets
    /// it divided by the migrations on the busier of its two hosts, at
    /// least 8 MiB/s (default: no sharing).
    #[arg(long, value_name = "MIB_S")]
    pub host_migration_bandwidth_mib_s: Option<f64>,
    /// Exit once a sent VM's migration completed: after the first
    /// `vm.migration` read that reports it, or 1.5 s after completion
    /// (default: keep serving the API in the `migrated` state until
    /// `vmm.shutdown`).
    #[arg(long)]
    pub exit_after_migration: bool,
}

/// Errors of command-line validation. All of them end `ferry` with exit code 2.
///
/// Invariant: the display text is one line that names the offending option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// An option's value could not be parsed.
    #[error("invalid {option} '{value}': {reason}")]
    Invalid {
        /// The option (`--memory`, ...).
        option: &'static str,
        /// The value as given.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// Options that do not fit together.
    #[error("{0}")]
    Conflict(String),
    /// A file named on the command line is unusable.
    #[error("{what} '{path}': {reason}")]
    File {
        /// What the file is for (`kernel`, ...).
        what: &'static str,
        /// The path as given.
        path: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The host cannot back the requested memory.
    #[error("{0}")]
    HostMemory(String),
}

/// Where guest memory comes from.
///
/// Invariant: `File` holds a path that existed and was large enough when
/// the configuration was validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryBacking {
    /// Private anonymous memory (MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE).
    Anonymous,
    /// A memfd mapped MAP_SHARED (`shared=on`).
    Shared,
    /// A host file mapped MAP_SHARED (`file=PATH`).
    File(PathBuf),
}

impl MemoryBacking {
    /// Short name for logs and the API (`anonymous`, `shared`, `file`).
    pub fn kind(&self) -> &'static str {
        match self {
            MemoryBacking::Anonymous => "anonymous",
            MemoryBacking::Shared => "shared",
            MemoryBacking::File(_) => "file",
        }
    }
}

/// Parsed `--memory`.
///
/// Invariant: `size` is a multiple of 4 KiB and at least [`MIN_MEMORY`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryConfig {
    /// Total guest RAM in bytes.
    pub size: u64,
    /// Backing kind.
    pub backing: MemoryBacking,
    /// Fault all memory in at start.
    pub prefault: bool,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            size: DEFAULT_MEMORY,
            backing: MemoryBacking::Anonymous,
            prefault: false,
        }
    }
}

/// Parsed `--serial`.
///
/// Invariant: a `File` path was openable for writing at validation time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialConfig {
    /// Guest output goes to our stdout.
    Tty,
    /// Guest output is dropped.
    Off,
    /// Guest output is appended to this file (created if missing), so a
    /// migrated guest continues the same log.
    File(PathBuf),
}

/// What to boot.
///
/// Invariant: `kernel` (and `initramfs` if set) were readable at validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootConfig {
    /// Kernel image path.
    pub kernel: PathBuf,
    /// Initramfs path.
    pub initramfs: Option<PathBuf>,
    /// Command line handed to the kernel.
    pub cmdline: String,
}

/// The validated configuration of one `ferry` process.
///
/// Invariant: produced only by [`VmmConfig::from_cli`] (or tests); either
/// `boot` or `api_socket` is set; `cpus` is in `1..=MAX_CPUS`;
/// `host_migration_bandwidth_mib_s` is within
/// [`migration::live::LIMIT_MAX_BANDWIDTH_MIB_S`].
#[derive(Debug, Clone, PartialEq)]
pub struct VmmConfig {
    /// Kernel to boot at start; `None` for an API-only VMM (e.g. a migration destination).
    pub boot: Option<BootConfig>,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Guest memory.
    pub memory: MemoryConfig,
    /// Whether `--memory` was given (a destination then accepts only a
    /// guest of exactly that size, in that backing).
    pub memory_explicit: bool,
    /// Serial console; `None` when not given (tty, for a booted or a
    /// received VM alike).
    pub serial: Option<SerialConfig>,
    /// API socket path.
    pub api_socket: Option<PathBuf>,
    /// Raw `--sim-vfio` arguments, in order: the VM's devices, or on a
    /// VMM without `--kernel` the devices it accepts from an incoming VM.
    pub sim_vfio: Vec<String>,
    /// Raw `--vfio` arguments, in order (like `sim_vfio`).
    pub vfio: Vec<String>,
    /// The registry of this host's running migrations.
    pub migration_registry: PathBuf,
    /// The bandwidth all migrations of this host share, MiB/s (`None`: no
    /// sharing).
    pub host_migration_bandwidth_mib_s: Option<f64>,
    /// `--exit-after-migration`: a source whose send completed exits on its
    /// own (see [`crate::controller::EXIT_GRACE`]) instead of waiting in
    /// the `migrated` state for `vmm.shutdown`.
    pub exit_after_migration: bool,
}

/// Keys of `--memory` (a bare value is the size: `--memory 1G`).
const MEMORY_KEYS: &[&str] = &["size", "shared", "file", "prefault"];

/// Parses the value of `--memory` (syntax only; host checks are separate).
/// Grammar of the list and of sizes: [`devices::options`].
pub fn parse_memory(value: &str) -> Result<MemoryConfig, ConfigError> {
    let err = |reason: String| ConfigError::Invalid {
        option: "--memory",
        value: value.to_string(),
        reason,
    };
    let opt = |e: OptionError| err(e.to_string());
    let kv = KeyValues::parse(value, MEMORY_KEYS, Some("size")).map_err(opt)?;
    let size = kv.size("size").map_err(opt)?.unwrap_or(DEFAULT_MEMORY);
    let shared = kv.flag("shared").map_err(opt)?.unwrap_or(false);
    let prefault = kv.flag("prefault").map_err(opt)?.unwrap_or(false);
    let file = kv.get("file").map(PathBuf::from);
    if size < MIN_MEMORY {
        return Err(err(format!(
            "size must be at least {} MiB",
            MIN_MEMORY >> 20
        )));
    }
    if size > MAX_MEMORY {
        return Err(err(format!(
            "size must be at most {} GiB",
            MAX_MEMORY >> 30
        )));
    }
    if !size.is_multiple_of(4096) {
        return Err(err("size must be a multiple of 4 KiB".into()));
    }
    let backing = match (shared, file) {
        (true, Some(_)) => return Err(err("shared=on and file= exclude each other".into())),
        (true, None) => MemoryBacking::Shared,
        (false, Some(f)) => MemoryBacking::File(f),
        (false, None) => MemoryBacking::Anonymous,
    };
    Ok(MemoryConfig {
        size,
        backing,
        prefault,
    })
}

/// Parses the value of `--serial`: `tty` (or `stdout`), `off` (or `null`,
/// `none`), or the list `file=PATH` ([`devices::options`]).
pub fn parse_serial(value: &str) -> Result<SerialConfig, ConfigError> {
    const EXPECTED: &str = "expected tty, off or file=PATH";
    let err = |reason: String| ConfigError::Invalid {
        option: "--serial",
        value: value.to_string(),
        reason,
    };
    match value {
        "tty" | "stdout" => Ok(SerialConfig::Tty),
        "off" | "null" | "none" => Ok(SerialConfig::Off),
        _ if !value.contains('=') => Err(err(EXPECTED.into())),
        _ => {
            let kv = KeyValues::parse(value, &["file"], None)
                .map_err(|e| err(format!("{e} ({EXPECTED})")))?;
            let path = kv
                .required("file")
                .map_err(|e| err(format!("{e} ({EXPECTED})")))?;
            Ok(SerialConfig::File(PathBuf::from(path)))
        }
    }
}

/// Parses the value of `--cpus` (`boot=N` or `N`; [`devices::options`]).
pub fn parse_cpus(value: &str) -> Result<u8, ConfigError> {
    let err = |reason: String| ConfigError::Invalid {
        option: "--cpus",
        value: value.to_string(),
        reason,
    };
    let opt = |e: OptionError| err(e.to_string());
    let kv = KeyValues::parse(value, &["boot"], Some("boot")).map_err(opt)?;
    let n = kv
        .number("boot")
        .map_err(opt)?
        .ok_or_else(|| err("expected boot=N".into()))?;
    if n == 0 {
        return Err(err("boot must be at least 1".into()));
    }
    u8::try_from(n)
        .ok()
        .filter(|&n| n <= MAX_CPUS)
        .ok_or_else(|| err(format!("boot must be at most {MAX_CPUS}")))
}

fn check_readable(what: &'static str, path: &Path) -> Result<(), ConfigError> {
    let ferr = |reason: String| ConfigError::File {
        what,
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| ferr(e.to_string()))?;
    if meta.is_dir() {
        return Err(ferr("is a directory".into()));
    }
    File::open(path).map_err(|e| ferr(e.to_string()))?;
    Ok(())
}

/// Host memory that can back anonymous guest memory: MemTotal + SwapTotal
/// from `/proc/meminfo`, in bytes. `None` if it cannot be read.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

/// Parses MemTotal + SwapTotal (kB) out of `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        kb.checked_mul(1024)
    };
    let mem = field("MemTotal:")?;
    Some(mem.saturating_add(field("SwapTotal:").unwrap_or(0)))
}

/// Checks that the host can back `mem` (memory size vs. host RAM, or the
/// size of the backing file).
pub fn check_host_memory(mem: &MemoryConfig) -> Result<(), ConfigError> {
    match &mem.backing {
        MemoryBacking::File(path) => {
            let ferr = |reason: String| ConfigError::File {
                what: "memory file",
                path: path.display().to_string(),
                reason,
            };
            let meta = std::fs::metadata(path).map_err(|e| ferr(e.to_string()))?;
            if !meta.is_file() && !meta.file_type().is_block_device() {
                return Err(ferr("is not a regular file".into()));
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| ferr(format!("cannot open read-write: {e}")))?;
            if meta.is_file() && meta.len() < mem.size {
                return Err(ferr(format!(
                    "file is {} bytes, smaller than the memory size {} bytes",
                    meta.len(),
                    mem.size
                )));
            }
            Ok(())
        }
        _ => {
            if let Some(host) = host_memory_bytes() {
                if mem.size > host {
                    return Err(ConfigError::HostMemory(format!(
                        "memory size {} MiB is larger than the host can back ({} MiB of RAM + swap)",
                        mem.size >> 20,
                        host >> 20
                    )));
                }
            }
            Ok(())
        }
    }
}

/// Checks an API socket path: it may not exist, or be a stale socket (which
/// is removed); anything else is refused.
pub fn check_api_socket(path: &Path) -> Result<(), ConfigError> {
    let ferr = |reason: String| ConfigError::File {
        what: "API socket",
        path: path.display().to_string(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ferr(e.to_string())),
        Ok(meta) => {
            if !meta.file_type().is_socket() {
                return Err(ferr("exists and is not a socket".into()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ferr("is in use by a running process".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| ferr(format!("cannot remove stale socket: {e}")))?;
        }
    }
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => {
            Err(ferr("its directory does not exist".into()))
        }
        _ => Ok(()),
    }
}

impl VmmConfig {
    /// Validates a parsed command line: syntax of every option, files,
    /// host memory, API socket. Stale API sockets are removed.
    pub fn from_cli(cli: &Cli) -> Result<VmmConfig, ConfigError> {
        let cfg = Self::parse(cli)?;
        if let Some(boot) = &cfg.boot {
            check_readable("kernel", &boot.kernel)?;
            if let Some(i) = &boot.initramfs {
                check_readable("initramfs", i)?;
            }
        }
        if cfg.boot.is_some() || cfg.memory_explicit {
            check_host_memory(&cfg.memory)?;
        }
        if let Some(SerialConfig::File(p)) = &cfg.serial {
            if let Some(dir) = p.parent() {
                if !dir.as_os_str().is_empty() && !dir.is_dir() {
                    return Err(ConfigError::File {
                        what: "serial file",
                        path: p.display().to_string(),
                        reason: "its directory does not exist".into(),
                    });
                }
            }
        }
        if let Some(sock) = &cfg.api_socket {
            check_api_socket(sock)?;
        }
        Ok(cfg)
    }

    /// The syntactic part of [`VmmConfig::from_cli`]: no file system access.
    pub fn parse(cli: &Cli) -> Result<VmmConfig, ConfigError> {
        let memory_explicit = cli.memory.is_some();
        let memory = match &cli.memory {
            Some(m) => parse_memory(m)?,
            None => MemoryConfig::default(),
        };
        let cpus = match &cli.cpus {
            Some(c) => parse_cpus(c)?,
            None => 1,
        };
        let serial = cli.serial.as_deref().map(parse_serial).transpose()?;
        let boot = match &cli.kernel {
            Some(k) => Some(BootConfig {
                kernel: k.clone(),
                initramfs: cli.initramfs.clone(),
                cmdline: cli
                    .cmdline
                    .clone()
                    .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
            }),
            None => {
                let mut extra = Vec::new();
                if cli.initramfs.is_some() {
                    extra.push("--initramfs");
                }
                if cli.cmdline.is_some() {
                    extra.push("--cmdline");
                }
                if cli.cpus.is_some() {
                    extra.push("--cpus");
                }
                if !extra.is_empty() {
                    return Err(ConfigError::Conflict(format!(
                        "{} requires --kernel",
                        extra.join(", ")
                    )));
                }
                if cli.api_socket.is_none() {
                    return Err(ConfigError::Conflict(
                        "nothing to do: give --kernel PATH to boot a VM and/or --api-socket PATH"
                            .into(),
                    ));
                }
                None
            }
        };
        if let Some(b) = &boot {
            if b.cmdline.contains('\0') {
                return Err(ConfigError::Invalid {
                    option: "--cmdline",
                    value: b.cmdline.escape_default().to_string(),
                    reason: "contains a NUL byte".into(),
                });
            }
        }
        if let Some(b) = cli.host_migration_bandwidth_mib_s {
            migration::live::LIMIT_MAX_BANDWIDTH_MIB_S
                .check_float(b)
                .map_err(|e| ConfigError::Invalid {
                    option: "--host-migration-bandwidth-mib-s",
                    value: b.to_string(),
                    reason: e.to_string(),
                })?;
        }
        if cli
            .migration_registry
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return Err(ConfigError::Invalid {
                option: "--migration-registry",
                value: String::new(),
                reason: "an empty path".into(),
            });
        }
        Ok(VmmConfig {
            boot,
            cpus,
            memory,
            memory_explicit,
            serial,
            api_socket: cli.api_socket.clone(),
            sim_vfio: cli.sim_vfio.clone(),
            vfio: cli.vfio.clone(),
            migration_registry: cli
                .migration_registry
                .clone()
                .unwrap_or_else(|| PathBuf::from(crate::host::DEFAULT_REGISTRY)),
            host_migration_bandwidth_mib_s: cli.host_migration_bandwidth_mib_s,
            exit_after_migration: cli.exit_after_migration,
        })
    }
}

/// Turns a clap error into the single line `ferry` prints (without the
/// `ferry: error: ` prefix): the first line of clap's message, minus its
/// own `error: ` prefix and usage hints.
pub fn clap_error_line(err: &clap::Error) -> String {
    let rendered = err.to_string();
    let first = rendered
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("invalid command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let mut line = first.to_string();
    // "the following required arguments were not provided:" lists the
    // names on the next lines: keep them on this one.
    if line.ends_with(':') {
        let names: Vec<&str> = rendered
            .lines()
            .map(str::trim)
            .skip_while(|l| !l.ends_with(':'))
            .skip(1)
            .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
            .collect();
        if !names.is_empty() {
            line.push(' ');
            line.push_str(&names.join(", "));
        }
    }
    // Add clap's "tip" when it names a close match, still on the same line.
    if let Some(tip) = rendered
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("tip:"))
    {
        line.push_str(&format!(" ({tip})"));
    }
    line
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
