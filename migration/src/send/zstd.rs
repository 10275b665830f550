//! A writer thread's side of RAM compression: the page data of a packet is
//! copied out of guest memory (a byte copy, as the record layer does: the
//! guest runs and guest memory is never a Rust slice) into a scratch
//! buffer, and compressed from there with the thread's own zstd context.
//!
//! A large packet is first judged by a sample: [`SAMPLE_PAGES`] of its
//! data pages, spread over it, are copied and compressed alone; when they
//! save less than 1/[`SAMPLE_MIN_SAVING`] of their size the packet goes as
//! is without being copied or compressed whole. On incompressible memory
//! this cuts the cost of trying to ~2% of a full attempt (measured in
//! `docs/benchmarks.md`, "Compression"); a packet whose sample is
//! incompressible but whose other pages are not is then sent as is, which
//! costs bytes, never correctness.

use crate::compress::{PacketCompressor, MAX_PACKET_BYTES};
use crate::error::MigrationError;
use crate::guest_mem::{Gather, GuestMemory, IoVecs};
use crate::traits::PAGE_SIZE;

/// Data pages of the sample a large packet is judged by.
pub const SAMPLE_PAGES: u64 = 8;
/// A sample must shrink by at least 1/this of its size for the packet to
/// be compressed whole.
pub const SAMPLE_MIN_SAVING: usize = 32;

/// One writer's compression state, reused for every packet.
///
/// Invariant: `raw` holds at most [`MAX_PACKET_BYTES`] (a packet's page
/// data) and is overwritten by each [`WriterZstd::pack`].
pub struct WriterZstd {
    cx: PacketCompressor,
    raw: Vec<u8>,
    storage: Vec<libc::iovec>,
}

impl WriterZstd {
    /// A context at `level`.
    pub fn new(level: i32) -> Result<Self, MigrationError> {
        Ok(WriterZstd {
            cx: PacketCompressor::new(level)?,
            raw: Vec::new(),
            storage: Vec::with_capacity(1030),
        })
    }

    /// Compresses the `data` bytes of the data runs `(region, first page,
    /// pages)` of one packet: `Some(compressed)` when they shrink, `None`
    /// when the packet should go as is (straight from guest memory).
    pub fn pack(
        &mut self,
        mem: &GuestMemory,
        data_runs: &[(usize, u64, u64)],
        data: u64,
    ) -> Result<Option<&[u8]>, MigrationError> {
        let data = data as usize;
        if data == 0 || data > MAX_PACKET_BYTES {
            return Ok(None);
        }
        let pages = data as u64 / PAGE_SIZE;
        if pages > 4 * SAMPLE_PAGES && !self.sample_shrinks(mem, data_runs, pages)? {
            return Ok(None);
        }
        self.raw.clear();
        let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(std::mem::take(&mut self.storage));
        for &(region, first, n) in data_runs {
            v.push_guest(mem, region, first, n)?;
        }
        let got = v.append_to(&mut self.raw, data);
        self.storage = v.into_storage();
        if got != data {
            return Err(MigrationError::Internal(format!(
                "packet data of {got} bytes, {data} classified"
            )));
        }
        Ok(self.cx.compress(&self.raw))
    }

    /// Whether [`SAMPLE_PAGES`] data pages spread evenly over the packet's
    /// `pages` data pages compress by at least 1/[`SAMPLE_MIN_SAVING`].
    fn sample_shrinks(
        &mut self,
        mem: &GuestMemory,
        data_runs: &[(usize, u64, u64)],
        pages: u64,
    ) -> Result<bool, MigrationError> {
        self.raw.clear();
        let mut v: IoVecs<'_, Gather> = IoVecs::with_storage(std::mem::take(&mut self.storage));
        // Data page indexes k·pages/S + pages/(2S), k < S: strictly
        // increasing and < pages, so one walk over the runs finds them.
        let mut want =
            (0..SAMPLE_PAGES).map(|k| k * pages / SAMPLE_PAGES + pages / (2 * SAMPLE_PAGES));
        let mut next = want.next();
        let mut base = 0u64;
        for &(region, first, n) in data_runs {
            while let Some(i) = next.filter(|&i| i < base + n) {
                v.push_guest(mem, region, first + (i - base), 1)?;
                next = want.next();
            }
            base += n;
        }
        let len = (SAMPLE_PAGES * PAGE_SIZE) as usize;
        let got = v.append_to(&mut self.raw, len);
        self.storage = v.into_storage();
        if got != len {
            return Err(MigrationError::Internal(format!(
                "sample of {got} bytes, {len} wanted"
            )));
        }
        Ok(self
            .cx
            .compress(&self.raw)
            .is_some_and(|p| p.len() * SAMPLE_MIN_SAVING <= got * (SAMPLE_MIN_SAVING - 1)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::tests::FakeSource;
    use crate::traits::SourceVm;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn text(len: usize) -> Vec<u8> {
        b"Pages of text compress well. "
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()
    }

    /// Random pages are judged by their sample and sent as is; text pages
    /// and a packet half text, half random are compressed; runs split
    /// over two regions are sampled across them.
    #[test]
    fn the_sample_decides() {
        let p = PAGE_SIZE as usize;
        let fake = Arc::new(FakeSource::new(&[
            (0, 1024 * PAGE_SIZE),
            (1 << 32, 512 * PAGE_SIZE),
        ]));
        fake.write(0, 0, &noise(512 * p, 7));
        fake.write(0, 512 * PAGE_SIZE, &text(512 * p));
        fake.write(1, 0, &text(256 * p));
        fake.write(1, 256 * PAGE_SIZE, &noise(256 * p, 9));
        let vm: Arc<dyn SourceVm> = fake.clone();
        let mem = GuestMemory::of_source(&vm);
        let mut z = WriterZstd::new(1).unwrap();
        let pack = |z: &mut WriterZstd, runs: &[(usize, u64, u64)]| {
            let data = runs.iter().map(|r| r.2).sum::<u64>() * PAGE_SIZE;
            z.pack(&mem, runs, data).unwrap().map(|c| c.len())
        };
        assert_eq!(pack(&mut z, &[(0, 0, 512)]), None);
        let t = pack(&mut z, &[(0, 512, 512)]).expect("text compresses");
        assert!(t * 50 < 512 * p, "{t}");
        let mixed = pack(&mut z, &[(1, 0, 512)]).expect("half text compresses");
        assert!(mixed < 300 * p, "{mixed}");
        // Two runs: 100 random pages, then 400 text pages.
        assert!(pack(&mut z, &[(0, 412, 100), (0, 512, 400)]).is_some());
        // Small packets are tried whole: 32 random pages.
        assert_eq!(pack(&mut z, &[(0, 0, 32)]), None);
        assert!(pack(&mut z, &[(1, 0, 4)]).is_some());
    }
}
