//! The PCI bus of a VM, wired to KVM: the bus (host bridge and the devices
//! in command-line order), BARs allocated at boot, one MSI sink per
//! function, guest RAM DMA-mapped in every function that does DMA, the
//! mapped parts of BARs as KVM slots, and the save/restore of every
//! function's PCI layer.

use std::sync::{Arc, RwLock};

use arch::pci::{PCI_ECAM_BASE, PCI_ECAM_SIZE};
use devices::pci::bus::{BarChange, PciBus};
use devices::pci::{BarKind, PciDevice, PciFunctionState};
use kvm_ioctls::VmFd;
use log::{debug, info};

use super::bars::{mapped_parts, BarSlots};
use super::dma::{map_ram, DmaMappings};
use super::io::PciIo;
use super::msi::{KvmMsiSink, MsiRouter};
use crate::memory::GuestRam;

/// KVM slots kept for mapped BAR parts (above the RAM slots).
pub const MAX_BAR_SLOTS: u32 = 64;

/// The PCI side of one VM.
///
/// Invariants: the bus holds the devices in command-line order (device
/// index `i` = `functions()[i]`, at 00:`i+1`.0); `sinks`, `dma` and the
/// BAR slots live as long as the VM (dropped with it, the DMA mappings
/// before the RAM they map); the BAR slots equal the mapped parts of the
/// BARs as decoded after the last config write or restore.
pub struct PciWiring {
    bus: RwLock<PciBus>,
    slots: BarSlots,
    router: Arc<MsiRouter>,
    _sinks: Vec<Arc<KvmMsiSink>>,
    _dma: Vec<DmaMappings>,
}

impl std::fmt::Debug for PciWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciWiring")
            .field("bus", &self.bus)
            .finish_non_exhaustive()
    }
}

impl PciWiring {
    /// Builds the bus of `functions` for the VM `fd` over `ram` (whose KVM
    /// slots are `0..ram.regions().len()`): sinks attached, RAM DMA-mapped
    /// and, with `allocate` (a VM this VMM boots, not one it receives),
    /// BARs placed in the windows.
    pub fn build(
        fd: &Arc<VmFd>,
        ram: &GuestRam,
        functions: Vec<Arc<dyn PciDevice>>,
        allocate: bool,
    ) -> Result<PciWiring, String> {
        // The same end of RAM the ACPI tables describe the windows with.
        let mut bus = PciBus::new(arch::layout::ram_end(ram.size()));
        let router = MsiRouter::new(fd.clone());
        let mut sinks = Vec::new();
        let mut dma = Vec::new();
        for f in &functions {
            let n = bus.add_device(f.clone()).map_err(|e| e.to_string())?;
            let vectors = f.msi_vectors();
            if vectors > 0 {
                let sink = router.sink(f.id(), vectors).map_err(|e| e.to_string())?;
                f.attach_msi(sink.clone()).map_err(|e| e.to_string())?;
                sinks.push(sink);
            }
            if let Some(m) = map_ram(f, ram).map_err(|e| e.to_string())? {
                dma.push(m);
            }
            debug!("pci: {} at 00:{n:02x}.0, {vectors} MSI vector(s)", f.id());
        }
        let first_slot = u32::try_from(ram.regions().len()).map_err(|e| e.to_string())?;
        let w = PciWiring {
            bus: RwLock::new(bus),
            slots: BarSlots::new(fd.clone(), first_slot, MAX_BAR_SLOTS),
            router,
            _sinks: sinks,
            _dma: dma,
        };
        if allocate {
            let mut bus = w.bus.write().unwrap_or_else(|p| p.into_inner());
            let changes = bus.allocate_bars().map_err(|e| e.to_string())?;
            w.after_changes(&bus, &changes);
        }
        info!(
            "PCI bus: host bridge and {} device(s), {} with DMA",
            functions.len(),
            w._dma.len()
        );
        Ok(w)
    }

    /// Re-syncs the BAR slots when a change touched a mapped BAR.
    fn after_changes(&self, bus: &PciBus, changes: &[BarChange]) {
        let mapped = |m: &Option<devices::pci::BarMapping>| {
            m.as_ref()
                .is_some_and(|m| matches!(m.kind, BarKind::Mapped(_)))
        };
        if changes.iter().any(|c| mapped(&c.old) || mapped(&c.new)) {
            let bars: Vec<_> = bus.mappings().into_iter().map(|(_, m)| m).collect();
            // SAFETY: BarKind::Mapped host ranges stay mapped for their
            // function's life; the functions are held by the bus, which
            // lives as long as this wiring and so as the VM's slots.
            unsafe { self.slots.sync(&mapped_parts(&bars)) };
        }
    }

    fn read_bus(&self) -> std::sync::RwLockReadGuard<'_, PciBus> {
        self.bus.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_bus(&self) -> std::sync::RwLockWriteGuard<'_, PciBus> {
        self.bus.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The ids of the devices, in bus order.
    pub fn ids(&self) -> Vec<String> {
        self.read_bus()
            .devices()
            .iter()
            .map(|d| d.id().to_string())
            .collect()
    }

    /// The PCI layer of every device, in bus order.
    pub fn save(&self) -> Vec<PciFunctionState> {
        self.read_bus()
            .devices()
            .iter()
            .map(|d| d.save_pci())
            .collect()
    }

    /// Restores the PCI layers of a migrated VM (before it starts): checks
    /// them ([`super::state::validate`]), hands each to its function (which
    /// re-programs its MSI routes), then re-reads the BARs and moves the
    /// BAR slots.
    pub fn restore(&self, states: &[PciFunctionState]) -> Result<(), String> {
        let mut bus = self.write_bus();
        let ids: Vec<String> = bus.devices().iter().map(|d| d.id().to_string()).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        super::state::validate(states, &refs)?;
        for (d, s) in bus.devices().iter().zip(states) {
            d.restore_pci(s).map_err(|e| e.to_string())?;
        }
        let changes = bus.rescan();
        self.after_changes(&bus, &changes);
        debug!(
            "PCI state of {} device(s) restored; {} BAR(s) decoded, {} MSI route(s)",
            states.len(),
            bus.mappings().len(),
            self.router.msi_routes()
        );
        Ok(())
    }

    /// The KVM slots of mapped BAR parts now: `(slot, (gpa, size, host))`.
    pub fn bar_slots(&self) -> Vec<(u32, super::bars::MappedPart)> {
        self.slots.installed()
    }

    /// Number of MSI routes in force.
    pub fn msi_routes(&self) -> usize {
        self.router.msi_routes()
    }
}

fn ecam_offset(addr: u64) -> Option<u64> {
    addr.checked_sub(PCI_ECAM_BASE)
        .filter(|&o| o < PCI_ECAM_SIZE)
}

impl PciIo for PciWiring {
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let bus = self.read_bus();
        match ecam_offset(addr) {
            Some(off) => {
                bus.ecam_read(off, data);
                true
            }
            None => bus.mmio_read(addr, data),
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match ecam_offset(addr) {
            Some(off) => {
                let mut bus = self.write_bus();
                let changes = bus.ecam_write(off, data);
                self.after_changes(&bus, &changes);
                true
            }
            None => self.read_bus().mmio_write(addr, data),
        }
    }

    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        self.read_bus().pio_read(port, data)
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        let mut bus = self.write_bus();
        match bus.pio_write(port, data) {
            Some(changes) => {
                self.after_changes(&bus, &changes);
                true
            }
            None => false,
        }
    }
}
