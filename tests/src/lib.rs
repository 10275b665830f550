//! Helpers for the integration tests of Ferry.
//!
//! The tests drive the real `ferry` and `ferry-remote` binaries and boot the
//! project's "stamp" test guest. Build the workspace first (the README's test
//! command does): `cargo build --workspace --release && cargo test --workspace --release`.
//!
//! Everything is re-exported here, so tests `use ferry_tests::*;`. By module:
//! - here: locating the binaries and the guest ([`ferry_bin`], [`ferry_remote_bin`],
//!   [`stamp_guest`]); [`skip_unless_kvm!`], which skips a test (with a printed
//!   reason) when /dev/kvm is absent; [`serial_guard`]: one guest at a time per test
//!   binary (the CI machine has 2 cores and every guest instruction is emulated there);
//! - [`proc`]: [`Vmm`], a `ferry` process with its own temp dir (API socket, serial
//!   file), killed and cleaned up on drop; [`run_ferry`], [`run_remote`];
//! - [`api`]: requests over the API socket, through [`vmm::client`];
//! - [`guest`]: [`SerialLog`] tails a serial file and parses the stamp guest's lines;
//! - [`migrate`](mod@migrate): [`start_pair`], [`migrate_and_check`], [`start_receive`],
//!   [`Migration`], ...;
//! - [`unix`](mod@unix): `unix:PATH` migrations ([`migrate_unix`], [`start_receive_unix`]);
//! - [`util`]: [`TempDir`], [`poll`], [`free_tcp_port`], ...
//! - [`openapi`]: `docs/openapi.yaml`, loaded and checked, and a strict validator
//!   of replies against its schemas;
//! - [`nested`]: the nested Linux test bed (QEMU TCG with emulated SVM, ferry inside);
//! - [`netns`]: [`NetPair`], two network namespaces joined by a veth pair shaped
//!   with tc tbf (two "hosts" on one machine), removed on drop.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use serde_json::{json, Value};

pub mod api;
pub mod guest;
pub mod migrate;
pub mod nested;
pub mod netns;
pub mod openapi;
pub mod proc;
pub mod tls;
pub mod unix;
pub mod util;

pub use api::*;
pub use guest::*;
pub use migrate::*;
pub use netns::{netns_unavailable, skip_unless_netns, NetPair};
pub use proc::*;
pub use tls::Pki;
pub use unix::*;
pub use util::*;

/// Generous bound for anything that should happen "soon" (a line, an exit).
pub const LONG: Duration = Duration::from_secs(60);
/// Bound for a whole migration.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

// ---------------------------------------------------------------------------
// Locating things
// ---------------------------------------------------------------------------

/// `<target>/<profile>`: the directory holding the test executable's `deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<test>-<hash>
    let deps = exe.parent().expect("test executable has a parent");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The cargo target directory (`CARGO_TARGET_DIR`, or derived from the test
/// executable's path).
pub fn target_dir() -> PathBuf {
    let profile = profile_dir();
    // <target>/<profile> or <target>/<triple>/<profile>
    let mut candidates: Vec<PathBuf> = profile
        .ancestors()
        .skip(1)
        .take(2)
        .map(Path::to_path_buf)
        .collect();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(dir));
    }
    for c in &candidates {
        if c.join("guests").join("stamp.elf").is_file() || c.join("CACHEDIR.TAG").is_file() {
            return c.clone();
        }
    }
    candidates.into_iter().next().expect("a target directory")
}

fn find_binary(name: &str) -> PathBuf {
    let path = profile_dir().join(name);
    if !path.is_file() {
        panic!(
            "{} not found: run `cargo build --workspace{}` first (the README's test command does)",
            path.display(),
            if profile_dir().ends_with("release") {
                " --release"
            } else {
                ""
            }
        );
    }
    path
}

/// Path of the `ferry` binary of the same profile as this test.
pub fn ferry_bin() -> PathBuf {
    find_binary("ferry")
}

/// Path of the `ferry-remote` binary of the same profile as this test.
pub fn ferry_remote_bin() -> PathBuf {
    find_binary("ferry-remote")
}

/// Path of the stamp test guest (`<target>/guests/stamp.elf`, assembled by the
/// build script of the `ferry-guests` crate, `resources/guests/`).
/// `FERRY_STAMP_GUEST` overrides it.
pub fn stamp_guest() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_STAMP_GUEST") {
        return PathBuf::from(p);
    }
    let profile = profile_dir();
    let mut candidates = vec![
        ferry_guests::stamp_elf().to_path_buf(),
        target_dir().join("guests/stamp.elf"),
        profile.join("guests/stamp.elf"),
    ];
    for a in profile.ancestors().skip(1).take(2) {
        candidates.push(a.join("guests/stamp.elf"));
    }
    for c in &candidates {
        if c.is_file() {
            return c.clone();
        }
    }
    panic!(
        "stamp guest not found (looked at {:?}): run `cargo build --workspace --release` first",
        candidates
    );
}

/// Whether /dev/kvm exists.
pub fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

/// Whether this host's KVM is PVM (every guest instruction emulated).
pub fn is_pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Returns from the calling test, printing why, when /dev/kvm is absent.
/// This is the only reason a test may skip.
#[macro_export]
macro_rules! skip_unless_kvm {
    () => {
        if !$crate::kvm_available() {
            eprintln!("SKIPPED: /dev/kvm is absent on this host");
            return;
        }
    };
}

/// Same as [`skip_unless_kvm!`] for callers that want a bool: `if skip_unless_kvm() { return; }`.
pub fn skip_unless_kvm() -> bool {
    if kvm_available() {
        false
    } else {
        eprintln!("SKIPPED: /dev/kvm is absent on this host");
        true
    }
}

/// Serialises the tests that run guests (within one test binary; cargo runs
/// test binaries one after the other).
pub fn serial_guard() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
