//! `unix:` migrations with the fakes: the memory handover (SCM_RIGHTS),
//! the copy over UNIX connections, a refused handover, and the protocol
//! version window.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use super::*;
use crate::api::*;
use crate::wire::{self, Frame, Header, Kind, HEADER_LEN};

const MIB: u64 = 1 << 20;

/// A socket path unique to this test.
fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ferry-{name}-{}.sock", std::process::id()))
}

/// A MAP_SHARED mapping of `len` bytes of `fd` at `off`.
struct SharedMap {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain shared memory; tests synchronize through the protocol.
unsafe impl Send for SharedMap {}
// SAFETY: as above.
unsafe impl Sync for SharedMap {}

impl SharedMap {
    fn new(fd: &impl AsRawFd, off: u64, len: u64) -> SharedMap {
        // SAFETY: a fresh shared mapping of an open fd, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off as i64,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        SharedMap {
            ptr: p.cast(),
            len: len as usize,
        }
    }
    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }
    fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len).to_vec() }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

use std::os::fd::AsRawFd;

/// A source whose RAM is one memfd (like `shared=on`); everything but the
/// RAM is the inner [`FakeSource`]'s.
struct SharedSource {
    inner: Arc<FakeSource>,
    file: File,
    maps: Vec<(u64, u64, u64, SharedMap)>,
}

impl SharedSource {
    fn new(layout: &[(u64, u64)]) -> SharedSource {
        let total: u64 = layout.iter().map(|r| r.1).sum();
        let file = memfd(&[]);
        file.set_len(total).unwrap();
        let mut off = 0;
        let mut maps = Vec::new();
        for &(gpa, size) in layout {
            maps.push((gpa, size, off, SharedMap::new(&file, off, size)));
            off += size;
        }
        SharedSource {
            inner: Arc::new(FakeSource::new(layout)),
            file,
            maps,
        }
    }
}

impl MemoryHandover for SharedSource {
    fn lend(&self) -> Result<Vec<RegionFd>, String> {
        Ok(self
            .maps
            .iter()
            .map(|&(gpa, size, offset, _)| RegionFd {
                gpa,
                size,
                offset,
                fd: self.file.as_fd().try_clone_to_owned().unwrap(),
            })
            .collect())
    }
}

impl SourceVm for SharedSource {
    fn config(&self) -> BackendResult<Vec<u8>> {
        self.inner.config()
    }
    fn ram(&self) -> Vec<RamRegion> {
        self.maps
            .iter()
            // SAFETY: the mappings live as long as `self`.
            .map(|m| unsafe { RamRegion::new(m.0, m.1, m.3.ptr as usize) })
            .collect()
    }
    fn populated(&self, region: usize) -> BackendResult<Vec<std::ops::Range<u64>>> {
        Ok(std::iter::once(0..self.maps[region].1).collect())
    }
    fn start_dirty_log(&self) -> BackendResult<()> {
        self.inner.start_dirty_log()
    }
    fn stop_dirty_log(&self) -> BackendResult<()> {
        self.inner.stop_dirty_log()
    }
    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap> {
        self.inner.fetch_dirty(region)
    }
    fn manual_protect(&self) -> bool {
        false
    }
    fn clear_dirty(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        self.inner.clear_dirty(region, first_page, npages)
    }
    fn pause(&self) -> BackendResult<()> {
        self.inner.pause()
    }
    fn resume(&self) -> BackendResult<()> {
        self.inner.resume()
    }
    fn user_paused(&self) -> bool {
        false
    }
    fn save_state(&self) -> BackendResult<Vec<u8>> {
        self.inner.save_state()
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        Vec::new()
    }
    fn memory_handover(&self) -> Option<&dyn MemoryHandover> {
        Some(self)
    }
}

/// The destination of a handover: the received descriptors mapped.
struct MappedDest {
    maps: Vec<(u64, u64, SharedMap)>,
    restored: Mutex<Option<Vec<u8>>>,
    started: Mutex<Option<bool>>,
}

impl DestinationVm for MappedDest {
    fn ram(&self) -> Vec<RamRegion> {
        self.maps
            .iter()
            // SAFETY: the mappings live as long as `self`.
            .map(|m| unsafe { RamRegion::new(m.0, m.1, m.2.ptr as usize) })
            .collect()
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        Vec::new()
    }
    fn restore_state(&self, state: &[u8]) -> BackendResult<()> {
        *self.restored.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn start(&self, paused: bool) -> BackendResult<()> {
        *self.started.lock().unwrap() = Some(paused);
        Ok(())
    }
    fn discard(&self) {}
}

/// Maps what it is handed; `create` (a copy) is refused.
struct MappingFactory {
    mapped: Mutex<Option<Arc<MappedDest>>>,
}

impl DestinationFactory for MappingFactory {
    fn create(&self, _config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        Err(BackendError::new("this test expects a handover"))
    }
    fn create_mapped(
        &self,
        config: &[u8],
        regions: Vec<RegionFd>,
    ) -> BackendResult<Arc<dyn DestinationVm>> {
        assert_eq!(config, b"fake-config-v1");
        let maps = regions
            .iter()
            .map(|r| (r.gpa, r.size, SharedMap::new(&r.fd, r.offset, r.size)))
            .collect();
        let _: Vec<OwnedFd> = regions.into_iter().map(|r| r.fd).collect();
        let d = Arc::new(MappedDest {
            maps,
            restored: Mutex::new(None),
            started: Mutex::new(None),
        });
        *self.mapped.lock().unwrap() = Some(d.clone());
        Ok(d)
    }
}

/// Receives on `unix:path` with `f` on a thread.
fn receive_unix<F: DestinationFactory + 'static>(
    name: &str,
    f: Arc<F>,
) -> (String, JoinHandle<RecvResult>, CancelToken) {
    let path = sock_path(name);
    let l = ListenAddr::Unix(path.clone()).bind().unwrap();
    let p = ReceiveParams {
        receiver_url: format!("unix:{}", path.display()),
        device_buffer_bytes: None,
        tls_dir: None,
        tls: Some(false),
        tls_allowed_subjects: Vec::new(),
    };
    let cancel = CancelToken::default();
    let c = cancel.clone();
    let h = std::thread::spawn(move || {
        let s = Arc::new(MigrationStats::default());
        receive(l, &*f, &p, &s, &c)
    });
    (format!("unix:{}", path.display()), h, cancel)
}

#[test]
fn shared_memory_is_handed_over_without_copying_ram() {
    let layout = [(0, 8 * MIB), (4 << 30, 4 * MIB)];
    let src = Arc::new(SharedSource::new(&layout));
    src.maps[0].3.write(4096, &pattern(3, 4096));
    src.maps[1].3.write(0, &pattern(5, 4096));
    let f = Arc::new(MappingFactory {
        mapped: Mutex::new(None),
    });
    let (url, h, _) = receive_unix("handover", f.clone());
    let mut p = params(0, 2);
    p.destination_url = url;
    let stats = Arc::new(MigrationStats::default());
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    h.join().unwrap().map(drop).unwrap();
    let d = f.mapped.lock().unwrap().clone().unwrap();
    assert_eq!(
        d.restored.lock().unwrap().as_deref(),
        Some(&src.inner.state_blob[..])
    );
    assert_eq!(*d.started.lock().unwrap(), Some(false));
    // The same memory: the destination sees the source's bytes, and
    // nothing of RAM went over the socket.
    assert_eq!(d.maps[0].2.read(4096, 4096), pattern(3, 4096));
    assert_eq!(d.maps[1].2.read(0, 4096), pattern(5, 4096));
    let s = stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed);
    assert_eq!(s.normal_pages, 0, "{s:?}");
    // The source stays paused for good; its dirty log is off (it may have
    // been switched on while SETUP was under way, and then off again).
    assert!(src.inner.paused.load(SeqCst));
    assert_eq!(src.inner.resumes.load(SeqCst), 0);
    assert!(!src.inner.logging.load(SeqCst));
}

#[test]
fn a_refused_handover_leaves_the_source_running() {
    let layout = [(0, 8 * MIB)];
    let src = Arc::new(SharedSource::new(&layout));
    // A destination that cannot map handed-over memory.
    let f = Arc::new(FakeFactory::new(layout.to_vec()));
    let (url, h, cancel) = receive_unix("refused", f.clone());
    let mut p = params(0, 1);
    p.destination_url = url;
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), &p, &stats, &CancelToken::default()).unwrap_err();
    assert!(
        e.to_string().contains("cannot map handed-over memory"),
        "{e}"
    );
    assert_source_running(&src.inner);
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
    cancel.cancel();
    assert!(matches!(rerr(h.join().unwrap()), MigrationError::Cancelled));
}

#[test]
fn anonymous_memory_is_copied_over_unix_connections() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB), (4 << 30, 4 * MIB)]));
    fill(&src, 0, 1, 2);
    fill(&src, 1, 2, 3);
    let f = Arc::new(FakeFactory::new(src.layout()));
    let (url, h, _) = receive_unix("copy", f.clone());
    let mut p = params(0, 4);
    p.destination_url = url;
    let stats = Arc::new(MigrationStats::default());
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    h.join().unwrap().map(drop).unwrap();
    assert_same_ram(&src, &f.last());
    assert!(stats.snapshot().normal_pages > 0);
}

#[test]
fn an_older_sender_is_received_in_its_version() {
    let src = Arc::new(FakeSource::new(&[(0, 8 * MIB)]));
    fill(&src, 0, 4, 3);
    let mut p = params(0, 2);
    p.protocol_version = Some(wire::VERSION - 1);
    p.validate().unwrap();
    let f = FakeFactory::new(src.layout());
    let (r, rr, dest, _) = migrate_with(src.clone(), f, &mut p);
    r.unwrap();
    rr.map(drop).unwrap();
    assert_same_ram(&src, &dest.factory.last());
}

#[test]
fn versions_outside_the_window_are_refused_with_a_reason() {
    for v in [wire::MIN_VERSION - 1, wire::VERSION + 1] {
        let mut p = params(0, 1);
        p.protocol_version = Some(v);
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
        // A peer announcing it anyway is refused at HELLO with the window.
        let dest = start_dest(FakeFactory::new(vec![(0, 4 * MIB)]));
        let mut s = std::net::TcpStream::connect(("127.0.0.1", dest.port)).unwrap();
        let hello = Frame::Hello {
            role: wire::ConnRole::Main,
            connections: 1,
        };
        s.write_all(&hello.encode_v(7, v)).unwrap();
        let mut head = [0u8; HEADER_LEN];
        s.read_exact(&mut head).unwrap();
        let h = Header::decode(&head).unwrap();
        assert_eq!(h.kind, Kind::Error);
        let mut msg = vec![0u8; h.len as usize];
        s.read_exact(&mut msg).unwrap();
        let msg = String::from_utf8(msg).unwrap();
        assert!(
            msg.contains(&format!("protocol version {v}"))
                && msg.contains(&format!(
                    "accepts versions {}..={}",
                    wire::MIN_VERSION,
                    wire::VERSION
                )),
            "{msg}"
        );
        dest.cancel.cancel();
        let _ = dest.handle.join();
    }
}

#[test]
fn a_handover_frame_is_refused_below_version_4() {
    let h = Header::new(Kind::Handover, 1)
        .args(1, 0, 0)
        .with_len(24)
        .with_version(3);
    assert!(Header::decode(&h.encode()).is_err());
    let ok = h.with_version(4);
    assert!(Header::decode(&ok.encode()).is_ok());
    assert!(Header::decode(&ok.args(17, 0, 0).with_len(17 * 24).encode()).is_err());
    assert!(Header::decode(&ok.with_len(48).encode()).is_err());
}

#[test]
fn unix_urls_in_requests() {
    let mut p = SendParams::to("unix:/run/ferry/m.sock");
    p.validate().unwrap();
    assert_eq!(p.client_tls().unwrap().map(|_| ()), None);
    p.tls_dir = Some("/etc/ferry/tls".into());
    let e = p.validate().unwrap_err().to_string();
    assert!(e.contains("TLS is not used on a unix: URL"), "{e}");
    p.tls_dir = None;
    p.tls = Some(true);
    assert!(p.validate().is_err());
    let r = ReceiveParams {
        receiver_url: "unix:/run/ferry/m.sock".into(),
        device_buffer_bytes: None,
        tls_dir: None,
        tls: None,
        tls_allowed_subjects: Vec::new(),
    };
    r.validate().unwrap();
    assert_eq!(
        r.listen_addr().unwrap(),
        ListenAddr::Unix(PathBuf::from("/run/ferry/m.sock"))
    );
    assert_eq!(
        r.listen_addr().unwrap().to_string(),
        "unix:/run/ferry/m.sock"
    );
    let r = ReceiveParams {
        tls_allowed_subjects: vec!["src".into()],
        ..r
    };
    assert!(r.validate().is_err());
    for bad in ["unix:", "unix:@x", "unix:/d/"] {
        let e = SendParams::to(bad).validate().unwrap_err();
        assert!(matches!(e, MigrationError::InvalidParams(_)), "{bad}: {e}");
    }
}

#[test]
fn a_stale_socket_is_replaced_and_a_file_is_not() {
    let path = sock_path("stale");
    let _ = std::fs::remove_file(&path);
    // A socket nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let l = ListenAddr::Unix(path.clone()).bind().unwrap();
    drop(l);
    assert!(!path.exists(), "the listener's socket is removed with it");
    std::fs::write(&path, b"not a socket").unwrap();
    let e = ListenAddr::Unix(path.clone()).bind().unwrap_err();
    assert!(e.to_string().contains("exists"), "{e}");
    let _ = std::fs::remove_file(&path);
}

/// A hostile `unix:` source: SETUP asks for a handover, then HANDOVER
/// brings the wrong descriptors. Each is refused with the reason, and
/// nothing is mapped.
#[test]
fn wrong_descriptors_are_refused_at_setup() {
    let layout = vec![(0u64, 4 * MIB)];
    let mut p = [0i32; 2];
    // SAFETY: pipe into a valid 2-int array; both ends owned below.
    assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
    // SAFETY: fresh descriptors nothing else owns.
    let (pipe_r, _pipe_w) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1]))
    };
    let small = memfd(&[]);
    small.set_len(MIB).unwrap();
    let cases: Vec<(&str, Vec<std::os::fd::BorrowedFd<'_>>, u64)> = vec![
        ("a pipe", vec![pipe_r.as_fd()], 1),
        ("holds 1048576 bytes", vec![small.as_fd()], 1),
        ("2 descriptors", vec![small.as_fd(), small.as_fd()], 1),
    ];
    for (want, fds, regions) in cases {
        let f = Arc::new(MappingFactory {
            mapped: Mutex::new(None),
        });
        let (url, h, cancel) = receive_unix(&format!("hostile-{}", want.len()), f.clone());
        let path = url.strip_prefix("unix:").unwrap().to_string();
        let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let session = 0x77u128;
        let hello = Frame::Hello {
            role: wire::ConnRole::Main,
            connections: 1,
        };
        (&s).write_all(&hello.encode(session)).unwrap();
        let mut head = [0u8; HEADER_LEN];
        (&s).read_exact(&mut head).unwrap();
        assert_eq!(Header::decode(&head).unwrap().kind, Kind::Ok);
        let setup = wire::Setup {
            config: b"fake-config-v1".to_vec(),
            regions: layout.clone(),
            devices: Vec::new(),
            chunk_bytes: 1 << 20,
            device_mode: DeviceStateMode::Channels,
            features: 0,
            handover: true,
        }
        .encode();
        let frame = Frame::Setup {
            len: setup.len() as u64,
        };
        (&s).write_all(&frame.encode(session)).unwrap();
        (&s).write_all(&setup).unwrap();
        let mut bytes = Frame::Handover {
            regions,
            len: regions * 24,
        }
        .encode(session)
        .to_vec();
        for &(gpa, size) in &layout {
            for v in [gpa, size, 0u64] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let soon = std::time::Instant::now() + std::time::Duration::from_secs(5);
        crate::handover::send_fds(&s, &bytes, &fds, soon).unwrap();
        (&s).read_exact(&mut head).unwrap();
        let h2 = Header::decode(&head).unwrap();
        assert_eq!(h2.kind, Kind::Error, "{want}");
        let mut msg = vec![0u8; h2.len as usize];
        (&s).read_exact(&mut msg).unwrap();
        let msg = String::from_utf8(msg).unwrap();
        assert!(msg.contains(want), "{want}: {msg}");
        assert!(f.mapped.lock().unwrap().is_none());
        drop(s);
        cancel.cancel();
        assert!(matches!(rerr(h.join().unwrap()), MigrationError::Cancelled));
    }
}
