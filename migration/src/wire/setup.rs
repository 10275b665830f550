//! The SETUP payload: VM configuration, RAM layout and devices.

use super::{
    arr, MAX_CONFIG_LEN, MAX_DEVICES, MAX_DEVICE_CHUNK, MAX_DEVICE_ID, MAX_REGIONS,
    SETUP_FEATURE_HANDOVER, SETUP_FEATURE_ZSTD,
};
use crate::api::DeviceStateMode;
use crate::error::MigrationError;
use crate::traits::{MigCaps, PAGE_SIZE};

/// Description of one device in SETUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceDesc {
    /// Device id.
    pub id: String,
    /// Its capabilities on the source.
    pub caps: MigCaps,
}

/// Payload of SETUP. Invariant after decode: all lengths within the bounds
/// above, regions page-aligned.
#[derive(Debug, Clone, PartialEq)]
pub struct Setup {
    /// `SourceVm::config()` bytes.
    pub config: Vec<u8>,
    /// RAM layout as (gpa, size).
    pub regions: Vec<(u64, u64)>,
    /// Devices in order.
    pub devices: Vec<DeviceDesc>,
    /// Largest device chunk the source sends.
    pub chunk_bytes: u64,
    /// Where device data travels.
    pub device_mode: DeviceStateMode,
    /// Optional features the source will use ([`SETUP_FEATURES`] bits).
    /// 0 is not encoded at all, so that a SETUP without features is the
    /// same bytes an earlier build sent; a destination that does not know
    /// the word refuses SETUP (trailing bytes), one that knows it refuses
    /// bits it does not know.
    pub features: u32,
    /// The source hands its memory over (version 4, `unix:` only): a
    /// HANDOVER frame with the memory file descriptors follows SETUP and no
    /// RAM is sent. Encoded as the [`SETUP_FEATURE_HANDOVER`] bit of the
    /// feature word (absent: false, so a version-3 SETUP decodes unchanged).
    pub handover: bool,
}

/// The SETUP feature bits this build knows: [`SETUP_FEATURE_ZSTD`] and
/// [`SETUP_FEATURE_HANDOVER`].
pub const SETUP_FEATURES: u32 = SETUP_FEATURE_ZSTD | SETUP_FEATURE_HANDOVER;

fn caps_bits(c: MigCaps) -> u32 {
    (c.stop_copy as u32) | (c.p2p as u32) << 1 | (c.pre_copy as u32) << 2
}

impl Setup {
    /// Encodes the payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(self.config.len() + 64);
        o.extend_from_slice(&(self.config.len() as u32).to_le_bytes());
        o.extend_from_slice(&self.config);
        o.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for (gpa, size) in &self.regions {
            o.extend_from_slice(&gpa.to_le_bytes());
            o.extend_from_slice(&size.to_le_bytes());
        }
        o.extend_from_slice(&(self.devices.len() as u32).to_le_bytes());
        for d in &self.devices {
            o.extend_from_slice(&caps_bits(d.caps).to_le_bytes());
            o.extend_from_slice(&(d.id.len() as u16).to_le_bytes());
            o.extend_from_slice(d.id.as_bytes());
        }
        o.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        o.push(match self.device_mode {
            DeviceStateMode::Channels => 0,
            DeviceStateMode::Main => 1,
        });
        let word = self.features
            | if self.handover {
                SETUP_FEATURE_HANDOVER
            } else {
                0
            };
        if word != 0 {
            o.extend_from_slice(&word.to_le_bytes());
        }
        o
    }

    /// Decodes and bounds-checks a payload.
    pub fn decode(b: &[u8]) -> Result<Setup, MigrationError> {
        let mut c = Cursor { b, pos: 0 };
        let clen = c.u32()? as u64;
        if clen > MAX_CONFIG_LEN {
            return Err(MigrationError::proto(format!("config of {clen} bytes")));
        }
        let config = c.take(clen as usize)?.to_vec();
        let nreg = c.u32()?;
        if nreg == 0 || nreg > MAX_REGIONS {
            return Err(MigrationError::proto(format!("{nreg} RAM regions")));
        }
        let mut regions = Vec::with_capacity(nreg as usize);
        for _ in 0..nreg {
            let gpa = c.u64()?;
            let size = c.u64()?;
            if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || gpa.checked_add(size).is_none() {
                return Err(MigrationError::proto("unaligned RAM region"));
            }
            regions.push((gpa, size));
        }
        let ndev = c.u32()?;
        if ndev > MAX_DEVICES {
            return Err(MigrationError::proto(format!("{ndev} devices")));
        }
        let mut devices = Vec::with_capacity(ndev as usize);
        for _ in 0..ndev {
            let bits = c.u32()?;
            let idlen = c.u16()? as usize;
            if idlen > MAX_DEVICE_ID || bits & !7 != 0 {
                return Err(MigrationError::proto("invalid device description"));
            }
            let id = String::from_utf8(c.take(idlen)?.to_vec())
                .map_err(|_| MigrationError::proto("device id is not UTF-8"))?;
            let caps = MigCaps {
                stop_copy: bits & 1 != 0,
                p2p: bits & 2 != 0,
                pre_copy: bits & 4 != 0,
            };
            devices.push(DeviceDesc { id, caps });
        }
        let chunk_bytes = c.u64()?;
        if chunk_bytes == 0 || chunk_bytes > MAX_DEVICE_CHUNK {
            return Err(MigrationError::proto(format!(
                "device chunk of {chunk_bytes} bytes"
            )));
        }
        let device_mode = match c.u8()? {
            0 => DeviceStateMode::Channels,
            1 => DeviceStateMode::Main,
            v => return Err(MigrationError::proto(format!("device mode {v}"))),
        };
        let word = if c.pos == b.len() { 0 } else { c.u32()? };
        if word & !SETUP_FEATURES != 0 {
            return Err(MigrationError::Incompatible(format!(
                "SETUP asks for features {:#x} this destination does not know (it knows {:#x})",
                word, SETUP_FEATURES
            )));
        }
        if c.pos != b.len() {
            return Err(MigrationError::proto("trailing bytes in SETUP"));
        }
        let handover = word & SETUP_FEATURE_HANDOVER != 0;
        let features = word & !SETUP_FEATURE_HANDOVER;
        Ok(Setup {
            config,
            regions,
            devices,
            chunk_bytes,
            device_mode,
            features,
            handover,
        })
    }
}

/// Bounds-checked reader over a byte slice.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MigrationError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| MigrationError::proto("truncated SETUP payload"))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, MigrationError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MigrationError> {
        Ok(u16::from_le_bytes(arr(self.take(2)?)))
    }
    fn u32(&mut self) -> Result<u32, MigrationError> {
        Ok(u32::from_le_bytes(arr(self.take(4)?)))
    }
    fn u64(&mut self) -> Result<u64, MigrationError> {
        Ok(u64::from_le_bytes(arr(self.take(8)?)))
    }
}
