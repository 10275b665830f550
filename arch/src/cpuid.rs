//! Per-vCPU CPUID adjustment of what `KVM_GET_SUPPORTED_CPUID` reports.
//!
//! The topology presented is one package with `num_cpus` cores and one
//! thread per core; vCPU `n` has (x2)APIC ID `n`, matching the MP table and
//! the ACPI MADT.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX bit 24: TSC-deadline timer (emulated by KVM's in-kernel LAPIC).
pub const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX bit 31: running under a hypervisor.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: HTT (`EBX[23:16]` holds a valid logical-processor count).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX bit 1: Intel Turbo Boost.
pub const LEAF6_EAX_TURBO: u32 = 1 << 1;
/// Leaf 6 ECX bit 3: energy-performance bias MSR.
pub const LEAF6_ECX_EPB: u32 = 1 << 3;

/// Extended topology level type "SMT".
const LEVEL_TYPE_SMT: u32 = 1;
/// Extended topology level type "Core".
const LEVEL_TYPE_CORE: u32 = 2;

/// Rewrites the supported-CPUID list `cpuid` for vCPU `vcpu_id` of
/// `num_cpus` (treated as at least 1).
///
/// Only entries already present are modified (the list never grows, so it
/// always fits `KVM_SET_CPUID2`):
/// - leaf 0x1: initial APIC ID (`EBX[31:24]`) = `vcpu_id`, logical count
///   (`EBX[23:16]`) = `num_cpus`, HTT iff `num_cpus > 1`, hypervisor and
///   TSC-deadline bits set;
/// - leaf 0x4: cores per package and cache sharing consistent with the
///   topology (L1/L2 private, L3 shared by all vCPUs);
/// - leaf 0x6: turbo boost and EPB cleared (no power management exposed);
/// - leaves 0xB and 0x1F: SMT level (1 thread), core level (`num_cpus`),
///   further sub-leaves invalid; EDX = x2APIC ID = `vcpu_id`;
/// - AMD/Hygon only, leaves 0x8000_0008 ECX and 0x8000_001E: core count and
///   extended APIC / core IDs.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, num_cpus: u8) {
    let num_cpus = u32::from(num_cpus.max(1));
    let apic_id = u32::from(vcpu_id);
    // Bits of the x2APIC ID that select the core within the package.
    let core_bits = u32::BITS - (num_cpus - 1).leading_zeros();
    let amd = is_amd(cpuid.as_slice());

    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_FFFF) | (apic_id << 24) | ((num_cpus & 0xFF) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
                if num_cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // EAX[4:0] == 0: no more caches; leave the terminator alone.
            0x4 if e.eax & 0x1F != 0 => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { num_cpus - 1 } else { 0 };
                e.eax &= 0x3FFF;
                e.eax |= ((num_cpus - 1).min(0x3F) << 26) | (sharing.min(0xFFF) << 14);
            }
            0x6 => {
                e.eax &= !LEAF6_EAX_TURBO;
                e.ecx &= !LEAF6_ECX_EPB;
            }
            0xB | 0x1F => set_ext_topology(e, apic_id, num_cpus, core_bits),
            0x8000_0008 if amd => {
                // ECX[15:12] ApicIdSize, ECX[7:0] NC (cores - 1).
                e.ecx = (e.ecx & !0xF0FF) | (core_bits << 12) | ((num_cpus - 1) & 0xFF);
            }
            0x8000_001E if amd => {
                e.eax = apic_id; // extended APIC ID
                e.ebx = (e.ebx & !0xFFFF) | apic_id; // 1 thread/core, core id
                e.ecx &= !0x7FF; // node 0, one node per package
            }
            _ => {}
        }
    }
}

fn set_ext_topology(e: &mut kvm_cpuid_entry2, apic_id: u32, num_cpus: u32, core_bits: u32) {
    let index = e.index & 0xFF;
    let (shift, count, kind) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (core_bits, num_cpus, LEVEL_TYPE_CORE),
        _ => (0, 0, 0),
    };
    e.eax = shift;
    e.ebx = count;
    e.ecx = (kind << 8) | index;
    e.edx = apic_id;
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        e.function == 0
            && ((e.ebx, e.edx, e.ecx) == (0x6874_7541, 0x6974_6E65, 0x444D_4163) // AuthenticAMD
                || (e.ebx, e.edx, e.ecx) == (0x6F67_7948, 0x6E65_476E, 0x656E_6975))
        // HygonGenuine
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn intel_like() -> CpuId {
        CpuId::from_entries(&[
            // "GenuineIntel"
            entry(0, 0, 0x1F, 0x756E_6547, 0x6C65_746E, 0x4965_6E69),
            entry(1, 0, 0x000906EA, 0xFF_FF_08_00, 0x7FFA_FBFF, 0xBFEB_FBFF),
            entry(4, 0, 0x1C00_4121, 0x01C0_003F, 0x3F, 0),
            entry(4, 1, 0x1C00_4122, 0x00C0_003F, 0xFFF, 0),
            entry(4, 2, 0x1C03_C163, 0x03C0_003F, 0x2FFF, 0),
            entry(4, 3, 0, 0, 0, 0),
            entry(6, 0, 0x77, 0x2, 0x9, 0),
            entry(0xB, 0, 1, 2, 0x100, 7),
            entry(0xB, 1, 4, 16, 0x201, 7),
            entry(0xB, 2, 0, 0, 2, 7),
            entry(0x8000_0008, 0, 0x3027, 0, 0, 0),
        ])
        .unwrap()
    }

    #[test]
    fn leaf1_apic_id_and_flags() {
        let mut c = intel_like();
        filter_cpuid(&mut c, 3, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xFF, 4);
        assert_eq!(l1.ebx & 0xFFFF, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let mut c = intel_like();
        filter_cpuid(&mut c, 0, 1);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 16, 1);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn ext_topology() {
        let mut c = intel_like();
        filter_cpuid(&mut c, 5, 6);
        let smt = find(&c, 0xB, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        let core = find(&c, 0xB, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        let end = find(&c, 0xB, 2);
        assert_eq!((end.eax, end.ebx, end.ecx, end.edx), (0, 0, 2, 5));
    }

    #[test]
    fn core_bits_for_powers_of_two() {
        for (n, bits) in [(1u8, 0u32), (2, 1), (4, 2), (5, 3), (254, 8)] {
            let mut c = intel_like();
            filter_cpuid(&mut c, 0, n);
            assert_eq!(find(&c, 0xB, 1).eax, bits, "n={n}");
        }
    }

    #[test]
    fn leaf4_and_leaf6() {
        let mut c = intel_like();
        filter_cpuid(&mut c, 0, 8);
        let l1d = find(&c, 4, 0);
        assert_eq!(l1d.eax >> 26, 7);
        assert_eq!((l1d.eax >> 14) & 0xFFF, 0);
        assert_eq!(l1d.eax & 0x3FFF, 0x0121);
        let l3 = find(&c, 4, 2);
        assert_eq!((l3.eax >> 14) & 0xFFF, 7);
        assert_eq!(find(&c, 4, 3).eax, 0, "terminator untouched");
        let l6 = find(&c, 6, 0);
        assert_eq!((l6.eax & LEAF6_EAX_TURBO, l6.ecx & LEAF6_ECX_EPB), (0, 0));
        assert_eq!(l6.eax, 0x75);
        // Intel: AMD-only leaves are untouched.
        assert_eq!(find(&c, 0x8000_0008, 0).ecx, 0);
    }

    #[test]
    fn amd_leaves() {
        let mut c = CpuId::from_entries(&[
            entry(0, 0, 0x10, 0x6874_7541, 0x444D_4163, 0x6974_6E65),
            entry(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            entry(0x8000_001E, 0, 0x10, 0x0105, 0x0301, 0),
        ])
        .unwrap();
        filter_cpuid(&mut c, 2, 3);
        assert_eq!(find(&c, 0x8000_0008, 0).ecx, (2 << 12) | 2);
        let e = find(&c, 0x8000_001E, 0);
        assert_eq!((e.eax, e.ebx & 0xFFFF, e.ecx & 0x7FF), (2, 2, 0));
    }

    #[test]
    fn zero_cpus_does_not_panic() {
        let mut c = intel_like();
        filter_cpuid(&mut c, 255, 0);
        assert_eq!(find(&c, 1, 0).ebx >> 24, 255);
    }
}
