//! zstd compression of RAM packets (`"compression": "zstd"`).
//!
//! Each writer thread owns one [`PacketCompressor`] and each reader thread
//! one [`PacketDecompressor`] (one zstd context each, reused for every
//! packet), so compression scales with the data connections. Only the page
//! data of a RAM/PAGES packet is compressed; the range table stays plain
//! (its zero ranges still carry no data), and a packet whose data does not
//! shrink goes out as is. On the wire a compressed packet is marked by
//! [`crate::wire::FLAG_ZSTD`] in its header, with the raw data length in
//! `c` (see `docs/migration-protocol.md`, "Compression").
//!
//! Everything read is hostile: the compressed length is bounded by the
//! header (strictly less than the raw length, itself at most
//! [`MAX_PACKET_BYTES`]), and the output of a decompression is bounded by a
//! buffer of exactly the raw length the header announced; a stream that
//! would produce more (a bomb), less, or is corrupt is an error, never a
//! panic or an allocation the stream chose.

use serde::{Deserialize, Serialize};

use crate::error::MigrationError;
use crate::traits::PAGE_SIZE;
use crate::wire::MAX_PACKET_PAGES;

/// Largest page data of one packet, raw (and so of its compressed form).
pub const MAX_PACKET_BYTES: usize = (MAX_PACKET_PAGES * PAGE_SIZE) as usize;

/// `compression` of a send request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// RAM goes out as is (default).
    #[default]
    None,
    /// Every RAM packet's page data is compressed with zstd in the writer
    /// threads, and sent compressed only when it shrinks.
    Zstd,
}

impl Compression {
    /// The name used in the API and the status (`"none"`, `"zstd"`).
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }
}

/// zstd level used when a request names none. Level 1 is zstd's fastest
/// regular level; on this project's 2-core test host it compresses text at
/// several times the speed of a 1 Gbit/s link per writer thread, and higher
/// levels gain little on guest memory (see `docs/benchmarks.md`,
/// "Compression").
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;
/// Lowest accepted `compression_level`.
pub const MIN_ZSTD_LEVEL: i32 = 1;
/// Highest accepted `compression_level` (zstd's highest regular level;
/// the "ultra" levels 20..=22 need large windows and are refused).
pub const MAX_ZSTD_LEVEL: i32 = 19;

/// Largest window the decompressor accepts, as log2: 2^23 bytes, more than
/// any packet (a compressor of this crate never needs a larger one for at
/// most [`MAX_PACKET_BYTES`] of input).
const WINDOW_LOG_MAX: u32 = 23;

fn zerr(what: &str, e: std::io::Error) -> MigrationError {
    MigrationError::Internal(format!("zstd: {what}: {e}"))
}

/// One writer thread's zstd context and output buffer.
///
/// Invariant: `out` is at most [`MAX_PACKET_BYTES`] long (it grows to the
/// largest packet seen: the sender's packets are 2 MiB); the context's
/// level is within [`MIN_ZSTD_LEVEL`]..=[`MAX_ZSTD_LEVEL`].
pub struct PacketCompressor {
    cx: zstd::bulk::Compressor<'static>,
    out: Vec<u8>,
}

impl PacketCompressor {
    /// A context at `level` (checked by the API: 1..=19).
    pub fn new(level: i32) -> Result<Self, MigrationError> {
        if !(MIN_ZSTD_LEVEL..=MAX_ZSTD_LEVEL).contains(&level) {
            return Err(MigrationError::InvalidParams(format!(
                "compression_level must be in {MIN_ZSTD_LEVEL}..={MAX_ZSTD_LEVEL}, got {level}"
            )));
        }
        let mut cx = zstd::bulk::Compressor::new(level).map_err(|e| zerr("new context", e))?;
        // The checksum (xxh64, far faster than the compression) lets the
        // destination tell a damaged stream from a good one.
        cx.include_checksum(true)
            .map_err(|e| zerr("checksum flag", e))?;
        Ok(PacketCompressor {
            cx,
            out: Vec::new(),
        })
    }

    /// Compresses the page data `raw` (at most [`MAX_PACKET_BYTES`]):
    /// `Some(compressed)` when it is strictly shorter than `raw`, `None`
    /// when it does not shrink (the packet is then sent as is).
    pub fn compress(&mut self, raw: &[u8]) -> Option<&[u8]> {
        if raw.is_empty() || raw.len() > MAX_PACKET_BYTES {
            return None;
        }
        if self.out.len() < raw.len() {
            self.out.resize(raw.len(), 0);
        }
        // A destination one byte shorter than the input: zstd fails with
        // "destination too small" as soon as the result would not shrink.
        let dst = &mut self.out[..raw.len() - 1];
        match self.cx.compress_to_buffer(raw, dst) {
            Ok(n) if n > 0 && n < raw.len() => Some(&self.out[..n]),
            Ok(_) => None,
            Err(e) => {
                log::trace!("zstd: packet of {} bytes sent as is ({e})", raw.len());
                None
            }
        }
    }
}

/// One reader thread's zstd context and output buffer.
///
/// Invariant: `out` is at most [`MAX_PACKET_BYTES`] long (it grows to the
/// largest raw length announced by a validated header).
pub struct PacketDecompressor {
    dx: zstd::bulk::Decompressor<'static>,
    out: Vec<u8>,
}

impl PacketDecompressor {
    /// A context with a bounded window.
    pub fn new() -> Result<Self, MigrationError> {
        let mut dx = zstd::bulk::Decompressor::new().map_err(|e| zerr("new context", e))?;
        dx.window_log_max(WINDOW_LOG_MAX)
            .map_err(|e| zerr("window bound", e))?;
        Ok(PacketDecompressor {
            dx,
            out: Vec::new(),
        })
    }

    /// Decompresses `packed` into exactly `raw_len` bytes (the packet's
    /// data pages × page size, from its validated header and range table);
    /// any other outcome (corrupt input, more or less output, a raw length
    /// over [`MAX_PACKET_BYTES`]) is a protocol error.
    pub fn decompress(&mut self, packed: &[u8], raw_len: usize) -> Result<&[u8], MigrationError> {
        if raw_len == 0 || raw_len > MAX_PACKET_BYTES || packed.len() >= raw_len {
            return Err(MigrationError::proto(format!(
                "compressed packet of {} bytes for {raw_len} raw bytes",
                packed.len()
            )));
        }
        if self.out.len() < raw_len {
            self.out.resize(raw_len, 0);
        }
        let dst = &mut self.out[..raw_len];
        match self.dx.decompress_to_buffer(packed, dst) {
            Ok(n) if n == raw_len => Ok(&self.out[..n]),
            Ok(n) => Err(MigrationError::proto(format!(
                "compressed packet gave {n} bytes, its header announced {raw_len}"
            ))),
            Err(e) => Err(MigrationError::proto(format!(
                "compressed packet of {} bytes for {raw_len} raw bytes does not decompress: {e}",
                packed.len()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        b"The quick brown fox jumps over the lazy dog. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    fn random(len: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn text_shrinks_and_comes_back() {
        let mut c = PacketCompressor::new(DEFAULT_ZSTD_LEVEL).unwrap();
        let mut d = PacketDecompressor::new().unwrap();
        for pages in [1usize, 7, 1024] {
            let raw = text(pages * PAGE_SIZE as usize);
            let packed = c.compress(&raw).expect("text shrinks").to_vec();
            assert!(
                packed.len() * 10 < raw.len(),
                "{} of {}",
                packed.len(),
                raw.len()
            );
            assert_eq!(d.decompress(&packed, raw.len()).unwrap(), &raw[..]);
        }
    }

    #[test]
    fn random_data_does_not_shrink() {
        let mut c = PacketCompressor::new(3).unwrap();
        for pages in [1usize, 64, 1024] {
            assert!(c.compress(&random(pages * PAGE_SIZE as usize)).is_none());
        }
        // The context is still good after a refusal.
        let raw = text(PAGE_SIZE as usize * 4);
        assert!(c.compress(&raw).is_some());
        assert!(c.compress(&[]).is_none());
        assert!(c.compress(&vec![1; MAX_PACKET_BYTES + 1]).is_none());
    }

    #[test]
    fn levels_are_bounded() {
        for l in [0, -1, 20, 22, i32::MAX] {
            assert!(PacketCompressor::new(l).is_err(), "{l}");
        }
        for l in [MIN_ZSTD_LEVEL, MAX_ZSTD_LEVEL] {
            PacketCompressor::new(l).unwrap();
        }
    }

    /// Corrupt input, truncated input, a wrong announced length and
    /// garbage all fail cleanly, and the context keeps working.
    #[test]
    fn corrupt_input_fails_cleanly() {
        let mut c = PacketCompressor::new(1).unwrap();
        let mut d = PacketDecompressor::new().unwrap();
        let raw = text(16 * PAGE_SIZE as usize);
        let packed = c.compress(&raw).unwrap().to_vec();
        let bad = |d: &mut PacketDecompressor, p: &[u8], n: usize| {
            let e = d.decompress(p, n).unwrap_err();
            assert!(matches!(e, MigrationError::Protocol(_)), "{e}");
        };
        // Every single-byte flip is refused (or, where zstd cannot tell,
        // caught by the checksum); none panics.
        for i in 0..packed.len() {
            let mut p = packed.clone();
            p[i] ^= 0x5a;
            if let Ok(out) = d.decompress(&p, raw.len()) {
                panic!("flip at {i} accepted ({} bytes)", out.len());
            }
        }
        bad(&mut d, &packed[..packed.len() / 2], raw.len());
        bad(&mut d, &packed, raw.len() - PAGE_SIZE as usize);
        bad(&mut d, &packed, raw.len() + PAGE_SIZE as usize);
        bad(&mut d, &random(300), raw.len());
        bad(&mut d, &[], raw.len());
        bad(&mut d, &packed, 0);
        bad(&mut d, &packed, MAX_PACKET_BYTES + PAGE_SIZE as usize);
        assert_eq!(d.decompress(&packed, raw.len()).unwrap(), &raw[..]);
    }

    /// A stream that expands past the announced length (here: 1 GiB of
    /// zeroes in a few hundred bytes, and a frame announcing more than a
    /// packet) is refused without producing more than the buffer.
    #[test]
    fn size_bombs_are_refused() {
        let mut d = PacketDecompressor::new().unwrap();
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
        assert!(bomb.len() < MAX_PACKET_BYTES);
        let e = d.decompress(&bomb, MAX_PACKET_BYTES).unwrap_err();
        assert!(e.to_string().contains("does not decompress"), "{e}");
        // Two pages announced, a frame of eight.
        let mut c = PacketCompressor::new(1).unwrap();
        let eight = c.compress(&text(8 * PAGE_SIZE as usize)).unwrap().to_vec();
        assert!(d.decompress(&eight, 2 * PAGE_SIZE as usize).is_err());
        // Two frames back to back: more than announced.
        let one = c.compress(&text(4 * PAGE_SIZE as usize)).unwrap().to_vec();
        let two = [one.clone(), one].concat();
        assert!(d.decompress(&two, 4 * PAGE_SIZE as usize).is_err());
        assert_eq!(
            d.decompress(&two, 8 * PAGE_SIZE as usize).unwrap(),
            &text(4 * PAGE_SIZE as usize).repeat(2)[..]
        );
    }

    /// Not a test: prints compression speed and ratio per level on text,
    /// stamp-like and random packets (`cargo test --release -p migration
    /// --lib zstd_levels -- --ignored --nocapture`), the measurement behind
    /// [`DEFAULT_ZSTD_LEVEL`]. Asserts nothing about time.
    #[test]
    #[ignore]
    fn zstd_levels() {
        let n = MAX_PACKET_BYTES;
        let mut stamp = vec![0u8; n];
        for p in 0..n / PAGE_SIZE as usize {
            let o = p * PAGE_SIZE as usize;
            let v = (p as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            stamp[o..o + 8].copy_from_slice(&v.to_le_bytes());
            stamp[o + 8..o + 16].copy_from_slice(&(o as u64).to_le_bytes());
            stamp[o + 4088..o + 4096].copy_from_slice(&(!v).to_le_bytes());
        }
        for (what, data) in [("text", text(n)), ("stamp", stamp), ("random", random(n))] {
            for level in [1, 3, 6, 9] {
                let mut c = PacketCompressor::new(level).unwrap();
                let mut d = PacketDecompressor::new().unwrap();
                let rounds = 64;
                let t = std::time::Instant::now();
                let mut out = 0;
                let mut packed = Vec::new();
                for _ in 0..rounds {
                    match c.compress(&data) {
                        Some(p) => {
                            out += p.len();
                            packed = p.to_vec();
                        }
                        None => out += n,
                    }
                }
                let ct = t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                if !packed.is_empty() {
                    for _ in 0..rounds {
                        d.decompress(&packed, n).unwrap();
                    }
                }
                let dt = t.elapsed().as_secs_f64();
                let mb = (rounds * n) as f64 / 1e6;
                println!(
                    "{what:6} level {level}: compress {:7.0} MB/s, decompress {:7.0} MB/s, ratio {:.1}",
                    mb / ct,
                    if packed.is_empty() { 0.0 } else { mb / dt },
                    (rounds * n) as f64 / out as f64
                );
            }
        }
    }
}
