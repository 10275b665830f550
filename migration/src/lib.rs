//! Ferry's live-migration machinery: wire protocol, connection pool, dirty
//! page passes, device-state streams, convergence policy and statistics.
//!
//! This crate makes no KVM call. The VMM implements the traits in [`traits`]
//! and calls [`send`] on the source and [`receive`] on the destination. The
//! wire protocol is described in `docs/migration-protocol.md`.
//!
//! Module map: [`wire`] (frame layout), `net` (timed socket I/O, abort
//! control), `handshake` (connect/accept/refuse), `pool` + `writer`
//! (sender queues and writer threads), `dirty` (pass scheduler),
//! `convergence`, `devsend`/`devrecv` (device streams), `reader` (receiver
//! data path and pass barrier), `sender`/`receiver` (the two state
//! machines), `srcmain` (the source's main-connection reader), `testhook`
//! (switch-over fault injection for tests), [`stats`].

#![warn(missing_docs)]

pub mod api;
mod convergence;
mod devrecv;
mod devsend;
mod dirty;
pub mod error;
mod handshake;
mod net;
mod pool;
mod reader;
mod receiver;
mod sender;
mod srcmain;
pub mod stats;
mod testhook;
pub mod traits;
pub mod wire;
mod writer;

#[cfg(test)]
mod tests;

pub use api::{
    receive, send, CancelToken, DeviceStateMode, DeviceStatus, MigrationError, MigrationState,
    MigrationStats, MigrationStatus, ReceiveParams, SendParams, SourceVmOutcome,
};
pub use traits::*;
