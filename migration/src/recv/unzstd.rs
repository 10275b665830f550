//! A reader thread's side of RAM compression: a compressed packet's data
//! is read into a buffer bounded by its validated header, decompressed with
//! the thread's own zstd context into a second buffer of exactly the raw
//! length, and copied from there into guest memory page run by page run.
//!
//! Not straight into guest memory: zstd writes its output through a
//! `&mut [u8]`, and guest memory is never a Rust slice here (the guest or
//! the post-copy fault path may touch it; see [`crate::guest_mem`]), and a
//! packet's pages are scattered over ranges. The copy is one `memcpy` of at
//! most 4 MiB per packet, small beside the decompression itself.

use super::reader::ReaderCtx;
use crate::compress::{PacketDecompressor, MAX_PACKET_BYTES};
use crate::error::MigrationError;
use crate::guest_mem::{IoVecs, Scatter};
use crate::net::{read_full, Channel, Ctl};
use crate::traits::PAGE_SIZE;
use crate::wire::ResolvedRange;

/// One reader's decompression state, made at its first compressed packet.
///
/// Invariant: `packed` never grows past [`MAX_PACKET_BYTES`].
pub(super) struct ReaderZstd {
    dx: PacketDecompressor,
    packed: Vec<u8>,
}

impl ReaderZstd {
    pub(super) fn new() -> Result<Self, MigrationError> {
        Ok(ReaderZstd {
            dx: PacketDecompressor::new()?,
            packed: Vec::new(),
        })
    }

    /// Reads `zstd_len` compressed bytes from `s` and decompresses them to
    /// exactly `data_len` bytes (both from a validated header: `zstd_len <
    /// data_len <= MAX_PACKET_BYTES`).
    pub(super) fn read(
        &mut self,
        s: &Channel,
        zstd_len: u64,
        data_len: u64,
        ctl: &Ctl,
        what: &str,
    ) -> Result<&[u8], MigrationError> {
        if zstd_len == 0 || zstd_len >= data_len || data_len > MAX_PACKET_BYTES as u64 {
            return Err(MigrationError::proto(format!(
                "compressed packet of {zstd_len} bytes for {data_len} data bytes"
            )));
        }
        self.packed.resize(zstd_len as usize, 0);
        read_full(s, &mut self.packed, ctl, what)?;
        self.dx.decompress(&self.packed, data_len as usize)
    }
}

/// Whether compressed frames are welcome on this reader: only when SETUP
/// negotiated compression.
pub(super) fn check_negotiated(ctx: &ReaderCtx, idx: usize) -> Result<(), MigrationError> {
    if ctx.zstd {
        Ok(())
    } else {
        Err(MigrationError::proto(format!(
            "compressed RAM on data connection {idx}, but SETUP did not ask for compression"
        )))
    }
}

/// Copies the decompressed page data `data` of the validated `ranges`
/// into guest memory (the data ranges in order), skipping the pages of a
/// known post-copy missing set (`stale_at`), and marks the pages written.
/// `data` is exactly the data pages' length (checked by the decompressor
/// against the header, and by `decode_ranges` against the table).
pub(super) fn apply_data(
    ctx: &ReaderCtx,
    storage: &mut Vec<libc::iovec>,
    ranges: &[ResolvedRange],
    data: &[u8],
    stale_at: &dyn Fn(usize, u64) -> bool,
) -> Result<u64, MigrationError> {
    let ram = &*ctx.ram;
    let mut off = 0usize;
    let mut discarded = 0;
    for r in ranges.iter().filter(|r| !r.zero) {
        let end = r.first_page + r.npages;
        let mut p = r.first_page;
        while p < end {
            let st = stale_at(r.region, p);
            let mut q = p + 1;
            while q < end && stale_at(r.region, q) == st {
                q += 1;
            }
            let len = ((q - p) * PAGE_SIZE) as usize;
            let src = data
                .get(off..off + len)
                .ok_or_else(|| MigrationError::proto("compressed packet shorter than its table"))?;
            if st {
                discarded += len as u64;
            } else {
                // Every range lies inside a region of the destination's
                // guest RAM (validated by decode_ranges); within a pass
                // each page is sent once, so no other reader writes these
                // pages now.
                let mut v: IoVecs<'_, Scatter> = IoVecs::with_storage(std::mem::take(storage));
                v.push_guest_mut(&ram.mem, r.region, p, q - p)?;
                let n = v.copy_in(src);
                *storage = v.into_storage();
                if n != len {
                    return Err(MigrationError::Internal(format!(
                        "copied {n} of {len} bytes into guest memory"
                    )));
                }
                ram.mark(r.region, p, q - p);
            }
            off += len;
            p = q;
        }
    }
    if off != data.len() {
        return Err(MigrationError::proto(format!(
            "compressed packet of {} data bytes for {off} in its table",
            data.len()
        )));
    }
    Ok(discarded)
}
