//! `ferry-remote`: talks to a `ferry` API socket and prints the JSON answer.
//!
//! Exit codes: 0 on success; 1 when the VMM answered with an error or
//! could not be reached (or, with `send-migration --wait`, when the
//! migration did not complete); 2 for a bad command line.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args as ClapArgs, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};
use vmm::client::{request, ApiResponse};

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser, Debug)]
#[command(
    name = "ferry-remote",
    version,
    about = "Control a ferry VMM through its API socket"
)]
struct Args {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How the migration connections are carried: one of the two is required,
/// so that plain TCP is always an explicit choice.
#[derive(ClapArgs, Debug)]
#[group(required = true, multiple = false)]
struct Transport {
    /// Mutual TLS 1.3: a directory holding ca.pem, cert.pem and key.pem.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<String>,
    /// Plain TCP, unauthenticated and unencrypted (trusted networks only).
    #[arg(long)]
    no_tls: bool,
}

impl Transport {
    fn apply(&self, body: &mut Value) {
        match &self.tls_dir {
            Some(d) => body["tls_dir"] = json!(d),
            None => body["tls"] = json!(false),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PolicyArg {
    /// Pre-copy with a fixed downtime.
    Legacy,
    /// Pre-copy; the allowed downtime grows in steps at each stall.
    MinimalDowntime,
    /// The downtime schedule, then auto-converge.
    SuspendWorkloadIfNeeded,
    /// Pre-copy until the first stall, then post-copy.
    PostCopy,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum TechniqueArg {
    /// Iterate while the guest runs, then stop and copy the rest.
    PreCopy,
    /// Start the guest on the destination now; pull the missing pages.
    PostCopy,
}

/// The parameters that can also change while a migration runs
/// (`vm.migration-set-parameters`); each is sent only when given.
#[derive(ClapArgs, Debug, Default)]
struct LiveArgs {
    /// Convergence policy.
    #[arg(long, value_enum)]
    policy: Option<PolicyArg>,
    /// Allowed downtime in milliseconds.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Bandwidth cap in MiB/s (0: no cap).
    #[arg(long, value_name = "MIB_S")]
    max_bandwidth_mib_s: Option<f64>,
    /// Throttle the vCPUs when passes make no progress (true/false).
    #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
    auto_converge: Option<bool>,
    /// First throttle step, percent of vCPU time taken away.
    #[arg(long, value_name = "PERCENT")]
    throttle_initial_percent: Option<u32>,
    /// Throttle increase per further busy pass, percent.
    #[arg(long, value_name = "PERCENT")]
    throttle_increment_percent: Option<u32>,
    /// Highest throttle, percent.
    #[arg(long, value_name = "PERCENT")]
    throttle_max_percent: Option<u32>,
    /// Seconds without progress that count as one stall.
    #[arg(long, value_name = "S")]
    stall_limit_s: Option<u64>,
    /// Cancel the migration after this many seconds without progress
    /// (0: never).
    #[arg(long, value_name = "S")]
    progress_timeout_s: Option<u64>,
    /// pre-copy, or post-copy (while running: switch to post-copy now).
    #[arg(long, value_enum)]
    technique: Option<TechniqueArg>,
}

impl LiveArgs {
    /// Adds the given fields to `body`.
    fn apply(&self, body: &mut Value) {
        if let Some(p) = self.policy {
            body["policy"] = json!(match p {
                PolicyArg::Legacy => "legacy",
                PolicyArg::MinimalDowntime => "minimal-downtime",
                PolicyArg::SuspendWorkloadIfNeeded => "suspend-workload-if-needed",
                PolicyArg::PostCopy => "post-copy",
            });
        }
        if let Some(t) = self.technique {
            body["technique"] = json!(match t {
                TechniqueArg::PreCopy => "pre-copy",
                TechniqueArg::PostCopy => "post-copy",
            });
        }
        let mut set = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                body[k] = v;
            }
        };
        set("downtime_ms", self.downtime_ms.map(|v| json!(v)));
        set(
            "max_bandwidth_mib_s",
            self.max_bandwidth_mib_s.map(|v| json!(v)),
        );
        set("auto_converge", self.auto_converge.map(|v| json!(v)));
        for (k, v) in [
            ("throttle_initial_percent", self.throttle_initial_percent),
            (
                "throttle_increment_percent",
                self.throttle_increment_percent,
            ),
            ("throttle_max_percent", self.throttle_max_percent),
        ] {
            set(k, v.map(|v| json!(v)));
        }
        set("stall_limit_s", self.stall_limit_s.map(|v| json!(v)));
        set(
            "progress_timeout_s",
            self.progress_timeout_s.map(|v| json!(v)),
        );
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceState {
    Channels,
    Main,
}

#[derive(Subcommand, Debug)]
enum Cmd {
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
    ReceiveMigration {
        /// tcp:HOST:PORT to listen on.
        url: String,
        /// The destination's one budget for device state in memory, in
        /// bytes (all devices and connections; 16 MiB to 4 GiB).
        #[arg(long)]
        device_buffer_bytes: Option<u64>,
        #[command(flatten)]
        transport: Transport,
        /// Accept only a source certificate naming this subject (common
        /// name or DNS name); repeatable.
        #[arg(long, value_name = "NAME", requires = "tls_dir")]
        tls_allow_subject: Vec<String>,
    },
    /// PUT vm.send-migration: migrate the VM to a receiving ferry.
    SendMigration {
        /// tcp:HOST:PORT of the destination.
        url: String,
        /// Data connections: 1..=64, or `auto` (chosen from the outgoing
        /// link's speed and the vCPUs; the status says why).
        #[arg(long, value_parser = parse_connections)]
        connections: Option<Value>,
        /// Resume a post-copy migration that lost its connections: reconnect
        /// to the destination (which must still be waiting) and finish.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        live: LiveArgs,
        /// Deprecated alias of --max-bandwidth-mib-s (the value is MiB/s).
        #[arg(long, hide = true, conflicts_with = "max_bandwidth_mib_s")]
        max_bandwidth_mbps: Option<f64>,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout_s: Option<u64>,
        /// Where device state travels.
        #[arg(long, value_enum)]
        device_state: Option<DeviceState>,
        /// Do not pre-copy device state.
        #[arg(long)]
        no_device_precopy: bool,
        /// Device chunk size in bytes.
        #[arg(long)]
        device_chunk_bytes: Option<u64>,
        #[command(flatten)]
        transport: Transport,
        /// Wait for the end of the migration, showing progress; exit 0 only
        /// if it completed.
        #[arg(long)]
        wait: bool,
    },
    /// GET vm.migration: progress or result of the last migration.
    MigrationStatus,
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
        /// Start at this event number (default: the oldest kept).
        #[arg(long, conflicts_with = "now")]
        since: Option<u64>,
        /// Only events from now on.
        #[arg(long)]
        now: bool,
        /// Print what is there and exit instead of following.
        #[arg(long)]
        once: bool,
    },
}

/// `--connections`: `auto` or a number of data connections (the VMM
/// checks the range and names it in its error).
fn parse_connections(s: &str) -> Result<Value, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(json!("auto"));
    }
    s.parse::<u32>()
        .map(|n| json!(n))
        .map_err(|_| format!("{s:?} is neither a number of connections nor \"auto\""))
}

/// One long poll of `vm.events` lasts at most this long.
const EVENTS_POLL_S: u64 = 30;

/// Prints events from `since` (or `now`), following with long polls.
fn follow_events(args: &Args, since: Option<u64>, now: bool, once: bool) -> Result<()> {
    let mut from = match (since, now) {
        (Some(n), _) => n.to_string(),
        (None, true) => "now".to_string(),
        (None, false) => "1".to_string(),
    };
    let wait = if once { 1 } else { EVENTS_POLL_S };
    let mut out = std::io::stdout();
    loop {
        let target = format!("/api/v1/vm.events?since={from}&wait_s={wait}");
        let r = vmm::client::request_target(
            &args.api_socket,
            "GET",
            &target,
            None,
            Duration::from_secs(wait + 10),
        )
        .map_err(|e| anyhow!(e))?;
        let r = checked(r)?;
        for line in r.body.lines().filter(|l| !l.trim().is_empty()) {
            writeln!(out, "{line}")?;
            let v: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            if let Some(seq) = v.get("seq").and_then(Value::as_u64) {
                from = (seq + 1).to_string();
            }
        }
        out.flush()?;
        if once {
            return Ok(());
        }
    }
}

fn call(args: &Args, method: &str, endpoint: &str, body: Option<&Value>) -> Result<ApiResponse> {
    let body = body.map(Value::to_string);
    request(&args.api_socket, method, endpoint, body.as_deref(), TIMEOUT).map_err(|e| anyhow!(e))
}

fn print_body(r: &ApiResponse) {
    let text = match serde_json::from_str::<Value>(&r.body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.body.clone()),
        Err(_) => r.body.trim().to_string(),
    };
    if !text.is_empty() {
        println!("{text}");
    }
}

fn checked(r: ApiResponse) -> Result<ApiResponse> {
    if r.is_success() {
        Ok(r)
    } else {
        bail!("{} (HTTP {})", r.error_message(), r.status)
    }
}

fn mib(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

fn progress_text(v: &Value) -> String {
    let state = v.get("state").and_then(Value::as_str).unwrap_or("?");
    let iter = v.get("iteration").and_then(Value::as_u64).unwrap_or(0);
    format!(
        "{state}: pass {iter}, {:.0}/{:.0} MiB sent, {:.0} MiB left, {:.0} MiB/s, dirtying {:.0} MiB/s",
        mib(v, "transferred_bytes"),
        mib(v, "total_bytes"),
        mib(v, "remaining_bytes"),
        mib(v, "throughput_bps"),
        mib(v, "dirty_rate_bps"),
    )
}

fn bar(v: &Value) -> String {
    let total = v.get("total_bytes").and_then(Value::as_u64).unwrap_or(0);
    let remaining = v
        .get("remaining_bytes")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let frac = if total == 0 {
        0.0
    } else {
        (1.0 - remaining as f64 / total as f64).clamp(0.0, 1.0)
    };
    let width = 30;
    let filled = (frac * width as f64).round() as usize;
    format!(
        "[{}{}] {:3.0}% {}",
        "#".repeat(filled),
        ".".repeat(width - filled),
        frac * 100.0,
        progress_text(v)
    )
}

fn wait_for_migration(args: &Args) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let mut err = std::io::stderr();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut last_iter = u64::MAX;
    loop {
        let r = call(args, "GET", "vm.migration", None)
            .context("lost contact with the source VMM while waiting for the migration")?;
        let r = checked(r)?;
        let v: Value = serde_json::from_str(&r.body).context("unreadable vm.migration answer")?;
        let state = v
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        let iter = v.get("iteration").and_then(Value::as_u64).unwrap_or(0);
        if tty {
            let _ = write!(err, "\r\x1b[K{}", bar(&v));
            let _ = err.flush();
        } else if iter != last_iter || last_line.elapsed() >= Duration::from_secs(1) {
            let _ = writeln!(err, "{}", progress_text(&v));
            last_line = Instant::now();
            last_iter = iter;
        }
        match state.as_str() {
            "completed" | "failed" | "cancelled" => {
                if tty {
                    let _ = writeln!(err);
                }
                println!(
                    "{}",
                    serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.body.clone())
                );
                if state == "completed" {
                    return Ok(());
                }
                let why = v
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                bail!("migration {state}: {why}");
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let simple = |method: &str, endpoint: &str| -> Result<()> {
        let r = checked(call(args, method, endpoint, None)?)?;
        print_body(&r);
        Ok(())
    };
    match &args.cmd {
        Cmd::Ping => simple("GET", "vmm.ping"),
        Cmd::Info => simple("GET", "vm.info"),
        Cmd::Pause => simple("PUT", "vm.pause"),
        Cmd::Resume => simple("PUT", "vm.resume"),
        Cmd::Shutdown => simple("PUT", "vm.shutdown"),
        Cmd::ShutdownVmm => simple("PUT", "vmm.shutdown"),
        Cmd::MigrationStatus => simple("GET", "vm.migration"),
        Cmd::MigrationCancel => simple("PUT", "vm.migration-cancel"),
        Cmd::MigrationParameters => simple("GET", "vm.migration-parameters"),
        Cmd::MigrationSet { live } => {
            let mut body = json!({});
            live.apply(&mut body);
            if body.as_object().is_some_and(|m| m.is_empty()) {
                bail!("migration-set needs at least one parameter (see --help)");
            }
            let r = checked(call(
                args,
                "PUT",
                "vm.migration-set-parameters",
                Some(&body),
            )?)?;
            print_body(&r);
            Ok(())
        }
        Cmd::Events { since, now, once } => follow_events(args, *since, *now, *once),
        Cmd::ReceiveMigration {
            url,
            device_buffer_bytes,
            transport,
            tls_allow_subject,
        } => {
            let mut body = json!({ "receiver_url": url });
            transport.apply(&mut body);
            if !tls_allow_subject.is_empty() {
                body["tls_allowed_subjects"] = json!(tls_allow_subject);
            }
            if let Some(b) = device_buffer_bytes {
                body["device_buffer_bytes"] = json!(b);
            }
            let r = checked(call(args, "PUT", "vm.receive-migration", Some(&body))?)?;
            print_body(&r);
            Ok(())
        }
        Cmd::SendMigration {
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
            wait,
        } => {
            let mut body = json!({ "destination_url": url });
            transport.apply(&mut body);
            if let Some(c) = connections {
                body["connections"] = c.clone();
            }
            if *resume {
                body["resume"] = json!(true);
            }
            live.apply(&mut body);
            if let Some(b) = max_bandwidth_mbps {
                body["max_bandwidth_mib_s"] = json!(b);
            }
            if let Some(t) = timeout_s {
                body["timeout_s"] = json!(t);
            }
            if let Some(d) = device_state {
                body["device_state"] = json!(match d {
                    DeviceState::Channels => "channels",
                    DeviceState::Main => "main",
                });
            }
            if *no_device_precopy {
                body["device_precopy"] = json!(false);
            }
            if let Some(c) = device_chunk_bytes {
                body["device_chunk_bytes"] = json!(c);
            }
            let r = checked(call(args, "PUT", "vm.send-migration", Some(&body))?)?;
            if *wait {
                wait_for_migration(args)
            } else {
                print_body(&r);
                Ok(())
            }
        }
    }
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            eprintln!("ferry-remote: error: {}", vmm::config::clap_error_line(&e));
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("ferry-remote: error: {e:#}");
        std::process::exit(1);
    }
}
