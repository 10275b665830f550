//! One KVM virtual machine: creation (irqchip, PIT, memslots, vCPUs,
//! devices), kernel boot, vCPU threads, pause/resume.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};

use crate::caps::HostCaps;
use crate::config::{BootConfig, SerialConfig};
use crate::device_set::DeviceSet;
use crate::memory::GuestRam;
use crate::pio::{serial_output, LegacyIrqs, PioBus, PioError};
use crate::vcpu::{self, RunControl, Vcpu, VcpuContext};
use crate::VmmEvent;

/// Address KVM uses for the real-mode TSS (3 pages), inside the 32-bit gap.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Address of KVM's EPT identity map page, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = devices::serial::COM1_IRQ;
/// GSI of the i8042 keyboard.
pub const KBD_GSI: u32 = devices::i8042::KBD_IRQ;

static NEXT_VM_ID: AtomicU64 = AtomicU64::new(1);

/// Errors of VM setup and control.
///
/// Invariant: messages say which step failed; [`VmError::is_bad_input`]
/// tells errors caused by user input (kernel, initramfs, command line).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: String,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// /dev/kvm is unusable.
    #[error("{0}")]
    Host(String),
    /// Guest memory setup failed.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Device setup failed.
    #[error(transparent)]
    Pio(#[from] PioError),
    /// A kernel or initramfs file could not be opened.
    #[error("{what} '{path}': {source}")]
    BootFile {
        /// `kernel` or `initramfs`.
        what: &'static str,
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel, initramfs or command line was refused.
    #[error("{0}")]
    Boot(#[from] arch::Error),
    /// A device could not be created.
    #[error("{0}")]
    Device(String),
    /// A thread could not be spawned.
    #[error("spawning a vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The operation does not fit the VM's state.
    #[error("{0}")]
    State(String),
}

impl VmError {
    /// Whether this error comes from bad user input (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            VmError::BootFile { .. } | VmError::Boot(_) | VmError::Device(_)
        )
    }
}

pub(crate) fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    let what = what.into();
    move |source| VmError::Kvm { what, source }
}

/// Boot information kept for `vm.info` (and carried by migrations).
///
/// Invariant: descriptive only; never used to re-boot a migrated VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// What was booted (on the original source).
    pub boot: Option<BootConfig>,
    /// Serial console setting in effect.
    pub serial: SerialConfig,
    /// Whether the VM arrived by migration.
    pub migrated_in: bool,
}

/// KVM memslot of one RAM region.
///
/// Invariant: `slot` is the KVM slot number of RAM region `slot` (same index).
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address.
    pub host_addr: u64,
}

impl Slot {
    /// The KVM region with `flags`.
    pub fn region(&self, flags: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot: self.slot,
            flags,
            guest_phys_addr: self.gpa,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }
}

/// A KVM VM with its RAM, vCPUs and devices.
///
/// Invariant: `vcpus[i].id == i`; `slots[i]` maps `ram.regions()[i]`; the
/// legacy irqfds (`irqs`: COM1 on GSI 4, i8042 on GSI 1) are registered for the VM's whole
/// life; vCPU threads exist only after [`Vm::start`].
pub struct Vm {
    /// Unique id of this VM in the process (tags [`VmmEvent`]s).
    pub id: u64,
    pub(crate) kvm: Kvm,
    pub(crate) fd: VmFd,
    pub(crate) ram: GuestRam,
    pub(crate) slots: Vec<Slot>,
    pub(crate) vcpus: Vec<Arc<Vcpu>>,
    pub(crate) pio: Mutex<Arc<PioBus>>,
    pub(crate) irqs: LegacyIrqs,
    pub(crate) serial_cfg: SerialConfig,
    pub(crate) ctl: Arc<RunControl>,
    pub(crate) caps: HostCaps,
    pub(crate) msr_list: Vec<u32>,
    pub(crate) devices: DeviceSet,
    pub(crate) desc: VmDescription,
    pub(crate) user_paused: AtomicBool,
    pub(crate) dirty_logging: AtomicBool,
    pub(crate) dirty: crate::dirty::DirtyTracker,
    pub(crate) started: AtomicBool,
    pub(crate) stopped: AtomicBool,
    events: Sender<VmmEvent>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("ram", &self.ram)
            .field("vcpus", &self.vcpus.len())
            .finish()
    }
}

/// Writes the LAPIC LVT LINT0 (ExtINT) / LINT1 (NMI) delivery modes so that
/// PIC interrupts and NMIs reach the vCPU (virtual wire mode).
fn setup_lint(fd: &VcpuFd) -> Result<(), VmError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = u32::from_le_bytes(b);
        let v = (v & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as libc::c_char;
        }
    }
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}

impl Vm {
    /// Creates a VM over `ram` with `cpus` vCPUs (CPUID, boot MSRs, FPU and
    /// LAPIC LINT set, registers not), in-kernel irqchip and PIT, COM1 and
    /// i8042. The VM does not run until [`Vm::start`].
    pub fn create(
        ram: GuestRam,
        cpus: u8,
        serial: SerialConfig,
        desc: VmDescription,
        devices: DeviceSet,
        events: Sender<VmmEvent>,
    ) -> Result<Vm, VmError> {
        let kvm = Kvm::new()
            .map_err(|e| VmError::Host(format!("cannot open /dev/kvm: {e} (is KVM available?)")))?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::Host(format!(
                "unsupported KVM API version {api} (need {})",
                kvm_bindings::KVM_API_VERSION
            )));
        }
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        let manual_protect = crate::dirty::enable_manual_protect(&kvm, &fd);

        let mut slots = Vec::new();
        for (i, r) in ram.regions().iter().enumerate() {
            let slot = Slot {
                slot: i as u32,
                gpa: r.gpa,
                size: r.size,
                host_addr: r.host_addr,
            };
            // SAFETY: the region maps live memory owned by `ram`, which the
            // Vm keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(slot.region(0)) }
                .map_err(kvm_err(format!("KVM_SET_USER_MEMORY_REGION slot {i}")))?;
            slots.push(slot);
        }

        let irqs = LegacyIrqs::new()?;
        fd.register_irqfd(&irqs.serial, SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        fd.register_irqfd(&irqs.keyboard, KBD_GSI)
            .map_err(kvm_err("KVM_IRQFD for the i8042"))?;
        let pio = PioBus::new(irqs.try_clone()?, serial_output(&serial)?)?;

        let base_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(cpus as usize);
        for id in 0..cpus {
            let vfd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err(format!("KVM_CREATE_VCPU {id}")))?;
            let mut cpuid = base_cpuid.clone();
            arch::cpuid::filter_cpuid(&mut cpuid, id, cpus);
            vfd.set_cpuid2(&cpuid)
                .map_err(kvm_err(format!("KVM_SET_CPUID2 on vCPU {id}")))?;
            let msrs = Msrs::from_entries(&arch::msr::boot_msr_entries())
                .map_err(|e| VmError::Host(format!("building boot MSRs: {e:?}")))?;
            let n = vfd
                .set_msrs(&msrs)
                .map_err(kvm_err(format!("KVM_SET_MSRS on vCPU {id}")))?;
            if n != msrs.as_slice().len() {
                warn!(
                    "vCPU {id}: KVM accepted {n} of {} boot MSRs",
                    msrs.as_slice().len()
                );
            }
            vfd.set_fpu(&arch::regs::setup_fpu())
                .map_err(kvm_err(format!("KVM_SET_FPU on vCPU {id}")))?;
            setup_lint(&vfd)?;
            vcpus.push(Arc::new(Vcpu::new(id, vfd)));
        }
        let (caps, msr_list) = {
            let first = vcpus
                .first()
                .ok_or_else(|| VmError::State("a VM needs at least one vCPU".into()))?;
            let vfd = first.lock();
            let mut caps = HostCaps::probe(&kvm, &vfd);
            caps.manual_protect = manual_protect;
            let msr_list = crate::caps::probe_msrs(&kvm, &vfd);
            (caps, msr_list)
        };
        debug!("host capabilities: {caps:?}; {} MSRs saved", msr_list.len());
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Host(format!("installing the vCPU kick signal handler: {e}")))?;
        let id = NEXT_VM_ID.fetch_add(1, Ordering::Relaxed);
        info!(
            "VM {id} created: {cpus} vCPU(s), {} MiB RAM ({}), in-kernel irqchip and PIT",
            ram.size() >> 20,
            ram.backing().kind()
        );
        Ok(Vm {
            id,
            kvm,
            fd,
            ram,
            slots,
            vcpus,
            pio: Mutex::new(Arc::new(pio)),
            irqs,
            serial_cfg: serial,
            ctl: Arc::new(RunControl::default()),
            caps,
            msr_list,
            devices,
            desc,
            user_paused: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
            dirty: crate::dirty::DirtyTracker::default(),
            started: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            events,
        })
    }

    /// Loads the kernel (and initramfs), writes the boot structures and sets
    /// the boot vCPU's registers.
    pub fn boot(&self, boot: &BootConfig) -> Result<(), VmError> {
        let mem = self.ram.mem();
        let mut kernel = File::open(&boot.kernel).map_err(|source| VmError::BootFile {
            what: "kernel",
            path: boot.kernel.display().to_string(),
            source,
        })?;
        let kl = arch::load_kernel(mem, &mut kernel)?;
        info!(
            "kernel {} loaded: {:?} protocol, entry {:#x}, ends at {:#x}",
            boot.kernel.display(),
            kl.protocol,
            kl.entry.0,
            kl.kernel_end.0
        );
        let initrd = match &boot.initramfs {
            Some(p) => {
                let mut f = File::open(p).map_err(|source| VmError::BootFile {
                    what: "initramfs",
                    path: p.display().to_string(),
                    source,
                })?;
                let i = arch::load_initramfs(mem, &mut f, kl.kernel_end)?;
                info!("initramfs at {:#x} ({} bytes)", i.addr.0, i.size);
                Some(i)
            }
            None => None,
        };
        let boot_info = arch::configure_system(
            mem,
            &arch::BootSetup {
                protocol: kl.protocol,
                cmdline: &boot.cmdline,
                initrd,
                num_cpus: self.vcpus.len() as u8,
                mem_size: self.ram.size(),
            },
        )?;
        debug!(
            "boot info at {:#x}, cmdline {:?}",
            boot_info.0, boot.cmdline
        );
        let bsp = self
            .vcpus
            .first()
            .ok_or_else(|| VmError::State("no boot vCPU".into()))?;
        let vfd = bsp.lock();
        let mut sregs = vfd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        arch::regs::setup_sregs(mem, kl.protocol, &mut sregs)?;
        vfd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        let regs = arch::regs::setup_regs(kl.protocol, kl.entry, boot_info);
        vfd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    /// Starts one thread per vCPU; with `paused`, they park before running.
    pub fn start(&self, paused: bool) -> Result<(), VmError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(VmError::State("VM already started".into()));
        }
        self.ctl.set_paused(paused);
        self.user_paused.store(paused, Ordering::SeqCst);
        let pio = self.pio.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for v in &self.vcpus {
            let ctx = VcpuContext {
                vm_id: self.id,
                ctl: self.ctl.clone(),
                pio: pio.clone(),
                events: self.events.clone(),
            };
            if let Err(e) = vcpu::spawn(v.clone(), ctx) {
                self.stop();
                return Err(VmError::Thread(e));
            }
        }
        info!(
            "VM {}: {} vCPU thread(s) started{}",
            self.id,
            self.vcpus.len(),
            if paused { " (paused)" } else { "" }
        );
        Ok(())
    }

    /// Pauses all vCPUs (no-op if paused); returns once none runs guest code.
    pub fn pause_vcpus(&self) {
        self.ctl.pause(&self.vcpus);
    }

    /// Lets the vCPUs run again.
    pub fn resume_vcpus(&self) {
        self.ctl.resume();
    }

    /// Whether the vCPUs are (being) held paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// User pause (`vm.pause`): fails if already paused by the user.
    pub fn user_pause(&self) -> Result<(), VmError> {
        if self.user_paused.swap(true, Ordering::SeqCst) {
            return Err(VmError::State("the VM is already paused".into()));
        }
        self.pause_vcpus();
        info!("VM {} paused", self.id);
        Ok(())
    }

    /// User resume (`vm.resume`): fails if not paused by the user.
    pub fn user_resume(&self) -> Result<(), VmError> {
        if !self.user_paused.swap(false, Ordering::SeqCst) {
            return Err(VmError::State("the VM is not paused".into()));
        }
        self.resume_vcpus();
        info!("VM {} resumed", self.id);
        Ok(())
    }

    /// Records that the (already paused) VM is held paused on the user's
    /// behalf: `vm.resume` is then the way to run it again.
    pub fn mark_user_paused(&self) {
        self.pause_vcpus();
        self.user_paused.store(true, Ordering::SeqCst);
    }

    /// Whether the user paused the VM.
    pub fn user_paused(&self) -> bool {
        self.user_paused.load(Ordering::SeqCst)
    }

    /// Stops and joins every vCPU thread. The VM cannot run again.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        self.ctl.stop(&self.vcpus);
        debug!("VM {} stopped", self.id);
    }

    /// The guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// The migratable devices.
    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    /// Descriptive configuration.
    pub fn description(&self) -> &VmDescription {
        &self.desc
    }

    /// Optional vCPU state this host offers, as chosen at creation.
    pub fn caps(&self) -> &HostCaps {
        &self.caps
    }

    /// Memslot flags currently in effect.
    pub(crate) fn slot_flags(&self) -> u32 {
        if self.dirty_logging.load(Ordering::SeqCst) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Vcpu thread liveness, for `vm.info`.
    pub fn vcpu_alive(&self) -> Vec<bool> {
        self.vcpus.iter().map(|v| v.is_alive()).collect()
    }

    /// Whether KVM offers the capability (helper for probes).
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.kvm.check_extension(cap)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
