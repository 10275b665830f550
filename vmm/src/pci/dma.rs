//! DMA mapping of guest RAM in the PCI functions that do DMA: every RAM
//! region, identity IOVA (IOVA = guest-physical address).

use std::sync::Arc;

use devices::pci::PciDevice;
use log::{debug, warn};

use crate::memory::GuestRam;

/// The RAM mappings made in one function's IOMMU (its [`devices::pci::DmaTarget`]).
///
/// Invariant: `ranges` were mapped with `dma_map` to the host memory of
/// `ram`'s regions; `ram` (a clone, which keeps the mappings alive) outlives
/// the mappings: they are removed on drop, before `ram` is released.
pub struct DmaMappings {
    dev: Arc<dyn PciDevice>,
    ranges: Vec<(u64, u64)>,
    _ram: GuestRam,
}

impl std::fmt::Debug for DmaMappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMappings")
            .field("id", &self.dev.id())
            .field("ranges", &self.ranges)
            .finish()
    }
}

/// Maps every region of `ram` in `dev`'s IOMMU, if `dev` does DMA
/// (`Ok(None)` otherwise). On failure nothing stays mapped.
pub fn map_ram(dev: &Arc<dyn PciDevice>, ram: &GuestRam) -> devices::Result<Option<DmaMappings>> {
    let Some(target) = dev.dma() else {
        return Ok(None);
    };
    let mut m = DmaMappings {
        dev: dev.clone(),
        ranges: Vec::with_capacity(ram.regions().len()),
        _ram: ram.clone(),
    };
    for r in ram.regions() {
        // SAFETY: `r` is a live, writable mapping owned by `ram`; the clone
        // of `ram` in `m` keeps it mapped until `m`'s drop has unmapped it.
        unsafe { target.dma_map(r.gpa, r.size, r.host_addr) }?;
        m.ranges.push((r.gpa, r.size));
    }
    debug!(
        "device {}: {} RAM region(s) DMA-mapped",
        dev.id(),
        m.ranges.len()
    );
    Ok(Some(m))
}

impl Drop for DmaMappings {
    fn drop(&mut self) {
        let Some(target) = self.dev.dma() else {
            return;
        };
        for &(iova, size) in self.ranges.iter().rev() {
            if let Err(e) = target.dma_unmap(iova, size) {
                warn!(
                    "device {}: DMA unmap of {iova:#x}+{size:#x}: {e}",
                    self.dev.id()
                );
            }
        }
    }
}
