//! DMA dirty logging of the simulated device, with the semantics of the
//! kernel's VFIO_DEVICE_FEATURE_DMA_LOGGING_{START,REPORT,STOP}.

use std::ops::Range;

/// Most ranges a START accepts (the kernel's LOG_MAX_RANGES).
pub const MAX_RANGES: usize = 256;
/// Most pages a START may track in total (32 MiB of bitmap).
pub const MAX_TRACKED_PAGES: u64 = 1 << 28;
/// Smallest page size (START and REPORT).
pub const MIN_PAGE_SIZE: u64 = 4096;
/// Largest page size accepted.
pub const MAX_PAGE_SIZE: u64 = 1 << 30;

/// One tracked range and its bitmap (bit `i`: page `start + i * page_size`).
#[derive(Debug)]
struct Tracked {
    start: u64,
    end: u64,
    bits: Vec<u64>,
}

/// The device's DMA log.
///
/// Invariants: while started, `ranges` is sorted, non-overlapping, each
/// range non-empty and `page_size`-aligned, each bitmap covers its range
/// exactly (bits past the end are zero); `record` false (`dma-log=off`)
/// means no bit is ever set.
#[derive(Debug, Default)]
pub struct DmaLogState {
    started: Option<Started>,
}

#[derive(Debug)]
struct Started {
    page_size: u64,
    shift: u32,
    record: bool,
    ranges: Vec<Tracked>,
}

fn check_page_size(page_size: u64) -> Result<u32, String> {
    if !page_size.is_power_of_two() || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&page_size) {
        return Err(format!(
            "DMA logging page size {page_size} is not a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE}"
        ));
    }
    Ok(page_size.trailing_zeros())
}

impl DmaLogState {
    /// Whether logging is started.
    pub fn active(&self) -> bool {
        self.started.is_some()
    }

    /// START: tracks `ranges` at `page_size`. `record` false: accepted, but
    /// nothing will ever be recorded. Fails (leaving the log stopped) on a
    /// bad page size, no range or more than [`MAX_RANGES`], an empty,
    /// unaligned, wrapping or overlapping range, too many pages, or when
    /// logging is already started.
    pub fn start(
        &mut self,
        ranges: &[Range<u64>],
        page_size: u64,
        record: bool,
    ) -> Result<(), String> {
        if self.started.is_some() {
            return Err("DMA logging is already started".into());
        }
        let shift = check_page_size(page_size)?;
        if ranges.is_empty() || ranges.len() > MAX_RANGES {
            return Err(format!(
                "DMA logging needs 1 to {MAX_RANGES} ranges, got {}",
                ranges.len()
            ));
        }
        let mut sorted: Vec<Range<u64>> = ranges.to_vec();
        sorted.sort_by_key(|r| r.start);
        let mut total = 0u64;
        let mut prev_end = None;
        for r in &sorted {
            if r.start >= r.end
                || !r.start.is_multiple_of(page_size)
                || !r.end.is_multiple_of(page_size)
            {
                return Err(format!(
                    "DMA logging range [{:#x}, {:#x}) is empty or not aligned to {page_size}",
                    r.start, r.end
                ));
            }
            if prev_end.is_some_and(|e| r.start < e) {
                return Err(format!(
                    "DMA logging range [{:#x}, {:#x}) overlaps another",
                    r.start, r.end
                ));
            }
            prev_end = Some(r.end);
            total += (r.end - r.start) >> shift;
            if total > MAX_TRACKED_PAGES {
                return Err(format!(
                    "DMA logging ranges hold more than {MAX_TRACKED_PAGES} pages"
                ));
            }
        }
        let mut tracked = Vec::with_capacity(sorted.len());
        for r in sorted {
            let words = ((r.end - r.start) >> shift).div_ceil(64) as usize;
            let mut bits = Vec::new();
            bits.try_reserve_exact(words)
                .map_err(|e| format!("allocating the DMA log: {e}"))?;
            bits.resize(words, 0);
            tracked.push(Tracked {
                start: r.start,
                end: r.end,
                bits,
            });
        }
        self.started = Some(Started {
            page_size,
            shift,
            record,
            ranges: tracked,
        });
        Ok(())
    }

    /// Records a device write of `[gpa, gpa + len)` (nothing when stopped,
    /// outside the ranges, or with `record` false).
    pub fn mark(&mut self, gpa: u64, len: u64) {
        let Some(s) = self.started.as_mut() else {
            return;
        };
        if !s.record || len == 0 {
            return;
        }
        let end = gpa.saturating_add(len);
        for t in s.ranges.iter_mut() {
            let lo = gpa.max(t.start);
            let hi = end.min(t.end);
            if lo >= hi {
                continue;
            }
            for p in (lo - t.start) >> s.shift..=(hi - 1 - t.start) >> s.shift {
                t.bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    /// REPORT: sets bit `i` of `bitmap` for every page `iova + i *
    /// page_size` of `[iova, iova + length)` that overlaps a page written
    /// since the previous report, and clears the device's log for the
    /// tracked pages entirely inside the range. Fails (changing nothing) when
    /// stopped, on a bad page size, an empty or wrapping range, a range not
    /// covered by START's ranges, or a bitmap shorter than the range.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), String> {
        let s = self
            .started
            .as_mut()
            .ok_or_else(|| "DMA logging is not started".to_string())?;
        let rshift = check_page_size(page_size)?;
        let end = iova
            .checked_add(length)
            .filter(|_| length > 0)
            .ok_or_else(|| format!("DMA log report range [{iova:#x}, +{length:#x}) is bad"))?;
        let need = length.div_ceil(page_size);
        if (bitmap.len() as u64).saturating_mul(64) < need {
            return Err(format!(
                "DMA log report bitmap has {} words, {need} pages need {}",
                bitmap.len(),
                need.div_ceil(64)
            ));
        }
        // [iova, end) must be covered by the (sorted) tracked ranges.
        let mut at = iova;
        for t in &s.ranges {
            if t.start <= at && at < t.end {
                at = t.end;
            }
            if at >= end {
                break;
            }
        }
        if at < end {
            return Err(format!(
                "DMA log report range [{iova:#x}, {end:#x}) is not inside the logged ranges (from {at:#x})"
            ));
        }
        let tsize = s.page_size;
        for t in s.ranges.iter_mut() {
            let lo = iova.max(t.start);
            let hi = end.min(t.end);
            if lo >= hi {
                continue;
            }
            let first = (lo - t.start) >> s.shift;
            let last = (hi - 1 - t.start) >> s.shift;
            let mut w = first / 64;
            while w <= last / 64 {
                let mut word = t.bits[w as usize];
                // Only the bits of pages first..=last.
                let base = w * 64;
                if base < first {
                    word &= !0u64 << (first - base);
                }
                if last < base + 63 {
                    word &= !0u64 >> (63 - (last - base));
                }
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    word &= word - 1;
                    let p = base + b;
                    let pa = t.start + (p << s.shift);
                    let pe = pa + tsize;
                    let (a, e) = (pa.max(iova), pe.min(end));
                    for i in (a - iova) >> rshift..=(e - 1 - iova) >> rshift {
                        bitmap[(i / 64) as usize] |= 1 << (i % 64);
                    }
                    if pa >= iova && pe <= end {
                        t.bits[w as usize] &= !(1u64 << b);
                    }
                }
                w += 1;
            }
        }
        Ok(())
    }

    /// STOP: forgets the log (idempotent).
    pub fn stop(&mut self) {
        self.started = None;
    }
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    #[test]
    fn start_validates() {
        let mut l = DmaLogState::default();
        for ps in [0, 1, 2048, 4097, 3 * 4096, 1 << 31] {
            assert!(l.start(&[0..1 << 20], ps, true).is_err(), "{ps}");
        }
        assert!(l.start(&[], P, true).is_err());
        assert!(l.start(&[0..0], P, true).is_err());
        assert!(l.start(&[10..P], P, true).is_err());
        assert!(l.start(&[0..P + 1], P, true).is_err());
        assert!(l.start(&[0..2 * P, P..3 * P], P, true).is_err());
        assert!(l.start(&[0..!(P - 1)], P, true).is_err());
        let many: Vec<_> = (0..257).map(|i| i * 2 * P..i * 2 * P + P).collect();
        assert!(l.start(&many, P, true).is_err());
        assert!(!l.active());
        l.start(&[1 << 20..2 << 20, 0..P], P, true).unwrap();
        assert!(l.active());
        assert!(l.start(&[0..P], P, true).is_err(), "already started");
        l.stop();
        l.stop();
        assert!(!l.active());
    }

    #[test]
    fn report_sets_and_clears() {
        let mut l = DmaLogState::default();
        let mut bm = [0u64; 4];
        assert!(l.report(0, P, P, &mut bm).is_err(), "not started");
        l.start(&[0..128 * P, 1 << 30..(1 << 30) + 64 * P], P, true)
            .unwrap();
        l.mark(3 * P, P);
        l.mark(127 * P, P);
        l.mark((1 << 30) + 5 * P, P);
        l.mark(200 * P, P); // outside: not tracked
        l.report(0, 128 * P, P, &mut bm).unwrap();
        assert_eq!(bm, [1 << 3, 1 << 63, 0, 0]);
        // Cleared by the report.
        let mut bm = [0u64; 2];
        l.report(0, 128 * P, P, &mut bm).unwrap();
        assert_eq!(bm, [0, 0]);
        // Partial report with an offset, bits already set are kept.
        let mut bm = [1u64 << 40];
        l.report((1 << 30) + 4 * P, 8 * P, P, &mut bm).unwrap();
        assert_eq!(bm, [(1 << 40) | (1 << 1)]);
        // Bad reports.
        let mut small = [0u64; 1];
        assert!(l.report(0, 65 * P, P, &mut small).is_err(), "bitmap");
        assert!(l.report(0, 129 * P, P, &mut bm).is_err(), "outside");
        assert!(l.report(100 * P, 0, P, &mut bm).is_err(), "empty");
        assert!(l.report(u64::MAX - P, 2 * P, P, &mut bm).is_err(), "wraps");
        assert!(l.report(0, P, 1000, &mut bm).is_err(), "page size");
        l.stop();
        assert!(l.report(0, P, P, &mut bm).is_err());
    }

    #[test]
    fn report_at_other_page_sizes() {
        let mut l = DmaLogState::default();
        l.start(&[0..64 * P, 64 * P..128 * P], P, true).unwrap();
        l.mark(5 * P, P);
        l.mark(70 * P, P);
        // 2 MiB report pages over two adjacent ranges: both fold into bit 0.
        let mut bm = [0u64; 1];
        l.report(0, 128 * P, 512 * P, &mut bm).unwrap();
        assert_eq!(bm, [1]);
        // Tracking at 16 KiB, reporting at 4 KiB: one tracked page sets 4.
        let mut l = DmaLogState::default();
        l.start(&[0..64 * P], 4 * P, true).unwrap();
        l.mark(9 * P, P);
        let mut bm = [0u64; 1];
        l.report(0, 64 * P, P, &mut bm).unwrap();
        assert_eq!(bm, [0xf << 8]);
    }

    #[test]
    fn off_records_nothing() {
        let mut l = DmaLogState::default();
        l.start(&[0..64 * P], P, false).unwrap();
        l.mark(0, P);
        let mut bm = [0u64; 1];
        l.report(0, 64 * P, P, &mut bm).unwrap();
        assert_eq!(bm, [0]);
    }
}
