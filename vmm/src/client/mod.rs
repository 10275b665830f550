//! A tiny HTTP/1.1 client over a UNIX socket, for `ferry-remote` and the
//! integration-test harness (`ferry-tests`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub mod status;

/// Largest response accepted.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Errors talking to the API.
///
/// Invariant: the message names the socket or what was malformed, and
/// holds the OS error once (it is not repeated as a `source`, so that a
/// chain printed with `{:#}` says it once).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed.
    #[error("cannot connect to the API socket {path}: {os}")]
    Connect {
        /// Socket path.
        path: String,
        /// OS error.
        os: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("API socket {path}: {os}")]
    Io {
        /// Socket path.
        path: String,
        /// OS error.
        os: std::io::Error,
    },
    /// The answer is not HTTP.
    #[error("malformed API response: {0}")]
    Malformed(String),
    /// The VMM answered with an error status.
    #[error("{0}")]
    Api(ApiError),
    /// A success answer whose body is not what the request returns.
    #[error("unreadable answer to {endpoint}: {reason}")]
    Body {
        /// The endpoint asked.
        endpoint: String,
        /// What did not parse.
        reason: String,
    },
}

/// An error answer of the API: `{"error": "...", "kind": "..."}` (`kind`
/// may be absent from an older server, and the body may not be JSON at
/// all).
///
/// Invariant: `message` is never empty (the HTTP status stands in for a
/// missing one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// The server's `error`, or the body text.
    pub message: String,
    /// The server's `kind`, when given.
    pub kind: Option<String>,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            Some(k) => write!(f, "{} (kind: {k}, HTTP {})", self.message, self.status),
            None => write!(f, "{} (HTTP {})", self.message, self.status),
        }
    }
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

    /// The `kind` field of a JSON error body, when there is one.
    pub fn error_kind(&self) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(str::to_string))
    }

    /// This answer as an [`ApiError`] (meant for a non-2xx status).
    pub fn api_error(&self) -> ApiError {
        ApiError {
            status: self.status,
            message: self.error_message(),
            kind: self.error_kind(),
        }
    }

    /// The answer itself when 2xx, its [`ApiError`] otherwise.
    pub fn checked(self) -> Result<ApiResponse, ClientError> {
        if self.is_success() {
            Ok(self)
        } else {
            Err(ClientError::Api(self.api_error()))
        }
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
    let path = || socket.display().to_string();
    let io = |os| ClientError::Io { path: path(), os };
    let mut s =
        UnixStream::connect(socket).map_err(|os| ClientError::Connect { path: path(), os })?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
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
    s.write_all(req.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    Read::by_ref(&mut s)
        .take(MAX_RESPONSE_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(io)?;
    parse_response(&buf)
}

/// A client of one API socket, with typed requests: bodies are serialized
/// from the request types (e.g. [`migration::api::SendParams`]) and answers
/// parsed into the reply types.
///
/// Invariant: `timeout` bounds every read and write of one request.
#[derive(Debug, Clone)]
pub struct Client {
    /// The API socket.
    pub socket: std::path::PathBuf,
    /// Per-request I/O timeout.
    pub timeout: Duration,
}

impl Client {
    /// A client of `socket`.
    pub fn new(socket: impl Into<std::path::PathBuf>, timeout: Duration) -> Client {
        Client {
            socket: socket.into(),
            timeout,
        }
    }

    /// `method` on `/api/v1/<endpoint>` with `body` serialized as JSON;
    /// an error status becomes [`ClientError::Api`].
    pub fn call<B: serde::Serialize>(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<&B>,
    ) -> Result<ApiResponse, ClientError> {
        let body = body
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| ClientError::Body {
                endpoint: endpoint.to_string(),
                reason: format!("request not serializable: {e}"),
            })?;
        request(
            &self.socket,
            method,
            endpoint,
            body.as_deref(),
            self.timeout,
        )?
        .checked()
    }

    /// `method` on `/api/v1/<endpoint>` without a body.
    pub fn call_empty(&self, method: &str, endpoint: &str) -> Result<ApiResponse, ClientError> {
        self.call::<()>(method, endpoint, None)
    }

    /// `GET <endpoint>`, the body parsed as `T`.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        endpoint: &str,
    ) -> Result<T, ClientError> {
        let r = self.call_empty("GET", endpoint)?;
        serde_json::from_str(&r.body).map_err(|e| ClientError::Body {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })
    }
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

    #[test]
    fn error_kinds() {
        let r = parse_response(
            b"HTTP/1.1 409 Conflict\r\nContent-Length: 34\r\n\r\n{\"error\":\"busy\",\"kind\":\"conflict\"}",
        )
        .unwrap();
        let e = r.clone().checked().unwrap_err().to_string();
        assert_eq!(e, "busy (kind: conflict, HTTP 409)");
        // An older server: no kind.
        let r = parse_response(b"HTTP/1.1 400 Bad\r\nContent-Length: 14\r\n\r\n{\"error\":\"no\"}")
            .unwrap();
        assert_eq!(r.api_error().to_string(), "no (HTTP 400)");
        // Not JSON at all.
        let r = parse_response(b"HTTP/1.1 500 Oops\r\nContent-Length: 4\r\n\r\nboom").unwrap();
        assert_eq!(r.api_error().to_string(), "boom (HTTP 500)");
    }

    #[test]
    fn connect_error_says_the_os_error_once() {
        let e = request(
            Path::new("/nonexistent/ferry.sock"),
            "GET",
            "vmm.ping",
            None,
            Duration::from_secs(1),
        )
        .unwrap_err();
        let chain = format!("{:#}", anyhow::Error::from(e));
        assert!(chain.contains("/nonexistent/ferry.sock"), "{chain}");
        assert_eq!(chain.matches("No such file").count(), 1, "{chain}");
    }
}
