//! The exit codes of `ferry-remote` (listed in its `--help` epilogue,
//! [`crate::cli::EPILOGUE`], and the README) and the error that carries one.

/// The VMM answered with an error, could not be reached, or another
/// failure.
pub const EXIT_FAILURE: i32 = 1;
/// Bad command line.
pub const EXIT_USAGE: i32 = 2;
/// `--wait`: the migration failed (the source VM runs on).
pub const EXIT_FAILED: i32 = 3;
/// `--wait`: the migration was cancelled (the source VM runs on).
pub const EXIT_CANCELLED: i32 = 4;
/// `--wait`: the migration failed and the source VM was left paused
/// (`source_vm` `paused_uncertain` or `postcopy_paused`).
pub const EXIT_SOURCE_HELD: i32 = 5;
/// `--wait`: interrupted by Ctrl-C without cancelling (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;

/// An error that ends `ferry-remote` with a given exit code.
///
/// Invariant: `code` is one of the constants of this module.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Exit {
    /// The exit code.
    pub code: i32,
    /// The line printed after `ferry-remote: error: `.
    pub msg: String,
}

impl Exit {
    /// An exit with `code` and `msg`.
    pub fn new(code: i32, msg: impl Into<String>) -> Exit {
        Exit {
            code,
            msg: msg.into(),
        }
    }
}
