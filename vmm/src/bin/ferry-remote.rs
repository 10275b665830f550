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
        /// Data connections (1..=64).
        #[arg(long)]
        connections: Option<u32>,
        /// Target downtime in milliseconds.
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Throughput cap in MiB/s.
        #[arg(long)]
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
            downtime_ms,
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
                body["connections"] = json!(c);
            }
            if let Some(d) = downtime_ms {
                body["downtime_ms"] = json!(d);
            }
            if let Some(b) = max_bandwidth_mbps {
                body["max_bandwidth_mbps"] = json!(b);
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
