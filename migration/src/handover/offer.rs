//! The source's side of a memory handover: whether to offer one, and the
//! HANDOVER frame with the descriptors.

use std::os::fd::AsFd;
use std::time::Instant;

use super::dest::encode_entries;
use super::fds::{send_fds, MAX_HANDOVER_FDS};
use super::HandoverSource;
use crate::error::MigrationError;
use crate::net::{Ctl, MainConn};
use crate::traits::{RegionFd, SourceVm};
use crate::wire::Frame;

/// The regions to hand over, or `Err(why)` the RAM is copied instead: the
/// connection speaks version 4 or later, the VMM can lend its memory (it
/// is shareable), and the lent regions are exactly the RAM layout.
pub fn offer(
    h: &HandoverSource,
    version: u16,
    layout: &[(u64, u64)],
) -> Result<Vec<RegionFd>, String> {
    if version < 4 {
        return Err(format!(
            "protocol version {version} has no memory handover (it needs 4)"
        ));
    }
    let m = h
        .memory_handover()
        .ok_or("this VMM cannot hand its memory over")?;
    let regions = m.lend()?;
    if regions.len() > MAX_HANDOVER_FDS {
        return Err(format!(
            "{} RAM regions (a handover carries at most {MAX_HANDOVER_FDS})",
            regions.len()
        ));
    }
    let lent: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa, r.size)).collect();
    if lent != layout {
        return Err(format!(
            "the lent memory {lent:x?} is not the RAM layout {layout:x?}"
        ));
    }
    Ok(regions)
}

/// Writes the HANDOVER frame with one descriptor per region on the main
/// (UNIX) connection, under its write lock.
pub fn send_regions(
    main: &MainConn,
    regions: &[RegionFd],
    ctl: &Ctl,
) -> Result<(), MigrationError> {
    let sock = main.stream.tcp().unix().ok_or_else(|| {
        MigrationError::Internal("a memory handover on a connection that is not UNIX".into())
    })?;
    let payload = encode_entries(regions);
    let frame = Frame::Handover {
        regions: regions.len() as u64,
        len: payload.len() as u64,
    };
    let mut bytes = frame.encode_v(main.session, main.stream.version()).to_vec();
    bytes.extend_from_slice(&payload);
    let fds: Vec<_> = regions.iter().map(|r| r.fd.as_fd()).collect();
    let deadline = Instant::now() + ctl.stall;
    main.with_write_lock(|| send_fds(sock, &bytes, &fds, deadline))
}
