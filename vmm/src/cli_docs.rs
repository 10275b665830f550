//! What `--help`, the man pages and the shell completions of `ferry` and
//! `ferry-remote` say beyond the clap definitions themselves: the keys of
//! `--sim-vfio` and `--vfio`, defaults that are not clap defaults, and the
//! exit codes; and the generators ([`completions`], [`man_page`]).
//!
//! Both are generated from the same [`clap::Command`] the binary parses
//! with, so they cannot drift from it.

use clap::{Arg, ArgAction, Command, CommandFactory};
use clap_complete::Shell;

use crate::config::{Cli, DEFAULT_CMDLINE};

/// The exit codes of `ferry` (its `--help` epilogue and the README).
pub const FERRY_EXIT_CODES: &str = "\
Exit codes:
  0  the guest ended the VM (reset or shutdown), vmm.shutdown, or (with
     --exit-after-migration) an outgoing migration completed
  1  failure: the VM or the VMM failed while running
  2  bad command line or configuration (one `ferry: error:` line, nothing
     started)

Logging: warnings by default; -v info, -vv debug, -vvv trace; RUST_LOG
(env_logger syntax, e.g. RUST_LOG=info,migration=debug) sets per-module
levels. Completions: `ferry --completions bash|zsh|fish`; man page:
`ferry --man`.";

/// The help of `--sim-vfio`: every key of [`devices::sim_vfio::config::KEYS`].
const SIM_VFIO_HELP: &str = "\
Simulated VFIO device with migratable state (repeatable). Without
--kernel: a device this VMM accepts from an incoming migration.
Keys, as a comma-separated KEY=VALUE list (sizes: bytes, or with a
K/M/G suffix):
  id=NAME               device id (required)
  state=SIZE            bytes of device state, 1 byte to 16G (required)
  precopy=SIZE          prefix of the state that can be pre-copied
                        (default 0: no pre-copy)
  dirty-rate=MIB_S      state rewritten per second while running
                        (default 0: none)
  save-rate=MIB_S       speed at which state is saved (default 0: unlimited)
  load-rate=MIB_S       speed at which state is loaded (default 0: unlimited)
  fail-save-after=SIZE  fault injection: saving fails after this many bytes
                        (default: never)
  fail-load=on          fault injection: the destination refuses the data
                        (default off)
  dma-rate=MIB_S        pages the PCI function's DMA engine writes per
                        second (default 64; 0: unlimited)
  dma-log=on|off|none   DMA logging: on (default); off: advertised but
                        never records a page (test knob); none: the device
                        cannot log its DMA
Example: --sim-vfio id=gpu0,state=64M,precopy=48M,dirty-rate=10";

/// The help of `--vfio`: every key of [`devices::vfio::KEYS`].
const VFIO_HELP: &str = "\
Kernel VFIO device (repeatable; like --sim-vfio without --kernel).
Keys, as a comma-separated KEY=VALUE list:
  path=/sys/bus/pci/devices/DDDD:BB:DD.F  the device (required)
  id=NAME                                 device id (default: the PCI
                                          address DDDD:BB:DD.F)";

/// The id of `ferry`'s hidden `--completions SHELL`.
pub const ARG_COMPLETIONS: &str = "completions";
/// The id of `ferry`'s hidden `--man`.
pub const ARG_MAN: &str = "man";

/// The command `ferry` parses with: [`Cli`], the key lists of `--sim-vfio`
/// and `--vfio`, the `--cmdline` default, the exit codes, and the hidden
/// `--completions SHELL` and `--man`.
pub fn ferry_command() -> Command {
    Cli::command()
        .mut_arg("sim_vfio", |a| a.help(SIM_VFIO_HELP))
        .mut_arg("vfio", |a| a.help(VFIO_HELP))
        .mut_arg("cmdline", |a| {
            a.help(format!("Kernel command line (default: {DEFAULT_CMDLINE})."))
        })
        .after_help(FERRY_EXIT_CODES)
        .arg(
            Arg::new(ARG_COMPLETIONS)
                .long("completions")
                .value_name("SHELL")
                .value_parser(clap::value_parser!(Shell))
                .hide(true)
                .help("Print the shell completion script for SHELL and exit"),
        )
        .arg(
            Arg::new(ARG_MAN)
                .long("man")
                .action(ArgAction::SetTrue)
                .hide(true)
                .help("Print the man page (roff) and exit"),
        )
}

/// The completion script of `cmd` for `shell`.
pub fn completions(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// The man page of `cmd` (roff), its subcommands included.
pub fn man_page(cmd: Command) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    let cmd = cmd.disable_help_subcommand(true);
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        // One section per subcommand, as `PROG-SUB(1)` would have it.
        let name = format!("{}-{}", cmd.get_name(), sub.get_name());
        clap_mangen::Man::new(sub.clone())
            .title(name)
            .render(&mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn help() -> String {
        ferry_command().render_help().to_string()
    }

    #[test]
    fn help_names_every_sim_vfio_and_vfio_key() {
        let h = help();
        for k in devices::sim_vfio::config::KEYS {
            assert!(
                h.contains(&format!("  {k}=")),
                "--sim-vfio key {k} missing:\n{h}"
            );
        }
        for k in devices::vfio::KEYS {
            assert!(
                h.contains(&format!("  {k}=")),
                "--vfio key {k} missing:\n{h}"
            );
        }
    }

    #[test]
    fn help_shows_the_defaults_and_exit_codes() {
        let h = help();
        for want in [
            DEFAULT_CMDLINE,
            "default 1",
            "default 512M",
            "default tty",
            crate::host::DEFAULT_REGISTRY,
            "Exit codes:",
            "RUST_LOG",
            "--log-file",
            "-v",
        ] {
            assert!(h.contains(want), "{want:?} missing from ferry --help:\n{h}");
        }
        assert!(
            !h.lines()
                .any(|l| l.trim_start().starts_with("--completions")),
            "hidden flags stay hidden:\n{h}"
        );
    }

    #[test]
    fn completions_and_man_pages_are_generated() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = String::from_utf8(completions(ferry_command(), shell)).unwrap();
            assert!(s.contains("--sim-vfio"), "{shell}: {s}");
        }
        let m = String::from_utf8(man_page(ferry_command()).unwrap()).unwrap();
        assert!(m.contains(".TH ferry"), "{m}");
        assert!(m.contains("fail\\-save\\-after"), "{m}");
    }
}
