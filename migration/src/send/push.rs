//! Post-copy on the source: the set of pages the destination still lacks,
//! claimed page by page by whoever sends them (the writers' background push
//! and the page-request server), and the server that answers a faulting
//! vCPU's request on the main connection, ahead of the background push.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use super::pool::{PageRun, RateLimiter};
use super::writer::classify;
use crate::error::MigrationError;
use crate::guest_mem::{Gather, GuestMemory, IoVecs};
use crate::net::{lock, Ctl, MainConn};
use crate::stats::MigrationStats;
use crate::traits::PAGE_SIZE;
use crate::wire::{resolve, Frame, HEADER_LEN};

/// Pages of one background post-copy packet (512 KiB): small, so that a
/// packet queued behind the bandwidth cap delays little.
pub const PUSH_PACKET_PAGES: u64 = 128;
/// Pages sent with a requested page, right after it (the guest touches
/// neighbouring pages next more often than not).
pub const READAHEAD_PAGES: u64 = 15;

/// The pages still to send after the switch to post-copy.
///
/// Invariant: a bit is set while its page has not been claimed by a sender;
/// claiming clears it atomically, so the background push sends each page
/// at most once (a requested page is sent again on request, which the
/// destination drops); `remaining` is the number of set bits; the cursor is
/// where the background push goes on (moved behind each request).
#[derive(Debug)]
pub struct PushSet {
    pages: Vec<u64>,
    bits: Vec<Vec<AtomicU64>>,
    remaining: AtomicU64,
    cursor: Mutex<(usize, u64)>,
}

impl PushSet {
    /// The set of `maps` (one bitmap per region of `pages` pages each).
    pub fn new(maps: &[Vec<u64>], pages: &[u64]) -> PushSet {
        let mut n = 0;
        let bits = pages
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                (0..p.div_ceil(64) as usize)
                    .map(|w| {
                        let mut v = maps.get(i).and_then(|m| m.get(w)).copied().unwrap_or(0);
                        let first = w as u64 * 64;
                        if first + 64 > p {
                            v &= (1u64 << (p - first)) - 1;
                        }
                        n += v.count_ones() as u64;
                        AtomicU64::new(v)
                    })
                    .collect()
            })
            .collect();
        PushSet {
            pages: pages.to_vec(),
            bits,
            remaining: AtomicU64::new(n),
            cursor: Mutex::new((0, 0)),
        }
    }

    /// Pages not claimed yet.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(SeqCst)
    }

    /// Claims the bits `mask` of word `w` of `region`; appends the claimed
    /// pages as runs to `out`; returns how many were claimed.
    fn claim_word(&self, region: usize, w: usize, mask: u64, out: &mut Vec<PageRun>) -> u64 {
        if mask == 0 {
            return 0;
        }
        let got = self.bits[region][w].fetch_and(!mask, SeqCst) & mask;
        let n = got.count_ones() as u64;
        if n == 0 {
            return 0;
        }
        self.remaining.fetch_sub(n, SeqCst);
        let base = w as u64 * 64;
        let mut v = got;
        while v != 0 {
            let tz = v.trailing_zeros() as u64;
            let ones = (v >> tz).trailing_ones() as u64;
            let first = base + tz;
            match out.last_mut() {
                Some(l) if l.region as usize == region && l.first_page + l.npages == first => {
                    l.npages += ones
                }
                _ => out.push(PageRun {
                    region: region as u32,
                    first_page: first,
                    npages: ones,
                }),
            }
            if tz + ones >= 64 {
                break;
            }
            v &= !(((1u64 << ones) - 1) << tz);
        }
        n
    }

    /// Claims whatever is still unclaimed of pages `[first, first + n)` of
    /// `region` (clipped to the region).
    pub fn claim_range(&self, region: usize, first: u64, n: u64, out: &mut Vec<PageRun>) -> u64 {
        let Some(&pages) = self.pages.get(region) else {
            return 0;
        };
        let end = first.saturating_add(n).min(pages);
        crate::bitmap::word_masks(first, end)
            .map(|(word, mask)| self.claim_word(region, word, mask, out))
            .sum()
    }

    /// Claims up to `max` pages for the background push, from the cursor
    /// on (wrapping around once); empty when every page is claimed.
    pub fn claim_next(&self, max: u64) -> Vec<PageRun> {
        let mut out = Vec::new();
        if self.remaining() == 0 {
            return out;
        }
        let mut cur = lock(&self.cursor);
        let (r0, p0) = *cur;
        let nreg = self.pages.len();
        let mut got = 0;
        // Every word once, starting at the cursor's.
        for step in 0..=nreg {
            let r = (r0 + step) % nreg.max(1);
            let Some(words) = self.bits.get(r) else {
                break;
            };
            let start = if step == 0 { (p0 / 64) as usize } else { 0 };
            for (w, word) in words.iter().enumerate().skip(start) {
                let mut v = word.load(Relaxed);
                if step == 0 && w == start {
                    // Pages before the cursor wait for the wrap-around.
                    v &= u64::MAX << (p0 % 64);
                }
                if v == 0 {
                    continue;
                }
                // Take the lowest set bits, up to what is still wanted.
                let want = max - got;
                let mut mask = v;
                if (v.count_ones() as u64) > want {
                    mask = 0;
                    let mut rest = v;
                    for _ in 0..want {
                        let low = rest & rest.wrapping_neg();
                        mask |= low;
                        rest &= !low;
                    }
                }
                got += self.claim_word(r, w, mask, &mut out);
                if got >= max {
                    *cur = (r, w as u64 * 64);
                    return out;
                }
            }
            if self.remaining() == 0 {
                break;
            }
        }
        *cur = (0, 0);
        out
    }

    /// The background push goes on at page `page` of `region`.
    pub fn reposition(&self, region: usize, page: u64) {
        if self.pages.get(region).is_some_and(|&p| page < p) {
            *lock(&self.cursor) = (region, page);
        }
    }
}

/// Answers page requests on the main connection (the source's main
/// reader calls [`PageServer::serve`]).
///
/// Invariant: `layout` is the RAM layout of `mem`.
pub struct PageServer {
    /// What is left to send.
    pub push: Arc<PushSet>,
    /// Source guest RAM (the VM is paused: pages no longer change).
    pub mem: Arc<GuestMemory>,
    /// `(gpa, size)` of each region.
    pub layout: Vec<(u64, u64)>,
    /// The main connection.
    pub main: Arc<MainConn>,
    /// The bandwidth cap (requested pages take from it without waiting).
    pub limiter: Arc<RateLimiter>,
    /// Statistics.
    pub stats: Arc<MigrationStats>,
    /// Abort control.
    pub ctl: Arc<Ctl>,
}

impl std::fmt::Debug for PageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageServer")
            .field("remaining", &self.push.remaining())
            .finish_non_exhaustive()
    }
}

impl PageServer {
    /// Sends the `npages` pages at `gpa` (validated against the layout),
    /// plus the next [`READAHEAD_PAGES`] still unsent, as one PAGES frame on
    /// the main connection, and moves the background push behind them.
    pub fn serve(&self, gpa: u64, npages: u64) -> Result<(), MigrationError> {
        let len = npages * PAGE_SIZE;
        let region = resolve(&self.layout, gpa, len).ok_or_else(|| {
            MigrationError::proto(format!(
                "page request {gpa:#x}+{len:#x} is outside guest RAM"
            ))
        })?;
        let first = (gpa - self.layout[region].0) / PAGE_SIZE;
        let mut claimed = Vec::new();
        self.push.claim_range(region, first, npages, &mut claimed);
        let mut runs = vec![PageRun {
            region: region as u32,
            first_page: first,
            npages,
        }];
        let after = first + npages;
        let mut ahead = Vec::new();
        self.push
            .claim_range(region, after, READAHEAD_PAGES, &mut ahead);
        runs.extend(ahead);
        self.push.reposition(region, after + READAHEAD_PAGES);
        let mut table = Vec::new();
        let mut data_runs = Vec::new();
        let c = classify(&self.mem, &runs, &mut table, &mut data_runs)?;
        let frame = Frame::Pages {
            requested: true,
            ranges: c.count,
            data_len: c.data,
            // Requested pages go as is: a vCPU waits for them.
            zstd_len: 0,
        };
        let mut payload = Vec::with_capacity(table.len() + c.data as usize);
        payload.extend_from_slice(&table);
        let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(Vec::new());
        for &(r, f, n) in &data_runs {
            v.push_guest(&self.mem, r, f, n)?;
        }
        v.append_to(&mut payload, c.data as usize);
        let wire = HEADER_LEN as u64 + frame.payload_len();
        self.limiter.take_now(wire);
        self.main
            .send(&frame, &payload, &self.ctl, "sending requested pages")?;
        self.stats.postcopy_requests.fetch_add(1, Relaxed);
        self.stats.postcopy_bytes.fetch_add(wire, Relaxed);
        self.stats.transferred_bytes.fetch_add(wire, Relaxed);
        self.stats.zero_pages.fetch_add(c.zero, Relaxed);
        self.stats.normal_pages.fetch_add(c.pages - c.zero, Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(runs: &[PageRun]) -> u64 {
        runs.iter().map(|r| r.npages).sum()
    }

    #[test]
    fn each_page_is_claimed_once() {
        let maps = vec![vec![u64::MAX, 0b1010], vec![1]];
        let s = PushSet::new(&maps, &[70, 10]);
        assert_eq!(s.remaining(), 64 + 2 + 1);
        let mut out = Vec::new();
        assert_eq!(s.claim_range(0, 10, 3, &mut out), 3);
        assert_eq!(s.claim_range(0, 10, 3, &mut out), 0);
        assert_eq!(out.len(), 1);
        s.reposition(0, 60);
        let a = s.claim_next(5);
        assert_eq!(total(&a), 5);
        assert_eq!(a[0].first_page, 60);
        let mut all = total(&a) + 3;
        loop {
            let r = s.claim_next(8);
            if r.is_empty() {
                break;
            }
            all += total(&r);
        }
        assert_eq!(all, 67);
        assert_eq!(s.remaining(), 0);
    }
}
