//! Ferry's VMM: KVM VMs with port-I/O devices, an HTTP API on a UNIX
//! socket, and the glue that lets the `migration` crate move a running VM.
//!
//! - [`vm`], [`vcpu`], [`state`]: a KVM VM whose vCPU threads own their fds;
//! - [`control`]: the one event loop (API socket, signals, VM events) that
//!   executes requests and decides when the process ends;
//! - [`controller`]: the VMM and its life cycle;
//! - [`api`]: HTTP <-> typed requests;
//! - [`jobs`]: the migration job and its adapters to the migration traits;
//! - [`host`]: the registry of this host's running migrations and its link speeds.
//! - [`uffd`], [`postcopy`]: userfaultfd and the post-copy backend of a
//!   received VM's RAM.
//!
//! The binaries (`ferry`, `ferry-remote`) are thin: `ferry` validates its
//! command line with [`config`] and hands over to [`run`].
#![deny(missing_docs)]

pub mod api;
pub mod caps;
pub mod cli_docs;
pub mod client;
pub mod config;
pub mod control;
pub mod controller;
pub mod device_set;
pub mod dirty;
pub mod host;
pub mod jobs;
pub mod logging;
pub mod memory;
pub mod pagemap;
pub mod pci;
pub mod pio;
pub mod postcopy;
pub mod state;
pub mod uffd;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod kvm_tests;

pub use control::{run, EventSink, VmmEvent};
pub use controller::{RunError, Vmm};

/// Logs the host-KVM warning when this host runs KVM as PVM (nested):
/// exactly one warning line. Returns whether it logged.
pub fn warn_if_pvm() -> bool {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        log::warn!(
            "host KVM is PVM (nested); guests run in KVM's instruction emulator (~1.4M instructions/s)"
        );
        true
    } else {
        false
    }
}
