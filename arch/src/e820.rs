//! The guest physical memory map, shared by the Linux e820 table in the zero
//! page and the PVH `hvm_start_info` memory map.

use crate::layout::{
    low_ram_end, EBDA_START, FIRST_ADDR_PAST_32BITS, HIMEM_START, MAX_MEM_SIZE,
    MEM_32BIT_GAP_START, MIN_MEM_SIZE,
};
use crate::pci::{PCI_ECAM_BASE, PCI_ECAM_SIZE};
use crate::{Error, Result};

/// e820 / PVH type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 / PVH type of reserved memory (must not be used as RAM).
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry. Values are identical for e820 and PVH
/// (`XEN_HVM_MEMMAP_TYPE_RAM == E820_RAM`, `..._RESERVED == E820_RESERVED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryMapEntry {
    /// Guest-physical start.
    pub addr: u64,
    /// Length in bytes (never 0).
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The memory map for `mem_size` bytes of RAM laid out by
/// [`crate::layout::ram_regions`].
///
/// Entries are sorted, non-overlapping and non-empty:
/// RAM `[0, EBDA_START)`, reserved `[EBDA_START, 1 MiB)` (EBDA, VGA hole,
/// BIOS area holding the ACPI and MP tables), RAM `[1 MiB, min(mem, 3 GiB))`,
/// reserved `[PCI_ECAM_BASE, +PCI_ECAM_SIZE)` (the PCI ECAM, which Linux
/// only uses when it is reserved) and, if `mem_size` exceeds 3 GiB, RAM
/// `[4 GiB, 4 GiB + mem_size - 3 GiB)`. The rest of the MMIO gap is left
/// out (a hole), as on real machines.
///
/// Fails with [`Error::InvalidMemSize`] outside `MIN_MEM_SIZE..=MAX_MEM_SIZE`.
pub fn memory_map(mem_size: u64) -> Result<Vec<MemoryMapEntry>> {
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size) {
        return Err(Error::InvalidMemSize(mem_size));
    }
    let mut map = vec![
        MemoryMapEntry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
        MemoryMapEntry {
            addr: HIMEM_START,
            size: low_ram_end(mem_size) - HIMEM_START,
            kind: E820_RAM,
        },
        MemoryMapEntry {
            addr: PCI_ECAM_BASE,
            size: PCI_ECAM_SIZE,
            kind: E820_RESERVED,
        },
    ];
    if mem_size > MEM_32BIT_GAP_START {
        map.push(MemoryMapEntry {
            addr: FIRST_ADDR_PAST_32BITS,
            size: mem_size - MEM_32BIT_GAP_START,
            kind: E820_RAM,
        });
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MemoryMapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn small_memory_map() {
        let map = memory_map(512 << 20).unwrap();
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    addr: 0,
                    size: 0x9FC00,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0x9FC00,
                    size: 0x60400,
                    kind: E820_RESERVED
                },
                MemoryMapEntry {
                    addr: 0x10_0000,
                    size: (512 << 20) - 0x10_0000,
                    kind: E820_RAM
                },
                MemoryMapEntry {
                    addr: 0xE000_0000,
                    size: 0x10_0000,
                    kind: E820_RESERVED
                },
            ]
        );
    }

    #[test]
    fn large_memory_map_splits_around_gap() {
        let map = memory_map(5 << 30).unwrap();
        assert_eq!(map.len(), 5);
        assert_eq!(map[2].addr + map[2].size, 0xC000_0000);
        assert_eq!(
            map[3],
            MemoryMapEntry {
                addr: 0xE000_0000,
                size: 0x10_0000,
                kind: E820_RESERVED
            },
            "the ECAM is reserved"
        );
        assert_eq!(
            map[4],
            MemoryMapEntry {
                addr: 1 << 32,
                size: 2 << 30,
                kind: E820_RAM
            }
        );
        // All RAM except the 384 KiB reserved below 1 MiB is reported.
        assert_eq!(ram_total(&map), (5 << 30) - (0x10_0000 - 0x9FC00));
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn exactly_gap_start_has_no_high_region() {
        assert_eq!(memory_map(MEM_32BIT_GAP_START).unwrap().len(), 4);
    }

    #[test]
    fn bad_sizes_rejected() {
        assert!(matches!(memory_map(0), Err(Error::InvalidMemSize(0))));
        assert!(memory_map(MIN_MEM_SIZE - 1).is_err());
        assert!(memory_map(MAX_MEM_SIZE + 1).is_err());
    }
}
