//! `ferry`: boots a guest and/or serves the API (see `ferry --help`).
//!
//! Exit codes: [`vmm::cli_docs::FERRY_EXIT_CODES`] (0 done, 1 failure, 2
//! bad input with one `ferry: error: ...` line on stderr).
//!
//! Everything but that last line goes through the logger
//! ([`vmm::logging`]); the error line is printed directly so that it is
//! there whatever `RUST_LOG` filters (it is logged too, for `--log-file`).

use std::io::Write;

use clap::error::ErrorKind;
use clap::FromArgMatches;
use clap_complete::Shell;
use vmm::cli_docs::{ferry_command, ARG_COMPLETIONS, ARG_MAN};
use vmm::config::{clap_error_line, Cli, VmmConfig};

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    vmm::logging::error_to_file(&msg);
    eprintln!("ferry: error: {msg}");
    std::process::exit(code)
}

/// Writes generated text (completions, man page) to stdout and exits.
fn print_and_exit(bytes: std::io::Result<Vec<u8>>) -> ! {
    let written = bytes.and_then(|b| {
        let mut out = std::io::stdout().lock();
        out.write_all(&b)?;
        out.flush()
    });
    match written {
        Ok(()) => std::process::exit(0),
        Err(e) => fail(1, format!("cannot write to stdout: {e}")),
    }
}

fn main() {
    let matches = match ferry_command().try_get_matches() {
        Ok(m) => m,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // Help and version go to stdout; failing to print is moot.
                let _ = e.print();
                std::process::exit(0)
            }
            _ => fail(2, clap_error_line(&e)),
        },
    };
    if let Some(shell) = matches.get_one::<Shell>(ARG_COMPLETIONS) {
        print_and_exit(Ok(vmm::cli_docs::completions(ferry_command(), *shell)));
    }
    if matches.get_flag(ARG_MAN) {
        print_and_exit(vmm::cli_docs::man_page(ferry_command()));
    }
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => fail(2, clap_error_line(&e)),
    };
    if let Err(e) = vmm::logging::init("ferry", &cli.log) {
        fail(2, e);
    }
    let cfg = match VmmConfig::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => fail(2, e),
    };
    if let Err(e) = vmm::device_set::validate_args(&cfg.sim_vfio, &cfg.vfio) {
        fail(2, e);
    }
    match vmm::run(cfg) {
        Ok(code) => std::process::exit(code),
        Err(e) => fail(e.exit_code(), e),
    }
}
