//! Saving and restoring vCPU, VM (irqchip, PIT, clock) and legacy device
//! state, encoded with bincode.

use std::sync::Arc;

use devices::i8042::I8042State;
use devices::serial::SerialState;
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{KvmNestedStateBuffer, VcpuFd};
use log::{debug, warn};
use serde::{Deserialize, Serialize};

use crate::caps::{HostCaps, LEGACY_XSAVE_SIZE};
use crate::pio::{serial_output, PioBus};
use crate::vm::{kvm_err, Vm, VmError};

/// Version of the state encoding; bumped on any layout change.
pub const STATE_VERSION: u32 = 3;

/// IA32_TSC_DEADLINE. KVM drops a write of it while the LAPIC timer is not
/// in TSC-deadline mode, so it is restored after KVM_SET_LAPIC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSR_KVM_SYSTEM_TIME_NEW: guest-physical address of the vCPU's pvclock
/// page, bit 0 = enabled.
pub const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// Size of `struct pvclock_vcpu_time_info`.
pub const PVCLOCK_SIZE: usize = 32;

/// kvmclock (ns) as a guest computes it from its pvclock page `page` at TSC
/// `tsc`: `system_time + ((tsc - tsc_timestamp) << shift) * mul >> 32`.
/// `None` while the page is being updated (odd version).
pub fn pvclock_read(page: &[u8; PVCLOCK_SIZE], tsc: u64) -> Option<u64> {
    let u32_at = |o: usize| u32::from_le_bytes([page[o], page[o + 1], page[o + 2], page[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
    if u32_at(0) & 1 != 0 {
        return None;
    }
    let (tsc_timestamp, system_time, mul, shift) =
        (u64_at(8), u64_at(16), u32_at(24), page[28] as i8);
    let mut delta = tsc.wrapping_sub(tsc_timestamp);
    if shift < 0 {
        delta >>= u32::from(shift.unsigned_abs()).min(63);
    } else {
        delta <<= u32::from(shift.unsigned_abs()).min(63);
    }
    let ns = (u128::from(delta) * u128::from(mul)) >> 32;
    Some(system_time.wrapping_add(u64::try_from(ns).unwrap_or(u64::MAX)))
}

/// What saving and restoring one vCPU covers, fixed when its VM is created
/// and shared by the VM's vCPU threads.
///
/// Invariant: `caps` and `msr_list` were probed on a fresh vCPU of the VM.
#[derive(Debug, Clone, Default)]
pub struct VcpuStateSpec {
    /// Optional vCPU state this host offers.
    pub caps: HostCaps,
    /// MSRs saved per vCPU.
    pub msr_list: Vec<u32>,
    /// The VM fd, for the kvmclock reads that place IA32_TSC on the
    /// kvmclock time line (`None`: the TSC is saved and restored as is).
    pub vm_fd: Option<Arc<kvm_ioctls::VmFd>>,
}

/// Saved state of one vCPU.
///
/// Invariant: optional parts are present exactly when the VM's
/// [`crate::caps::HostCaps`] selected them.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (used when XSAVE is unavailable).
    pub fpu: FpuBytes,
    /// XSAVE area as 32-bit words (4 KiB, or the KVM_CAP_XSAVE2 size).
    pub xsave: Option<Vec<u32>>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// kvmclock (ns) when IA32_TSC was read (0: unknown). With the VM's
    /// clock it places the saved TSC on the kvmclock time line, so that the
    /// destination restores TSC and kvmclock as one instant.
    pub clock_at_msrs: u64,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Run state (runnable, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: Option<kvm_debugregs>,
    /// Nested virtualization state (raw `KvmNestedStateBuffer` bytes).
    pub nested: Option<Vec<u8>>,
}

/// `kvm_fpu` has no serde support: its raw bytes.
///
/// Invariant: exactly `size_of::<kvm_fpu>()` bytes when valid.
#[derive(Clone, Serialize, Deserialize)]
pub struct FpuBytes(pub Vec<u8>);

/// Saved state of the whole VM.
///
/// Invariant: `vcpus[i]` belongs to vCPU `i`.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// [`STATE_VERSION`] of the producer.
    pub version: u32,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialState,
    /// i8042.
    pub i8042: I8042State,
    /// The PCI layer of every PCI device, in bus order (version 3).
    pub pci: Vec<devices::pci::PciFunctionState>,
}

/// Errors decoding or applying state.
///
/// Invariant: the message says which part failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes are not a state of this version.
    #[error("decoding VM state: {0}")]
    Decode(String),
    /// The state does not fit this VM.
    #[error("VM state does not fit this VM: {0}")]
    Mismatch(String),
    /// A KVM call failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// `KVM_SET_MSRS` refused an MSR that is not on [`MSR_RESTORE_IGNORE`].
    #[error(
        "this host's KVM refused to restore MSR {index:#x} (value {data:#x}) on vCPU {vcpu}: \
         the guest would run on with it reset (not on the MSR ignore list, see MSR_RESTORE_IGNORE)"
    )]
    MsrRefused {
        /// vCPU index.
        vcpu: u8,
        /// MSR index.
        index: u32,
        /// The value that was refused.
        data: u64,
    },
}

/// MSRs that may be lost on restore: when `KVM_SET_MSRS` refuses one of
/// these, it is skipped with a warning. Any other refused MSR fails the
/// restore, and so the migration, naming the MSR ([`StateError::MsrRefused`]).
/// Each entry describes the host rather than the guest, so the
/// destination's own value is as true for the guest as the source's.
pub const MSR_RESTORE_IGNORE: &[(u32, &str)] = &[
    (
        0x8b,
        "IA32_UCODE_REV: the microcode revision of the host the guest runs on",
    ),
    (
        0x34,
        "MSR_SMI_COUNT: how many SMIs the host took, a statistic",
    ),
];

/// What a refusal of MSR `index` (value `data`) by `KVM_SET_MSRS` on vCPU
/// `vcpu` means: `Ok` (skip it, warned) for an MSR on
/// [`MSR_RESTORE_IGNORE`], an error for any other.
pub fn msr_refused(vcpu: u8, index: u32, data: u64) -> Result<(), StateError> {
    match MSR_RESTORE_IGNORE.iter().find(|(i, _)| *i == index) {
        Some((_, why)) => {
            warn!("vCPU {vcpu}: KVM refused MSR {index:#x}; skipped (ignore list: {why})");
            Ok(())
        }
        None => Err(StateError::MsrRefused { vcpu, index, data }),
    }
}

fn fpu_bytes(f: &kvm_fpu) -> FpuBytes {
    // SAFETY: kvm_fpu is a plain C struct; reading its bytes is fine.
    let b = unsafe {
        std::slice::from_raw_parts(
            (f as *const kvm_fpu).cast::<u8>(),
            std::mem::size_of::<kvm_fpu>(),
        )
    };
    FpuBytes(b.to_vec())
}

fn fpu_from(b: &FpuBytes) -> Result<kvm_fpu, StateError> {
    if b.0.len() != std::mem::size_of::<kvm_fpu>() {
        return Err(StateError::Mismatch(format!(
            "FPU state is {} bytes, expected {}",
            b.0.len(),
            std::mem::size_of::<kvm_fpu>()
        )));
    }
    let mut f = kvm_fpu::default();
    // SAFETY: sizes match (checked); every bit pattern is a valid kvm_fpu.
    unsafe {
        std::ptr::copy_nonoverlapping(
            b.0.as_ptr(),
            (&mut f as *mut kvm_fpu).cast::<u8>(),
            b.0.len(),
        )
    };
    Ok(f)
}

/// Reads the XSAVE area of `vcpu` (`size` bytes, > 4096 uses KVM_GET_XSAVE2).
pub fn get_xsave(vcpu: &VcpuFd, size: usize) -> Result<Vec<u32>, VmError> {
    if size <= LEGACY_XSAVE_SIZE {
        let x = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let extra = (size - LEGACY_XSAVE_SIZE).div_ceil(4);
    let mut xs = Xsave::new(extra)
        .map_err(|e| VmError::State(format!("allocating XSAVE2 buffer: {e:?}")))?;
    // SAFETY: `xs` has room for `size` bytes, the size KVM_CAP_XSAVE2 reported.
    unsafe { vcpu.get_xsave2(&mut xs) }.map_err(kvm_err("KVM_GET_XSAVE2"))?;
    let f = xs.as_fam_struct_ref();
    let mut v = f.xsave.region.to_vec();
    v.extend_from_slice(xs.as_slice());
    Ok(v)
}

/// Writes a saved XSAVE area. KVM reads this host's whole XSAVE size
/// (`host_size`, from KVM_CAP_XSAVE2), whatever size the source had, so the
/// buffer is that large and zero past the saved words (components that the
/// source did not save start in their initial state).
fn set_xsave(vcpu: &VcpuFd, words: &[u32], host_size: usize) -> Result<(), StateError> {
    let legacy = LEGACY_XSAVE_SIZE / 4;
    let total = words.len().max(host_size.div_ceil(4)).max(legacy);
    let head = words.len().min(legacy);
    if total <= legacy {
        let mut x = kvm_xsave::default();
        x.region[..head].copy_from_slice(&words[..head]);
        // SAFETY: a legacy kvm_xsave of 4096 bytes, and this host's XSAVE
        // size is at most that (`total <= legacy`), so KVM reads no more.
        unsafe { vcpu.set_xsave(&x) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        return Ok(());
    }
    let mut xs = Xsave::new(total - legacy)
        .map_err(|e| StateError::Mismatch(format!("XSAVE2 buffer: {e:?}")))?;
    // SAFETY: only the fixed part is written; the FAM length is untouched.
    unsafe { xs.as_mut_fam_struct() }.xsave.region[..head].copy_from_slice(&words[..head]);
    if words.len() > legacy {
        xs.as_mut_slice()[..words.len() - legacy].copy_from_slice(&words[legacy..]);
    }
    // SAFETY: the buffer holds `total` words, at least this host's XSAVE
    // size, which is what KVM_SET_XSAVE2 reads.
    unsafe { vcpu.set_xsave2(&xs) }.map_err(kvm_err("KVM_SET_XSAVE2"))?;
    Ok(())
}

fn nested_bytes(b: &KvmNestedStateBuffer) -> Vec<u8> {
    // SAFETY: KvmNestedStateBuffer is a plain C struct.
    unsafe {
        std::slice::from_raw_parts(
            (b as *const KvmNestedStateBuffer).cast::<u8>(),
            std::mem::size_of::<KvmNestedStateBuffer>(),
        )
    }
    .to_vec()
}

fn nested_from(b: &[u8]) -> Result<KvmNestedStateBuffer, StateError> {
    let mut n = KvmNestedStateBuffer::empty();
    if b.len() != std::mem::size_of::<KvmNestedStateBuffer>() {
        return Err(StateError::Mismatch("nested state size differs".into()));
    }
    // SAFETY: sizes match; every bit pattern is valid for the buffer.
    unsafe {
        std::ptr::copy_nonoverlapping(
            b.as_ptr(),
            (&mut n as *mut KvmNestedStateBuffer).cast::<u8>(),
            b.len(),
        )
    };
    Ok(n)
}

/// Saves one vCPU's state; runs on that vCPU's thread, which owns `fd`.
pub(crate) fn save_vcpu(vm: &VcpuStateSpec, fd: &VcpuFd) -> Result<VcpuState, VmError> {
    let caps = &vm.caps;
    let mut msrs = Vec::new();
    if !vm.msr_list.is_empty() {
        let entries: Vec<kvm_msr_entry> = vm
            .msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut m = Msrs::from_entries(&entries)
            .map_err(|e| VmError::State(format!("building the MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut m).map_err(kvm_err("KVM_GET_MSRS"))?;
        if n != entries.len() {
            let bad = entries.get(n).map(|e| e.index).unwrap_or(0);
            return Err(VmError::State(format!(
                "KVM_GET_MSRS read {n} of {} MSRs (stopped at {bad:#x})",
                entries.len()
            )));
        }
        msrs = m.as_slice().iter().map(|e| (e.index, e.data)).collect();
    }
    // IA32_TSC again, alone and between two clock reads, so that its place
    // on the kvmclock time line is known to a fraction of an ioctl.
    let mut clock_at_msrs = 0;
    if let Some(vm_fd) = &vm.vm_fd {
        let (tsc, at) = sample_tsc(vm_fd, fd)?;
        clock_at_msrs = at;
        for (index, value) in msrs.iter_mut() {
            if *index == arch::msr::MSR_IA32_TSC {
                *value = tsc;
            }
        }
    }
    Ok(VcpuState {
        regs: fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
        fpu: fpu_bytes(&fd.get_fpu().map_err(kvm_err("KVM_GET_FPU"))?),
        xsave: if caps.xsave {
            Some(get_xsave(fd, caps.xsave_size)?)
        } else {
            None
        },
        xcrs: if caps.xcrs {
            Some(fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?)
        } else {
            None
        },
        msrs,
        clock_at_msrs,
        lapic: fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?,
        events: fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
        debugregs: if caps.debugregs {
            Some(fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?)
        } else {
            None
        },
        nested: if caps.nested {
            let mut b = KvmNestedStateBuffer::empty();
            fd.nested_state(&mut b)
                .map_err(kvm_err("KVM_GET_NESTED_STATE"))?;
            Some(nested_bytes(&b))
        } else {
            None
        },
    })
}

/// Writes `msrs` on vCPU `id`; an MSR that KVM refuses fails the write
/// unless it is on [`MSR_RESTORE_IGNORE`] ([`msr_refused`]).
fn set_msrs(fd: &VcpuFd, id: u8, msrs: &[(u32, u64)]) -> Result<(), StateError> {
    let mut rest: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    while !rest.is_empty() {
        let m = Msrs::from_entries(&rest)
            .map_err(|e| StateError::Mismatch(format!("MSR list: {e:?}")))?;
        let n = fd
            .set_msrs(&m)
            .map_err(kvm_err(format!("KVM_SET_MSRS on vCPU {id}")))?;
        let Some(refused) = rest.get(n) else {
            break;
        };
        msr_refused(id, refused.index, refused.data)?;
        rest.drain(..=n);
    }
    Ok(())
}

fn clock_ns(vm_fd: &kvm_ioctls::VmFd) -> Result<u64, VmError> {
    Ok(vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?.clock)
}

/// Attempts at a tight TSC sample or write. A sample whose clock reads are
/// far apart (the thread was preempted, which happens on a loaded host)
/// places the TSC badly: the tightest of these attempts is used.
const TSC_ATTEMPTS: usize = 8;

/// Reads IA32_TSC alone between two kvmclock reads, [`TSC_ATTEMPTS`] times:
/// (TSC, kvmclock at the middle of the two reads) of the tightest attempt.
fn sample_tsc(vm_fd: &kvm_ioctls::VmFd, fd: &VcpuFd) -> Result<(u64, u64), VmError> {
    let mut m = Msrs::from_entries(&[kvm_msr_entry {
        index: arch::msr::MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|e| VmError::State(format!("building the TSC MSR list: {e:?}")))?;
    let mut best: Option<(u64, u64, u64)> = None; // (window, tsc, clock)
    for _ in 0..TSC_ATTEMPTS {
        let before = clock_ns(vm_fd)?;
        let n = fd.get_msrs(&mut m).map_err(kvm_err("KVM_GET_MSRS (TSC)"))?;
        let after = clock_ns(vm_fd)?;
        let tsc = match m.as_slice().first() {
            Some(e) if n == 1 => e.data,
            _ => return Err(VmError::State("KVM_GET_MSRS did not read IA32_TSC".into())),
        };
        let window = after.saturating_sub(before);
        if best.is_none_or(|(w, _, _)| window < w) {
            best = Some((window, tsc, before + window / 2));
        }
    }
    let (window, tsc, clock) =
        best.ok_or_else(|| VmError::State("no TSC sample was taken".into()))?;
    debug!("TSC sampled within {window} ns of kvmclock");
    Ok((tsc, clock))
}

/// The guest TSC to restore so that it keeps its distance to kvmclock: a
/// TSC of `tsc` was saved when kvmclock read `clock_then` ns; kvmclock now
/// reads `clock_now` ns (set from the source's clock, then running), and
/// the TSC runs at `khz`. Without this, the time that passes between the
/// TSC write and KVM_SET_CLOCK on either side shows up in the guest as a
/// skew between its two clocks (Linux marks its TSC unstable past ~0.5 ms).
pub fn tsc_for_clock(tsc: u64, clock_then: u64, clock_now: u64, khz: u32) -> u64 {
    let elapsed_ns = u128::from(clock_now.saturating_sub(clock_then));
    let cycles = elapsed_ns * u128::from(khz) / 1_000_000;
    tsc.saturating_add(u64::try_from(cycles).unwrap_or(u64::MAX))
}

/// Writes IA32_TSC so that it keeps the distance to kvmclock it had on the
/// source (see [`tsc_for_clock`]). The TSC is sampled about one ioctl after
/// the clock read that precedes it: that latency is measured first.
fn restore_tsc(
    vm: &VcpuStateSpec,
    id: u8,
    fd: &VcpuFd,
    tsc: u64,
    clock_then: u64,
) -> Result<(), StateError> {
    let khz = fd.get_tsc_khz();
    let (Some(vm_fd), Ok(khz)) = (&vm.vm_fd, khz) else {
        debug!("vCPU {id}: TSC restored as saved (TSC kHz {khz:?})");
        return set_msrs(fd, id, &[(arch::msr::MSR_IA32_TSC, tsc)]);
    };
    if clock_then == 0 {
        return set_msrs(fd, id, &[(arch::msr::MSR_IA32_TSC, tsc)]);
    }
    // The latency of one clock read, at its quietest: the TSC write that
    // follows a clock read samples about that much later.
    let mut latency = u64::MAX;
    for _ in 0..TSC_ATTEMPTS {
        let a = clock_ns(vm_fd)?;
        let b = clock_ns(vm_fd)?;
        latency = latency.min(b.saturating_sub(a));
    }
    // KVM takes only the first host write of IA32_TSC as it is (a later one
    // close to it counts as a resynchronization), so the write happens once,
    // right after a clock read pair that was as quick as the quietest.
    let mut now = clock_ns(vm_fd)?;
    for _ in 0..TSC_ATTEMPTS {
        let next = clock_ns(vm_fd)?;
        let quick = next.saturating_sub(now) <= latency.saturating_mul(2);
        now = next;
        if quick {
            break;
        }
    }
    let value = tsc_for_clock(tsc, clock_then, now + latency, khz);
    set_msrs(fd, id, &[(arch::msr::MSR_IA32_TSC, value)])
}

/// Restores one vCPU's state; runs on that vCPU's thread, which owns `fd`.
pub(crate) fn restore_vcpu(
    vm: &VcpuStateSpec,
    id: u8,
    fd: &VcpuFd,
    s: &VcpuState,
) -> Result<(), StateError> {
    let ctx = |what: &str| format!("{what} on vCPU {id}");
    // Order matters: sregs (CR0/CR4/EFER) before regs, MSRs and XSAVE;
    // LAPIC after sregs (APIC base MSR); events and mp_state last.
    fd.set_sregs(&s.sregs)
        .map_err(kvm_err(ctx("KVM_SET_SREGS")))?;
    fd.set_regs(&s.regs).map_err(kvm_err(ctx("KVM_SET_REGS")))?;
    fd.set_fpu(&fpu_from(&s.fpu)?)
        .map_err(kvm_err(ctx("KVM_SET_FPU")))?;
    if let Some(x) = &s.xsave {
        if x.len() * 4 > vm.caps.xsave_size.max(LEGACY_XSAVE_SIZE) || !vm.caps.xsave {
            return Err(StateError::Mismatch(format!(
                "XSAVE state of {} bytes does not fit this host",
                x.len() * 4
            )));
        }
        set_xsave(fd, x, vm.caps.xsave_size)?;
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(kvm_err(ctx("KVM_SET_XCRS")))?;
    }
    // Every MSR but the TSC and its deadline first; then the TSC alone,
    // after the VM clock was set (see `Vm::restore_state`), at its saved
    // distance to kvmclock; then the LAPIC (its LVT timer mode); then the
    // deadline: KVM ignores the deadline while the LAPIC is not in
    // TSC-deadline mode, and an armed timer would be lost.
    let tsc_index = arch::msr::MSR_IA32_TSC;
    let tsc = s
        .msrs
        .iter()
        .find(|(i, _)| *i == tsc_index)
        .map(|(_, v)| *v);
    let msrs: Vec<(u32, u64)> = s
        .msrs
        .iter()
        .copied()
        .filter(|(index, _)| *index != tsc_index && *index != MSR_IA32_TSC_DEADLINE)
        .collect();
    let deadline: Vec<(u32, u64)> = s
        .msrs
        .iter()
        .copied()
        .filter(|(index, _)| *index == MSR_IA32_TSC_DEADLINE)
        .collect();
    set_msrs(fd, id, &msrs)?;
    if let Some(tsc) = tsc {
        restore_tsc(vm, id, fd, tsc, s.clock_at_msrs)?;
    }
    fd.set_lapic(&s.lapic)
        .map_err(kvm_err(ctx("KVM_SET_LAPIC")))?;
    set_msrs(fd, id, &deadline)?;
    if let Some(d) = &s.debugregs {
        fd.set_debug_regs(d)
            .map_err(kvm_err(ctx("KVM_SET_DEBUGREGS")))?;
    }
    if let Some(n) = &s.nested {
        fd.set_nested_state(&nested_from(n)?)
            .map_err(kvm_err(ctx("KVM_SET_NESTED_STATE")))?;
    }
    fd.set_vcpu_events(&s.events)
        .map_err(kvm_err(ctx("KVM_SET_VCPU_EVENTS")))?;
    fd.set_mp_state(s.mp_state)
        .map_err(kvm_err(ctx("KVM_SET_MP_STATE")))?;
    Ok(())
}

fn irqchip(vm: &Vm, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.fd
        .get_irqchip(&mut c)
        .map_err(kvm_err(format!("KVM_GET_IRQCHIP {chip_id}")))?;
    Ok(c)
}

impl Vm {
    /// Captures the whole VM state. The vCPUs must be paused.
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let g = self.lock_vcpus();
        if !g.phase.holds_still() {
            return Err(VmError::State(
                "state can only be saved while paused".into(),
            ));
        }
        let start = std::time::Instant::now();
        // Each vCPU thread saves its own state, all at once.
        let mut vcpus = crate::vcpu::save_all(&g.handles)?;
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        self.to_guest_time_line(&mut vcpus, &mut clock);
        let pio = self.pio.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let state = VmState {
            version: STATE_VERSION,
            vcpus,
            pic_master: irqchip(self, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(self, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(self, KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
            serial: pio.serial_state(),
            i8042: pio.i8042_state(),
            pci: self.pci.save(),
        };
        debug!("VM state saved in {:?}", start.elapsed());
        Ok(state)
    }

    /// Moves the saved clocks onto the time line the guest itself reads.
    ///
    /// The guest computes kvmclock from its pvclock page and its TSC; what
    /// KVM_GET_CLOCK returns can differ from that by the drift accumulated
    /// since KVM last refreshed the page (a millisecond or more after some
    /// seconds on a host whose TSC rate is not exact). The destination
    /// restarts kvmclock from the saved value and refreshes the page, so it
    /// must restart from the guest's own reading, or the guest sees its
    /// kvmclock jump against its TSC. When a vCPU's pvclock page cannot be
    /// read, its values are kept as KVM gave them.
    fn to_guest_time_line(&self, vcpus: &mut [VcpuState], clock: &mut kvm_clock_data) {
        for (i, v) in vcpus.iter_mut().enumerate() {
            let Some(guest_ns) = self.guest_kvmclock(v) else {
                continue;
            };
            let drift = guest_ns.wrapping_sub(v.clock_at_msrs) as i64;
            if i == 0 {
                clock.clock = clock.clock.wrapping_add(drift as u64);
                debug!("kvmclock as the guest reads it differs by {drift} ns from KVM's");
            }
            v.clock_at_msrs = guest_ns;
        }
    }

    /// kvmclock as vCPU `v`'s guest reads it at its saved TSC, from its
    /// pvclock page (MSR_KVM_SYSTEM_TIME_NEW), if it enabled one.
    fn guest_kvmclock(&self, v: &VcpuState) -> Option<u64> {
        use vm_memory::{Bytes, GuestAddress};
        let tsc = v
            .msrs
            .iter()
            .find(|(i, _)| *i == arch::msr::MSR_IA32_TSC)?
            .1;
        let msr = v
            .msrs
            .iter()
            .find(|(i, _)| *i == MSR_KVM_SYSTEM_TIME_NEW)?
            .1;
        if v.clock_at_msrs == 0 || msr & 1 == 0 {
            return None;
        }
        let mut page = [0u8; PVCLOCK_SIZE];
        self.ram
            .mem()
            .read_slice(&mut page, GuestAddress(msr & !1))
            .ok()?;
        pvclock_read(&page, tsc)
    }

    /// Applies a saved state to this (not yet started) VM.
    pub fn restore_state(&self, s: &VmState) -> Result<(), StateError> {
        let g = self.lock_vcpus();
        if g.phase != crate::vm::VmPhase::Created {
            return Err(StateError::Mismatch("the VM already runs".into()));
        }
        if s.version != STATE_VERSION {
            return Err(StateError::Mismatch(format!(
                "state version {} (this VMM reads {STATE_VERSION})",
                s.version
            )));
        }
        if s.vcpus.len() != g.handles.len() {
            return Err(StateError::Mismatch(format!(
                "{} vCPU states for {} vCPUs",
                s.vcpus.len(),
                g.handles.len()
            )));
        }
        let start = std::time::Instant::now();
        // VM-wide interrupt controllers first, so that LAPIC/IOAPIC agree.
        for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd
                .set_irqchip(chip)
                .map_err(kvm_err(format!("KVM_SET_IRQCHIP {}", chip.chip_id)))?;
        }
        self.fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // The clock before the vCPUs: each vCPU's TSC is placed relative to
        // it (`tsc_for_clock`), so the gap until the guest runs is the same
        // for both clocks.
        let clock = kvm_clock_data {
            clock: s.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        // Each vCPU thread restores its own state.
        for (v, vs) in g.handles.iter().zip(&s.vcpus) {
            v.restore(vs)?;
        }
        // Devices: rebuild COM1 and the i8042 from their state (same irqfds).
        let irqs = self.irqs.try_clone().map_err(VmError::from)?;
        let out = serial_output(&self.serial_cfg).map_err(VmError::from)?;
        let pio = PioBus::from_state(&s.serial, &s.i8042, irqs, out).map_err(VmError::from)?;
        *self.pio.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(pio);
        // PCI layers last: their MSI routes go into the restored irqchip.
        self.pci.restore(&s.pci).map_err(StateError::Mismatch)?;
        debug!("VM state restored in {:?}", start.elapsed());
        Ok(())
    }
}

/// Encodes a state with bincode.
pub fn encode(s: &VmState) -> Result<Vec<u8>, StateError> {
    bincode::serialize(s).map_err(|e| StateError::Decode(format!("encoding: {e}")))
}

/// Decodes a state, refusing trailing garbage and absurd sizes.
pub fn decode(b: &[u8]) -> Result<VmState, StateError> {
    use bincode::Options;
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(64 << 20)
        .reject_trailing_bytes()
        .deserialize(b)
        .map_err(|e| StateError::Decode(e.to_string()))
}

#[cfg(test)]
mod tsc_tests {
    use super::{pvclock_read, tsc_for_clock, PVCLOCK_SIZE};

    #[test]
    fn pvclock_as_the_guest_reads_it() {
        let mut p = [0u8; PVCLOCK_SIZE];
        p[0..4].copy_from_slice(&2u32.to_le_bytes()); // version (even)
        p[8..16].copy_from_slice(&1_000u64.to_le_bytes()); // tsc_timestamp
        p[16..24].copy_from_slice(&5_000_000u64.to_le_bytes()); // system_time
        p[24..28].copy_from_slice(&(1u32 << 31).to_le_bytes()); // mul = 0.5
        p[28] = 1; // shift: << 1, so 1 ns per cycle
        assert_eq!(pvclock_read(&p, 1_000 + 7_000), Some(5_007_000));
        p[28] = (-1i8) as u8; // >> 1 then * 0.5: 0.25 ns per cycle
        assert_eq!(pvclock_read(&p, 1_000 + 8_000), Some(5_002_000));
        p[0] = 3; // an update in progress
        assert_eq!(pvclock_read(&p, 0), None);
    }

    #[test]
    fn tsc_follows_the_clock() {
        // 2.5 GHz: 1 ms of kvmclock is 2.5 M cycles.
        assert_eq!(
            tsc_for_clock(1_000, 5_000_000, 6_000_000, 2_500_000),
            2_501_000
        );
        // No time passed, or the clock reads earlier: the TSC as saved.
        assert_eq!(tsc_for_clock(7, 10, 10, 2_500_000), 7);
        assert_eq!(tsc_for_clock(7, 10, 3, 2_500_000), 7);
        // Never overflows.
        assert_eq!(tsc_for_clock(u64::MAX - 1, 0, u64::MAX, u32::MAX), u64::MAX);
    }
}
