//! The `ferry` and `ferry-remote` processes: one-shot runs with a timeout
//! ([`run_ferry`], [`run_remote`]) and [`Vmm`], a `ferry` that runs in its own
//! temp dir and is killed (SIGKILL) and cleaned up on drop.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::guest::SerialLog;
use crate::util::TempDir;
use crate::{ferry_bin, ferry_remote_bin, stamp_guest, LONG, MIGRATION_TIMEOUT};

/// Runs `ferry` with `args` to completion (killed after `timeout`).
pub fn run_ferry(args: &[&str], timeout: Duration) -> Output {
    run_with_timeout(Command::new(ferry_bin()).args(args), timeout)
}

/// Runs `ferry-remote` with `args` to completion (killed after `timeout`).
pub fn run_remote(args: &[&str], timeout: Duration) -> Output {
    run_with_timeout(Command::new(ferry_remote_bin()).args(args), timeout)
}

fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Drain the pipes on threads so a chatty child cannot block.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = match wait_child(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = te.join().unwrap_or_default();
            panic!(
                "{:?} did not exit within {:?}; stderr: {}",
                cmd,
                timeout,
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: to.join().unwrap_or_default(),
        stderr: te.join().unwrap_or_default(),
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A running `ferry` with its own temp dir holding `api.sock`, `serial.log`,
/// `stdout.log` and `stderr.log`. Killed (SIGKILL) on drop.
pub struct Vmm {
    child: Child,
    status: Option<ExitStatus>,
    dir: TempDir,
    /// The API socket.
    pub sock: PathBuf,
    /// The guest's serial output.
    pub serial: SerialLog,
    /// A name for messages.
    pub name: String,
    /// The address its migrations listen on and are sent to
    /// (`127.0.0.1`, or its address inside a [`crate::NetPair`]).
    pub host: String,
    /// The network namespace it runs in, if not the test's own.
    pub netns: Option<String>,
}

impl Vmm {
    /// Spawns `ferry` with `args`, adding `--api-socket <dir>/api.sock` and
    /// `--serial file=<dir>/serial.log` unless `args` has them. Does not wait.
    pub fn spawn(name: &str, args: &[&str]) -> Vmm {
        Vmm::spawn_inner(name, args, true, None, &[])
    }

    /// Like [`Vmm::spawn`], in network namespace `netns` (`ip netns exec`)
    /// where its address is `host`.
    pub fn spawn_netns(name: &str, netns: &str, host: &str, args: &[&str]) -> Vmm {
        Vmm::spawn_inner(name, args, true, Some((netns, host)), &[])
    }

    /// Like [`Vmm::spawn`] without adding `--serial`: the guest's serial
    /// output is ferry's default, its stdout (`stdout.log`, which
    /// [`Vmm::serial`] then reads).
    pub fn spawn_serial_default(name: &str, args: &[&str]) -> Vmm {
        Vmm::spawn_inner(name, args, false, None, &[])
    }

    fn spawn_inner(
        name: &str,
        args: &[&str],
        add_serial: bool,
        netns: Option<(&str, &str)>,
        wrapper: &[&str],
    ) -> Vmm {
        let dir = TempDir::new(name);
        let sock = dir.join("api.sock");
        let mut serial = dir.join("serial.log");
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.contains(&"--api-socket") {
            full.push("--api-socket".into());
            full.push(sock.display().to_string());
        }
        if !add_serial {
            serial = dir.join("stdout.log");
        } else if !args.contains(&"--serial") {
            full.push("--serial".into());
            full.push(format!("file={}", serial.display()));
        }
        let stdout = fs::File::create(dir.join("stdout.log")).unwrap();
        let stderr = fs::File::create(dir.join("stderr.log")).unwrap();
        // `ip netns exec` execs ferry itself (no fork): the child's pid is
        // ferry's.
        let mut cmd = match netns {
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(ferry_bin());
                c
            }
            None if !wrapper.is_empty() => {
                let mut c = Command::new(wrapper[0]);
                c.args(&wrapper[1..]).arg(ferry_bin());
                c
            }
            None => Command::new(ferry_bin()),
        };
        let child = cmd
            .args(&full)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ferry");
        match netns {
            Some((ns, _)) => eprintln!("[{}] ip netns exec {ns} ferry {}", name, full.join(" ")),
            None => eprintln!("[{}] ferry {}", name, full.join(" ")),
        }
        Vmm {
            child,
            status: None,
            dir,
            sock,
            serial: SerialLog::new(serial),
            name: name.to_string(),
            host: netns.map_or("127.0.0.1", |(_, h)| h).to_string(),
            netns: netns.map(|(ns, _)| ns.to_string()),
        }
    }

    /// Boots the stamp guest with `cmdline` plus `extra` ferry arguments,
    /// and waits for its API to answer.
    pub fn boot(name: &str, cmdline: &str, extra: &[&str]) -> Vmm {
        let vmm = Vmm::boot_no_wait(name, cmdline, extra);
        vmm.wait_api();
        vmm
    }

    /// Like [`Vmm::boot`] without waiting for the API.
    pub fn boot_no_wait(name: &str, cmdline: &str, extra: &[&str]) -> Vmm {
        Vmm::boot_in(name, None, cmdline, extra)
    }

    /// Like [`Vmm::boot_no_wait`], in network namespace `netns` =
    /// (name, address) when given.
    pub fn boot_in(name: &str, netns: Option<(&str, &str)>, cmdline: &str, extra: &[&str]) -> Vmm {
        let guest = stamp_guest();
        let guest = guest.to_str().unwrap().to_string();
        let mut args = vec!["--kernel", &guest, "--cmdline", cmdline];
        args.extend_from_slice(extra);
        Vmm::spawn_inner(name, &args, true, netns, &[])
    }

    /// Like [`Vmm::boot`], with ferry started through `wrapper` (a command
    /// that execs its arguments, e.g. `setpriv ... --`, so that the pid is
    /// ferry's).
    pub fn boot_wrapped(name: &str, wrapper: &[&str], cmdline: &str, extra: &[&str]) -> Vmm {
        let guest = stamp_guest();
        let guest = guest.to_str().unwrap().to_string();
        let mut args = vec!["--kernel", &guest, "--cmdline", cmdline];
        args.extend_from_slice(extra);
        let vmm = Vmm::spawn_inner(name, &args, true, None, wrapper);
        vmm.wait_api();
        vmm
    }

    /// Starts a VM-less `ferry` (to receive a migration) and waits for its API.
    pub fn destination(name: &str, extra: &[&str]) -> Vmm {
        let vmm = Vmm::spawn(name, extra);
        vmm.wait_api();
        vmm
    }

    /// The temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if ferry has exited, without reaping it.
    pub(crate) fn peek_exit(&self) -> Option<ExitStatus> {
        // try_wait needs &mut; use waitid with WNOWAIT so the status stays collectable.
        if let Some(s) = self.status {
            return Some(s);
        }
        // SAFETY: siginfo_t is a plain C struct for which all-zero bytes are
        // a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid only writes a siginfo_t into `info`, which is a live,
        // exclusively borrowed local; WNOWAIT leaves the child unreaped, so
        // `self.child` keeps owning its pid.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: waitid succeeded for a child that exited (si_pid != 0), so
        // the kernel filled the SIGCHLD fields si_pid and si_status read here.
        if r == 0 && unsafe { info.si_pid() } != 0 {
            use std::os::unix::process::ExitStatusExt;
            // SAFETY: as above, si_status is valid for a CLD_* siginfo.
            let code = unsafe { info.si_status() };
            return Some(if info.si_code == libc::CLD_EXITED {
                ExitStatus::from_raw(code << 8)
            } else {
                ExitStatus::from_raw(code & 0x7f)
            });
        }
        None
    }

    /// Whether the process still runs.
    pub fn is_running(&self) -> bool {
        self.peek_exit().is_none()
    }

    /// Waits up to `timeout` for ferry to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = wait_child(&mut self.child, timeout);
        }
        self.status
    }

    /// Waits for exit and asserts exit code 0.
    pub fn expect_exit_ok(&mut self, timeout: Duration) {
        match self.wait_exit(timeout) {
            None => panic!(
                "[{}] ferry did not exit within {:?}; stderr:\n{}",
                self.name,
                timeout,
                self.stderr()
            ),
            Some(s) => assert!(
                s.success(),
                "[{}] ferry exited with {}; stderr:\n{}\nserial tail:\n{}",
                self.name,
                s,
                self.stderr(),
                self.serial.tail(5)
            ),
        }
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// What ferry wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default()
    }

    /// What ferry wrote to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// Runs `ferry-remote --api-socket <sock> <args>`.
    pub fn remote(&self, args: &[&str]) -> Output {
        let sock = self.sock.to_str().unwrap().to_string();
        let mut full = vec!["--api-socket", &sock];
        full.extend_from_slice(args);
        run_remote(&full, MIGRATION_TIMEOUT)
    }

    /// Waits until the guest completed at least pass `n`.
    pub fn wait_pass(&self, n: u64) -> u64 {
        self.serial.wait_for_pass(n, LONG).unwrap_or_else(|| {
            panic!(
                "[{}] no `stamp: pass {} ok` within {:?}; serial:\n{}\nstderr:\n{}",
                self.name,
                n,
                LONG,
                self.serial.tail(10),
                self.stderr()
            )
        })
    }

    /// Waits until the guest completed `k` more passes than it has now.
    pub fn wait_more_passes(&self, k: u64) -> u64 {
        let now = self.serial.last_pass().unwrap_or(0);
        self.wait_pass(now + k)
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "=== [{}] ferry stderr:\n{}\n=== [{}] serial tail:\n{}",
                self.name,
                self.stderr(),
                self.name,
                self.serial.tail(10)
            );
        }
        self.kill();
    }
}
