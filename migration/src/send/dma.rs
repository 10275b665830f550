//! Pages written by device DMA: which devices write guest memory, the DMA
//! logs that track those writes during a send, and the refusal of a send
//! that could not track them.
//!
//! KVM's dirty log sees only what the vCPUs write. A device writes guest
//! memory through the IOMMU, so its writes reach the destination only if
//! the device logs them (VFIO_DEVICE_FEATURE_DMA_LOGGING_*): the reports
//! are merged into the dirty set at every fetch, and the final fetch comes
//! after the devices were stopped (STOP_COPY entry), so nothing written
//! before the stop is missed. A device that writes guest memory and cannot
//! log is refused, unless the operator allows it
//! ([`crate::api::SendParams::allow_untracked_dma`]): every populated page is
//! then re-sent in the final pass.

use std::ops::Range;
use std::sync::Arc;

use crate::error::MigrationError;
use crate::guest_mem::RamRegion;
use crate::traits::{DirtyBitmap, DmaLog, MigratableDevice, PAGE_SIZE};

/// The DMA devices of one send, by index into its device list.
///
/// Invariant: `logged` and `untracked` are disjoint, sorted, and hold
/// exactly the devices whose [`MigratableDevice::dma_log`] was
/// [`DmaLog::Supported`] and [`DmaLog::Unsupported`] when the send started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaPlan {
    /// Devices whose DMA writes are logged.
    pub logged: Vec<usize>,
    /// Devices that write guest memory and cannot log it.
    pub untracked: Vec<usize>,
}

impl DmaPlan {
    /// Asks every device what it does to guest memory.
    pub fn of(devices: &[Arc<dyn MigratableDevice>]) -> DmaPlan {
        let mut plan = DmaPlan::default();
        for (i, d) in devices.iter().enumerate() {
            match d.dma_log() {
                DmaLog::NoDma => {}
                DmaLog::Supported => plan.logged.push(i),
                DmaLog::Unsupported => plan.untracked.push(i),
            }
        }
        plan
    }

    /// Whether any device writes guest memory by DMA.
    pub fn any(&self) -> bool {
        !self.logged.is_empty() || !self.untracked.is_empty()
    }

    /// Refuses a send the plan cannot make correct: an untracked device
    /// without the operator's consent.
    pub fn check(
        &self,
        devices: &[Arc<dyn MigratableDevice>],
        allow_untracked: bool,
    ) -> Result<(), MigrationError> {
        if self.untracked.is_empty() || allow_untracked {
            return Ok(());
        }
        let ids: Vec<&str> = self.untracked.iter().map(|&i| devices[i].id()).collect();
        Err(MigrationError::InvalidParams(format!(
            "device{} {} write{} guest memory by DMA and cannot log it: pages written during \
             the migration would be lost. Set \"allow_untracked_dma\": true to re-send every \
             populated page of guest RAM after the devices stop (a longer downtime)",
            if ids.len() == 1 { "" } else { "s" },
            ids.join(", "),
            if ids.len() == 1 { "s" } else { "" },
        )))
    }

    /// Why post-copy cannot be used with these devices, if it cannot: the
    /// destination's devices would write pages the source still sends.
    pub fn postcopy_blocker(&self, devices: &[Arc<dyn MigratableDevice>]) -> Option<String> {
        let first = self.logged.iter().chain(&self.untracked).min()?;
        Some(format!(
            "device {} writes guest memory by DMA: post-copy could overwrite its writes with \
             older pages from the source",
            devices[*first].id()
        ))
    }
}

/// DMA logging is on in the logged devices of a plan. Dropping the guard
/// stops it in each of them.
pub struct DmaLogs {
    devices: Vec<Arc<dyn MigratableDevice>>,
}

impl DmaLogs {
    /// No logging at all: a memory handover, where the destination maps the
    /// memory the devices write, so no page they write is ever re-sent
    /// (re-sending one would race the device on the shared memory).
    pub fn none() -> DmaLogs {
        DmaLogs {
            devices: Vec::new(),
        }
    }

    /// Starts logging in every logged device over all of guest RAM, at
    /// [`PAGE_SIZE`] granularity. On failure, the devices already started
    /// are stopped again.
    pub fn start(
        devices: &[Arc<dyn MigratableDevice>],
        plan: &DmaPlan,
        regions: &[RamRegion],
    ) -> Result<DmaLogs, MigrationError> {
        let ranges: Vec<Range<u64>> = regions
            .iter()
            .map(|r| r.gpa()..r.gpa() + r.size())
            .collect();
        let mut started = DmaLogs {
            devices: Vec::new(),
        };
        for &i in &plan.logged {
            let d = &devices[i];
            d.dma_log_start(&ranges, PAGE_SIZE).map_err(|e| {
                MigrationError::device(d.id(), format!("starting DMA logging: {e}"))
            })?;
            started.devices.push(d.clone());
        }
        if !started.devices.is_empty() {
            log::info!(
                "DMA logging started in {} device(s) over {} RAM region(s)",
                started.devices.len(),
                ranges.len()
            );
        }
        Ok(started)
    }

    /// Merges every device's report for `region` into `held` (sized to the
    /// region); returns the pages the reports named (counted per device, a
    /// page two devices wrote counts twice).
    pub fn report_into(
        &self,
        region: &RamRegion,
        held: &mut DirtyBitmap,
    ) -> Result<u64, MigrationError> {
        if self.devices.is_empty() {
            return Ok(0);
        }
        let words = region.pages().div_ceil(64) as usize;
        if held.words.len() < words {
            held.words.resize(words, 0);
        }
        let mut scratch = vec![0u64; words];
        let mut pages = 0;
        for d in &self.devices {
            scratch.iter_mut().for_each(|w| *w = 0);
            d.dma_log_report(region.gpa(), region.size(), PAGE_SIZE, &mut scratch)
                .map_err(|e| MigrationError::device(d.id(), format!("reading the DMA log: {e}")))?;
            // Bits past the region's end are not pages of it.
            if let Some(last) = scratch.last_mut() {
                let tail = region.pages() % 64;
                if tail != 0 {
                    *last &= (1u64 << tail) - 1;
                }
            }
            for (h, s) in held.words.iter_mut().zip(&scratch) {
                pages += s.count_ones() as u64;
                *h |= *s;
            }
        }
        Ok(pages)
    }
}

impl Drop for DmaLogs {
    fn drop(&mut self) {
        for d in &self.devices {
            if let Err(e) = d.dma_log_stop() {
                log::error!("device {}: stopping DMA logging: {e}", d.id());
            }
        }
    }
}
