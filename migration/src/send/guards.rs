//! Guards of the source's undoable actions: each one's `Drop` undoes what
//! its constructor did, so that a failure (or an unwinding worker) at any
//! point leaves the source VM as it was.

use std::sync::Arc;

use crate::error::MigrationError;
use crate::traits::{DirtyBitmap, MigState, MigratableDevice, SourceVm};

/// Dirty logging is on. Dropping the guard stops it (on success and on
/// failure alike: the trait says it is stopped exactly once).
pub struct DirtyLog {
    vm: Arc<dyn SourceVm>,
    buffers: Vec<DirtyBitmap>,
}

impl DirtyLog {
    /// Starts dirty logging on every region, and makes the bitmaps the
    /// sender holds fetched pages in: zeroed, one per region, their memory
    /// written, so that the first fetch neither allocates nor faults in
    /// memory that grows with the guest (this runs while the connections
    /// come up).
    pub fn start(vm: &Arc<dyn SourceVm>) -> Result<DirtyLog, MigrationError> {
        vm.start_dirty_log()
            .map_err(|e| MigrationError::vm("starting dirty logging", e))?;
        let buffers = vm
            .ram()
            .iter()
            .map(|r| DirtyBitmap {
                // Written: the first fetch must not fault it in.
                words: crate::bitmap::written_zeros(r.pages().div_ceil(64) as usize),
            })
            .collect();
        Ok(DirtyLog {
            vm: vm.clone(),
            buffers,
        })
    }

    /// The bitmaps made by [`DirtyLog::start`] (empty after the first call).
    pub fn take_buffers(&mut self) -> Vec<DirtyBitmap> {
        std::mem::take(&mut self.buffers)
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        if let Err(e) = self.vm.stop_dirty_log() {
            log::error!("stopping dirty logging: {e}");
        }
    }
}

/// The VM was paused by the migration. Dropping the guard before COMMIT
/// resumes it ([`SourceVm::resume`] leaves a VM the user had paused
/// paused); [`PausedVm::keep_paused`] is the only way past COMMIT.
pub struct PausedVm {
    vm: Option<Arc<dyn SourceVm>>,
}

impl PausedVm {
    /// Pauses the VM.
    pub fn pause(vm: &Arc<dyn SourceVm>) -> Result<PausedVm, MigrationError> {
        vm.pause()
            .map_err(|e| MigrationError::vm("pausing the VM", e))?;
        Ok(PausedVm {
            vm: Some(vm.clone()),
        })
    }

    /// COMMIT was written: the destination may run the guest, so this VM
    /// stays paused for good.
    pub fn keep_paused(mut self) {
        self.vm = None;
    }

    /// Re-arms the guard of a VM kept paused at COMMIT, for the one case in
    /// which it may run again: the destination reported that it discarded
    /// its VM without starting the guest ([`crate::wire::Frame::Discarded`]).
    pub fn reclaim(vm: &Arc<dyn SourceVm>) -> PausedVm {
        PausedVm {
            vm: Some(vm.clone()),
        }
    }
}

impl Drop for PausedVm {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            if let Err(e) = vm.resume() {
                log::error!("resuming the VM after a failed migration: {e}");
            }
        }
    }
}

/// Devices may have left RUNNING (pre-copy, stop-copy). Dropping the guard
/// before COMMIT puts every device that is not RUNNING back to RUNNING;
/// [`RestoreDevices::committed`] turns it into a [`StopDevices`].
pub struct RestoreDevices {
    devices: Vec<Arc<dyn MigratableDevice>>,
}

impl RestoreDevices {
    /// Guards `devices`.
    pub fn new(devices: &[Arc<dyn MigratableDevice>]) -> RestoreDevices {
        RestoreDevices {
            devices: devices.to_vec(),
        }
    }

    /// COMMIT was written: from now on the devices end in STOP.
    pub fn committed(mut self) -> StopDevices {
        StopDevices {
            devices: std::mem::take(&mut self.devices),
        }
    }
}

impl Drop for RestoreDevices {
    fn drop(&mut self) {
        for d in &self.devices {
            match d.state() {
                Ok(MigState::Running) => {}
                _ => {
                    if let Err(e) = d.set_state(MigState::Running) {
                        log::error!("device {}: back to RUNNING failed: {e}", d.id());
                    }
                }
            }
        }
    }
}

/// After COMMIT the devices must not run here again (a RUNNING device could
/// DMA or transmit while the destination runs the guest). Dropping the
/// guard (failure after COMMIT) stops every device not in STOP;
/// [`StopDevices::migrated`] is the success path.
pub struct StopDevices {
    devices: Vec<Arc<dyn MigratableDevice>>,
}

impl StopDevices {
    /// The destination discarded its VM without starting the guest (see
    /// [`PausedVm::reclaim`]): the devices run here again, so the guard
    /// becomes a [`RestoreDevices`].
    pub fn reclaim(mut self) -> RestoreDevices {
        RestoreDevices {
            devices: std::mem::take(&mut self.devices),
        }
    }

    /// The migration completed: every device goes to STOP.
    pub fn migrated(mut self) {
        for d in std::mem::take(&mut self.devices) {
            if let Err(e) = d.set_state(MigState::Stop) {
                log::warn!("device {}: STOP after migration: {e}", d.id());
            }
        }
    }
}

impl Drop for StopDevices {
    fn drop(&mut self) {
        for d in &self.devices {
            if !matches!(d.state(), Ok(MigState::Stop)) {
                if let Err(e) = d.set_state(MigState::Stop) {
                    log::error!(
                        "device {}: STOP after an uncertain switch-over: {e}",
                        d.id()
                    );
                }
            }
        }
    }
}
