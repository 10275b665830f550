//! An i8042 keyboard controller with a keyboard that answers but never
//! types: enough for Linux's i8042 and atkbd drivers to probe it without
//! errors, and the CPU-reset command.
//!
//! Port offsets are relative to 0x60: offset 0 is the data port (0x60),
//! offset 4 the status/command port (0x64).
//!
//! The controller keeps a small output buffer. Replies to controller
//! commands (0x20 read command byte, 0xAA self-test, ...) are polled by the
//! guest; bytes from the keyboard (replies to commands written to the data
//! port) also raise IRQ 1 when the command byte enables the keyboard
//! interrupt, once per byte, as the real part does.

use std::collections::VecDeque;

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::error::{Error, Result};

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Offset of the data port from [`I8042_DATA_PORT`].
pub const DATA_OFFSET: u8 = 0;
/// Offset of the command port from [`I8042_DATA_PORT`].
pub const COMMAND_OFFSET: u8 = 4;
/// Legacy IRQ line (and GSI) of the keyboard.
pub const KBD_IRQ: u32 = 1;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xFE;
/// Command: read the command byte (CTR).
pub const CMD_READ_CTR: u8 = 0x20;
/// Command: write the command byte (CTR); the byte follows on the data port.
pub const CMD_WRITE_CTR: u8 = 0x60;
/// Command: disable the auxiliary (mouse) port.
pub const CMD_AUX_DISABLE: u8 = 0xA7;
/// Command: enable the auxiliary (mouse) port.
pub const CMD_AUX_ENABLE: u8 = 0xA8;
/// Command: test the auxiliary port.
pub const CMD_AUX_TEST: u8 = 0xA9;
/// Command: controller self-test (answers [`SELF_TEST_OK`]).
pub const CMD_SELF_TEST: u8 = 0xAA;
/// Command: test the keyboard port (answers 0: no error).
pub const CMD_KBD_TEST: u8 = 0xAB;
/// Command: disable the keyboard port.
pub const CMD_KBD_DISABLE: u8 = 0xAD;
/// Command: enable the keyboard port.
pub const CMD_KBD_ENABLE: u8 = 0xAE;
/// Command: read the output port.
pub const CMD_READ_OUTP: u8 = 0xD0;
/// Command: write the output port; the byte follows on the data port.
pub const CMD_WRITE_OUTP: u8 = 0xD1;
/// Command: put the next data byte in the output buffer as keyboard data.
pub const CMD_WRITE_KBD_OUTBUF: u8 = 0xD2;
/// Command: put the next data byte in the output buffer as mouse data.
pub const CMD_WRITE_AUX_OUTBUF: u8 = 0xD3;
/// Command: send the next data byte to the mouse (there is none).
pub const CMD_WRITE_AUX: u8 = 0xD4;
/// Answer of a passed controller self-test.
pub const SELF_TEST_OK: u8 = 0x55;

/// Status: the output buffer holds a byte for the guest.
pub const SR_OBF: u8 = 0x01;
/// Status: system flag, set once the self-test passed.
pub const SR_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
pub const SR_CMD: u8 = 0x08;
/// Status: the byte in the output buffer comes from the mouse.
pub const SR_AUX: u8 = 0x20;
/// CTR: keyboard interrupt enabled.
pub const CTR_KBD_INT: u8 = 0x01;
/// CTR: system flag.
pub const CTR_SYS: u8 = 0x04;
/// CTR: keyboard port disabled.
pub const CTR_KBD_DISABLE: u8 = 0x10;
/// CTR: mouse port disabled.
pub const CTR_AUX_DISABLE: u8 = 0x20;
/// CTR: scan-code translation.
pub const CTR_XLATE: u8 = 0x40;

/// Keyboard: acknowledge.
const KBD_ACK: u8 = 0xFA;
/// Keyboard: basic assurance test passed (after reset).
const KBD_BAT_OK: u8 = 0xAA;
/// Capacity of the output buffer; bounds [`I8042State::out`].
pub const OUT_CAPACITY: usize = 16;

/// Where a byte in the output buffer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// A reply of the controller itself: polled, no interrupt.
    Controller,
    /// A byte from the keyboard: raises IRQ 1 when enabled.
    Keyboard,
    /// A byte for the mouse port (only through command 0xD3).
    Aux,
}

/// Saved state of the controller.
///
/// Invariant: `out.len() <= OUT_CAPACITY` for a state produced by
/// [`I8042Device::state`]; [`I8042Device::from_state`] rejects longer ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Flag bits of the status register other than OBF and AUX (which
    /// follow the output buffer).
    pub status: u8,
    /// The command byte.
    pub ctr: u8,
    /// The output port.
    pub outp: u8,
    /// Bytes waiting for the guest, oldest first.
    pub out: Vec<(u8, Source)>,
    /// A controller command waiting for its data byte, if any.
    pub pending_cmd: Option<u8>,
    /// A keyboard command waiting for its parameter byte, if any.
    pub kbd_param: Option<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            status: 0,
            ctr: CTR_KBD_INT | CTR_SYS | CTR_XLATE,
            outp: 0x01,
            out: Vec::new(),
            pending_cmd: None,
            kbd_param: None,
        }
    }
}

/// The controller.
///
/// Invariant: a write of [`CMD_RESET_CPU`] to the command port signals
/// `reset_evt` (the VMM then ends the VM cleanly), and nothing else does;
/// `irq` is signalled once for each keyboard byte that reaches the front of
/// the output buffer while [`CTR_KBD_INT`] is set. No input panics.
#[derive(Debug)]
pub struct I8042Device {
    reset_evt: EventFd,
    irq: EventFd,
    state: I8042State,
    out: VecDeque<(u8, Source)>,
}

impl I8042Device {
    /// Builds a controller in its power-on state that signals `reset_evt`
    /// on a CPU reset request and `irq` for keyboard bytes.
    pub fn new(reset_evt: EventFd, irq: EventFd) -> Self {
        I8042Device {
            reset_evt,
            irq,
            state: I8042State::default(),
            out: VecDeque::new(),
        }
    }

    /// Rebuilds a controller from a saved state; re-raises IRQ 1 if a
    /// keyboard byte waits at the front of the buffer.
    pub fn from_state(state: &I8042State, reset_evt: EventFd, irq: EventFd) -> Result<Self> {
        if state.out.len() > OUT_CAPACITY {
            return Err(Error::I8042(format!(
                "saved output buffer holds {} bytes, more than {OUT_CAPACITY}",
                state.out.len()
            )));
        }
        let mut d = I8042Device {
            reset_evt,
            irq,
            state: state.clone(),
            out: state.out.iter().copied().collect(),
        };
        d.state.out.clear();
        d.raise_if_keyboard_first();
        Ok(d)
    }

    /// Copy of the state.
    pub fn state(&self) -> I8042State {
        I8042State {
            out: self.out.iter().copied().collect(),
            ..self.state.clone()
        }
    }

    fn raise_if_keyboard_first(&self) {
        if self.state.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Some((_, Source::Keyboard)) = self.out.front() {
            if let Err(e) = self.irq.write(1) {
                warn!("i8042: cannot signal IRQ {KBD_IRQ}: {e}");
            }
        }
    }

    fn push(&mut self, b: u8, src: Source) {
        if self.out.len() >= OUT_CAPACITY {
            debug!("i8042: output buffer full, byte {b:#x} dropped");
            return;
        }
        self.out.push_back((b, src));
        if self.out.len() == 1 {
            self.raise_if_keyboard_first();
        }
    }

    fn status(&self) -> u8 {
        let mut s = self.state.status & !(SR_OBF | SR_AUX);
        if let Some((_, src)) = self.out.front() {
            s |= SR_OBF;
            if *src == Source::Aux {
                s |= SR_AUX;
            }
        }
        s
    }

    /// Guest read at `port_offset` from 0x60: the status at 4, the next
    /// byte of the output buffer at 0 (the last one again when empty), 0
    /// elsewhere.
    pub fn read(&mut self, port_offset: u8) -> u8 {
        match port_offset {
            COMMAND_OFFSET => self.status(),
            DATA_OFFSET => match self.out.pop_front() {
                Some((b, _)) => {
                    self.raise_if_keyboard_first();
                    b
                }
                None => 0,
            },
            _ => 0,
        }
    }

    /// Guest write at `port_offset` from 0x60: a controller command at 4,
    /// a command's data byte or a keyboard command at 0. A failure to
    /// signal a reset is logged.
    pub fn write(&mut self, port_offset: u8, v: u8) {
        match port_offset {
            COMMAND_OFFSET => {
                self.state.status |= SR_CMD;
                self.command(v);
            }
            DATA_OFFSET => {
                self.state.status &= !SR_CMD;
                match self.state.pending_cmd.take() {
                    Some(cmd) => self.command_data(cmd, v),
                    None => self.keyboard(v),
                }
            }
            _ => {}
        }
    }

    fn command(&mut self, cmd: u8) {
        self.state.pending_cmd = None;
        match cmd {
            CMD_READ_CTR => self.push(self.state.ctr, Source::Controller),
            CMD_WRITE_CTR | CMD_WRITE_OUTP | CMD_WRITE_KBD_OUTBUF | CMD_WRITE_AUX_OUTBUF
            | CMD_WRITE_AUX => self.state.pending_cmd = Some(cmd),
            CMD_AUX_DISABLE => self.state.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.state.ctr &= !CTR_AUX_DISABLE,
            // There is no mouse: "clock line stuck high".
            CMD_AUX_TEST => self.push(0x02, Source::Controller),
            CMD_SELF_TEST => {
                self.state.status |= SR_SYS;
                self.push(SELF_TEST_OK, Source::Controller);
            }
            CMD_KBD_TEST => self.push(0x00, Source::Controller),
            CMD_KBD_DISABLE => self.state.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.state.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_OUTP => self.push(self.state.outp, Source::Controller),
            CMD_RESET_CPU => {
                debug!("i8042: guest requested CPU reset");
                if let Err(e) = self.reset_evt.write(1) {
                    warn!("i8042: cannot signal reset eventfd: {e}");
                }
            }
            other => debug!("i8042: command {other:#x} ignored"),
        }
    }

    fn command_data(&mut self, cmd: u8, v: u8) {
        match cmd {
            CMD_WRITE_CTR => {
                self.state.ctr = v;
                self.state.status = (self.state.status & !SR_SYS) | (v & CTR_SYS);
                self.raise_if_keyboard_first();
            }
            CMD_WRITE_OUTP => self.state.outp = v,
            CMD_WRITE_KBD_OUTBUF => self.push(v, Source::Keyboard),
            CMD_WRITE_AUX_OUTBUF => self.push(v, Source::Aux),
            // No mouse is attached: the byte goes nowhere.
            _ => debug!("i8042: byte {v:#x} for the absent mouse dropped"),
        }
    }

    /// A byte written to the data port with no controller command pending
    /// goes to the keyboard, which answers like a PS/2 keyboard that never
    /// has a key pressed.
    fn keyboard(&mut self, v: u8) {
        if self.state.kbd_param.take().is_some() {
            // The parameter of 0xED (LEDs), 0xF0 (scan-code set) or 0xF3
            // (typematic rate).
            self.push(KBD_ACK, Source::Keyboard);
            return;
        }
        match v {
            0xED | 0xF0 | 0xF3 => {
                self.state.kbd_param = Some(v);
                self.push(KBD_ACK, Source::Keyboard);
            }
            // Echo.
            0xEE => self.push(0xEE, Source::Keyboard),
            // Identify: an MF2 keyboard with translation.
            0xF2 => {
                self.push(KBD_ACK, Source::Keyboard);
                self.push(0xAB, Source::Keyboard);
                self.push(0x83, Source::Keyboard);
            }
            // Reset and self-test.
            0xFF => {
                self.push(KBD_ACK, Source::Keyboard);
                self.push(KBD_BAT_OK, Source::Keyboard);
            }
            // Enable, disable, set defaults and the rest: acknowledged.
            _ => self.push(KBD_ACK, Source::Keyboard),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dev {
        d: I8042Device,
        reset: EventFd,
        irq: EventFd,
    }

    fn dev() -> Dev {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Dev {
            reset: e.try_clone().unwrap(),
            irq: i.try_clone().unwrap(),
            d: I8042Device::new(e, i),
        }
    }

    fn cmd(d: &mut I8042Device, c: u8) -> Option<u8> {
        d.write(COMMAND_OFFSET, c);
        if d.read(COMMAND_OFFSET) & SR_OBF != 0 {
            Some(d.read(DATA_OFFSET))
        } else {
            None
        }
    }

    #[test]
    fn reset_command_signals() {
        let mut t = dev();
        t.d.write(COMMAND_OFFSET, CMD_RESET_CPU);
        assert_eq!(t.reset.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_do_not_signal_reset() {
        let mut t = dev();
        for c in [0x20u8, 0x60, 0xAA, 0xAD, 0xD1, 0xFF] {
            t.d.write(COMMAND_OFFSET, c);
        }
        t.d.write(DATA_OFFSET, CMD_RESET_CPU);
        assert!(t.reset.read().is_err(), "no reset expected");
    }

    #[test]
    fn ctr_read_write_as_linux_does() {
        let mut t = dev();
        // i8042_controller_check: flush, then read CTR twice.
        assert_eq!(t.d.read(COMMAND_OFFSET) & SR_OBF, 0);
        let ctr = cmd(&mut t.d, CMD_READ_CTR).expect("CTR");
        assert_eq!(ctr, CTR_KBD_INT | CTR_SYS | CTR_XLATE);
        t.d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        t.d.write(DATA_OFFSET, 0x45);
        assert_eq!(cmd(&mut t.d, CMD_READ_CTR), Some(0x45));
        assert!(t.reset.read().is_err());
    }

    #[test]
    fn self_tests() {
        let mut t = dev();
        assert_eq!(cmd(&mut t.d, CMD_SELF_TEST), Some(SELF_TEST_OK));
        assert_ne!(t.d.read(COMMAND_OFFSET) & SR_SYS, 0);
        assert_eq!(cmd(&mut t.d, CMD_KBD_TEST), Some(0));
        assert_ne!(cmd(&mut t.d, CMD_AUX_TEST), Some(0), "no mouse");
        assert_eq!(cmd(&mut t.d, CMD_READ_OUTP), Some(0x01));
    }

    #[test]
    fn keyboard_identify_raises_irq_per_byte() {
        let mut t = dev();
        t.d.write(DATA_OFFSET, 0xF2);
        assert_eq!(t.irq.read().unwrap(), 1);
        let mut got = Vec::new();
        while t.d.read(COMMAND_OFFSET) & SR_OBF != 0 {
            got.push(t.d.read(DATA_OFFSET));
            if t.d.read(COMMAND_OFFSET) & SR_OBF != 0 {
                assert_eq!(t.irq.read().unwrap(), 1, "IRQ for the next byte");
            }
        }
        assert_eq!(got, [0xFA, 0xAB, 0x83]);
        assert!(t.irq.read().is_err());
    }

    #[test]
    fn keyboard_commands_with_parameters() {
        let mut t = dev();
        for (c, p) in [(0xEDu8, 0x07u8), (0xF3, 0x20), (0xF0, 0x02)] {
            t.d.write(DATA_OFFSET, c);
            assert_eq!(t.d.read(DATA_OFFSET), KBD_ACK);
            t.d.write(DATA_OFFSET, p);
            assert_eq!(t.d.read(DATA_OFFSET), KBD_ACK);
        }
        t.d.write(DATA_OFFSET, 0xFF);
        assert_eq!(t.d.read(DATA_OFFSET), KBD_ACK);
        assert_eq!(t.d.read(DATA_OFFSET), KBD_BAT_OK);
    }

    #[test]
    fn no_irq_when_disabled_in_ctr() {
        let mut t = dev();
        t.d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        t.d.write(DATA_OFFSET, CTR_SYS);
        t.d.write(DATA_OFFSET, 0xF4);
        assert!(t.irq.read().is_err());
        assert_eq!(t.d.read(DATA_OFFSET), KBD_ACK);
    }

    #[test]
    fn output_buffer_is_bounded() {
        let mut t = dev();
        for _ in 0..100 {
            t.d.write(DATA_OFFSET, 0xF2);
        }
        assert_eq!(t.d.state().out.len(), OUT_CAPACITY);
        let mut long = t.d.state();
        long.out.push((0, Source::Keyboard));
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(I8042Device::from_state(&long, e, i).is_err());
    }

    #[test]
    fn state_round_trip() {
        let mut t = dev();
        t.d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        t.d.write(DATA_OFFSET, 0x47);
        t.d.write(DATA_OFFSET, 0xF2);
        let _ = t.d.read(DATA_OFFSET);
        t.d.write(COMMAND_OFFSET, CMD_WRITE_OUTP);
        let st = t.d.state();
        assert_eq!(st.pending_cmd, Some(CMD_WRITE_OUTP));
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let probe = i.try_clone().unwrap();
        let mut r = I8042Device::from_state(&st, e, i).unwrap();
        assert_eq!(r.state(), st);
        assert_eq!(probe.read().unwrap(), 1, "pending keyboard byte re-raised");
        assert_eq!(r.read(DATA_OFFSET), 0xAB);
        assert_eq!(r.read(DATA_OFFSET), 0x83);
        r.write(DATA_OFFSET, 0x03);
        assert_eq!(r.state().outp, 0x03);
    }
}
