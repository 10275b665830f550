//! The virtualized part of a VFIO function's config space: which bytes
//! the model owns, their write masks (BAR sizing, MSI/MSI-X control), the
//! emulated MSI-X table, and the interrupt programming that follows
//! (`VFIO_DEVICE_SET_IRQS` plus the [`MsiSink`] routes).

use log::warn;

use super::pci_caps::{BarInfo, Cap, MsiCap, MsixCap, CAP_PTR};
use super::pci_ops::RawPciOps;
use super::pci_uapi::{self as pu, RegionInfo};
use crate::pci::{
    MsiMessage, MsiSink, MsixEntry, MsixState, PciFunctionState, CONFIG_SPACE_SIZE, NUM_BARS,
};

/// What the kernel has enabled for the function's vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelIrqs {
    /// Nothing enabled.
    Off,
    /// MSI-X with this many vectors (eventfds).
    Msix(u32),
    /// MSI with this many vectors.
    Msi(u32),
}

/// Mutable virtual state of a function.
///
/// Invariants: `shadow.len() == CONFIG_SPACE_SIZE`; `bar_addr[i]` is the
/// address of BAR `i` as its (virtual) register(s) hold it, 0 for a high
/// half; `msix` is `Some` iff the function shows MSI-X, with one entry per
/// table vector.
#[derive(Debug, Clone)]
pub struct VirtState {
    /// Config space as the guest sees it, for the virtual bytes.
    pub shadow: Vec<u8>,
    /// Command register as the guest last wrote it.
    pub command: u16,
    /// Programmed BAR addresses.
    pub bar_addr: [u64; NUM_BARS],
    /// The MSI-X state (table emulated here).
    pub msix: Option<MsixState>,
    /// What the kernel has enabled.
    pub kernel: KernelIrqs,
}

/// The fixed layout of the virtual config space.
///
/// Invariant: `virtual_bytes.len() == CONFIG_SPACE_SIZE`; `msix`/`msi` are
/// the capabilities kept in the guest-visible list.
#[derive(Debug)]
pub struct Virt {
    /// The device's config region.
    pub cfg_region: RegionInfo,
    virtual_bytes: Vec<bool>,
    bars: [Option<BarInfo>; NUM_BARS],
    /// MSI-X capability (shown to the guest).
    pub msix: Option<MsixCap>,
    msix_irqs: u32,
    /// MSI capability (shown to the guest).
    pub msi: Option<MsiCap>,
    msi_irqs: u32,
}

fn entry_bytes(e: &MsixEntry) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&e.addr_lo.to_le_bytes());
    b[4..8].copy_from_slice(&e.addr_hi.to_le_bytes());
    b[8..12].copy_from_slice(&e.data.to_le_bytes());
    b[12..16].copy_from_slice(&e.ctrl.to_le_bytes());
    b
}

fn entry_from(b: &[u8; 16]) -> MsixEntry {
    let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    MsixEntry {
        addr_lo: w(0),
        addr_hi: w(4),
        data: w(8),
        ctrl: w(12) & 1,
    }
}

fn u16_le(s: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([s[o], s[o + 1]])
}

fn u32_le(s: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([s[o], s[o + 1], s[o + 2], s[o + 3]])
}

impl Virt {
    /// The layout and the initial state: BARs unassigned, ROM and INTx
    /// hidden, the capability list rebuilt from `kept` (hidden capabilities
    /// unlinked, a loop cut), MSI and MSI-X disabled.
    pub fn new(
        cfg_region: RegionInfo,
        config: &[u8],
        bars: [Option<BarInfo>; NUM_BARS],
        kept: &[Cap],
        walked: &[Cap],
        msix: Option<(MsixCap, u32)>,
        msi: Option<(MsiCap, u32)>,
    ) -> (Self, VirtState) {
        let mut shadow = vec![0u8; CONFIG_SPACE_SIZE];
        let n = config.len().min(CONFIG_SPACE_SIZE);
        shadow[..n].copy_from_slice(&config[..n]);
        let mut vb = vec![false; CONFIG_SPACE_SIZE];
        let mut mark = |r: std::ops::Range<usize>| {
            for o in r {
                if let Some(v) = vb.get_mut(o) {
                    *v = true;
                }
            }
        };
        mark(0x10..0x28);
        mark(0x30..0x35);
        mark(0x3c..0x3e);
        for c in walked {
            mark(c.offset..c.offset + 2);
        }
        if let Some((m, _)) = &msix {
            mark(m.offset..m.offset + 12);
        }
        if let Some((m, _)) = &msi {
            mark(m.offset..m.offset + m.len());
        }
        // ROM, interrupt line and pin: no ROM, no INTx.
        shadow[0x30..0x34].fill(0);
        shadow[0x3c] = 0;
        shadow[0x3d] = 0;
        // The rebuilt capability chain.
        shadow[CAP_PTR] = kept.first().map_or(0, |c| c.offset as u8);
        for (i, c) in kept.iter().enumerate() {
            shadow[c.offset + 1] = kept.get(i + 1).map_or(0, |n| n.offset as u8);
        }
        // BARs: flag bits only (unassigned).
        for (i, b) in bars.iter().enumerate() {
            let v = b.map_or(0, |b| b.flag_bits());
            shadow[0x10 + 4 * i..0x14 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        if let Some((m, _)) = &msix {
            shadow[m.offset + 3] &= !0xc0;
        }
        if let Some((m, _)) = &msi {
            shadow[m.offset + 2] &= !0x71;
            shadow[m.offset + 4..m.offset + m.len()].fill(0);
        }
        let msix_state = msix.as_ref().map(|(m, _)| MsixState {
            enabled: false,
            function_masked: false,
            entries: vec![
                MsixEntry {
                    ctrl: 1,
                    ..Default::default()
                };
                m.vectors as usize
            ],
            pba: vec![0; (m.vectors as usize).div_ceil(64)],
        });
        let virt = Virt {
            cfg_region,
            virtual_bytes: vb,
            bars,
            msix: msix.map(|m| m.0),
            msix_irqs: msix.map_or(0, |m| m.1),
            msi: msi.map(|m| m.0),
            msi_irqs: msi.map_or(0, |m| m.1),
        };
        let st = VirtState {
            shadow,
            command: 0,
            bar_addr: [0; NUM_BARS],
            msix: msix_state,
            kernel: KernelIrqs::Off,
        };
        (virt, st)
    }

    /// Whether config byte `off` is owned by the model (else passthrough).
    pub fn is_virtual(&self, off: usize) -> bool {
        self.virtual_bytes.get(off).copied().unwrap_or(true)
    }

    /// Applies a guest write of `data` at `off` to the virtual bytes (with
    /// their write masks) and tracks the command register. Returns whether
    /// MSI or MSI-X control changed (interrupts must be re-programmed).
    pub fn write(&self, st: &mut VirtState, off: usize, data: &[u8]) -> bool {
        let mut irq = false;
        let mut bar_regs = [false; NUM_BARS];
        for (k, &v) in data.iter().enumerate() {
            let o = off + k;
            if o == 4 || o == 5 {
                let mut c = st.command.to_le_bytes();
                c[o - 4] = v;
                st.command = u16::from_le_bytes(c);
            }
            if !self.is_virtual(o) || o >= CONFIG_SPACE_SIZE {
                continue;
            }
            if (0x10..0x28).contains(&o) {
                st.shadow[o] = v;
                bar_regs[(o - 0x10) / 4] = true;
            } else if o == 0x3c {
                st.shadow[o] = v;
            } else if let Some(m) = self.msix.filter(|m| o == m.offset + 3) {
                st.shadow[o] = (st.shadow[o] & !0xc0) | (v & 0xc0);
                let ctrl = st.shadow[m.offset + 3];
                if let Some(x) = st.msix.as_mut() {
                    x.enabled = ctrl & 0x80 != 0;
                    x.function_masked = ctrl & 0x40 != 0;
                }
                irq = true;
            } else if let Some(m) = self
                .msi
                .filter(|m| (m.offset..m.offset + m.len()).contains(&o))
            {
                let rel = o - m.offset;
                let d = m.data_offset();
                let mask: u8 = match rel {
                    2 => 0x71,
                    4 => 0xfc,
                    5..=7 => 0xff,
                    8..=11 if m.is_64bit => 0xff,
                    r if r == d || r == d + 1 => 0xff,
                    r if m.mask_offset().is_some_and(|mo| (mo..mo + 4).contains(&r)) => 0xff,
                    _ => 0,
                };
                st.shadow[o] = (st.shadow[o] & !mask) | (v & mask);
                irq |= mask != 0;
            }
        }
        for (r, dirty) in bar_regs.iter().enumerate() {
            if *dirty {
                self.fix_bar(st, r);
            }
        }
        irq
    }

    /// Applies the BAR's size mask and flag bits to register `r` and
    /// recomputes the BAR address.
    fn fix_bar(&self, st: &mut VirtState, r: usize) {
        let at = 0x10 + 4 * r;
        let val = u32_le(&st.shadow, at);
        let (val, low) = match (self.bars[r], r.checked_sub(1).and_then(|p| self.bars[p])) {
            (Some(b), _) => {
                let keep = if b.is_io { !3u32 } else { !0xfu32 };
                (val & (!(b.size - 1)) as u32 & keep | b.flag_bits(), r)
            }
            (None, Some(p)) if p.is_64bit => (val & ((!(p.size - 1)) >> 32) as u32, r - 1),
            _ => (0, r),
        };
        st.shadow[at..at + 4].copy_from_slice(&val.to_le_bytes());
        if let Some(b) = self.bars[low] {
            let lo_reg = u32_le(&st.shadow, 0x10 + 4 * low) as u64;
            let lo = lo_reg & if b.is_io { !3 } else { !0xf };
            let hi = if b.is_64bit {
                (u32_le(&st.shadow, 0x14 + 4 * low) as u64) << 32
            } else {
                0
            };
            st.bar_addr[low] = hi | lo;
        }
    }

    /// Reads the emulated MSI-X table at `rel` (bytes past the table read 0).
    pub fn msix_table_read(&self, st: &VirtState, rel: u64, data: &mut [u8]) {
        let entries = st.msix.as_ref().map_or(&[][..], |m| &m.entries[..]);
        for (k, b) in data.iter_mut().enumerate() {
            let pos = rel + k as u64;
            *b = entries
                .get((pos / 16) as usize)
                .map_or(0, |e| entry_bytes(e)[(pos % 16) as usize]);
        }
    }

    /// Writes the emulated MSI-X table at `rel`; returns the vectors
    /// touched.
    pub fn msix_table_write(&self, st: &mut VirtState, rel: u64, data: &[u8]) -> Vec<u16> {
        let mut touched: Vec<u16> = Vec::new();
        let Some(m) = st.msix.as_mut() else {
            return touched;
        };
        for (k, &v) in data.iter().enumerate() {
            let pos = rel + k as u64;
            let i = (pos / 16) as usize;
            let Some(e) = m.entries.get_mut(i) else {
                continue;
            };
            let mut b = entry_bytes(e);
            b[(pos % 16) as usize] = v;
            *e = entry_from(&b);
            if !touched.contains(&(i as u16)) {
                touched.push(i as u16);
            }
        }
        touched
    }

    /// Routes MSI-X vector `v` as its entry and the control bits say (only
    /// while the kernel has MSI-X enabled).
    pub fn msix_route(&self, id: &str, st: &VirtState, sink: Option<&dyn MsiSink>, v: u16) {
        let (Some(sink), Some(m)) = (sink, st.msix.as_ref()) else {
            return;
        };
        let KernelIrqs::Msix(n) = st.kernel else {
            return;
        };
        let Some(e) = m.entries.get(v as usize) else {
            return;
        };
        if v as u32 >= n {
            return;
        }
        let route = (m.enabled && !m.function_masked && e.ctrl & 1 == 0).then_some(MsiMessage {
            address: (e.addr_hi as u64) << 32 | e.addr_lo as u64,
            data: e.data,
        });
        if let Err(err) = sink.set_route(v, route) {
            warn!("vfio {id}: MSI-X vector {v} route: {err}");
        }
    }

    /// Message `i` of `n` enabled MSI vectors: the low log2(n) data bits
    /// carry the vector number (PCI MSI multiple messages).
    fn msi_message(&self, st: &VirtState, m: &MsiCap, i: u32, n: u32) -> Option<MsiMessage> {
        let s = &st.shadow;
        let o = m.offset;
        let lo = u32_le(s, o + 4) as u64;
        let hi = if m.is_64bit {
            u32_le(s, o + 8) as u64
        } else {
            0
        };
        let data = u16_le(s, o + m.data_offset()) as u32;
        let masked = m
            .mask_offset()
            .is_some_and(|mo| u32_le(s, o + mo) & (1 << i) != 0);
        (!masked).then_some(MsiMessage {
            address: hi << 32 | lo,
            data: (data & !(n.max(1) - 1)) | i,
        })
    }

    /// Brings the kernel's MSI/MSI-X enable in line with the virtual
    /// control bits (SET_IRQS with the sink's eventfds; count 0 to
    /// disable), then sets every vector's route. `fresh`: the kernel has
    /// nothing enabled yet (a restore on a new device).
    pub fn program_irqs(
        &self,
        id: &str,
        ops: &dyn RawPciOps,
        st: &mut VirtState,
        sink: Option<&dyn MsiSink>,
        fresh: bool,
    ) {
        if fresh {
            st.kernel = KernelIrqs::Off;
        }
        let cap_n = sink.map_or(0, |s| s.count() as u32);
        let msix_on = st.msix.as_ref().is_some_and(|m| m.enabled);
        let want = if let (true, Some(m)) = (msix_on, self.msix) {
            KernelIrqs::Msix((m.vectors as u32).min(self.msix_irqs).min(cap_n))
        } else if let Some(m) = self.msi.filter(|m| st.shadow[m.offset + 2] & 1 != 0) {
            let mme = 1u32 << ((st.shadow[m.offset + 2] >> 4) & 7).min(5);
            KernelIrqs::Msi(mme.min(m.vectors as u32).min(self.msi_irqs).min(cap_n))
        } else {
            KernelIrqs::Off
        };
        let want = match want {
            KernelIrqs::Msix(0) | KernelIrqs::Msi(0) => {
                if sink.is_none() {
                    warn!(
                        "vfio {id}: guest enabled MSI/MSI-X before an interrupt sink was attached"
                    );
                }
                KernelIrqs::Off
            }
            w => w,
        };
        if want != st.kernel {
            let (index, on) = match st.kernel {
                KernelIrqs::Msix(_) => (pu::MSIX_IRQ_INDEX, true),
                KernelIrqs::Msi(_) => (pu::MSI_IRQ_INDEX, true),
                KernelIrqs::Off => (0, false),
            };
            if on {
                if let Err(e) = ops.set_irqs(&pu::irq_set_disable_arg(index)) {
                    warn!("vfio {id}: disabling IRQ index {index}: {e}");
                }
            }
            st.kernel = KernelIrqs::Off;
            let (index, n) = match want {
                KernelIrqs::Msix(n) => (pu::MSIX_IRQ_INDEX, n),
                KernelIrqs::Msi(n) => (pu::MSI_IRQ_INDEX, n),
                KernelIrqs::Off => (0, 0),
            };
            if let (Some(sink), true) = (sink, n > 0) {
                let fds: Vec<i32> = (0..n)
                    .map(|v| sink.eventfd(v as u16).unwrap_or(-1))
                    .collect();
                match pu::irq_set_eventfds_arg(index, 0, &fds).map(|a| ops.set_irqs(&a)) {
                    Some(Ok(())) => st.kernel = want,
                    Some(Err(e)) => {
                        warn!("vfio {id}: enabling {n} vectors of IRQ index {index}: {e}")
                    }
                    None => warn!("vfio {id}: {n} vectors: too many"),
                }
            }
        }
        let Some(sink) = sink else {
            return;
        };
        let total = self
            .msix
            .map_or(0, |m| m.vectors)
            .max(self.msi.map_or(0, |m| m.vectors as u16))
            .min(sink.count());
        for v in 0..total {
            let route = match (st.kernel, self.msi) {
                (KernelIrqs::Msix(_), _) => {
                    self.msix_route(id, st, Some(sink), v);
                    continue;
                }
                (KernelIrqs::Msi(n), Some(m)) if (v as u32) < n => {
                    self.msi_message(st, &m, v as u32, n)
                }
                _ => None,
            };
            if let Err(e) = sink.set_route(v, route) {
                warn!("vfio {id}: vector {v} route: {e}");
            }
        }
    }

    /// Replays a saved PCI layer into `st` through the same write masks
    /// (the caller checked its shape), then takes the saved MSI-X table.
    pub fn restore(&self, st: &mut VirtState, state: &PciFunctionState) {
        for (o, &v) in state.config.iter().enumerate() {
            if self.is_virtual(o) {
                self.write(st, o, &[v]);
            }
        }
        if state.config.len() >= 6 {
            st.command = u16_le(&state.config, 4);
        }
        for (i, &addr) in state.bars.iter().enumerate().take(NUM_BARS) {
            if let (Some(b), true) = (self.bars[i], addr != 0) {
                self.write(st, 0x10 + 4 * i, &(addr as u32).to_le_bytes());
                if b.is_64bit {
                    self.write(st, 0x14 + 4 * i, &((addr >> 32) as u32).to_le_bytes());
                }
            }
        }
        if let (Some(saved), Some(cur), Some(m)) = (&state.msix, st.msix.as_mut(), self.msix) {
            *cur = saved.clone();
            for e in &mut cur.entries {
                e.ctrl &= 1;
            }
            let ctrl = &mut st.shadow[m.offset + 3];
            *ctrl = (*ctrl & !0xc0)
                | if saved.enabled { 0x80 } else { 0 }
                | if saved.function_masked { 0x40 } else { 0 };
        }
    }
}
