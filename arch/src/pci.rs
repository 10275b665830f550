//! PCI layout of the guest (bus 0 only) and the boot-time BAR allocator.
//!
//! ```text
//! 0xC000_0000 .. 0xE000_0000   32-bit MMIO window (BARs), 512 MiB
//! 0xE000_0000 .. 0xE010_0000   ECAM of bus 0 (32 dev x 8 fn x 4 KiB), e820 reserved
//! 0xFEC0_0000, 0xFEE0_0000     IOAPIC, LAPIC (outside both windows)
//! mmio64_window(ram_end)       64-bit MMIO window, 64 GiB above RAM and 4 GiB
//! 0xCF8 / 0xCFC..0xCFF         legacy config address / data ports
//! 0xC000 .. 0xFFFF             I/O BAR window
//! ```
//!
//! Everything is pure: [`allocate_bars`] takes plain requests and returns
//! plain assignments, and refuses bad input with a [`BarAllocError`].

use std::ops::Range;

/// Guest-physical base of the ECAM (memory-mapped config space) of bus 0.
pub const PCI_ECAM_BASE: u64 = 0xE000_0000;
/// Size of the ECAM: bus 0 only, 32 devices x 8 functions x 4 KiB.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// First address of the 32-bit MMIO window.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// First address past the 32-bit MMIO window (= [`PCI_ECAM_BASE`]).
pub const PCI_MMIO32_END: u64 = 0xE000_0000;
/// Length of the 64-bit MMIO window.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// Alignment of the 64-bit MMIO window start.
pub const PCI_MMIO64_ALIGN: u64 = 1 << 30;
/// First port of the I/O BAR window.
pub const PCI_IO_START: u64 = 0xC000;
/// First port past the I/O BAR window.
pub const PCI_IO_END: u64 = 0x1_0000;
/// Legacy CONFIG_ADDRESS port (dword accesses only).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xCF8;
/// Legacy CONFIG_DATA port (0xCFC..=0xCFF, byte/word/dword).
pub const PCI_CONFIG_DATA_PORT: u16 = 0xCFC;
/// Devices per bus.
pub const PCI_DEVICES_PER_BUS: u8 = 32;
/// Functions per device.
pub const PCI_FUNCTIONS_PER_DEVICE: u8 = 8;
/// Config space bytes per function in the ECAM.
pub const PCI_ECAM_FUNCTION_SIZE: u64 = 4096;
/// Host bridge (00:00.0) vendor id (Red Hat, Inc.).
pub const PCI_HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// Host bridge device id (QEMU PCIe host bridge).
pub const PCI_HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Host bridge class code (bridge, host bridge): class << 16 | subclass << 8 | prog-if.
pub const PCI_HOST_BRIDGE_CLASS: u32 = 0x06_0000;
/// Smallest alignment of a memory BAR: every memory BAR gets whole pages,
/// so no two BARs share a page (KVM slots and traps work per page).
pub const PCI_MEM_BAR_MIN_ALIGN: u64 = 4096;
/// Smallest memory BAR size the PCI spec allows.
pub const PCI_MEM_BAR_MIN_SIZE: u64 = 16;
/// Smallest I/O BAR size.
pub const PCI_IO_BAR_MIN_SIZE: u64 = 4;
/// Largest I/O BAR size (PCI 3.0: 256 bytes).
pub const PCI_IO_BAR_MAX_SIZE: u64 = 256;

/// The 64-bit MMIO window for a guest whose RAM ends at `ram_end` (first
/// address past the highest RAM byte): it starts at `max(4 GiB, ram_end)`
/// aligned up to 1 GiB and is [`PCI_MMIO64_SIZE`] long.
///
/// Invariant: the window never overlaps RAM nor the 32-bit space; it
/// saturates (stays non-empty and below `u64::MAX`) for absurd `ram_end`.
pub fn mmio64_window(ram_end: u64) -> Range<u64> {
    let floor = ram_end.max(1 << 32);
    let limit = u64::MAX - PCI_MMIO64_SIZE - PCI_MMIO64_ALIGN;
    let start =
        align_up(floor.min(limit), PCI_MMIO64_ALIGN).unwrap_or(limit & !(PCI_MMIO64_ALIGN - 1));
    start..start + PCI_MMIO64_SIZE
}

/// The guest-physical ECAM address of register `reg` of function `func` of
/// device `dev` on bus 0: `BASE + (dev << 15) + (func << 12) + reg`.
///
/// Returns `None` when `dev >= 32`, `func >= 8` or `reg >= 4096`.
pub fn ecam_address(dev: u8, func: u8, reg: u16) -> Option<u64> {
    if dev >= PCI_DEVICES_PER_BUS
        || func >= PCI_FUNCTIONS_PER_DEVICE
        || u64::from(reg) >= PCI_ECAM_FUNCTION_SIZE
    {
        return None;
    }
    Some(PCI_ECAM_BASE + (u64::from(dev) << 15) + (u64::from(func) << 12) + u64::from(reg))
}

/// Splits an offset inside the ECAM into `(dev, func, reg)`.
///
/// Returns `None` when `offset >= PCI_ECAM_SIZE`.
pub fn ecam_decode(offset: u64) -> Option<(u8, u8, u16)> {
    if offset >= PCI_ECAM_SIZE {
        return None;
    }
    // All three fit their types: offset < 2^20.
    Some((
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 7) as u8,
        (offset & 0xfff) as u16,
    ))
}

/// Rounds `x` up to a multiple of `align` (a power of two); `None` on overflow.
fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

/// The address windows BARs are allocated from.
///
/// Invariant: none enforced; an empty or inverted range simply holds no BAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciWindows {
    /// 32-bit memory window.
    pub mmio32: Range<u64>,
    /// 64-bit memory window.
    pub mmio64: Range<u64>,
    /// I/O port window.
    pub io: Range<u64>,
}

impl PciWindows {
    /// The fixed layout for a guest whose RAM ends at `ram_end`.
    pub fn new(ram_end: u64) -> Self {
        Self {
            mmio32: PCI_MMIO32_START..PCI_MMIO32_END,
            mmio64: mmio64_window(ram_end),
            io: PCI_IO_START..PCI_IO_END,
        }
    }
}

/// Which window an assignment came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PciWindow {
    /// The 32-bit memory window.
    Mmio32,
    /// The 64-bit memory window.
    Mmio64,
    /// The I/O port window.
    Io,
}

/// One BAR to place.
///
/// Invariant (checked by [`allocate_bars`]): `size` is a power of two,
/// 16 bytes or more for memory, 4..=256 for I/O; `bar < 6` (`< 5` for
/// 64-bit); I/O BARs are not 64-bit nor prefetchable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarAllocRequest {
    /// Caller's index of the function (e.g. its slot on the bus).
    pub function: usize,
    /// BAR index (0..6).
    pub bar: u8,
    /// Size in bytes.
    pub size: u64,
    /// 64-bit memory BAR.
    pub is_64bit: bool,
    /// Prefetchable memory BAR.
    pub prefetchable: bool,
    /// I/O BAR.
    pub is_io: bool,
}

/// Where one BAR was placed.
///
/// Invariant: `addr` is aligned to `size` (and to [`PCI_MEM_BAR_MIN_ALIGN`]
/// for memory); `[addr, addr + size)` lies in `window` and overlaps no
/// other assignment of the same call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarAssignment {
    /// The request's function.
    pub function: usize,
    /// The request's BAR index.
    pub bar: u8,
    /// Assigned base address (guest-physical or port).
    pub addr: u64,
    /// Size in bytes (the request's).
    pub size: u64,
    /// The window it lies in.
    pub window: PciWindow,
}

/// Why [`allocate_bars`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarAllocError {
    /// The size is zero, not a power of two, or out of the allowed range.
    #[error("function {function} BAR {bar}: invalid size {size:#x}")]
    InvalidSize {
        /// Function index.
        function: usize,
        /// BAR index.
        bar: u8,
        /// Size requested.
        size: u64,
    },
    /// The BAR index or its flags are impossible (index out of range, an
    /// I/O BAR marked 64-bit/prefetchable, or a BAR requested twice).
    #[error("function {function} BAR {bar}: invalid BAR request")]
    InvalidBar {
        /// Function index.
        function: usize,
        /// BAR index.
        bar: u8,
    },
    /// No window that may hold the BAR has room left.
    #[error("function {function} BAR {bar}: no room for {size:#x} bytes in the PCI windows")]
    Exhausted {
        /// Function index.
        function: usize,
        /// BAR index.
        bar: u8,
        /// Size requested.
        size: u64,
    },
}

fn validate(r: &BarAllocRequest) -> Result<(), BarAllocError> {
    let bad_bar = BarAllocError::InvalidBar {
        function: r.function,
        bar: r.bar,
    };
    if r.bar >= 6 || (r.is_64bit && r.bar >= 5) || (r.is_io && (r.is_64bit || r.prefetchable)) {
        return Err(bad_bar);
    }
    let (min, max) = if r.is_io {
        (PCI_IO_BAR_MIN_SIZE, PCI_IO_BAR_MAX_SIZE)
    } else if r.is_64bit {
        (PCI_MEM_BAR_MIN_SIZE, 1 << 62)
    } else {
        (PCI_MEM_BAR_MIN_SIZE, 1 << 31)
    };
    if !r.size.is_power_of_two() || r.size < min || r.size > max {
        return Err(BarAllocError::InvalidSize {
            function: r.function,
            bar: r.bar,
            size: r.size,
        });
    }
    Ok(())
}

/// Bump allocator over one window.
struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    fn new(r: &Range<u64>) -> Self {
        Self {
            next: r.start,
            end: r.end,
        }
    }
    fn take(&mut self, size: u64, align: u64) -> Option<u64> {
        let addr = align_up(self.next, align)?;
        let end = addr.checked_add(size)?;
        if end > self.end {
            return None;
        }
        self.next = end;
        Some(addr)
    }
}

/// Places every BAR of `requests` in `windows` and returns one assignment
/// per request, in request order.
///
/// Placement: I/O BARs in the I/O window; 32-bit memory BARs in the 32-bit
/// window; 64-bit prefetchable BARs in the 64-bit window, else the 32-bit
/// window; 64-bit non-prefetchable BARs in the 32-bit window, else the
/// 64-bit window. BARs are placed largest first so natural alignment
/// leaves no holes. Memory BARs are aligned to at least
/// [`PCI_MEM_BAR_MIN_ALIGN`].
///
/// Refuses the whole request set with the first [`BarAllocError`] found.
pub fn allocate_bars(
    windows: &PciWindows,
    requests: &[BarAllocRequest],
) -> Result<Vec<BarAssignment>, BarAllocError> {
    for (i, r) in requests.iter().enumerate() {
        validate(r)?;
        // A 64-bit BAR also owns bar + 1.
        let owns = |x: &BarAllocRequest, b: u8| x.bar == b || (x.is_64bit && x.bar + 1 == b);
        let clash = requests[..i].iter().any(|p| {
            p.function == r.function && (owns(p, r.bar) || (r.is_64bit && owns(p, r.bar + 1)))
        });
        if clash {
            return Err(BarAllocError::InvalidBar {
                function: r.function,
                bar: r.bar,
            });
        }
    }
    let mut order: Vec<usize> = (0..requests.len()).collect();
    // Stable: equal sizes keep request order.
    order.sort_by(|a, b| requests[*b].size.cmp(&requests[*a].size));

    let mut m32 = Bump::new(&windows.mmio32);
    let mut m64 = Bump::new(&windows.mmio64);
    let mut io = Bump::new(&windows.io);
    let mut out: Vec<Option<BarAssignment>> = vec![None; requests.len()];
    for i in order {
        let r = &requests[i];
        let prefs: &[PciWindow] = if r.is_io {
            &[PciWindow::Io]
        } else if !r.is_64bit {
            &[PciWindow::Mmio32]
        } else if r.prefetchable {
            &[PciWindow::Mmio64, PciWindow::Mmio32]
        } else {
            &[PciWindow::Mmio32, PciWindow::Mmio64]
        };
        let align = if r.is_io {
            r.size
        } else {
            r.size.max(PCI_MEM_BAR_MIN_ALIGN)
        };
        let placed = prefs.iter().find_map(|w| {
            let bump = match w {
                PciWindow::Mmio32 => &mut m32,
                PciWindow::Mmio64 => &mut m64,
                PciWindow::Io => &mut io,
            };
            bump.take(r.size, align).map(|addr| (addr, *w))
        });
        let Some((addr, window)) = placed else {
            return Err(BarAllocError::Exhausted {
                function: r.function,
                bar: r.bar,
                size: r.size,
            });
        };
        out[i] = Some(BarAssignment {
            function: r.function,
            bar: r.bar,
            addr,
            size: r.size,
            window,
        });
    }
    // Every index was visited once above.
    Ok(out.into_iter().flatten().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(
        function: usize,
        bar: u8,
        size: u64,
        is_64bit: bool,
        prefetchable: bool,
    ) -> BarAllocRequest {
        BarAllocRequest {
            function,
            bar,
            size,
            is_64bit,
            prefetchable,
            is_io: false,
        }
    }
    fn io_req(function: usize, bar: u8, size: u64) -> BarAllocRequest {
        BarAllocRequest {
            function,
            bar,
            size,
            is_64bit: false,
            prefetchable: false,
            is_io: true,
        }
    }

    fn check(windows: &PciWindows, reqs: &[BarAllocRequest], got: &[BarAssignment]) {
        assert_eq!(got.len(), reqs.len());
        for (r, a) in reqs.iter().zip(got) {
            assert_eq!((a.function, a.bar, a.size), (r.function, r.bar, r.size));
            assert_eq!(a.addr % a.size, 0, "{a:x?}");
            let w = match a.window {
                PciWindow::Mmio32 => &windows.mmio32,
                PciWindow::Mmio64 => &windows.mmio64,
                PciWindow::Io => &windows.io,
            };
            assert!(a.addr >= w.start && a.addr + a.size <= w.end, "{a:x?}");
            if !r.is_io {
                assert_eq!(a.addr % PCI_MEM_BAR_MIN_ALIGN, 0);
            }
        }
        for (i, a) in got.iter().enumerate() {
            for b in &got[i + 1..] {
                let same_space = (a.window == PciWindow::Io) == (b.window == PciWindow::Io);
                if same_space {
                    assert!(
                        a.addr + a.size <= b.addr || b.addr + b.size <= a.addr,
                        "{a:x?} {b:x?}"
                    );
                }
            }
        }
    }

    #[test]
    fn layout_constants() {
        assert_eq!(PCI_MMIO32_END, PCI_ECAM_BASE);
        assert_eq!(PCI_ECAM_SIZE, 32 * 8 * 4096);
        assert!(PCI_ECAM_BASE + PCI_ECAM_SIZE <= u64::from(crate::layout::IOAPIC_ADDR));
        assert_eq!(PCI_MMIO32_START, crate::layout::MEM_32BIT_GAP_START);
        assert_eq!(ecam_address(0, 0, 0), Some(0xE000_0000));
        assert_eq!(ecam_address(1, 0, 0x10), Some(0xE000_8010));
        assert_eq!(ecam_address(31, 7, 0xffc), Some(0xE00F_FFFC));
        assert_eq!(ecam_address(32, 0, 0), None);
        assert_eq!(ecam_address(0, 8, 0), None);
        assert_eq!(ecam_address(0, 0, 4096), None);
        assert_eq!(ecam_decode(0x8010), Some((1, 0, 0x10)));
        assert_eq!(ecam_decode(0xF_FFFC), Some((31, 7, 0xffc)));
        assert_eq!(ecam_decode(PCI_ECAM_SIZE), None);
    }

    #[test]
    fn mmio64_window_placement() {
        assert_eq!(mmio64_window(512 << 20), (4 << 30)..(68 << 30));
        assert_eq!(mmio64_window(4 << 30), (4 << 30)..(68 << 30));
        assert_eq!(mmio64_window((5 << 30) + 1), (6 << 30)..(70 << 30));
        let w = mmio64_window(u64::MAX);
        assert_eq!(w.end - w.start, PCI_MMIO64_SIZE);
        assert_eq!(w.start % PCI_MMIO64_ALIGN, 0);
    }

    #[test]
    fn aligned_and_disjoint() {
        let w = PciWindows::new(1 << 30);
        let reqs = [
            req(0, 0, 0x4000, false, false),
            req(0, 2, 16, false, false),
            req(1, 0, 1 << 20, false, false),
            req(1, 1, 0x1000, false, false),
            req(2, 0, 256 << 20, false, true),
            req(2, 2, 64 << 20, true, true),
            io_req(2, 4, 0x20),
            io_req(3, 0, 0x100),
            io_req(3, 1, 4),
        ];
        let got = allocate_bars(&w, &reqs).unwrap();
        check(&w, &reqs, &got);
        assert_eq!(got[5].window, PciWindow::Mmio64);
        assert_eq!(got[5].addr, 4 << 30);
        assert_eq!(got[6].window, PciWindow::Io);
        assert!(got[7].addr >= 0xC000);
        // Largest first: the 256 MiB BAR opens the 32-bit window.
        assert_eq!(got[4].addr, PCI_MMIO32_START);
    }

    #[test]
    fn sixty_four_bit_placement_and_fallback() {
        let w = PciWindows {
            mmio32: 0xC000_0000..0xC100_0000,
            mmio64: (4 << 30)..(4 << 30) + (1 << 20),
            io: PCI_IO_START..PCI_IO_END,
        };
        // Non-prefetchable 64-bit prefers the 32-bit window.
        let got = allocate_bars(&w, &[req(0, 0, 0x1000, true, false)]).unwrap();
        assert_eq!(got[0].window, PciWindow::Mmio32);
        // Prefetchable 64-bit too large for the 64-bit window falls back.
        let reqs = [
            req(0, 0, 1 << 20, true, true),
            req(1, 0, 1 << 20, true, true),
        ];
        let got = allocate_bars(&w, &reqs).unwrap();
        check(&w, &reqs, &got);
        assert_eq!(got[0].window, PciWindow::Mmio64);
        assert_eq!(got[1].window, PciWindow::Mmio32);
        // A BAR larger than 4 GiB only fits in the 64-bit window.
        let w = PciWindows::new(0);
        let got = allocate_bars(&w, &[req(0, 0, 8 << 30, true, false)]).unwrap();
        assert_eq!(got[0].window, PciWindow::Mmio64);
        assert_eq!(got[0].addr % (8 << 30), 0);
    }

    #[test]
    fn exhaustion_refused() {
        let w = PciWindows::new(0);
        let reqs = [
            req(0, 0, 256 << 20, false, false),
            req(1, 0, 512 << 20, false, false),
        ];
        assert_eq!(
            allocate_bars(&w, &reqs),
            Err(BarAllocError::Exhausted {
                function: 0,
                bar: 0,
                size: 256 << 20
            })
        );
        let reqs: Vec<_> = (0..65).map(|f| io_req(f, 0, 256)).collect();
        assert!(matches!(
            allocate_bars(&w, &reqs),
            Err(BarAllocError::Exhausted { .. })
        ));
        let reqs: Vec<_> = (0..64).map(|f| io_req(f, 0, 256)).collect();
        check(&w, &reqs, &allocate_bars(&w, &reqs).unwrap());
        let w0 = PciWindows {
            mmio32: 0..0,
            mmio64: 0..0,
            io: 0..0,
        };
        assert!(allocate_bars(&w0, &[req(0, 0, 16, true, true)]).is_err());
    }

    #[test]
    fn bad_requests_refused() {
        let w = PciWindows::new(0);
        for size in [0, 3, 0x1001, 8, u64::MAX] {
            assert!(matches!(
                allocate_bars(&w, &[req(0, 0, size, false, false)]),
                Err(BarAllocError::InvalidSize { .. })
            ));
        }
        assert!(matches!(
            allocate_bars(&w, &[io_req(0, 0, 512)]),
            Err(BarAllocError::InvalidSize { .. })
        ));
        assert!(matches!(
            allocate_bars(&w, &[io_req(0, 0, 2)]),
            Err(BarAllocError::InvalidSize { .. })
        ));
        assert!(matches!(
            allocate_bars(&w, &[req(0, 0, 1 << 32, false, false)]),
            Err(BarAllocError::InvalidSize { .. })
        ));
        assert!(matches!(
            allocate_bars(&w, &[req(0, 6, 16, false, false)]),
            Err(BarAllocError::InvalidBar { .. })
        ));
        assert!(matches!(
            allocate_bars(&w, &[req(0, 5, 16, true, false)]),
            Err(BarAllocError::InvalidBar { .. })
        ));
        let mut bad_io = io_req(0, 0, 16);
        bad_io.is_64bit = true;
        assert!(matches!(
            allocate_bars(&w, &[bad_io]),
            Err(BarAllocError::InvalidBar { .. })
        ));
        // BAR 1 is the upper half of the 64-bit BAR 0.
        let reqs = [req(0, 0, 16, true, false), req(0, 1, 16, false, false)];
        assert!(matches!(
            allocate_bars(&w, &reqs),
            Err(BarAllocError::InvalidBar { .. })
        ));
        let reqs = [req(0, 1, 16, false, false), req(0, 0, 16, true, false)];
        assert!(matches!(
            allocate_bars(&w, &reqs),
            Err(BarAllocError::InvalidBar { .. })
        ));
        // Same BAR index on two functions is fine.
        let reqs = [req(0, 0, 16, false, false), req(1, 0, 16, false, false)];
        check(&w, &reqs, &allocate_bars(&w, &reqs).unwrap());
        assert!(allocate_bars(&w, &[]).unwrap().is_empty());
    }
}
