//! Page ranges as masks of 64-page bitmap words.

/// The words and masks covering pages `[first, end)` of a bitmap of 64
/// pages a word, lowest word first: `(word index, mask of those pages in
/// it)`. Every mask is non-zero and its set bits are contiguous.
pub(crate) fn word_masks(first: u64, end: u64) -> impl Iterator<Item = (usize, u64)> {
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
    use super::word_masks;

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
