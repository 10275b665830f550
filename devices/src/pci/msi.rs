//! MSI (capability 0x05) for device models without MSI-X ([`Msi`]).
//!
//! The capability is the 64-bit form, optionally with per-vector masking.
//! All its registers live in the function's [`PciConfig`] (so they travel
//! in [`super::PciFunctionState::config`]); the device calls
//! [`Msi::config_written`] after every config write, and the model
//! re-programs the route of each vector through [`MsiSink::set_route`]:
//! `Some(message)` exactly while the vector is deliverable (MSI enabled,
//! vector below the enabled count, not masked), `None` otherwise.

use std::sync::Arc;

use super::config::PciConfig;
use super::{MsiMessage, MsiSink};
use crate::{Error, Result};

/// Capability id of MSI.
pub const PCI_CAP_ID_MSI: u8 = 0x05;
/// Message control: MSI Enable.
pub const MSI_CONTROL_ENABLE: u16 = 1;
/// Message control: 64-bit address capable.
pub const MSI_CONTROL_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
pub const MSI_CONTROL_PVM: u16 = 1 << 8;

/// Register offsets inside the 64-bit capability.
const CONTROL: u16 = 2;
const ADDR_LO: u16 = 4;
const ADDR_HI: u16 = 8;
const DATA: u16 = 12;
const MASK: u16 = 16;
const PENDING: u16 = 20;

/// The MSI model of one function.
///
/// Invariants: `vectors` is a power of two in 1..=32; `routes[v]` is what
/// the sink was last told for vector `v`; pending bits exist only with
/// per-vector masking and stay below `vectors`.
pub struct Msi {
    cap: u16,
    vectors: u8,
    pvm: bool,
    routes: Vec<Option<MsiMessage>>,
    sink: Option<Arc<dyn MsiSink>>,
}

impl std::fmt::Debug for Msi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msi")
            .field("cap", &self.cap)
            .field("vectors", &self.vectors)
            .field("pvm", &self.pvm)
            .finish()
    }
}

impl Msi {
    /// Adds a 64-bit MSI capability with `vectors` (1, 2, 4, 8, 16 or 32)
    /// requestable vectors, with per-vector masking if `per_vector_mask`.
    /// Refuses other counts or a capability that does not fit.
    pub fn new(cfg: &mut PciConfig, vectors: u8, per_vector_mask: bool) -> Result<Self> {
        if !vectors.is_power_of_two() || vectors > 32 {
            return Err(Error::Pci(format!(
                "MSI: {vectors} vectors (1, 2, 4 .. 32)"
            )));
        }
        let mmc = vectors.trailing_zeros() as u16;
        let mut control = MSI_CONTROL_64BIT | (mmc << 1);
        if per_vector_mask {
            control |= MSI_CONTROL_PVM;
        }
        let len = if per_vector_mask { 24 } else { 14 };
        let mut cap = vec![0u8; len];
        cap[0] = PCI_CAP_ID_MSI;
        cap[2..4].copy_from_slice(&control.to_le_bytes());
        let mut wmask = vec![0u8; len];
        wmask[2] = 0x71; // Enable, Multiple Message Enable
        wmask[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        wmask[8..12].copy_from_slice(&[0xff; 4]);
        wmask[12..14].copy_from_slice(&[0xff; 2]);
        if per_vector_mask {
            let bits = if vectors == 32 {
                u32::MAX
            } else {
                (1u32 << vectors) - 1
            };
            wmask[16..20].copy_from_slice(&bits.to_le_bytes());
        }
        let at = cfg.add_capability(&cap, &wmask)?;
        Ok(Self {
            cap: at,
            vectors,
            pvm: per_vector_mask,
            routes: vec![None; usize::from(vectors)],
            sink: None,
        })
    }

    /// Offset of the capability in config space.
    pub fn cap_offset(&self) -> u16 {
        self.cap
    }

    /// Number of vectors the function can request.
    pub fn vectors(&self) -> u8 {
        self.vectors
    }

    /// MSI Enable is set in `cfg`.
    pub fn enabled(&self, cfg: &PciConfig) -> bool {
        cfg.read_u16(self.cap + CONTROL) & MSI_CONTROL_ENABLE != 0
    }

    /// Vectors the guest enabled (Multiple Message Enable, clamped).
    fn enabled_count(&self, cfg: &PciConfig) -> u8 {
        let mme = (cfg.read_u16(self.cap + CONTROL) >> 4) & 7;
        (1u8 << mme.min(5)).min(self.vectors)
    }

    /// The message of vector `v` when it is deliverable now, else `None`.
    pub fn route(&self, cfg: &PciConfig, v: u8) -> Option<MsiMessage> {
        let n = self.enabled_count(cfg);
        let masked = self.pvm && cfg.read_u32(self.cap + MASK) & (1 << v) != 0;
        if !self.enabled(cfg) || v >= n || masked {
            return None;
        }
        let address = u64::from(cfg.read_u32(self.cap + ADDR_LO))
            | (u64::from(cfg.read_u32(self.cap + ADDR_HI)) << 32);
        let data = u32::from(cfg.read_u16(self.cap + DATA));
        let data = (data & !(u32::from(n) - 1)) | u32::from(v);
        Some(MsiMessage { address, data })
    }

    /// Hands the model its sink and programs every route from `cfg`.
    /// Refuses a sink serving fewer vectors than the function has.
    pub fn attach(&mut self, sink: Arc<dyn MsiSink>, cfg: &mut PciConfig) -> Result<()> {
        if sink.count() < u16::from(self.vectors) {
            return Err(Error::Pci(format!(
                "MSI: sink serves {} vectors, function has {}",
                sink.count(),
                self.vectors
            )));
        }
        self.sink = Some(sink);
        self.sync_all(cfg, true)
    }

    /// Re-routes every vector whose route changed (or all with `force`)
    /// and delivers pending vectors that became deliverable. The first
    /// error is returned after every vector was tried.
    fn sync_all(&mut self, cfg: &mut PciConfig, force: bool) -> Result<()> {
        let Some(sink) = self.sink.clone() else {
            return Ok(());
        };
        let mut first = Ok(());
        for v in 0..self.vectors {
            let route = self.route(cfg, v);
            let slot = usize::from(v);
            let mut r = Ok(());
            if force || self.routes[slot] != route {
                r = sink.set_route(u16::from(v), route);
                if r.is_ok() {
                    self.routes[slot] = route;
                }
            }
            let pending = self.pvm && cfg.read_u32(self.cap + PENDING) & (1 << v) != 0;
            if r.is_ok() && route.is_some() && pending {
                let bits = cfg.read_u32(self.cap + PENDING) & !(1 << v);
                cfg.poke_u32(self.cap + PENDING, bits);
                r = sink.signal(u16::from(v));
            }
            if let Err(e) = r {
                log::warn!("MSI vector {v}: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Call after every config write to the function (and after a config
    /// restore): re-routes what changed and delivers unmasked pending vectors.
    pub fn config_written(&mut self, cfg: &mut PciConfig) -> Result<()> {
        self.sync_all(cfg, false)
    }

    /// Re-programs every route from `cfg` (after a restore on a migration
    /// destination).
    pub fn restore(&mut self, cfg: &mut PciConfig) -> Result<()> {
        if self.pvm {
            let valid = if self.vectors == 32 {
                u32::MAX
            } else {
                (1u32 << self.vectors) - 1
            };
            let bits = cfg.read_u32(self.cap + PENDING) & valid;
            cfg.poke_u32(self.cap + PENDING, bits);
        }
        self.sync_all(cfg, true)
    }

    /// Fires vector `v`: signals it if deliverable; else, with per-vector
    /// masking, sets its pending bit (delivered on unmask), without it the
    /// message is dropped (as a disabled MSI function does not send).
    /// Refuses a vector that does not exist.
    pub fn trigger(&mut self, cfg: &mut PciConfig, v: u8) -> Result<()> {
        if v >= self.vectors {
            return Err(Error::Pci(format!("MSI: no vector {v}")));
        }
        match (&self.sink, self.route(cfg, v)) {
            (Some(sink), Some(_)) => sink.signal(u16::from(v)),
            _ => {
                if self.pvm {
                    let bits = cfg.read_u32(self.cap + PENDING) | (1 << v);
                    cfg.poke_u32(self.cap + PENDING, bits);
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
#[path = "msi_tests.rs"]
mod tests;
