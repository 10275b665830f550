//! Little-endian byte-buffer builder and checksum helpers for firmware
//! tables (MP table, ACPI), which are defined byte by byte by their specs.

/// Append-only little-endian byte buffer.
#[derive(Debug, Default, Clone)]
pub(crate) struct ByteBuf(pub(crate) Vec<u8>);

impl ByteBuf {
    pub(crate) fn new() -> Self {
        Self::default()
    }
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn zeros(&mut self, n: usize) -> &mut Self {
        self.0.resize(self.0.len() + n, 0);
        self
    }
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
    /// Overwrites a little-endian u32 at `off` (caller guarantees bounds).
    pub(crate) fn put_u32(&mut self, off: usize, v: u32) {
        self.0[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
}

/// Byte that makes the wrapping sum of `data` plus itself zero.
pub(crate) fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Wrapping byte sum; zero for a correctly checksummed table.
#[cfg(test)]
pub(crate) fn sum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |acc, b| acc.wrapping_add(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_zeroes_sum() {
        let mut d = vec![1u8, 2, 3, 250, 7];
        d.push(checksum(&d));
        assert_eq!(sum(&d), 0);
    }

    #[test]
    fn little_endian() {
        let mut b = ByteBuf::new();
        b.u8(1)
            .u16(0x0302)
            .u32(0x0706_0504)
            .u64(0x0f0e_0d0c_0b0a_0908);
        assert_eq!(b.0, (1..=15).collect::<Vec<u8>>());
        b.put_u32(0, 0xaaaa_aaaa);
        assert_eq!(&b.0[..5], &[0xaa, 0xaa, 0xaa, 0xaa, 5]);
    }
}
