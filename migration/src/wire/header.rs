//! The raw 64-byte frame header: layout, encoding and validation.

use super::{
    arr, DevItemKind, Kind, WireError, FLAG_ZSTD, HEADER_LEN, MAGIC, MAX_BITMAP_LEN,
    MAX_CONNECTIONS, MAX_DEVICES, MAX_DEVICE_CHUNK, MAX_MESSAGE_LEN, MAX_PACKET_PAGES, MAX_RANGES,
    MAX_REQUEST_PAGES, MAX_SETUP_LEN, MAX_STATE_LEN, RANGE_ENTRY_LEN, ROLE_DATA, ROLE_MAIN,
    VERSION,
};
use super::{version_accepted, HANDOVER_ENTRY_LEN, MAX_HANDOVER_REGIONS};
use crate::traits::PAGE_SIZE;

/// A decoded frame header. Invariant (after [`Header::decode`]): `len` and
/// `count` are within the bounds of `kind`, reserved `flags` are zero,
/// `version` is within `MIN_VERSION..=VERSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Protocol version stamped on the frame ([`VERSION`] unless the
    /// connection negotiated an older one).
    pub version: u16,
    /// Frame kind.
    pub kind: Kind,
    /// Zero, except [`FLAG_ZSTD`] on RAM and PAGES frames.
    pub flags: u32,
    /// Entries in the RAM range table (RAM only).
    pub count: u32,
    /// Payload bytes following the header.
    pub len: u64,
    /// Kind-specific argument.
    pub a: u64,
    /// Kind-specific argument.
    pub b: u64,
    /// Kind-specific argument.
    pub c: u64,
    /// Random session id chosen by the source (0 in refusals of strangers).
    pub session: u128,
}

impl Header {
    /// A header of `kind` with every other field zero.
    pub fn new(kind: Kind, session: u128) -> Self {
        Header {
            version: VERSION,
            kind,
            flags: 0,
            count: 0,
            len: 0,
            a: 0,
            b: 0,
            c: 0,
            session,
        }
    }

    /// Sets the three arguments.
    pub fn args(mut self, a: u64, b: u64, c: u64) -> Self {
        self.a = a;
        self.b = b;
        self.c = c;
        self
    }

    /// Sets the payload length.
    pub fn with_len(mut self, len: u64) -> Self {
        self.len = len;
        self
    }

    /// Sets the protocol version stamped on the frame.
    pub fn with_version(mut self, version: u16) -> Self {
        self.version = version;
        self
    }

    /// Encodes with [`MAGIC`] and `self.version`.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.count.to_le_bytes());
        b[16..24].copy_from_slice(&self.len.to_le_bytes());
        b[24..32].copy_from_slice(&self.a.to_le_bytes());
        b[32..40].copy_from_slice(&self.b.to_le_bytes());
        b[40..48].copy_from_slice(&self.c.to_le_bytes());
        b[48..64].copy_from_slice(&self.session.to_le_bytes());
        b
    }

    /// Decodes and validates a header: magic, version, kind, reserved flags
    /// and the length bounds of the kind.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let magic = u32::from_le_bytes(arr(&b[0..4]));
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let version = u16::from_le_bytes(arr(&b[4..6]));
        if !version_accepted(version) {
            return Err(WireError::BadVersion(version));
        }
        let kind_raw = u16::from_le_bytes(arr(&b[6..8]));
        let kind = Kind::from_u16(kind_raw).ok_or(WireError::UnknownKind(kind_raw))?;
        let h = Header {
            version,
            kind,
            flags: u32::from_le_bytes(arr(&b[8..12])),
            count: u32::from_le_bytes(arr(&b[12..16])),
            len: u64::from_le_bytes(arr(&b[16..24])),
            a: u64::from_le_bytes(arr(&b[24..32])),
            b: u64::from_le_bytes(arr(&b[32..40])),
            c: u64::from_le_bytes(arr(&b[40..48])),
            session: u128::from_le_bytes(arr(&b[48..64])),
        };
        h.validate()?;
        Ok(h)
    }

    pub(crate) fn invalid(&self, what: impl Into<String>) -> WireError {
        WireError::Invalid {
            kind: self.kind,
            what: what.into(),
        }
    }

    fn validate(&self) -> Result<(), WireError> {
        let ram_like = matches!(self.kind, Kind::Ram | Kind::Pages);
        let allowed = if ram_like { FLAG_ZSTD } else { 0 };
        if self.flags & !allowed != 0 {
            return Err(self.invalid(format!("reserved flags {:#x}", self.flags)));
        }
        let packed = self.flags & FLAG_ZSTD != 0;
        if !ram_like && self.count != 0 {
            return Err(self.invalid("non-zero count"));
        }
        let max_len = match self.kind {
            Kind::Hello
            | Kind::Ok
            | Kind::Sync
            | Kind::Resumed
            | Kind::Ack
            | Kind::Keepalive
            | Kind::Ready
            | Kind::Commit
            | Kind::Rate
            | Kind::HostLoad
            | Kind::PageRequest
            | Kind::PostcopyDone
            | Kind::Resume => 0,
            Kind::Postcopy | Kind::ResumeAck => MAX_BITMAP_LEN,
            Kind::Error | Kind::Abort => MAX_MESSAGE_LEN,
            Kind::Setup => MAX_SETUP_LEN,
            Kind::State => MAX_STATE_LEN,
            Kind::Device => MAX_DEVICE_CHUNK,
            Kind::Handover => MAX_HANDOVER_REGIONS * HANDOVER_ENTRY_LEN,
            Kind::Ram | Kind::Pages => {
                if self.count == 0 || self.count > MAX_RANGES {
                    return Err(self.invalid(format!("{} range entries", self.count)));
                }
                let table = self.count as u64 * RANGE_ENTRY_LEN as u64;
                let data = self
                    .len
                    .checked_sub(table)
                    .ok_or_else(|| self.invalid("length shorter than its range table"))?;
                // Compressed: `c` is the raw data length, and the
                // compressed data is strictly shorter.
                let raw = if packed { self.c } else { data };
                if raw % PAGE_SIZE != 0 || raw / PAGE_SIZE > MAX_PACKET_PAGES {
                    return Err(self.invalid(format!("{raw} data bytes")));
                }
                if packed && (data == 0 || data >= raw) {
                    return Err(
                        self.invalid(format!("{data} compressed bytes for {raw} data bytes"))
                    );
                }
                table + MAX_PACKET_PAGES * PAGE_SIZE
            }
        };
        if self.len > max_len {
            return Err(self.invalid(format!("length {} over {}", self.len, max_len)));
        }
        match self.kind {
            Kind::Hello => {
                if self.a != ROLE_MAIN && self.a != ROLE_DATA {
                    return Err(self.invalid(format!("unknown role {}", self.a)));
                }
                if self.c == 0 || self.c > MAX_CONNECTIONS as u64 {
                    return Err(self.invalid(format!("{} data connections", self.c)));
                }
                if self.a == ROLE_DATA && self.b >= self.c {
                    return Err(self.invalid(format!("index {} of {}", self.b, self.c)));
                }
            }
            // 0: plain ERROR; 1: the VM was discarded unstarted.
            Kind::Error if self.a > super::ERROR_DISCARDED => {
                return Err(self.invalid(format!("unknown ERROR flavour {}", self.a)));
            }
            Kind::Ack | Kind::Rate if self.a >= MAX_DEVICES as u64 => {
                return Err(self.invalid(format!("device index {}", self.a)));
            }
            Kind::HostLoad if self.a == 0 || self.a > crate::host::MAX_HOST_MIGRATIONS => {
                return Err(self.invalid(format!("{} migrations on the host", self.a)));
            }
            Kind::Pages if self.a > 1 || self.b != 0 || (self.c != 0 && !packed) => {
                return Err(self.invalid(format!("arguments {} {} {}", self.a, self.b, self.c)));
            }
            Kind::Postcopy | Kind::ResumeAck if self.c != 0 => {
                return Err(self.invalid("non-zero c"));
            }
            Kind::PageRequest => {
                if self.c != 0 {
                    return Err(self.invalid("non-zero c"));
                }
                if !self.a.is_multiple_of(PAGE_SIZE) {
                    return Err(self.invalid(format!("unaligned address {:#x}", self.a)));
                }
                if self.b == 0 || self.b > MAX_REQUEST_PAGES {
                    return Err(self.invalid(format!("{} pages", self.b)));
                }
            }
            Kind::Handover => {
                if self.version < 4 {
                    return Err(self.invalid(format!("in protocol version {}", self.version)));
                }
                if self.a == 0 || self.a > MAX_HANDOVER_REGIONS || self.b != 0 || self.c != 0 {
                    return Err(self.invalid(format!("{} regions", self.a)));
                }
                if self.len != self.a * HANDOVER_ENTRY_LEN {
                    return Err(self.invalid(format!("length {} for {} regions", self.len, self.a)));
                }
            }
            Kind::Resume if self.a == 0 || self.b != 0 || self.c != 0 => {
                return Err(self.invalid(format!("epoch {} (b {}, c {})", self.a, self.b, self.c)));
            }
            Kind::Device => {
                let item = DevItemKind::from_u64(self.c)
                    .ok_or_else(|| self.invalid(format!("unknown item kind {}", self.c)))?;
                if item.has_data() != (self.len > 0) {
                    return Err(self.invalid(format!("{item:?} with {} bytes", self.len)));
                }
                if self.a >= MAX_DEVICES as u64 {
                    return Err(self.invalid(format!("device index {}", self.a)));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Bytes of page data of a validated RAM header (raw: after
    /// decompression for a compressed one).
    pub fn ram_data_len(&self) -> u64 {
        if self.flags & FLAG_ZSTD != 0 {
            self.c
        } else {
            self.ram_packed_len()
        }
    }

    /// Bytes after the range table of a validated RAM header as they are
    /// on the wire (compressed or not).
    fn ram_packed_len(&self) -> u64 {
        self.len
            .saturating_sub(self.count as u64 * RANGE_ENTRY_LEN as u64)
    }

    /// Compressed data bytes of a validated RAM header (0: not compressed).
    pub fn ram_zstd_len(&self) -> u64 {
        if self.flags & FLAG_ZSTD != 0 {
            self.ram_packed_len()
        } else {
            0
        }
    }
}
