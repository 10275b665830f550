//! One KVM virtual machine: creation (irqchip, PIT, memslots, vCPUs,
//! devices), kernel boot, vCPU threads, pause/resume.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use log::{debug, info, warn};
use serde::{Deserialize, Serialize};
use vm_memory::GuestAddress;

use crate::caps::HostCaps;
use crate::config::{BootConfig, SerialConfig};
use crate::device_set::DeviceSet;
use crate::memory::GuestRam;
use crate::pci::wiring::PciWiring;
use crate::pio::{serial_output, LegacyIrqs, PioBus, PioError};
use crate::state::VcpuStateSpec;
use crate::vcpu::{self, VcpuContext, VcpuHandle};
use crate::EventSink;

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

/// Boot information kept for `vm.info`.
///
/// Invariant: descriptive only; never used to re-boot a migrated VM, and
/// never sent to another host (a migration carries the guest, not its
/// host's files).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// What this VMM booted; `None` for a VM it received.
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

/// Where a VM is in its life.
///
/// Invariant: guest code runs only in `Running`; `Stopped` is final.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPhase {
    /// vCPU threads exist and accept registers and state; no guest code ran.
    Created,
    /// The vCPUs run guest code.
    Running,
    /// Started, and no vCPU runs guest code.
    Paused,
    /// The vCPU threads have ended.
    Stopped,
}

impl VmPhase {
    /// Whether no guest code runs and the vCPU state can be read.
    pub fn holds_still(self) -> bool {
        matches!(self, VmPhase::Created | VmPhase::Paused)
    }
}

/// The vCPU threads of a VM and the VM's phase, changed together.
///
/// Invariant: `handles[i]` is vCPU `i`; the lock around this is held for
/// the whole of any exchange with the threads (one requester at a time).
#[derive(Debug)]
pub(crate) struct Vcpus {
    pub(crate) handles: Vec<VcpuHandle>,
    pub(crate) phase: VmPhase,
}

/// Boot registers of the boot vCPU, set on its own thread.
///
/// Invariant: `entry` and `boot_info` come from loading a kernel into `ram`
/// with `protocol`.
pub struct BootRegs {
    /// The VM's RAM (the boot GDT and IDT are written there).
    pub ram: GuestRam,
    /// Boot protocol of the kernel.
    pub protocol: arch::BootProtocol,
    /// Kernel entry point.
    pub entry: GuestAddress,
    /// Boot information (zero page or PVH start info).
    pub boot_info: GuestAddress,
}

/// Sets the boot registers on `fd` (called on the vCPU's thread).
pub(crate) fn setup_boot_regs(vfd: &VcpuFd, b: &BootRegs) -> Result<(), VmError> {
    let mut sregs = vfd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    arch::regs::setup_sregs(b.ram.mem(), b.protocol, &mut sregs)?;
    vfd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = arch::regs::setup_regs(b.protocol, b.entry, b.boot_info);
    vfd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

/// A KVM VM with its RAM, vCPUs and devices.
///
/// Invariant: `vcpus` holds `cpus` threads, vCPU `i` at index `i`, each
/// owning its `VcpuFd`; `slots[i]` maps `ram.regions()[i]`; the serial
/// legacy irqfds (`irqs`: COM1 on GSI 4, the i8042 on GSI 1) are
/// registered for the VM's whole life;
/// guest code runs only after [`Vm::start`]; `throttle` is the percent
/// every vCPU thread was last told (changed only under the `vcpus` lock).
pub struct Vm {
    /// Unique id of this VM in the process (tags [`crate::VmmEvent`]s).
    pub id: u64,
    pub(crate) kvm: Kvm,
    pub(crate) fd: Arc<VmFd>,
    pub(crate) ram: GuestRam,
    pub(crate) slots: Vec<Slot>,
    pub(crate) cpus: u8,
    vcpus: Mutex<Vcpus>,
    pub(crate) pio: Mutex<Arc<PioBus>>,
    /// The PCI bus and its KVM wiring (host bridge at least).
    pub(crate) pci: Arc<PciWiring>,
    pub(crate) irqs: LegacyIrqs,
    pub(crate) serial_cfg: SerialConfig,
    pub(crate) spec: Arc<VcpuStateSpec>,
    pub(crate) devices: DeviceSet,
    pub(crate) desc: VmDescription,
    /// The CPUID given to vCPU 0 (what a migration carries).
    pub(crate) cpuid: Vec<kvm_cpuid_entry2>,
    pub(crate) user_paused: AtomicBool,
    pub(crate) dirty_logging: AtomicBool,
    throttle: AtomicU32,
    pub(crate) dirty: crate::dirty::DirtyTracker,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("id", &self.id)
            .field("ram", &self.ram)
            .field("vcpus", &self.cpus)
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

fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// The CPUID this host gives vCPU 0 of a VM with `cpus` vCPUs (what
/// [`Vm::create`] sets), without creating a VM: a migration destination
/// compares it with the incoming guest's.
pub fn host_guest_cpuid(cpus: u8) -> Result<Vec<kvm_cpuid_entry2>, VmError> {
    let kvm = Kvm::new()
        .map_err(|e| VmError::Host(format!("cannot open /dev/kvm: {e} (is KVM available?)")))?;
    let mut cpuid = supported_cpuid(&kvm)?;
    arch::cpuid::filter_cpuid(&mut cpuid, 0, cpus);
    Ok(cpuid.as_slice().to_vec())
}

/// A KVM VM with its memory slots over `ram`, and nothing else yet: the
/// part of a VM whose cost grows with the guest's size (the kernel's
/// per-page metadata of each slot), made ahead of time where a destination
/// knows its guest's memory (`--memory` without `--kernel`).
///
/// Invariant: `slots[i]` is registered in `fd` over `ram.regions()[i]`,
/// and `ram` outlives `fd` (both move together into the [`Vm`]).
pub struct VmShell {
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    slots: Vec<Slot>,
    manual_protect: crate::dirty::ManualProtect,
}

impl std::fmt::Debug for VmShell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmShell").field("ram", &self.ram).finish()
    }
}

impl VmShell {
    /// Creates the KVM VM (TSS, identity map, irqchip, PIT, dirty-log
    /// protection mode) and registers `ram` as its memory slots.
    pub fn new(ram: GuestRam) -> Result<VmShell, VmError> {
        let started = std::time::Instant::now();
        let kvm = Kvm::new()
            .map_err(|e| VmError::Host(format!("cannot open /dev/kvm: {e} (is KVM available?)")))?;
        let api = kvm.get_api_version();
        if api != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::Host(format!(
                "unsupported KVM API version {api} (need {})",
                kvm_bindings::KVM_API_VERSION
            )));
        }
        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
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
            // shell (then the Vm) keeps for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(slot.region(0)) }
                .map_err(kvm_err(format!("KVM_SET_USER_MEMORY_REGION slot {i}")))?;
            slots.push(slot);
        }
        debug!(
            "KVM VM with {} MiB in {} slot(s) made in {:?}",
            ram.size() >> 20,
            slots.len(),
            started.elapsed()
        );
        Ok(VmShell {
            kvm,
            fd,
            ram,
            slots,
            manual_protect,
        })
    }

    /// The RAM the slots map.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The shell with the source's handed-over memory mapped in place of
    /// its RAM ([`GuestRam::adopt_handover`]): the slots stay, so no
    /// memory slot (whose cost grows with the guest) is made during the
    /// migration. On error the shell is dropped (its RAM, possibly half
    /// replaced, is lent and never cleared).
    pub fn adopt_handover(self, regions: Vec<migration::RegionFd>) -> Result<VmShell, VmError> {
        let ram = self
            .ram
            .adopt_handover(regions)
            .map_err(|e| VmError::Host(e.to_string()))?;
        Ok(VmShell { ram, ..self })
    }
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
        events: EventSink,
    ) -> Result<Vm, VmError> {
        Vm::create_in(VmShell::new(ram)?, cpus, serial, desc, devices, events)
    }

    /// [`Vm::create`] in a [`VmShell`] made earlier (a destination's
    /// pre-provisioned one): the KVM VM and its memory slots exist already.
    pub fn create_in(
        shell: VmShell,
        cpus: u8,
        serial: SerialConfig,
        desc: VmDescription,
        devices: DeviceSet,
        events: EventSink,
    ) -> Result<Vm, VmError> {
        let VmShell {
            kvm,
            fd,
            ram,
            slots,
            manual_protect,
        } = shell;
        // Before any guest code runs (a destination's RAM exists now): the
        // PCI bus, its MSI sinks, and guest RAM DMA-mapped in its devices.
        let pci = Arc::new(
            PciWiring::build(&fd, &ram, devices.pci_functions(), !desc.migrated_in)
                .map_err(VmError::Device)?,
        );

        let irqs = LegacyIrqs::new()?;
        fd.register_irqfd(&irqs.serial, SERIAL_GSI)
            .map_err(kvm_err("KVM_IRQFD for COM1"))?;
        fd.register_irqfd(&irqs.keyboard, KBD_GSI)
            .map_err(kvm_err("KVM_IRQFD for the i8042"))?;
        let pio = PioBus::new(irqs.try_clone()?, serial_output(&serial)?)?;

        let base_cpuid = supported_cpuid(&kvm)?;
        let mut fds = Vec::with_capacity(cpus as usize);
        let mut cpuid0 = Vec::new();
        for id in 0..cpus {
            let vfd = fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err(format!("KVM_CREATE_VCPU {id}")))?;
            let mut cpuid = base_cpuid.clone();
            arch::cpuid::filter_cpuid(&mut cpuid, id, cpus);
            if id == 0 {
                cpuid0 = cpuid.as_slice().to_vec();
            }
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
            fds.push(vfd);
        }
        // The fds are configured and probed here, before any thread exists;
        // from then on each is owned by its vCPU thread.
        let spec = {
            let first = fds
                .first()
                .ok_or_else(|| VmError::State("a VM needs at least one vCPU".into()))?;
            let mut caps = HostCaps::probe(&kvm, first);
            caps.manual_protect = manual_protect.enabled;
            let msr_list = crate::caps::probe_msrs(&kvm, first);
            Arc::new(VcpuStateSpec {
                caps,
                msr_list,
                vm_fd: Some(fd.clone()),
            })
        };
        debug!(
            "host capabilities: {:?}; {} MSRs saved",
            spec.caps,
            spec.msr_list.len()
        );
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Host(format!("installing the vCPU kick signal handler: {e}")))?;
        let id = NEXT_VM_ID.fetch_add(1, Ordering::Relaxed);
        let mut handles = Vec::with_capacity(fds.len());
        for (i, vfd) in fds.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: i as u8,
                vm_id: id,
                spec: spec.clone(),
                events: events.clone(),
            };
            // On failure, the handles spawned so far end their threads on drop.
            handles.push(VcpuHandle::spawn(vfd, ctx).map_err(VmError::Thread)?);
        }
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
            cpus,
            vcpus: Mutex::new(Vcpus {
                handles,
                phase: VmPhase::Created,
            }),
            pio: Mutex::new(Arc::new(pio)),
            pci,
            irqs,
            serial_cfg: serial,
            spec,
            devices,
            desc,
            cpuid: cpuid0,
            user_paused: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
            throttle: AtomicU32::new(0),
            dirty: crate::dirty::DirtyTracker::new(manual_protect),
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
                num_cpus: self.cpus,
                mem_size: self.ram.size(),
            },
        )?;
        debug!(
            "boot info at {:#x}, cmdline {:?}",
            boot_info.0, boot.cmdline
        );
        let g = self.lock_vcpus();
        if g.phase != VmPhase::Created {
            return Err(VmError::State("the VM already runs".into()));
        }
        let bsp = g
            .handles
            .first()
            .ok_or_else(|| VmError::State("no boot vCPU".into()))?;
        // The boot vCPU's thread sets its own registers.
        bsp.boot(BootRegs {
            ram: self.ram.clone(),
            protocol: kl.protocol,
            entry: kl.entry,
            boot_info,
        })
    }

    /// Locks the vCPU threads and the VM's phase.
    pub(crate) fn lock_vcpus(&self) -> MutexGuard<'_, Vcpus> {
        self.vcpus.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM's phase.
    pub fn phase(&self) -> VmPhase {
        self.lock_vcpus().phase
    }

    /// Sets the guest TSC frequency of every vCPU (before the VM starts).
    pub fn set_tsc_khz(&self, khz: u32) -> Result<(), VmError> {
        let g = self.lock_vcpus();
        if g.phase != VmPhase::Created {
            return Err(VmError::State("the VM already runs".into()));
        }
        for v in &g.handles {
            v.set_tsc_khz(khz)?;
        }
        Ok(())
    }

    /// Starts the vCPUs; with `paused`, they stay paused until resumed.
    pub fn start(&self, paused: bool) -> Result<(), VmError> {
        let mut g = self.lock_vcpus();
        if g.phase != VmPhase::Created {
            return Err(VmError::State("VM already started".into()));
        }
        self.user_paused.store(paused, Ordering::SeqCst);
        let pio = self.pio.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let pci: Arc<dyn crate::pci::io::PciIo> = self.pci.clone();
        let buses = Arc::new(crate::pci::io::Buses::new(pio, Some(pci)));
        if let Err(e) = vcpu::start_all(&g.handles, &buses) {
            drop(g);
            self.stop();
            return Err(e);
        }
        g.phase = VmPhase::Paused;
        if !paused {
            vcpu::resume_all(&g.handles);
            g.phase = VmPhase::Running;
        }
        info!(
            "VM {}: {} vCPU thread(s) started{}",
            self.id,
            g.handles.len(),
            if paused { " (paused)" } else { "" }
        );
        Ok(())
    }

    /// Pauses all vCPUs (no-op unless running); returns once none runs
    /// guest code.
    pub fn pause_vcpus(&self) {
        let mut g = self.lock_vcpus();
        if g.phase == VmPhase::Running {
            vcpu::pause_all(&g.handles);
            g.phase = VmPhase::Paused;
        }
    }

    /// Lets the vCPUs run again (no-op unless paused).
    pub fn resume_vcpus(&self) {
        let mut g = self.lock_vcpus();
        if g.phase == VmPhase::Paused {
            vcpu::resume_all(&g.handles);
            g.phase = VmPhase::Running;
        }
    }

    /// Throttles every vCPU: `percent` (0..=[`vcpu::throttle::MAX_PERCENT`])
    /// of its time is taken away while it runs guest code, until set back
    /// to 0. Returns once every vCPU thread has the new value in force. A
    /// paused VM stays paused (the throttle applies once it runs again).
    pub fn set_throttle(&self, percent: u32) -> Result<(), VmError> {
        if percent > vcpu::throttle::MAX_PERCENT {
            return Err(VmError::State(format!(
                "a vCPU throttle of {percent}% is out of range (0..={})",
                vcpu::throttle::MAX_PERCENT
            )));
        }
        let g = self.lock_vcpus();
        if self.throttle.load(Ordering::SeqCst) == percent {
            return Ok(());
        }
        vcpu::throttle_all(&g.handles, percent);
        self.throttle.store(percent, Ordering::SeqCst);
        info!("VM {}: vCPU throttle {percent}%", self.id);
        Ok(())
    }

    /// The vCPU throttle in force, in percent (0: full speed).
    pub fn throttle(&self) -> u32 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Whether the vCPUs are held paused.
    pub fn is_paused(&self) -> bool {
        self.phase() == VmPhase::Paused
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
        let mut g = self.lock_vcpus();
        if g.phase == VmPhase::Stopped {
            return;
        }
        vcpu::exit_all(&mut g.handles);
        g.phase = VmPhase::Stopped;
        debug!("VM {} stopped", self.id);
    }

    /// The guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        usize::from(self.cpus)
    }

    /// The migratable devices.
    pub fn devices(&self) -> &DeviceSet {
        &self.devices
    }

    /// Descriptive configuration.
    pub fn description(&self) -> &VmDescription {
        &self.desc
    }

    /// The CPUID vCPU 0 was given.
    pub fn cpuid(&self) -> &[kvm_cpuid_entry2] {
        &self.cpuid
    }

    /// Optional vCPU state this host offers, as chosen at creation.
    pub fn caps(&self) -> &HostCaps {
        &self.spec.caps
    }

    /// Memslot flags currently in effect.
    pub(crate) fn slot_flags(&self) -> u32 {
        if self.dirty_logging.load(Ordering::SeqCst) {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }

    /// Whether each vCPU thread runs the guest (started, paused or not,
    /// and not ended), for `vm.info`.
    pub fn vcpu_alive(&self) -> Vec<bool> {
        let g = self.lock_vcpus();
        let started = matches!(g.phase, VmPhase::Running | VmPhase::Paused);
        g.handles.iter().map(|v| started && v.is_alive()).collect()
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
