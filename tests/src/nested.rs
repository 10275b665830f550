//! The nested test bed: real Linux guests under ferry, one level down.
//!
//! This host's own KVM cannot run Linux (it is PVM, an instruction
//! emulator), but QEMU in TCG mode with `-cpu max` emulates AMD SVM. So:
//!
//! - **L1** is a Debian kernel under `qemu-system-x86_64 -accel tcg -cpu
//!   max`, with an initramfs holding busybox, `kvm.ko`/`kvm-amd.ko` (and
//!   their dependencies), `ferry`, `ferry-remote` and their libraries, and
//!   `tests/nested/l1-init.sh`. Its init loads KVM and runs a scenario
//!   script, then powers off.
//! - **L2** is the same Debian kernel, booted by ferry inside L1, with a
//!   busybox initramfs whose init is `tests/nested/l2-init.sh`: it ticks
//!   once a second and checks its memory, timers and console.
//!
//! The kernel package (the one `linux-image-amd64` depends on) and
//! `busybox-static` are fetched with `apt-get download` at first use and
//! unpacked under `<target>/nested/`. The scenario talks to the harness
//! only through the L1 serial console (QEMU's stdout): every line it means
//! for the harness starts with `l1: `, and `dump NAME` in the scenario
//! prints the serial log of VMM `NAME` as `l1: [NAME] ...`.
//!
//! QEMU is killed when its [`L1Run`] ends, on a time-out, or when the test
//! process dies (`PR_SET_PDEATHSIG`).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use crate::{ferry_bin, ferry_remote_bin, target_dir};

/// The QEMU binary the bed runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// The package whose dependency names the kernel to use.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// The modules that give L1 its `/dev/kvm`, in load order (relative to the
/// module tree's `kernel/`).
const KVM_MODULES: [&str; 4] = [
    "virt/lib/irqbypass.ko",
    "arch/x86/kvm/kvm.ko",
    "drivers/crypto/ccp/ccp.ko",
    "arch/x86/kvm/kvm-amd.ko",
];

fn bed_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("nested")
        .join(name)
}

/// Everything a scenario needs, prepared once per test process.
///
/// Invariant: `kernel` is a bzImage that boots both as L1 and as L2, and
/// `base` is a complete newc archive (ending in a trailer) holding L1's
/// init, modules, ferry binaries and libraries, and L2's kernel and
/// initramfs.
#[derive(Debug)]
pub struct Bed {
    /// The Debian kernel (bzImage).
    pub kernel: PathBuf,
    /// The L1 initramfs without a scenario.
    base: Vec<u8>,
    /// Where scenario archives are written.
    dir: PathBuf,
}

/// Why the bed cannot run here; a test prints it and skips.
#[derive(Debug)]
pub struct Unavailable(pub String);

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package `linux-image-amd64` depends on (for example
/// `linux-image-6.1.0-57-amd64`); `FERRY_NESTED_KERNEL_PACKAGE` overrides.
fn kernel_package() -> Result<String, String> {
    if let Ok(p) = std::env::var("FERRY_NESTED_KERNEL_PACKAGE") {
        return Ok(p);
    }
    let deps = run(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))?;
    deps.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "`apt-cache depends {KERNEL_META_PACKAGE}` names no kernel (run apt-get update)"
            )
        })
}

/// Downloads and unpacks `package` into `<cache>/<package>/` once.
fn unpacked(cache: &Path, package: &str) -> Result<PathBuf, String> {
    let root = cache.join(package);
    let done = root.join(".unpacked");
    if done.is_file() {
        return Ok(root);
    }
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(|e| format!("creating {}: {e}", debs.display()))?;
    let find_deb = || -> Option<PathBuf> {
        fs::read_dir(&debs)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    let deb = match find_deb() {
        Some(d) => d,
        None => {
            eprintln!("nested bed: apt-get download {package}");
            run(Command::new("apt-get")
                .arg("download")
                .arg(package)
                .current_dir(&debs))?;
            find_deb().ok_or_else(|| format!("apt-get download {package} left no .deb"))?
        }
    };
    let _ = fs::remove_dir_all(&root);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    fs::write(&done, b"").map_err(|e| format!("writing {}: {e}", done.display()))?;
    Ok(root)
}

/// A newc (initramfs) archive being built in memory.
///
/// Invariant: every parent directory of an entry is added before it.
pub struct Archive {
    buf: Vec<u8>,
    ino: u32,
    dirs: Vec<String>,
}

impl Default for Archive {
    fn default() -> Self {
        Self::new()
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Archive {
        Archive {
            buf: Vec::new(),
            ino: 1,
            dirs: Vec::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        let size = u32::try_from(data.len()).expect("an initramfs file under 4 GiB");
        let w = cpio::NewcBuilder::new(name)
            .ino(self.ino)
            .mode(mode)
            .nlink(1)
            .write(Vec::new(), size);
        self.ino += 1;
        let mut w = w;
        w.write_all(data).expect("writing to memory");
        let bytes = w.finish().expect("writing to memory");
        self.buf.extend_from_slice(&bytes);
    }

    fn parents(&mut self, path: &str) {
        let mut at = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if !self.dirs.contains(&at) {
                self.dirs.push(at.clone());
                let d = at.clone();
                self.entry(&d, 0o040755, &[]);
            }
        }
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str) -> &mut Self {
        self.parents(&format!("{path}/x"));
        self
    }

    /// Adds a regular file with `mode` (permission bits).
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.parents(path);
        self.entry(path, 0o100000 | mode, data);
        self
    }

    /// Adds a copy of the host file `from`.
    pub fn copy(&mut self, path: &str, mode: u32, from: &Path) -> Result<&mut Self, String> {
        let data = fs::read(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
        Ok(self.file(path, mode, &data))
    }

    /// The archive with its trailer.
    pub fn finish(self) -> Vec<u8> {
        cpio::newc::trailer(self.buf).expect("writing to memory")
    }
}

/// The shared libraries `bin` loads, as (path in the guest, host path),
/// from `ldd`. The program interpreter keeps its absolute path.
fn libraries(bin: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    let out = run(Command::new("ldd").arg(bin))?;
    let mut libs = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        let host = if let Some((_, rest)) = line.split_once("=>") {
            rest.split_whitespace().next()
        } else {
            line.split_whitespace()
                .next()
                .filter(|p| p.starts_with('/'))
        };
        let Some(host) = host.filter(|p| p.starts_with('/')) else {
            continue;
        };
        let host = PathBuf::from(host);
        let name = host
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| format!("odd library path {}", host.display()))?;
        let guest = if name.starts_with("ld-linux") {
            host.to_string_lossy().trim_start_matches('/').to_string()
        } else {
            format!("ferry/lib/{name}")
        };
        libs.push((guest, host));
    }
    Ok(libs)
}

/// A copy of `bin` without debug information (smaller initramfs), or the
/// binary itself when `objcopy` is missing.
fn stripped(bin: &Path, dir: &Path) -> PathBuf {
    let name = bin.file_name().map(PathBuf::from).unwrap_or_default();
    let out = dir.join(name);
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(bin)
        .arg(&out)
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        out
    } else {
        bin.to_path_buf()
    }
}

fn prepare() -> Result<Bed, String> {
    let cache = target_dir().join("nested");
    fs::create_dir_all(&cache).map_err(|e| format!("creating {}: {e}", cache.display()))?;
    let kpkg = kernel_package()?;
    let kroot = unpacked(&cache, &kpkg)?;
    let bbroot = unpacked(&cache, "busybox-static")?;
    let busybox = bbroot.join("bin/busybox");
    let release = kpkg.trim_start_matches("linux-image-");
    let kernel = kroot.join(format!("boot/vmlinuz-{release}"));
    if !kernel.is_file() {
        return Err(format!("{} is missing", kernel.display()));
    }
    let modules = kroot.join(format!("lib/modules/{release}/kernel"));

    // L2: busybox and the witness init.
    let mut l2 = Archive::new();
    l2.dir("dev").dir("proc").dir("sys").dir("tmp");
    l2.copy("bin/busybox", 0o755, &busybox)?;
    l2.copy("init", 0o755, &bed_source("l2-init.sh"))?;
    let l2 = l2.finish();

    // L1: busybox, KVM modules, ferry, its libraries, the L2 kernel. The
    // work directories of test processes that are gone are removed.
    if let Ok(entries) = fs::read_dir(&cache) {
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("run-")) else {
                continue;
            };
            if !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = cache.join(format!("run-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut l1 = Archive::new();
    l1.dir("dev").dir("proc").dir("sys").dir("tmp");
    l1.copy("bin/busybox", 0o755, &busybox)?;
    l1.copy("init", 0o755, &bed_source("l1-init.sh"))?;
    l1.copy("lib.sh", 0o644, &bed_source("lib.sh"))?;
    for m in KVM_MODULES {
        let name = Path::new(m)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(m);
        l1.copy(&format!("modules/{name}"), 0o644, &modules.join(m))?;
    }
    for bin in [ferry_bin(), ferry_remote_bin()] {
        let name = bin.file_name().and_then(|n| n.to_str()).unwrap_or("ferry");
        let name = name.to_string();
        l1.copy(&format!("ferry/{name}"), 0o755, &stripped(&bin, &dir))?;
    }
    // The libraries of both binaries (ferry-remote links libm, ferry does
    // not), each once.
    let mut libs = libraries(&ferry_bin())?;
    libs.extend(libraries(&ferry_remote_bin())?);
    libs.sort();
    libs.dedup();
    for (guest, host) in libs {
        l1.copy(&guest, 0o755, &host)?;
    }
    l1.copy("l2/vmlinuz", 0o644, &kernel)?;
    l1.file("l2/initrd", 0o644, &l2);
    Ok(Bed {
        kernel,
        base: l1.finish(),
        dir,
    })
}

/// The bed, prepared at the first call of the process. `Err` only when
/// QEMU cannot be run here; any other problem (a failed download, a
/// missing file) panics with the reason.
pub fn bed() -> Result<&'static Bed, &'static Unavailable> {
    static BED: OnceLock<Result<Bed, Unavailable>> = OnceLock::new();
    BED.get_or_init(|| {
        if Command::new(QEMU).arg("--version").output().is_err() {
            return Err(Unavailable(format!(
                "{QEMU} is not installed (apt-get install qemu-system-x86; .ci/run does)"
            )));
        }
        match prepare() {
            Ok(b) => Ok(b),
            Err(e) => panic!("nested bed: {e}"),
        }
    })
    .as_ref()
}

/// Returns the bed, or prints why it cannot run and returns `None` (the
/// test then skips; the only reason is a missing QEMU).
pub fn bed_or_skip() -> Option<&'static Bed> {
    match bed() {
        Ok(b) => Some(b),
        Err(Unavailable(why)) => {
            eprintln!("SKIPPED: nested Linux bed unavailable: {why}");
            None
        }
    }
}

/// How one L1 machine runs.
///
/// Invariant: `script` is a busybox `sh` script; it runs after `/lib.sh`
/// is sourced, with KVM loaded.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Name (for logs and file names).
    pub name: String,
    /// The scenario body.
    pub script: String,
    /// L1 vCPUs.
    pub smp: u8,
    /// L1 memory in MiB.
    pub mem_mib: u32,
    /// Wall-clock limit for the whole L1 run.
    pub timeout: Duration,
    /// What is echoed to stderr while it runs.
    pub echo: Echo,
}

/// What [`Bed::run`] echoes to stderr while L1 runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    /// Every console line, with the scenario name and the time (tests:
    /// cargo shows it when a test fails).
    All,
    /// Only the scenario's own lines, without their `l1: ` tag (demos).
    Scenario,
}

impl Scenario {
    /// A scenario with one L1 vCPU, 2 GiB and a 6-minute limit.
    pub fn new(name: &str, script: &str) -> Scenario {
        Scenario {
            name: name.to_string(),
            script: script.to_string(),
            smp: 1,
            mem_mib: 2048,
            timeout: Duration::from_secs(360),
            echo: Echo::All,
        }
    }
}

/// What an L1 run printed.
///
/// Invariant: `lines` is the whole L1 console output, in order.
#[derive(Debug)]
pub struct L1Run {
    /// Every console line.
    pub lines: Vec<String>,
    /// QEMU's exit status (`None` if it was killed at the time-out).
    pub status: Option<ExitStatus>,
}

impl L1Run {
    /// The scenario's own lines (`l1: ` removed), VMM logs excluded.
    pub fn says(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix("l1: "))
            .filter(|l| !l.starts_with('['))
            .collect()
    }

    /// Whether a scenario line contains `needle`.
    pub fn said(&self, needle: &str) -> bool {
        self.says().iter().any(|l| l.contains(needle))
    }

    /// The serial log of VMM `name`, as the scenario's `dump` printed it.
    pub fn log(&self, name: &str) -> Vec<&str> {
        let tag = format!("l1: [{name}] ");
        self.lines
            .iter()
            .filter_map(|l| l.strip_prefix(tag.as_str()))
            .collect()
    }

    /// The ticks of VMM `name`'s guest: (number, rest of the line).
    pub fn ticks(&self, name: &str) -> Vec<(u64, String)> {
        self.log(name)
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("l2: tick ")?;
                let (n, tail) = rest.split_once(' ')?;
                Some((n.parse().ok()?, tail.to_string()))
            })
            .collect()
    }

    /// The scenario's exit code (`l1: scenario exit N`).
    pub fn exit_code(&self) -> Option<i32> {
        self.says()
            .iter()
            .find_map(|l| l.strip_prefix("scenario exit ")?.trim().parse().ok())
    }

    /// Everything, for a failure message.
    pub fn transcript(&self) -> String {
        self.lines.join("\n")
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Bed {
    /// Runs `sc` in a fresh L1 machine and returns its console output once
    /// L1 powered off or the time-out passed. QEMU never outlives this call.
    pub fn run(&self, sc: &Scenario) -> L1Run {
        // One L1 machine at a time: two TCG machines on this 2-core host
        // preempt each other's vCPU threads for milliseconds, and the guests'
        // clocks then see that jitter (a TSC/kvmclock skew the witness
        // reports) instead of what ferry did.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let mut scenario = Archive::new();
        scenario.file(
            "scenario.sh",
            0o755,
            format!(". /lib.sh\n{}\n", sc.script).as_bytes(),
        );
        let mut initrd = self.base.clone();
        initrd.extend_from_slice(&scenario.finish());
        let path = self.dir.join(format!("{}.cpio", sc.name));
        fs::write(&path, &initrd).expect("writing the L1 initramfs");

        // One TCG thread for all L1 vCPUs: with multi-threaded TCG, a
        // two-vCPU L1 running a two-vCPU L2 saw L2 triple faults (during boot
        // with no migration, and after one) that no ferry call explains, in
        // 2 of the CI runs on record. Round-robin TCG keeps L1 SMP (ferry's
        // threads still run on two L1 CPUs) without the races between host
        // threads in QEMU's SVM emulation.
        let accel = if sc.smp > 1 {
            "tcg,thread=single"
        } else {
            "tcg"
        };
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", accel, "-cpu", "max", "-nodefaults", "-no-reboot"])
            .args(["-display", "none", "-serial", "stdio", "-monitor", "none"])
            .arg("-smp")
            .arg(sc.smp.to_string())
            .arg("-m")
            .arg(format!("{}M", sc.mem_mib))
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&path)
            .arg("-append")
            .arg("console=ttyS0 panic=-1 rdinit=/init quiet loglevel=4")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches
        // no memory of the parent; it only asks the kernel to kill QEMU if
        // this test process dies first.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let start = Instant::now();
        let mut child = KillOnDrop(cmd.spawn().expect("spawning QEMU"));
        let stdout = child.0.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let name = sc.name.clone();
        let echo = sc.echo;
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_string();
                match echo {
                    Echo::All => {
                        eprintln!("[{name} {:>5.1}s] {line}", start.elapsed().as_secs_f64())
                    }
                    Echo::Scenario => {
                        if let Some(l) = line.strip_prefix("l1: ") {
                            eprintln!("{l}");
                        }
                    }
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let status = loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(l) => lines.push(l),
                Err(mpsc::RecvTimeoutError::Disconnected) => break child.0.wait().ok(),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if start.elapsed() > sc.timeout {
                eprintln!("nested bed: {} timed out after {:?}", sc.name, sc.timeout);
                lines.push(format!("nested bed: timed out after {:?}", sc.timeout));
                break None;
            }
        };
        drop(child);
        let _ = reader.join();
        lines.extend(rx.try_iter());
        let _ = fs::remove_file(&path);
        L1Run { lines, status }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archives_concatenate_as_cpio_reads_them() {
        let mut a = Archive::new();
        a.file("bin/x", 0o755, b"hello").dir("dev");
        let mut b = Archive::new();
        b.file("scenario.sh", 0o644, b"echo hi\n");
        let mut img = a.finish();
        assert_eq!(&img[..6], b"070701");
        assert_eq!(img.len() % 4, 0);
        img.extend_from_slice(&b.finish());
        let mut names = Vec::new();
        let mut rest: &[u8] = &img;
        loop {
            let r = cpio::NewcReader::new(rest).expect("entry");
            if r.entry().is_trailer() {
                rest = r.finish().expect("trailer");
                while rest.first() == Some(&0) {
                    rest = &rest[1..];
                }
                if rest.is_empty() {
                    break;
                }
                continue;
            }
            names.push(r.entry().name().to_string());
            rest = r.finish().expect("file");
        }
        assert_eq!(names, ["bin", "bin/x", "dev", "scenario.sh"]);
    }
}
