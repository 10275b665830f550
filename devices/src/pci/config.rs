//! A type-0 PCI config space that device models embed ([`PciConfig`]).
//!
//! Every byte has a write mask: a guest write changes only the writable
//! bits, so read-only registers (ids, class, status, capability headers)
//! never change. BAR registers get their mask from the BAR size, which
//! yields the PCI sizing protocol for free: writing all-ones reads back
//! `!(size - 1)` with the type bits.

use std::ops::Range;

use super::{BarRequest, PciFunctionState, CONFIG_SPACE_SIZE, NUM_BARS};
use crate::{Error, Result};

/// Vendor ID register (16 bits).
pub const PCI_VENDOR_ID: u16 = 0x00;
/// Device ID register (16 bits).
pub const PCI_DEVICE_ID: u16 = 0x02;
/// Command register (16 bits).
pub const PCI_COMMAND: u16 = 0x04;
/// Status register (16 bits).
pub const PCI_STATUS: u16 = 0x06;
/// Revision ID (8 bits), followed by the 24-bit class code.
pub const PCI_REVISION_ID: u16 = 0x08;
/// Cache line size (8 bits, writable scratch).
pub const PCI_CACHE_LINE_SIZE: u16 = 0x0C;
/// Header type (8 bits).
pub const PCI_HEADER_TYPE: u16 = 0x0E;
/// First BAR register.
pub const PCI_BAR0: u16 = 0x10;
/// Subsystem vendor ID (16 bits).
pub const PCI_SUBSYSTEM_VENDOR_ID: u16 = 0x2C;
/// Subsystem ID (16 bits).
pub const PCI_SUBSYSTEM_ID: u16 = 0x2E;
/// Capabilities pointer (8 bits).
pub const PCI_CAPABILITY_LIST: u16 = 0x34;
/// Interrupt line (8 bits, writable scratch).
pub const PCI_INTERRUPT_LINE: u16 = 0x3C;
/// Size of the standard header; capabilities start here.
pub const PCI_HEADER_SIZE: u16 = 0x40;
/// End of the legacy config space: capabilities live below it.
pub const PCI_LEGACY_CONFIG_END: u16 = 0x100;

/// Command: I/O space decode enable.
pub const PCI_COMMAND_IO: u16 = 1 << 0;
/// Command: memory space decode enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command: bus master enable (the function may do DMA).
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command: INTx emulation disable.
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// The command bits a guest may change.
pub const PCI_COMMAND_WRITABLE: u16 =
    PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
/// Status: the capability list is present.
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;

/// Memory BAR type bits: 64-bit.
const BAR_MEM_64: u32 = 0b100;
/// Memory BAR: prefetchable.
const BAR_MEM_PREFETCH: u32 = 0b1000;
/// I/O BAR indicator bit.
const BAR_IO: u32 = 0b1;

/// The identity registers of a function.
///
/// Invariant: none (raw register values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code: class << 16 | subclass << 8 | prog-if (24 bits used).
    pub class: u32,
    /// Revision ID.
    pub revision: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// A BAR as the function declared it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BarDecl {
    size: u64,
    is_64bit: bool,
    prefetchable: bool,
    is_io: bool,
}

/// One BAR decoded now (enabled in the command register and programmed to
/// a non-zero address).
///
/// Invariant: `range` is non-empty and aligned to its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedBar {
    /// BAR index (low index of a 64-bit BAR).
    pub bar: u8,
    /// Addresses (memory) or ports (I/O) decoded.
    pub range: Range<u64>,
    /// I/O space BAR.
    pub is_io: bool,
}

/// Type-0 config space of one function.
///
/// Invariants: the buffers are [`CONFIG_SPACE_SIZE`] bytes; `wmask` bits
/// are the only ones [`PciConfig::write`] changes; the capability list is
/// well formed (each `next` pointer is 0 or a later, 4-aligned offset
/// below 0x100).
#[derive(Clone)]
pub struct PciConfig {
    data: Box<[u8; CONFIG_SPACE_SIZE]>,
    wmask: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<BarDecl>; NUM_BARS],
    /// Offset of the last capability (0: none yet).
    last_cap: u16,
    /// Where the next capability goes.
    next_cap: u16,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfig")
            .field(
                "vendor",
                &format_args!("{:#06x}", self.read_u16(PCI_VENDOR_ID)),
            )
            .field(
                "device",
                &format_args!("{:#06x}", self.read_u16(PCI_DEVICE_ID)),
            )
            .field("command", &format_args!("{:#06x}", self.command()))
            .field("bars", &self.bars)
            .finish()
    }
}

impl PciConfig {
    /// A header-type-0 function with `header`'s identity, no BARs, no
    /// capabilities, command 0, interrupt pin 0 (no INTx).
    pub fn new(header: PciHeader) -> Self {
        let mut c = Self {
            data: Box::new([0; CONFIG_SPACE_SIZE]),
            wmask: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; NUM_BARS],
            last_cap: 0,
            next_cap: PCI_HEADER_SIZE,
        };
        c.poke_u16(PCI_VENDOR_ID, header.vendor_id);
        c.poke_u16(PCI_DEVICE_ID, header.device_id);
        c.poke_u32(
            PCI_REVISION_ID,
            (header.class << 8) | u32::from(header.revision),
        );
        c.poke_u16(PCI_SUBSYSTEM_VENDOR_ID, header.subsystem_vendor_id);
        c.poke_u16(PCI_SUBSYSTEM_ID, header.subsystem_id);
        c.set_wmask(PCI_COMMAND, &PCI_COMMAND_WRITABLE.to_le_bytes());
        c.set_wmask(PCI_CACHE_LINE_SIZE, &[0xff]);
        c.set_wmask(PCI_INTERRUPT_LINE, &[0xff]);
        c
    }

    /// Declares BAR `req.bar` (a 64-bit BAR also takes `req.bar + 1`).
    ///
    /// Refuses (without changing anything) an index out of range or
    /// already used, a size that is not a power of two (at least 16 for
    /// memory, 4..=256 for I/O), or an I/O BAR marked 64-bit/prefetchable.
    pub fn add_bar(&mut self, req: BarRequest) -> Result<()> {
        let i = usize::from(req.bar);
        let err = |m: &str| Err(Error::Pci(format!("BAR {}: {m}", req.bar)));
        if i >= NUM_BARS || (req.is_64bit && i + 1 >= NUM_BARS) {
            return err("index out of range");
        }
        if self.bar_used(i) || (req.is_64bit && self.bar_used(i + 1)) {
            return err("already declared");
        }
        if req.is_io && (req.is_64bit || req.prefetchable) {
            return err("an I/O BAR cannot be 64-bit or prefetchable");
        }
        let (min, max) = if req.is_io {
            (4, 256)
        } else if req.is_64bit {
            (16, 1 << 62)
        } else {
            (16, 1 << 31)
        };
        if !req.size.is_power_of_two() || req.size < min || req.size > max {
            return err(&format!("invalid size {:#x}", req.size));
        }
        let decl = BarDecl {
            size: req.size,
            is_64bit: req.is_64bit,
            prefetchable: req.prefetchable,
            is_io: req.is_io,
        };
        let mask = !(req.size - 1);
        let reg = PCI_BAR0 + 4 * u16::from(req.bar);
        let (type_bits, low_mask) = if req.is_io {
            (BAR_IO, (mask as u32) & !0x3)
        } else {
            let t = if req.is_64bit { BAR_MEM_64 } else { 0 }
                | if req.prefetchable {
                    BAR_MEM_PREFETCH
                } else {
                    0
                };
            (t, (mask as u32) & !0xf)
        };
        self.poke_u32(reg, type_bits);
        self.set_wmask(reg, &low_mask.to_le_bytes());
        if req.is_64bit {
            self.poke_u32(reg + 4, 0);
            self.set_wmask(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[i] = Some(decl);
        Ok(())
    }

    /// BAR `i` is declared, or is the upper half of a declared 64-bit BAR.
    fn bar_used(&self, i: usize) -> bool {
        self.bars.get(i).is_some_and(|b| b.is_some())
            || (i > 0 && self.bars[i - 1].is_some_and(|b| b.is_64bit))
    }

    /// The BARs declared, as the boot-time allocation wants them.
    pub fn bar_requests(&self) -> Vec<BarRequest> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                b.map(|b| BarRequest {
                    bar: i as u8,
                    size: b.size,
                    is_64bit: b.is_64bit,
                    prefetchable: b.prefetchable,
                    is_io: b.is_io,
                })
            })
            .collect()
    }

    /// Size of BAR `i`, if declared (`None` for the upper half of a 64-bit BAR).
    pub fn bar_size(&self, i: usize) -> Option<u64> {
        self.bars.get(i).copied().flatten().map(|b| b.size)
    }

    /// BAR `i` is an I/O BAR.
    pub fn bar_is_io(&self, i: usize) -> bool {
        self.bars.get(i).copied().flatten().is_some_and(|b| b.is_io)
    }

    /// The address BAR `i` is programmed to (type bits cleared; both
    /// registers of a 64-bit BAR), or `None` if BAR `i` is not declared.
    pub fn bar_address(&self, i: usize) -> Option<u64> {
        let b = self.bars.get(i).copied().flatten()?;
        let reg = PCI_BAR0 + 4 * i as u16;
        let lo = u64::from(self.read_u32(reg));
        Some(if b.is_io {
            lo & !0x3
        } else if b.is_64bit {
            (lo & !0xf) | (u64::from(self.read_u32(reg + 4)) << 32)
        } else {
            lo & !0xf
        })
    }

    /// Programs BAR `i` to `addr` (masked to the BAR's alignment; the
    /// upper half dropped for 32-bit BARs). No effect if `i` is not declared.
    pub fn set_bar_address(&mut self, i: usize, addr: u64) {
        let Some(b) = self.bars.get(i).copied().flatten() else {
            return;
        };
        let reg = PCI_BAR0 + 4 * i as u16;
        let masked = addr & !(b.size - 1);
        let lo = self.read_u32(reg);
        let lo_w = u32::from_le_bytes(self.wmask_at(reg));
        self.poke_u32(reg, (lo & !lo_w) | (masked as u32 & lo_w));
        if b.is_64bit {
            self.poke_u32(reg + 4, (masked >> 32) as u32);
        }
    }

    /// The BARs decoded now: declared, enabled by the command register
    /// (memory or I/O decode), programmed to a non-zero address, and not
    /// wrapping around the address space.
    pub fn decoded_bars(&self) -> Vec<DecodedBar> {
        let mut out = Vec::new();
        for (i, b) in self.bars.iter().enumerate() {
            let Some(b) = b else { continue };
            let enabled = if b.is_io {
                self.io_enabled()
            } else {
                self.memory_enabled()
            };
            let Some(addr) = self.bar_address(i) else {
                continue;
            };
            if !enabled || addr == 0 {
                continue;
            }
            let limit = if b.is_io { 0x1_0000 } else { u64::MAX };
            match addr.checked_add(b.size) {
                Some(end) if end <= limit => out.push(DecodedBar {
                    bar: i as u8,
                    range: addr..end,
                    is_io: b.is_io,
                }),
                _ => {}
            }
        }
        out
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(PCI_COMMAND)
    }

    /// Sets the writable command bits to `value` (others stay as they are).
    pub fn set_command(&mut self, value: u16) {
        self.write(PCI_COMMAND, &value.to_le_bytes());
    }

    /// Memory space decode is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command() & PCI_COMMAND_MEMORY != 0
    }

    /// I/O space decode is enabled.
    pub fn io_enabled(&self) -> bool {
        self.command() & PCI_COMMAND_IO != 0
    }

    /// Bus master (DMA) is enabled.
    pub fn bus_master(&self) -> bool {
        self.command() & PCI_COMMAND_MASTER != 0
    }

    /// Appends a capability: `cap[0]` is its id, `cap[1]` (the next
    /// pointer) is filled in here, `wmask` (same length or shorter, the
    /// rest read-only) says which bits the guest may write. Returns its
    /// offset. Sets status bit 4 and links the list.
    ///
    /// Refuses a capability shorter than 2 bytes, a `wmask` longer than
    /// `cap`, or one that does not fit below 0x100.
    pub fn add_capability(&mut self, cap: &[u8], wmask: &[u8]) -> Result<u16> {
        if cap.len() < 2 || wmask.len() > cap.len() {
            return Err(Error::Pci("malformed capability".into()));
        }
        let at = self.next_cap;
        let end = usize::from(at) + cap.len();
        if end > usize::from(PCI_LEGACY_CONFIG_END) {
            return Err(Error::Pci(format!(
                "capability {:#04x} of {} bytes does not fit in config space",
                cap[0],
                cap.len()
            )));
        }
        self.poke(at, cap);
        self.poke(at + 1, &[0]);
        self.set_wmask(at, &vec![0; cap.len()]);
        self.set_wmask(at, wmask);
        // The header bytes are never writable.
        self.set_wmask(at, &[0, 0]);
        if self.last_cap == 0 {
            self.poke(PCI_CAPABILITY_LIST, &[at as u8]);
        } else {
            self.poke(self.last_cap + 1, &[at as u8]);
        }
        let status = self.read_u16(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.poke_u16(PCI_STATUS, status);
        self.last_cap = at;
        // end <= 0x100, so this fits.
        self.next_cap = ((end + 3) & !3) as u16;
        Ok(at)
    }

    /// The capabilities in list order: `(id, offset)`.
    pub fn capabilities(&self) -> Vec<(u8, u16)> {
        let mut out = Vec::new();
        let mut p = u16::from(self.data[usize::from(PCI_CAPABILITY_LIST)]) & !3;
        // At most 48 capabilities fit in 0x40..0x100: bounded walk.
        while (PCI_HEADER_SIZE..PCI_LEGACY_CONFIG_END).contains(&p) && out.len() < 48 {
            out.push((self.data[usize::from(p)], p));
            p = u16::from(self.data[usize::from(p) + 1]) & !3;
        }
        out
    }

    /// The offset of the first capability with id `id`.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        self.capabilities()
            .into_iter()
            .find(|(c, _)| *c == id)
            .map(|(_, o)| o)
    }

    /// Guest read of `data.len()` bytes at `offset`; bytes outside config
    /// space read as 0xff.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            *d = self.data.get(at).copied().unwrap_or(0xff);
        }
    }

    /// Guest write: changes only the writable bits of the bytes in config
    /// space (bytes outside are ignored).
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            let at = usize::from(offset) + i;
            if at >= CONFIG_SPACE_SIZE {
                break;
            }
            let w = self.wmask[at];
            self.data[at] = (self.data[at] & !w) | (v & w);
        }
    }

    /// Sets bytes regardless of the write mask (device-side updates, e.g.
    /// virtualized registers). Out-of-range bytes are ignored.
    pub fn poke(&mut self, offset: u16, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            if let Some(d) = self.data.get_mut(usize::from(offset) + i) {
                *d = *v;
            }
        }
    }

    /// Sets the write mask of the bytes at `offset` (out-of-range ignored).
    pub fn set_wmask(&mut self, offset: u16, mask: &[u8]) {
        for (i, v) in mask.iter().enumerate() {
            if let Some(d) = self.wmask.get_mut(usize::from(offset) + i) {
                *d = *v;
            }
        }
    }

    fn wmask_at(&self, offset: u16) -> [u8; 4] {
        let mut b = [0u8; 4];
        for (i, d) in b.iter_mut().enumerate() {
            *d = self
                .wmask
                .get(usize::from(offset) + i)
                .copied()
                .unwrap_or(0);
        }
        b
    }

    /// Little-endian u16 at `offset` (0xffff past the end).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0u8; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    /// Little-endian u32 at `offset` (0xffff_ffff past the end).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0u8; 4];
        self.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// [`PciConfig::poke`] of a little-endian u16.
    pub fn poke_u16(&mut self, offset: u16, v: u16) {
        self.poke(offset, &v.to_le_bytes());
    }

    /// [`PciConfig::poke`] of a little-endian u32.
    pub fn poke_u32(&mut self, offset: u16, v: u32) {
        self.poke(offset, &v.to_le_bytes());
    }

    /// The whole config space as the guest reads it.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..]
    }

    /// Saves the config space and BAR addresses into a [`PciFunctionState`]
    /// for device `id` (`msix` left `None`: the MSI-X model fills it).
    /// `bars[i]` is [`PciConfig::bar_address`] or 0.
    pub fn save(&self, id: &str) -> PciFunctionState {
        PciFunctionState {
            id: id.to_string(),
            config: self.data.to_vec(),
            bars: (0..NUM_BARS)
                .map(|i| self.bar_address(i).unwrap_or(0))
                .collect(),
            msix: None,
        }
    }

    /// Restores a saved config space: refuses a state whose `config` is
    /// shorter than the header or longer than [`CONFIG_SPACE_SIZE`],
    /// whose `bars` is not [`NUM_BARS`] long, whose identity (vendor,
    /// device, revision, class, header type) differs from this function,
    /// or that programs an undeclared BAR. Only writable bits are taken
    /// from the saved bytes; nothing changes on refusal.
    pub fn restore(&mut self, state: &PciFunctionState) -> Result<()> {
        let cfg = &state.config;
        if cfg.len() < usize::from(PCI_HEADER_SIZE) || cfg.len() > CONFIG_SPACE_SIZE {
            return Err(Error::Pci(format!(
                "{}: saved config space of {} bytes (expected {}..={})",
                state.id,
                cfg.len(),
                PCI_HEADER_SIZE,
                CONFIG_SPACE_SIZE
            )));
        }
        if state.bars.len() != NUM_BARS {
            return Err(Error::Pci(format!(
                "{}: {} saved BARs (expected {NUM_BARS})",
                state.id,
                state.bars.len()
            )));
        }
        let ident = |b: &[u8]| [&b[0..4], &b[8..12], &b[14..15]].concat();
        if ident(cfg) != ident(&self.data[..]) {
            return Err(Error::Pci(format!(
                "{}: saved config space belongs to another kind of function",
                state.id
            )));
        }
        for (i, addr) in state.bars.iter().enumerate() {
            if *addr != 0 && self.bars[i].is_none() {
                return Err(Error::Pci(format!(
                    "{}: saved state programs undeclared BAR {i}",
                    state.id
                )));
            }
        }
        let mut next = self.clone();
        for (at, v) in cfg.iter().enumerate() {
            let w = next.wmask[at];
            next.data[at] = (next.data[at] & !w) | (v & w);
        }
        for (i, addr) in state.bars.iter().enumerate() {
            if self.bars[i].is_some() {
                next.set_bar_address(i, *addr);
            }
        }
        *self = next;
        Ok(())
    }
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
