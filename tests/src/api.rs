//! The HTTP API of a running `ferry`, through the VMM's own client
//! ([`vmm::client`]): free functions on a socket path, and the API methods
//! of [`Vmm`].

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proc::Vmm;
use crate::LONG;

/// An HTTP response: status and body (JSON, `Null` if empty, a JSON string if
/// the body is not JSON).
pub type ApiResponse = (u16, Value);

/// Read and write timeout of [`try_api`].
const API_TIMEOUT: Duration = Duration::from_secs(120);

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
        API_TIMEOUT,
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
    let target = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/api/v1/{path}")
    };
    let resp = vmm::client::request_target(sock, method, &target, body, timeout)
        .map_err(|e| e.to_string())?;
    let value = if resp.body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&resp.body).unwrap_or_else(|_| Value::String(resp.body.clone()))
    };
    Ok((resp.status, value))
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

impl Vmm {
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

    /// The events kept by the VMM (`GET vm.events`, one long poll of up to
    /// 1 s), oldest first; empty when the API cannot be reached.
    pub fn events(&self) -> Vec<Value> {
        let Ok(r) = vmm::client::request_target(
            &self.sock,
            "GET",
            "/api/v1/vm.events?since=1&wait_s=1",
            None,
            Duration::from_secs(10),
        ) else {
            return Vec::new();
        };
        r.body
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits up to `timeout` for an event named `name`; returns it.
    pub fn wait_event(&self, name: &str, timeout: Duration) -> Option<Value> {
        crate::util::poll(timeout, || {
            self.events()
                .into_iter()
                .find(|e| e["event"].as_str() == Some(name))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use serde_json::json;

    use super::*;
    use crate::util::TempDir;

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
                "HTTP/1.1 200 OK\r\n\r\nnot json",
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
        assert_eq!(
            api(&sock, "PUT", "vm.pause", None),
            (200, Value::String("not json".into()))
        );
        t.join().unwrap();
        assert!(try_api(&dir.join("nobody.sock"), "GET", "vmm.ping", None).is_err());
    }
}
