//! The wire format: fixed 64-byte little-endian frame headers, RAM range
//! tables and the setup payload. Pure encoding/decoding, no I/O.
//!
//! Everything decoded here comes from the network and is validated before it
//! is returned: unknown kinds, reserved bits, lengths over their bounds and
//! ranges outside guest RAM are errors, never panics. The byte layout is
//! documented in `docs/migration-protocol.md`.

use crate::api::DeviceStateMode;
use crate::error::MigrationError;
use crate::traits::{MigCaps, RamRegion, PAGE_SIZE};

/// `b"FRRY"` read as a little-endian u32: first four bytes of every frame.
pub const MAGIC: u32 = u32::from_le_bytes(*b"FRRY");
/// The only protocol version this build speaks. Version 2 added the
/// READY/COMMIT switch-over handshake and RATE frames; a version-1 peer is
/// refused at HELLO (it would start the VM without waiting for COMMIT).
pub const VERSION: u16 = 2;
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
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
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
    /// Version this build does not speak.
    #[error("unsupported migration protocol version {0} (this side speaks {VERSION})")]
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

/// A decoded frame header. Invariant (after [`Header::decode`]): `len` and
/// `count` are within the bounds of `kind`, reserved `flags` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame kind.
    pub kind: Kind,
    /// Reserved, zero.
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

    /// Encodes with [`MAGIC`] and [`VERSION`].
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
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
        if version != VERSION {
            return Err(WireError::BadVersion(version));
        }
        let kind_raw = u16::from_le_bytes(arr(&b[6..8]));
        let kind = Kind::from_u16(kind_raw).ok_or(WireError::UnknownKind(kind_raw))?;
        let h = Header {
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

    fn invalid(&self, what: impl Into<String>) -> WireError {
        WireError::Invalid {
            kind: self.kind,
            what: what.into(),
        }
    }

    fn validate(&self) -> Result<(), WireError> {
        if self.flags != 0 {
            return Err(self.invalid(format!("reserved flags {:#x}", self.flags)));
        }
        if self.kind != Kind::Ram && self.count != 0 {
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
            | Kind::Rate => 0,
            Kind::Error | Kind::Abort => MAX_MESSAGE_LEN,
            Kind::Setup => MAX_SETUP_LEN,
            Kind::State => MAX_STATE_LEN,
            Kind::Device => MAX_DEVICE_CHUNK,
            Kind::Ram => {
                if self.count == 0 || self.count > MAX_RANGES {
                    return Err(self.invalid(format!("{} range entries", self.count)));
                }
                let table = self.count as u64 * RANGE_ENTRY_LEN as u64;
                let data = self
                    .len
                    .checked_sub(table)
                    .ok_or_else(|| self.invalid("length shorter than its range table"))?;
                if data % PAGE_SIZE != 0 || data / PAGE_SIZE > MAX_PACKET_PAGES {
                    return Err(self.invalid(format!("{data} data bytes")));
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
            Kind::Ack | Kind::Rate if self.a >= MAX_DEVICES as u64 => {
                return Err(self.invalid(format!("device index {}", self.a)));
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

    /// The device item kind of a validated DEVICE header.
    pub fn dev_item(&self) -> DevItemKind {
        DevItemKind::from_u64(self.c).unwrap_or(DevItemKind::End)
    }

    /// Bytes of page data of a validated RAM header.
    pub fn ram_data_len(&self) -> u64 {
        self.len
            .saturating_sub(self.count as u64 * RANGE_ENTRY_LEN as u64)
    }
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

/// One entry of a RAM range table as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeEntry {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Pages in the range (≥ 1).
    pub npages: u32,
    /// [`RANGE_ZERO`] or 0.
    pub flags: u32,
}

impl RangeEntry {
    /// Appends the 16-byte encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gpa.to_le_bytes());
        out.extend_from_slice(&self.npages.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
    }
}

/// A validated range: inside region `region` of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRange {
    /// Index of the region in the RAM layout.
    pub region: usize,
    /// First page, relative to the region.
    pub first_page: u64,
    /// Pages (≥ 1).
    pub npages: u64,
    /// Zero pages: no data follows.
    pub zero: bool,
}

/// Finds the region holding `[gpa, gpa + len)` wholly; `None` if none does.
pub fn resolve(regions: &[RamRegion], gpa: u64, len: u64) -> Option<usize> {
    regions.iter().position(|r| r.contains(gpa, len))
}

/// Decodes and validates a RAM range table against the guest RAM layout:
/// every range page-aligned, non-empty and wholly inside one region; total
/// pages ≤ [`MAX_PACKET_PAGES`]; data pages × 4 KiB == `data_len`.
pub fn decode_ranges(
    table: &[u8],
    data_len: u64,
    regions: &[RamRegion],
    out: &mut Vec<ResolvedRange>,
) -> Result<(), MigrationError> {
    out.clear();
    if table.len() % RANGE_ENTRY_LEN != 0 {
        return Err(MigrationError::proto(
            "range table length not a multiple of 16",
        ));
    }
    let mut total_pages = 0u64;
    let mut data_pages = 0u64;
    for e in table.chunks_exact(RANGE_ENTRY_LEN) {
        let gpa = u64::from_le_bytes(arr(&e[0..8]));
        let npages = u32::from_le_bytes(arr(&e[8..12])) as u64;
        let flags = u32::from_le_bytes(arr(&e[12..16]));
        if flags & !RANGE_ZERO != 0 {
            return Err(MigrationError::proto(format!("range flags {flags:#x}")));
        }
        if npages == 0 || gpa % PAGE_SIZE != 0 {
            return Err(MigrationError::proto(format!(
                "invalid range gpa {gpa:#x} pages {npages}"
            )));
        }
        total_pages += npages;
        if total_pages > MAX_PACKET_PAGES {
            return Err(MigrationError::proto("RAM packet carries too many pages"));
        }
        let len = npages * PAGE_SIZE;
        let region = resolve(regions, gpa, len).ok_or_else(|| {
            MigrationError::proto(format!("range {gpa:#x}+{len:#x} is outside guest RAM"))
        })?;
        let zero = flags & RANGE_ZERO != 0;
        if !zero {
            data_pages += npages;
        }
        out.push(ResolvedRange {
            region,
            first_page: (gpa - regions[region].gpa) / PAGE_SIZE,
            npages,
            zero,
        });
    }
    if data_pages * PAGE_SIZE != data_len {
        return Err(MigrationError::proto(format!(
            "range table announces {} data bytes, frame carries {data_len}",
            data_pages * PAGE_SIZE
        )));
    }
    Ok(())
}

/// Description of one device in SETUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Device id.
    pub id: String,
    /// Its capabilities on the source.
    pub caps: MigCaps,
}

/// Payload of SETUP. Invariant after decode: all lengths within the bounds
/// above, regions page-aligned.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// `SourceVm::config()` bytes.
    pub config: Vec<u8>,
    /// RAM layout as (gpa, size).
    pub regions: Vec<(u64, u64)>,
    /// Devices in order.
    pub devices: Vec<DeviceDesc>,
    /// Largest device chunk the source sends.
    pub chunk_bytes: u64,
    /// Where device data travels.
    pub device_mode: DeviceStateMode,
}

fn caps_bits(c: MigCaps) -> u32 {
    (c.stop_copy as u32) | (c.p2p as u32) << 1 | (c.pre_copy as u32) << 2
}

impl Setup {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(self.config.len() + 64);
        o.extend_from_slice(&(self.config.len() as u32).to_le_bytes());
        o.extend_from_slice(&self.config);
        o.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (gpa, size) in &self.regions {
            o.extend_from_slice(&gpa.to_le_bytes());
            o.extend_from_slice(&size.to_le_bytes());
        }
        o.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        for d in &self.devices {
            o.extend_from_slice(&caps_bits(d.caps).to_le_bytes());
            o.extend_from_slice(&(d.id.len() as u16).to_le_bytes());
            o.extend_from_slice(d.id.as_bytes());
        }
        o.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        o.push(match self.device_mode {
            DeviceStateMode::Channels => 0,
            DeviceStateMode::Main => 1,
        });
        o
    }

    /// Decodes and bounds-checks a payload.
    pub fn decode(b: &[u8]) -> Result<Setup, MigrationError> {
        let mut c = Cursor { b, pos: 0 };
        let clen = c.u32()? as u64;
        if clen > MAX_CONFIG_LEN {
            return Err(MigrationError::proto(format!("config of {clen} bytes")));
        }
        let config = c.take(clen as usize)?.to_vec();
        let nreg = c.u32()?;
        if nreg == 0 || nreg > MAX_REGIONS {
            return Err(MigrationError::proto(format!("{nreg} RAM regions")));
        }
        let mut regions = Vec::with_capacity(nreg as usize);
        for _ in 0..nreg {
            let gpa = c.u64()?;
            let size = c.u64()?;
            if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || gpa.checked_add(size).is_none() {
                return Err(MigrationError::proto("unaligned RAM region"));
            }
            regions.push((gpa, size));
        }
        let ndev = c.u32()?;
        if ndev > MAX_DEVICES {
            return Err(MigrationError::proto(format!("{ndev} devices")));
        }
        let mut devices = Vec::with_capacity(ndev as usize);
        for _ in 0..ndev {
            let bits = c.u32()?;
            let idlen = c.u16()? as usize;
            if idlen > MAX_DEVICE_ID || bits & !7 != 0 {
                return Err(MigrationError::proto("invalid device description"));
            }
            let id = String::from_utf8(c.take(idlen)?.to_vec())
                .map_err(|_| MigrationError::proto("device id is not UTF-8"))?;
            let caps = MigCaps {
                stop_copy: bits & 1 != 0,
                p2p: bits & 2 != 0,
                pre_copy: bits & 4 != 0,
            };
            devices.push(DeviceDesc { id, caps });
        }
        let chunk_bytes = c.u64()?;
        if chunk_bytes == 0 || chunk_bytes > MAX_DEVICE_CHUNK {
            return Err(MigrationError::proto(format!(
                "device chunk of {chunk_bytes} bytes"
            )));
        }
        let device_mode = match c.u8()? {
            0 => DeviceStateMode::Channels,
            1 => DeviceStateMode::Main,
            v => return Err(MigrationError::proto(format!("device mode {v}"))),
        };
        if c.pos != b.len() {
            return Err(MigrationError::proto("trailing bytes in SETUP"));
        }
        Ok(Setup {
            config,
            regions,
            devices,
            chunk_bytes,
            device_mode,
        })
    }
}

/// Bounds-checked reader over a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MigrationError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| MigrationError::proto("truncated SETUP payload"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MigrationError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MigrationError> {
        Ok(u16::from_le_bytes(arr(self.take(2)?)))
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        Ok(u32::from_le_bytes(arr(self.take(4)?)))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        Ok(u64::from_le_bytes(arr(self.take(8)?)))
    }
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
