//! 16550A UART on COM1 (port 0x3f8, IRQ 4), wrapping `vm_superio::Serial`.
//!
//! The interrupt is an [`EventFd`] that the VMM registers as an irqfd for
//! GSI 4. Guest output goes to a `Write` sink, flushed after every byte.

use std::io::{self, Write};

use log::warn;
use serde::{Deserialize, Serialize};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// First I/O port of COM1.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Number of ports the UART decodes (`COM1_PORT_BASE..COM1_PORT_BASE + 8`).
pub const COM1_PORT_LEN: u16 = 8;
/// Legacy IRQ line (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;
/// Capacity of the receive FIFO of the model (bytes); bounds `in_buffer`.
pub const FIFO_SIZE: usize = 64;

/// A [`Trigger`] that signals an eventfd (an irqfd on the VMM side).
///
/// Invariant: wraps a valid eventfd owned by this object.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Serializable mirror of `vm_superio::SerialState`.
///
/// Invariant: `in_buffer.len() <= FIFO_SIZE` for a state produced by
/// [`SerialDevice::state`]; [`SerialDevice::from_state`] rejects longer ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    fn default() -> Self {
        (&vm_superio::serial::SerialState::default()).into()
    }
}

impl From<&vm_superio::serial::SerialState> for SerialState {
    fn from(s: &vm_superio::serial::SerialState) -> Self {
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl From<&SerialState> for vm_superio::serial::SerialState {
    fn from(s: &SerialState) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

type Inner = Serial<IrqTrigger, NoEvents, Box<dyn Write + Send>>;

/// The COM1 UART.
///
/// Invariant: register accesses never panic; output errors lose the byte
/// (logged) but the guest still sees the transmitter as empty.
pub struct SerialDevice {
    inner: Inner,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("state", &self.state())
            .finish()
    }
}

impl SerialDevice {
    /// Builds a UART in its power-on state that raises `irq` and writes the
    /// guest's output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Result<Self> {
        Ok(SerialDevice {
            inner: Serial::new(IrqTrigger(irq), out),
        })
    }

    /// Rebuilds a UART from a saved state (re-raising a pending interrupt).
    /// Fails if the state's input buffer exceeds [`FIFO_SIZE`] or the
    /// interrupt cannot be signalled.
    pub fn from_state(
        state: &SerialState,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self> {
        if state.in_buffer.len() > FIFO_SIZE {
            return Err(Error::Serial(format!(
                "saved input buffer holds {} bytes, more than the FIFO's {FIFO_SIZE}",
                state.in_buffer.len()
            )));
        }
        let inner = Serial::from_state(&state.into(), IrqTrigger(irq), NoEvents, out)
            .map_err(|e| Error::Serial(format!("restoring state: {e}")))?;
        Ok(SerialDevice { inner })
    }

    /// Guest read of register `offset` (0..=7 from the port base); other
    /// offsets read 0.
    pub fn read(&mut self, offset: u8) -> u8 {
        if offset >= COM1_PORT_LEN as u8 {
            return 0;
        }
        self.inner.read(offset)
    }

    /// Guest write of `value` to register `offset`. Output errors are
    /// logged and the byte is dropped; only a failure to signal the
    /// interrupt is returned. Offsets past 7 are ignored.
    pub fn write(&mut self, offset: u8, value: u8) -> Result<()> {
        if offset >= COM1_PORT_LEN as u8 {
            return Ok(());
        }
        match self.inner.write(offset, value) {
            Ok(()) => Ok(()),
            Err(vm_superio::serial::Error::IOError(e)) => {
                warn!("serial: output write failed, byte lost: {e}");
                Ok(())
            }
            Err(vm_superio::serial::Error::Trigger(e)) => {
                Err(Error::Serial(format!("signalling IRQ {COM1_IRQ}: {e}")))
            }
            Err(e) => Err(Error::Serial(e.to_string())),
        }
    }

    /// Queues host input for the guest; returns how many bytes fit into the
    /// FIFO (0 when it is full or the UART is in loopback mode).
    pub fn enqueue_input(&mut self, input: &[u8]) -> Result<usize> {
        match self.inner.enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(e) => Err(Error::Serial(format!("queueing input: {e}"))),
        }
    }

    /// Copy of the register state.
    pub fn state(&self) -> SerialState {
        (&self.inner.state()).into()
    }

    /// The interrupt eventfd.
    pub fn irq(&self) -> &EventFd {
        &self.inner.interrupt_evt().0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("broken"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn efd() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    const THR: u8 = 0;
    const IER: u8 = 1;
    const LCR: u8 = 3;
    const LSR: u8 = 5;
    const SCR: u8 = 7;

    #[test]
    fn thr_write_reaches_output() {
        let buf = Buf::default();
        let mut s = SerialDevice::new(efd(), Box::new(buf.clone())).unwrap();
        for b in b"hi\n" {
            s.write(THR, *b).unwrap();
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn lsr_reports_thr_empty() {
        let mut s = SerialDevice::new(efd(), Box::new(io::sink())).unwrap();
        let lsr = s.read(LSR);
        assert_ne!(lsr & 0x20, 0, "THRE");
        assert_ne!(lsr & 0x40, 0, "TEMT");
    }

    #[test]
    fn thr_interrupt_fires_when_enabled() {
        let irq = efd();
        let probe = irq.try_clone().unwrap();
        let mut s = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
        s.write(IER, 0x02).unwrap();
        assert_eq!(probe.read().unwrap(), 1);
        // Reading IIR acknowledges the THR-empty interrupt.
        assert_eq!(s.read(2) & 0x0f, 0x02);
        s.write(THR, b'x').unwrap();
        assert_eq!(probe.read().unwrap(), 1);
    }

    #[test]
    fn output_errors_are_not_fatal() {
        let mut s = SerialDevice::new(efd(), Box::new(Broken)).unwrap();
        assert!(s.write(THR, b'x').is_ok());
    }

    #[test]
    fn out_of_range_offsets_are_ignored() {
        let mut s = SerialDevice::new(efd(), Box::new(io::sink())).unwrap();
        assert!(s.write(200, 1).is_ok());
        assert_eq!(s.read(8), 0);
        assert_eq!(s.read(255), 0);
    }

    #[test]
    fn state_round_trip() {
        let mut s = SerialDevice::new(efd(), Box::new(io::sink())).unwrap();
        s.write(LCR, 0x03).unwrap();
        s.write(IER, 0x01).unwrap();
        s.write(SCR, 0x5a).unwrap();
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        let st = s.state();
        let mut r = SerialDevice::from_state(&st, efd(), Box::new(io::sink())).unwrap();
        assert_eq!(r.state(), st);
        assert_eq!(r.read(LCR), 0x03);
        assert_eq!(r.read(IER), 0x01);
        assert_eq!(r.read(SCR), 0x5a);
        assert_eq!(r.read(THR), b'a');
        assert_eq!(r.read(THR), b'b');
    }

    #[test]
    fn from_state_rejects_oversized_fifo() {
        let st = SerialState {
            in_buffer: vec![0; FIFO_SIZE + 1],
            ..SerialState::default()
        };
        assert!(SerialDevice::from_state(&st, efd(), Box::new(io::sink())).is_err());
    }

    #[test]
    fn enqueue_bounded_by_fifo() {
        let mut s = SerialDevice::new(efd(), Box::new(io::sink())).unwrap();
        assert_eq!(s.enqueue_input(&[1; 100]).unwrap(), FIFO_SIZE);
        assert_eq!(s.enqueue_input(&[1]).unwrap(), 0);
    }
}
