//! Model-specific registers set on every vCPU before the first entry.

use kvm_bindings::kvm_msr_entry;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_STAR (SYSCALL segment selectors).
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_CSTAR (compat-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// IA32_FMASK (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// IA32_KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-strings enable.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// MSR values for a vCPU at boot, to pass to `KVM_SET_MSRS`.
///
/// All SYSENTER/SYSCALL MSRs, KERNEL_GS_BASE and the TSC are zeroed (the
/// guest programs them), MISC_ENABLE has fast strings on, and
/// MTRR_DEF_TYPE enables MTRRs with default type write-back so that all
/// RAM is cacheable without variable MTRRs. Indices are unique; every
/// index is supported by KVM on Intel and AMD hosts.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs() {
        let msrs = boot_msr_entries();
        assert_eq!(msrs.len(), 11);
        let get = |i: u32| msrs.iter().find(|m| m.index == i).map(|m| m.data);
        assert_eq!(get(MSR_IA32_MISC_ENABLE), Some(1));
        assert_eq!(get(MSR_MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(MSR_IA32_TSC), Some(0));
        for i in [
            MSR_IA32_SYSENTER_CS,
            MSR_IA32_SYSENTER_ESP,
            MSR_IA32_SYSENTER_EIP,
            MSR_STAR,
            MSR_LSTAR,
            MSR_CSTAR,
            MSR_SYSCALL_MASK,
            MSR_KERNEL_GS_BASE,
        ] {
            assert_eq!(get(i), Some(0), "{i:#x}");
        }
        let mut idx: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), msrs.len());
    }

    #[test]
    fn fits_kvm_msrs_wrapper() {
        let m = kvm_bindings::Msrs::from_entries(&boot_msr_entries()).unwrap();
        assert_eq!(m.as_slice().len(), 11);
    }
}
