//! `ferry`: boots a guest and/or serves the API (see `ferry --help`).
//!
//! Exit codes: 0 when the guest ends the VM (reset/shutdown), on
//! `vmm.shutdown`, or after a completed outgoing migration; 2 for bad
//! input (one `ferry: error: ...` line on stderr); 1 for other failures.

use clap::error::ErrorKind;
use clap::Parser;
use vmm::config::{clap_error_line, Cli, VmmConfig};

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_target(false)
        .init();
}

fn fail(code: i32, msg: impl std::fmt::Display) -> ! {
    eprintln!("ferry: error: {msg}");
    std::process::exit(code)
}

fn main() {
    init_logging();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                // Help and version go to stdout; failing to print is moot.
                let _ = e.print();
                std::process::exit(0)
            }
            _ => fail(2, clap_error_line(&e)),
        },
    };
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
