//! Adapters of the migration job: the migration crate's traits implemented
//! with KVM, [`SourceVm`] for a running VM, [`DestinationFactory`] /
//! [`DestinationVm`] for a VMM that receives one. What a source sends about
//! its guest, and what a destination accepts, is in
//! [`super::guest_config`].

use std::ops::Range;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use migration::{
    BackendError, BackendResult, DestinationFactory, DestinationVm, DirtyBitmap, MemoryHandover,
    MigratableDevice, PostcopyRam, RamRegion, RegionFd, SourceVm,
};

use super::guest_config::{Accepted, DestPolicy, MigrationConfig};
use crate::config::{MemoryBacking, MemoryConfig, SerialConfig};
use crate::device_set::DeviceSet;
use crate::memory::GuestRam;
use crate::vm::{Vm, VmDescription};
use crate::Vmm;

fn be<E: std::fmt::Display>(e: E) -> BackendError {
    BackendError::new(e.to_string())
}

fn ram_regions(vm: &Vm) -> Vec<RamRegion> {
    vm.ram()
        .regions()
        .iter()
        // SAFETY: each region is a live mapping owned by the VM's GuestRam
        // (RegionInfo invariant), page-aligned and non-overlapping; the
        // adapters that return these regions hold an `Arc<Vm>`, so the
        // mapping outlives them (the `RamRegion::new` contract).
        .map(|r| unsafe { RamRegion::new(r.gpa, r.size, r.host_addr as usize) })
        .collect()
}

/// [`SourceVm`] over a running [`Vm`].
///
/// Invariant: `user_paused` is the user's pause state when the migration
/// started; the VM outlives this object (it holds an `Arc`).
pub struct SourceAdapter {
    vm: Arc<Vm>,
    user_paused: bool,
}

impl SourceAdapter {
    /// Wraps `vm` for one migration.
    pub fn new(vm: Arc<Vm>) -> SourceAdapter {
        let user_paused = vm.user_paused();
        SourceAdapter { vm, user_paused }
    }
}

impl SourceVm for SourceAdapter {
    fn config(&self) -> BackendResult<Vec<u8>> {
        serde_json::to_vec(&MigrationConfig::of(&self.vm)).map_err(be)
    }

    fn ram(&self) -> Vec<RamRegion> {
        ram_regions(&self.vm)
    }

    fn populated(&self, region: usize) -> BackendResult<Vec<Range<u64>>> {
        self.vm.ram().populated(region).map_err(be)
    }

    fn start_dirty_log(&self) -> BackendResult<()> {
        self.vm.start_dirty_log().map_err(be)
    }

    fn stop_dirty_log(&self) -> BackendResult<()> {
        self.vm.stop_dirty_log().map_err(be)
    }

    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap> {
        Ok(DirtyBitmap {
            words: self.vm.fetch_dirty(region).map_err(be)?,
        })
    }

    fn fetch_dirty_into(&self, region: usize, into: &mut DirtyBitmap) -> BackendResult<()> {
        self.vm
            .fetch_dirty_into(region, &mut into.words)
            .map_err(be)
    }

    fn manual_protect(&self) -> bool {
        self.vm.caps().manual_protect
    }

    fn clear_dirty(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        self.vm.clear_dirty(region, first_page, npages).map_err(be)
    }

    fn pause(&self) -> BackendResult<()> {
        self.vm.pause_vcpus();
        Ok(())
    }

    fn resume(&self) -> BackendResult<()> {
        if !self.user_paused {
            self.vm.resume_vcpus();
        }
        Ok(())
    }

    fn user_paused(&self) -> bool {
        self.user_paused
    }

    fn save_state(&self) -> BackendResult<Vec<u8>> {
        let s = self.vm.save_state().map_err(be)?;
        crate::state::encode(&s).map_err(be)
    }

    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.vm.devices().migratable()
    }

    fn vcpus(&self) -> Option<u32> {
        Some(self.vm.cpus as u32)
    }

    /// Throttles the VM's vCPU threads (see [`crate::vcpu::throttle`]).
    fn set_throttle(&self, percent: u32) -> BackendResult<()> {
        self.vm.set_throttle(percent).map_err(be)
    }

    fn memory_handover(&self) -> Option<&dyn MemoryHandover> {
        Some(self)
    }
}

impl MemoryHandover for SourceAdapter {
    /// The memfd or `file=` backing of the VM's RAM (see
    /// [`GuestRam::lend`]).
    fn lend(&self) -> Result<Vec<RegionFd>, String> {
        self.vm.ram().lend()
    }
}

/// Builds destination VMs for `migration::receive`.
///
/// Invariant: at most one VM built by this factory is alive at a time; a
/// started VM is installed as the VMM's VM before its vCPUs run.
pub struct DestFactory {
    vmm: Arc<Vmm>,
}

impl DestFactory {
    /// A factory installing received VMs into `vmm`.
    pub fn new(vmm: Arc<Vmm>) -> DestFactory {
        DestFactory { vmm }
    }
}

impl DestinationFactory for DestFactory {
    /// Builds the VM that will receive the incoming guest, after every
    /// check passed: what the guest is (its configuration) against what
    /// this destination allows (its own command line: memory, declared
    /// devices) and offers (CPUID). Only then are RAM, devices and vCPUs
    /// allocated, all from this destination's own configuration.
    fn create(&self, config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        self.build(config, None)
    }

    /// As `create`, with the source's memory mapped shared instead of RAM
    /// of this VMM (see [`GuestRam::from_handover`]).
    fn create_mapped(
        &self,
        config: &[u8],
        regions: Vec<RegionFd>,
    ) -> BackendResult<Arc<dyn DestinationVm>> {
        self.build(config, Some(regions))
    }
}

impl DestFactory {
    /// The VM of `create` (`handover`: None) or `create_mapped`.
    fn build(
        &self,
        config: &[u8],
        handover: Option<Vec<RegionFd>>,
    ) -> BackendResult<Arc<dyn DestinationVm>> {
        let vmm = &self.vmm;
        let policy = DestPolicy::of(vmm.config()).map_err(BackendError::new)?;
        let Accepted {
            cfg,
            devices: specs,
        } = MigrationConfig::parse_and_check(config, &policy).map_err(BackendError::new)?;
        let host_cpuid = crate::vm::host_guest_cpuid(cfg.cpus).map_err(be)?;
        cfg.check_cpuid(&host_cpuid).map_err(BackendError::new)?;
        info!(
            "incoming VM: {} vCPU(s), {} MiB RAM, {} device(s)",
            cfg.cpus,
            cfg.memory_size >> 20,
            cfg.devices.len()
        );
        // Provisioned RAM that a handover replaced is the source's memory
        // now: never reused (nor cleared) for a later receive.
        let (provisioned, lent) = match handover {
            Some(_) => (None, false),
            None => match vmm.provisioned_ram() {
                Some(r) if r.is_lent() => (None, true),
                r => (r, false),
            },
        };
        // The KVM VM prepared at start (its memory slots cost time that
        // grows with the guest's size), if any is left; handed-over memory
        // is mapped in place of its RAM.
        let mut shell = match (&handover, &provisioned) {
            (Some(_), _) | (None, Some(_)) => vmm.take_vm_shell(),
            (None, None) => None,
        };
        let ram = match (&provisioned, handover) {
            (_, Some(regions)) => match shell.take() {
                Some(s) if s.ram().size() == cfg.memory_size => {
                    let s = s.adopt_handover(regions).map_err(be)?;
                    let ram = s.ram().clone();
                    shell = Some(s);
                    ram
                }
                _ => GuestRam::from_handover(cfg.memory_size, regions).map_err(be)?,
            },
            (Some(r), None) => r.clone(),
            (None, None) => {
                let backing = if vmm.config().memory_explicit {
                    vmm.config().memory.backing.clone()
                } else {
                    MemoryBacking::Anonymous
                };
                if let (true, MemoryBacking::File(path)) = (lent, &backing) {
                    // The file is the memory of a guest that moved on to
                    // another process: opening it again would clear it.
                    return Err(BackendError::new(format!(
                        "the memory file {} was handed over to another process with an \
                         earlier guest; this VMM cannot receive into it again (start a new \
                         one)",
                        path.display()
                    )));
                }
                GuestRam::new(&MemoryConfig {
                    size: cfg.memory_size,
                    backing,
                    prefault: false,
                })
                .map_err(be)?
            }
        };
        // Receiver contract: pages the source never sends read as zero, so
        // a memory file with old contents or reused RAM is cleared first
        // (not handed-over memory: the guest lives in it, no page is sent).
        if !ram.is_lent() {
            ram.claim_zeroed().map_err(be)?;
        }
        let devices = DeviceSet::create(&specs, false).map_err(be)?;
        // This destination's serial setting; tty by default, as for a VM it boots.
        let serial = vmm.config().serial.clone().unwrap_or(SerialConfig::Tty);
        let desc = VmDescription {
            boot: None,
            serial: serial.clone(),
            migrated_in: true,
        };
        let vm = match shell {
            Some(shell) => {
                log::debug!("incoming VM placed in the KVM VM prepared at start");
                Vm::create_in(shell, cfg.cpus, serial, desc, devices, vmm.event_sink())
            }
            None => Vm::create(ram, cfg.cpus, serial, desc, devices, vmm.event_sink()),
        }
        .map_err(be)?;
        cfg.check_msrs(&vm.spec.msr_list)
            .map_err(BackendError::new)?;
        vm.caps()
            .can_restore(&cfg.caps)
            .map_err(|e| BackendError::new(format!("incompatible vCPU state: {e}")))?;
        if let Some(khz) = cfg.caps.tsc_khz {
            if vm.caps().tsc_khz != Some(khz) {
                if vm.caps().tsc_control {
                    vm.set_tsc_khz(khz).map_err(be)?;
                } else {
                    warn!(
                        "source TSC runs at {khz} kHz, this host at {:?} kHz and cannot scale it; guest time may drift",
                        vm.caps().tsc_khz
                    );
                }
            }
        }
        Ok(Arc::new(DestAdapter {
            vm: Arc::new(vm),
            vmm: self.vmm.clone(),
            reused_ram: provisioned.is_some(),
            started: Mutex::new(false),
        }))
    }
}

/// [`DestinationVm`] over a freshly created [`Vm`].
///
/// Invariant: the VM runs guest code only after `start`.
pub struct DestAdapter {
    vm: Arc<Vm>,
    vmm: Arc<Vmm>,
    reused_ram: bool,
    started: Mutex<bool>,
}

impl DestinationVm for DestAdapter {
    fn ram(&self) -> Vec<RamRegion> {
        ram_regions(&self.vm)
    }

    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.vm.devices().migratable()
    }

    fn restore_state(&self, state: &[u8]) -> BackendResult<()> {
        let s = crate::state::decode(state).map_err(be)?;
        self.vm.restore_state(&s).map_err(be)
    }

    fn start(&self, paused: bool) -> BackendResult<()> {
        let mut started = self.started.lock().unwrap_or_else(|p| p.into_inner());
        self.vmm.install_received_vm(self.vm.clone());
        if let Err(e) = self.vm.start(paused) {
            self.vmm.uninstall_vm(self.vm.id);
            return Err(be(e));
        }
        *started = true;
        log::debug!(
            "received VM {} started{}",
            self.vm.id,
            if paused {
                " (paused, as on the source)"
            } else {
                ""
            }
        );
        Ok(())
    }

    fn postcopy(&self) -> BackendResult<Arc<dyn PostcopyRam>> {
        Ok(Arc::new(crate::postcopy::UffdRam::new(
            self.vm.ram().clone(),
        )?))
    }

    fn discard(&self) {
        self.vm.stop();
        self.vmm.uninstall_vm(self.vm.id);
        if self.reused_ram {
            // Pre-provisioned memory is reused by the next receive: it must
            // read as zeroes again.
            self.vm.ram().zero();
        }
        info!("half-received VM {} discarded", self.vm.id);
    }
}
