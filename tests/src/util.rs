//! Small utilities of the harness: temp dirs, polling, random bytes, TCP
//! ports, file modes.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
    /// Removes the directory, unless `FERRY_TEST_KEEP` is set (then its
    /// path is printed, for reading the VMMs' logs after a run).
    fn drop(&mut self) {
        if std::env::var_os("FERRY_TEST_KEEP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
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
    tcp_listening_in("/proc/net", port)
}

/// Whether something listens on TCP `port` in the network namespace of
/// process `pid` (its `/proc/PID/net`).
pub fn tcp_listening_of(pid: u32, port: u16) -> bool {
    tcp_listening_in(&format!("/proc/{pid}/net"), port)
}

fn tcp_listening_in(net: &str, port: u16) -> bool {
    let needle = format!(":{:04X}", port);
    [format!("{net}/tcp"), format!("{net}/tcp6")]
        .iter()
        .any(|f| {
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

/// Mode bits of a file (`& 0o777`).
pub fn file_mode(p: &Path) -> u32 {
    fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_ports_are_seen() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(tcp_listening(port));
        drop(l);
        // Another test may bind the same port meanwhile: give it a few
        // tries before calling the port still ours.
        let gone = (0..20).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            !tcp_listening(port)
        });
        assert!(
            gone,
            "port {port} still listening after the listener closed"
        );
    }
}
