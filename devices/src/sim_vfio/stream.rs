//! Wire format, content generation, hashing, rate limiting and fd plumbing
//! of the simulated VFIO device.
//!
//! Stream format (all integers little-endian):
//! - a header: `magic: u64 = STREAM_MAGIC`, `version: u32 = 2`,
//!   `reserved: u32 = 0`, `state_size: u64` (24 bytes);
//! - records: `offset: u64`, `len: u32`, then `len` bytes to store at
//!   `offset` (1 <= len <= MAX_RECORD; later records override earlier ones);
//! - exactly one register record, right before the end marker:
//!   `offset = REGS_OFFSET (u64::MAX - 1)`, `len = REGS_LEN`, then the PCI
//!   function's registers and DMA engine position as of STOP_COPY entry
//!   (layout: [`super::regs::Regs::encode`]; validated on load);
//! - an end marker: `offset = u64::MAX`, `len = 8`, then `digest: u64`, the
//!   [`digest`] of the source's whole state when it entered STOP_COPY (the
//!   state is frozen from then on, so every record is consistent with it).
//!
//! Version 2 added the digest to the end marker (version 1 ended with
//! `offset = u64::MAX`, `len = 0`); version 3 added the register record. A
//! reader accepts only its own version.
//! Invariant: a loader that applied every record of a complete stream holds
//! state whose [`digest`] equals the end marker's digest, and the
//! registers the source had at STOP_COPY entry.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Magic number opening a stream ("FRYSIMV1").
pub const STREAM_MAGIC: u64 = u64::from_le_bytes(*b"FRYSIMV1");
/// Stream format version (2: the end marker carries the state digest; 3:
/// a register record precedes it).
pub const STREAM_VERSION: u32 = 3;
/// Size of the stream header.
pub const HEADER_LEN: u64 = 24;
/// Size of a record header.
pub const RECORD_HDR_LEN: u64 = 12;
/// Size of the digest that follows the end marker's record header.
pub const END_DIGEST_LEN: u64 = 8;
/// Size of the end marker (record header + digest).
pub const END_LEN: u64 = RECORD_HDR_LEN + END_DIGEST_LEN;
/// Offset value marking the end record.
pub const END_OFFSET: u64 = u64::MAX;
/// Offset value marking the register record.
pub const REGS_OFFSET: u64 = u64::MAX - 1;
/// Payload length of the register record.
pub const REGS_LEN: u64 = super::regs::REGS_LEN as u64;
/// Size of the register record (header + payload).
pub const REGS_RECORD_LEN: u64 = RECORD_HDR_LEN + REGS_LEN;
/// What every stream ends with: the register record and the end marker.
pub const TAIL_LEN: u64 = REGS_RECORD_LEN + END_LEN;
/// Largest record payload a writer emits.
pub const CHUNK: u64 = 256 << 10;
/// Largest record payload a reader accepts.
pub const MAX_RECORD: u64 = 1 << 20;
/// Dirty-tracking granularity.
pub const BLOCK: u64 = 4096;

/// Stream bytes needed to carry `len` contiguous bytes (records of CHUNK).
pub fn stream_len(len: u64) -> u64 {
    len + len.div_ceil(CHUNK) * RECORD_HDR_LEN
}

/// Encodes the stream header.
pub fn encode_header(state_size: u64) -> [u8; HEADER_LEN as usize] {
    let mut b = [0u8; HEADER_LEN as usize];
    b[0..8].copy_from_slice(&STREAM_MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
    b[16..24].copy_from_slice(&state_size.to_le_bytes());
    b
}

/// Decodes and checks a stream header against the expected state size.
pub fn check_header(b: &[u8; HEADER_LEN as usize], state_size: u64) -> Result<(), String> {
    let word = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a[..r.len()].copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    if word(0..8) != STREAM_MAGIC {
        return Err("not a simulated-device stream (bad magic)".into());
    }
    if word(8..12) != u64::from(STREAM_VERSION) {
        return Err(format!("unsupported stream version {}", word(8..12)));
    }
    let size = word(16..24);
    if size != state_size {
        return Err(format!(
            "stream carries {size} bytes of state, device has {state_size}"
        ));
    }
    Ok(())
}

/// Encodes a record header.
pub fn encode_record(offset: u64, len: u32) -> [u8; RECORD_HDR_LEN as usize] {
    let mut b = [0u8; RECORD_HDR_LEN as usize];
    b[0..8].copy_from_slice(&offset.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b
}

/// Encodes the end marker carrying `digest`, the source's state digest at
/// STOP_COPY entry.
pub fn encode_end(digest: u64) -> [u8; END_LEN as usize] {
    let mut b = [0u8; END_LEN as usize];
    b[..RECORD_HDR_LEN as usize].copy_from_slice(&encode_record(END_OFFSET, END_DIGEST_LEN as u32));
    b[RECORD_HDR_LEN as usize..].copy_from_slice(&digest.to_le_bytes());
    b
}

/// Encodes the register record carrying `regs` (an encoded register file).
pub fn encode_regs(regs: &[u8; super::regs::REGS_LEN]) -> Vec<u8> {
    let mut b = Vec::with_capacity(REGS_RECORD_LEN as usize);
    b.extend_from_slice(&encode_record(REGS_OFFSET, REGS_LEN as u32));
    b.extend_from_slice(regs);
    b
}

/// Decodes the digest that follows an end marker's record header.
pub fn decode_end_digest(b: &[u8; END_DIGEST_LEN as usize]) -> u64 {
    u64::from_le_bytes(*b)
}

/// Why loading a stream failed. Messages do not name the device: the
/// device adds its id when reporting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// The stream was truncated, malformed, refused or the load cancelled.
    #[error("{0}")]
    Stream(String),
    /// The stream was complete but the loaded state does not match the
    /// digest the source recorded at switch-over.
    #[error("state digest mismatch after load: source 0x{sent:016x} loaded 0x{loaded:016x}")]
    DigestMismatch {
        /// The digest carried by the end marker.
        sent: u64,
        /// The digest of the state as loaded.
        loaded: u64,
    },
}

impl From<String> for LoadError {
    fn from(s: String) -> Self {
        LoadError::Stream(s)
    }
}

/// Checks loaded state against the digest `sent` from the end marker.
pub fn check_loaded(sent: u64, data: &[u8]) -> Result<(), LoadError> {
    let loaded = digest(data);
    if loaded == sent {
        Ok(())
    } else {
        Err(LoadError::DigestMismatch { sent, loaded })
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `len` bytes follow, to be stored at `offset`.
    Data {
        /// Byte offset in the state.
        offset: u64,
        /// Payload length.
        len: u32,
    },
    /// The register record: [`REGS_LEN`] bytes follow.
    Regs,
    /// End of stream: [`END_DIGEST_LEN`] bytes of digest follow.
    End,
}

/// Decodes a record header, checking it against the state size (the data
/// comes from the network: nothing is trusted).
pub fn decode_record(b: &[u8; RECORD_HDR_LEN as usize], state_size: u64) -> Result<Record, String> {
    let mut o = [0u8; 8];
    o.copy_from_slice(&b[0..8]);
    let offset = u64::from_le_bytes(o);
    let mut l = [0u8; 4];
    l.copy_from_slice(&b[8..12]);
    let len = u32::from_le_bytes(l);
    if offset == END_OFFSET {
        if u64::from(len) == END_DIGEST_LEN {
            return Ok(Record::End);
        }
        return Err(format!("end marker has bad length {len}"));
    }
    if offset == REGS_OFFSET {
        if u64::from(len) == REGS_LEN {
            return Ok(Record::Regs);
        }
        return Err(format!("register record has bad length {len}"));
    }
    if len == 0 || u64::from(len) > MAX_RECORD {
        return Err(format!("record at offset {offset} has bad length {len}"));
    }
    match offset.checked_add(u64::from(len)) {
        Some(end) if end <= state_size => Ok(Record::Data { offset, len }),
        _ => Err(format!(
            "record [{offset}, +{len}) lies outside the {state_size}-byte state"
        )),
    }
}

/// FNV-1a-64 of a string (used to seed content from the device id).
pub fn fnv1a(s: &[u8]) -> u64 {
    s.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64 step: a fast deterministic PRNG.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `buf` with PRNG output continuing from `seed`.
pub fn fill(buf: &mut [u8], seed: &mut u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&splitmix64(seed).to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = splitmix64(seed).to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// Overwrites `buf` with a cheap pattern derived from `v` (word `i` is
/// `v ^ i * K`): how the dirtier changes a block.
pub fn scribble(buf: &mut [u8], v: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    for (i, c) in (&mut chunks).enumerate() {
        let w = v ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.copy_from_slice(&w.to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let n = rest.len();
    rest.copy_from_slice(&(!v).to_le_bytes()[..n]);
}

/// A fast 64-bit digest: FNV-1a-style over 8-byte words in four
/// independent lanes, combined with the length. Equal inputs give equal
/// digests; it is not cryptographic.
pub fn digest(data: &[u8]) -> u64 {
    const P: u64 = 0x0000_0100_0000_01b3;
    let mut lanes = [
        0xcbf2_9ce4_8422_2325u64,
        0x8422_2325_cbf2_9ce4,
        0x9e37_79b9_7f4a_7c15,
        0x94d0_49bb_1331_11eb,
    ];
    let mut blocks = data.chunks_exact(32);
    for b in &mut blocks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i * 8..i * 8 + 8]);
            *lane = (*lane ^ u64::from_le_bytes(w)).wrapping_mul(P);
        }
    }
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for l in lanes {
        h = (h ^ l).wrapping_mul(P);
        h ^= h >> 29;
    }
    for &b in blocks.remainder() {
        h = (h ^ u64::from(b)).wrapping_mul(P);
    }
    h ^= data.len() as u64;
    let mut s = h;
    splitmix64(&mut s)
}

/// Token-bucket rate limiter with a 50 ms burst allowance.
///
/// Invariant: with `rate > 0`, over any interval the bytes allowed do not
/// exceed `rate * interval + rate * 50 ms`.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: f64,
    next: Instant,
}

const BURST: Duration = Duration::from_millis(50);

impl RateLimiter {
    /// A limiter at `mib_per_sec` MiB/s; 0 means unlimited.
    pub fn new(mib_per_sec: f64) -> Self {
        RateLimiter {
            bytes_per_sec: mib_per_sec * 1024.0 * 1024.0,
            next: Instant::now(),
        }
    }

    /// Accounts for `n` bytes and returns how long to wait before they may
    /// go out (zero when unlimited or within the burst).
    pub fn reserve(&mut self, n: u64) -> Duration {
        if self.bytes_per_sec <= 0.0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let floor = now.checked_sub(BURST).unwrap_or(now);
        if self.next < floor {
            self.next = floor;
        }
        self.next += Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        self.next.saturating_duration_since(now)
    }
}

/// Sleeps for `d` in small steps; returns false early if `cancel` is set.
pub fn sleep_cancellable(d: Duration, cancel: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if cancel.load(Ordering::Acquire) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// A connected `AF_UNIX` stream socket pair (close-on-exec).
pub fn socket_pair() -> io::Result<(File, File)> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two c_ints for the kernel to fill.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both fds are fresh and owned by us.
    let pair = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    for f in [&pair.0, &pair.1] {
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            let v: libc::c_int = SOCKET_BUFFER;
            // SAFETY: valid socket fd and a c_int option value of the right
            // size. Best effort: the kernel clamps to its maximum.
            unsafe {
                libc::setsockopt(
                    f.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
    Ok(pair)
}

/// Socket buffer size requested for data sockets (clamped by the kernel's
/// net.core.wmem_max / rmem_max).
pub const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Waits up to `timeout` for `events` on `f`; true when ready.
pub fn poll_fd(f: &File, events: i16, timeout: Duration) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: f.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, count 1.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(r > 0)
}

/// Why a cancellable transfer stopped.
#[derive(Debug)]
pub enum XferError {
    /// The cancel flag was raised.
    Cancelled,
    /// The peer closed or an I/O error occurred.
    Io(io::Error),
    /// Read-side only: the stream ended (EOF, or no data for the grace
    /// period after the stream had to be complete).
    Truncated,
}

/// Writes all of `buf` to the socket `f` without raising SIGPIPE, waiting
/// for room in 50 ms steps and giving up when `cancel` is set. Each
/// non-blocking `send` happens under `sent`, which it advances by the bytes
/// accepted: holding `sent` gives a consistent view with [`unread`].
pub fn send_all(
    f: &File,
    mut buf: &[u8],
    sent: &Mutex<u64>,
    cancel: &AtomicBool,
) -> Result<(), XferError> {
    while !buf.is_empty() {
        if cancel.load(Ordering::Acquire) {
            return Err(XferError::Cancelled);
        }
        let n = {
            let mut total = sent.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes.
            let n = unsafe {
                libc::send(
                    f.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                *total += n as u64;
            }
            n
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => {
                    poll_fd(f, libc::POLLOUT, Duration::from_millis(50)).map_err(XferError::Io)?;
                }
                io::ErrorKind::Interrupted => {}
                _ => return Err(XferError::Io(e)),
            }
            continue;
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

/// Bytes queued in socket `f` that its reader has not read yet (FIONREAD).
pub fn unread(f: &File) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the valid pointer.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FIONREAD, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Fills `buf` from `f`, waiting in 50 ms steps. Stops on `cancel`; once
/// `closing` is set, a full `grace` without data counts as truncation.
pub fn read_exact_cancellable(
    f: &File,
    buf: &mut [u8],
    cancel: &AtomicBool,
    closing: &AtomicBool,
    grace: Duration,
) -> Result<(), XferError> {
    let mut got = 0;
    let mut idle_since: Option<Instant> = None;
    while got < buf.len() {
        if cancel.load(Ordering::Acquire) {
            return Err(XferError::Cancelled);
        }
        if !poll_fd(f, libc::POLLIN, Duration::from_millis(50)).map_err(XferError::Io)? {
            if closing.load(Ordering::Acquire) {
                let t = *idle_since.get_or_insert_with(Instant::now);
                if t.elapsed() >= grace {
                    return Err(XferError::Truncated);
                }
            }
            continue;
        }
        idle_since = None;
        let rest = &mut buf[got..];
        // SAFETY: `rest` is a valid writable slice of `rest.len()` bytes.
        let n = unsafe { libc::read(f.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                continue;
            }
            return Err(XferError::Io(e));
        }
        if n == 0 {
            return Err(XferError::Truncated);
        }
        got += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn header_and_records_round_trip() {
        let h = encode_header(1234);
        assert!(check_header(&h, 1234).is_ok());
        assert!(check_header(&h, 1235).is_err());
        let mut bad = h;
        bad[0] ^= 1;
        assert!(check_header(&bad, 1234).is_err());
        let r = encode_record(100, 24);
        assert_eq!(
            decode_record(&r, 124),
            Ok(Record::Data {
                offset: 100,
                len: 24
            })
        );
        assert!(decode_record(&r, 123).is_err());
        assert_eq!(
            decode_record(&encode_record(END_OFFSET, END_DIGEST_LEN as u32), 10),
            Ok(Record::End)
        );
        assert_eq!(
            decode_record(&encode_record(REGS_OFFSET, REGS_LEN as u32), 10),
            Ok(Record::Regs)
        );
        assert!(decode_record(&encode_record(REGS_OFFSET, 8), u64::MAX).is_err());
        // A version-1 end marker (no digest) is malformed now.
        assert!(decode_record(&encode_record(END_OFFSET, 0), 10).is_err());
        let e = encode_end(0x0123_4567_89ab_cdef);
        let mut hdr = [0u8; RECORD_HDR_LEN as usize];
        hdr.copy_from_slice(&e[..RECORD_HDR_LEN as usize]);
        assert_eq!(decode_record(&hdr, 10), Ok(Record::End));
        let mut dg = [0u8; END_DIGEST_LEN as usize];
        dg.copy_from_slice(&e[RECORD_HDR_LEN as usize..]);
        assert_eq!(decode_end_digest(&dg), 0x0123_4567_89ab_cdef);
        // A version-1 header is refused.
        let mut v1 = h;
        v1[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert!(check_header(&v1, 1234)
            .unwrap_err()
            .contains("unsupported stream version 1"));
        assert!(decode_record(&encode_record(0, 0), 10).is_err());
        assert!(decode_record(&encode_record(u64::MAX - 1, 4), u64::MAX).is_err());
        assert!(decode_record(&encode_record(0, (MAX_RECORD + 1) as u32), u64::MAX).is_err());
    }

    #[test]
    fn loaded_digest_check() {
        let data = vec![7u8; 1000];
        assert_eq!(check_loaded(digest(&data), &data), Ok(()));
        let e = check_loaded(digest(&data) ^ 1, &data).unwrap_err();
        assert_eq!(
            e,
            LoadError::DigestMismatch {
                sent: digest(&data) ^ 1,
                loaded: digest(&data)
            }
        );
        let msg = e.to_string();
        assert!(
            msg.starts_with("state digest mismatch after load: source 0x")
                && msg.contains(&format!("loaded 0x{:016x}", digest(&data))),
            "{msg}"
        );
    }

    #[test]
    fn stream_len_counts_headers() {
        assert_eq!(stream_len(0), 0);
        assert_eq!(stream_len(1), 13);
        assert_eq!(stream_len(CHUNK), CHUNK + 12);
        assert_eq!(stream_len(CHUNK + 1), CHUNK + 1 + 24);
    }

    #[test]
    fn digest_and_fill_are_deterministic() {
        let mut a = vec![0u8; 1000];
        let mut b = vec![0u8; 1000];
        fill(&mut a, &mut 7);
        fill(&mut b, &mut 7);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != 0));
        assert_eq!(digest(&a), digest(&b));
        b[999] ^= 1;
        assert_ne!(digest(&a), digest(&b));
        b[999] ^= 1;
        b[3] ^= 0x80;
        assert_ne!(digest(&a), digest(&b));
        assert_ne!(digest(&[0; 64]), digest(&[0; 65]));
        let mut c = a.clone();
        scribble(&mut c[..13], 42);
        assert_ne!(c[..13], a[..13]);
        assert_eq!(c[13..], a[13..]);
    }

    #[test]
    fn rate_limiter_paces() {
        let mut r = RateLimiter::new(0.0);
        assert_eq!(r.reserve(1 << 30), Duration::ZERO);
        let mut r = RateLimiter::new(1.0); // 1 MiB/s
        let w = r.reserve(512 << 10);
        assert!(
            w > Duration::from_millis(400) && w < Duration::from_millis(510),
            "{w:?}"
        );
    }

    #[test]
    fn socket_transfer_and_cancel() {
        let (mut a, b) = socket_pair().unwrap();
        let no = AtomicBool::new(false);
        let sent = Mutex::new(0);
        send_all(&b, b"hello", &sent, &no).unwrap();
        assert_eq!(*sent.lock().unwrap(), 5);
        assert_eq!(unread(&a).unwrap(), 5);
        let mut buf = [0u8; 5];
        read_exact_cancellable(&a, &mut buf, &no, &no, Duration::ZERO).unwrap();
        assert_eq!(&buf, b"hello");
        // Closing while idle past the grace period is truncation.
        let yes = AtomicBool::new(true);
        assert!(matches!(
            read_exact_cancellable(&a, &mut buf, &no, &yes, Duration::ZERO),
            Err(XferError::Truncated)
        ));
        assert!(matches!(
            read_exact_cancellable(&a, &mut buf, &yes, &no, Duration::ZERO),
            Err(XferError::Cancelled)
        ));
        // A blocked sender gives up on cancel.
        let big = vec![0u8; 64 << 20];
        let flag = std::sync::Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let t = std::thread::spawn(move || {
            matches!(
                send_all(&b, &big, &Mutex::new(0), &f2),
                Err(XferError::Cancelled)
            )
        });
        std::thread::sleep(Duration::from_millis(100));
        flag.store(true, Ordering::Release);
        assert!(t.join().unwrap());
        let mut sink = Vec::new();
        a.read_to_end(&mut sink).unwrap();
    }

    #[test]
    fn send_to_closed_peer_fails_without_signal() {
        let (a, b) = socket_pair().unwrap();
        drop(a);
        let no = AtomicBool::new(false);
        assert!(matches!(
            send_all(&b, b"x", &Mutex::new(0), &no),
            Err(XferError::Io(_))
        ));
    }
}
