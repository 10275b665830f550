//! Ferry's VMM: KVM VMs with port-I/O devices, an HTTP API on a UNIX
//! socket, and the glue that lets the `migration` crate move a running VM.
//!
//! The binaries (`ferry`, `ferry-remote`) are thin: `ferry` validates its
//! command line with [`config`] and hands over to [`run`].
#![deny(missing_docs)]

pub mod api;
pub mod caps;
pub mod client;
pub mod config;
pub mod controller;
pub mod device_set;
pub mod dirty;
pub mod memory;
pub mod migration_glue;
pub mod pio;
pub mod state;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod kvm_tests;

pub use controller::{run, RunError, Vmm};

/// Events delivered to the VMM's main loop.
///
/// Invariant: `vm_id` names the VM that produced a VM event; events of a VM
/// that is no longer the VMM's VM are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmEvent {
    /// A VM ended by itself (guest reset/shutdown or a KVM error).
    VmEnded {
        /// Which VM.
        vm_id: u64,
        /// Why.
        end: vcpu::VmEnd,
    },
    /// The process must exit with this code.
    Exit(i32),
}

/// Prints the host-KVM warning when this host runs KVM as PVM (nested):
/// exactly one line on stderr. Returns whether it printed.
pub fn warn_if_pvm() -> bool {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!(
            "ferry: warning: host KVM is PVM (nested); guests run in KVM's instruction emulator (~1.4M instructions/s)"
        );
        true
    } else {
        false
    }
}
