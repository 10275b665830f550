//! A writer thread's side of RAM compression: the page data of a packet is
//! copied out of guest memory (a byte copy, as the record layer does: the
//! guest runs and guest memory is never a Rust slice) into a scratch
//! buffer, and compressed from there with the thread's own zstd context.

use crate::compress::{PacketCompressor, MAX_PACKET_BYTES};
use crate::error::MigrationError;
use crate::guest_mem::{Gather, GuestMemory, IoVecs};

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
}
