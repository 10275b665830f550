//! Minimal i8042 keyboard controller: only the CPU-reset command matters.
//!
//! Port offsets are relative to 0x60: offset 0 is the data port (0x60),
//! offset 4 the status/command port (0x64).

use log::{debug, warn};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Status (read) / command (write) port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// Offset of the data port from [`I8042_DATA_PORT`].
pub const DATA_OFFSET: u8 = 0;
/// Offset of the command port from [`I8042_DATA_PORT`].
pub const COMMAND_OFFSET: u8 = 4;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xFE;

/// Saved state of the controller.
///
/// Invariant: plain data; any value is a valid state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    /// Status byte returned by reads of port 0x64.
    pub status: u8,
    /// Last command written to port 0x64.
    pub last_command: u8,
}

/// The controller.
///
/// Invariant: a write of [`CMD_RESET_CPU`] to the command port signals
/// `reset_evt` (the VMM then ends the VM cleanly); nothing else does.
#[derive(Debug)]
pub struct I8042Device {
    reset_evt: EventFd,
    state: I8042State,
}

impl I8042Device {
    /// Builds a controller that signals `reset_evt` on a CPU reset request.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042Device {
            reset_evt,
            state: I8042State::default(),
        }
    }

    /// Rebuilds a controller from a saved state.
    pub fn from_state(state: &I8042State, reset_evt: EventFd) -> Self {
        I8042Device {
            reset_evt,
            state: *state,
        }
    }

    /// Copy of the state.
    pub fn state(&self) -> I8042State {
        self.state
    }

    /// Guest read at `port_offset` from 0x60: status at 4, 0 elsewhere
    /// (no data is ever available).
    pub fn read(&mut self, port_offset: u8) -> u8 {
        match port_offset {
            COMMAND_OFFSET => self.state.status,
            _ => 0,
        }
    }

    /// Guest write at `port_offset` from 0x60. Only the reset command has an
    /// effect; a failure to signal it is logged.
    pub fn write(&mut self, port_offset: u8, v: u8) {
        if port_offset != COMMAND_OFFSET {
            return;
        }
        self.state.last_command = v;
        if v == CMD_RESET_CPU {
            debug!("i8042: guest requested CPU reset");
            if let Err(e) = self.reset_evt.write(1) {
                warn!("i8042: cannot signal reset eventfd: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042Device, EventFd) {
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let probe = e.try_clone().unwrap();
        (I8042Device::new(e), probe)
    }

    #[test]
    fn reset_command_signals() {
        let (mut d, probe) = dev();
        d.write(COMMAND_OFFSET, CMD_RESET_CPU);
        assert_eq!(probe.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_do_not_signal() {
        let (mut d, probe) = dev();
        for c in [0x20u8, 0x60, 0xAA, 0xAD, 0xD1, 0xFF] {
            d.write(COMMAND_OFFSET, c);
        }
        d.write(DATA_OFFSET, CMD_RESET_CPU);
        assert!(probe.read().is_err(), "no event expected");
    }

    #[test]
    fn reads() {
        let (mut d, _p) = dev();
        assert_eq!(d.read(DATA_OFFSET), 0);
        assert_eq!(d.read(COMMAND_OFFSET) & 0x01, 0, "no output data");
    }

    #[test]
    fn state_round_trip() {
        let (mut d, _p) = dev();
        d.write(COMMAND_OFFSET, 0x20);
        let st = d.state();
        let e = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let r = I8042Device::from_state(&st, e);
        assert_eq!(r.state(), st);
        assert_eq!(st.last_command, 0x20);
    }
}
