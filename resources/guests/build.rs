//! Build script of the `ferry-guests` crate.
//!
//! Assembles and links the "stamp" test guest (`resources/guests/stamp.S`,
//! which includes `checks.S`, `dev.S` and `helpers.S`, + `stamp.ld`) with the system toolchain and places the result at
//! `<workspace target dir>/guests/stamp.elf`. The absolute path is exported
//! to the crate as the `FERRY_STAMP_GUEST` compile-time environment variable
//! (`ferry_guests::STAMP_ELF`).
//!
//! Toolchain overrides: `FERRY_GUEST_CC` (default `gcc`) and `FERRY_GUEST_LD`
//! (default `ld`).

use std::env;
use std::ffi::OsStr;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{self, Command};

const INSTALL_HINT: &str = "apt-get install -y gcc binutils";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    // This crate lives in resources/guests, next to the guest sources.
    let guests_src = manifest_dir;
    let src = guests_src.join("stamp.S");
    let lds = guests_src.join("stamp.ld");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", lds.display());
    for inc in ["checks.S", "dev.S", "helpers.S"] {
        println!("cargo:rerun-if-changed={}", guests_src.join(inc).display());
    }
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_CC");
    println!("cargo:rerun-if-env-changed=FERRY_GUEST_LD");

    let cc = env::var("FERRY_GUEST_CC").unwrap_or_else(|_| "gcc".to_string());
    let ld = env::var("FERRY_GUEST_LD").unwrap_or_else(|_| "ld".to_string());

    // Assemble (through the C preprocessor: .S) and link inside OUT_DIR.
    let obj = out_dir.join("stamp.o");
    let elf_tmp = out_dir.join("stamp.elf");
    run(
        Command::new(&cc)
            .args(["-c", "-m64", "-nostdinc", "-Wa,--noexecstack", "-o"])
            .arg(&obj)
            .arg(&src),
        &cc,
    );
    let mut link = Command::new(&ld);
    link.args([
        "-nostdlib",
        "-static",
        "--build-id=none",
        "-z",
        "max-page-size=4096",
        "-z",
        "noexecstack",
    ]);
    if ld_supports(&ld, "--no-warn-rwx-segments") {
        link.arg("--no-warn-rwx-segments");
    }
    link.arg("-T").arg(&lds).arg("-o").arg(&elf_tmp).arg(&obj);
    run(&mut link, &ld);

    // Publish to <target>/guests/stamp.elf (atomically: several profiles may
    // build concurrently).
    let target_dir = target_dir(&out_dir);
    let guests_dir = target_dir.join("guests");
    fs::create_dir_all(&guests_dir)
        .unwrap_or_else(|e| fail(&format!("cannot create {}: {e}", guests_dir.display())));
    let dest = guests_dir.join("stamp.elf");
    let staging = guests_dir.join(format!(".stamp.elf.{}.tmp", process::id()));
    fs::copy(&elf_tmp, &staging)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", staging.display())));
    fs::rename(&staging, &dest)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", dest.display())));

    println!("cargo:rustc-env=FERRY_STAMP_GUEST={}", dest.display());
}

/// The workspace target dir, derived from
/// `OUT_DIR = <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`.
fn target_dir(out_dir: &Path) -> PathBuf {
    // `base` is `<target>` or, with `--target TRIPLE`, `<target>/<triple>`.
    let base = out_dir
        .ancestors()
        .nth(4)
        .unwrap_or_else(|| fail(&format!("unexpected OUT_DIR layout: {}", out_dir.display())));
    let parent = base.parent();
    let triple = env::var("TARGET").unwrap_or_default();
    let named_like_triple = !triple.is_empty() && base.file_name() == Some(OsStr::new(&triple));
    // Cargo writes CACHEDIR.TAG into the target dir root.
    let tagged = |d: &Path| d.join("CACHEDIR.TAG").is_file();
    match parent {
        Some(p) if named_like_triple || (!tagged(base) && tagged(p)) => p.to_path_buf(),
        _ => base.to_path_buf(),
    }
}

fn ld_supports(ld: &str, flag: &str) -> bool {
    Command::new(ld)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

fn run(cmd: &mut Command, tool: &str) {
    match cmd.output() {
        Ok(out) if out.status.success() => {
            // Surface warnings without failing the build.
            for line in String::from_utf8_lossy(&out.stderr).lines() {
                println!("cargo:warning={tool}: {line}");
            }
        }
        Ok(out) => fail(&format!(
            "building the stamp test guest failed: {:?} exited with {}\n{}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => fail(&format!(
            "`{tool}` not found: the stamp test guest (resources/guests/stamp.S) is assembled \
             with the system toolchain. Install it with: {INSTALL_HINT}"
        )),
        Err(e) => fail(&format!(
            "cannot run `{tool}`: {e} (install with: {INSTALL_HINT})"
        )),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    println!("cargo:warning={}", msg.lines().next().unwrap_or(msg));
    process::exit(1);
}
