//! Whether a guest's CPUID can be offered by another host: the comparison
//! a migration destination runs before any RAM moves.
//!
//! Only feature words are compared ([`FEATURE_WORDS`]): a bit the guest saw
//! set must also be set in what the destination would present. Values that
//! are not feature flags (family/model, cache and topology leaves, APIC ids,
//! sizes) and leaves beyond these are not compared. Two bits that reflect
//! the guest OS's own control registers rather than a host feature are
//! ignored: leaf 0x1 ECX bit 27 (OSXSAVE, CR4.OSXSAVE) and leaf 0x7.0 ECX
//! bit 4 (OSPKE, CR4.PKE).

use kvm_bindings::{kvm_cpuid_entry2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

impl Reg {
    fn of(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }
}

/// One compared register of one CPUID leaf (and sub-leaf).
///
/// Invariant: `ignore` holds the bits of this word that are not host
/// features (they reflect guest control registers) and are never compared.
#[derive(Debug, Clone, Copy)]
pub struct FeatureWord {
    /// Leaf (EAX input).
    pub function: u32,
    /// Sub-leaf (ECX input); 0 for leaves without sub-leaves.
    pub index: u32,
    /// Output register.
    pub reg: Reg,
    /// Bits not compared.
    pub ignore: u32,
    /// Names of the bits, by bit number (empty where unnamed).
    names: &'static [(u32, &'static str)],
}

/// The feature words compared, in the order they are reported:
/// 0x1 ECX and EDX; 0x7.0 EBX, ECX and EDX; 0x7.1 EAX; 0xD.0 EAX and EDX
/// (XSAVE state components, XCR0); 0xD.1 EAX (XSAVEOPT, XSAVEC, XGETBV1,
/// XSAVES); 0x8000_0001 ECX and EDX.
pub const FEATURE_WORDS: &[FeatureWord] = &[
    word(0x1, 0, Reg::Ecx, 1 << 27, LEAF1_ECX),
    word(0x1, 0, Reg::Edx, 0, LEAF1_EDX),
    word(0x7, 0, Reg::Ebx, 0, LEAF7_EBX),
    word(0x7, 0, Reg::Ecx, 1 << 4, LEAF7_ECX),
    word(0x7, 0, Reg::Edx, 0, LEAF7_EDX),
    word(0x7, 1, Reg::Eax, 0, LEAF7_1_EAX),
    word(0xD, 0, Reg::Eax, 0, LEAFD_EAX),
    word(0xD, 0, Reg::Edx, 0, &[]),
    word(0xD, 1, Reg::Eax, 0, LEAFD_1_EAX),
    word(0x8000_0001, 0, Reg::Ecx, 0, EXT1_ECX),
    word(0x8000_0001, 0, Reg::Edx, 0, EXT1_EDX),
];

const fn word(
    function: u32,
    index: u32,
    reg: Reg,
    ignore: u32,
    names: &'static [(u32, &'static str)],
) -> FeatureWord {
    FeatureWord {
        function,
        index,
        reg,
        ignore,
        names,
    }
}

const LEAF1_ECX: &[(u32, &str)] = &[
    (0, "sse3"),
    (1, "pclmulqdq"),
    (3, "monitor"),
    (5, "vmx"),
    (9, "ssse3"),
    (12, "fma"),
    (13, "cx16"),
    (19, "sse4_1"),
    (20, "sse4_2"),
    (21, "x2apic"),
    (22, "movbe"),
    (23, "popcnt"),
    (24, "tsc_deadline"),
    (25, "aes"),
    (26, "xsave"),
    (28, "avx"),
    (29, "f16c"),
    (30, "rdrand"),
    (31, "hypervisor"),
];
const LEAF1_EDX: &[(u32, &str)] = &[
    (0, "fpu"),
    (4, "tsc"),
    (5, "msr"),
    (6, "pae"),
    (8, "cx8"),
    (9, "apic"),
    (11, "sep"),
    (12, "mtrr"),
    (13, "pge"),
    (15, "cmov"),
    (16, "pat"),
    (19, "clflush"),
    (23, "mmx"),
    (24, "fxsr"),
    (25, "sse"),
    (26, "sse2"),
    (28, "htt"),
];
const LEAF7_EBX: &[(u32, &str)] = &[
    (0, "fsgsbase"),
    (3, "bmi1"),
    (4, "hle"),
    (5, "avx2"),
    (7, "smep"),
    (8, "bmi2"),
    (9, "erms"),
    (10, "invpcid"),
    (11, "rtm"),
    (16, "avx512f"),
    (17, "avx512dq"),
    (18, "rdseed"),
    (19, "adx"),
    (20, "smap"),
    (23, "clflushopt"),
    (24, "clwb"),
    (28, "avx512cd"),
    (29, "sha_ni"),
    (30, "avx512bw"),
    (31, "avx512vl"),
];
const LEAF7_ECX: &[(u32, &str)] = &[
    (1, "avx512vbmi"),
    (2, "umip"),
    (3, "pku"),
    (5, "waitpkg"),
    (8, "gfni"),
    (9, "vaes"),
    (10, "vpclmulqdq"),
    (11, "avx512_vnni"),
    (14, "avx512_vpopcntdq"),
    (22, "rdpid"),
    (25, "cldemote"),
    (27, "movdiri"),
    (28, "movdir64b"),
];
const LEAF7_EDX: &[(u32, &str)] = &[
    (4, "fsrm"),
    (10, "md_clear"),
    (14, "serialize"),
    (26, "spec_ctrl"),
    (27, "stibp"),
    (28, "flush_l1d"),
    (29, "arch_capabilities"),
    (31, "ssbd"),
];
const LEAF7_1_EAX: &[(u32, &str)] = &[(4, "avx_vnni"), (5, "avx512_bf16")];
const LEAFD_EAX: &[(u32, &str)] = &[
    (0, "xcr0.x87"),
    (1, "xcr0.sse"),
    (2, "xcr0.avx"),
    (5, "xcr0.opmask"),
    (6, "xcr0.zmm_hi256"),
    (7, "xcr0.hi16_zmm"),
    (9, "xcr0.pkru"),
    (17, "xcr0.xtilecfg"),
    (18, "xcr0.xtiledata"),
];
const LEAFD_1_EAX: &[(u32, &str)] = &[
    (0, "xsaveopt"),
    (1, "xsavec"),
    (2, "xgetbv1"),
    (3, "xsaves"),
];
const EXT1_ECX: &[(u32, &str)] = &[
    (0, "lahf_lm"),
    (2, "svm"),
    (5, "abm"),
    (6, "sse4a"),
    (8, "prefetchw"),
    (11, "xop"),
    (16, "fma4"),
];
const EXT1_EDX: &[(u32, &str)] = &[
    (11, "syscall"),
    (20, "nx"),
    (26, "pdpe1gb"),
    (27, "rdtscp"),
    (29, "lm"),
];

/// Feature bits of one word that the guest has and the host lacks.
///
/// Invariant: `bits` is non-zero and has no bit of the word's `ignore` mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingFeature {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// Register.
    pub reg: Reg,
    /// The missing bits.
    pub bits: u32,
    names: &'static [(u32, &'static str)],
}

impl std::fmt::Display for MissingFeature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = (0..32)
            .filter(|b| self.bits & (1 << b) != 0)
            .map(|b| match self.names.iter().find(|(n, _)| *n == b) {
                Some((_, name)) => format!("{name} (bit {b})"),
                None => format!("bit {b}"),
            })
            .collect();
        write!(
            f,
            "CPUID leaf {:#x}.{} {}: {}",
            self.function,
            self.index,
            self.reg.name(),
            names.join(", ")
        )
    }
}

/// The value of `w` in `entries`: the OR of every entry that answers this
/// leaf and sub-leaf (an entry without `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`
/// answers every sub-leaf of its leaf, as in KVM); 0 when none does.
fn value(entries: &[kvm_cpuid_entry2], w: &FeatureWord) -> u32 {
    entries
        .iter()
        .filter(|e| {
            e.function == w.function
                && (e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0 || e.index == w.index)
        })
        .fold(0, |acc, e| acc | w.reg.of(e))
}

/// The guest-visible features of `guest` (the CPUID a guest was given)
/// that `host` (what this host would give it) lacks, per
/// [`FEATURE_WORDS`]; empty when the guest can run here. A leaf the host
/// does not list counts as all zeros.
pub fn missing_features(
    guest: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Vec<MissingFeature> {
    FEATURE_WORDS
        .iter()
        .filter_map(|w| {
            let bits = value(guest, w) & !value(host, w) & !w.ignore;
            (bits != 0).then_some(MissingFeature {
                function: w.function,
                index: w.index,
                reg: w.reg,
                bits,
                names: w.names,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 0x7 | 0xD) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            e(0, 0, [0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69]),
            e(1, 0, [0x906EA, 0x0800, 0x7FFA_FBFF, 0xBFEB_FBFF]),
            e(7, 0, [0, 0x0000_0109, 0, 0]),
            e(7, 1, [0, 0, 0, 0]),
            e(0xD, 0, [0x7, 0x340, 0x340, 0]),
            e(0xD, 1, [0x1, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 0x121, 0x2C10_0800]),
        ]
    }

    #[test]
    fn the_same_cpuid_is_compatible() {
        assert!(missing_features(&host(), &host()).is_empty());
        // A guest with fewer features also runs.
        let mut g = host();
        g[2].ebx = 0x1;
        g[1].ecx &= !(1 << 28);
        assert!(missing_features(&g, &host()).is_empty());
        // Non-feature values differ freely (family/model, APIC id, sizes).
        let mut g = host();
        g[1].eax = 0x1234;
        g[1].ebx = 0xFF00_0800;
        g[4].ebx = 0x1000;
        assert!(missing_features(&g, &host()).is_empty());
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let mut g = host();
        g[2].ebx |= 1 << 5; // avx2
        let m = missing_features(&g, &host());
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!((m[0].function, m[0].index, m[0].reg), (7, 0, Reg::Ebx));
        assert_eq!(m[0].bits, 1 << 5);
        assert_eq!(m[0].to_string(), "CPUID leaf 0x7.0 EBX: avx2 (bit 5)");

        let mut g = host();
        g[6].ecx |= 1 << 13; // unnamed
        g[5].eax |= 1 << 3; // xsaves
        let m: Vec<String> = missing_features(&g, &host())
            .iter()
            .map(|m| m.to_string())
            .collect();
        assert_eq!(
            m,
            [
                "CPUID leaf 0xd.1 EAX: xsaves (bit 3)",
                "CPUID leaf 0x80000001.0 ECX: bit 13"
            ]
        );
    }

    #[test]
    fn every_compared_word_is_checked() {
        for w in FEATURE_WORDS {
            let mut g = host();
            let bit = (0..32).rev().find(|b| w.ignore & (1 << b) == 0).unwrap();
            g.push(kvm_cpuid_entry2 {
                function: w.function,
                index: w.index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
            let last = g.len() - 1;
            match w.reg {
                Reg::Eax => g[last].eax = 1 << bit,
                Reg::Ebx => g[last].ebx = 1 << bit,
                Reg::Ecx => g[last].ecx = 1 << bit,
                Reg::Edx => g[last].edx = 1 << bit,
            }
            let mut h = host();
            for x in h.iter_mut() {
                if x.function == w.function && x.index == w.index {
                    match w.reg {
                        Reg::Eax => x.eax &= !(1 << bit),
                        Reg::Ebx => x.ebx &= !(1 << bit),
                        Reg::Ecx => x.ecx &= !(1 << bit),
                        Reg::Edx => x.edx &= !(1 << bit),
                    }
                }
            }
            let m = missing_features(&g, &h);
            assert_eq!(m.len(), 1, "{w:?}: {m:?}");
            assert_eq!(m[0].bits, 1 << bit, "{w:?}");
        }
    }

    #[test]
    fn a_leaf_the_host_lacks_counts_as_zero() {
        let mut g = host();
        g.push(e(7, 1, [1 << 4, 0, 0, 0]));
        let h: Vec<_> = host().into_iter().filter(|x| x.function != 7).collect();
        let m = missing_features(&g, &h);
        let words: Vec<_> = m.iter().map(|m| (m.function, m.index, m.reg)).collect();
        assert_eq!(words, [(7, 0, Reg::Ebx), (7, 1, Reg::Eax)], "{m:?}");
    }

    #[test]
    fn os_controlled_bits_are_ignored() {
        let mut g = host();
        g[1].ecx |= 1 << 27; // OSXSAVE
        g[2].ecx |= 1 << 4; // OSPKE
        let mut h = host();
        h[1].ecx &= !(1 << 27);
        assert!(missing_features(&g, &h).is_empty());
    }

    #[test]
    fn sub_leaves_and_unindexed_leaves() {
        // A guest entry of leaf 1 with another index still is leaf 1.
        let mut g = host();
        g.push(e(1, 5, [0, 0, 0, 1 << 30]));
        let m = missing_features(&g, &host());
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].function, m[0].reg, m[0].bits), (1, Reg::Edx, 1 << 30));
        // Sub-leaf 2 of leaf 7 is not compared (not a feature word here).
        let mut g = host();
        g.push(e(7, 2, [0, 0, 0, u32::MAX]));
        assert!(missing_features(&g, &host()).is_empty());
        // Duplicate guest entries are OR'd: hiding a bit behind a benign
        // first entry does not work.
        let mut g = host();
        g.push(e(7, 0, [0, 1 << 5, 0, 0]));
        assert_eq!(missing_features(&g, &host()).len(), 1);
    }
}
