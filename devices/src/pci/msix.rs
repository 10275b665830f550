//! MSI-X: the capability, the vector table and the pending-bit array a
//! device model embeds ([`Msix`]).
//!
//! The capability's message control lives in the function's
//! [`PciConfig`] (Enable bit 15 and Function Mask bit 14 writable, table
//! size read-only); the device calls [`Msix::config_written`] after every
//! config write. Table and PBA accesses in the BAR go to
//! [`Msix::bar_read`]/[`Msix::bar_write`]. Every change of an entry, its
//! mask, the function mask or the enable bit re-programs the vector's
//! route through [`MsiSink::set_route`]: `Some(message)` exactly while the
//! vector is deliverable (enabled, function not masked, entry not masked),
//! `None` otherwise.

use std::ops::Range;
use std::sync::Arc;

use super::config::PciConfig;
use super::{MsiMessage, MsiSink, MsixEntry, MsixState};
use crate::{Error, Result};

/// Capability id of MSI-X.
pub const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Length of the MSI-X capability.
pub const MSIX_CAP_SIZE: usize = 12;
/// Bytes per table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Most vectors a function may have.
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Message control: MSI-X Enable.
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Message control: Function Mask.
pub const MSIX_CONTROL_MASK: u16 = 1 << 14;
/// Vector control: the entry is masked.
pub const MSIX_ENTRY_MASKED: u32 = 1;

/// The MSI-X model of one function.
///
/// Invariants: `state.entries.len() == vectors`, `state.pba.len() ==
/// vectors.div_ceil(64)` and no pending bit at or past `vectors`;
/// `routes[v]` is what the sink was last told for vector `v`.
pub struct Msix {
    cap: u16,
    vectors: u16,
    table_bar: u8,
    table_offset: u64,
    pba_bar: u8,
    pba_offset: u64,
    state: MsixState,
    routes: Vec<Option<MsiMessage>>,
    sink: Option<Arc<dyn MsiSink>>,
}

impl std::fmt::Debug for Msix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Msix")
            .field("cap", &self.cap)
            .field("vectors", &self.vectors)
            .field("state", &self.state)
            .finish()
    }
}

fn le_bytes_read(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}

impl Msix {
    /// Adds an MSI-X capability with `vectors` vectors to `cfg`: the table
    /// at `table_offset` of BAR `table_bar`, the PBA at `pba_offset` of BAR
    /// `pba_bar`. Every entry starts masked, MSI-X disabled.
    ///
    /// Refuses `vectors` outside `1..=2048`, offsets that are not 8-byte
    /// aligned, BARs not declared in `cfg` (or I/O BARs), a table or PBA
    /// that does not fit its BAR, a table overlapping the PBA, or a
    /// capability that does not fit.
    pub fn new(
        cfg: &mut PciConfig,
        vectors: u16,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<Self> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(Error::Pci(format!("MSI-X: {vectors} vectors (1..=2048)")));
        }
        if !table_offset.is_multiple_of(8) || !pba_offset.is_multiple_of(8) {
            return Err(Error::Pci(
                "MSI-X: table/PBA offsets must be 8-byte aligned".into(),
            ));
        }
        let table_len = u64::from(vectors) * MSIX_ENTRY_SIZE;
        let pba_len = u64::from(vectors.div_ceil(64)) * 8;
        let fits = |bar: u8, off: u32, len: u64| {
            !cfg.bar_is_io(usize::from(bar))
                && cfg
                    .bar_size(usize::from(bar))
                    .is_some_and(|size| u64::from(off) + len <= size)
        };
        if !fits(table_bar, table_offset, table_len) || !fits(pba_bar, pba_offset, pba_len) {
            return Err(Error::Pci(
                "MSI-X: table or PBA outside its memory BAR".into(),
            ));
        }
        let (t, p) = (u64::from(table_offset), u64::from(pba_offset));
        if table_bar == pba_bar && t < p + pba_len && p < t + table_len {
            return Err(Error::Pci("MSI-X: table overlaps the PBA".into()));
        }
        let control = vectors - 1;
        let mut cap = vec![PCI_CAP_ID_MSIX, 0];
        cap.extend_from_slice(&control.to_le_bytes());
        cap.extend_from_slice(&(table_offset | u32::from(table_bar)).to_le_bytes());
        cap.extend_from_slice(&(pba_offset | u32::from(pba_bar)).to_le_bytes());
        let wmask = [0, 0, 0, 0xc0];
        let at = cfg.add_capability(&cap, &wmask)?;
        let entries = vec![
            MsixEntry {
                ctrl: MSIX_ENTRY_MASKED,
                ..Default::default()
            };
            usize::from(vectors)
        ];
        Ok(Self {
            cap: at,
            vectors,
            table_bar,
            table_offset: t,
            pba_bar,
            pba_offset: p,
            state: MsixState {
                enabled: false,
                function_masked: false,
                entries,
                pba: vec![0; usize::from(vectors.div_ceil(64))],
            },
            routes: vec![None; usize::from(vectors)],
            sink: None,
        })
    }

    /// Offset of the capability in config space.
    pub fn cap_offset(&self) -> u16 {
        self.cap
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.vectors
    }

    /// MSI-X Enable is set.
    pub fn enabled(&self) -> bool {
        self.state.enabled
    }

    /// Function Mask is set.
    pub fn function_masked(&self) -> bool {
        self.state.function_masked
    }

    /// `(BAR, offsets in the BAR)` of the table.
    pub fn table_range(&self) -> (u8, Range<u64>) {
        let len = u64::from(self.vectors) * MSIX_ENTRY_SIZE;
        (self.table_bar, self.table_offset..self.table_offset + len)
    }

    /// `(BAR, offsets in the BAR)` of the PBA.
    pub fn pba_range(&self) -> (u8, Range<u64>) {
        let len = self.state.pba.len() as u64 * 8;
        (self.pba_bar, self.pba_offset..self.pba_offset + len)
    }

    /// Entry `v`, if it exists.
    pub fn entry(&self, v: u16) -> Option<MsixEntry> {
        self.state.entries.get(usize::from(v)).copied()
    }

    /// The pending bit of vector `v` (false for a vector that does not exist).
    pub fn pending(&self, v: u16) -> bool {
        self.state
            .pba
            .get(usize::from(v / 64))
            .is_some_and(|w| w & (1 << (v % 64)) != 0)
    }

    /// The message of vector `v` when it is deliverable now (enabled, not
    /// function-masked, entry not masked), else `None`.
    pub fn route(&self, v: u16) -> Option<MsiMessage> {
        let e = self.entry(v)?;
        if !self.state.enabled || self.state.function_masked || e.ctrl & MSIX_ENTRY_MASKED != 0 {
            return None;
        }
        Some(MsiMessage {
            address: u64::from(e.addr_lo) | (u64::from(e.addr_hi) << 32),
            data: e.data,
        })
    }

    /// Hands the model its sink and programs every vector's route.
    /// Refuses a sink serving fewer vectors than the function has.
    pub fn attach(&mut self, sink: Arc<dyn MsiSink>) -> Result<()> {
        if sink.count() < self.vectors {
            return Err(Error::Pci(format!(
                "MSI-X: sink serves {} vectors, function has {}",
                sink.count(),
                self.vectors
            )));
        }
        self.sink = Some(sink);
        self.sync_all(true)
    }

    /// Re-programs the route of `v` if it changed (or `force`), then
    /// delivers its pending bit if it became deliverable.
    fn sync(&mut self, v: u16, force: bool) -> Result<()> {
        let route = self.route(v);
        let Some(sink) = self.sink.clone() else {
            return Ok(());
        };
        let slot = usize::from(v);
        if force || self.routes[slot] != route {
            sink.set_route(v, route)?;
            self.routes[slot] = route;
        }
        if route.is_some() && self.pending(v) {
            self.state.pba[slot / 64] &= !(1 << (v % 64));
            sink.signal(v)?;
        }
        Ok(())
    }

    /// [`Msix::sync`] of every vector; the first error is returned after
    /// all vectors were tried.
    fn sync_all(&mut self, force: bool) -> Result<()> {
        let mut first = Ok(());
        for v in 0..self.vectors {
            if let Err(e) = self.sync(v, force) {
                log::warn!("MSI-X vector {v}: {e}");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }

    /// Takes Enable and Function Mask from the message control in `cfg`
    /// (call after every config write to the function) and re-routes
    /// when either changed.
    pub fn config_written(&mut self, cfg: &PciConfig) -> Result<()> {
        let control = cfg.read_u16(self.cap + 2);
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let masked = control & MSIX_CONTROL_MASK != 0;
        if enabled == self.state.enabled && masked == self.state.function_masked {
            return Ok(());
        }
        self.state.enabled = enabled;
        self.state.function_masked = masked;
        self.sync_all(false)
    }

    fn table_bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(self.state.entries.len() * 16);
        for e in &self.state.entries {
            for w in [e.addr_lo, e.addr_hi, e.data, e.ctrl] {
                b.extend_from_slice(&w.to_le_bytes());
            }
        }
        b
    }

    /// Reads the table at `offset` (from the table start); any size,
    /// bytes past the table read 0.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        le_bytes_read(&self.table_bytes(), offset, data);
    }

    /// Writes the table at `offset` (from the table start): aligned dword
    /// or qword accesses only (others are ignored, as the PCI spec allows).
    /// Only bit 0 of vector control is writable. Re-routes the entry.
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let len = data.len() as u64;
        let table_len = u64::from(self.vectors) * MSIX_ENTRY_SIZE;
        if !(len == 4 || len == 8)
            || !offset.is_multiple_of(len)
            || offset.saturating_add(len) > table_len
        {
            return Ok(());
        }
        let v = (offset / MSIX_ENTRY_SIZE) as u16;
        for (k, chunk) in data.chunks_exact(4).enumerate() {
            let word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let field = ((offset % MSIX_ENTRY_SIZE) / 4) as usize + k;
            let e = &mut self.state.entries[usize::from(v)];
            match field {
                0 => e.addr_lo = word,
                1 => e.addr_hi = word,
                2 => e.data = word,
                _ => e.ctrl = word & MSIX_ENTRY_MASKED,
            }
        }
        self.sync(v, false)
    }

    /// Reads the PBA at `offset` (from the PBA start); any size, bytes
    /// past it read 0.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let b: Vec<u8> = self
            .state
            .pba
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        le_bytes_read(&b, offset, data);
    }

    /// A BAR read: serves it and returns true if it starts in the table or
    /// the PBA, else returns false (the device serves it).
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        let (tb, t) = self.table_range();
        let (pb, p) = self.pba_range();
        if bar == tb && t.contains(&offset) {
            self.table_read(offset - t.start, data);
            true
        } else if bar == pb && p.contains(&offset) {
            self.pba_read(offset - p.start, data);
            true
        } else {
            false
        }
    }

    /// A BAR write: serves it and returns true if it starts in the table or
    /// the PBA (PBA writes are ignored), else returns false. Route errors
    /// are logged.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> bool {
        let (tb, t) = self.table_range();
        let (pb, p) = self.pba_range();
        if bar == tb && t.contains(&offset) {
            if let Err(e) = self.table_write(offset - t.start, data) {
                log::warn!("MSI-X table write: {e}");
            }
            true
        } else {
            bar == pb && p.contains(&offset)
        }
    }

    /// Fires vector `v`: signals it through the sink if it is deliverable,
    /// else sets its pending bit (delivered when it becomes deliverable).
    /// Refuses a vector that does not exist.
    pub fn trigger(&mut self, v: u16) -> Result<()> {
        if v >= self.vectors {
            return Err(Error::Pci(format!("MSI-X: no vector {v}")));
        }
        match (&self.sink, self.route(v)) {
            (Some(sink), Some(_)) => sink.signal(v),
            _ => {
                self.state.pba[usize::from(v / 64)] |= 1 << (v % 64);
                Ok(())
            }
        }
    }

    /// The state to save.
    pub fn save(&self) -> MsixState {
        self.state.clone()
    }

    /// Restores a saved state: refuses entry or PBA counts that differ
    /// from this function's, or pending bits past the last vector
    /// (nothing changes on refusal). Writes Enable and Function Mask into
    /// `cfg`'s message control and re-programs every route.
    pub fn restore(&mut self, st: &MsixState, cfg: &mut PciConfig) -> Result<()> {
        let n = usize::from(self.vectors);
        if st.entries.len() != n || st.pba.len() != n.div_ceil(64) {
            return Err(Error::Pci(format!(
                "MSI-X: saved state has {} entries and {} PBA words, function has {n} vectors",
                st.entries.len(),
                st.pba.len()
            )));
        }
        if n % 64 != 0 && st.pba[n / 64] >> (n % 64) != 0 {
            return Err(Error::Pci(
                "MSI-X: saved pending bits past the last vector".into(),
            ));
        }
        let mut state = st.clone();
        for e in &mut state.entries {
            e.ctrl &= MSIX_ENTRY_MASKED;
        }
        self.state = state;
        let mut control = self.vectors - 1;
        if st.enabled {
            control |= MSIX_CONTROL_ENABLE;
        }
        if st.function_masked {
            control |= MSIX_CONTROL_MASK;
        }
        cfg.poke_u16(self.cap + 2, control);
        self.sync_all(true)
    }
}

#[cfg(test)]
#[path = "msix_tests.rs"]
mod tests;
