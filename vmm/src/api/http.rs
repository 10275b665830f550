//! A small, bounded HTTP/1.1 request reader and response writer.
//!
//! One request per connection (`Connection: close`). Headers are limited to
//! [`MAX_HEADER_BYTES`], bodies to [`MAX_BODY_BYTES`]; chunked bodies are
//! refused. The whole request must arrive by one deadline
//! ([`DeadlineReader`]), so a client that trickles bytes cannot hold a
//! connection slot for longer than that. Nothing here panics on any input.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::errors::ErrorKind;

/// Largest request head (request line + headers) accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 64;

/// A parsed request.
///
/// Invariant: `body.len() <= MAX_BODY_BYTES`; `path` has no query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, as sent (`GET`, `PUT`, ...).
    pub method: String,
    /// Path without query string.
    pub path: String,
    /// The query string (after `?`, before `#`; empty if none).
    pub query: String,
    /// Body bytes.
    pub body: Vec<u8>,
}

/// Why a request could not be read.
///
/// Invariant: `kind` is the error to answer with (`None`: the peer is gone,
/// answer nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The error to answer with, `None` for no answer.
    pub kind: Option<ErrorKind>,
    /// Message for the `error` field.
    pub message: String,
}

impl HttpError {
    /// The status to answer with, 0 for none.
    pub fn status(&self) -> u16 {
        self.kind.map_or(0, ErrorKind::status)
    }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> HttpError {
    HttpError {
        kind: Some(kind),
        message: message.into(),
    }
}

/// The peer went away: nothing to answer.
fn gone(message: &str) -> HttpError {
    HttpError {
        kind: None,
        message: message.into(),
    }
}

/// Result of parsing a request head.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// More bytes are needed.
    Partial,
    /// Complete: method, path, body length, head length in bytes.
    Complete {
        /// Method.
        method: String,
        /// Path without query.
        path: String,
        /// Query string, empty if none.
        query: String,
        /// Content-Length (0 if absent).
        content_length: usize,
        /// Bytes of the head, including the blank line.
        head_len: usize,
    },
}

/// Parses a request head out of `buf`.
pub fn parse_head(buf: &[u8]) -> Result<Head, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(buf).map_err(|e| {
        err(
            ErrorKind::BadRequest,
            format!("malformed HTTP request: {e}"),
        )
    })?;
    let head_len = match status {
        httparse::Status::Partial => return Ok(Head::Partial),
        httparse::Status::Complete(n) => n,
    };
    let method = req.method.unwrap_or("").to_string();
    let raw_path = req.path.unwrap_or("");
    let no_frag = raw_path.split('#').next().unwrap_or("");
    let (path, query) = match no_frag.split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (no_frag.to_string(), String::new()),
    };
    let mut content_length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| err(ErrorKind::BadRequest, "invalid Content-Length"))?;
            if v > MAX_BODY_BYTES as u64 {
                return Err(err(
                    ErrorKind::PayloadTooLarge,
                    format!("request body of {v} bytes exceeds the limit of {MAX_BODY_BYTES}"),
                ));
            }
            content_length = v as usize;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.trim() != "identity" {
                return Err(err(
                    ErrorKind::LengthRequired,
                    "chunked request bodies are not supported; send Content-Length",
                ));
            }
        }
    }
    Ok(Head::Complete {
        method,
        path,
        query,
        content_length,
        head_len,
    })
}

/// A UNIX stream read against one deadline for all reads together: each
/// read waits at most until the deadline, and once it has passed every read
/// fails with [`std::io::ErrorKind::TimedOut`] (which [`read_request`]
/// answers with 408), however the client spaces its bytes.
///
/// Invariant: no read returns after `deadline` plus one scheduling delay.
pub struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl<'a> DeadlineReader<'a> {
    /// Reads of `stream` that must all be done within `limit` from now.
    pub fn new(stream: &'a UnixStream, limit: Duration) -> Self {
        DeadlineReader {
            stream,
            deadline: Instant::now() + limit,
        }
    }
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

/// Reads one request from `stream` (a [`DeadlineReader`] bounds the whole
/// request; a plain stream should at least have a read timeout).
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(if buf.is_empty() {
                    gone("connection closed")
                } else {
                    err(
                        ErrorKind::BadRequest,
                        "connection closed in the middle of the request",
                    )
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return Err(err(
                    ErrorKind::RequestTimeout,
                    "timed out reading the request",
                ))
            }
            Err(_) => return Err(gone("connection error")),
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf)? {
            Head::Partial => {
                if buf.len() > MAX_HEADER_BYTES {
                    return Err(err(ErrorKind::HeadersTooLarge, "request header too large"));
                }
            }
            Head::Complete {
                method,
                path,
                query,
                content_length,
                head_len,
            } => {
                if head_len > MAX_HEADER_BYTES {
                    return Err(err(ErrorKind::HeadersTooLarge, "request header too large"));
                }
                let mut body = buf.split_off(head_len);
                if body.len() > content_length {
                    body.truncate(content_length);
                }
                while body.len() < content_length {
                    let want = (content_length - body.len()).min(chunk.len());
                    match stream.read(&mut chunk[..want]) {
                        Ok(0) => {
                            return Err(err(
                                ErrorKind::BadRequest,
                                "connection closed before the end of the body",
                            ))
                        }
                        Ok(n) => body.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut =>
                        {
                            return Err(err(
                                ErrorKind::RequestTimeout,
                                "timed out reading the request body",
                            ))
                        }
                        Err(_) => return Err(gone("connection error")),
                    }
                }
                return Ok(Request {
                    method,
                    path,
                    query,
                    body,
                });
            }
        }
    }
}

/// Reason phrase of a status code.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Writes a response with a JSON body (none for 204) and closes the exchange.
pub fn write_response(
    stream: &mut impl Write,
    status: u16,
    body: Option<&serde_json::Value>,
    extra_headers: &[(&str, &str)],
) -> std::io::Result<()> {
    let body = match body {
        Some(b) if status != 204 => {
            let mut s = serde_json::to_string(b).unwrap_or_else(|_| "{}".into());
            s.push('\n');
            s
        }
        _ => String::new(),
    };
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nServer: ferry\r\nConnection: close\r\n",
        reason(status)
    );
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in extra_headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read(s: &[u8]) -> Result<Request, HttpError> {
        read_request(&mut Cursor::new(s.to_vec()))
    }

    #[test]
    fn simple_requests() {
        let r = read(b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/api/v1/vmm.ping");
        assert!(r.body.is_empty());
        let r = read(b"PUT /api/v1/vm.pause?x=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(r.path, "/api/v1/vm.pause");
        assert_eq!(r.body, b"{}");
        let r = read(b"PUT /a HTTP/1.0\r\ncontent-length: 3\r\n\r\nabcdef").unwrap();
        assert_eq!(r.body, b"abc");
    }

    #[test]
    fn malformed_requests() {
        assert_eq!(read(b"").unwrap_err().status(), 0);
        assert_eq!(read(b"GET /x HTT").unwrap_err().status(), 400);
        assert_eq!(
            read(b"\x00\x01\x02 garbage\r\n\r\n").unwrap_err().status(),
            400
        );
        assert_eq!(
            read(b"GET /x HTTP/1.1\r\nBad Header\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            read(b"PUT /x HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
                .unwrap_err()
                .status(),
            400
        );
        assert_eq!(
            read(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
                .unwrap_err()
                .status(),
            400,
            "body cut short"
        );
        assert_eq!(
            read(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n")
                .unwrap_err()
                .status(),
            413
        );
        assert_eq!(
            read(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .unwrap_err()
                .status(),
            411
        );
    }

    /// Each reading error has its kind, whose status it answers with.
    #[test]
    fn reading_errors_have_their_kinds() {
        use ErrorKind::*;
        let mut big = b"GET /x HTTP/1.1\r\nX-Long: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES + 1));
        let cases: [(&[u8], Option<ErrorKind>); 6] = [
            (b"", None),
            (b"GET /x HTT", Some(BadRequest)),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                Some(BadRequest),
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
                Some(PayloadTooLarge),
            ),
            (
                b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Some(LengthRequired),
            ),
            (&big, Some(HeadersTooLarge)),
        ];
        for (req, kind) in cases {
            let e = read(req).unwrap_err();
            assert_eq!(e.kind, kind, "{e:?}");
            assert_eq!(e.status(), kind.map_or(0, ErrorKind::status));
        }
        // Exactly the limit is accepted.
        let body = vec![b' '; MAX_BODY_BYTES];
        let mut req =
            format!("PUT /x HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n").into_bytes();
        req.extend(&body);
        assert_eq!(read(&req).unwrap().body.len(), MAX_BODY_BYTES);
    }

    #[test]
    fn oversized_head() {
        let mut big = b"GET /x HTTP/1.1\r\nX-Long: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_BYTES * 2));
        assert_eq!(read(&big).unwrap_err().status(), 431);
        let mut many = b"GET /x HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 5) {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(read(&many).unwrap_err().status(), 400);
    }

    /// A client that sends one byte at a time, never finishing its request,
    /// gets 408 once the deadline of the whole request has passed, although
    /// no single read ever waits long.
    #[test]
    fn trickled_request_times_out_as_a_whole() {
        let (server, client) = UnixStream::pair().unwrap();
        let trickler = std::thread::spawn(move || {
            let mut c = &client;
            let _ = c.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ");
            // Until the server gives up (the write then fails) or a bound far
            // beyond the deadline (then the test fails below).
            for _ in 0..600 {
                if c.write_all(b"a").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        let e = read_request(&mut DeadlineReader::new(
            &server,
            Duration::from_millis(500),
        ))
        .unwrap_err();
        assert_eq!(e.status(), 408, "{e:?}");
        drop(server);
        assert!(trickler.join().unwrap(), "the trickler was never cut off");
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        write_response(&mut out, 200, Some(&serde_json::json!({"a": 1})), &[]).unwrap();
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(s.contains("Content-Length: 8\r\n"));
        assert!(s.ends_with("{\"a\":1}\n"));
        let mut out = Vec::new();
        write_response(&mut out, 204, None, &[]).unwrap();
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("Content-Length: 0"));
    }
}
