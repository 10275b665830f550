//! The PCI bus of the guest (bus 0): the host bridge at 00:00.0, one
//! function per device from 00:01.0 upward, config access through ECAM and
//! the legacy 0xCF8/0xCFC ports, and the routing of BAR accesses.
//!
//! Device *index* `i` (0-based, in [`PciBus::add_device`] order) sits at
//! device number `i + 1`, function 0. After every config write the bus asks
//! the written function for its [`PciDevice::bars`] and returns what changed
//! as [`BarChange`]s, so the VMM can move KVM slots of [`BarKind::Mapped`]
//! parts. The bus does not check BARs against RAM or other MMIO: a guest
//! that programs overlapping BARs gets the first match.
//!
//! Port 0xCF9: a *byte* access there is the chipset's reset control
//! register, which the VMM keeps; [`PciBus::handles_port`] says false for
//! it and the bus ignores it.

use std::sync::Arc;

use arch::pci::{
    allocate_bars, ecam_decode, BarAllocRequest, PciWindows, PCI_CONFIG_ADDRESS_PORT,
    PCI_CONFIG_DATA_PORT, PCI_DEVICES_PER_BUS, PCI_ECAM_SIZE, PCI_HOST_BRIDGE_CLASS,
    PCI_HOST_BRIDGE_DEVICE, PCI_HOST_BRIDGE_VENDOR,
};

use super::config::{PciConfig, PciHeader};
use super::{BarKind, BarMapping, PciDevice, PciFunctionState, CONFIG_SPACE_SIZE};
use crate::{Error, Result};

/// CONFIG_ADDRESS: enable bit.
const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// CONFIG_ADDRESS: the bits that hold a value (enable, bus, device,
/// function, dword register); reserved bits 30:24 and 1:0 read as 0.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A change of one BAR's decoding.
///
/// Invariant: `old != new`; `device` is a device index of the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BarChange {
    /// Device index (0-based; device number `device + 1`).
    pub device: usize,
    /// BAR index.
    pub bar: u8,
    /// What the BAR decoded before (`None`: nothing).
    pub old: Option<BarMapping>,
    /// What it decodes now (`None`: nothing).
    pub new: Option<BarMapping>,
}

/// One decoded BAR in the routing table.
#[derive(Debug, Clone)]
struct Route {
    device: usize,
    map: BarMapping,
}

impl Route {
    fn is_io(&self) -> bool {
        matches!(self.map.kind, BarKind::Io)
    }
}

/// Config accesses must be 1, 2 or 4 bytes, naturally aligned, inside one
/// function's config space.
fn config_access_ok(reg: u16, len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(reg) % len == 0
        && usize::from(reg) + len <= CONFIG_SPACE_SIZE
}

/// The PCI bus.
///
/// Invariants: at most 31 devices; `routes` holds exactly the mappings
/// the devices reported after their last config write (or
/// [`PciBus::rescan`]).
pub struct PciBus {
    host: PciConfig,
    devices: Vec<Arc<dyn PciDevice>>,
    routes: Vec<Route>,
    config_address: u32,
    windows: PciWindows,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field(
                "devices",
                &self
                    .devices
                    .iter()
                    .map(|d| d.id().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("routes", &self.routes)
            .field(
                "config_address",
                &format_args!("{:#x}", self.config_address),
            )
            .finish()
    }
}

impl PciBus {
    /// A bus with only the host bridge, for a guest whose RAM ends at
    /// `ram_end` (this fixes the 64-bit window, see
    /// [`arch::pci::mmio64_window`]).
    pub fn new(ram_end: u64) -> Self {
        Self {
            host: PciConfig::new(PciHeader {
                vendor_id: PCI_HOST_BRIDGE_VENDOR,
                device_id: PCI_HOST_BRIDGE_DEVICE,
                class: PCI_HOST_BRIDGE_CLASS,
                revision: 0,
                subsystem_vendor_id: PCI_HOST_BRIDGE_VENDOR,
                subsystem_id: 0x1100,
            }),
            devices: Vec::new(),
            routes: Vec::new(),
            config_address: 0,
            windows: PciWindows::new(ram_end),
        }
    }

    /// The allocation windows of this bus.
    pub fn windows(&self) -> &PciWindows {
        &self.windows
    }

    /// Plugs `dev` into the next slot and returns its device number
    /// (1..=31). Refuses a 32nd device. Its BARs are routed from the next
    /// config write to it, [`PciBus::rescan`] or [`PciBus::allocate_bars`]
    /// (which then report them as changes).
    pub fn add_device(&mut self, dev: Arc<dyn PciDevice>) -> Result<u8> {
        if self.devices.len() + 1 >= usize::from(PCI_DEVICES_PER_BUS) {
            return Err(Error::Pci(format!(
                "no free slot on bus 0 for device {}",
                dev.id()
            )));
        }
        self.devices.push(dev);
        // At most 31 devices: fits u8.
        Ok(self.devices.len() as u8)
    }

    /// The devices in index order.
    pub fn devices(&self) -> &[Arc<dyn PciDevice>] {
        &self.devices
    }

    /// Device index `i`.
    pub fn device(&self, i: usize) -> Option<&Arc<dyn PciDevice>> {
        self.devices.get(i)
    }

    /// Every BAR decoded now, with its device index.
    pub fn mappings(&self) -> Vec<(usize, BarMapping)> {
        self.routes
            .iter()
            .map(|r| (r.device, r.map.clone()))
            .collect()
    }

    /// Re-reads the BARs of device `index` and returns what changed.
    fn refresh(&mut self, index: usize) -> Vec<BarChange> {
        let Some(dev) = self.devices.get(index) else {
            return Vec::new();
        };
        let new: Vec<BarMapping> = dev
            .bars()
            .into_iter()
            .filter(|m| m.range.start < m.range.end)
            .collect();
        let old: Vec<BarMapping> = self
            .routes
            .iter()
            .filter(|r| r.device == index)
            .map(|r| r.map.clone())
            .collect();
        let mut changes = Vec::new();
        let mut bars: Vec<u8> = old.iter().chain(new.iter()).map(|m| m.bar).collect();
        bars.sort_unstable();
        bars.dedup();
        for bar in bars {
            let o = old.iter().find(|m| m.bar == bar).cloned();
            let n = new.iter().find(|m| m.bar == bar).cloned();
            if o != n {
                changes.push(BarChange {
                    device: index,
                    bar,
                    old: o,
                    new: n,
                });
            }
        }
        self.routes.retain(|r| r.device != index);
        self.routes
            .extend(new.into_iter().map(|map| Route { device: index, map }));
        changes
    }

    /// Re-reads every device's BARs (e.g. after
    /// [`PciDevice::restore_pci`]) and returns what changed.
    pub fn rescan(&mut self) -> Vec<BarChange> {
        (0..self.devices.len())
            .flat_map(|i| self.refresh(i))
            .collect()
    }

    /// The PCI layer of every device, in index order (for the VM state).
    pub fn save_pci(&self) -> Vec<PciFunctionState> {
        self.devices.iter().map(|d| d.save_pci()).collect()
    }

    /// Restores [`PciBus::save_pci`] output on a migration destination
    /// (before the VM runs) and returns the BAR decoding changes. Refuses,
    /// before restoring anything, a state list whose length or device ids
    /// (in order) differ from this bus's devices; a device refusing its
    /// state stops the restore with its error.
    pub fn restore_pci(&mut self, states: &[PciFunctionState]) -> Result<Vec<BarChange>> {
        if states.len() != self.devices.len() {
            return Err(Error::Pci(format!(
                "saved state has {} PCI functions, this VM has {}",
                states.len(),
                self.devices.len()
            )));
        }
        for (s, d) in states.iter().zip(&self.devices) {
            if s.id != d.id() {
                return Err(Error::Pci(format!(
                    "saved PCI function `{}` where this VM has `{}`",
                    s.id.chars().take(64).collect::<String>(),
                    d.id()
                )));
            }
        }
        for (s, d) in states.iter().zip(&self.devices) {
            d.restore_pci(s)?;
        }
        Ok(self.rescan())
    }

    /// Boot-time allocation: places every device's [`PciDevice::bar_requests`]
    /// with [`arch::pci::allocate_bars`], programs them with
    /// [`PciDevice::assign_bar`] and returns the decoding changes. Refuses
    /// (assigning nothing) when the windows cannot hold every BAR.
    pub fn allocate_bars(&mut self) -> Result<Vec<BarChange>> {
        let requests: Vec<BarAllocRequest> = self
            .devices
            .iter()
            .enumerate()
            .flat_map(|(i, d)| {
                d.bar_requests().into_iter().map(move |r| BarAllocRequest {
                    function: i,
                    bar: r.bar,
                    size: r.size,
                    is_64bit: r.is_64bit,
                    prefetchable: r.prefetchable,
                    is_io: r.is_io,
                })
            })
            .collect();
        let assigned = allocate_bars(&self.windows, &requests).map_err(|e| {
            let id = self.devices.get(e_function(&e)).map(|d| d.id().to_string());
            Error::Pci(format!("device {}: {e}", id.unwrap_or_default()))
        })?;
        for a in &assigned {
            if let Some(d) = self.devices.get(a.function) {
                log::debug!(
                    "pci: {} BAR {} at {:#x} (+{:#x})",
                    d.id(),
                    a.bar,
                    a.addr,
                    a.size
                );
                d.assign_bar(a.bar, a.addr);
            }
        }
        Ok(self.rescan())
    }

    /// Config read of function `(dev, func)` register `reg`; absent
    /// functions and bad accesses read all-ones.
    fn config_read(&self, dev: u8, func: u8, reg: u16, data: &mut [u8]) {
        data.fill(0xff);
        if func != 0 || !config_access_ok(reg, data.len()) {
            return;
        }
        if dev == 0 {
            self.host.read(reg, data);
        } else if let Some(d) = self.devices.get(usize::from(dev) - 1) {
            d.config_read(reg, data);
        }
    }

    /// Config write; absent functions and bad accesses are ignored.
    fn config_write(&mut self, dev: u8, func: u8, reg: u16, data: &[u8]) -> Vec<BarChange> {
        if func != 0 || !config_access_ok(reg, data.len()) {
            return Vec::new();
        }
        if dev == 0 {
            self.host.write(reg, data);
            return Vec::new();
        }
        let index = usize::from(dev) - 1;
        let Some(d) = self.devices.get(index) else {
            return Vec::new();
        };
        d.config_write(reg, data);
        self.refresh(index)
    }

    /// An ECAM read at `offset` from [`arch::pci::PCI_ECAM_BASE`].
    /// Accesses that are not 1, 2 or 4 bytes naturally aligned inside the
    /// ECAM, or to absent functions, read all-ones.
    pub fn ecam_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= PCI_ECAM_SIZE);
        if !in_range {
            return;
        }
        if let Some((dev, func, reg)) = ecam_decode(offset) {
            self.config_read(dev, func, reg, data);
        }
    }

    /// An ECAM write at `offset`; ignored like [`PciBus::ecam_read`] reads
    /// all-ones. Returns the BAR decoding changes it caused.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) -> Vec<BarChange> {
        let in_range = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= PCI_ECAM_SIZE);
        match ecam_decode(offset) {
            Some((dev, func, reg)) if in_range => self.config_write(dev, func, reg, data),
            _ => Vec::new(),
        }
    }

    /// The port access belongs to the bus's legacy config mechanism:
    /// 0xCF8..=0xCFF except a byte access at 0xCF9 (reset control).
    pub fn handles_config_port(port: u16, len: usize) -> bool {
        (PCI_CONFIG_ADDRESS_PORT..PCI_CONFIG_DATA_PORT + 4).contains(&port)
            && !(port == 0xcf9 && len == 1)
    }

    /// The port access is served by the bus: a legacy config port
    /// ([`PciBus::handles_config_port`]) or a decoded I/O BAR.
    pub fn handles_port(&self, port: u16, len: usize) -> bool {
        Self::handles_config_port(port, len) || self.io_lookup(port).is_some()
    }

    /// Where CONFIG_DATA at `port` (`len` bytes) points: `(dev, func,
    /// reg)`, or `None` when disabled, on another bus, or misaligned.
    fn config_data_target(&self, port: u16, len: usize) -> Option<(u8, u8, u16)> {
        let a = self.config_address;
        let byte = port.checked_sub(PCI_CONFIG_DATA_PORT)?;
        if a & CONFIG_ADDRESS_ENABLE == 0 || (a >> 16) & 0xff != 0 || byte >= 4 {
            return None;
        }
        if !matches!(len, 1 | 2 | 4) || usize::from(byte) % len != 0 {
            return None;
        }
        let dev = ((a >> 11) & 0x1f) as u8;
        let func = ((a >> 8) & 7) as u8;
        let reg = (a & 0xfc) as u16 + byte;
        Some((dev, func, reg))
    }

    /// A port read. Returns false (nothing filled) when the port is not
    /// the bus's ([`PciBus::handles_port`]); otherwise fills `data`:
    /// CONFIG_ADDRESS (dword at 0xCF8), CONFIG_DATA (0xCFC..=0xCFF; all-ones
    /// when disabled, for another bus, or an absent function), or an I/O
    /// BAR. Other accesses to 0xCF8..=0xCFB read all-ones.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        if Self::handles_config_port(port, data.len()) {
            data.fill(0xff);
            if port == PCI_CONFIG_ADDRESS_PORT && data.len() == 4 {
                data.copy_from_slice(&self.config_address.to_le_bytes());
            } else if let Some((dev, func, reg)) = self.config_data_target(port, data.len()) {
                self.config_read(dev, func, reg, data);
            }
            return true;
        }
        self.io_access(port, data.len())
            .map(|(d, bar, off)| self.devices[d].bar_read(bar, off, data))
            .is_some()
    }

    /// A port write. Returns `None` when the port is not the bus's;
    /// otherwise `Some` of the BAR decoding changes (a CONFIG_DATA write
    /// may change them).
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> Option<Vec<BarChange>> {
        if Self::handles_config_port(port, data.len()) {
            if port == PCI_CONFIG_ADDRESS_PORT && data.len() == 4 {
                let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                self.config_address = v & CONFIG_ADDRESS_MASK;
                return Some(Vec::new());
            }
            return Some(match self.config_data_target(port, data.len()) {
                Some((dev, func, reg)) => self.config_write(dev, func, reg, data),
                None => Vec::new(),
            });
        }
        let (d, bar, off) = self.io_access(port, data.len())?;
        self.devices[d].bar_write(bar, off, data);
        Some(Vec::new())
    }

    fn io_lookup(&self, port: u16) -> Option<&Route> {
        let p = u64::from(port);
        self.routes
            .iter()
            .find(|r| r.is_io() && r.map.range.contains(&p))
    }

    /// `(device, bar, offset)` of an I/O BAR access that lies entirely in
    /// the BAR and is 1 to 4 bytes.
    fn io_access(&self, port: u16, len: usize) -> Option<(usize, u8, u64)> {
        let r = self.io_lookup(port)?;
        let off = u64::from(port) - r.map.range.start;
        let fits = (1..=4).contains(&len) && u64::from(port) + len as u64 <= r.map.range.end;
        fits.then_some((r.device, r.map.bar, off))
    }

    fn mmio_route(&self, addr: u64) -> Option<&Route> {
        self.routes
            .iter()
            .find(|r| !r.is_io() && r.map.range.contains(&addr))
    }

    /// The memory BAR that decodes `addr`: `(device index, bar, offset in
    /// the BAR)`.
    pub fn mmio_lookup(&self, addr: u64) -> Option<(usize, u8, u64)> {
        self.mmio_route(addr)
            .map(|r| (r.device, r.map.bar, addr - r.map.range.start))
    }

    /// `(device, bar, offset, fits)`: `fits` when the access is 1..=8
    /// bytes and ends inside the BAR.
    fn mmio_access(&self, addr: u64, len: usize) -> Option<(usize, u8, u64, bool)> {
        let r = self.mmio_route(addr)?;
        let off = addr - r.map.range.start;
        let size = r.map.range.end - r.map.range.start;
        let fits = (1..=8).contains(&len) && off + len as u64 <= size;
        Some((r.device, r.map.bar, off, fits))
    }

    /// A memory read in a BAR. Returns false when no BAR decodes `addr`.
    /// Accesses that are not 1..=8 bytes or that run past the BAR's end
    /// read all-ones (the device is not called).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((d, bar, off, fits)) = self.mmio_access(addr, data.len()) else {
            return false;
        };
        if fits {
            self.devices[d].bar_read(bar, off, data);
        } else {
            data.fill(0xff);
        }
        true
    }

    /// A memory write in a BAR. Returns false when no BAR decodes `addr`;
    /// bad accesses (as for [`PciBus::mmio_read`]) are dropped.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((d, bar, off, fits)) = self.mmio_access(addr, data.len()) else {
            return false;
        };
        if fits {
            self.devices[d].bar_write(bar, off, data);
        }
        true
    }
}

fn e_function(e: &arch::pci::BarAllocError) -> usize {
    use arch::pci::BarAllocError::*;
    match e {
        InvalidSize { function, .. } | InvalidBar { function, .. } | Exhausted { function, .. } => {
            *function
        }
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
