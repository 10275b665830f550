//! Bounds against hostile or broken peers (issue #9, section 4): the
//! switch-over order (READY only after STATE; an ERROR that says the
//! destination discarded its VM unstarted resumes the source even after
//! COMMIT), the stall timer of `device_state = main`, and the destination's
//! one budget for device state in memory. A raw destination
//! ([`raw_dest`]) plays the hostile peer against the real source.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::hostile::raw_send;
use super::*;
use crate::api::*;
use crate::wire::{Frame, Header, Kind, HEADER_LEN};

const MIB: u64 = 1 << 20;

/// Reads one frame (header and payload) from a raw peer's connection;
/// `None` at EOF or on an error.
pub fn raw_frame(mut s: &TcpStream) -> Option<(Header, Vec<u8>)> {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).ok()?;
    let h = Header::decode(&b).ok()?;
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).ok()?;
    Some((h, p))
}

/// Reads frames until one of `kind` (returned) or EOF (`None`).
pub fn raw_until(s: &TcpStream, kind: Kind) -> Option<Header> {
    loop {
        let (h, _) = raw_frame(s)?;
        if h.kind == kind {
            return Some(h);
        }
    }
}

/// A raw destination on a fresh port: accepts the main connection and
/// SETUP (then sends `early`, if any, on main) and the data connections
/// (each drained on its own thread), then runs `script` on the main
/// connection with the session id. The main connection is read to EOF
/// afterwards (the source's ABORT and close).
pub fn raw_dest(
    early: Option<Frame>,
    script: impl FnOnce(&TcpStream, u128) + Send + 'static,
) -> (u16, JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let h = std::thread::spawn(move || {
        let accept = || {
            let (s, _) = l.accept().unwrap();
            // No Nagle: a frame right behind OK must not wait for an ACK.
            s.set_nodelay(true).unwrap();
            let (h, _) = raw_frame(&s).unwrap();
            assert_eq!(h.kind, Kind::Hello);
            raw_send(&s, Header::new(Kind::Ok, h.session), &[]);
            (s, h)
        };
        let (main, hello) = accept();
        let (setup, _) = raw_frame(&main).unwrap();
        assert_eq!(setup.kind, Kind::Setup);
        raw_send(&main, Header::new(Kind::Ok, hello.session), &[]);
        if let Some(f) = early {
            raw_send(&main, f.header(hello.session), &[]);
        }
        let drains: Vec<_> = (0..hello.c)
            .map(|_| {
                let (s, _) = accept();
                std::thread::spawn(move || while raw_frame(&s).is_some() {})
            })
            .collect();
        script(&main, hello.session);
        while raw_frame(&main).is_some() {}
        for d in drains {
            let _ = d.join();
        }
    });
    (port, h)
}

/// A 1 MiB source with one device that does not pre-copy (its state goes
/// at the switch-over only, so a raw destination never has to ack it).
fn small_source() -> Arc<FakeSource> {
    let mut s = FakeSource::new(&[(0, MIB)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        "dev0",
        false,
        pattern(1, 3000),
        pattern(2, 2000),
    ))];
    fill(&s, 0, 5, 1);
    Arc::new(s)
}

fn send_to(src: &Arc<FakeSource>, port: u16) -> (Result<(), MigrationError>, MigrationStatus) {
    let stats = Arc::new(MigrationStats::default());
    let r = send(
        src.clone(),
        &params(port, 2),
        &stats,
        &CancelToken::default(),
    );
    (r, stats.snapshot())
}

fn assert_resumed_and_failed(src: &FakeSource, s: &MigrationStatus) {
    assert_source_running(src);
    assert_eq!(s.state, MigrationState::Failed);
    assert_eq!(s.source_vm, Some(SourceVmOutcome::Resumed));
}

/// READY before the source sent STATE is a protocol error: the source
/// fails and resumes at once (before the fix it took READY as given, wrote
/// COMMIT after STATE and ended "uncertain" with its VM paused).
#[test]
fn ready_before_state_is_a_protocol_error() {
    // READY goes out right after SETUP was accepted: it is on the main
    // connection before the source's reader starts.
    let (port, dest) = raw_dest(Some(Frame::Ready), |_, _| {});
    let src = small_source();
    // Give the source's reader ample time to see it before STATE could go
    // out (a witness, not a timing assertion: a late reader would only
    // make the test fail, never pass wrongly).
    src.set_hook(|_, n| {
        if n == 1 {
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    });
    let (r, s) = send_to(&src, port);
    let e = r.unwrap_err();
    assert!(
        matches!(e, MigrationError::Protocol(_)) && e.to_string().contains("READY"),
        "{e}"
    );
    assert!(e.to_string().contains("before STATE"), "{e}");
    assert_resumed_and_failed(&src, &s);
    dest.join().unwrap();
}

/// Plays the destination up to COMMIT, then answers with `reply` (an
/// ERROR frame) instead of starting the guest.
fn error_after_commit(reply: Frame) -> (Arc<FakeSource>, MigrationError, MigrationStatus) {
    let (port, dest) = raw_dest(None, move |main, session| {
        raw_until(main, Kind::State).unwrap();
        raw_send(main, Header::new(Kind::Ready, session), &[]);
        raw_until(main, Kind::Commit).unwrap();
        let msg = b"cancelled while waiting for COMMIT";
        raw_send(main, reply.header(session), msg);
    });
    let src = small_source();
    let (r, s) = send_to(&src, port);
    dest.join().unwrap();
    (src, r.unwrap_err(), s)
}

/// An ERROR after READY that says the destination discarded its VM
/// without starting it resumes the source even though COMMIT was written
/// (the two crossed on the wire): the migration failed, it is not
/// uncertain, and the source runs.
#[test]
fn discarded_after_commit_resumes_the_source() {
    let (src, e, s) = error_after_commit(Frame::Discarded { len: 34 });
    assert!(!e.is_commit_uncertain(), "{e}");
    assert!(matches!(e, MigrationError::Remote(_)), "{e}");
    assert!(e.to_string().contains("cancelled while waiting"), "{e}");
    assert_resumed_and_failed(&src, &s);
    assert!(s.error.unwrap().contains("cancelled while waiting"));
    assert_eq!(src.pauses.load(SeqCst), 1);
}

/// A plain ERROR after COMMIT (e.g. `start` failed: the guest may have run)
/// still leaves the source paused with an uncertain outcome.
#[test]
fn plain_error_after_commit_stays_uncertain() {
    let (src, e, s) = error_after_commit(Frame::Error { len: 34 });
    assert!(e.is_commit_uncertain(), "{e}");
    assert!(src.paused.load(SeqCst));
    assert_eq!(src.resumes.load(SeqCst), 0);
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Stop, "device {}", d.id);
    }
    assert_eq!(s.source_vm, Some(SourceVmOutcome::PausedUncertain));
}

/// The real destination, cancelled after READY while it waits for COMMIT,
/// discards its VM unstarted and says so: the source resumes and reports
/// the failure, whether it saw the ERROR before writing COMMIT or after.
#[test]
fn destination_failing_after_ready_resumes_the_source() {
    let src = source_with_device();
    let dest = start_dest(factory_for(&src));
    let dcancel = dest.cancel.clone();
    let stats = Arc::new(MigrationStats::default());
    let st = stats.clone();
    let s2 = src.clone();
    let port = dest.port;
    let r = std::thread::spawn(move || {
        crate::testhook::set(move |p, _| {
            if p == crate::testhook::Point::BeforeCommit {
                dcancel.cancel();
                // Let the destination fail and send its ERROR first.
                std::thread::sleep(std::time::Duration::from_millis(300));
            }
        });
        send(s2, &params(port, 2), &st, &CancelToken::default())
    })
    .join()
    .unwrap();
    let e = r.unwrap_err();
    assert!(!e.is_commit_uncertain(), "{e}");
    assert!(e.to_string().contains("cancelled"), "{e}");
    assert_resumed_and_failed(&src, &stats.snapshot());
    let re = rerr(dest.handle.join().unwrap());
    assert!(matches!(re, MigrationError::Cancelled), "{re}");
    let d = dest.factory.last();
    assert!(
        d.started.lock().unwrap().is_none(),
        "started without COMMIT"
    );
    assert!(d.discarded.load(SeqCst));
}

/// A device that misbehaves in one of two ways: `mute` reports initial
/// pre-copy data but never hands any out (its fd is empty); `deaf` takes
/// its state through a pipe that nobody reads, so loading blocks once the
/// pipe is full (until the test lets go of the reading end).
struct StuckDevice {
    id: String,
    mute: bool,
    state: Mutex<MigState>,
    pipe_reader: Mutex<Option<std::fs::File>>,
}

impl StuckDevice {
    fn new(mute: bool) -> Arc<StuckDevice> {
        Arc::new(StuckDevice {
            id: "stuck0".into(),
            mute,
            state: Mutex::new(MigState::Running),
            pipe_reader: Mutex::new(None),
        })
    }
}

impl MigratableDevice for StuckDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn caps(&self) -> MigCaps {
        MigCaps {
            stop_copy: true,
            p2p: false,
            pre_copy: true,
        }
    }
    fn state(&self) -> BackendResult<MigState> {
        Ok(*self.state.lock().unwrap())
    }
    fn set_state(&self, new: MigState) -> BackendResult<Option<std::fs::File>> {
        *self.state.lock().unwrap() = new;
        match new {
            MigState::PreCopy | MigState::StopCopy => Ok(Some(memfd(&[]))),
            MigState::Resuming => {
                let mut fds = [0; 2];
                // SAFETY: a plain syscall filling the array.
                assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
                // SAFETY: fresh fds owned by nobody else.
                let (r, w) = unsafe {
                    (
                        std::fs::File::from_raw_fd(fds[0]),
                        std::fs::File::from_raw_fd(fds[1]),
                    )
                };
                *self.pipe_reader.lock().unwrap() = Some(r);
                Ok(Some(w))
            }
            _ => Ok(None),
        }
    }
    fn precopy_info(&self) -> BackendResult<PrecopyInfo> {
        Ok(PrecopyInfo {
            initial_bytes: if self.mute { 4096 } else { 0 },
            dirty_bytes: 0,
        })
    }
    fn stop_copy_size(&self) -> BackendResult<u64> {
        Ok(0)
    }
}

/// A source whose device `stuck0` reports initial pre-copy data it never
/// hands out: in `device_state = main` the send fails after the stall
/// timeout, naming the device, and the source runs on (before the fix it
/// polled the device until `timeout_s`).
#[test]
fn main_mode_device_producing_nothing_fails_after_the_stall_timeout() {
    for mode in [DeviceStateMode::Main, DeviceStateMode::Channels] {
        let dev = StuckDevice::new(true);
        let src = Arc::new(FakeSource::new(&[(0, MIB)]));
        let f = FakeFactory::new(vec![(0, MIB)]);
        *f.devices.lock().unwrap() =
            vec![Arc::new(FakeDevice::new("stuck0", true, vec![], vec![]))];
        let dest = start_dest(f);
        let mut p = params(dest.port, 2);
        p.device_state = mode;
        let stats = Arc::new(MigrationStats::default());
        let st = stats.clone();
        let src2 = StuckSource(src.clone(), dev.clone());
        let r = std::thread::spawn(move || {
            crate::testhook::set_stall(std::time::Duration::from_secs(2));
            send(Arc::new(src2), &p, &st, &CancelToken::default())
        })
        .join()
        .unwrap();
        let e = r.unwrap_err();
        assert!(
            matches!(&e, MigrationError::Device { id, msg } if id == "stuck0" && msg.contains("stall")),
            "{mode:?}: {e}"
        );
        assert_source_running(&src);
        assert_eq!(dev.state().unwrap(), MigState::Running, "{mode:?}");
        assert_eq!(stats.snapshot().source_vm, Some(SourceVmOutcome::Resumed));
        let _ = dest.handle.join().unwrap();
    }
}

/// A destination device that stops taking its state, in `device_state =
/// main` (the receiver used to wait for it forever) and in channels mode
/// during pre-copy (the source used to wait for its switch-over ack until
/// `timeout_s`): the receiver fails after the stall timeout naming the
/// device, the source learns why and runs on.
#[test]
fn device_consuming_nothing_fails_after_the_stall_timeout() {
    for mode in [DeviceStateMode::Main, DeviceStateMode::Channels] {
        let dev = StuckDevice::new(false);
        let src = source_with_device_id("stuck0");
        let factory = Arc::new(FakeFactory::new(src.layout()));
        let dd: Arc<dyn MigratableDevice> = dev.clone();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let f2 = factory.clone();
        let dest = std::thread::spawn(move || {
            crate::testhook::set_stall(std::time::Duration::from_secs(2));
            let p: ReceiveParams = serde_json::from_value(
                serde_json::json!({"receiver_url": "tcp:127.0.0.1:0", "tls": false}),
            )
            .unwrap();
            let factory = WithDevice(f2, dd);
            let stats = Arc::new(MigrationStats::default());
            receive(l, &factory, &p, &stats, &CancelToken::default()).map(|_| ())
        });
        let mut p = params(port, 2);
        p.device_state = mode;
        p.device_chunk_bytes = 64 << 10;
        let stats = Arc::new(MigrationStats::default());
        let e = send(src.clone(), &p, &stats, &CancelToken::default()).unwrap_err();
        assert!(
            e.to_string().contains("stuck0") && e.to_string().contains("not loading"),
            "{mode:?}: {e}"
        );
        assert_source_running(&src);
        // The load thread is blocked in its write: let go of the pipe so
        // that it ends, then the receiver returns.
        drop(dev.pipe_reader.lock().unwrap().take());
        let re = dest.join().unwrap().unwrap_err();
        assert!(
            matches!(&re, MigrationError::Device { id, msg } if id == "stuck0" && msg.contains("not loading")),
            "{mode:?}: {re}"
        );
        assert!(factory.last().discarded.load(SeqCst));
    }
}

/// A source with one pre-copy device `id` holding 1 MiB of initial state.
fn source_with_device_id(id: &str) -> Arc<FakeSource> {
    let mut s = FakeSource::new(&[(0, MIB)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        id,
        true,
        pattern(1, MIB as usize),
        pattern(2, 5000),
    ))];
    fill(&s, 0, 3, 2);
    Arc::new(s)
}

/// A [`FakeSource`] whose only device is `.1`.
struct StuckSource(Arc<FakeSource>, Arc<StuckDevice>);

impl SourceVm for StuckSource {
    fn config(&self) -> BackendResult<Vec<u8>> {
        self.0.config()
    }
    fn ram(&self) -> Vec<RamRegion> {
        self.0.ram()
    }
    fn populated(&self, region: usize) -> BackendResult<Vec<std::ops::Range<u64>>> {
        self.0.populated(region)
    }
    fn start_dirty_log(&self) -> BackendResult<()> {
        self.0.start_dirty_log()
    }
    fn stop_dirty_log(&self) -> BackendResult<()> {
        self.0.stop_dirty_log()
    }
    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap> {
        self.0.fetch_dirty(region)
    }
    fn manual_protect(&self) -> bool {
        false
    }
    fn clear_dirty(&self, region: usize, first: u64, n: u64) -> BackendResult<()> {
        self.0.clear_dirty(region, first, n)
    }
    fn pause(&self) -> BackendResult<()> {
        self.0.pause()
    }
    fn resume(&self) -> BackendResult<()> {
        self.0.resume()
    }
    fn user_paused(&self) -> bool {
        false
    }
    fn save_state(&self) -> BackendResult<Vec<u8>> {
        self.0.save_state()
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        vec![self.1.clone()]
    }
}

/// A [`FakeFactory`] whose VMs get the device `.1` (created VMs are still
/// recorded in the factory).
struct WithDevice(Arc<FakeFactory>, Arc<dyn MigratableDevice>);

impl DestinationFactory for WithDevice {
    fn create(&self, config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        self.0.create(config)?;
        let d = self.0.last();
        Ok(Arc::new(DestWith(d, self.1.clone())))
    }
}

/// A [`FakeDest`] whose devices are replaced by `.1`.
struct DestWith(Arc<FakeDest>, Arc<dyn MigratableDevice>);

impl DestinationVm for DestWith {
    fn ram(&self) -> Vec<RamRegion> {
        self.0.ram()
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        vec![self.1.clone()]
    }
    fn restore_state(&self, state: &[u8]) -> BackendResult<()> {
        self.0.restore_state(state)
    }
    fn start(&self, paused: bool) -> BackendResult<()> {
        self.0.start(paused)
    }
    fn discard(&self) {
        self.0.discard()
    }
}

/// A hostile source that floods a device with chunks the device cannot
/// apply (its chunk 0 never comes), 40 MiB of them on two connections,
/// against a 32 MiB budget: the receiver stops reading once the budget is
/// spent, then fails with a protocol error naming the budget, and
/// discards its VM (before, each device had its own 64 MiB and the chunks
/// in the readers' hands came on top).
#[test]
fn hostile_flood_of_device_chunks_hits_the_one_budget() {
    let f = FakeFactory::new(vec![(0, MIB)]);
    *f.devices.lock().unwrap() = vec![Arc::new(FakeDevice::new("d0", true, vec![], vec![]))];
    let factory = Arc::new(f);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let f2 = factory.clone();
    let dest = std::thread::spawn(move || {
        crate::testhook::set_stall(std::time::Duration::from_secs(2));
        let p: ReceiveParams = serde_json::from_value(serde_json::json!({
            "receiver_url": "tcp:127.0.0.1:0",
            "device_buffer_bytes": 32 * MIB,
            "tls": false,
        }))
        .unwrap();
        receive(
            l,
            &*f2,
            &p,
            &Arc::new(MigrationStats::default()),
            &CancelToken::default(),
        )
        .map(|_| ())
    });
    let rs = super::hostile::RawSource::start(
        port,
        2,
        &[(0, MIB)],
        &["d0"],
        DeviceStateMode::Channels,
        MIB,
    );
    // The writes block once the receiver stops reading: write from threads
    // that give up when the receiver closes.
    let writers: Vec<_> = rs
        .data
        .iter()
        .enumerate()
        .map(|(c, s)| {
            let s = s.try_clone().unwrap();
            let session = rs.session;
            std::thread::spawn(move || {
                for seq in (1..=40u64).filter(|q| q % 2 == c as u64) {
                    let h = Header::new(Kind::Device, session)
                        .args(0, seq, crate::wire::DevItemKind::PrecopyData as u64)
                        .with_len(MIB);
                    let mut w = &s;
                    let payload = pattern(seq as u8, MIB as usize);
                    if std::io::Write::write_all(&mut w, &h.encode()).is_err()
                        || std::io::Write::write_all(&mut w, &payload).is_err()
                    {
                        return;
                    }
                }
            })
        })
        .collect();
    // Keepalives on main, so that only the budget can fail the receiver.
    let main = rs.main.try_clone().unwrap();
    let session = rs.session;
    let keepalive = std::thread::spawn(move || {
        let mut w = &main;
        while std::io::Write::write_all(&mut w, &Header::new(Kind::Keepalive, session).encode())
            .is_ok()
        {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    let e = dest.join().unwrap().unwrap_err();
    let m = e.to_string();
    assert!(
        matches!(e, MigrationError::Protocol(_)) && m.contains("budget of 33554432 bytes"),
        "{m}"
    );
    assert!(rs.main_error().contains("budget"));
    assert!(factory.last().discarded.load(SeqCst));
    drop(rs);
    for w in writers {
        w.join().unwrap();
    }
    keepalive.join().unwrap();
}
