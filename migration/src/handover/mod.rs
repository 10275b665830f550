//! Local migration to a destination on the same host (`unix:PATH`), the
//! live-upgrade path (issue #13 §3).
//!
//! * `url`: `unix:PATH` parsing and its bounds;
//! * `fds`: the memory file descriptors, sent and received with
//!   SCM_RIGHTS over the main UNIX connection (bounded, validated);
//! * `offer` / `dest`: the HANDOVER frame after SETUP, on each side;
//! * `source`: the source VM seen through the handover: no RAM to send,
//!   no dirty log (the destination maps the same memory).
//!
//! When the source's RAM is shareable (every region backed by a file
//! descriptor, see [`crate::traits::MemoryHandover`]) and the destination
//! agrees in SETUP, nothing of RAM is copied; otherwise the same URL runs the
//! normal protocol over UNIX connections.

mod dest;
mod fds;
mod offer;
mod source;
mod url;

pub use dest::receive_regions;
pub use fds::{recv_fds, send_fds, validate_fd, HandoverFds, MAX_HANDOVER_FDS};
pub use offer::{offer, send_regions};
pub use source::HandoverSource;
pub use url::{is_unix, parse_unix, MAX_UNIX_PATH, UNIX_PREFIX};

use crate::error::MigrationError;

/// The refusal of TLS on a `unix:` URL (the peer is this host; nothing
/// crosses a network).
pub fn tls_refusal() -> MigrationError {
    MigrationError::InvalidParams(
        "TLS is not used on a unix: URL (the destination is this host and nothing crosses a \
         network): drop tls_dir/tls"
            .into(),
    )
}
