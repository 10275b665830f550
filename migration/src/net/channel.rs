//! A migration connection: plain TCP, or TCP carrying a mutual-TLS session.
//!
//! rustls runs the TLS 1.3 handshake; the records after it are sealed and
//! opened by [`super::record`] in this channel's own buffers (kTLS style).
//! Both kinds offer the same small surface to the I/O loops in `io`: a
//! `read` (or `read_with`, which lends the plaintext in place) that times
//! out after the socket's poll interval, a `write_some` that accepts part
//! of a buffer, and a `flush_some` that pushes sealed records out. The
//! loops add abort checks and stall detection.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::record::{self, Keys, RecordError, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER};
use super::{drain, is_timeout, lock, Ctl, Sock, ZcCounters, ZeroCopy, POLL_INTERVAL};
use crate::error::MigrationError;
use crate::guest_mem::{Gather, IoVecs};
use crate::tls;
use crate::wire;

/// Receive buffer of a TLS channel (whole records are opened in it).
const RX_BUFFER: usize = 256 << 10;
/// Sealed bytes a TLS channel queues before `write_some` stops accepting.
const TX_HIGH: usize = 256 << 10;
/// Capacity of a TLS send buffer: [`TX_HIGH`] plus one record, so that
/// sealing below [`TX_HIGH`] never reallocates it.
const TX_CAP: usize = TX_HIGH + record::MAX_RECORD;
/// Spare ciphertext buffers a zero-copy TLS channel keeps for reuse.
const TX_SPARE: usize = 4;
/// Largest handshake record accepted (TLS allows 2^14 + 2048 of payload).
const MAX_HANDSHAKE_RECORD: usize = HEADER + (1 << 14) + 2048;

/// One migration connection.
///
/// Invariant: with TLS, the send and receive directions each own their key
/// and buffer behind their own mutex, so a writer (the keepalive) never
/// waits for a reader blocked on the socket. At most one thread reads a
/// channel at a time.
///
/// `version` is the protocol version stamped on every frame written here:
/// [`wire::VERSION`] until the handshake settles an older one.
pub struct Channel {
    tcp: Sock,
    tls: Option<Tls>,
    /// Plain TCP with zero-copy on: RAM pages go out with `MSG_ZEROCOPY`
    /// (with TLS the state lives in [`Tx`] instead).
    zc: Mutex<Option<ZeroCopy>>,
    version: std::sync::atomic::AtomicU16,
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

fn tls_io(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidData, TlsError(msg))
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> io::Error {
        tls_io(e.to_string())
    }
}

struct Tls {
    /// This side is the source (for error texts).
    client: bool,
    /// The peer's verified leaf certificate (DER).
    leaf: Option<Vec<u8>>,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
}

/// The send direction: sealed records waiting for the socket.
///
/// Invariant: `buf[off..]` are sealed bytes not yet written; the queue is
/// compacted before records are added (without zero-copy), so it never
/// holds more than [`TX_HIGH`] plus one record. With zero-copy (`zc`), no
/// byte of `buf` that was handed to the kernel is moved, changed or freed
/// before its send completed: `buf` is never compacted nor reallocated
/// once sending from it began (records are only appended within its
/// capacity), a fully sent `buf` moves to `zc.inflight` until its last
/// send completed, and buffers still in flight when the channel goes are
/// leaked rather than freed (bounded by the zero-copy window).
struct Tx {
    keys: Keys,
    buf: Vec<u8>,
    off: usize,
    zc: Option<ZcTx>,
}

/// The zero-copy part of a TLS send direction (see [`Tx`]).
struct ZcTx {
    z: ZeroCopy,
    /// Number of the last send from `Tx::buf`, if any began.
    last: Option<u32>,
    /// Fully sent buffers and the number of their last send.
    inflight: VecDeque<(Vec<u8>, u32)>,
    spare: Vec<Vec<u8>>,
}

impl ZcTx {
    /// Takes back the in-flight buffers whose sends all completed.
    fn recycle(&mut self) {
        while let Some((_, id)) = self.inflight.front() {
            if !self.z.done_through(*id) {
                break;
            }
            if let Some((mut b, _)) = self.inflight.pop_front() {
                if self.spare.len() < TX_SPARE {
                    b.clear();
                    self.spare.push(b);
                }
            }
        }
    }
}

impl Tx {
    fn compact(&mut self) {
        if self.off > 0 && self.zc.is_none() {
            self.buf.drain(..self.off);
            self.off = 0;
        }
    }

    /// Whether one more record can be sealed into `buf` (below
    /// [`TX_HIGH`]; with zero-copy also without reallocating it).
    fn room(&self) -> bool {
        self.buf.len() < TX_HIGH
            && (self.zc.is_none() || self.buf.capacity() - self.buf.len() >= record::MAX_RECORD)
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        let Some(zc) = &mut self.zc else {
            return;
        };
        let _ = zc.z.reap();
        zc.recycle();
        // The kernel may still read these (retransmits, queued data after
        // an abort): leak them rather than let the allocator reuse them.
        let mut n = zc.inflight.len();
        for (b, _) in zc.inflight.drain(..) {
            std::mem::forget(b);
        }
        if zc.last.is_some() && zc.z.in_flight() > 0 {
            std::mem::forget(std::mem::take(&mut self.buf));
            n += 1;
        }
        if n > 0 {
            log::debug!("TLS zero-copy: {n} ciphertext buffers still in flight at close, kept");
        }
    }
}

/// After a failed handshake: sends rustls' alert, closes our write side and
/// drains briefly, so that the peer reads the alert instead of a reset.
fn send_alert_and_close(conn: &mut rustls::Connection, tcp: &Sock) {
    let _ = conn.write_tls(&mut &*tcp);
    let _ = tcp.shutdown(std::net::Shutdown::Write);
    drain(tcp, std::time::Duration::from_millis(500), &|| false);
}

/// The receive direction.
///
/// Invariant: `buf[start..end]` are received bytes not yet opened;
/// `plain` is the unread plaintext of the last opened record (inside
/// `buf[..start]`).
struct Rx {
    keys: Keys,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    plain: Range<usize>,
    eof: bool,
    closed: bool,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.tcp.peer_addr().ok())
            .field("tls", &self.tls.is_some())
            .finish()
    }
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

/// Reads from `tcp` until `pending` holds at least `want` bytes.
fn fill(
    tcp: &Sock,
    pending: &mut Vec<u8>,
    want: usize,
    deadline: Instant,
    stopped: &dyn Fn() -> bool,
) -> Result<(), TlsFailure> {
    let mut buf = [0u8; 16 << 10];
    while pending.len() < want {
        if stopped() {
            return Err(TlsFailure::Io(io::Error::other("stopped")));
        }
        if Instant::now() >= deadline {
            return Err(TlsFailure::Timeout);
        }
        match (&*tcp).read(&mut buf) {
            Ok(0) => {
                return Err(TlsFailure::Io(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    "the peer closed the connection during the TLS handshake",
                )))
            }
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(TlsFailure::Io(e)),
        }
    }
    Ok(())
}

fn flush_handshake(
    conn: &mut rustls::Connection,
    tcp: &Sock,
    deadline: Instant,
) -> Result<(), TlsFailure> {
    while conn.wants_write() {
        match conn.write_tls(&mut &*tcp) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
            Err(e) if is_timeout(&e) => return Err(TlsFailure::Timeout),
            Err(e) => return Err(TlsFailure::Io(e)),
        }
    }
    Ok(())
}

impl Channel {
    /// A plain TCP channel.
    pub fn plain(tcp: Sock) -> Channel {
        Channel {
            tcp,
            tls: None,
            zc: Mutex::new(None),
            version: wire::VERSION.into(),
        }
    }

    /// Runs the TLS handshake of `conn` over `tcp` (blocking with poll
    /// timeouts) until done, `deadline`, or `stopped()`, then takes over the
    /// record layer with the session's keys. `client`: this side is the
    /// source (for error texts). Records are handed to rustls one at a
    /// time, so no byte after the handshake is consumed by it.
    pub fn handshake(
        tcp: Sock,
        mut conn: rustls::Connection,
        deadline: Instant,
        stopped: &dyn Fn() -> bool,
        client: bool,
    ) -> Result<Channel, TlsFailure> {
        let mut pending: Vec<u8> = Vec::new();
        let mut first = true;
        while conn.is_handshaking() {
            flush_handshake(&mut conn, &tcp, deadline)?;
            if !conn.is_handshaking() {
                break;
            }
            fill(&tcp, &mut pending, HEADER, deadline, stopped)?;
            // A TLS record starts with its content type (20..=23).
            if first && !(20..=23).contains(&pending[0]) {
                return Err(TlsFailure::NotTls(pending));
            }
            first = false;
            let len = HEADER + u16::from_be_bytes([pending[3], pending[4]]) as usize;
            if len > MAX_HANDSHAKE_RECORD {
                return Err(TlsFailure::Refused(format!(
                    "TLS handshake record of {len} bytes is too large"
                )));
            }
            fill(&tcp, &mut pending, len, deadline, stopped)?;
            let mut rd = &pending[..len];
            while !rd.is_empty() {
                if let Err(e) = conn.read_tls(&mut rd) {
                    return Err(TlsFailure::Io(e));
                }
                if let Err(e) = conn.process_new_packets() {
                    send_alert_and_close(&mut conn, &tcp);
                    return Err(TlsFailure::Refused(tls::describe(&e, client)));
                }
            }
            pending.drain(..len);
        }
        flush_handshake(&mut conn, &tcp, deadline)?;
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.as_ref().to_vec());
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| TlsFailure::Refused(format!("taking over the TLS session: {e}")))?;
        let keys = |(seq, s)| Keys::new(seq, s).map_err(|e| TlsFailure::Refused(e.to_string()));
        let (tx, rx) = (keys(secrets.tx)?, keys(secrets.rx)?);
        let end = pending.len();
        pending.resize(RX_BUFFER.max(end), 0);
        Ok(Channel {
            tcp,
            version: wire::VERSION.into(),
            tls: Some(Tls {
                client,
                leaf,
                tx: Mutex::new(Tx {
                    keys: tx,
                    buf: Vec::with_capacity(TX_CAP),
                    off: 0,
                    zc: None,
                }),
                rx: Mutex::new(Rx {
                    keys: rx,
                    buf: pending,
                    start: 0,
                    end,
                    plain: 0..0,
                    eof: false,
                    closed: false,
                }),
            }),
            zc: Mutex::new(None),
        })
    }

    /// The TCP socket underneath (options, shutdown, tests).
    /// The protocol version of the frames written on this channel.
    pub fn version(&self) -> u16 {
        self.version.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the protocol version of the frames written on this channel
    /// (the one its HELLO settled; callers pass an accepted version).
    pub fn set_version(&self, v: u16) {
        self.version.store(v, std::sync::atomic::Ordering::Relaxed)
    }

    /// The socket (TCP or UNIX).
    pub fn tcp(&self) -> &Sock {
        &self.tcp
    }

    /// Whether TLS protects this channel.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The DER of the peer's verified leaf certificate (TLS only).
    pub fn peer_leaf(&self) -> Option<Vec<u8>> {
        self.tls.as_ref()?.leaf.clone()
    }

    /// Reads up to `buf.len()` bytes: `Ok(0)` at end of stream, a timeout
    /// error after one poll interval without data.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tls.is_none() {
            return (&self.tcp).read(buf);
        }
        self.read_with(|p| {
            let n = p.len().min(buf.len());
            buf[..n].copy_from_slice(&p[..n]);
            n
        })
    }

    /// TLS only: lends the next plaintext bytes to `take`, which returns
    /// how many it consumed. `Ok(0)` at end of stream, a timeout error
    /// after one poll interval without data. (On a plain channel it reads
    /// nothing: use [`Channel::read`] or `readv`.)
    pub fn read_with(&self, take: impl FnOnce(&[u8]) -> usize) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return Ok(0);
        };
        let mut rx = lock(&t.rx);
        let rx = &mut *rx;
        let started = Instant::now();
        loop {
            if !rx.plain.is_empty() {
                let n = take(&rx.buf[rx.plain.clone()]).min(rx.plain.len());
                rx.plain.start += n;
                return Ok(n);
            }
            if rx.closed {
                return Ok(0);
            }
            let have = rx.end - rx.start;
            if have >= HEADER {
                let hdr: [u8; HEADER] = rx.buf[rx.start..rx.start + HEADER]
                    .try_into()
                    .map_err(|_| io::Error::other("record header"))?;
                let len = record::record_len(&hdr)?;
                if have >= len {
                    let at = rx.start;
                    let (ct, r) = rx.keys.open(&mut rx.buf[at..at + len])?;
                    rx.start += len;
                    let r = at + r.start..at + r.end;
                    match ct {
                        APPLICATION_DATA => rx.plain = r,
                        ALERT => {
                            let a = &rx.buf[r];
                            if a.len() != 2 {
                                return Err(tls_io(format!(
                                    "malformed TLS alert of {} bytes",
                                    a.len()
                                )));
                            }
                            if a[1] == 0 {
                                rx.closed = true; // close_notify
                                return Ok(0);
                            }
                            let d = rustls::AlertDescription::from(a[1]);
                            return Err(tls_io(tls::describe_alert(d, t.client)));
                        }
                        HANDSHAKE => {
                            return Err(tls_io(
                                "the peer sent a TLS handshake message after the handshake \
                                 (key updates and tickets are not used)"
                                    .into(),
                            ))
                        }
                        other => {
                            return Err(tls_io(format!("unexpected TLS content type {other}")))
                        }
                    }
                    continue;
                }
            }
            if rx.eof {
                // Only close_notify ends a TLS stream: a bare TCP close
                // may be a truncation (RFC 8446 §6.1).
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    if have == 0 {
                        "the peer closed the connection without a TLS close_notify"
                    } else {
                        "the connection ended inside a TLS record"
                    },
                ));
            }
            // A peer that trickles a record must not keep us here: report
            // no progress after one poll interval (the caller checks abort
            // and its stall timer).
            if started.elapsed() >= POLL_INTERVAL {
                return Err(ErrorKind::WouldBlock.into());
            }
            // Need more bytes: keep the partial record at the front.
            if rx.start > 0 {
                rx.buf.copy_within(rx.start..rx.end, 0);
                rx.end -= rx.start;
                rx.start = 0;
                rx.plain = 0..0;
            }
            let end = rx.end;
            match (&self.tcp).read(&mut rx.buf[end..]) {
                Ok(0) => rx.eof = true,
                Ok(n) => rx.end += n,
                Err(e) => return Err(e),
            }
        }
    }

    /// Accepts some of `buf` for sending: plain TCP writes it (a timeout
    /// error when nothing moved in one poll interval); TLS seals as much as
    /// its queue takes into records and pushes them out. `Ok(0)` from TLS
    /// means queued records moved but nothing more was accepted; a timeout
    /// error means nothing moved at all.
    pub fn write_some(&self, buf: &[u8]) -> io::Result<usize> {
        let Some(t) = &self.tls else {
            return match (&self.tcp).write(buf) {
                Ok(0) if !buf.is_empty() => Err(ErrorKind::WriteZero.into()),
                r => r,
            };
        };
        let mut v = IoVecs::with_storage(Vec::with_capacity(1));
        v.push_bytes(buf);
        self.seal_some(t, &mut v)
    }

    /// TLS only: seals the next bytes of the gather list `v` into records,
    /// copying them from their place (guest memory) straight into the send
    /// queue, as far as the queue takes them, and pushes records out.
    /// Returns the bytes taken from `v`; a timeout error when none could
    /// be taken in one poll interval. (On a plain channel it takes
    /// nothing: use `writev`.)
    pub fn write_vecs_some(&self, v: &mut IoVecs<'_, Gather>) -> io::Result<usize> {
        match &self.tls {
            Some(t) => self.seal_some(t, v),
            None => Ok(0),
        }
    }

    /// The TLS send step of [`Channel::write_some`] and
    /// [`Channel::write_vecs_some`].
    fn seal_some(&self, t: &Tls, v: &mut IoVecs<'_, Gather>) -> io::Result<usize> {
        let mut tx = lock(&t.tx);
        tx.compact();
        let mut n = 0;
        while !v.is_empty() && tx.room() {
            let start = tx.buf.len();
            tx.buf.extend_from_slice(&[0; HEADER]);
            let got = v.append_to(&mut tx.buf, record::MAX_PLAINTEXT);
            let Tx { keys, buf: out, .. } = &mut *tx;
            keys.seal(out, start, APPLICATION_DATA)?;
            n += got;
        }
        let pushed = Self::push(&mut tx, &self.tcp)?;
        if n == 0 && pushed == 0 && !v.is_empty() {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Pushes sealed records out: `Ok(true)` when nothing is left (always
    /// for plain TCP), `Ok(false)` when some moved and some are left, a
    /// timeout error when nothing moved in one poll interval.
    pub fn flush_some(&self) -> io::Result<bool> {
        let Some(t) = &self.tls else {
            return Ok(true);
        };
        let mut tx = lock(&t.tx);
        let pushed = Self::push(&mut tx, &self.tcp)?;
        if tx.off == tx.buf.len() {
            return Ok(true);
        }
        if pushed == 0 {
            return Err(ErrorKind::WouldBlock.into());
        }
        Ok(false)
    }

    /// Writes queued records for at most about one poll interval; returns
    /// the bytes written (a full socket is not an error).
    fn push(tx: &mut Tx, tcp: &Sock) -> io::Result<usize> {
        if tx.zc.is_some() {
            return Self::push_zc(tx);
        }
        let started = Instant::now();
        let mut pushed = 0;
        while tx.off < tx.buf.len() && started.elapsed() < POLL_INTERVAL {
            match (&*tcp).write(&tx.buf[tx.off..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    tx.off += n;
                    pushed += n;
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if tx.off == tx.buf.len() {
            tx.buf.clear();
            tx.off = 0;
        }
        Ok(pushed)
    }

    /// [`Channel::push`] with zero-copy: sends from `buf` with
    /// `MSG_ZEROCOPY` (the window bounds what is in flight), moves a fully
    /// sent buffer to the in-flight list and takes back completed ones.
    fn push_zc(tx: &mut Tx) -> io::Result<usize> {
        let Tx { buf, off, zc, .. } = tx;
        let Some(zc) = zc.as_mut() else {
            return Ok(0);
        };
        let started = Instant::now();
        let mut pushed = 0;
        while *off < buf.len() && started.elapsed() < POLL_INTERVAL {
            // The bytes stay unchanged until their send completed: see the
            // `Tx` invariant.
            match zc.z.send_buf(&buf[*off..]) {
                Ok((n, id)) => {
                    *off += n;
                    pushed += n;
                    zc.last = Some(id);
                }
                Err(e) if is_timeout(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if *off == buf.len() {
            match zc.last.take() {
                Some(id) => {
                    let fresh = zc.spare.pop().unwrap_or_else(|| Vec::with_capacity(TX_CAP));
                    zc.inflight.push_back((std::mem::replace(buf, fresh), id));
                }
                None => buf.clear(),
            }
            *off = 0;
        }
        zc.z.reap()?;
        zc.recycle();
        Ok(pushed)
    }

    /// Turns on zero-copy send (`SO_ZEROCOPY`) for this data connection:
    /// RAM pages on plain TCP ([`Channel::send_zero_copy`]), every sealed
    /// record with TLS. `conns`: the migration's connections (error text).
    pub fn enable_zero_copy(&self, counters: &Arc<ZcCounters>, conns: u32) -> io::Result<()> {
        let z = ZeroCopy::enable(self.tcp.as_raw_fd(), counters.clone(), conns)?;
        match &self.tls {
            Some(t) => {
                lock(&t.tx).zc = Some(ZcTx {
                    z,
                    last: None,
                    inflight: VecDeque::new(),
                    spare: Vec::new(),
                })
            }
            None => *lock(&self.zc) = Some(z),
        }
        Ok(())
    }

    /// Whether guest pages go out with [`Channel::send_zero_copy`] (plain
    /// TCP with zero-copy on).
    pub fn zero_copy_pages(&self) -> bool {
        lock(&self.zc).is_some()
    }

    /// Sends the guest pages of `v` with `MSG_ZEROCOPY` (plain TCP with
    /// zero-copy on; otherwise an ordinary [`super::write_vecs`]).
    pub fn send_zero_copy(
        &self,
        v: &mut IoVecs<'_, Gather>,
        ctl: &Ctl,
        what: &str,
    ) -> Result<(), MigrationError> {
        if let Some(z) = lock(&self.zc).as_mut() {
            return z.send(v, ctl, what);
        }
        super::write_vecs(self, v, ctl, what)
    }

    /// Waits until every zero-copy send of this connection completed (a
    /// no-op without zero-copy); fails after the stall timeout without a
    /// completion.
    pub fn drain_zero_copy(&self, ctl: &Ctl, what: &str) -> Result<(), MigrationError> {
        if let Some(z) = lock(&self.zc).as_mut() {
            return z.drain(ctl, what);
        }
        let Some(t) = &self.tls else {
            return Ok(());
        };
        let mut last = Instant::now();
        loop {
            ctl.check()?;
            let mut tx = lock(&t.tx);
            let Some(zc) = tx.zc.as_mut() else {
                return Ok(());
            };
            zc.recycle();
            if zc.z.in_flight() == 0 {
                return Ok(());
            }
            let got =
                zc.z.wait(POLL_INTERVAL)
                    .map_err(|e| MigrationError::io(what, e))?;
            zc.recycle();
            if got {
                last = Instant::now();
            } else if last.elapsed() > ctl.stall {
                return Err(MigrationError::Stalled(format!(
                    "zero-copy sends not completed after {:?} {what}",
                    ctl.stall
                )));
            }
        }
    }

    /// Announces the end of what this side sends (TLS close_notify, best
    /// effort) and shuts down the TCP write side.
    pub fn close_write(&self) {
        if let Some(t) = &self.tls {
            let mut tx = lock(&t.tx);
            if !tx.room() {
                // Zero-copy: make room without moving bytes in flight.
                let _ = Self::push(&mut tx, &self.tcp);
            }
            if tx.zc.is_some() && tx.buf.capacity() - tx.buf.len() < 64 {
                // Appending would reallocate bytes the kernel still reads.
                log::debug!("TLS zero-copy: send queue full at close, close_notify not sent");
                drop(tx);
                let _ = self.tcp.shutdown(std::net::Shutdown::Write);
                return;
            }
            let start = tx.buf.len();
            tx.buf.resize(start + HEADER, 0);
            tx.buf.extend_from_slice(&[1, 0]); // warning, close_notify
            let Tx { keys, buf: out, .. } = &mut *tx;
            if keys.seal(out, start, ALERT).is_ok() {
                let _ = Self::push(&mut tx, &self.tcp);
            }
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
