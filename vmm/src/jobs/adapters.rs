//! Adapters of the migration job: the migration crate's traits implemented
//! with KVM, [`SourceVm`] for a running VM, [`DestinationFactory`] /
//! [`DestinationVm`] for a VMM that receives one, and the VM configuration
//! a source sends ([`MigrationConfig`]).

use std::ops::Range;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use migration::{
    BackendError, BackendResult, DestinationFactory, DestinationVm, DirtyBitmap, MigratableDevice,
    RamRegion, SourceVm,
};
use serde::{Deserialize, Serialize};

use crate::caps::HostCaps;
use crate::config::{BootConfig, MemoryBacking, MemoryConfig, SerialConfig};
use crate::device_set::{DeviceSet, DeviceSpec};
use crate::memory::GuestRam;
use crate::vm::{Vm, VmDescription};
use crate::Vmm;

/// Format name of [`MigrationConfig`].
pub const CONFIG_FORMAT: &str = "ferry-vm-config";
/// Version of [`MigrationConfig`].
pub const CONFIG_VERSION: u32 = 1;
/// Largest configuration accepted from a source.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The VM configuration a source sends (JSON).
///
/// Invariant: describes the VM that produced it: RAM regions as
/// `arch::layout::ram_regions(memory_size)`, devices in migration order,
/// and the optional vCPU state its saved state contains (`caps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// [`CONFIG_FORMAT`].
    pub format: String,
    /// [`CONFIG_VERSION`].
    pub version: u32,
    /// vCPU count.
    pub cpus: u8,
    /// Total RAM bytes.
    pub memory_size: u64,
    /// Backing kind on the source (informational).
    pub memory_kind: String,
    /// RAM regions as (gpa, size).
    pub regions: Vec<(u64, u64)>,
    /// Serial setting of the source.
    pub serial: SerialConfig,
    /// What the source booted (informational).
    pub boot: Option<BootConfig>,
    /// Devices, in order.
    pub devices: Vec<DeviceSpec>,
    /// Optional vCPU state included in the saved state.
    pub caps: HostCaps,
    /// Number of MSRs saved per vCPU.
    pub msr_count: usize,
}

impl MigrationConfig {
    /// Describes `vm`.
    pub fn of(vm: &Vm) -> MigrationConfig {
        MigrationConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            cpus: vm.vcpu_count() as u8,
            memory_size: vm.ram().size(),
            memory_kind: vm.ram().backing().kind().into(),
            regions: vm.ram().regions().iter().map(|r| (r.gpa, r.size)).collect(),
            serial: vm.serial_cfg.clone(),
            boot: vm.description().boot.clone(),
            devices: vm.devices().specs(),
            caps: vm.caps().clone(),
            msr_count: vm.spec.msr_list.len(),
        }
    }

    /// Parses and checks a received configuration against this VMM:
    /// format, version, vCPU count, memory layout and, when the destination
    /// has a fixed memory size (`expected_size`), that size.
    pub fn parse_and_check(
        bytes: &[u8],
        expected_size: Option<u64>,
    ) -> Result<MigrationConfig, String> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "VM configuration is {} bytes (at most {MAX_CONFIG_BYTES})",
                bytes.len()
            ));
        }
        let cfg: MigrationConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("unreadable VM configuration: {e}"))?;
        if cfg.format != CONFIG_FORMAT || cfg.version != CONFIG_VERSION {
            return Err(format!(
                "VM configuration format {} v{} is not supported (this VMM reads {CONFIG_FORMAT} v{CONFIG_VERSION})",
                cfg.format, cfg.version
            ));
        }
        if cfg.cpus == 0 || cfg.cpus > crate::config::MAX_CPUS {
            return Err(format!("invalid vCPU count {}", cfg.cpus));
        }
        if cfg.memory_size < crate::config::MIN_MEMORY
            || cfg.memory_size > crate::config::MAX_MEMORY
            || !cfg.memory_size.is_multiple_of(crate::memory::PAGE)
        {
            return Err(format!("invalid memory size {:#x}", cfg.memory_size));
        }
        let layout: Vec<(u64, u64)> = arch::layout::ram_regions(cfg.memory_size)
            .into_iter()
            .map(|(g, s)| (g.0, s as u64))
            .collect();
        if layout != cfg.regions {
            return Err(format!(
                "memory layout differs: source {:x?}, this VMM would use {:x?}",
                cfg.regions, layout
            ));
        }
        if let Some(size) = expected_size {
            if size != cfg.memory_size {
                return Err(format!(
                    "memory size mismatch: the source VM has {} MiB, this VMM was started with --memory size={} MiB",
                    cfg.memory_size >> 20,
                    size >> 20
                ));
            }
        }
        Ok(cfg)
    }
}

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
    fn create(&self, config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        let vmm = &self.vmm;
        let provisioned = vmm.provisioned_ram();
        let expected = vmm
            .config()
            .memory_explicit
            .then_some(vmm.config().memory.size);
        let cfg = MigrationConfig::parse_and_check(config, expected).map_err(BackendError::new)?;
        info!(
            "incoming VM: {} vCPU(s), {} MiB RAM, {} device(s)",
            cfg.cpus,
            cfg.memory_size >> 20,
            cfg.devices.len()
        );
        let ram = match &provisioned {
            Some(r) => r.clone(),
            None => {
                let backing = if vmm.config().memory_explicit {
                    vmm.config().memory.backing.clone()
                } else {
                    MemoryBacking::Anonymous
                };
                GuestRam::new(&MemoryConfig {
                    size: cfg.memory_size,
                    backing,
                    prefault: false,
                })
                .map_err(be)?
            }
        };
        // Receiver contract: pages the source never sends read as zero, so
        // a memory file with old contents or reused RAM is cleared first.
        ram.claim_zeroed().map_err(be)?;
        let devices = DeviceSet::create(&cfg.devices, false).map_err(be)?;
        let serial = vmm.config().serial.clone().unwrap_or(cfg.serial.clone());
        let desc = VmDescription {
            boot: cfg.boot.clone(),
            serial: serial.clone(),
            migrated_in: true,
        };
        let vm = Vm::create(ram, cfg.cpus, serial, desc, devices, vmm.event_sink()).map_err(be)?;
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
        info!(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(size: u64) -> MigrationConfig {
        MigrationConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            cpus: 1,
            memory_size: size,
            memory_kind: "anonymous".into(),
            regions: arch::layout::ram_regions(size)
                .into_iter()
                .map(|(g, s)| (g.0, s as u64))
                .collect(),
            serial: SerialConfig::Off,
            boot: None,
            devices: vec![],
            caps: HostCaps::default(),
            msr_count: 0,
        }
    }

    fn bytes(c: &MigrationConfig) -> Vec<u8> {
        serde_json::to_vec(c).unwrap()
    }

    #[test]
    fn compatible_configs() {
        let c = cfg(512 << 20);
        assert_eq!(
            MigrationConfig::parse_and_check(&bytes(&c), None).unwrap(),
            c
        );
        assert!(MigrationConfig::parse_and_check(&bytes(&c), Some(512 << 20)).is_ok());
        let big = cfg(6 << 30);
        assert_eq!(big.regions.len(), 2);
        assert!(MigrationConfig::parse_and_check(&bytes(&big), None).is_ok());
    }

    #[test]
    fn incompatible_configs() {
        let c = cfg(512 << 20);
        let e = MigrationConfig::parse_and_check(&bytes(&c), Some(1 << 30)).unwrap_err();
        assert!(e.contains("mismatch"), "{e}");
        let mut v = c.clone();
        v.version = 99;
        assert!(MigrationConfig::parse_and_check(&bytes(&v), None).is_err());
        let mut v = c.clone();
        v.regions = vec![(0, 256 << 20)];
        assert!(MigrationConfig::parse_and_check(&bytes(&v), None)
            .unwrap_err()
            .contains("layout"));
        let mut v = c.clone();
        v.cpus = 0;
        assert!(MigrationConfig::parse_and_check(&bytes(&v), None).is_err());
        let mut v = c.clone();
        v.memory_size = 12345;
        assert!(MigrationConfig::parse_and_check(&bytes(&v), None).is_err());
        assert!(MigrationConfig::parse_and_check(b"{not json", None).is_err());
        assert!(MigrationConfig::parse_and_check(&vec![b' '; MAX_CONFIG_BYTES + 1], None).is_err());
    }
}
