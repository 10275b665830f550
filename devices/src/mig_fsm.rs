//! The VFIO migration v2 state machine, shared by the kernel and simulated
//! device backends.
//!
//! [`next_step`] is a transcription of the kernel's `vfio_mig_get_next_state`
//! (drivers/vfio/vfio_main.c): given the current and the requested state it
//! returns the next state to program so that every transition handed to a
//! device is a single arc of the uAPI FSM. [`path`] walks it to the end.

use migration::{MigCaps, MigState};

/// Number of uAPI states (`VFIO_DEVICE_STATE_NR`).
pub const NUM_STATES: usize = 8;

/// All states, indexed by their uAPI value.
pub const ALL_STATES: [MigState; NUM_STATES] = [
    MigState::Error,
    MigState::Stop,
    MigState::Running,
    MigState::StopCopy,
    MigState::Resuming,
    MigState::RunningP2p,
    MigState::PreCopy,
    MigState::PreCopyP2p,
];

/// `VFIO_MIGRATION_STOP_COPY`.
pub const FLAG_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`.
pub const FLAG_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const FLAG_PRE_COPY: u64 = 1 << 2;

/// Converts uAPI migration flags into [`MigCaps`] (unknown bits ignored).
pub fn caps_from_flags(flags: u64) -> MigCaps {
    MigCaps {
        stop_copy: flags & FLAG_STOP_COPY != 0,
        p2p: flags & FLAG_P2P != 0,
        pre_copy: flags & FLAG_PRE_COPY != 0,
    }
}

/// Converts [`MigCaps`] into uAPI migration flags.
pub fn flags_from_caps(caps: MigCaps) -> u64 {
    let mut f = 0;
    if caps.stop_copy {
        f |= FLAG_STOP_COPY;
    }
    if caps.p2p {
        f |= FLAG_P2P;
    }
    if caps.pre_copy {
        f |= FLAG_PRE_COPY;
    }
    f
}

/// The uAPI value of a state.
pub fn state_to_u32(s: MigState) -> u32 {
    s as u32
}

/// The state with uAPI value `v`, `None` if out of range.
pub fn state_from_u32(v: u32) -> Option<MigState> {
    ALL_STATES.get(v as usize).copied()
}

/// Flags a device needs for state `s` to exist (`state_flags_table`).
fn required_flags(s: MigState) -> u64 {
    use MigState::*;
    match s {
        Stop | Running | StopCopy | Resuming => FLAG_STOP_COPY,
        PreCopy => FLAG_STOP_COPY | FLAG_PRE_COPY,
        PreCopyP2p => FLAG_STOP_COPY | FLAG_P2P | FLAG_PRE_COPY,
        RunningP2p => FLAG_STOP_COPY | FLAG_P2P,
        Error => u64::MAX,
    }
}

/// Whether a device with `caps` has state `s` (ERROR is never a target).
pub fn state_supported(caps: MigCaps, s: MigState) -> bool {
    let need = required_flags(s);
    flags_from_caps(caps) & need == need
}

/// `vfio_from_fsm_table[cur][new]`: the next hop from `cur` toward `new`
/// assuming every optional state exists.
fn table(cur: MigState, new: MigState) -> MigState {
    use MigState::*;
    match cur {
        Stop => match new {
            Stop => Stop,
            Running | PreCopy | PreCopyP2p | RunningP2p => RunningP2p,
            StopCopy => StopCopy,
            Resuming => Resuming,
            Error => Error,
        },
        Running => match new {
            Stop | PreCopyP2p | StopCopy | Resuming | RunningP2p => RunningP2p,
            Running => Running,
            PreCopy => PreCopy,
            Error => Error,
        },
        PreCopy => match new {
            Stop | Running | Resuming | RunningP2p => Running,
            PreCopy => PreCopy,
            PreCopyP2p | StopCopy => PreCopyP2p,
            Error => Error,
        },
        PreCopyP2p => match new {
            Stop | Running | Resuming | RunningP2p => RunningP2p,
            PreCopy => PreCopy,
            PreCopyP2p => PreCopyP2p,
            StopCopy => StopCopy,
            Error => Error,
        },
        StopCopy => match new {
            Stop | Running | Resuming | RunningP2p => Stop,
            PreCopy | PreCopyP2p | Error => Error,
            StopCopy => StopCopy,
        },
        Resuming => match new {
            Resuming => Resuming,
            Error => Error,
            _ => Stop,
        },
        RunningP2p => match new {
            Stop | StopCopy | Resuming => Stop,
            Running | PreCopy => Running,
            PreCopyP2p => PreCopyP2p,
            RunningP2p => RunningP2p,
            Error => Error,
        },
        Error => Error,
    }
}

/// Next single-arc state to program when at `cur` and asked for `new`,
/// skipping states the device lacks. `None` when the transition is not
/// allowed (unsupported state, ERROR involved, or a blocked arc such as
/// STOP_COPY -> PRE_COPY). Returns `Some(cur)` iff `cur == new`.
pub fn next_step(caps: MigCaps, cur: MigState, new: MigState) -> Option<MigState> {
    if !caps.stop_copy || !state_supported(caps, cur) || !state_supported(caps, new) {
        return None;
    }
    let mut next = table(cur, new);
    // Each skip moves strictly closer; bound the loop anyway.
    for _ in 0..NUM_STATES {
        if state_supported(caps, next) {
            break;
        }
        next = table(next, new);
    }
    if next == MigState::Error || !state_supported(caps, next) {
        None
    } else {
        Some(next)
    }
}

/// The states to program, in order, to go from `cur` to `new` (empty when
/// equal). `None` when the transition is not allowed.
pub fn path(caps: MigCaps, cur: MigState, new: MigState) -> Option<Vec<MigState>> {
    if !caps.stop_copy || !state_supported(caps, cur) || !state_supported(caps, new) {
        return None;
    }
    let mut out = Vec::new();
    let mut at = cur;
    while at != new {
        let step = next_step(caps, at, new)?;
        if step == at || out.len() > NUM_STATES {
            return None;
        }
        out.push(step);
        at = step;
    }
    Some(out)
}

/// Whether the device executes (changes its own state) in `s`.
pub fn is_running(s: MigState) -> bool {
    matches!(
        s,
        MigState::Running | MigState::RunningP2p | MigState::PreCopy | MigState::PreCopyP2p
    )
}

/// Whether `s` is one of the two PRE_COPY states.
pub fn is_pre_copy(s: MigState) -> bool {
    matches!(s, MigState::PreCopy | MigState::PreCopyP2p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    const FULL: MigCaps = MigCaps {
        stop_copy: true,
        p2p: true,
        pre_copy: true,
    };
    const BASIC: MigCaps = MigCaps {
        stop_copy: true,
        p2p: false,
        pre_copy: false,
    };
    const PRE: MigCaps = MigCaps {
        stop_copy: true,
        p2p: false,
        pre_copy: true,
    };
    const P2P: MigCaps = MigCaps {
        stop_copy: true,
        p2p: true,
        pre_copy: false,
    };

    /// The arcs a driver must implement (uAPI comment), per feature set.
    fn is_arc(caps: MigCaps, a: MigState, b: MigState) -> bool {
        let base = [
            (Resuming, Stop),
            (Stop, Resuming),
            (Stop, StopCopy),
            (StopCopy, Stop),
        ];
        let p2p = [
            (Running, RunningP2p),
            (RunningP2p, Running),
            (RunningP2p, Stop),
            (Stop, RunningP2p),
        ];
        let pre = [(Running, PreCopy), (PreCopy, Running), (PreCopy, StopCopy)];
        let pre_p2p = [
            (PreCopy, PreCopyP2p),
            (PreCopyP2p, PreCopy),
            (PreCopyP2p, RunningP2p),
            (PreCopyP2p, StopCopy),
            (RunningP2p, PreCopyP2p),
        ];
        let plain = [(Running, Stop), (Stop, Running)];
        let mut ok = base.contains(&(a, b));
        if caps.p2p {
            ok |= p2p.contains(&(a, b));
        } else {
            ok |= plain.contains(&(a, b));
        }
        if caps.pre_copy {
            ok |= pre.contains(&(a, b)) && !(caps.p2p && (a, b) == (PreCopy, StopCopy));
        }
        if caps.pre_copy && caps.p2p {
            ok |= pre_p2p.contains(&(a, b))
                || (a, b) == (PreCopy, Running)
                || (a, b) == (Running, PreCopy);
        }
        ok
    }

    #[test]
    fn documented_paths() {
        assert_eq!(
            path(FULL, Running, StopCopy).unwrap(),
            vec![RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            path(BASIC, Running, StopCopy).unwrap(),
            vec![Stop, StopCopy]
        );
        assert_eq!(
            path(FULL, PreCopy, StopCopy).unwrap(),
            vec![PreCopyP2p, StopCopy]
        );
        assert_eq!(path(PRE, PreCopy, StopCopy).unwrap(), vec![StopCopy]);
        assert_eq!(
            path(FULL, PreCopy, Stop).unwrap(),
            vec![Running, RunningP2p, Stop]
        );
        assert_eq!(path(PRE, PreCopy, Stop).unwrap(), vec![Running, Stop]);
        assert_eq!(
            path(FULL, Resuming, Running).unwrap(),
            vec![Stop, RunningP2p, Running]
        );
        assert_eq!(path(BASIC, Resuming, Running).unwrap(), vec![Stop, Running]);
        assert_eq!(
            path(FULL, StopCopy, Running).unwrap(),
            vec![Stop, RunningP2p, Running]
        );
        assert_eq!(
            path(FULL, Running, Resuming).unwrap(),
            vec![RunningP2p, Stop, Resuming]
        );
        assert_eq!(
            path(FULL, Stop, PreCopy).unwrap(),
            vec![RunningP2p, Running, PreCopy]
        );
        assert_eq!(
            path(FULL, Running, Running).unwrap(),
            Vec::<MigState>::new()
        );
    }

    #[test]
    fn blocked_and_unsupported() {
        assert!(path(FULL, StopCopy, PreCopy).is_none());
        assert!(path(FULL, StopCopy, PreCopyP2p).is_none());
        assert!(path(BASIC, Running, PreCopy).is_none());
        assert!(path(BASIC, Running, RunningP2p).is_none());
        assert!(path(PRE, Running, PreCopyP2p).is_none());
        assert!(path(FULL, Running, Error).is_none());
        assert!(path(FULL, Error, Running).is_none());
        assert!(path(MigCaps::default(), Running, Stop).is_none());
    }

    #[test]
    fn every_step_is_a_real_arc_and_every_pair_terminates() {
        for caps in [FULL, BASIC, PRE, P2P] {
            for a in ALL_STATES {
                for b in ALL_STATES {
                    if !state_supported(caps, a) || !state_supported(caps, b) {
                        assert!(path(caps, a, b).is_none());
                        continue;
                    }
                    let blocked = a == StopCopy && is_pre_copy(b);
                    let Some(p) = path(caps, a, b) else {
                        assert!(blocked, "{caps:?} {a:?}->{b:?} refused");
                        continue;
                    };
                    assert!(!blocked);
                    let mut at = a;
                    for s in &p {
                        assert!(
                            is_arc(caps, at, *s),
                            "{caps:?}: {at:?}->{s:?} in {a:?}->{b:?}"
                        );
                        at = *s;
                    }
                    assert_eq!(at, b);
                }
            }
        }
    }

    #[test]
    fn conversions() {
        for (i, s) in ALL_STATES.iter().enumerate() {
            assert_eq!(state_to_u32(*s), i as u32);
            assert_eq!(state_from_u32(i as u32), Some(*s));
        }
        assert_eq!(state_from_u32(8), None);
        assert_eq!(caps_from_flags(7), FULL);
        assert_eq!(flags_from_caps(PRE), 5);
    }
}
