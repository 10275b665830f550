//! Post-copy page bitmaps (payload of POSTCOPY and RESUME_ACK): for each RAM
//! region of the layout SETUP announced, in layout order, `ceil(pages / 64)`
//! little-endian u64 words; bit `i` of word `i / 64` is page `i` of the
//! region. Bits past a region's last page are zero.

use super::arr;
use crate::error::MigrationError;
use crate::traits::PAGE_SIZE;

/// Words of the bitmap of a region of `size` bytes.
fn words(size: u64) -> u64 {
    (size / PAGE_SIZE).div_ceil(64)
}

/// Exact payload length of a bitmap for `layout` (`(gpa, size)` pairs).
pub fn bitmap_len(layout: &[(u64, u64)]) -> u64 {
    layout.iter().map(|&(_, s)| words(s) * 8).sum()
}

/// Encodes one bitmap per region (each `ceil(pages / 64)` words; shorter
/// ones are padded with zeroes, longer ones truncated).
pub fn encode_bitmap(layout: &[(u64, u64)], maps: &[Vec<u64>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bitmap_len(layout) as usize);
    for (i, &(_, size)) in layout.iter().enumerate() {
        let m = maps.get(i).map(Vec::as_slice).unwrap_or(&[]);
        for w in 0..words(size) as usize {
            out.extend_from_slice(&m.get(w).copied().unwrap_or(0).to_le_bytes());
        }
    }
    out
}

/// Decodes a bitmap for `layout`: the length must be exactly
/// [`bitmap_len`], bits past each region's last page must be clear, and
/// the number of set bits must be `count` (what the header announced).
pub fn decode_bitmap(
    payload: &[u8],
    layout: &[(u64, u64)],
    count: u64,
) -> Result<Vec<Vec<u64>>, MigrationError> {
    let want = bitmap_len(layout);
    if payload.len() as u64 != want {
        return Err(MigrationError::proto(format!(
            "page bitmap of {} bytes, the RAM layout needs {want}",
            payload.len()
        )));
    }
    let mut out = Vec::with_capacity(layout.len());
    let mut at = 0usize;
    let mut set = 0u64;
    for (r, &(_, size)) in layout.iter().enumerate() {
        let pages = size / PAGE_SIZE;
        let n = words(size) as usize;
        let mut m = Vec::with_capacity(n);
        for w in 0..n {
            let v = u64::from_le_bytes(arr(&payload[at..at + 8]));
            at += 8;
            let first = w as u64 * 64;
            if first + 64 > pages && v >> (pages - first) != 0 {
                return Err(MigrationError::proto(format!(
                    "page bitmap of region {r} marks pages past its end"
                )));
            }
            set += v.count_ones() as u64;
            m.push(v);
        }
        out.push(m);
    }
    if set != count {
        return Err(MigrationError::proto(format!(
            "page bitmap holds {set} pages, the header announced {count}"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bounds() {
        let layout = [(0u64, 100 * PAGE_SIZE), (1 << 32, 64 * PAGE_SIZE)];
        assert_eq!(bitmap_len(&layout), 2 * 8 + 8);
        let maps = vec![vec![0b1011, 1 << 35], vec![u64::MAX]];
        let b = encode_bitmap(&layout, &maps);
        assert_eq!(decode_bitmap(&b, &layout, 3 + 1 + 64).unwrap(), maps);
        assert!(decode_bitmap(&b, &layout, 5).is_err(), "count checked");
        assert!(
            decode_bitmap(&b[..16], &layout, 4).is_err(),
            "length checked"
        );
        // Page 100 of region 0 does not exist.
        let bad = encode_bitmap(&layout, &[vec![0, 1 << 36], vec![]]);
        let e = decode_bitmap(&bad, &layout, 1).unwrap_err();
        assert!(e.to_string().contains("past its end"), "{e}");
    }
}
