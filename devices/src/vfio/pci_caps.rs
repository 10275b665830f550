//! Parsing of a device's PCI config space as the kernel hands it over:
//! the capability list (MSI 0x05, MSI-X 0x11), BAR flag bits. Pure code
//! over bytes; hostile data (loops, pointers out of range, tables outside
//! their BAR) is dropped with a warning, never trusted.

/// Capability ID of MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Capability ID of MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Config offset of the status register.
pub const STATUS: usize = 0x06;
/// Status bit: capability list present.
pub const STATUS_CAP_LIST: u16 = 1 << 4;
/// Config offset of the capabilities pointer.
pub const CAP_PTR: usize = 0x34;
/// First offset a capability may live at (after the type-0 header).
pub const CAP_MIN: usize = 0x40;
/// Conventional config space size (capabilities live below it).
pub const CONVENTIONAL_SIZE: usize = 0x100;

/// One capability of the list.
///
/// Invariant: `offset` is dword aligned and in `CAP_MIN..CONVENTIONAL_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Capability ID.
    pub id: u8,
    /// Config offset of the capability header.
    pub offset: usize,
}

fn u16_at(cfg: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*cfg.get(off)?, *cfg.get(off + 1)?]))
}

fn u32_at(cfg: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes([
        *cfg.get(off)?,
        *cfg.get(off + 1)?,
        *cfg.get(off + 2)?,
        *cfg.get(off + 3)?,
    ]))
}

/// Walks the capability list of `cfg` (at least the 256 conventional
/// bytes). The walk stops at a 0 pointer, at a pointer below 0x40 or past
/// 0xFC, and at the first pointer seen twice (a loop): what was found up to
/// there is returned.
pub fn walk(cfg: &[u8]) -> Vec<Cap> {
    let mut caps = Vec::new();
    let status = u16_at(cfg, STATUS).unwrap_or(0);
    if status & STATUS_CAP_LIST == 0 {
        return caps;
    }
    let mut ptr = cfg.get(CAP_PTR).copied().unwrap_or(0) as usize & !3;
    while ptr != 0 {
        if !(CAP_MIN..CONVENTIONAL_SIZE).contains(&ptr) || ptr + 2 > cfg.len() {
            log::warn!("PCI capability pointer {ptr:#x} out of range: list cut there");
            break;
        }
        if caps.iter().any(|c: &Cap| c.offset == ptr) {
            log::warn!("PCI capability list loops at {ptr:#x}: list cut there");
            break;
        }
        caps.push(Cap {
            id: cfg[ptr],
            offset: ptr,
        });
        ptr = cfg[ptr + 1] as usize & !3;
    }
    caps
}

/// The MSI-X capability as parsed from config space.
///
/// Invariant: `vectors` in 1..=2048; table and PBA lie inside BAR
/// `table_bar`/`pba_bar` of size given to [`MsixCap::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    /// Config offset of the capability.
    pub offset: usize,
    /// Table size (vectors).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in its BAR.
    pub table_offset: u64,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in its BAR.
    pub pba_offset: u64,
}

impl MsixCap {
    /// Bytes of the table (16 per vector).
    pub fn table_len(&self) -> u64 {
        self.vectors as u64 * 16
    }
    /// Bytes of the PBA (a u64 per 64 vectors).
    pub fn pba_len(&self) -> u64 {
        (self.vectors as u64).div_ceil(64) * 8
    }

    /// Parses the capability at `offset`; `bar_size(i)` is the size of
    /// memory BAR `i` (0 if absent or I/O). `None` (with a warning) when the
    /// table or the PBA does not fit its BAR.
    pub fn parse(cfg: &[u8], offset: usize, bar_size: impl Fn(u8) -> u64) -> Option<Self> {
        let ctrl = u16_at(cfg, offset + 2)?;
        let table = u32_at(cfg, offset + 4)?;
        let pba = u32_at(cfg, offset + 8)?;
        let cap = MsixCap {
            offset,
            vectors: (ctrl & 0x7ff) + 1,
            table_bar: (table & 7) as u8,
            table_offset: (table & !7) as u64,
            pba_bar: (pba & 7) as u8,
            pba_offset: (pba & !7) as u64,
        };
        let fits = |bar: u8, off: u64, len: u64| bar < 6 && off + len <= bar_size(bar);
        if !fits(cap.table_bar, cap.table_offset, cap.table_len())
            || !fits(cap.pba_bar, cap.pba_offset, cap.pba_len())
        {
            log::warn!("MSI-X table or PBA outside its BAR ({cap:?}): MSI-X hidden");
            return None;
        }
        Some(cap)
    }
}

/// The MSI capability layout.
///
/// Invariant: `vectors` is a power of two in 1..=32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    /// Config offset of the capability.
    pub offset: usize,
    /// 64-bit message address.
    pub is_64bit: bool,
    /// Per-vector masking (mask and pending registers present).
    pub per_vector_mask: bool,
    /// Multiple Message Capable, as a count.
    pub vectors: u8,
}

impl MsiCap {
    /// Parses the capability at `offset`.
    pub fn parse(cfg: &[u8], offset: usize) -> Option<Self> {
        let ctrl = u16_at(cfg, offset + 2)?;
        let mmc = ((ctrl >> 1) & 7).min(5);
        let cap = MsiCap {
            offset,
            is_64bit: ctrl & (1 << 7) != 0,
            per_vector_mask: ctrl & (1 << 8) != 0,
            vectors: 1 << mmc,
        };
        if offset + cap.len() > CONVENTIONAL_SIZE {
            log::warn!("MSI capability at {offset:#x} runs past the config header: hidden");
            return None;
        }
        Some(cap)
    }
    /// Bytes of the capability.
    pub fn len(&self) -> usize {
        match (self.is_64bit, self.per_vector_mask) {
            (false, false) => 10,
            (true, false) => 14,
            (false, true) => 20,
            (true, true) => 24,
        }
    }
    /// Never empty (for clippy's `len` without `is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }
    /// Offset (from the capability) of the message data.
    pub fn data_offset(&self) -> usize {
        if self.is_64bit {
            12
        } else {
            8
        }
    }
    /// Offset (from the capability) of the mask bits, if present.
    pub fn mask_offset(&self) -> Option<usize> {
        self.per_vector_mask.then(|| self.data_offset() + 4)
    }
}

/// A memory or I/O BAR of the device.
///
/// Invariant: `size` is a power of two, >= 16 (memory) or >= 4 (I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// Size in bytes.
    pub size: u64,
    /// I/O space.
    pub is_io: bool,
    /// 64-bit memory BAR (uses the next BAR register as its high half).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
}

impl BarInfo {
    /// Decodes BAR register `raw` (as the device's config space shows it)
    /// with the region size the kernel reports; `None` for an absent BAR or
    /// a size that is not a power of two (ignored with a warning).
    pub fn decode(bar: u8, raw: u32, size: u64) -> Option<Self> {
        if size == 0 {
            return None;
        }
        let is_io = raw & 1 != 0;
        let min = if is_io { 4 } else { 16 };
        if !size.is_power_of_two() || size < min || (is_io && size > 0x1_0000) {
            log::warn!("BAR{bar}: size {size:#x} is not a valid BAR size: ignored");
            return None;
        }
        let is_64bit = !is_io && (raw >> 1) & 3 == 2;
        if !is_io && !is_64bit && size > 1 << 31 {
            log::warn!("BAR{bar}: 32-bit BAR of {size:#x} bytes: ignored");
            return None;
        }
        Some(BarInfo {
            size,
            is_io,
            is_64bit: is_64bit && bar < 5,
            prefetchable: !is_io && raw & 8 != 0,
        })
    }
    /// The read-only low bits of the BAR register (type flags).
    pub fn flag_bits(&self) -> u32 {
        if self.is_io {
            1
        } else {
            (if self.is_64bit { 4 } else { 0 }) | (if self.prefetchable { 8 } else { 0 })
        }
    }
}
