//! A kernel VFIO PCI function as a guest PCI device ([`KernelVfioPci`]):
//! config space passed through from the device's config region with the
//! BARs, the expansion ROM, the interrupt pin and the MSI/MSI-X
//! capabilities virtualized; BARs mmapped where the kernel allows it
//! (minus the MSI-X table/PBA pages) and trapped elsewhere; the MSI-X table
//! emulated, with the vectors handed to the kernel (`VFIO_DEVICE_SET_IRQS`)
//! as the [`MsiSink`]'s eventfds; DMA mappings in the device's container.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};

use super::pci_caps::{self as caps, BarInfo, MsiCap, MsixCap};
use super::pci_ops::{self, KernelPciOps, RawPciOps};
use super::pci_uapi::{self as pu, RegionInfo, CONFIG_REGION_INDEX};
use super::pci_virt::{Virt, VirtState};
use super::{KernelVfioDevice, VfioConfig};
use crate::error::{Error, Result};
use crate::pci::{
    BarKind, BarMapping, BarRequest, DmaTarget, MsiSink, PciDevice, PciFunctionState,
    CONFIG_SPACE_SIZE, NUM_BARS,
};

/// Host page size the mmap and DMA arguments are aligned to.
pub const PAGE: u64 = 4096;

/// One BAR of the function: what the device has, and what of it is
/// mmapped.
///
/// Invariant: `parts` are page aligned, inside `[0, info.size)`, disjoint,
/// and exclude every page holding the MSI-X table or PBA; each host range
/// stays mapped until the function is dropped.
#[derive(Debug, Clone)]
pub(super) struct Bar {
    pub(super) info: BarInfo,
    pub(super) region: RegionInfo,
    pub(super) parts: Vec<(u64, u64, u64)>,
}

/// A VFIO PCI function bound to `vfio-pci` (or a variant driver), seen by
/// the guest on the PCI bus.
///
/// Invariants: guest BAR addresses live only in this model (never written
/// to the device); the device's MSI/MSI-X is enabled in the kernel only
/// while the guest has enabled it, with the sink's eventfds; every access
/// from the guest is bounded by the region sizes the kernel reported.
pub struct KernelVfioPci {
    id: String,
    mig: Arc<KernelVfioDevice>,
    ops: Box<dyn RawPciOps>,
    virt: Virt,
    bars: [Option<Bar>; NUM_BARS],
    sink: Mutex<Option<Arc<dyn MsiSink>>>,
    state: Mutex<VirtState>,
}

impl std::fmt::Debug for KernelVfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfioPci")
            .field("id", &self.id)
            .field("msix", &self.virt.msix)
            .field("msi", &self.virt.msi)
            .finish()
    }
}

fn err(id: &str, msg: impl Into<String>) -> Error {
    Error::Vfio {
        id: id.to_string(),
        msg: msg.into(),
    }
}

/// Subtracts the page-aligned `holes` from `area` and aligns what is left
/// inward to pages.
fn carve(area: (u64, u64), holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![(area.0, area.0.saturating_add(area.1))];
    for &(hs, he) in holes {
        let mut next = Vec::new();
        for (s, e) in pieces {
            if he <= s || hs >= e {
                next.push((s, e));
                continue;
            }
            if s < hs {
                next.push((s, hs));
            }
            if he < e {
                next.push((he, e));
            }
        }
        pieces = next;
    }
    pieces
        .into_iter()
        .filter_map(|(s, e)| {
            let s = s.checked_add(PAGE - 1)? & !(PAGE - 1);
            let e = e & !(PAGE - 1);
            (e > s).then_some((s, e - s))
        })
        .collect()
}

impl KernelVfioPci {
    /// Opens the `--vfio` device of `cfg`: the migration side
    /// ([`KernelVfioDevice::open`]) and the PCI side over the same device
    /// and container fds.
    pub fn open(cfg: &VfioConfig) -> Result<Self> {
        Self::from_device(Arc::new(KernelVfioDevice::open(cfg)?))
    }

    /// The PCI side of a device already opened with
    /// [`KernelVfioDevice::open`] (e.g. by the VMM's device set), over its
    /// device and container fds. Fails for a device built with
    /// [`KernelVfioDevice::with_ops`] (it has no fds).
    pub fn from_device(mig: Arc<KernelVfioDevice>) -> Result<Self> {
        use migration::MigratableDevice;
        let (Some(dev), Some(cont)) = (mig.vfio_device().cloned(), mig.container().cloned()) else {
            return Err(err(
                mig.id(),
                "device has no VFIO fds (not opened from the host)",
            ));
        };
        Self::with_ops(mig, Box::new(KernelPciOps::new(dev, cont)))
    }

    /// Builds the function over `ops` (real or fake): reads the region and
    /// IRQ info and the config space, parses BARs and capabilities, mmaps
    /// what may be mapped. The id is `mig`'s.
    pub fn with_ops(mig: Arc<KernelVfioDevice>, ops: Box<dyn RawPciOps>) -> Result<Self> {
        use migration::MigratableDevice;
        let id = mig.id().to_string();
        let cfg_region = pci_ops::region_info(&*ops, CONFIG_REGION_INDEX)
            .map_err(|e| err(&id, format!("config region info: {e}")))?;
        if cfg_region.size < caps::CONVENTIONAL_SIZE as u64 || !cfg_region.readable() {
            return Err(err(
                &id,
                format!("config region of {} bytes is not readable", cfg_region.size),
            ));
        }
        let cfg_len = cfg_region.size.min(CONFIG_SPACE_SIZE as u64) as usize;
        let mut config = vec![0u8; cfg_len];
        ops.read_at(&mut config, cfg_region.offset)
            .map_err(|e| err(&id, format!("reading config space: {e}")))?;
        if config[0x0e] & 0x7f != 0 {
            return Err(err(
                &id,
                format!("header type {:#x}: only type-0 functions", config[0x0e]),
            ));
        }

        let mut infos: [Option<(BarInfo, RegionInfo)>; NUM_BARS] = Default::default();
        let mut i = 0;
        while i < NUM_BARS {
            let region = pci_ops::region_info(&*ops, i as u32).unwrap_or_else(|e| {
                debug!("vfio {id}: BAR{i} region info: {e}");
                RegionInfo::default()
            });
            let raw = u32::from_le_bytes(
                config[0x10 + 4 * i..0x14 + 4 * i]
                    .try_into()
                    .unwrap_or([0; 4]),
            );
            let info = BarInfo::decode(i as u8, raw, region.size);
            let step = if info.is_some_and(|b| b.is_64bit) {
                2
            } else {
                1
            };
            if let Some(b) = info {
                infos[i] = Some((b, region));
            }
            i += step;
        }
        let mem_size = |b: u8| match infos.get(b as usize) {
            Some(Some((bi, _))) if !bi.is_io => bi.size,
            _ => 0,
        };
        let mut msix = None;
        let mut msi = None;
        let mut kept = Vec::new();
        let walked = caps::walk(&config);
        for c in &walked {
            match c.id {
                caps::CAP_ID_MSIX if msix.is_none() => {
                    match MsixCap::parse(&config, c.offset, mem_size) {
                        Some(m) => {
                            msix = Some(m);
                            kept.push(*c);
                        }
                        None => continue,
                    }
                }
                caps::CAP_ID_MSI if msi.is_none() => match MsiCap::parse(&config, c.offset) {
                    Some(m) => {
                        msi = Some(m);
                        kept.push(*c);
                    }
                    None => continue,
                },
                caps::CAP_ID_MSIX | caps::CAP_ID_MSI => continue,
                _ => kept.push(*c),
            }
        }
        let irq_count = |index| match pci_ops::irq_info(&*ops, index) {
            Ok(i) => i.count,
            Err(e) => {
                debug!("vfio {id}: IRQ info {index}: {e}");
                0
            }
        };
        let msix_irqs = if msix.is_some() {
            irq_count(pu::MSIX_IRQ_INDEX)
        } else {
            0
        };
        let msi_irqs = if msi.is_some() {
            irq_count(pu::MSI_IRQ_INDEX)
        } else {
            0
        };

        let mut bars: [Option<Bar>; NUM_BARS] = Default::default();
        for (i, slot) in infos.iter().enumerate() {
            let Some((info, region)) = slot.clone() else {
                continue;
            };
            let mut holes = Vec::new();
            if let Some(m) = &msix {
                for (b, off, len) in [
                    (m.table_bar, m.table_offset, m.table_len()),
                    (m.pba_bar, m.pba_offset, m.pba_len()),
                ] {
                    if b as usize == i {
                        holes.push((off & !(PAGE - 1), (off + len).div_ceil(PAGE) * PAGE));
                    }
                }
            }
            let mut parts = Vec::new();
            if !info.is_io {
                for area in region.mmap_areas() {
                    for (off, len) in carve(area, &holes) {
                        match region.offset.checked_add(off).map(|o| ops.mmap(o, len)) {
                            Some(Ok(host)) => parts.push((off, len, host)),
                            Some(Err(e)) => {
                                warn!("vfio {id}: mmap of BAR{i} {off:#x}+{len:#x}: {e}")
                            }
                            None => {}
                        }
                    }
                }
            }
            bars[i] = Some(Bar {
                info,
                region,
                parts,
            });
        }
        let bar_infos: [Option<BarInfo>; NUM_BARS] =
            std::array::from_fn(|i| bars[i].as_ref().map(|b| b.info));
        let (virt, state) = Virt::new(
            cfg_region,
            &config,
            bar_infos,
            &kept,
            &walked,
            msix.map(|m| (m, msix_irqs)),
            msi.map(|m| (m, msi_irqs)),
        );
        info!(
            "vfio {id}: PCI {:04x}:{:04x}, BARs {:?}, MSI-X {:?}, MSI {:?}",
            u16::from_le_bytes([config[0], config[1]]),
            u16::from_le_bytes([config[2], config[3]]),
            bar_infos
                .iter()
                .map(|b| b.map(|b| b.size))
                .collect::<Vec<_>>(),
            msix.map(|m| m.vectors),
            msi.map(|m| m.vectors),
        );
        Ok(KernelVfioPci {
            id,
            mig,
            ops,
            virt,
            bars,
            sink: Mutex::new(None),
            state: Mutex::new(state),
        })
    }

    /// The migration side (the device set and the migration coordinator
    /// drive it; DMA logging lives there).
    pub fn migratable(&self) -> Arc<KernelVfioDevice> {
        self.mig.clone()
    }

    fn lock(&self) -> MutexGuard<'_, VirtState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self) -> Option<Arc<dyn MsiSink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Region read of BAR `bar`; `0xff` bytes where the BAR has no
    /// readable region or the access falls outside it.
    fn region_read(&self, region: &RegionInfo, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= region.size);
        if !inside || !region.readable() {
            return;
        }
        if let Err(e) = region
            .offset
            .checked_add(offset)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|o| self.ops.read_at(data, o))
        {
            data.fill(0xff);
            debug!(
                "vfio {}: region {} read at {offset:#x}: {e}",
                self.id, region.index
            );
        }
    }

    fn region_write(&self, region: &RegionInfo, offset: u64, data: &[u8]) {
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|e| e <= region.size);
        if !inside || !region.writable() {
            return;
        }
        if let Err(e) = region
            .offset
            .checked_add(offset)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))
            .and_then(|o| self.ops.write_at(data, o))
        {
            debug!(
                "vfio {}: region {} write at {offset:#x}: {e}",
                self.id, region.index
            );
        }
    }

    fn msix_table_hit(&self, bar: u8, offset: u64) -> Option<u64> {
        let m = self.virt.msix?;
        let rel = offset.checked_sub(m.table_offset)?;
        (bar == m.table_bar && rel < m.table_len()).then_some(rel)
    }

    /// Writes the command register to the device (decode and bus master
    /// must reach the hardware).
    fn write_command(&self, cmd: u16) {
        self.region_write(&self.virt.cfg_region, 4, &cmd.to_le_bytes());
    }
}

impl Drop for KernelVfioPci {
    fn drop(&mut self) {
        for b in self.bars.iter().flatten() {
            for &(_, len, host) in &b.parts {
                self.ops.munmap(host, len);
            }
        }
    }
}

impl PciDevice for KernelVfioPci {
    fn id(&self) -> &str {
        &self.id
    }

    fn config_read(&self, offset: u16, data: &mut [u8]) {
        let off = offset as usize;
        let Some(end) = off
            .checked_add(data.len())
            .filter(|e| *e <= CONFIG_SPACE_SIZE)
        else {
            data.fill(0xff);
            return;
        };
        let dev_len = (self.virt.cfg_region.size as usize).min(CONFIG_SPACE_SIZE);
        if end <= dev_len && (off..end).any(|o| !self.virt.is_virtual(o)) {
            self.region_read(&self.virt.cfg_region, off as u64, data);
        } else {
            data.fill(0);
        }
        let st = self.lock();
        for (k, b) in data.iter_mut().enumerate() {
            if self.virt.is_virtual(off + k) || off + k >= dev_len {
                *b = st.shadow.get(off + k).copied().unwrap_or(0);
            }
        }
    }

    fn config_write(&self, offset: u16, data: &[u8]) {
        let off = offset as usize;
        if off
            .checked_add(data.len())
            .is_none_or(|e| e > CONFIG_SPACE_SIZE)
        {
            return;
        }
        let dev_len = (self.virt.cfg_region.size as usize).min(CONFIG_SPACE_SIZE);
        // Passthrough bytes go to the device in contiguous runs.
        let mut k = 0;
        while k < data.len() {
            if self.virt.is_virtual(off + k) || off + k >= dev_len {
                k += 1;
                continue;
            }
            let start = k;
            while k < data.len() && !self.virt.is_virtual(off + k) && off + k < dev_len {
                k += 1;
            }
            self.region_write(&self.virt.cfg_region, (off + start) as u64, &data[start..k]);
        }
        let sink = self.sink();
        let mut st = self.lock();
        let irq = self.virt.write(&mut st, off, data);
        if irq {
            self.virt
                .program_irqs(&self.id, &*self.ops, &mut st, sink.as_deref(), false);
        }
    }

    fn bars(&self) -> Vec<BarMapping> {
        let st = self.lock();
        let mut out = Vec::new();
        for (i, b) in self.bars.iter().enumerate() {
            let Some(b) = b else { continue };
            let enabled = st.command & if b.info.is_io { 1 } else { 2 } != 0;
            let addr = st.bar_addr[i];
            if !enabled || addr == 0 {
                continue;
            }
            let Some(end) = addr.checked_add(b.info.size) else {
                continue;
            };
            let kind = if b.info.is_io {
                BarKind::Io
            } else if b.parts.is_empty() {
                BarKind::Trap
            } else {
                BarKind::Mapped(b.parts.clone())
            };
            out.push(BarMapping {
                bar: i as u8,
                range: addr..end,
                kind,
            });
        }
        out
    }

    fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) {
        let Some(b) = self.bars.get(bar as usize).and_then(|b| b.as_ref()) else {
            data.fill(0xff);
            return;
        };
        if let Some(rel) = self.msix_table_hit(bar, offset) {
            let st = self.lock();
            self.virt.msix_table_read(&st, rel, data);
            return;
        }
        self.region_read(&b.region, offset, data);
    }

    fn bar_write(&self, bar: u8, offset: u64, data: &[u8]) {
        let Some(b) = self.bars.get(bar as usize).and_then(|b| b.as_ref()) else {
            return;
        };
        if let Some(rel) = self.msix_table_hit(bar, offset) {
            let sink = self.sink();
            let mut st = self.lock();
            let changed = self.virt.msix_table_write(&mut st, rel, data);
            for v in changed {
                self.virt.msix_route(&self.id, &st, sink.as_deref(), v);
            }
            return;
        }
        self.region_write(&b.region, offset, data);
    }

    fn bar_requests(&self) -> Vec<BarRequest> {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, b)| {
                let b = b.as_ref()?;
                Some(BarRequest {
                    bar: i as u8,
                    size: b.info.size,
                    is_64bit: b.info.is_64bit,
                    prefetchable: b.info.prefetchable,
                    is_io: b.info.is_io,
                })
            })
            .collect()
    }

    fn assign_bar(&self, bar: u8, addr: u64) {
        let Some(b) = self.bars.get(bar as usize).and_then(|b| b.as_ref()) else {
            return;
        };
        let cmd = {
            let mut st = self.lock();
            let reg = 0x10 + 4 * bar as usize;
            self.virt.write(&mut st, reg, &(addr as u32).to_le_bytes());
            if b.info.is_64bit {
                self.virt
                    .write(&mut st, reg + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            st.command |= if b.info.is_io { 1 } else { 2 };
            st.command
        };
        self.write_command(cmd);
    }

    /// MSI-X table size, or MSI vectors, whichever is larger: one sink
    /// vector per MSI-X entry or MSI message (never both enabled at once).
    fn msi_vectors(&self) -> u16 {
        let x = self.virt.msix.map_or(0, |m| m.vectors);
        let m = self.virt.msi.map_or(0, |m| m.vectors as u16);
        x.max(m)
    }

    fn attach_msi(&self, sink: Arc<dyn MsiSink>) -> Result<()> {
        if sink.count() < self.msi_vectors() {
            return Err(err(
                &self.id,
                format!(
                    "interrupt sink has {} vectors, the device needs {}",
                    sink.count(),
                    self.msi_vectors()
                ),
            ));
        }
        *self.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink.clone());
        // The guest (or a restore) may have enabled vectors already.
        let mut st = self.lock();
        self.virt
            .program_irqs(&self.id, &*self.ops, &mut st, Some(&*sink), false);
        Ok(())
    }

    fn dma(&self) -> Option<&dyn DmaTarget> {
        Some(self)
    }

    fn save_pci(&self) -> PciFunctionState {
        let len = (self.virt.cfg_region.size as usize).min(CONFIG_SPACE_SIZE);
        let mut config = vec![0u8; len];
        for off in (0..len).step_by(4) {
            self.config_read(off as u16, &mut config[off..off + 4]);
        }
        let st = self.lock();
        PciFunctionState {
            id: self.id.clone(),
            config,
            bars: st.bar_addr.to_vec(),
            msix: st.msix.clone(),
        }
    }

    fn restore_pci(&self, state: &PciFunctionState) -> Result<()> {
        let e = |m: String| err(&self.id, m);
        if state.id != self.id {
            return Err(e(format!("PCI state of device '{}'", state.id)));
        }
        if state.config.len() > CONFIG_SPACE_SIZE || state.bars.len() != NUM_BARS {
            return Err(e(format!(
                "bad PCI state: {} config bytes, {} BARs",
                state.config.len(),
                state.bars.len()
            )));
        }
        let mut ids = [0u8; 4];
        self.config_read(0, &mut ids);
        if state.config.len() >= 4 && state.config[..4] != ids {
            return Err(e(format!(
                "PCI state is of device {:02x?}, this is {ids:02x?}",
                &state.config[..4]
            )));
        }
        match (&state.msix, self.virt.msix) {
            (None, None) => {}
            (Some(s), Some(m))
                if s.entries.len() == m.vectors as usize
                    && s.pba.len() == s.entries.len().div_ceil(64) => {}
            _ => return Err(e("MSI-X state does not match the device's table".into())),
        }
        let sink = self.sink();
        let cmd = {
            let mut st = self.lock();
            self.virt.restore(&mut st, state);
            self.virt
                .program_irqs(&self.id, &*self.ops, &mut st, sink.as_deref(), true);
            st.command
        };
        self.write_command(cmd);
        Ok(())
    }
}

fn dma_args_ok(iova: u64, size: u64) -> bool {
    size > 0
        && iova.is_multiple_of(PAGE)
        && size.is_multiple_of(PAGE)
        && iova.checked_add(size).is_some()
}

impl DmaTarget for KernelVfioPci {
    unsafe fn dma_map(&self, iova: u64, size: u64, host_addr: u64) -> Result<()> {
        if !dma_args_ok(iova, size) || !host_addr.is_multiple_of(PAGE) {
            return Err(err(
                &self.id,
                format!("DMA map {iova:#x}+{size:#x} -> {host_addr:#x}: not page aligned"),
            ));
        }
        self.ops
            .map_dma(&pu::dma_map_arg(iova, size, host_addr))
            .map_err(|e| {
                err(
                    &self.id,
                    format!("VFIO_IOMMU_MAP_DMA {iova:#x}+{size:#x}: {e}"),
                )
            })
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        if !dma_args_ok(iova, size) {
            return Err(err(
                &self.id,
                format!("DMA unmap {iova:#x}+{size:#x}: not page aligned"),
            ));
        }
        let mut arg = pu::dma_unmap_arg(iova, size);
        self.ops.unmap_dma(&mut arg).map_err(|e| {
            err(
                &self.id,
                format!("VFIO_IOMMU_UNMAP_DMA {iova:#x}+{size:#x}: {e}"),
            )
        })?;
        match pu::dma_unmap_size(&arg) {
            Some(s) if s == size => Ok(()),
            s => Err(err(
                &self.id,
                format!("VFIO_IOMMU_UNMAP_DMA {iova:#x}+{size:#x} unmapped {s:?} bytes"),
            )),
        }
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
