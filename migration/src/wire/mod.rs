//! The wire format: fixed 64-byte little-endian frame headers, RAM range
//! tables and the setup payload. Pure encoding/decoding, no I/O.
//!
//! Everything decoded here comes from the network and is validated before it
//! is returned: unknown kinds, reserved bits, lengths over their bounds and
//! ranges outside guest RAM are errors, never panics. The byte layout is
//! documented in `docs/migration-protocol.md`.
//!
//! [`Header`] is the raw 64-byte layout (kind, flags, count, len, a, b, c,
//! session). The state machines never read its fields: they decode a
//! [`Frame`] (one typed variant per kind, see [`Frame::decode`]) and encode
//! one with [`Frame::encode`]. Submodules: `header` (raw layout and
//! validation), `frame` (the typed frames), `ranges` (RAM range tables),
//! `setup` (the SETUP payload).

mod bitmap;
mod frame;
mod header;
mod ranges;
mod setup;

pub use bitmap::{bitmap_len, decode_bitmap, encode_bitmap};
pub use frame::{ConnRole, Envelope, Frame, ERROR_DISCARDED};
pub use header::Header;
pub use ranges::{decode_ranges, resolve, RangeEntry, ResolvedRange};
pub use setup::{DeviceDesc, Setup, SETUP_FEATURES};

use crate::error::MigrationError;

/// `b"FRRY"` read as a little-endian u32: first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRRY");
/// The newest protocol version this build speaks (and announces). Version 2
/// added the READY/COMMIT switch-over handshake and RATE frames; version 4
/// added the memory handover of `unix:` migrations (the HANDOVER frame and
/// the handover byte at the end of SETUP).
pub const VERSION: u16 = 4;
/// The oldest version this build still accepts: a destination receives
/// from any source speaking `MIN_VERSION..=VERSION` and answers it in the
/// version it spoke (a newer `ferry` receives from an older one: the live
/// upgrade). A version-1 peer is refused at HELLO (it would start the VM
/// without waiting for COMMIT).
pub const MIN_VERSION: u16 = 3;
/// Bound of the memory regions one HANDOVER frame hands over (and of the
/// file descriptors it carries).
pub const MAX_HANDOVER_REGIONS: u64 = 16;
/// Size of one HANDOVER entry: gpa, size, offset in the fd (u64 each).
pub const HANDOVER_ENTRY_LEN: u64 = 24;

/// Whether a peer speaking `v` is accepted.
pub fn version_accepted(v: u16) -> bool {
    (MIN_VERSION..=VERSION).contains(&v)
}
/// Size of every frame header.
pub const HEADER_LEN: usize = 64;
/// Size of one RAM range-table entry.
pub const RANGE_ENTRY_LEN: usize = 16;
/// Bound of an ERROR/ABORT message.
pub const MAX_MESSAGE_LEN: u64 = 4096;
/// Bound of the VM configuration blob inside SETUP.
pub const MAX_CONFIG_LEN: u64 = 1 << 20;
/// Bound of the whole SETUP payload.
pub const MAX_SETUP_LEN: u64 = MAX_CONFIG_LEN + (1 << 20);
/// Bound of the STATE payload (`save_state` bytes).
pub const MAX_STATE_LEN: u64 = 256 << 20;
/// Bound of the pages carried by one RAM packet (the sender uses fewer).
pub const MAX_PACKET_PAGES: u64 = 1024;
/// Bound of the entries of one RAM range table.
pub const MAX_RANGES: u32 = 1024;
/// Bound of one device chunk (and of `device_chunk_bytes`).
pub const MAX_DEVICE_CHUNK: u64 = 16 << 20;
/// Bound of data connections.
pub const MAX_CONNECTIONS: u32 = 64;
/// Bound of RAM regions in SETUP.
pub const MAX_REGIONS: u32 = 1024;
/// Bound of devices in SETUP.
pub const MAX_DEVICES: u32 = 256;
/// Bound of a device id.
pub const MAX_DEVICE_ID: usize = 256;
/// Range-table flag: the range is zero pages, no data follows for it.
pub const RANGE_ZERO: u32 = 1;
/// Header flag of RAM and PAGES frames: the page data after the range
/// table is one zstd stream of `len - table` bytes (strictly fewer than
/// the raw data) that decompresses to exactly `c` bytes, the raw data
/// length (see [`crate::compress`]). Sent only when SETUP negotiated
/// compression ([`SETUP_FEATURE_ZSTD`]).
pub const FLAG_ZSTD: u32 = 1;
/// SETUP feature bit: RAM packets on the data connections may be
/// compressed ([`FLAG_ZSTD`]).
pub const SETUP_FEATURE_ZSTD: u32 = 1;
/// SETUP feature bit: the source hands its memory over (version 4,
/// `unix:`); a HANDOVER frame follows SETUP ([`Setup::handover`]).
pub const SETUP_FEATURE_HANDOVER: u32 = 1 << 1;
/// Bound of a post-copy page bitmap (POSTCOPY, RESUME_ACK): one bit per
/// 4 KiB page of 2 TiB of guest RAM. The exact length follows from the
/// layout SETUP announced ([`bitmap_len`]).
pub const MAX_BITMAP_LEN: u64 = 64 << 20;
/// Bound of the pages one PAGE_REQUEST asks for.
pub const MAX_REQUEST_PAGES: u64 = 64;

/// Connection role carried by HELLO (`a`).
pub const ROLE_MAIN: u64 = 1;
/// Connection role carried by HELLO (`a`).
pub const ROLE_DATA: u64 = 2;

/// Frame kinds. The discriminant is the u16 at offset 6 of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// First frame of every connection (source → destination).
    Hello = 1,
    /// Positive reply to HELLO or SETUP.
    Ok = 2,
    /// Refusal or failure with a UTF-8 message (destination → source).
    Error = 3,
    /// Configuration, RAM layout and devices (source → destination, main).
    Setup = 4,
    /// RAM packet: range table + page data (data connections).
    Ram = 5,
    /// End of pass `a` on this connection.
    Sync = 6,
    /// Device stream item: `a` device index, `b` sequence, `c` item kind.
    Device = 7,
    /// Final VM state: `a` final pass, `b` user_paused, `c` pause time (µs).
    State = 8,
    /// Destination resumed: `a` resume time (µs since the epoch).
    Resumed = 9,
    /// Switch-over ack: `a` device index, `b` bytes loaded, `c` load µs.
    Ack = 10,
    /// Source gives up, with a UTF-8 message.
    Abort = 11,
    /// Liveness on the main connection, both ways.
    Keepalive = 12,
    /// Destination restored the VM state and waits for COMMIT to start it.
    Ready = 13,
    /// Source commits the switch-over: from the moment it is written the
    /// source never resumes its VM.
    Commit = 14,
    /// Device load rate: `a` device index, `b` bytes/s, `c` bytes loaded.
    Rate = 15,
    /// Destination → source on main, periodically: `a` incoming migrations
    /// on the destination host (1..=`MAX_HOST_MIGRATIONS`), for the share of
    /// the host's bandwidth.
    HostLoad = 16,
    /// Switch to post-copy: `a` final pass, `b` missing pages; the bitmap
    /// of the pages the destination must fetch follows (source → main).
    Postcopy = 17,
    /// A vCPU faulted: `a` guest-physical address, `b` pages (destination
    /// → main).
    PageRequest = 18,
    /// Post-copy RAM packet (same layout as RAM): `a` 1 if it answers a
    /// PAGE_REQUEST, 0 for the background push.
    Pages = 19,
    /// Post-copy finished on the destination: `a` page requests, `b`/`c`
    /// fault latency p50/p99 in µs.
    PostcopyDone = 20,
    /// Reconnect a paused post-copy: `a` epoch (source → main, after HELLO
    /// with the old session id).
    Resume = 21,
    /// Answer to RESUME: `a` epoch, `b` pages still missing; their bitmap
    /// follows (destination → main).
    ResumeAck = 22,
    /// Memory handover (version 4, `unix:` only): `a` regions; `len` =
    /// `a` × 24 bytes of (gpa, size, offset) follow, and the frame's first
    /// byte carries one file descriptor per region (SCM_RIGHTS).
    Handover = 25,
}

impl Kind {
    pub(crate) fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Ok,
            3 => Kind::Error,
            4 => Kind::Setup,
            5 => Kind::Ram,
            6 => Kind::Sync,
            7 => Kind::Device,
            8 => Kind::State,
            9 => Kind::Resumed,
            10 => Kind::Ack,
            11 => Kind::Abort,
            12 => Kind::Keepalive,
            13 => Kind::Ready,
            14 => Kind::Commit,
            15 => Kind::Rate,
            16 => Kind::HostLoad,
            17 => Kind::Postcopy,
            18 => Kind::PageRequest,
            19 => Kind::Pages,
            20 => Kind::PostcopyDone,
            21 => Kind::Resume,
            22 => Kind::ResumeAck,
            25 => Kind::Handover,
            _ => return None,
        })
    }
}

/// Kind of a device stream item (`c` of a DEVICE frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum DevItemKind {
    /// Data read in PRE_COPY.
    PrecopyData = 0,
    /// Data read in STOP_COPY.
    StopCopyData = 1,
    /// All initial pre-copy bytes precede this item (switch-over ack point).
    InitialDone = 2,
    /// End of the device's stream; no item follows.
    End = 3,
}

impl DevItemKind {
    /// Decodes `c`; `None` for unknown values.
    pub fn from_u64(v: u64) -> Option<Self> {
        Some(match v {
            0 => DevItemKind::PrecopyData,
            1 => DevItemKind::StopCopyData,
            2 => DevItemKind::InitialDone,
            3 => DevItemKind::End,
            _ => return None,
        })
    }
    /// Whether the item carries payload bytes.
    pub fn has_data(self) -> bool {
        matches!(self, DevItemKind::PrecopyData | DevItemKind::StopCopyData)
    }
}

/// Why a header was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// First four bytes are not [`MAGIC`].
    #[error("bad magic {0:#010x}: not a Ferry migration stream")]
    BadMagic(u32),
    /// Version this build does not accept.
    #[error(
        "unsupported migration protocol version {0} (this side accepts versions \
         {MIN_VERSION}..={VERSION})"
    )]
    BadVersion(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A field is out of its bounds.
    #[error("invalid {kind:?} frame: {what}")]
    Invalid {
        /// Frame kind.
        kind: Kind,
        /// What is wrong.
        what: String,
    },
}

impl From<WireError> for MigrationError {
    fn from(e: WireError) -> Self {
        MigrationError::Protocol(e.to_string())
    }
}

pub(crate) fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

/// Turns a received ERROR/ABORT payload into text (lossy UTF-8, bounded).
pub fn message_text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Truncates a message to [`MAX_MESSAGE_LEN`] bytes on a char boundary.
pub fn bounded_message(msg: &str) -> &str {
    let max = MAX_MESSAGE_LEN as usize;
    if msg.len() <= max {
        return msg;
    }
    let mut end = max;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}
