//! Ferry's test guests, assembled at build time by this crate's build script
//! (needs `gcc` and `binutils`; see `README.md` beside this crate).
//!
//! Only test code depends on this crate (the `ferry-tests` harness, and
//! `vmm` as a dev-dependency), so the product crates build without a C
//! toolchain.

use std::path::Path;

/// Absolute path of the stamp guest, `<target dir>/guests/stamp.elf`.
///
/// Invariant: the build script wrote a complete ELF there (atomically)
/// before this crate was compiled; a later `cargo clean` may remove it.
pub const STAMP_ELF: &str = env!("FERRY_STAMP_GUEST");

/// [`STAMP_ELF`] as a path.
pub fn stamp_elf() -> &'static Path {
    Path::new(STAMP_ELF)
}

/// The `dev=1` contract of the stamp guest (see `README.md`, "dev=1"), for
/// tests that want to compute what the guest checks.
pub mod dev {
    /// Guest-physical base of the stamp region (16 MiB).
    pub const REGION_BASE: u64 = 0x100_0000;
    /// BAR0 of device `n` is `BAR_BASE + n * BAR_STRIDE` (programmed by the guest).
    pub const BAR_BASE: u64 = 0xD000_0000;
    /// Distance between the BAR0s of consecutive devices.
    pub const BAR_STRIDE: u64 = 0x1_0000;
    /// MSI-X vector (data) of device `n` is `VECTOR_BASE + n`.
    pub const VECTOR_BASE: u32 = 0x41;
    /// Most devices the guest drives.
    pub const MAX_DEVICES: u64 = 8;
    /// Default `dma=<pages>`.
    pub const DEFAULT_DMA_PAGES: u64 = 256;
    /// Largest accepted `dma=<pages>`.
    pub const MAX_DMA_PAGES: u64 = 4096;
    /// Pages per ring descriptor (the last one may be shorter).
    pub const DESC_PAGES: u64 = 64;
    /// Multiplier of [`scratch_value`] (odd).
    pub const SCRATCH_K: u32 = 0x9e37_79b1;

    /// Ring page of device `n`: right after the stamp region, each device
    /// taking `dma_pages + 1` pages (ring page first, then its buffers).
    /// Invariant: the data page `P` of device `n` is at
    /// `ring_page(..) + 4096 * (P + 1)`.
    pub fn ring_page(region_mib: u64, dma_pages: u64, n: u64) -> u64 {
        REGION_BASE + (region_mib << 20) + n * (dma_pages + 1) * 4096
    }

    /// The value the guest writes to SCRATCH[`i`] of device `n`:
    /// `SCRATCH_K * (16 n + i + 1) mod 2^32`, never 0 for `n < 8, i < 16`.
    pub fn scratch_value(n: u32, i: u32) -> u32 {
        SCRATCH_K.wrapping_mul(16 * n + i + 1)
    }

    /// The design's definition: the sequence number page `p` of an
    /// `np`-page ring holds after `s` pages were written, 0 if untouched:
    /// `s - ((s - 1 - p) mod np)` if `s > p`.
    pub fn expected_seq(s: u64, np: u64, p: u64) -> u64 {
        if np == 0 || s <= p {
            0
        } else {
            s - ((s - 1 - p) % np)
        }
    }

    /// The same values, computed the way the guest's check does (one
    /// division per device, then counting up page by page): `k = (s - 1)
    /// mod np`, `base = s - k`; pages `0..=k` hold `base + p`, pages above
    /// `k` hold `base + p - np` if `s > np`, else 0. Returns all `np` values.
    pub fn guest_expected_seqs(s: u64, np: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if np == 0 {
            return out;
        }
        if s == 0 {
            out.resize(np as usize, 0);
            return out;
        }
        let k = (s - 1) % np;
        let base = s - k;
        let mut e = base;
        for _ in 0..=k {
            out.push(e);
            e += 1;
        }
        for _ in k + 1..np {
            if s > np {
                out.push(e - np);
                e += 1;
            } else {
                out.push(0);
            }
        }
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Walks an `np`-page ring `s` times like the device's engine.
        fn simulate(s: u64, np: u64) -> Vec<u64> {
            let mut pages = vec![0; np as usize];
            for seq in 1..=s {
                pages[((seq - 1) % np) as usize] = seq;
            }
            pages
        }

        #[test]
        fn guest_formula_matches_the_definition_and_the_engine() {
            for np in [1u64, 2, 3, 7, 64, 65, 256] {
                for s in (0..4 * np + 3).chain([1000, 12345]) {
                    let guest = guest_expected_seqs(s, np);
                    let def: Vec<u64> = (0..np).map(|p| expected_seq(s, np, p)).collect();
                    assert_eq!(guest, def, "s={s} np={np}");
                    assert_eq!(guest, simulate(s, np), "s={s} np={np}");
                }
            }
        }

        #[test]
        fn examples() {
            // 4 pages, 6 written: pages 0, 1 rewritten in cycle 2.
            assert_eq!(guest_expected_seqs(6, 4), [5, 6, 3, 4]);
            assert_eq!(guest_expected_seqs(3, 4), [1, 2, 3, 0]);
            assert_eq!(guest_expected_seqs(0, 2), [0, 0]);
            assert_eq!(guest_expected_seqs(8, 4), [5, 6, 7, 8]);
        }

        #[test]
        fn layout_and_scratch() {
            // region=16, dma=256: device 0's ring at 32 MiB, page 0 at pfn 8193.
            assert_eq!(ring_page(16, 256, 0), 0x200_0000);
            assert_eq!((ring_page(16, 256, 0) + 4096) >> 12, 8193);
            assert_eq!(ring_page(16, 256, 1), 0x200_0000 + 257 * 4096);
            let mut seen = std::collections::HashSet::new();
            for n in 0..MAX_DEVICES as u32 {
                for i in 0..16 {
                    let v = scratch_value(n, i);
                    assert_ne!(v, 0);
                    assert!(seen.insert(v));
                }
            }
            assert_eq!(scratch_value(0, 0), 0x9e37_79b1);
        }
    }
}
