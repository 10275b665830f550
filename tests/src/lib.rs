//! Helpers for the integration tests of Ferry.
//!
//! The tests drive the real `ferry` and `ferry-remote` binaries and boot the
//! project's "stamp" test guest. Build the workspace first (the README's test
//! command does): `cargo build --workspace --release && cargo test --workspace --release`.
//!
//! What is here:
//! - locating the binaries and the guest ([`ferry_bin`], [`ferry_remote_bin`], [`stamp_guest`]);
//! - [`skip_unless_kvm!`]: skips a test (with a printed reason) when /dev/kvm is absent;
//! - [`serial_guard`]: one guest at a time per test binary (the CI machine has 2 cores
//!   and every guest instruction is emulated there);
//! - [`Vmm`]: a `ferry` process with its own temp dir (API socket, serial file), killed
//!   and cleaned up on drop;
//! - [`SerialLog`]: tails a serial file and parses the stamp guest's lines;
//! - [`api`]: a raw HTTP/1.1 client over the UNIX socket;
//! - migration helpers: [`free_tcp_port`], [`start_receive`], [`Migration`].

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use serde_json::{json, Value};

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

// ---------------------------------------------------------------------------
// Temp dirs and small utilities
// ---------------------------------------------------------------------------

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory under /tmp (short path: it holds UNIX sockets).
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = PathBuf::from(format!(
            "/tmp/ferry-{}-{}-{}-{:x}",
            tag,
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            nanos
        ));
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// A path inside the directory.
    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Cheap non-cryptographic random bytes (xorshift seeded from the clock).
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut x: u64 = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    x ^= (std::process::id() as u64) << 32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    static USED: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&port) {
            used.push(port);
            return port;
        }
    }
}

/// Whether something listens on TCP `port` (read from /proc/net/tcp{,6},
/// without connecting: a probe connection would disturb a receiver).
pub fn tcp_listening(port: u16) -> bool {
    let needle = format!(":{:04X}", port);
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&needle) && cols[3] == "0A"
            })
    })
}

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

// ---------------------------------------------------------------------------
// The API client
// ---------------------------------------------------------------------------

/// An HTTP response: status and body (JSON, `Null` if empty, a JSON string if
/// the body is not JSON).
pub type ApiResponse = (u16, Value);

/// Sends one HTTP/1.1 request over the UNIX socket `sock` and returns the
/// status and JSON body. `path` is either absolute (`/api/v1/vm.info`) or
/// relative to `/api/v1/` (`vm.info`). Errors (connect, I/O, malformed
/// response) are returned as `Err`.
pub fn try_api(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<ApiResponse, String> {
    try_api_raw(
        sock,
        method,
        path,
        body.map(|b| b.to_string()).as_deref(),
        Duration::from_secs(120),
    )
}

/// Like [`try_api`] but with a raw body string and a read timeout.
pub fn try_api_raw(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ApiResponse, String> {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/api/v1/{}", path)
    };
    let mut s =
        UnixStream::connect(sock).map_err(|e| format!("connect {}: {}", sock.display(), e))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    let body = body.unwrap_or("");
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\n",
        method, full
    );
    if !body.is_empty() || method == "PUT" || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .map_err(|e| format!("write: {}", e))?;
    read_response(&mut s)
}

fn read_response(s: &mut UnixStream) -> Result<ApiResponse, String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // Headers.
    let header_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).map_err(|e| format!("read: {}", e))?;
        if n == 0 {
            return Err(format!(
                "connection closed before the end of the headers: {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", status_line))?;
    let mut content_length = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            if k == "content-length" {
                content_length = v.trim().parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = buf[header_end..].to_vec();
    if let Some(len) = content_length {
        while body.len() < len {
            let n = s
                .read(&mut chunk)
                .map_err(|e| format!("read body: {}", e))?;
            if n == 0 {
                return Err("connection closed in the body".into());
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body.truncate(len);
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        loop {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read body to EOF: {}", e)),
            }
        }
        if chunked {
            body = dechunk(&body);
        }
    }
    let text = String::from_utf8_lossy(&body);
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.to_string()))
    };
    Ok((status, value))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = find(b, b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..p]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = p + 2;
        let end = (start + size).min(b.len());
        out.extend_from_slice(&b[start..end]);
        b = &b[(end + 2).min(b.len())..];
    }
    out
}

/// Like [`try_api`], panicking on transport errors.
pub fn api(sock: &Path, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
    try_api(sock, method, path, body.as_ref())
        .unwrap_or_else(|e| panic!("API {} {} on {}: {}", method, path, sock.display(), e))
}

/// Whether `status` is 2xx.
pub fn ok(status: u16) -> bool {
    (200..300).contains(&status)
}

// ---------------------------------------------------------------------------
// Serial log
// ---------------------------------------------------------------------------

/// A serial output file written by ferry's `--serial file=PATH`.
#[derive(Debug, Clone)]
pub struct SerialLog {
    path: PathBuf,
}

impl SerialLog {
    /// Tails `path` (which may not exist yet).
    pub fn new(path: impl Into<PathBuf>) -> SerialLog {
        SerialLog { path: path.into() }
    }
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Everything written so far (lossy UTF-8, `\r` removed).
    pub fn text(&self) -> String {
        let bytes = fs::read(&self.path).unwrap_or_default();
        String::from_utf8_lossy(&bytes).replace('\r', "")
    }
    /// The complete (newline-terminated) lines written so far.
    pub fn lines(&self) -> Vec<String> {
        complete_lines(&self.text())
    }
    /// Waits until a complete line satisfies `pred`; returns it.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        poll(timeout, || self.lines().into_iter().find(|l| pred(l)))
    }
    /// Waits until the guest has completed pass `n` (or a later one); returns the last pass.
    pub fn wait_for_pass(&self, n: u64, timeout: Duration) -> Option<u64> {
        poll(timeout, || self.last_pass().filter(|&p| p >= n))
    }
    /// Numbers of the `stamp: pass <n> ok` lines, in order.
    pub fn passes(&self) -> Vec<u64> {
        pass_numbers(&self.lines())
    }
    /// The last completed pass.
    pub fn last_pass(&self) -> Option<u64> {
        self.passes().last().copied()
    }
    /// The first `stamp: MISMATCH` line, if any.
    pub fn mismatch(&self) -> Option<String> {
        self.text()
            .lines()
            .find(|l| l.contains("MISMATCH"))
            .map(str::to_string)
    }
    /// The `stamp: boot mem=<MiB> region=<MiB>` line parsed as (mem, region).
    pub fn boot(&self) -> Option<(u64, u64)> {
        self.lines().iter().find_map(|l| parse_boot(l))
    }
    /// Last lines of the file, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Complete lines of `text` (a trailing fragment without newline is left out).
pub fn complete_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.split('\n').map(str::to_string).collect();
    v.pop(); // after the last '\n': empty or an incomplete line
    v
}

/// Parses `stamp: pass <n> ok`.
pub fn parse_pass(line: &str) -> Option<u64> {
    let rest = line.trim().strip_prefix("stamp: pass ")?;
    let (n, tail) = rest.split_once(' ')?;
    if tail.trim() != "ok" {
        return None;
    }
    n.parse().ok()
}

/// Parses `stamp: boot mem=<MiB> region=<MiB>` into (mem, region).
pub fn parse_boot(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("stamp: boot ")?;
    let mut mem = None;
    let mut region = None;
    for kv in rest.split_whitespace() {
        if let Some(v) = kv.strip_prefix("mem=") {
            mem = v.parse().ok();
        } else if let Some(v) = kv.strip_prefix("region=") {
            region = v.parse().ok();
        }
    }
    Some((mem?, region?))
}

/// Pass numbers of the pass lines among `lines`.
pub fn pass_numbers(lines: &[String]) -> Vec<u64> {
    lines.iter().filter_map(|l| parse_pass(l)).collect()
}

/// Checks that the concatenated serial output of the hosts a guest ran on
/// (in order) is one clean stream: no MISMATCH, no garbage line, passes
/// numbered 1, 2, 3, ... without gap or repeat. A line split across two hosts
/// at switch-over joins up again in the concatenation. Returns the passes.
pub fn check_stream(logs: &[&SerialLog]) -> Vec<u64> {
    let text: String = logs.iter().map(|l| l.text()).collect();
    let describe = || {
        logs.iter()
            .enumerate()
            .map(|(i, l)| format!("--- host {} ({}):\n{}", i, l.path().display(), l.tail(8)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        !text.contains("MISMATCH"),
        "guest saw a MISMATCH:\n{}",
        describe()
    );
    let lines = complete_lines(&text);
    for l in &lines {
        let l = l.trim();
        assert!(
            l.is_empty()
                || parse_pass(l).is_some()
                || parse_boot(l).is_some()
                || l.starts_with("stamp: "),
            "unexpected serial line {:?}:\n{}",
            l,
            describe()
        );
    }
    let passes = pass_numbers(&lines);
    for (i, p) in passes.iter().enumerate() {
        assert_eq!(
            *p,
            i as u64 + 1,
            "pass numbers not consecutive ({:?}):\n{}",
            passes,
            describe()
        );
    }
    passes
}

// ---------------------------------------------------------------------------
// The ferry process
// ---------------------------------------------------------------------------

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
}

impl Vmm {
    /// Spawns `ferry` with `args`, adding `--api-socket <dir>/api.sock` and
    /// `--serial file=<dir>/serial.log` unless `args` has them. Does not wait.
    pub fn spawn(name: &str, args: &[&str]) -> Vmm {
        let dir = TempDir::new(name);
        let sock = dir.join("api.sock");
        let serial = dir.join("serial.log");
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !args.contains(&"--api-socket") {
            full.push("--api-socket".into());
            full.push(sock.display().to_string());
        }
        if !args.contains(&"--serial") {
            full.push("--serial".into());
            full.push(format!("file={}", serial.display()));
        }
        let stdout = fs::File::create(dir.join("stdout.log")).unwrap();
        let stderr = fs::File::create(dir.join("stderr.log")).unwrap();
        let child = Command::new(ferry_bin())
            .args(&full)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ferry");
        eprintln!("[{}] ferry {}", name, full.join(" "));
        Vmm {
            child,
            status: None,
            dir,
            sock,
            serial: SerialLog::new(serial),
            name: name.to_string(),
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
        let guest = stamp_guest();
        let guest = guest.to_str().unwrap().to_string();
        let mut args = vec!["--kernel", &guest, "--cmdline", cmdline];
        args.extend_from_slice(extra);
        Vmm::spawn(name, &args)
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

    /// Waits until `GET vmm.ping` answers 200; panics (with stderr) if ferry
    /// exits or 60 s pass.
    pub fn wait_api(&self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) =
                try_api_raw(&self.sock, "GET", "vmm.ping", None, Duration::from_secs(10))
            {
                return;
            }
            if let Some(st) = self.peek_exit() {
                panic!(
                    "[{}] ferry exited ({}) before its API answered; stderr:\n{}",
                    self.name,
                    st,
                    self.stderr()
                );
            }
            if start.elapsed() > LONG {
                panic!(
                    "[{}] API did not answer within {:?}; stderr:\n{}",
                    self.name,
                    LONG,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn peek_exit(&self) -> Option<ExitStatus> {
        // try_wait needs &mut; use waitid with WNOWAIT so the status stays collectable.
        if let Some(s) = self.status {
            return Some(s);
        }
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let r = libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            );
            if r == 0 && info.si_pid() != 0 {
                use std::os::unix::process::ExitStatusExt;
                let code = info.si_status();
                return Some(if info.si_code == libc::CLD_EXITED {
                    ExitStatus::from_raw(code << 8)
                } else {
                    ExitStatus::from_raw(code & 0x7f)
                });
            }
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

    /// An API call; panics on transport errors.
    pub fn api(&self, method: &str, path: &str, body: Option<Value>) -> ApiResponse {
        try_api(&self.sock, method, path, body.as_ref()).unwrap_or_else(|e| {
            panic!(
                "[{}] API {} {}: {}; stderr:\n{}",
                self.name,
                method,
                path,
                e,
                self.stderr()
            )
        })
    }

    /// An API call that must succeed (2xx); returns the body.
    pub fn api_ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (st, v) = self.api(method, path, body);
        assert!(
            ok(st),
            "[{}] {} {} -> {} {}",
            self.name,
            method,
            path,
            st,
            v
        );
        v
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Value {
        self.api_ok("GET", "vm.info", None)
    }

    /// The VM state from `GET vm.info` (`running`, `paused`, ...).
    pub fn state(&self) -> String {
        self.info()["state"].as_str().unwrap_or("").to_string()
    }

    /// `GET vm.migration`, `None` when the API cannot be reached.
    pub fn migration_status(&self) -> Option<Value> {
        match try_api(&self.sock, "GET", "vm.migration", None) {
            Ok((st, v)) if ok(st) => Some(v),
            _ => None,
        }
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

// ---------------------------------------------------------------------------
// Migration helpers
// ---------------------------------------------------------------------------

/// `tcp:127.0.0.1:<port>`.
pub fn tcp_url(port: u16) -> String {
    format!("tcp:127.0.0.1:{}", port)
}

/// Asks `dst` to receive a migration on `port` and returns once it listens.
/// The request runs on a thread (in case the API answers only when the
/// migration ends); its handle is returned.
pub fn start_receive(dst: &Vmm, port: u16) -> thread::JoinHandle<Result<ApiResponse, String>> {
    let sock = dst.sock.clone();
    let h = thread::spawn(move || {
        try_api_raw(
            &sock,
            "PUT",
            "vm.receive-migration",
            Some(&json!({ "receiver_url": tcp_url(port) }).to_string()),
            MIGRATION_TIMEOUT,
        )
    });
    let listening = poll(LONG, || {
        if tcp_listening(port) || h.is_finished() {
            Some(())
        } else {
            None
        }
    });
    assert!(
        listening.is_some(),
        "[{}] not listening on port {} within {:?}",
        dst.name,
        port,
        LONG
    );
    if h.is_finished() {
        let r = h.join().unwrap();
        match &r {
            Ok((st, _)) if ok(*st) => {}
            other => panic!(
                "[{}] vm.receive-migration failed: {:?}; stderr:\n{}",
                dst.name,
                other,
                dst.stderr()
            ),
        }
        assert!(
            poll(LONG, || tcp_listening(port).then_some(())).is_some(),
            "[{}] receive-migration answered but nothing listens on {}",
            dst.name,
            port
        );
        return thread::spawn(move || r);
    }
    h
}

/// Parameters of `vm.send-migration` with the spec's defaults.
pub fn send_params(port: u16, connections: u32) -> Value {
    json!({
        "destination_url": tcp_url(port),
        "connections": connections,
        "downtime_ms": 300,
        "max_bandwidth_mbps": null,
        "timeout_s": 3600,
        "device_state": "channels",
        "device_precopy": true,
    })
}

/// Sends `vm.send-migration` with `params` (must be accepted).
pub fn start_send(src: &Vmm, params: Value) {
    let (st, v) = src.api("PUT", "vm.send-migration", Some(params.clone()));
    assert!(
        ok(st),
        "[{}] vm.send-migration {} -> {} {}",
        src.name,
        params,
        st,
        v
    );
}

/// The `state` field of a migration status.
pub fn mig_state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

/// Waits until `vmm`'s `vm.migration` reports one of `states`; returns the status.
/// Panics (with the last status) after `timeout`.
pub fn wait_migration_state(vmm: &Vmm, states: &[&str], timeout: Duration) -> Value {
    let mut last = Value::Null;
    let r = poll(timeout, || {
        let s = vmm.migration_status()?;
        last = s.clone();
        states.contains(&mig_state(&s)).then_some(s)
    });
    r.unwrap_or_else(|| {
        panic!(
            "[{}] vm.migration did not reach {:?} within {:?}; last: {}\nstderr:\n{}",
            vmm.name,
            states,
            timeout,
            last,
            vmm.stderr()
        )
    })
}

/// Outcome of a successful migration.
#[derive(Debug)]
pub struct Migration {
    /// The source's last `vm.migration` read before it exited (if any was read
    /// while completed).
    pub source_status: Option<Value>,
    /// The destination's `vm.migration` once completed.
    pub dest_status: Value,
}

/// Migrates `src` to `dst` with `params` (its `destination_url` is replaced
/// by a fresh port) and waits for completion: the destination reports
/// `completed`, the source exits 0. Panics on failure.
pub fn migrate(src: &mut Vmm, dst: &Vmm, mut params: Value) -> Migration {
    let port = free_tcp_port();
    params["destination_url"] = json!(tcp_url(port));
    let recv = start_receive(dst, port);
    start_send(src, params);
    finish_migration(src, dst, Some(recv))
}

/// Waits for a started migration to complete (see [`migrate`]).
pub fn finish_migration(
    src: &mut Vmm,
    dst: &Vmm,
    recv: Option<thread::JoinHandle<Result<ApiResponse, String>>>,
) -> Migration {
    let start = Instant::now();
    let mut source_status = None;
    // Follow the source until it exits; fail fast if it reports a failure.
    loop {
        if let Some(s) = src.migration_status() {
            match mig_state(&s) {
                "completed" => source_status = Some(s),
                "failed" | "cancelled" => panic!(
                    "[{}] migration {}: {}\nsource stderr:\n{}\ndestination stderr:\n{}",
                    src.name,
                    mig_state(&s),
                    s,
                    src.stderr(),
                    dst.stderr()
                ),
                _ => {}
            }
        }
        if !src.is_running() {
            break;
        }
        if start.elapsed() > MIGRATION_TIMEOUT {
            panic!(
                "[{}] source still running {:?} after the migration started; last status {:?}",
                src.name,
                MIGRATION_TIMEOUT,
                src.migration_status()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
    src.expect_exit_ok(LONG);
    let dest_status = wait_migration_state(
        dst,
        &["completed", "failed", "cancelled"],
        MIGRATION_TIMEOUT,
    );
    assert_eq!(
        mig_state(&dest_status),
        "completed",
        "[{}] destination status: {}",
        dst.name,
        dest_status
    );
    if let Some(recv) = recv.filter(|r| r.is_finished()) {
        match recv.join().unwrap() {
            Ok((st, v)) => assert!(
                ok(st),
                "[{}] vm.receive-migration -> {} {}",
                dst.name,
                st,
                v
            ),
            Err(e) => panic!("[{}] vm.receive-migration: {}", dst.name, e),
        }
    }
    eprintln!("[{}] source's last status: {:?}", src.name, source_status);
    eprintln!("[{}] migration completed: {}", dst.name, dest_status);
    Migration {
        source_status,
        dest_status,
    }
}

/// Asserts that a completed migration status carries the documented figures.
pub fn check_completed_status(s: &Value, who: &str) {
    assert_eq!(mig_state(s), "completed", "{}: {}", who, s);
    for f in [
        "iteration",
        "total_bytes",
        "transferred_bytes",
        "remaining_bytes",
        "zero_pages",
        "throughput_bps",
        "dirty_rate_bps",
        "expected_downtime_ms",
        "total_time_ms",
        "downtime_ms",
        "setup_time_ms",
    ] {
        assert!(
            s[f].is_number(),
            "{}: field {} missing or not a number in {}",
            who,
            f,
            s
        );
    }
}

/// Mode bits of a file (`& 0o777`).
pub fn file_mode(p: &Path) -> u32 {
    fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

/// Waits for a migration on `src` to end in failure (or cancellation when
/// `states` says so) while the source keeps running; returns the status.
pub fn expect_migration_end(src: &Vmm, states: &[&str], timeout: Duration) -> Value {
    let start = Instant::now();
    let mut last = Value::Null;
    let r = poll(timeout, || {
        if !src.is_running() {
            panic!(
                "[{}] source exited although the migration should have ended in {:?}; last status {}\nstderr:\n{}",
                src.name,
                states,
                last,
                src.stderr()
            );
        }
        let s = src.migration_status()?;
        last = s.clone();
        match mig_state(&s) {
            st if states.contains(&st) => Some(s),
            "completed" => panic!(
                "[{}] migration completed but should have ended in {:?}: {}",
                src.name, states, s
            ),
            _ => None,
        }
    });
    let r = r.unwrap_or_else(|| {
        panic!(
            "[{}] migration did not end in {:?} within {:?}; last: {}",
            src.name, states, timeout, last
        )
    });
    eprintln!(
        "[{}] migration ended after {:.1?}: {}",
        src.name,
        start.elapsed(),
        r
    );
    r
}

/// Waits until a running migration on `src` has moved some bytes (or 30 s passed).
pub fn wait_transfer_started(src: &Vmm) -> Value {
    let active = wait_migration_state(src, &["active", "failed", "cancelled", "completed"], LONG);
    assert_eq!(
        mig_state(&active),
        "active",
        "[{}] migration is not active: {}",
        src.name,
        active
    );
    poll(Duration::from_secs(30), || {
        let s = src.migration_status()?;
        (s["transferred_bytes"].as_u64().unwrap_or(0) > 0 || mig_state(&s) != "active").then_some(s)
    })
    .unwrap_or(active)
}

/// Asserts the guest on `vm` runs: its API says running and it completes
/// further passes.
pub fn assert_guest_runs(vm: &Vmm, passes: u64) {
    assert_eq!(vm.state(), "running", "[{}] VM state", vm.name);
    vm.wait_more_passes(passes);
    assert_eq!(vm.serial.mismatch(), None, "[{}] MISMATCH", vm.name);
}

/// Passes the destination must complete after switch-over.
pub const DEST_PASSES: u64 = 3;

/// After a completed migration: the destination runs the guest on, passes
/// numbered on from the source's, no MISMATCH.
pub fn check_guest_moved(logs_before: &[&SerialLog], dst: &Vmm) {
    assert_eq!(dst.state(), "running", "destination VM state");
    let before: Vec<u64> = check_stream(logs_before);
    let last_before = before.last().copied().unwrap_or(0);
    poll(LONG * 2, || {
        (dst.serial.passes().len() as u64 >= DEST_PASSES).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "destination completed fewer than {} passes; serial:\n{}",
            DEST_PASSES,
            dst.serial.tail(10)
        )
    });
    let mut all: Vec<&SerialLog> = logs_before.to_vec();
    all.push(&dst.serial);
    // check_stream proves the numbering runs on without gap across hosts
    // (a line split at switch-over joins up in the concatenation).
    let passes = check_stream(&all);
    assert!(
        passes.len() as u64 >= last_before + DEST_PASSES,
        "the destination did not continue the source's passes (source's last {}, all {:?})",
        last_before,
        passes
    );
    eprintln!(
        "[{}] guest moved: passes 1..={} before, {} after switch-over, no MISMATCH",
        dst.name,
        last_before,
        passes.len() as u64 - last_before
    );
    // The destination keeps serving its API.
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);
}

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn parses_stamp_lines() {
        assert_eq!(parse_pass("stamp: pass 12 ok"), Some(12));
        assert_eq!(parse_pass("stamp: pass 12 ok\r"), Some(12));
        assert_eq!(parse_pass("stamp: pass 12"), None);
        assert_eq!(parse_pass("ss 12 ok"), None);
        assert_eq!(parse_boot("stamp: boot mem=512 region=16"), Some((512, 16)));
        assert_eq!(parse_boot("stamp: boot mem=512"), None);
        assert_eq!(complete_lines("a\nb\nc"), vec!["a", "b"]);
        assert_eq!(complete_lines(""), Vec::<String>::new());
    }

    #[test]
    fn stream_joins_lines_split_at_switch_over() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        let b = dir.join("b.log");
        fs::write(
            &a,
            "stamp: boot mem=512 region=16\nstamp: pass 1 ok\nstamp: pa",
        )
        .unwrap();
        fs::write(&b, "ss 2 ok\nstamp: pass 3 ok\n").unwrap();
        let (a, b) = (SerialLog::new(a), SerialLog::new(b));
        assert_eq!(check_stream(&[&a, &b]), vec![1, 2, 3]);
        assert_eq!(a.passes(), vec![1]);
    }

    #[test]
    #[should_panic(expected = "not consecutive")]
    fn stream_detects_a_gap() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(&a, "stamp: pass 1 ok\nstamp: pass 3 ok\n").unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }

    #[test]
    #[should_panic(expected = "MISMATCH")]
    fn stream_detects_a_mismatch() {
        let dir = TempDir::new("harness");
        let a = dir.join("a.log");
        fs::write(
            &a,
            "stamp: pass 1 ok\nstamp: MISMATCH page=3 expected=1 found=2\n",
        )
        .unwrap();
        check_stream(&[&SerialLog::new(a)]);
    }

    #[test]
    fn api_client_speaks_http() {
        let dir = TempDir::new("harness");
        let sock = dir.join("s.sock");
        let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let t = thread::spawn(move || {
            for reply in [
                "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": true}",
                "HTTP/1.1 409 Conflict\r\nContent-Type: application/json\r\n\r\n{\"error\":\"x\"}",
                "HTTP/1.1 204 No Content\r\n\r\n",
            ] {
                let (mut s, _) = l.accept().unwrap();
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                assert!(String::from_utf8_lossy(&buf[..n])
                    .starts_with("PUT /api/v1/vm.pause HTTP/1.1\r\n"));
                s.write_all(reply.as_bytes()).unwrap();
            }
        });
        assert_eq!(
            api(&sock, "PUT", "vm.pause", None),
            (200, json!({"a": true}))
        );
        assert_eq!(
            api(&sock, "PUT", "vm.pause", None),
            (409, json!({"error": "x"}))
        );
        assert_eq!(
            api(&sock, "PUT", "/api/v1/vm.pause", None),
            (204, Value::Null)
        );
        t.join().unwrap();
    }

    #[test]
    fn listening_ports_are_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(tcp_listening(port));
        drop(l);
        assert!(!tcp_listening(port));
    }
}
