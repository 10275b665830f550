//! What a vCPU thread sends its I/O exits to ([`Buses`]): the legacy port
//! bus, and the PCI bus for the config ports 0xCF8..=0xCFF (except a byte
//! at 0xCF9), I/O BARs, and MMIO (ECAM and BARs).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use log::debug;

use crate::pio::{PioAction, PioBus, RESET_CONTROL_PORT};

/// First legacy PCI configuration port (CONFIG_ADDRESS, a dword).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Last legacy PCI configuration port (CONFIG_DATA is 0xCFC..=0xCFF).
pub const PCI_CONFIG_LAST_PORT: u16 = 0xcff;
/// First port of the I/O BAR window (`arch::pci::PCI_IO_START`).
pub const PCI_IO_START: u16 = arch::pci::PCI_IO_START as u16;

/// The PCI side of exit dispatch (implemented over the VM's PCI bus).
///
/// Invariant: never panics on any address, size or value.
pub trait PciIo: Send + Sync {
    /// Guest read of MMIO `addr`; `false` if no PCI range decodes it.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool;
    /// Guest write of MMIO `addr`; `false` if no PCI range decodes it.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> bool;
    /// Guest `in` from `port` (a config port, see [`is_pci_config_port`],
    /// or a port at or above [`PCI_IO_START`]); `false` if the PCI bus does
    /// not serve it (then `data` is untouched).
    fn pio_read(&self, port: u16, data: &mut [u8]) -> bool;
    /// Guest `out` to `port` (as for [`PciIo::pio_read`]); `false` if the
    /// PCI bus does not serve it.
    fn pio_write(&self, port: u16, data: &[u8]) -> bool;
}

/// Whether a port access of `len` bytes at `port` goes to the PCI config
/// ports: 0xCF8..=0xCFF except a byte access to 0xCF9 (the reset control
/// register).
pub fn is_pci_config_port(port: u16, len: usize) -> bool {
    (PCI_CONFIG_ADDRESS_PORT..=PCI_CONFIG_LAST_PORT).contains(&port)
        && !(port == RESET_CONTROL_PORT && len == 1)
}

/// The buses of one VM as its vCPU threads see them.
///
/// Invariant: `pci` is the VM's PCI bus for its whole life (`None`: no PCI,
/// config ports and MMIO behave as before PCI existed); MMIO nothing
/// decodes reads as 0 and drops writes, each address logged once.
pub struct Buses {
    /// The legacy port devices.
    pub pio: Arc<PioBus>,
    /// The PCI bus.
    pub pci: Option<Arc<dyn PciIo>>,
    logged: Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for Buses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buses")
            .field("pci", &self.pci.is_some())
            .finish_non_exhaustive()
    }
}

impl Buses {
    /// The buses over `pio` and `pci`.
    pub fn new(pio: Arc<PioBus>, pci: Option<Arc<dyn PciIo>>) -> Buses {
        Buses {
            pio,
            pci,
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// The PCI bus, if `port` may be one of its ports (config ports or the
    /// I/O BAR window); the legacy devices never sit there.
    fn pci_port(&self, port: u16, len: usize) -> Option<&Arc<dyn PciIo>> {
        self.pci
            .as_ref()
            .filter(|_| is_pci_config_port(port, len) || port >= PCI_IO_START)
    }

    /// Guest `in` from `port`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if !self
            .pci_port(port, data.len())
            .is_some_and(|p| p.pio_read(port, data))
        {
            self.pio.io_in(port, data);
        }
    }

    /// Guest `out` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PioAction {
        if self
            .pci_port(port, data.len())
            .is_some_and(|p| p.pio_write(port, data))
        {
            return PioAction::Continue;
        }
        self.pio.io_out(port, data)
    }

    fn log_once(&self, addr: u64, dir: &str) {
        let mut l = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() < 4096 && l.insert(addr) {
            debug!("ignoring MMIO {dir} at {addr:#x} (logged once per address)");
        }
    }

    /// Guest MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.as_ref().is_some_and(|p| p.mmio_read(addr, data)) {
            self.log_once(addr, "read");
            data.fill(0);
        }
    }

    /// Guest MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if !self.pci.as_ref().is_some_and(|p| p.mmio_write(addr, data)) {
            self.log_once(addr, "write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pio::LegacyIrqs;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Default)]
    struct Fake {
        addr: AtomicU32,
        mmio: AtomicU32,
    }

    impl PciIo for Fake {
        fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
            if addr == 0xe000_0000 {
                data.fill(0x5a);
                return true;
            }
            false
        }
        fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
            if addr == 0xe000_0000 {
                self.mmio.store(u32::from(data[0]), Ordering::SeqCst);
                return true;
            }
            false
        }
        fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
            if !is_pci_config_port(port, data.len()) {
                return false;
            }
            let v = self.addr.load(Ordering::SeqCst).to_le_bytes();
            data.copy_from_slice(&v[..data.len()]);
            true
        }
        fn pio_write(&self, port: u16, data: &[u8]) -> bool {
            if !is_pci_config_port(port, data.len()) {
                return false;
            }
            let mut b = [0u8; 4];
            b[..data.len()].copy_from_slice(data);
            self.addr.store(u32::from_le_bytes(b), Ordering::SeqCst);
            true
        }
    }

    #[test]
    fn config_ports_and_reset_control_and_mmio() {
        let pio =
            Arc::new(PioBus::new(LegacyIrqs::new().unwrap(), Box::new(std::io::sink())).unwrap());
        let fake = Arc::new(Fake::default());
        let b = Buses::new(pio.clone(), Some(fake.clone()));
        // A dword at 0xCF8 is CONFIG_ADDRESS, not a reset.
        assert_eq!(b.io_out(0xcf8, &[0x06, 0, 0, 0x80]), PioAction::Continue);
        assert_eq!(fake.addr.load(Ordering::SeqCst), 0x8000_0006);
        let mut d = [0u8; 4];
        b.io_in(0xcf8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0006);
        // A byte at 0xCF9 stays the reset control register.
        assert_eq!(b.io_out(0xcf9, &[0x02]), PioAction::Continue);
        assert!(matches!(b.io_out(0xcf9, &[0x06]), PioAction::End(_)));
        let mut one = [0xaau8];
        b.io_in(0xcf9, &mut one);
        assert_eq!(one, [0]);
        // A word at 0xCFA goes to PCI.
        b.io_out(0xcfa, &[1, 2]);
        assert_eq!(fake.addr.load(Ordering::SeqCst), 0x0201);
        // Other ports still reach the legacy bus.
        let mut lsr = [0u8];
        b.io_in(0x3fd, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // MMIO: decoded by PCI, or 0 / dropped.
        let mut m = [0u8; 4];
        b.mmio_read(0xe000_0000, &mut m);
        assert_eq!(m, [0x5a; 4]);
        b.mmio_write(0xe000_0000, &[7]);
        assert_eq!(fake.mmio.load(Ordering::SeqCst), 7);
        let mut m = [0xffu8; 8];
        b.mmio_read(0x1234_0000, &mut m);
        assert_eq!(m, [0; 8]);
        b.mmio_write(0x1234_0000, &[1; 8]);
        // A port in the I/O window that PCI does not serve: legacy (0xff).
        let mut d = [0u8; 2];
        b.io_in(0xc010, &mut d);
        assert_eq!(d, [0xff; 2]);
        // Without PCI: the config ports are legacy (unknown, 0xff).
        let b = Buses::new(pio, None);
        let mut d = [0u8; 4];
        b.io_in(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
