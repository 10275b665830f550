//! KVM memory slots for the host-memory parts of BARs
//! ([`devices::pci::BarKind::Mapped`]): not guest RAM (no dirty logging, not
//! migrated), numbered above the RAM slots, and moved whenever the guest
//! moves or disables the BAR.

use std::sync::{Arc, Mutex};

use devices::pci::{BarKind, BarMapping};
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use log::{debug, warn};

/// One host range mapped into the guest: `(guest-physical, size, host)`.
pub type MappedPart = (u64, u64, u64);

const PAGE_MASK: u64 = 4095;

/// The host-memory parts of `bars` as guest ranges, in BAR order. Parts
/// that are not page-aligned, or not inside their BAR, are left out (they
/// keep trapping).
pub fn mapped_parts(bars: &[BarMapping]) -> Vec<MappedPart> {
    let mut out = Vec::new();
    for b in bars {
        let BarKind::Mapped(parts) = &b.kind else {
            continue;
        };
        let len = b.range.end.saturating_sub(b.range.start);
        for &(off, size, host) in parts {
            let inside = off.checked_add(size).is_some_and(|e| e <= len);
            let aligned = (off | size | host | b.range.start) & PAGE_MASK == 0;
            if size == 0 || !inside || !aligned {
                debug!("BAR {} part {off:#x}+{size:#x} stays trapped", b.bar);
                continue;
            }
            out.push((b.range.start + off, size, host));
        }
    }
    out
}

/// The mapped BAR parts of a VM as KVM slots.
///
/// Invariant: `slots` lists exactly the slots installed in KVM, each with
/// a number in `first_slot..first_slot + max`, never one of the RAM slots.
pub struct BarSlots {
    fd: Arc<VmFd>,
    first_slot: u32,
    max: u32,
    slots: Mutex<Vec<(u32, MappedPart)>>,
}

impl std::fmt::Debug for BarSlots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarSlots")
            .field("first_slot", &self.first_slot)
            .finish_non_exhaustive()
    }
}

impl BarSlots {
    /// Slots from `first_slot` (the first number above the RAM slots), at
    /// most `max` of them.
    pub fn new(fd: Arc<VmFd>, first_slot: u32, max: u32) -> BarSlots {
        BarSlots {
            fd,
            first_slot,
            max,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn region(slot: u32, p: MappedPart, size: u64) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: p.0,
            memory_size: size,
            userspace_addr: p.2,
        }
    }

    /// Makes KVM's BAR slots equal `wanted`: removes slots no longer
    /// wanted, then adds the new ones. A part that KVM refuses is logged
    /// and left out (its accesses trap).
    ///
    /// # Safety
    /// Every host range in `wanted` must stay mapped while it is installed
    /// (the BarKind::Mapped invariant: for the function's life, and the
    /// VM, which drops its slots with its fd, does not outlive it).
    pub unsafe fn sync(&self, wanted: &[MappedPart]) {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = Vec::with_capacity(slots.len());
        for (slot, part) in slots.drain(..) {
            if wanted.contains(&part) {
                kept.push((slot, part));
                continue;
            }
            // SAFETY: a size of 0 deletes the slot; no memory is handed over.
            match unsafe { self.fd.set_user_memory_region(Self::region(slot, part, 0)) } {
                Ok(()) => debug!("BAR slot {slot} at {:#x} removed", part.0),
                Err(e) => {
                    warn!("removing BAR slot {slot} at {:#x}: {e}", part.0);
                    kept.push((slot, part));
                }
            }
        }
        *slots = kept;
        for &part in wanted {
            if slots.iter().any(|(_, p)| *p == part) {
                continue;
            }
            let Some(slot) = (self.first_slot..self.first_slot.saturating_add(self.max))
                .find(|n| !slots.iter().any(|(s, _)| s == n))
            else {
                warn!(
                    "no free KVM slot for the BAR part at {:#x}; it traps",
                    part.0
                );
                continue;
            };
            // SAFETY: the caller guarantees the host range stays mapped
            // while installed.
            match unsafe {
                self.fd
                    .set_user_memory_region(Self::region(slot, part, part.1))
            } {
                Ok(()) => {
                    debug!(
                        "BAR part {:#x}+{:#x} mapped as KVM slot {slot}",
                        part.0, part.1
                    );
                    slots.push((slot, part));
                }
                Err(e) => warn!(
                    "mapping the BAR part at {:#x}+{:#x} as KVM slot {slot}: {e}; it traps",
                    part.0, part.1
                ),
            }
        }
    }

    /// The installed slots (for tests).
    pub fn installed(&self) -> Vec<(u32, MappedPart)> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_inside_and_aligned_only() {
        let bars = vec![
            BarMapping {
                bar: 0,
                range: 0xc000_0000..0xc000_4000,
                kind: BarKind::Mapped(vec![
                    (0, 0x1000, 0x7f00_0000_0000),
                    (0x2000, 0x1000, 0x7f00_0000_2000),
                    (0x3000, 0x2000, 0x7f00_0000_3000), // past the BAR
                    (0x100, 0x1000, 0x7f00_0000_0000),  // unaligned
                ]),
            },
            BarMapping {
                bar: 2,
                range: 0xc001_0000..0xc001_1000,
                kind: BarKind::Trap,
            },
        ];
        assert_eq!(
            mapped_parts(&bars),
            vec![
                (0xc000_0000, 0x1000, 0x7f00_0000_0000),
                (0xc000_2000, 0x1000, 0x7f00_0000_2000)
            ]
        );
    }

    #[test]
    fn slots_follow_the_bars() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIPPED: no /dev/kvm");
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let fd = Arc::new(kvm.create_vm().unwrap());
        let mut mem = vec![0u8; 0x4000 + 4096];
        let host = (mem.as_mut_ptr() as u64 + PAGE_MASK) & !PAGE_MASK;
        let s = BarSlots::new(fd, 4, 2);
        let a = (0xc000_0000, 0x1000, host);
        let b = (0xc000_1000, 0x1000, host + 0x1000);
        // SAFETY: `mem` outlives the VM fd's use of it (the slots are
        // removed below, and `s` drops before `mem`).
        unsafe { s.sync(&[a, b]) };
        assert_eq!(s.installed(), vec![(4, a), (5, b)]);
        let moved = (0xd000_0000, 0x1000, host);
        // SAFETY: as above.
        unsafe { s.sync(&[b, moved]) };
        assert_eq!(s.installed(), vec![(5, b), (4, moved)]);
        // A third part has no free slot: it is left out.
        // SAFETY: as above.
        unsafe { s.sync(&[b, moved, (0xd000_2000, 0x1000, host + 0x2000)]) };
        assert_eq!(s.installed().len(), 2);
        // SAFETY: removing everything.
        unsafe { s.sync(&[]) };
        assert!(s.installed().is_empty());
        drop(s);
        drop(mem);
    }
}
