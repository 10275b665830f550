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
