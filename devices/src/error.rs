//! The error type of the `devices` crate.

use std::io;

/// Every error a device of this crate can report.
///
/// Invariant: each message names what failed (and, for migratable devices,
/// the device id) so it can be shown to the user as is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An eventfd could not be created, cloned or signalled.
    #[error("eventfd {what}: {source}")]
    EventFd {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The serial model refused an operation.
    #[error("serial: {0}")]
    Serial(String),
    /// The i8042 model refused a saved state.
    #[error("i8042: {0}")]
    I8042(String),
    /// A command-line argument is malformed.
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArg {
        /// The argument as given.
        arg: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A host I/O operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done (names the device).
        what: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A kernel VFIO operation failed or VFIO is not usable.
    #[error("vfio device {id}: {msg}")]
    Vfio {
        /// Device id.
        id: String,
        /// What failed.
        msg: String,
    },
    /// A PCI layer (config space, BARs, MSI-X) refused a request or a
    /// saved state.
    #[error("pci: {0}")]
    Pci(String),
    /// A migration state operation failed on a device.
    #[error("device {id}: {msg}")]
    Device {
        /// Device id.
        id: String,
        /// What failed.
        msg: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;
