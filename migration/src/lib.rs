//! Ferry's live-migration machinery: wire protocol, connection pool, dirty
//! page passes, device-state streams, convergence policy and statistics.
//!
//! This crate makes no KVM call. The VMM implements the traits in [`traits`]
//! and calls [`send()`] on the source and [`receive`] on the destination. The
//! wire protocol is described in `docs/migration-protocol.md`.
//!
//! Module map (arrows only point down):
//!
//! * [`api`], [`traits`], [`error`], [`stats`], `convergence`: the surface
//!   and the policy;
//! * `send/` (the source's state machine: `mod` phases, `setup`, `passes`,
//!   `switchover`, `guards`, `link` (main connection reader + keepalive),
//!   `pool`, `dirty` (packetizer), `writer`, `devices`) and `recv/` (the
//!   destination's: `mod` phases, `setup`, `switchover`, `reader`,
//!   `barrier`, `devices` (reorder buffers + load threads));
//! * `handshake` (connect/accept/refuse), `net/` (`ctl`: cancel, deadlines,
//!   commit point; `io`: frame and vectored I/O loops; `conn`: main
//!   connection + keepalive), `worker` (threads whose panic fails the
//!   migration, joined by guards);
//! * [`wire`] (frame layout: typed [`wire::Frame`], range tables, SETUP) and
//!   `guest_mem` (the one audited module that touches guest memory through
//!   host addresses: [`RamRegion`], volatile zero scan, iovecs);
//! * [`handover`] (`unix:PATH` URLs, the memory handover of a local
//!   migration: SCM_RIGHTS descriptors, the source without RAM passes);
//! * [`tls`] (mutual-TLS configuration from a `tls_dir`, subject checks);
//! * [`host`] (the host's bandwidth shared between its migrations, the
//!   `connections: "auto"` rule; the host itself is the VMM's [`host::Host`]);
//! * `testhook` (switch-over fault injection for tests).

#![warn(missing_docs)]

pub mod api;
pub mod bitmap;
pub mod combine;
pub mod compress;
mod convergence;
pub mod error;
pub mod events;
mod guest_mem;
pub mod handover;
mod handshake;
pub mod host;
mod limits;
pub mod live;
mod net;
mod phase;
mod recv;
mod send;
pub mod stats;
mod testhook;
pub mod tls;
pub mod traits;
pub mod wire;
mod worker;

#[cfg(test)]
mod tests;

pub use api::{
    receive, receive_with, send, send_with, CancelToken, Connections, DeviceStateMode,
    DeviceStatus, Hooks, MigrationError, MigrationState, MigrationStats, MigrationStatus,
    ReceiveParams, ResumeToken, SendParams, SourceVmOutcome,
};
pub use net::Listener;
pub use traits::*;
