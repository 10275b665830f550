//! A tiny HTTP/1.1 client over a UNIX socket, for `ferry-remote` and the
//! integration-test harness (`ferry-tests`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Largest response accepted.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Errors talking to the API.
///
/// Invariant: the message names the socket or what was malformed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to the API socket {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("API socket I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The answer is not HTTP.
    #[error("malformed API response: {0}")]
    Malformed(String),
}

/// An API answer.
///
/// Invariant: `body` is the response body as text (lossy UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Body text.
    pub body: String,
}

impl ApiResponse {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The `error` field of a JSON error body, or the body itself.
    pub fn error_message(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| {
                let b = self.body.trim();
                if b.is_empty() {
                    format!("HTTP status {}", self.status)
                } else {
                    b.to_string()
                }
            })
    }
}

/// Parses a complete HTTP response (the connection was closed after it).
pub fn parse_response(bytes: &[u8]) -> Result<ApiResponse, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(bytes) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::Malformed("incomplete response head".into()))
        }
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = resp
        .code
        .ok_or_else(|| ClientError::Malformed("no status code".into()))?;
    let mut body = &bytes[head_len..];
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n: usize = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| ClientError::Malformed("bad Content-Length".into()))?;
            if body.len() < n {
                return Err(ClientError::Malformed("response body cut short".into()));
            }
            body = &body[..n];
        }
    }
    Ok(ApiResponse {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

/// Sends one request for `/api/v1/<endpoint>` and reads the answer.
pub fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ApiResponse, ClientError> {
    request_target(
        socket,
        method,
        &format!("/api/v1/{endpoint}"),
        body,
        timeout,
    )
}

/// Sends one request for the request target `target` (an absolute path such
/// as `/api/v1/vm.info`, sent as is) and reads the answer; `timeout` bounds
/// every read and write.
pub fn request_target(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Result<ApiResponse, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())?;
    let mut buf = Vec::new();
    Read::by_ref(&mut s)
        .take(MAX_RESPONSE_BYTES as u64)
        .read_to_end(&mut buf)?;
    parse_response(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "{\"a\":1}");
        assert!(r.is_success());
        let r = parse_response(
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 15\r\n\r\n{\"error\":\"no\"}\n",
        )
        .unwrap();
        assert_eq!(r.error_message(), "no");
        assert!(!r.is_success());
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(r.body, "");
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"").is_err());
    }
}
