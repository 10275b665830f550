//! The port I/O bus: COM1 (0x3f8..0x3ff), the i8042 (0x60, 0x64), the
//! ACPI power port (reset and S5, see `arch::acpi`), the reset control
//! register 0xCF9, and quiet defaults for every other port.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Mutex;

use arch::acpi::{
    ACPI_POWER_PORT, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE, ACPI_SLP_EN, ACPI_SLP_TYP_SHIFT,
};
use devices::i8042::{I8042Device, I8042State, I8042_COMMAND_PORT, I8042_DATA_PORT};
use devices::serial::{SerialDevice, SerialState, COM1_PORT_BASE, COM1_PORT_LEN};
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;

/// Errors building the bus.
///
/// Invariant: messages name the device and the OS error.
#[derive(Debug, thiserror::Error)]
pub enum PioError {
    /// An eventfd could not be created or cloned.
    #[error("eventfd for {0}: {1}")]
    EventFd(&'static str, #[source] std::io::Error),
    /// The serial output file could not be opened.
    #[error("serial output file {0}: {1}")]
    SerialFile(String, #[source] std::io::Error),
    /// The serial device refused its state.
    #[error("serial: {0}")]
    Serial(#[from] devices::Error),
}

/// The reset control register of PC chipsets (a byte at 0xCF9, inside the
/// PCI configuration ports): writing it with [`RST_CPU`] set resets.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// Bit of [`RESET_CONTROL_PORT`] that starts the reset.
pub const RST_CPU: u8 = 0x04;

/// What the vCPU loop must do after a port access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    /// Keep running.
    Continue,
    /// The guest asked for a reset or power-off (the reason is given):
    /// end the VM.
    End(&'static str),
}

/// The interrupt lines of the legacy devices: eventfds registered as
/// irqfds by the VM for its whole life.
///
/// Invariant: `serial` drives GSI 4, `keyboard` drives GSI 1.
#[derive(Debug)]
pub struct LegacyIrqs {
    /// COM1 (IRQ 4).
    pub serial: EventFd,
    /// i8042 keyboard (IRQ 1).
    pub keyboard: EventFd,
}

impl LegacyIrqs {
    /// Two fresh non-blocking eventfds.
    pub fn new() -> Result<LegacyIrqs, PioError> {
        Ok(LegacyIrqs {
            serial: efd("COM1 interrupt")?,
            keyboard: efd("i8042 interrupt")?,
        })
    }

    /// Clones of both eventfds, for a new device bus.
    pub fn try_clone(&self) -> Result<LegacyIrqs, PioError> {
        Ok(LegacyIrqs {
            serial: self
                .serial
                .try_clone()
                .map_err(|e| PioError::EventFd("COM1 interrupt", e))?,
            keyboard: self
                .keyboard
                .try_clone()
                .map_err(|e| PioError::EventFd("i8042 interrupt", e))?,
        })
    }
}

/// Opens the sink the serial console writes to.
pub fn serial_output(cfg: &SerialConfig) -> Result<Box<dyn Write + Send>, PioError> {
    Ok(match cfg {
        SerialConfig::Tty => Box::new(std::io::stdout()),
        SerialConfig::Off => Box::new(std::io::sink()),
        SerialConfig::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| PioError::SerialFile(p.display().to_string(), e))?,
        ),
    })
}

/// The legacy port I/O devices of one VM.
///
/// Invariant: never panics on any port, size or value; unknown ports read
/// 0xff and drop writes, each logged once at debug level.
pub struct PioBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042Device>,
    reset_evt: EventFd,
    logged: Mutex<HashSet<u16>>,
}

impl std::fmt::Debug for PioBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PioBus").finish_non_exhaustive()
    }
}

fn efd(what: &'static str) -> Result<EventFd, PioError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|e| PioError::EventFd(what, e))
}

impl PioBus {
    /// Builds the bus with power-on devices raising `irqs`; the UART's
    /// output goes to `out`.
    pub fn new(irqs: LegacyIrqs, out: Box<dyn Write + Send>) -> Result<PioBus, PioError> {
        Self::build(None, None, irqs, out)
    }

    /// Builds the bus from saved device states.
    pub fn from_state(
        serial: &SerialState,
        i8042: &I8042State,
        irqs: LegacyIrqs,
        out: Box<dyn Write + Send>,
    ) -> Result<PioBus, PioError> {
        Self::build(Some(serial), Some(i8042), irqs, out)
    }

    fn build(
        serial: Option<&SerialState>,
        i8042: Option<&I8042State>,
        irqs: LegacyIrqs,
        out: Box<dyn Write + Send>,
    ) -> Result<PioBus, PioError> {
        let serial = match serial {
            Some(s) => SerialDevice::from_state(s, irqs.serial, out)?,
            None => SerialDevice::new(irqs.serial, out)?,
        };
        let reset_evt = efd("i8042 reset")?;
        let dev_evt = reset_evt
            .try_clone()
            .map_err(|e| PioError::EventFd("i8042 reset", e))?;
        let i8042 = match i8042 {
            Some(s) => I8042Device::from_state(s, dev_evt, irqs.keyboard)?,
            None => I8042Device::new(dev_evt, irqs.keyboard),
        };
        Ok(PioBus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(i8042),
            reset_evt,
            logged: Mutex::new(HashSet::new()),
        })
    }

    /// Saved state of the serial port.
    pub fn serial_state(&self) -> SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state()
    }

    /// Saved state of the i8042.
    pub fn i8042_state(&self) -> I8042State {
        self.i8042.lock().unwrap_or_else(|p| p.into_inner()).state()
    }

    fn log_once(&self, port: u16, dir: &str) {
        let mut l = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if l.insert(port) {
            debug!("ignoring port I/O {dir} at {port:#x} (logged once per port)");
        }
    }

    /// Guest `in` from `port`; fills `data`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        if (COM1_PORT_BASE..COM1_PORT_BASE + COM1_PORT_LEN).contains(&port) {
            // Multi-byte data is string I/O (`rep insb`): every element
            // comes from the same register.
            let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let reg = (port - COM1_PORT_BASE) as u8;
            for b in data.iter_mut() {
                *b = s.read(reg);
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            let mut d = self.i8042.lock().unwrap_or_else(|p| p.into_inner());
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = d.read((port - I8042_DATA_PORT) as u8);
            }
        } else if port == ACPI_POWER_PORT || (port == RESET_CONTROL_PORT && data.len() == 1) {
            // Sleep status: never woken; reset control: no bit latched.
            data.fill(0);
        } else {
            self.log_once(port, "read");
            data.fill(0xff);
        }
    }

    /// Guest `out` of `data` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PioAction {
        if (COM1_PORT_BASE..COM1_PORT_BASE + COM1_PORT_LEN).contains(&port) {
            // Multi-byte data is string I/O (`rep outsb`): every element goes
            // to the same register.
            let mut s = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let reg = (port - COM1_PORT_BASE) as u8;
            for b in data {
                if let Err(e) = s.write(reg, *b) {
                    warn!("{e}");
                }
            }
            PioAction::Continue
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            if let Some(b) = data.first() {
                self.i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write((port - I8042_DATA_PORT) as u8, *b);
            }
            if self.reset_evt.read().is_ok() {
                PioAction::End("i8042 reset (command 0xFE)")
            } else {
                PioAction::Continue
            }
        } else if port == ACPI_POWER_PORT {
            match data.first() {
                Some(&v) if v == ACPI_RESET_VALUE => PioAction::End("ACPI reset register"),
                Some(&v)
                    if v & ACPI_SLP_EN != 0
                        && (v >> ACPI_SLP_TYP_SHIFT) & 0x7 == ACPI_S5_SLEEP_TYPE =>
                {
                    PioAction::End("ACPI power off (S5)")
                }
                // Clearing WAK_STS in the sleep status register, or another
                // sleep state: nothing to do.
                _ => PioAction::Continue,
            }
        } else if port == RESET_CONTROL_PORT && data.len() == 1 {
            if data[0] & RST_CPU != 0 {
                PioAction::End("reset control register 0xCF9")
            } else {
                PioAction::Continue
            }
        } else {
            self.log_once(port, "write");
            PioAction::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus() -> PioBus {
        PioBus::new(LegacyIrqs::new().unwrap(), Box::new(std::io::sink())).unwrap()
    }

    #[test]
    fn reset_and_power_off_ports() {
        let bus = bus();
        // Linux's acpi_reboot(): the FADT reset value to the reset register.
        assert!(matches!(
            bus.io_out(ACPI_POWER_PORT, &[ACPI_RESET_VALUE]),
            PioAction::End(_)
        ));
        // acpi_hw_extended_sleep(S5): clear WAK_STS, then SLP_TYP | SLP_EN.
        assert_eq!(bus.io_out(ACPI_POWER_PORT, &[0x80]), PioAction::Continue);
        assert!(matches!(
            bus.io_out(ACPI_POWER_PORT, &[(5 << 2) | 0x20]),
            PioAction::End(_)
        ));
        // Another sleep type without SLP_EN does nothing.
        assert_eq!(bus.io_out(ACPI_POWER_PORT, &[3 << 2]), PioAction::Continue);
        // reboot=pci: 0x02 then 0x06 to 0xCF9.
        assert_eq!(bus.io_out(RESET_CONTROL_PORT, &[0x02]), PioAction::Continue);
        assert!(matches!(
            bus.io_out(RESET_CONTROL_PORT, &[0x06]),
            PioAction::End(_)
        ));
        // A 32-bit PCI config access at 0xCF8 is not a reset.
        assert_eq!(bus.io_out(0xcf8, &[0x06, 0, 0, 0x80]), PioAction::Continue);
        let mut d = [0xaa; 1];
        bus.io_in(ACPI_POWER_PORT, &mut d);
        assert_eq!(d, [0]);
    }

    #[test]
    fn ports() {
        let bus = bus();
        let mut d = [0u8; 1];
        bus.io_in(0x3fd, &mut d);
        assert_ne!(d[0] & 0x20, 0, "THR empty");
        let mut d = [0u8; 4];
        bus.io_in(0xcfc, &mut d);
        assert_eq!(d, [0xff; 4]);
        assert_eq!(bus.io_out(0x80, &[1]), PioAction::Continue);
        assert_eq!(bus.io_out(0x64, &[0x20]), PioAction::Continue);
        assert_eq!(bus.io_out(0x60, &[0xfe]), PioAction::Continue);
        assert_eq!(bus.io_out(0x64, &[]), PioAction::Continue);
        assert!(matches!(bus.io_out(0x64, &[0xfe]), PioAction::End(_)));
        assert_eq!(bus.io_out(0x3f8, b"xy"), PioAction::Continue);
        let mut e: [u8; 0] = [];
        bus.io_in(0x60, &mut e);
        // Long string I/O never overflows register offsets.
        assert_eq!(bus.io_out(0x3f8, &[b'z'; 4096]), PioAction::Continue);
        let mut big = vec![0u8; 4096];
        bus.io_in(0x3fd, &mut big);
    }
}
