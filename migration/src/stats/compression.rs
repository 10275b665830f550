//! Counters of RAM compression (`"compression": "zstd"`), reported as the
//! `compression` object of the status.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::status::CompressionStatus;

/// Compression counters of one migration, both sides.
///
/// Invariant: `level` is 0 while compression is off for this migration
/// (no `compression` object is reported), else the zstd level + 1 on the
/// source, or 1 on the destination (level unknown there: it does not need
/// it); `wire_bytes <= raw_bytes`.
#[derive(Debug, Default)]
pub struct CompressionCounters {
    level: AtomicU64,
    /// Page data bytes of the RAM packets compression was tried on, raw.
    raw_bytes: AtomicU64,
    /// What those bytes were on the wire: compressed, or as is.
    wire_bytes: AtomicU64,
    /// Packets sent (received) compressed.
    packets: AtomicU64,
    /// Packets that did not shrink and went as is.
    as_is: AtomicU64,
}

impl CompressionCounters {
    /// Compression is on: zstd at `level` (the source), or `None` (the
    /// destination, which agreed to it at SETUP).
    pub(crate) fn enable(&self, level: Option<i32>) {
        let v = level.map(|l| l.max(0) as u64 + 1).unwrap_or(1);
        self.level.store(v, Relaxed);
    }

    /// One packet of `raw` page data bytes went out (came in) as `wire`
    /// bytes: compressed when `wire < raw`.
    pub(crate) fn packet(&self, raw: u64, wire: u64) {
        self.raw_bytes.fetch_add(raw, Relaxed);
        self.wire_bytes.fetch_add(wire.min(raw), Relaxed);
        if wire < raw {
            self.packets.fetch_add(1, Relaxed);
        } else {
            self.as_is.fetch_add(1, Relaxed);
        }
    }

    pub(crate) fn reset(&self) {
        for a in [
            &self.level,
            &self.raw_bytes,
            &self.wire_bytes,
            &self.packets,
            &self.as_is,
        ] {
            a.store(0, Relaxed);
        }
    }

    pub(crate) fn status(&self, source: bool) -> Option<CompressionStatus> {
        let level = self.level.load(Relaxed).checked_sub(1)?;
        let raw = self.raw_bytes.load(Relaxed);
        let wire = self.wire_bytes.load(Relaxed);
        Some(CompressionStatus {
            algorithm: "zstd".into(),
            level: source.then_some(level as i32),
            raw_bytes: raw,
            wire_bytes: wire,
            ratio: if wire == 0 {
                1.0
            } else {
                raw as f64 / wire as f64
            },
            compressed_packets: self.packets.load(Relaxed),
            uncompressed_packets: self.as_is.load(Relaxed),
        })
    }
}
