//! Page ranges as masks of 64-page bitmap words: the layout of KVM's dirty
//! log and of [`crate::DirtyBitmap`], shared with the VMM's dirty tracker.

use std::ops::Range;

/// The words and masks covering pages `[first, end)` of a bitmap of 64
/// pages a word, lowest word first: `(word index, mask of those pages in
/// it)`. Every mask is non-zero and its set bits are contiguous.
pub fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
    let mut p = first;
    std::iter::from_fn(move || {
        if p >= end {
            return None;
        }
        let bit = p % 64;
        let take = (64 - bit).min(end - p);
        let mask = if take == 64 {
            u64::MAX
        } else {
            ((1u64 << take) - 1) << bit
        };
        let word = (p / 64) as usize;
        p += take;
        Some((word, mask))
    })
}

/// The bitmap of a region of `pages` pages with the pages of the byte
/// `ranges` set (each rounded out to whole pages, clipped to the region).
/// Allocated zeroed: only the words of the ranges are written.
pub fn ranges_words(ranges: &[Range<u64>], pages: u64, page_size: u64) -> Vec<u64> {
    let mut words = vec![0u64; pages.div_ceil(64) as usize];
    for r in ranges {
        let end = r.end.div_ceil(page_size).min(pages);
        for (word, mask) in word_masks(r.start / page_size, end) {
            words[word] |= mask;
        }
    }
    words
}

/// `n` zero words, every page of them written (faulted in): unlike
/// `vec![0; n]`, which may leave the kernel's zero page mapped until the
/// first write, off the path that needs the buffer fast.
#[allow(clippy::slow_vector_initialization)]
pub fn written_zeros(n: usize) -> Vec<u64> {
    let mut v = Vec::with_capacity(n);
    v.resize(n, 0u64);
    v
}

/// Whether page `page` of region `region` is set in `maps` (one bitmap of
/// 64 pages a word per region); pages past a bitmap's end, and regions
/// past the last, are not.
pub(crate) fn page_set(maps: &[Vec<u64>], region: usize, page: u64) -> bool {
    maps.get(region)
        .and_then(|m| m.get((page / 64) as usize))
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

#[cfg(test)]
mod tests {
    use super::{ranges_words, word_masks};

    #[test]
    fn ranges_become_their_pages_rounded_out_and_clipped() {
        assert_eq!(ranges_words(&[], 130, 4096), vec![0, 0, 0]);
        // Bytes 4095..4097: pages 0 and 1. Bytes past page 129 are dropped.
        assert_eq!(
            ranges_words(&[4095..4097, 128 * 4096..200 * 4096], 130, 4096),
            vec![0b11, 0, 0b11]
        );
    }

    #[test]
    fn masks_cover_exactly_the_range() {
        assert_eq!(word_masks(5, 5).count(), 0);
        assert_eq!(word_masks(0, 64).collect::<Vec<_>>(), vec![(0, u64::MAX)]);
        assert_eq!(
            word_masks(62, 130).collect::<Vec<_>>(),
            vec![(0, 0b11 << 62), (1, u64::MAX), (2, 0b11)]
        );
        assert_eq!(word_masks(3, 4).collect::<Vec<_>>(), vec![(0, 1 << 3)]);
    }
}
