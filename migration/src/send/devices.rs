//! Device state on the source: one save thread per device (channels mode)
//! that pre-copies while the VM runs and stop-copies after the pause,
//! queueing chunks onto the shared data connections; and the sequential
//! main-connection path (`device_state = main`) kept for comparison.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::pool::Pool;
use crate::error::MigrationError;
use crate::net::{lock, poll_fd, Ctl, MainConn, POLL_INTERVAL};
use crate::stats::DeviceCounters;
use crate::traits::{MigState, MigratableDevice};
use crate::wire::{DevItemKind, Frame};
use crate::worker::Workers;

/// Pause between `precopy_info` polls when a device has nothing to hand out.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Fails a device that reports initial pre-copy data but hands none out for
/// the stall timeout: the same limit as a data fd that stays unreadable
/// ([`read_chunk`]), for both device-state modes.
struct InitialStall {
    last: Instant,
}

impl InitialStall {
    fn new() -> Self {
        InitialStall {
            last: Instant::now(),
        }
    }

    /// Data came out of the device.
    fn progress(&mut self) {
        self.last = Instant::now();
    }

    /// Nothing came out although `initial` bytes are reported.
    fn idle(&self, ctl: &Ctl, id: &str, initial: u64) -> Result<(), MigrationError> {
        if self.last.elapsed() > ctl.stall {
            return Err(MigrationError::device(
                id,
                format!(
                    "reports {initial} bytes of initial pre-copy data but handed out none \
                     for the stall timeout ({:?})",
                    ctl.stall
                ),
            ));
        }
        Ok(())
    }
}

/// Whether a device pre-copies in this migration.
pub fn does_precopy(dev: &dyn MigratableDevice, enabled: bool) -> bool {
    enabled && dev.caps().pre_copy
}

fn berr(id: &str, what: &str, e: impl std::fmt::Display) -> MigrationError {
    MigrationError::device(id, format!("{what}: {e}"))
}

/// Reads up to `max` bytes from a device data fd into `buf` (a buffer to
/// reuse, any length: it is resized to `max`, which zeroes only bytes
/// beyond its current length, and truncated to what was read). Returns
/// fewer bytes at end of stream (read → 0) or when nothing is available now
/// (`ENOMSG`). Waits with `poll` so abort is noticed; a device that hands
/// out nothing for the stall timeout fails.
pub fn read_chunk(
    f: &File,
    mut buf: Vec<u8>,
    max: usize,
    ctl: &Ctl,
    id: &str,
) -> Result<Vec<u8>, MigrationError> {
    buf.resize(max, 0);
    let mut got = 0;
    let mut last = Instant::now();
    while got < max {
        ctl.check()?;
        match poll_fd(f.as_raw_fd(), libc::POLLIN, POLL_INTERVAL) {
            Ok(0) => {
                if last.elapsed() > ctl.stall {
                    return Err(MigrationError::device(
                        id,
                        "no state data for the stall timeout",
                    ));
                }
                continue;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(berr(id, "polling the data fd", e)),
        }
        match (&*f).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                last = Instant::now();
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => break,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => return Err(berr(id, "reading state", e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// A save thread's view of the savers: the phase it must be in, and the
/// count of devices that entered STOP_COPY.
type SaverSync<'a> = (&'a (Mutex<Phase>, Condvar), &'a (Mutex<usize>, Condvar));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    PreCopy,
    StopCopy,
}

/// The save threads of channels mode.
///
/// Invariant: each device's items are pushed by its own thread only, so the
/// pool assigns its sequence numbers in stream order; the thread ends after
/// pushing END (or on the first error, reported through `ctl`). Dropping
/// the savers without [`DeviceSavers::join`] aborts and joins the threads.
pub struct DeviceSavers {
    phase: Arc<(Mutex<Phase>, Condvar)>,
    /// Save threads whose device entered STOP_COPY.
    entered: Arc<(Mutex<usize>, Condvar)>,
    n: usize,
    workers: Workers,
}

impl DeviceSavers {
    /// Starts one save thread per device.
    pub fn spawn(
        devices: &[Arc<dyn MigratableDevice>],
        pool: &Arc<Pool>,
        ctl: &Arc<Ctl>,
        counters: &[Arc<DeviceCounters>],
        chunk: usize,
        precopy: bool,
    ) -> Result<DeviceSavers, MigrationError> {
        let phase = Arc::new((Mutex::new(Phase::PreCopy), Condvar::new()));
        let entered = Arc::new((Mutex::new(0usize), Condvar::new()));
        let mut workers = Workers::new(ctl);
        for (i, d) in devices.iter().enumerate() {
            let (d, pool, ctl, c, ph, en) = (
                d.clone(),
                pool.clone(),
                ctl.clone(),
                counters[i].clone(),
                phase.clone(),
                entered.clone(),
            );
            let pre = does_precopy(&*d, precopy);
            workers.spawn(&format!("mig-save-{i}"), move || {
                let sync = (&*ph, &*en);
                match save_thread(i as u32, &*d, &pool, &ctl, &c, chunk, pre, sync) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        ctl.fail(match e {
                            MigrationError::Aborted | MigrationError::Device { .. } => e,
                            e => MigrationError::device(d.id(), e.to_string()),
                        });
                        Err(MigrationError::Aborted)
                    }
                }
            })?;
        }
        Ok(DeviceSavers {
            phase,
            entered,
            n: devices.len(),
            workers,
        })
    }

    /// Tells every save thread to enter STOP_COPY and waits until every
    /// device is in it (stopped: no more DMA), while their stop-copy data
    /// may still be draining. Fails with the first save failure, on cancel
    /// or when `timed_out` says the migration's time is up.
    pub fn quiesce(
        &self,
        ctl: &Ctl,
        timed_out: impl Fn() -> Result<(), MigrationError>,
    ) -> Result<(), MigrationError> {
        self.stop_copy();
        let (m, cv) = &*self.entered;
        let mut g = lock(m);
        while *g < self.n {
            drop(g);
            ctl.check()?;
            timed_out()?;
            g = lock(m);
            if *g < self.n {
                g = cv
                    .wait_timeout(g, POLL_INTERVAL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        Ok(())
    }

    /// Tells every save thread to enter STOP_COPY and drain its device.
    pub fn stop_copy(&self) {
        *lock(&self.phase.0) = Phase::StopCopy;
        self.phase.1.notify_all();
    }

    /// Enters STOP_COPY and joins every save thread; the first error if any.
    pub fn join(self) -> Result<(), MigrationError> {
        self.stop_copy();
        self.workers.join()
    }
}

fn wait_phase(ph: &(Mutex<Phase>, Condvar), timeout: Duration) -> Phase {
    let g = lock(&ph.0);
    if *g == Phase::StopCopy {
        return Phase::StopCopy;
    }
    *ph.1
        .wait_timeout(g, timeout)
        .unwrap_or_else(|e| e.into_inner())
        .0
}

#[allow(clippy::too_many_arguments)]
fn save_thread(
    idx: u32,
    dev: &dyn MigratableDevice,
    pool: &Pool,
    ctl: &Ctl,
    c: &DeviceCounters,
    chunk: usize,
    precopy: bool,
    (ph, entered): SaverSync<'_>,
) -> Result<(), MigrationError> {
    let id = dev.id().to_string();
    let mut fd: Option<File> = None;
    if precopy {
        fd = Some(
            dev.set_state(MigState::PreCopy)
                .map_err(|e| berr(&id, "entering PRE_COPY", e))?
                .ok_or_else(|| MigrationError::device(&id, "PRE_COPY returned no data fd"))?,
        );
        let mut announced = false;
        let mut stall = InitialStall::new();
        while *lock(&ph.0) == Phase::PreCopy {
            ctl.check()?;
            let info = dev
                .precopy_info()
                .map_err(|e| berr(&id, "precopy_info", e))?;
            let scs = dev.stop_copy_size().unwrap_or(0);
            c.remaining
                .store(info.initial_bytes + info.dirty_bytes + scs, Relaxed);
            if !announced && info.initial_bytes == 0 {
                let seq = pool.push_device(idx, DevItemKind::InitialDone, Vec::new())?;
                log::debug!("device {id}: initial pre-copy done at seq {seq}");
                announced = true;
                continue;
            }
            let want = if announced {
                info.dirty_bytes
            } else {
                info.initial_bytes
            };
            let buf = if want == 0 {
                Vec::new()
            } else if let Some(f) = &fd {
                read_chunk(f, pool.spare_buffer(), (want as usize).min(chunk), ctl, &id)?
            } else {
                Vec::new()
            };
            if buf.is_empty() {
                pool.recycle(buf);
                if !announced {
                    stall.idle(ctl, &id, info.initial_bytes)?;
                }
                wait_phase(ph, IDLE_POLL);
                continue;
            }
            stall.progress();
            pool.push_device(idx, DevItemKind::PrecopyData, buf)?;
        }
    } else {
        c.remaining
            .store(dev.stop_copy_size().unwrap_or(0), Relaxed);
        while wait_phase(ph, POLL_INTERVAL) == Phase::PreCopy {
            ctl.check()?;
        }
    }
    ctl.check()?;
    if let Some(f) = dev
        .set_state(MigState::StopCopy)
        .map_err(|e| berr(&id, "entering STOP_COPY", e))?
    {
        fd = Some(f);
    }
    *lock(&entered.0) += 1;
    entered.1.notify_all();
    let f = fd.ok_or_else(|| MigrationError::device(&id, "STOP_COPY returned no data fd"))?;
    loop {
        // A buffer a writer has sent (no allocation, no zeroing).
        let buf = read_chunk(&f, pool.spare_buffer(), chunk, ctl, &id)?;
        if buf.is_empty() {
            pool.recycle(buf);
            break;
        }
        pool.push_device(idx, DevItemKind::StopCopyData, buf)?;
    }
    let seq = pool.push_device(idx, DevItemKind::End, Vec::new())?;
    log::debug!("device {id}: end of stream at seq {seq}");
    c.remaining.store(0, Relaxed);
    Ok(())
}

/// The sequential main-connection path: devices one after another, all data
/// on the main connection.
///
/// Invariant: `fds[i]` is device `i`'s PRE_COPY fd (if it pre-copies) from
/// [`MainModeDevices::precopy`] until [`MainModeDevices::stop_copy`]
/// consumes the value; dropping it closes the fds.
pub struct MainModeDevices {
    fds: Vec<Option<File>>,
    seqs: Vec<u64>,
    /// Devices already in STOP_COPY ([`MainModeDevices::quiesce`]).
    entered: Vec<bool>,
}

impl MainModeDevices {
    /// Nothing started yet.
    fn new(n: usize) -> Self {
        MainModeDevices {
            fds: (0..n).map(|_| None).collect(),
            seqs: vec![0; n],
            entered: vec![false; n],
        }
    }

    fn send(
        &mut self,
        main: &MainConn,
        ctl: &Ctl,
        i: usize,
        kind: DevItemKind,
        data: &[u8],
    ) -> Result<(), MigrationError> {
        let seq = self.seqs[i];
        self.seqs[i] += 1;
        let frame = Frame::Device {
            dev: i as u32,
            seq,
            item: kind,
            len: data.len() as u64,
        };
        main.send(
            &frame,
            data,
            ctl,
            "sending device state on the main connection",
        )
    }

    /// Pre-copies the initial data of every pre-copy device, in order, and
    /// returns the fds to stop-copy from later.
    pub fn precopy(
        devices: &[Arc<dyn MigratableDevice>],
        counters: &[Arc<DeviceCounters>],
        main: &MainConn,
        ctl: &Ctl,
        chunk: usize,
        enabled: bool,
    ) -> Result<MainModeDevices, MigrationError> {
        let mut me = MainModeDevices::new(devices.len());
        for (i, d) in devices.iter().enumerate() {
            if !does_precopy(&**d, enabled) {
                continue;
            }
            let id = d.id().to_string();
            let f = d
                .set_state(MigState::PreCopy)
                .map_err(|e| berr(&id, "entering PRE_COPY", e))?
                .ok_or_else(|| MigrationError::device(&id, "PRE_COPY returned no data fd"))?;
            let mut stall = InitialStall::new();
            let mut buf = Vec::new();
            loop {
                ctl.check()?;
                let info = d.precopy_info().map_err(|e| berr(&id, "precopy_info", e))?;
                if info.initial_bytes == 0 {
                    break;
                }
                let max = (info.initial_bytes as usize).min(chunk);
                buf = read_chunk(&f, buf, max, ctl, &id)?;
                if buf.is_empty() {
                    stall.idle(ctl, &id, info.initial_bytes)?;
                    std::thread::sleep(IDLE_POLL);
                    continue;
                }
                stall.progress();
                me.send(main, ctl, i, DevItemKind::PrecopyData, &buf)?;
                counters[i].transferred.fetch_add(buf.len() as u64, Relaxed);
            }
            me.send(main, ctl, i, DevItemKind::InitialDone, &[])?;
            me.fds[i] = Some(f);
        }
        Ok(me)
    }

    /// Moves every device to STOP_COPY (stopped: no more DMA), keeping the
    /// data fds for [`MainModeDevices::stop_copy`].
    pub fn quiesce(&mut self, devices: &[Arc<dyn MigratableDevice>]) -> Result<(), MigrationError> {
        for (i, d) in devices.iter().enumerate() {
            if self.entered[i] {
                continue;
            }
            if let Some(f) = d
                .set_state(MigState::StopCopy)
                .map_err(|e| berr(d.id(), "entering STOP_COPY", e))?
            {
                self.fds[i] = Some(f);
            }
            self.entered[i] = true;
        }
        Ok(())
    }

    /// Stop-copies every device in order, then sends its END.
    pub fn stop_copy(
        mut self,
        devices: &[Arc<dyn MigratableDevice>],
        counters: &[Arc<DeviceCounters>],
        main: &MainConn,
        ctl: &Ctl,
        chunk: usize,
    ) -> Result<(), MigrationError> {
        for (i, d) in devices.iter().enumerate() {
            let id = d.id().to_string();
            let mut fd = self.fds[i].take();
            if !self.entered[i] {
                if let Some(f) = d
                    .set_state(MigState::StopCopy)
                    .map_err(|e| berr(&id, "entering STOP_COPY", e))?
                {
                    fd = Some(f);
                }
            }
            let f =
                fd.ok_or_else(|| MigrationError::device(&id, "STOP_COPY returned no data fd"))?;
            // One buffer for the whole stream: the chunk is sent before
            // the next is read.
            let mut buf = Vec::new();
            loop {
                buf = read_chunk(&f, buf, chunk, ctl, &id)?;
                if buf.is_empty() {
                    break;
                }
                self.send(main, ctl, i, DevItemKind::StopCopyData, &buf)?;
                counters[i].transferred.fetch_add(buf.len() as u64, Relaxed);
            }
            self.send(main, ctl, i, DevItemKind::End, &[])?;
            counters[i].remaining.store(0, Relaxed);
        }
        Ok(())
    }
}
