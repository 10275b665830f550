//! The reset vector: what a CPU runs after a reset, 16 bytes below 1 MiB.
//!
//! There is no BIOS. Linux, when its other reboot methods did not end the
//! machine, switches to real mode and jumps to the reset vector
//! (`machine_real_restart(MRR_BIOS)`); on hardware-reduced ACPI without
//! EFI that is even its first choice after the ACPI reset register. So the
//! VMM places a stub there that writes the ACPI reset value to the power
//! port (which ends the VM) and halts, instead of running whatever the
//! memory holds.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::acpi::{ACPI_POWER_PORT, ACPI_RESET_VALUE};
use crate::layout::RESET_VECTOR;
use crate::{Error, Result};

/// Size of the stub (the reset vector is the last 16 bytes below 1 MiB).
pub const RESET_STUB_SIZE: usize = 16;

/// The real-mode stub: `mov al, RESET; mov dx, PORT; out dx, al; cli;
/// hlt; jmp <cli>`, padded with `hlt`.
pub fn reset_stub() -> [u8; RESET_STUB_SIZE] {
    let [port_lo, port_hi] = ACPI_POWER_PORT.to_le_bytes();
    let code = [
        0xB0,
        ACPI_RESET_VALUE, // mov al, imm8
        0xBA,
        port_lo,
        port_hi, // mov dx, imm16
        0xEE,    // out dx, al
        0xFA,    // cli
        0xF4,    // hlt
        0xEB,
        0xFC, // jmp short -4 (back to cli)
    ];
    let mut stub = [0xF4; RESET_STUB_SIZE];
    stub[..code.len()].copy_from_slice(&code);
    stub
}

/// Writes [`reset_stub`] at [`RESET_VECTOR`].
pub fn setup_reset_vector<M: GuestMemoryBackend>(mem: &M) -> Result<()> {
    mem.write_slice(&reset_stub(), GuestAddress(RESET_VECTOR))
        .map_err(|source| Error::GuestWrite {
            what: "reset vector",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::guest_mem;

    #[test]
    fn stub_writes_the_reset_register_then_halts() {
        let s = reset_stub();
        let [lo, hi] = ACPI_POWER_PORT.to_le_bytes();
        assert_eq!((lo, hi), (0x00, 0x06));
        assert_eq!(
            &s[..10],
            &[0xB0, 0x01, 0xBA, lo, hi, 0xEE, 0xFA, 0xF4, 0xEB, 0xFC]
        );
        // The jump lands on `cli` (offset 6): 10 + (-4) = 6.
        assert_eq!(10 + (s[9] as i8) as isize, 6);
        assert!(s[10..].iter().all(|&b| b == 0xF4));
        assert_eq!(RESET_VECTOR + RESET_STUB_SIZE as u64, 1 << 20);
    }

    #[test]
    fn written_at_the_reset_vector() {
        let mem = guest_mem(16 << 20);
        setup_reset_vector(&mem).unwrap();
        let mut b = [0u8; RESET_STUB_SIZE];
        mem.read_slice(&mut b, GuestAddress(0xFFFF0)).unwrap();
        assert_eq!(b, reset_stub());
    }
}
