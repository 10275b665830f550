//! `ferry-remote`: talks to a `ferry` API socket and prints the JSON answer.
//!
//! Exit codes: see [`exit`] (0 success, 1 failure, 2 bad command line,
//! 3/4/5 a migration followed with `--wait` failed / was cancelled / left
//! the source VM paused, 130 interrupted).
//!
//! Output: answers on stdout; progress (`--wait`) on stderr; logs through
//! [`vmm::logging`]. The only lines printed to stderr directly are the
//! final `ferry-remote: error: ...` line and clap's usage and help, so
//! that they show whatever `RUST_LOG` filters.

mod cli;
mod events;
mod exit;
mod series;
mod wait;

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use vmm::client::{ApiResponse, Client};

use cli::{Args, Cmd};
use exit::{Exit, EXIT_FAILURE, EXIT_USAGE};

/// I/O timeout of one request.
const TIMEOUT: Duration = Duration::from_secs(30);

fn print_body(r: &ApiResponse) {
    let text = match serde_json::from_str::<serde_json::Value>(&r.body) {
        Ok(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| r.body.clone()),
        Err(_) => r.body.trim().to_string(),
    };
    if !text.is_empty() {
        println!("{text}");
    }
}

/// Writes generated text (completions, man page) to stdout.
fn print_bytes(b: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(b)?;
    out.flush()?;
    Ok(())
}

fn run(args: Args) -> Result<()> {
    match &args.cmd {
        Cmd::Completions { shell } => {
            return print_bytes(&vmm::cli_docs::completions(Args::command(), *shell));
        }
        Cmd::Man => return print_bytes(&vmm::cli_docs::man_page(Args::command())?),
        _ => {}
    }
    let Some(socket) = &args.api_socket else {
        return Err(Exit::new(
            EXIT_USAGE,
            "the following required arguments were not provided: --api-socket <PATH>",
        )
        .into());
    };
    let client = Client::new(socket, TIMEOUT);
    let simple = |method: &str, endpoint: &str| -> Result<()> {
        print_body(&client.call_empty(method, endpoint)?);
        Ok(())
    };
    match &args.cmd {
        Cmd::Completions { .. } | Cmd::Man => Ok(()),
        Cmd::Ping => simple("GET", "vmm.ping"),
        Cmd::Info => simple("GET", "vm.info"),
        Cmd::Pause => simple("PUT", "vm.pause"),
        Cmd::Resume => simple("PUT", "vm.resume"),
        Cmd::Shutdown => simple("PUT", "vm.shutdown"),
        Cmd::ShutdownVmm => simple("PUT", "vmm.shutdown"),
        Cmd::MigrationStatus { csv, interval_ms } => {
            if *csv {
                series::dump(&client, Duration::from_millis(*interval_ms))
            } else {
                simple("GET", "vm.migration")
            }
        }
        Cmd::MigrationCancel => simple("PUT", "vm.migration-cancel"),
        Cmd::MigrationParameters => simple("GET", "vm.migration-parameters"),
        Cmd::MigrationSet { live } => {
            let update = live.update();
            if update.is_empty() {
                bail!(Exit::new(
                    EXIT_USAGE,
                    "migration-set needs at least one parameter (see --help)"
                ));
            }
            let r = client.call("PUT", "vm.migration-set-parameters", Some(&update))?;
            print_body(&r);
            Ok(())
        }
        Cmd::Events { since, now, once } => events::follow(&client, *since, *now, *once),
        Cmd::ReceiveMigration {
            url,
            device_buffer_bytes,
            transport,
            tls_allow_subject,
            wait,
        } => {
            let params =
                cli::receive_params(url, *device_buffer_bytes, transport, tls_allow_subject);
            let r = client.call("PUT", "vm.receive-migration", Some(&params))?;
            if wait.wait {
                log::info!("listening on {url}; waiting for the migration");
                wait::wait(&client, "destination", wait.cancel_on_interrupt)
            } else {
                print_body(&r);
                Ok(())
            }
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
            allow_untracked_dma,
            zero_copy,
            compression,
            compression_level,
        } => {
            let mut params = cli::send_params(
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
            params.allow_untracked_dma = *allow_untracked_dma;
            params.zero_copy = *zero_copy;
            if let Some(c) = compression {
                params.compression = c.to_api();
            }
            params.compression_level = *compression_level;
            let r = client.call("PUT", "vm.send-migration", Some(&params))?;
            if wait.wait {
                wait::wait(&client, "source", wait.cancel_on_interrupt)
            } else {
                print_body(&r);
                Ok(())
            }
        }
    }
}

/// Prints the final error line and exits with `code`.
fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    vmm::logging::error_to_file(&msg);
    eprintln!("ferry-remote: error: {msg}");
    std::process::exit(code)
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // Help and version go to stdout; failing to print is moot.
                let _ = e.print();
                std::process::exit(0);
            }
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                // No arguments (or a subcommand missing): the help, on
                // stderr, as a usage error.
                let _ = e.print();
                std::process::exit(EXIT_USAGE);
            }
            _ => fail(EXIT_USAGE, vmm::config::clap_error_line(&e)),
        },
    };
    if let Err(e) = vmm::logging::init("ferry-remote", &args.log) {
        fail(EXIT_USAGE, e);
    }
    if let Err(e) = run(args) {
        let code = e.downcast_ref::<Exit>().map_or(EXIT_FAILURE, |x| x.code);
        fail(code, format!("{e:#}"));
    }
}
