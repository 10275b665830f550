//! The simulated device as a PCI function ([`SimPciFunction`]): config
//! space (1b36:fe77, class ff0000, rev 1, header type 0) with an MSI-X
//! capability (1 vector; table at BAR0 + 0x1000, PBA at BAR0 + 0x1800),
//! and BAR0 (16 KiB, 32-bit, non-prefetchable memory) holding the register
//! file ([`super::regs`]) and the MSI-X table and PBA.
//!
//! Locking: the PCI layer (config space + MSI-X) has its own lock, taken
//! before the hardware lock when both are needed (a command register write
//! updating Bus Master Enable); the engine never holds the hardware lock
//! while raising an interrupt, so the two never deadlock.

use std::sync::{Arc, Mutex, MutexGuard};

use log::warn;

use super::engine::{Hw, IrqLine};
use super::regs::REGS_END;
use crate::error::{Error, Result};
use crate::pci::config::{PciConfig, PciHeader, PCI_COMMAND_MEMORY};
use crate::pci::msix::Msix;
use crate::pci::{
    BarKind, BarMapping, BarRequest, DmaTarget, MsiSink, PciDevice, PciFunctionState,
};

/// PCI vendor id of the simulated device (Red Hat, as QEMU's test devices).
pub const SIM_VENDOR_ID: u16 = 0x1b36;
/// PCI device id of the simulated device (test-only).
pub const SIM_DEVICE_ID: u16 = 0xfe77;
/// Class code: unassigned (0xff), subclass 0, prog-if 0.
pub const SIM_CLASS: u32 = 0xff_0000;
/// Revision id.
pub const SIM_REVISION: u8 = 1;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x4000;
/// MSI-X table offset in BAR0.
pub const MSIX_TABLE_OFFSET: u32 = 0x1000;
/// MSI-X PBA offset in BAR0.
pub const MSIX_PBA_OFFSET: u32 = 0x1800;
/// MSI-X vectors (vector 0: ring wrap).
pub const MSIX_VECTORS: u16 = 1;

/// Config space and MSI-X model.
struct Layer {
    cfg: PciConfig,
    msix: Msix,
}

/// The PCI layer, shared by the function and (as its interrupt line) the
/// engine.
///
/// Invariant: `layer.msix` is the MSI-X capability of `layer.cfg`.
struct PciInner {
    id: String,
    layer: Mutex<Layer>,
}

impl PciInner {
    fn lock(&self) -> MutexGuard<'_, Layer> {
        self.layer.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl IrqLine for PciInner {
    /// Fires MSI-X vector 0 (pending while masked or disabled).
    fn raise(&self) {
        if let Err(e) = self.lock().msix.trigger(0) {
            warn!("sim-vfio {}: MSI-X vector 0: {e}", self.id);
        }
    }
}

/// The PCI function of a simulated device: what the bus drives.
///
/// Invariants: one per [`super::SimVfioDevice`], sharing its hardware; the
/// hardware's Bus Master Enable always equals the command register's bit
/// 2 (updated under the PCI layer lock on every config write and restore).
pub struct SimPciFunction {
    inner: Arc<PciInner>,
    hw: Arc<Hw>,
}

impl std::fmt::Debug for SimPciFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimPciFunction")
            .field("id", &self.inner.id)
            .finish()
    }
}

impl SimPciFunction {
    /// The function of the device whose hardware is `hw`; becomes the
    /// hardware's interrupt line.
    pub(super) fn new(hw: Arc<Hw>) -> Result<Self> {
        let dev_err = |e: Error| Error::Device {
            id: hw.id.clone(),
            msg: format!("building the PCI function: {e}"),
        };
        let mut cfg = PciConfig::new(PciHeader {
            vendor_id: SIM_VENDOR_ID,
            device_id: SIM_DEVICE_ID,
            class: SIM_CLASS,
            revision: SIM_REVISION,
            subsystem_vendor_id: SIM_VENDOR_ID,
            subsystem_id: SIM_DEVICE_ID,
        });
        cfg.add_bar(BarRequest {
            bar: 0,
            size: BAR0_SIZE,
            is_64bit: false,
            prefetchable: false,
            is_io: false,
        })
        .map_err(dev_err)?;
        let msix = Msix::new(
            &mut cfg,
            MSIX_VECTORS,
            0,
            MSIX_TABLE_OFFSET,
            0,
            MSIX_PBA_OFFSET,
        )
        .map_err(dev_err)?;
        let inner = Arc::new(PciInner {
            id: hw.id.clone(),
            layer: Mutex::new(Layer { cfg, msix }),
        });
        hw.set_irq(inner.clone());
        Ok(SimPciFunction { inner, hw })
    }

    /// Whether MSI-X vector 0 is pending (raised while masked or disabled).
    pub fn msix_pending(&self) -> bool {
        self.inner.lock().msix.pending(0)
    }

    /// Copies the command register's Bus Master Enable to the hardware
    /// (called with the layer locked: the lock order is layer, then hw).
    fn sync_bus_master(&self, layer: &Layer) {
        self.hw.set_bus_master(layer.cfg.bus_master());
    }
}

impl PciDevice for SimPciFunction {
    fn id(&self) -> &str {
        &self.inner.id
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        self.inner.lock().cfg.read(offset, data);
    }

    /// Writes the writable bits; then MSI-X Enable/Function Mask and Bus
    /// Master Enable take effect.
    fn config_write(&self, offset: u16, data: &[u8]) {
        let mut l = self.inner.lock();
        l.cfg.write(offset, data);
        let Layer { cfg, msix } = &mut *l;
        if let Err(e) = msix.config_written(cfg) {
            warn!("sim-vfio {}: MSI-X: {e}", self.inner.id);
        }
        self.sync_bus_master(&l);
    }

    /// BAR0 while memory decoding is on and it is programmed (always
    /// trapped).
    fn bars(&self) -> Vec<BarMapping> {
        self.inner
            .lock()
            .cfg
            .decoded_bars()
            .into_iter()
            .map(|b| BarMapping {
                bar: b.bar,
                range: b.range,
                kind: BarKind::Trap,
            })
            .collect()
    }

    /// Registers at 0x0..0x80, MSI-X table at 0x1000, PBA at 0x1800;
    /// anything else (and other BARs) reads 0.
    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 || offset >= BAR0_SIZE {
            return;
        }
        if offset < REGS_END {
            self.hw.read_bytes(offset, data);
            return;
        }
        self.inner.lock().msix.bar_read(bar, offset, data);
    }

    /// Registers and MSI-X table; writes elsewhere are ignored.
    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 || offset >= BAR0_SIZE {
            return;
        }
        if offset < REGS_END {
            self.hw.write_bytes(offset, data);
            return;
        }
        self.inner.lock().msix.bar_write(bar, offset, data);
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        self.inner.lock().cfg.bar_requests()
    }

    /// Programs BAR0 and enables memory decoding (not bus mastering: the
    /// guest driver does that).
    fn assign_bar(&self, bar: u8, addr: u64) {
        let mut l = self.inner.lock();
        if l.cfg.bar_size(usize::from(bar)).is_none() {
            warn!(
                "sim-vfio {}: assign_bar of undeclared BAR {bar}",
                self.inner.id
            );
            return;
        }
        l.cfg.set_bar_address(usize::from(bar), addr);
        let cmd = l.cfg.command();
        l.cfg.set_command(cmd | PCI_COMMAND_MEMORY);
    }

    fn msi_vectors(&self) -> u16 {
        MSIX_VECTORS
    }

    fn attach_msi(&self, sink: Arc<dyn MsiSink>) -> Result<()> {
        self.inner.lock().msix.attach(sink)
    }

    fn dma(&self) -> Option<&dyn DmaTarget> {
        Some(&self.hw.dma)
    }

    fn save_pci(&self) -> PciFunctionState {
        let l = self.inner.lock();
        let mut st = l.cfg.save(&self.inner.id);
        st.msix = Some(l.msix.save());
        st
    }

    /// Refuses (changing nothing) a state of another device id, without
    /// MSI-X, or that the config space or MSI-X model refuses; then sets
    /// Bus Master Enable from the restored command register. Route errors
    /// from the sink are returned after the state is in place.
    fn restore_pci(&self, state: &PciFunctionState) -> Result<()> {
        let err = |msg: String| Error::Device {
            id: self.inner.id.clone(),
            msg,
        };
        if state.id != self.inner.id {
            return Err(err(format!(
                "PCI state of device {:?} offered to this device",
                state.id
            )));
        }
        let Some(msix_state) = &state.msix else {
            return Err(err("saved PCI state has no MSI-X state".into()));
        };
        // What `Msix::restore` would refuse, checked first so that its only
        // possible failure is a route error after the state is in place.
        let n = usize::from(MSIX_VECTORS);
        if msix_state.entries.len() != n
            || msix_state.pba.len() != n.div_ceil(64)
            || msix_state.pba[0] >> n != 0
        {
            return Err(err(format!(
                "saved MSI-X state has {} entries and {} PBA words, the function has {n} vector",
                msix_state.entries.len(),
                msix_state.pba.len()
            )));
        }
        let mut l = self.inner.lock();
        let mut cfg = l.cfg.clone();
        cfg.restore(state)?;
        let routed = l.msix.restore(msix_state, &mut cfg);
        if let Err(e) = &routed {
            warn!(
                "sim-vfio {}: MSI-X routes after restore: {e}",
                self.inner.id
            );
        }
        l.cfg = cfg;
        self.sync_bus_master(&l);
        routed
    }
}
