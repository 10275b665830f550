//! RAM range tables: the 16-byte entries that precede a RAM packet's pages.

use super::{arr, MAX_PACKET_PAGES, RANGE_ENTRY_LEN, RANGE_ZERO};
use crate::error::MigrationError;
use crate::traits::PAGE_SIZE;

/// One entry of a RAM range table as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeEntry {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Pages in the range (≥ 1).
    pub npages: u32,
    /// [`RANGE_ZERO`] or 0.
    pub flags: u32,
}

impl RangeEntry {
    /// Appends the 16-byte encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.gpa.to_le_bytes());
        out.extend_from_slice(&self.npages.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
    }
}

/// A validated range: inside region `region` of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolvedRange {
    /// Index of the region in the RAM layout.
    pub region: usize,
    /// First page, relative to the region.
    pub first_page: u64,
    /// Pages (≥ 1).
    pub npages: u64,
    /// Zero pages: no data follows.
    pub zero: bool,
}

/// Finds the region of `layout` (`(gpa, size)` pairs) holding
/// `[gpa, gpa + len)` wholly; `None` if none does (overflow-safe).
pub fn resolve(layout: &[(u64, u64)], gpa: u64, len: u64) -> Option<usize> {
    layout.iter().position(|&(start, size)| {
        gpa >= start
            && gpa
                .checked_add(len)
                .zip(start.checked_add(size))
                .is_some_and(|(end, rend)| end <= rend)
    })
}

/// Decodes and validates a RAM range table against the guest RAM layout
/// (`(gpa, size)` pairs, sorted):
/// every range page-aligned, non-empty and wholly inside one region; total
/// pages ≤ [`MAX_PACKET_PAGES`]; data pages × 4 KiB == `data_len`.
pub fn decode_ranges(
    table: &[u8],
    data_len: u64,
    regions: &[(u64, u64)],
    out: &mut Vec<ResolvedRange>,
) -> Result<(), MigrationError> {
    out.clear();
    if !table.len().is_multiple_of(RANGE_ENTRY_LEN) {
        return Err(MigrationError::proto(
            "range table length not a multiple of 16",
        ));
    }
    let mut total_pages = 0u64;
    let mut data_pages = 0u64;
    for e in table.chunks_exact(RANGE_ENTRY_LEN) {
        let gpa = u64::from_le_bytes(arr(&e[0..8]));
        let npages = u32::from_le_bytes(arr(&e[8..12])) as u64;
        let flags = u32::from_le_bytes(arr(&e[12..16]));
        if flags & !RANGE_ZERO != 0 {
            return Err(MigrationError::proto(format!("range flags {flags:#x}")));
        }
        if npages == 0 || gpa % PAGE_SIZE != 0 {
            return Err(MigrationError::proto(format!(
                "invalid range gpa {gpa:#x} pages {npages}"
            )));
        }
        total_pages += npages;
        if total_pages > MAX_PACKET_PAGES {
            return Err(MigrationError::proto("RAM packet carries too many pages"));
        }
        let len = npages * PAGE_SIZE;
        let region = resolve(regions, gpa, len).ok_or_else(|| {
            MigrationError::proto(format!("range {gpa:#x}+{len:#x} is outside guest RAM"))
        })?;
        let zero = flags & RANGE_ZERO != 0;
        if !zero {
            data_pages += npages;
        }
        out.push(ResolvedRange {
            region,
            first_page: (gpa - regions[region].0) / PAGE_SIZE,
            npages,
            zero,
        });
    }
    if data_pages * PAGE_SIZE != data_len {
        return Err(MigrationError::proto(format!(
            "range table announces {} data bytes, frame carries {data_len}",
            data_pages * PAGE_SIZE
        )));
    }
    Ok(())
}
