//! Device models of Ferry: legacy PC devices and device-state backends.
//!
//! Every device has an explicit state struct: save copies it out, restore
//! builds the device from it. No device reaches into the VMM.

#![warn(missing_docs)]

pub mod error;
pub mod i8042;
pub mod mig_fsm;
pub mod options;
pub mod pci;
pub mod serial;
pub mod sim_vfio;
pub mod vfio;

pub use error::{Error, Result};
