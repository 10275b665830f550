//! The scheduler: turns populated ranges (first pass) and dirty bitmaps
//! (later passes) into runs of pages, splits them into RAM packets and
//! queues them; with manual dirty-log protection it re-protects each 64-page
//! block exactly once per pass, just before the first packet touching the
//! block is queued (so every write after the clear is caught by the next
//! fetch, and no clear can hide a write to a page already queued).

use std::ops::Range;

use super::pool::{PageRun, Pool};
use crate::error::MigrationError;
use crate::traits::{DirtyBitmap, RamRegion, SourceVm, PAGE_SIZE};

/// Pages per RAM packet (2 MiB of guest memory).
pub const PACKET_PAGES: u64 = 512;
/// Granularity of `clear_dirty` calls.
const CLEAR_BLOCK: u64 = 64;

/// Builds and queues the packets of one pass.
///
/// Invariant: runs are added per region in ascending page order; every page
/// queued in this pass was re-protected (manual mode) before it was queued,
/// and each 64-page block is cleared at most once per pass.
pub struct Packetizer<'a> {
    pool: &'a Pool,
    vm: &'a dyn SourceVm,
    regions: &'a [RamRegion],
    pass: u64,
    manual: bool,
    cur: Vec<PageRun>,
    cur_pages: u64,
    /// Per region: blocks below this page are already cleared this pass.
    cleared_upto: Vec<u64>,
    /// A cleared range not yet handed to `clear_dirty`: (region, start, end).
    pending_clear: Option<(usize, u64, u64)>,
    /// Pages queued in this pass.
    pub queued_pages: u64,
}

impl<'a> Packetizer<'a> {
    /// Starts pass `pass`.
    pub fn new(pool: &'a Pool, vm: &'a dyn SourceVm, regions: &'a [RamRegion], pass: u64) -> Self {
        Packetizer {
            pool,
            vm,
            regions,
            pass,
            manual: vm.manual_protect(),
            cur: Vec::new(),
            cur_pages: 0,
            cleared_upto: vec![0; regions.len()],
            pending_clear: None,
            queued_pages: 0,
        }
    }

    fn flush_clear(&mut self) -> Result<(), MigrationError> {
        if let Some((r, s, e)) = self.pending_clear.take() {
            self.vm
                .clear_dirty(r, s, e - s)
                .map_err(|err| MigrationError::vm("clearing the dirty log", err))?;
        }
        Ok(())
    }

    fn note_clear(&mut self, region: usize, first: u64, n: u64) -> Result<(), MigrationError> {
        if !self.manual {
            return Ok(());
        }
        let rp = self.regions[region].pages();
        let start = (first / CLEAR_BLOCK * CLEAR_BLOCK).max(self.cleared_upto[region]);
        let end = (first + n)
            .div_ceil(CLEAR_BLOCK)
            .saturating_mul(CLEAR_BLOCK)
            .min(rp);
        if end <= start {
            return Ok(());
        }
        self.cleared_upto[region] = end;
        match &mut self.pending_clear {
            Some((r, _, e)) if *r == region && *e == start => *e = end,
            _ => {
                self.flush_clear()?;
                self.pending_clear = Some((region, start, end));
            }
        }
        Ok(())
    }

    /// Adds pages `[first, first + n)` of `region` (ascending per region).
    pub fn add_run(
        &mut self,
        region: usize,
        mut first: u64,
        mut n: u64,
    ) -> Result<(), MigrationError> {
        if self.pool.switch_requested() {
            // Post-copy takes over: these pages are in its missing set.
            return Ok(());
        }
        while n > 0 {
            let take = n.min(PACKET_PAGES - self.cur_pages);
            self.note_clear(region, first, take)?;
            match self.cur.last_mut() {
                Some(l) if l.region as usize == region && l.first_page + l.npages == first => {
                    l.npages += take
                }
                _ => self.cur.push(PageRun {
                    region: region as u32,
                    first_page: first,
                    npages: take,
                }),
            }
            self.cur_pages += take;
            first += take;
            n -= take;
            if self.cur_pages == PACKET_PAGES || self.cur.len() >= 256 {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Queues the packet being built.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        if self.cur.is_empty() {
            return Ok(());
        }
        self.flush_clear()?;
        let runs = std::mem::take(&mut self.cur);
        self.queued_pages += self.cur_pages;
        self.cur_pages = 0;
        self.pool.push_ram(self.pass, runs)
    }

    /// The page runs `(start, end)` of the populated byte ranges of a
    /// region (first pass), ascending and disjoint, for
    /// [`Packetizer::add_run`]. In manual mode ranges are widened to whole
    /// 64-page blocks, because every page that is re-protected must also be
    /// read afterwards.
    pub fn populated_runs(&self, region: usize, ranges: &[Range<u64>]) -> Vec<(u64, u64)> {
        let rp = self.regions[region].pages();
        let mut raw: Vec<(u64, u64)> = Vec::new();
        for r in ranges {
            let mut s = r.start / PAGE_SIZE;
            let mut e = r.end.div_ceil(PAGE_SIZE).min(rp);
            if self.manual {
                s = s / CLEAR_BLOCK * CLEAR_BLOCK;
                e = e.div_ceil(CLEAR_BLOCK).saturating_mul(CLEAR_BLOCK).min(rp);
            }
            if s < e {
                raw.push((s, e));
            }
        }
        raw.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (s, e) in raw {
            match runs.last_mut() {
                Some(l) if s <= l.1 => l.1 = l.1.max(e),
                _ => runs.push((s, e)),
            }
        }
        runs
    }

    /// Adds every set page of a dirty bitmap.
    pub fn add_bitmap(&mut self, region: usize, bm: &DirtyBitmap) -> Result<(), MigrationError> {
        let rp = self.regions[region].pages();
        for (s, n) in runs_of(bm, rp) {
            self.add_run(region, s, n)?;
        }
        Ok(())
    }

    /// Queues the last packet and flushes pending clears; returns the pages
    /// queued in this pass.
    pub fn finish(mut self) -> Result<u64, MigrationError> {
        self.flush()?;
        self.flush_clear()?;
        Ok(self.queued_pages)
    }
}

/// Runs `(first_page, npages)` of set bits, bounded by `pages`.
pub fn runs_of(bm: &DirtyBitmap, pages: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |s: u64, n: u64| match out.last_mut() {
        Some(l) if l.0 + l.1 == s => l.1 += n,
        _ => out.push((s, n)),
    };
    for (wi, &w) in bm.words.iter().enumerate() {
        if w == 0 {
            continue;
        }
        let base = wi as u64 * 64;
        if base >= pages {
            break;
        }
        if w == u64::MAX {
            push(base, 64.min(pages - base));
            continue;
        }
        let mut w = w;
        while w != 0 {
            let tz = w.trailing_zeros() as u64;
            let ones = (w >> tz).trailing_ones() as u64;
            let s = base + tz;
            if s >= pages {
                break;
            }
            push(s, ones.min(pages - s));
            if tz + ones >= 64 {
                break;
            }
            w &= !(((1u64 << ones) - 1) << tz);
        }
    }
    out
}

/// Number of set bits (bounded by `pages`).
pub fn count_dirty(bm: &DirtyBitmap, pages: u64) -> u64 {
    let full = (pages / 64) as usize;
    let mut n: u64 = bm
        .words
        .iter()
        .take(full)
        .map(|w| w.count_ones() as u64)
        .sum();
    if !pages.is_multiple_of(64) {
        if let Some(w) = bm.words.get(full) {
            n += (w & ((1u64 << (pages % 64)) - 1)).count_ones() as u64;
        }
    }
    n
}
