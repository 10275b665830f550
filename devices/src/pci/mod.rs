//! PCI: the function interface the bus drives ([`PciDevice`]), the
//! interrupt and DMA hooks a function gets from the VMM ([`MsiSink`],
//! [`DmaTarget`]), and the state of a function's virtualized PCI layer
//! ([`PciFunctionState`]) that travels in the VM state of a migration.
//!
//! The layout of the bus (ECAM base, MMIO windows, BAR allocation) is in
//! `arch::pci`; the bus itself, the host bridge, and the config-space and
//! MSI-X helpers that device models embed live in this module's children:
//! [`bus::PciBus`] (host bridge, ECAM and 0xCF8/0xCFC decode, BAR routing),
//! [`config::PciConfig`] (type-0 config space), [`msix::Msix`] (MSI-X
//! capability, table, PBA) and [`msi::Msi`] (MSI capability).

use std::ops::Range;
use std::os::fd::RawFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::Result;

pub mod bus;
pub mod config;
pub mod msi;
pub mod msix;

/// Config space size of a PCI Express function (ECAM: 4 KiB per function).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers of a type-0 header.
pub const NUM_BARS: usize = 6;

/// One decoded BAR as the bus must route it.
///
/// Invariant: `range` is non-empty, naturally aligned to its (power of two)
/// size, and only reported while the function's command register enables
/// the matching decode (memory or I/O).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarMapping {
    /// BAR index (0..6; a 64-bit BAR is reported by its low index).
    pub bar: u8,
    /// Guest-physical (memory) or port (I/O) addresses the BAR decodes.
    pub range: Range<u64>,
    /// How accesses reach the function.
    pub kind: BarKind,
}

/// How the accesses to a BAR are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BarKind {
    /// Every access exits to the VMM and goes to
    /// [`PciDevice::bar_read`]/[`PciDevice::bar_write`].
    Trap,
    /// Parts of the BAR are host memory the VMM may map straight into the
    /// guest as KVM memory slots: `(offset in the BAR, length, host address)`.
    /// Accesses outside those parts trap.
    ///
    /// Invariant: each host range stays mapped for the function's life.
    Mapped(Vec<(u64, u64, u64)>),
    /// I/O space BAR (always trapped).
    Io,
}

/// An MSI message as the guest programmed it.
///
/// Invariant: none beyond the PCI encoding (`address` is the 64-bit message
/// address, `data` the 32-bit message data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    /// Message address (x86: 0xFEEx_xxxx plus destination bits).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// Where a function's MSI/MSI-X vectors go: the VMM implements it with KVM
/// GSI routing and one irqfd per vector.
///
/// Invariant: vectors are `0..count` as given when the sink was made; a
/// vector without a route drops nothing silently: [`MsiSink::signal`] on it
/// returns an error.
pub trait MsiSink: Send + Sync {
    /// Number of vectors this sink serves.
    fn count(&self) -> u16;
    /// Routes `vector` to `msg` (`Some`), or removes its route (`None`: the
    /// vector is disabled).
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> Result<()>;
    /// Injects `vector` now (an eventfd write).
    fn signal(&self, vector: u16) -> Result<()>;
    /// The eventfd that injects `vector`, for a kernel VFIO device to signal
    /// directly (VFIO_DEVICE_SET_IRQS). It stays open for the sink's life.
    fn eventfd(&self, vector: u16) -> Option<RawFd>;
}

/// The DMA side of a function: the IOMMU mappings it may use.
///
/// Invariant: DMA by the function only reaches guest-physical ranges mapped
/// here, with the host addresses given; `iova` is the guest-physical
/// address (identity IOVA).
pub trait DmaTarget: Send + Sync {
    /// Maps `[iova, iova + size)` to host memory at `host_addr` for device
    /// reads and writes (VFIO_IOMMU_MAP_DMA semantics).
    ///
    /// # Safety
    /// `[host_addr, host_addr + size)` must be mapped, writable memory that
    /// stays mapped until [`DmaTarget::dma_unmap`] of the same range or the
    /// function is dropped.
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> Result<()>;
    /// Removes the mapping of `[iova, iova + size)` (exactly a range given
    /// to `dma_map`).
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()>;
}

/// A function on the PCI bus (bus 0).
///
/// Invariants: config accesses are 1, 2 or 4 bytes, naturally aligned,
/// with `offset + len <= CONFIG_SPACE_SIZE` (the bus checks this before
/// calling); BAR accesses are 1 to 8 bytes inside a BAR that
/// [`PciDevice::bars`] reported. No input makes an implementation panic.
pub trait PciDevice: Send + Sync {
    /// The device id (`id=` on the command line).
    fn id(&self) -> &str;
    /// Reads config space at `offset` into `data`.
    fn config_read(&self, offset: u16, data: &mut [u8]);
    /// Writes config space at `offset`. The bus calls [`PciDevice::bars`]
    /// afterwards to see whether decoding changed.
    fn config_write(&self, offset: u16, data: &[u8]);
    /// The BARs decoded now (empty while decoding is disabled).
    fn bars(&self) -> Vec<BarMapping>;
    /// Reads `data.len()` bytes at `offset` of BAR `bar`.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]);
    /// Writes `data` at `offset` of BAR `bar`.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]);
    /// BAR sizes and flags before any guest programming, for the boot-time
    /// allocation: `(bar, size, is_64bit, is_prefetchable, is_io)`.
    fn bar_requests(&self) -> Vec<BarRequest>;
    /// Programs BAR `bar` to `addr` (boot-time allocation, firmware-like)
    /// and enables decoding of the kind the function has.
    fn assign_bar(&self, bar: u8, addr: u64);
    /// MSI-X (else MSI) vectors the function has (0: none).
    fn msi_vectors(&self) -> u16 {
        0
    }
    /// Hands the function its interrupt sink (once, before the VM runs).
    fn attach_msi(&self, _sink: Arc<dyn MsiSink>) -> Result<()> {
        Ok(())
    }
    /// The DMA side, if the function does DMA.
    fn dma(&self) -> Option<&dyn DmaTarget> {
        None
    }
    /// Saves the virtualized PCI layer (config header, BARs, MSI/MSI-X).
    fn save_pci(&self) -> PciFunctionState;
    /// Restores a saved PCI layer (on a migration destination, before the
    /// VM starts). Re-programs interrupt routes through the sink.
    fn restore_pci(&self, state: &PciFunctionState) -> Result<()>;
}

/// A BAR the function asks for at boot.
///
/// Invariant: `size` is a power of two, at least 16 bytes (memory) or 4
/// bytes (I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarRequest {
    /// BAR index.
    pub bar: u8,
    /// Size in bytes.
    pub size: u64,
    /// 64-bit memory BAR (takes `bar` and `bar + 1`).
    pub is_64bit: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// I/O space BAR.
    pub is_io: bool,
}

/// One MSI-X table entry as the guest wrote it.
///
/// Invariant: none (raw register values).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    /// Message address, low 32 bits.
    pub addr_lo: u32,
    /// Message address, high 32 bits.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub ctrl: u32,
}

/// The MSI-X state of a function.
///
/// Invariant: `pba.len() == entries.len().div_ceil(64)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// MSI-X Enable (message control bit 15).
    pub enabled: bool,
    /// Function Mask (message control bit 14).
    pub function_masked: bool,
    /// The table.
    pub entries: Vec<MsixEntry>,
    /// Pending bits.
    pub pba: Vec<u64>,
}

/// The virtualized PCI layer of a function, as saved in the VM state.
///
/// Invariants: `config.len() <= CONFIG_SPACE_SIZE`; `bars.len() ==
/// NUM_BARS`. A restore validates both and refuses anything else.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciFunctionState {
    /// Device id the state belongs to.
    pub id: String,
    /// Config space as the guest reads it (virtualized registers included).
    pub config: Vec<u8>,
    /// BAR addresses as programmed (0 when unassigned).
    pub bars: Vec<u64>,
    /// MSI-X state, if the function has MSI-X.
    pub msix: Option<MsixState>,
}
