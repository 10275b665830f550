//! The destination's side of a memory handover: the HANDOVER frame after
//! SETUP, its descriptors received, bounded and checked against the RAM
//! layout SETUP announced.

use std::os::fd::AsFd;
use std::time::Instant;

use super::fds::{recv_fds, validate_fd};
use crate::error::MigrationError;
use crate::net::{recv_payload, Ctl, MainConn};
use crate::traits::{RegionFd, PAGE_SIZE};
use crate::wire::{self, Frame, Setup, HANDOVER_ENTRY_LEN, HEADER_LEN};

/// Frames (keepalives) tolerated before HANDOVER.
const MAX_FRAMES_BEFORE: usize = 64;

/// Receives the HANDOVER frame that follows a SETUP asking for one: one
/// descriptor per region of `setup`, each a read-write memory file long
/// enough for its region at its offset. Every descriptor is closed on
/// every error.
pub fn receive_regions(
    main: &MainConn,
    setup: &Setup,
    ctl: &Ctl,
) -> Result<Vec<RegionFd>, MigrationError> {
    let v = main.stream.version();
    if v < 4 {
        return Err(MigrationError::proto(format!(
            "a memory handover in protocol version {v} (it needs 4)"
        )));
    }
    let sock = main.stream.tcp().unix().ok_or_else(|| {
        MigrationError::proto("a memory handover needs a unix: connection (this one is TCP)")
    })?;
    if setup.regions.len() as u64 > wire::MAX_HANDOVER_REGIONS {
        return Err(MigrationError::Incompatible(format!(
            "{} RAM regions to hand over (at most {})",
            setup.regions.len(),
            wire::MAX_HANDOVER_REGIONS
        )));
    }
    let deadline = Instant::now() + ctl.stall;
    let mut head = [0u8; HEADER_LEN];
    for _ in 0..MAX_FRAMES_BEFORE {
        let fds = recv_fds(sock, &mut head, deadline, &|| ctl.stopped())?;
        let env = Frame::decode(&head)?;
        let (regions, len) = match env.frame {
            Frame::Keepalive if fds.is_empty() => continue,
            Frame::Handover { regions, len } if env.session == main.session => (regions, len),
            f => {
                return Err(MigrationError::proto(format!(
                    "expected HANDOVER after SETUP, got {:?}",
                    f.kind()
                )))
            }
        };
        if regions != setup.regions.len() as u64 || fds.len() as u64 != regions {
            return Err(MigrationError::proto(format!(
                "HANDOVER of {regions} regions with {} descriptors for {} RAM regions",
                fds.len(),
                setup.regions.len()
            )));
        }
        let payload = recv_payload(&main.stream, len, ctl, "reading HANDOVER")?;
        let mut out = Vec::with_capacity(fds.len());
        for (i, (fd, &(gpa, size))) in fds.into_iter().zip(&setup.regions).enumerate() {
            let at = i * HANDOVER_ENTRY_LEN as usize;
            let word = |k: usize| -> u64 {
                let b = &payload[at + 8 * k..at + 8 * k + 8];
                u64::from_le_bytes(wire::arr(b))
            };
            let (egpa, esize, offset) = (word(0), word(1), word(2));
            if (egpa, esize) != (gpa, size) {
                return Err(MigrationError::proto(format!(
                    "HANDOVER region {i} is {egpa:#x}+{esize:#x}, SETUP said {gpa:#x}+{size:#x}"
                )));
            }
            let end = offset.checked_add(size).filter(|_| offset % PAGE_SIZE == 0);
            let Some(end) = end else {
                return Err(MigrationError::proto(format!(
                    "HANDOVER region {i}: offset {offset:#x}"
                )));
            };
            validate_fd(fd.as_fd(), end).map_err(|e| {
                MigrationError::Incompatible(format!("handed-over memory of region {i}: {e}"))
            })?;
            out.push(RegionFd {
                gpa,
                size,
                offset,
                fd,
            });
        }
        return Ok(out);
    }
    Err(MigrationError::proto("no HANDOVER after SETUP"))
}

/// Encodes the HANDOVER payload of `regions`.
pub fn encode_entries(regions: &[RegionFd]) -> Vec<u8> {
    let mut o = Vec::with_capacity(regions.len() * HANDOVER_ENTRY_LEN as usize);
    for r in regions {
        o.extend_from_slice(&r.gpa.to_le_bytes());
        o.extend_from_slice(&r.size.to_le_bytes());
        o.extend_from_slice(&r.offset.to_le_bytes());
    }
    o
}
