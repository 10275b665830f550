//! The BAR0 register file of the simulated device's PCI function, the DMA
//! engine's position and one engine step ([`step_page`]), and the register
//! record of the stop-copy stream ([`Regs::encode`] / [`Regs::decode`]).
//!
//! Register map (32-bit registers, little endian; 64-bit values are a lo/hi
//! pair): see `docs` of the constants below and `notes/issue12-design.md`.

use super::dma::{DmaFault, DmaMap};

/// `ID` (RO).
pub const REG_ID: u64 = 0x00;
/// `CTRL` (RW): [`CTRL_RUN`], [`CTRL_IRQ`].
pub const REG_CTRL: u64 = 0x04;
/// `STATUS` (RO): [`STATUS_BUSY`], [`STATUS_ERROR`].
pub const REG_STATUS: u64 = 0x08;
/// `RING_LO` (RW): guest-physical address of the ring, low half.
pub const REG_RING_LO: u64 = 0x10;
/// `RING_HI` (RW).
pub const REG_RING_HI: u64 = 0x14;
/// `RING_LEN` (RW): descriptors in the ring.
pub const REG_RING_LEN: u64 = 0x18;
/// `SEQ_LO` (RO): pages written since the ring was set up.
pub const REG_SEQ_LO: u64 = 0x20;
/// `SEQ_HI` (RO).
pub const REG_SEQ_HI: u64 = 0x24;
/// `WRAPS` (RO): completed ring cycles.
pub const REG_WRAPS: u64 = 0x28;
/// `ERR_ADDR_LO` (RO): address of the failing DMA.
pub const REG_ERR_ADDR_LO: u64 = 0x30;
/// `ERR_ADDR_HI` (RO).
pub const REG_ERR_ADDR_HI: u64 = 0x34;
/// `SCRATCH[0]` (RW); `SCRATCH[i]` is at `REG_SCRATCH + 4 * i`.
pub const REG_SCRATCH: u64 = 0x40;
/// Number of scratch registers.
pub const SCRATCH_COUNT: usize = 16;
/// End of the register block (the MSI-X table follows at 0x1000).
pub const REGS_END: u64 = 0x80;

/// Value of the `ID` register.
pub const ID_VALUE: u32 = 0xfe77_0001;
/// CTRL bit 0: the engine runs.
pub const CTRL_RUN: u32 = 1;
/// CTRL bit 1: MSI-X vector 0 at every ring wrap.
pub const CTRL_IRQ: u32 = 2;
/// STATUS bit 0: the engine is running.
pub const STATUS_BUSY: u32 = 1;
/// STATUS bit 1: bad descriptor, DMA outside the mappings, or bus master off.
pub const STATUS_ERROR: u32 = 2;
/// Most descriptors in a ring.
pub const MAX_RING_LEN: u32 = 1024;
/// Size of a descriptor in guest memory.
pub const DESC_LEN: u64 = 16;
/// Size of a page the engine writes.
pub const PAGE: u64 = 4096;
/// Offset of `!s` in a written page.
pub const TAIL_OFF: u64 = PAGE - 8;

/// The register file and the engine position.
///
/// Invariants (kept by the register writes and the engine, checked by
/// [`Regs::decode`]): `ctrl` has only `CTRL_RUN | CTRL_IRQ` bits;
/// `ring % 16 == 0`; `ring_len <= MAX_RING_LEN`; `desc < ring_len` or
/// `desc == page == 0`; `page < 2^20` (a descriptor has fewer pages). The
/// next page the engine writes is page `page` of descriptor `desc`, as
/// sequence number `seq + 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Regs {
    /// CTRL.
    pub ctrl: u32,
    /// STATUS.ERROR.
    pub error: bool,
    /// RING_LO/HI.
    pub ring: u64,
    /// RING_LEN.
    pub ring_len: u32,
    /// SEQ: pages written since the ring was set up.
    pub seq: u64,
    /// WRAPS.
    pub wraps: u32,
    /// ERR_ADDR.
    pub err_addr: u64,
    /// Engine position: descriptor index.
    pub desc: u32,
    /// Engine position: page within the descriptor.
    pub page: u32,
    /// SCRATCH.
    pub scratch: [u32; SCRATCH_COUNT],
}

/// Length of the encoded register record.
pub const REGS_LEN: usize = 48 + 4 * SCRATCH_COUNT;
/// Pages a descriptor may hold at most (`len` is a u32).
const MAX_DESC_PAGES: u32 = 1 << 20;

/// What a register write asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEffect {
    /// Nothing beyond the register change.
    None,
    /// The engine may have work (wake it).
    Wake,
}

fn lo(v: u64) -> u32 {
    v as u32
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}

fn set_lo(v: u64, x: u32) -> u64 {
    (v & !0xffff_ffff) | u64::from(x)
}

fn set_hi(v: u64, x: u32) -> u64 {
    (v & 0xffff_ffff) | (u64::from(x) << 32)
}

impl Regs {
    /// STATUS.BUSY: RUN is set and no error stopped the engine. (The engine
    /// only advances while the migration state lets it; the guest cannot
    /// observe the difference.)
    pub fn busy(&self) -> bool {
        self.ctrl & CTRL_RUN != 0 && !self.error
    }

    /// Reads the 32-bit register at `off` (4-byte aligned, `< REGS_END`;
    /// anything else reads 0).
    pub fn read32(&self, off: u64) -> u32 {
        match off {
            REG_ID => ID_VALUE,
            REG_CTRL => self.ctrl,
            REG_STATUS => {
                (if self.busy() { STATUS_BUSY } else { 0 })
                    | (if self.error { STATUS_ERROR } else { 0 })
            }
            REG_RING_LO => lo(self.ring),
            REG_RING_HI => hi(self.ring),
            REG_RING_LEN => self.ring_len,
            REG_SEQ_LO => lo(self.seq),
            REG_SEQ_HI => hi(self.seq),
            REG_WRAPS => self.wraps,
            REG_ERR_ADDR_LO => lo(self.err_addr),
            REG_ERR_ADDR_HI => hi(self.err_addr),
            o if (REG_SCRATCH..REGS_END).contains(&o) && o.is_multiple_of(4) => {
                self.scratch[((o - REG_SCRATCH) / 4) as usize]
            }
            _ => 0,
        }
    }

    /// Writes the 32-bit register at `off` (read-only and unknown offsets
    /// ignore writes).
    ///
    /// - CTRL with RUN clears a previous ERROR and (re)starts the engine;
    ///   a ring that is not 16-byte aligned or whose RING_LEN is not
    ///   1..=1024 sets ERROR at once (ERR_ADDR = the ring address).
    /// - RING_LO/RING_HI/RING_LEN while not BUSY set the register and reset
    ///   SEQ, WRAPS and the engine position; while BUSY they are ignored.
    pub fn write32(&mut self, off: u64, v: u32) -> WriteEffect {
        match off {
            REG_CTRL => {
                self.ctrl = v & (CTRL_RUN | CTRL_IRQ);
                if self.ctrl & CTRL_RUN == 0 {
                    return WriteEffect::None;
                }
                self.error = false;
                self.err_addr = 0;
                if !self.ring.is_multiple_of(DESC_LEN)
                    || !(1..=MAX_RING_LEN).contains(&self.ring_len)
                {
                    self.error = true;
                    self.err_addr = self.ring;
                    return WriteEffect::None;
                }
                WriteEffect::Wake
            }
            REG_RING_LO | REG_RING_HI | REG_RING_LEN if !self.busy() => {
                match off {
                    REG_RING_LO => self.ring = set_lo(self.ring, v),
                    REG_RING_HI => self.ring = set_hi(self.ring, v),
                    _ => self.ring_len = v,
                }
                self.seq = 0;
                self.wraps = 0;
                self.desc = 0;
                self.page = 0;
                WriteEffect::None
            }
            o if (REG_SCRATCH..REGS_END).contains(&o) && o.is_multiple_of(4) => {
                self.scratch[((o - REG_SCRATCH) / 4) as usize] = v;
                WriteEffect::None
            }
            _ => WriteEffect::None,
        }
    }

    /// Stops the engine with STATUS.ERROR and ERR_ADDR = `addr`.
    pub fn fail(&mut self, addr: u64) {
        self.error = true;
        self.err_addr = addr;
    }

    /// The register record of the stop-copy stream (little endian):
    /// `ctrl u32, status u32 (ERROR bit only), ring u64, ring_len u32,
    /// wraps u32, seq u64, err_addr u64, desc u32, page u32,
    /// scratch [u32; 16]` ([`REGS_LEN`] bytes).
    pub fn encode(&self) -> [u8; REGS_LEN] {
        let mut b = [0u8; REGS_LEN];
        let status = if self.error { STATUS_ERROR } else { 0 };
        b[0..4].copy_from_slice(&self.ctrl.to_le_bytes());
        b[4..8].copy_from_slice(&status.to_le_bytes());
        b[8..16].copy_from_slice(&self.ring.to_le_bytes());
        b[16..20].copy_from_slice(&self.ring_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.wraps.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b[32..40].copy_from_slice(&self.err_addr.to_le_bytes());
        b[40..44].copy_from_slice(&self.desc.to_le_bytes());
        b[44..48].copy_from_slice(&self.page.to_le_bytes());
        for (i, s) in self.scratch.iter().enumerate() {
            b[48 + 4 * i..52 + 4 * i].copy_from_slice(&s.to_le_bytes());
        }
        b
    }

    /// Decodes and validates a register record (untrusted: any violation
    /// of the [`Regs`] invariants is an error, never a panic).
    pub fn decode(b: &[u8]) -> Result<Regs, String> {
        if b.len() != REGS_LEN {
            return Err(format!(
                "register record has {} bytes, expected {REGS_LEN}",
                b.len()
            ));
        }
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let mut r = Regs {
            ctrl: u32_at(0),
            error: false,
            ring: u64_at(8),
            ring_len: u32_at(16),
            wraps: u32_at(20),
            seq: u64_at(24),
            err_addr: u64_at(32),
            desc: u32_at(40),
            page: u32_at(44),
            scratch: [0; SCRATCH_COUNT],
        };
        for (i, s) in r.scratch.iter_mut().enumerate() {
            *s = u32_at(48 + 4 * i);
        }
        let status = u32_at(4);
        if r.ctrl & !(CTRL_RUN | CTRL_IRQ) != 0 {
            return Err(format!("register record: bad CTRL {:#x}", r.ctrl));
        }
        if status & !STATUS_ERROR != 0 {
            return Err(format!("register record: bad STATUS {status:#x}"));
        }
        r.error = status & STATUS_ERROR != 0;
        if !r.ring.is_multiple_of(DESC_LEN) {
            return Err(format!("register record: unaligned ring {:#x}", r.ring));
        }
        if r.ring_len > MAX_RING_LEN {
            return Err(format!(
                "register record: RING_LEN {} too large",
                r.ring_len
            ));
        }
        if r.busy() && r.ring_len == 0 {
            return Err("register record: running with an empty ring".into());
        }
        let pos_ok = if r.ring_len == 0 {
            r.desc == 0 && r.page == 0
        } else {
            r.desc < r.ring_len && r.page < MAX_DESC_PAGES
        };
        if !pos_ok {
            return Err(format!(
                "register record: engine position {}/{} outside a {}-descriptor ring",
                r.desc, r.page, r.ring_len
            ));
        }
        Ok(r)
    }
}

/// What one engine step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Wrote the page at `gpa` as sequence number `seq`; `wrapped`: that
    /// page was the ring's last one (WRAPS was incremented).
    Wrote {
        /// Guest-physical address of the page.
        gpa: u64,
        /// Its sequence number (the new SEQ).
        seq: u64,
        /// The ring wrapped after it.
        wrapped: bool,
    },
    /// The engine stopped with ERROR (ERR_ADDR is set).
    Failed,
}

/// Writes the next page of the ring by DMA and advances the position.
///
/// Reads descriptor `desc` at `ring + 16 * desc` (a read: it does not
/// dirty); a descriptor whose address is not 4 KiB aligned, whose length
/// is 0 or not a multiple of 4096, whose flags are not 0, or which is
/// shorter than the position, fails with ERR_ADDR = the descriptor's
/// address. Then writes `s = seq + 1` at offset 0, the page's address at 8
/// and `!s` at 4088; a page not entirely inside one mapping fails with
/// ERR_ADDR = the page address and nothing is written. `bus_master` false
/// fails with ERR_ADDR = 0. Only call with [`Regs::busy`] true.
pub fn step_page(r: &mut Regs, dma: &DmaMap, bus_master: bool) -> Step {
    if !bus_master {
        r.fail(0);
        return Step::Failed;
    }
    if r.ring_len == 0 || r.desc >= r.ring_len {
        r.fail(r.ring);
        return Step::Failed;
    }
    let daddr = r.ring + u64::from(r.desc) * DESC_LEN;
    let [addr, lenflags] = match dma.read_u64s::<2>(daddr) {
        Ok(d) => d,
        Err(DmaFault(a)) => {
            r.fail(a);
            return Step::Failed;
        }
    };
    let len = lenflags as u32;
    let flags = (lenflags >> 32) as u32;
    let pages = len / PAGE as u32;
    if !addr.is_multiple_of(PAGE)
        || len == 0
        || !u64::from(len).is_multiple_of(PAGE)
        || flags != 0
        || r.page >= pages
        || addr.checked_add(u64::from(len)).is_none()
    {
        r.fail(daddr);
        return Step::Failed;
    }
    let gpa = addr + u64::from(r.page) * PAGE;
    let s = r.seq.wrapping_add(1);
    if let Err(DmaFault(a)) = dma.write_u64s(gpa, PAGE, &[(0, s), (8, gpa), (TAIL_OFF, !s)]) {
        r.fail(a);
        return Step::Failed;
    }
    r.seq = s;
    r.page += 1;
    let mut wrapped = false;
    if r.page == pages {
        r.page = 0;
        r.desc += 1;
        if r.desc == r.ring_len {
            r.desc = 0;
            r.wraps = r.wraps.wrapping_add(1);
            wrapped = true;
        }
    }
    Step::Wrote {
        gpa,
        seq: s,
        wrapped,
    }
}

/// The sequence number page `p` of an `np`-page ring holds after `s_total`
/// pages were written (0: not written yet): `S - ((S - 1 - P) mod NP)` if
/// `S > P`.
pub fn expected_seq(s_total: u64, p: u64, np: u64) -> u64 {
    if np == 0 || s_total <= p {
        0
    } else {
        s_total - ((s_total - 1 - p) % np)
    }
}
