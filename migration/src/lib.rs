//! Ferry's live-migration machinery: wire protocol, connection pool, dirty
//! page passes, device-state streams, convergence policy and statistics.
//!
//! This crate makes no KVM call. The VMM implements the traits in [`traits`]
//! and calls [`send`] on the source and [`receive`] on the destination.

pub mod api;
pub mod traits;

pub use api::{
    receive, send, CancelToken, DeviceStateMode, MigrationError, MigrationState, MigrationStats,
    MigrationStatus, ReceiveParams, SendParams,
};
pub use traits::*;
