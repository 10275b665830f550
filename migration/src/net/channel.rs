//! A migration connection: plain TCP, or TCP carrying a mutual-TLS session.
//!
//! Both kinds offer the same small surface to the I/O loops in `io`: a
//! `read` that times out after the socket's poll interval, a `write_some`
//! that accepts part of a buffer, and a `flush_some` that pushes buffered
//! ciphertext out. The loops add abort checks and stall detection.

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::Instant;

use super::lock;
use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::tls;

/// Raw bytes read from the socket per call while TLS is on.
const RX_CHUNK: usize = 256 << 10;

/// One migration connection.
///
/// Invariant: with TLS, the rustls session is only touched under its mutex,
/// and socket reads (which may block for a poll interval) happen without
/// holding it, so a writer on another thread (the keepalive) never waits
/// for a read. At most one thread reads a channel at a time.
pub struct Channel {
    tcp: TcpStream,
    tls: Option<Tls>,
}

/// A TLS failure after the handshake (an alert from the peer, a bad
/// record), carried inside an `io::Error`; the text is already explained
/// (see [`tls::describe`]).
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

struct Tls {
    /// This side is the source (for error texts).
    client: bool,
    conn: Mutex<rustls::Connection>,
    /// Ciphertext read from the socket and not yet handed to rustls.
    rx: Mutex<RxBuf>,
}

#[derive(Default)]
struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    eof: bool,
}

impl RxBuf {
    fn pending(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum TlsFailure {
    /// rustls refused (certificate, alert, protocol): the text explains.
    Refused(String),
    /// The peer is not speaking TLS; `first` are the bytes it sent.
    NotTls(Vec<u8>),
    /// The handshake deadline expired.
    Timeout,
    /// The migration stopped or the socket failed.
    Io(io::Error),
}

impl Channel {
    /// A plain TCP channel.
    pub fn plain(tcp: TcpStream) -> Channel {
        Channel { tcp, tls: None }
    }

    /// Runs the TLS handshake of `conn` over `tcp` (blocking with poll
    /// timeouts) until done, `deadline`, or `stop`. `client`: this side
    /// is the source (for error texts).
    pub fn handshake(
        tcp: TcpStream,
        mut conn: rustls::Connection,
        deadline: Instant,
        stop: &CancelToken,
        client: bool,
    ) -> Result<Channel, TlsFailure> {
        let mut first = true;
        while conn.is_handshaking() {
            if stop.is_cancelled() {
                return Err(TlsFailure::Io(io::Error::other("stopped")));
            }
            if Instant::now() >= deadline {
                return Err(TlsFailure::Timeout);
            }
            while conn.wants_write() {
                match conn.write_tls(&mut &tcp) {
                    Ok(_) => {}
                    Err(e) if is_timeout(&e) => break,
                    Err(e) => return Err(TlsFailure::Io(e)),
                }
            }
            if !conn.is_handshaking() {
                break;
            }
            if !conn.wants_read() {
                continue;
            }
            let mut buf = [0u8; 16 << 10];
            let n = match (&tcp).read(&mut buf) {
                Ok(0) => {
                    return Err(TlsFailure::Io(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    )))
                }
                Ok(n) => n,
                Err(e) if is_timeout(&e) => continue,
                Err(e) => return Err(TlsFailure::Io(e)),
            };
            // A TLS record starts with its content type (20..=23).
            if first && !(20..=23).contains(&buf[0]) {
                return Err(TlsFailure::NotTls(buf[..n].to_vec()));
            }
            first = false;
            let mut rd = &buf[..n];
            while !rd.is_empty() {
                if let Err(e) = conn.read_tls(&mut rd) {
                    return Err(TlsFailure::Io(e));
                }
                if let Err(e) = conn.process_new_packets() {
                    // Let the peer see our alert before we close.
                    let _ = conn.write_tls(&mut &tcp);
                    return Err(TlsFailure::Refused(tls::describe(&e, client)));
                }
            }
        }
        // Flush the last handshake flight (the client's Finished).
        while conn.wants_write() {
            match conn.write_tls(&mut &tcp) {
                Ok(_) => {}
                Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
                Err(e) => return Err(TlsFailure::Io(e)),
            }
        }
        Ok(Channel {
            tcp,
            tls: Some(Tls {
                client,
                conn: Mutex::new(conn),
                rx: Mutex::new(RxBuf::default()),
            }),
        })
    }

    /// The TCP socket underneath (options, shutdown, tests).
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    /// Whether TLS protects this channel.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The DER of the peer's verified leaf certificate (TLS only).
    pub fn peer_leaf(&self) -> Option<Vec<u8>> {
        let t = self.tls.as_ref()?;
        let c = lock(&t.conn);
        c.peer_certificates()
            .and_then(|certs| certs.first())
            .map(|c| c.as_ref().to_vec())
    }

    /// Reads up to `buf.len()` bytes: `Ok(0)` at end of stream, a timeout
    /// error after one poll interval without data.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return (&self.tcp).read(buf);
        };
        let mut rx = lock(&t.rx);
        loop {
            {
                let mut c = lock(&t.conn);
                // Hand buffered ciphertext to rustls while it takes it.
                while !rx.pending().is_empty() {
                    let mut rd = rx.pending();
                    let before = rd.len();
                    match c.read_tls(&mut rd) {
                        Ok(_) => {}
                        // Its plaintext buffer is full: drain it first.
                        Err(_) => break,
                    }
                    let used = before - rd.len();
                    rx.start += used;
                    c.process_new_packets().map_err(|e| {
                        io::Error::new(
                            ErrorKind::InvalidData,
                            TlsError(tls::describe(&e, t.client)),
                        )
                    })?;
                    if used == 0 {
                        break;
                    }
                }
                if rx.eof && rx.pending().is_empty() {
                    let mut empty: &[u8] = &[];
                    let _ = c.read_tls(&mut empty);
                }
                match c.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    // No close_notify before the TCP close: treat it as the
                    // end of the stream, as on a plain connection (frames
                    // are length-delimited, and a cut stream fails there).
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                    Err(e) => return Err(e),
                }
                if c.wants_write() {
                    let _ = c.write_tls(&mut &self.tcp);
                }
            }
            if rx.eof {
                return Ok(0);
            }
            // Need more ciphertext: read without holding the session.
            rx.buf.resize(RX_CHUNK, 0);
            rx.start = RX_CHUNK;
            let r = (&self.tcp).read(&mut rx.buf);
            match r {
                Ok(0) => {
                    rx.buf.clear();
                    rx.start = 0;
                    rx.eof = true;
                }
                Ok(n) => {
                    rx.buf.truncate(n);
                    rx.start = 0;
                }
                Err(e) => {
                    rx.buf.clear();
                    rx.start = 0;
                    return Err(e);
                }
            }
        }
    }

    /// Accepts some of `buf` for sending: plain TCP writes it (a timeout
    /// error when nothing moved in one poll interval); TLS encrypts as much
    /// as its buffer takes and pushes ciphertext out. `Ok(0)` only for an
    /// empty `buf`.
    pub fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return match (&self.tcp).write(buf) {
                Ok(0) if !buf.is_empty() => Err(ErrorKind::WriteZero.into()),
                r => r,
            };
        };
        let mut c = lock(&t.conn);
        let n = c.writer().write(buf)?;
        // Push out what is queued; a full socket ends this round.
        let pushed = Self::push(&mut c, &self.tcp);
        match (n, pushed) {
            (0, Err(e)) if !buf.is_empty() => Err(e),
            (0, Ok(())) if !buf.is_empty() => Err(ErrorKind::WouldBlock.into()),
            (_, Err(e)) if !is_timeout(&e) => Err(e),
            (n, _) => Ok(n),
        }
    }

    /// Pushes buffered ciphertext out: `Ok(true)` when nothing is left
    /// (always for plain TCP), `Ok(false)` or a timeout error when the
    /// socket is full.
    pub fn flush_some(&self) -> io::Result<bool> {
        let Some(t) = &self.tls else {
            return Ok(true);
        };
        let mut c = lock(&t.conn);
        match Self::push(&mut c, &self.tcp) {
            Ok(()) => Ok(!c.wants_write()),
            Err(e) if is_timeout(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn push(c: &mut rustls::Connection, tcp: &TcpStream) -> io::Result<()> {
        while c.wants_write() {
            match c.write_tls(&mut &*tcp) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Announces the end of what this side sends (TLS close_notify, best
    /// effort) and shuts down the TCP write side.
    pub fn close_write(&self) {
        if let Some(t) = &self.tls {
            let mut c = lock(&t.conn);
            c.send_close_notify();
            let _ = Self::push(&mut c, &self.tcp);
        }
        let _ = self.tcp.shutdown(std::net::Shutdown::Write);
    }
}

impl MigrationError {
    /// Turns a handshake failure into the migration's error; `what` says
    /// which connection.
    pub(crate) fn tls_failure(f: TlsFailure, what: &str) -> MigrationError {
        match f {
            TlsFailure::Refused(m) => MigrationError::Tls(format!("{m} ({what})")),
            TlsFailure::NotTls(_) => MigrationError::Tls(format!(
                "the peer does not speak TLS ({what}); is it set up with \"tls\": false?"
            )),
            TlsFailure::Timeout => {
                MigrationError::Timeout(format!("TLS handshake not done in time ({what})"))
            }
            TlsFailure::Io(e) => MigrationError::io(format!("TLS handshake ({what})"), e),
        }
    }
}
