//! In-memory fakes (source VM with a controllable dirty log, destination
//! factory, memfd-backed devices) and helpers shared by the tests.

#![allow(clippy::unwrap_used)]

mod bounds;
mod combine;
mod compression;
mod devices;
mod dma;
mod e2e;
mod failures;
mod fuzz;
mod guest_mem;
mod handover;
mod host;
pub(crate) mod hostile;
mod pcfake;
mod postcopy;
mod switchover;
mod tls;
mod unwind;
mod zerocopy;

use std::fs::File;
use std::io::Seek;
use std::net::TcpListener;
use std::ops::Range;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::api::*;
use crate::traits::*;

/// An anonymous private mapping (fresh zero memory, NORESERVE).
pub struct AnonMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; tests synchronize through the migration protocol.
unsafe impl Send for AnonMem {}
// SAFETY: as above.
unsafe impl Sync for AnonMem {}

impl AnonMem {
    pub fn new(len: usize) -> AnonMem {
        // SAFETY: anonymous mapping, checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // No THP: residency (mincore) must be per 4 KiB page in the tests.
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        AnonMem {
            ptr: p as *mut u8,
            len,
        }
    }
    pub fn addr(&self) -> usize {
        self.ptr as usize
    }
    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        // SAFETY: inside the mapping.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len).to_vec() }
    }
    /// Whether each page of `[off, off+len)` is resident (mincore).
    pub fn resident(&self, off: usize, len: usize) -> Vec<bool> {
        let pages = len.div_ceil(4096);
        let mut v = vec![0u8; pages];
        // SAFETY: page-aligned range inside the mapping, vector sized.
        let r =
            unsafe { libc::mincore(self.ptr.add(off) as *mut libc::c_void, len, v.as_mut_ptr()) };
        assert_eq!(r, 0);
        v.iter().map(|b| b & 1 != 0).collect()
    }
}

impl Drop for AnonMem {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

pub fn memfd(data: &[u8]) -> File {
    // SAFETY: plain syscall with a static name.
    let fd = unsafe { libc::memfd_create(c"fake-dev".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.write_all_at(data, 0).unwrap();
    f
}

/// A fake VFIO-v2-shaped device backed by memfds.
pub struct FakeDevice {
    pub id: String,
    pub caps: MigCaps,
    pub state: Mutex<MigState>,
    pub initial: Vec<u8>,
    pub stop: Vec<u8>,
    pub dirty_rounds: AtomicU32,
    file: Mutex<Option<File>>,
    pub produced: Mutex<Vec<u8>>,
    pub loaded: Mutex<Option<Vec<u8>>>,
    pub fail_on_stop: bool,
    pub fail_on: Option<MigState>,
    pub transitions: Mutex<Vec<MigState>>,
    /// `precopy_info` panics (a broken device backend).
    pub panic_in_info: AtomicBool,
    /// The device writes guest memory by DMA (see `dma::DmaSim`).
    pub dma: Mutex<Option<Arc<dma::DmaSim>>>,
}

impl FakeDevice {
    pub fn new(id: &str, pre_copy: bool, initial: Vec<u8>, stop: Vec<u8>) -> FakeDevice {
        FakeDevice {
            id: id.into(),
            caps: MigCaps {
                stop_copy: true,
                p2p: false,
                pre_copy,
            },
            state: Mutex::new(MigState::Running),
            initial,
            stop,
            dirty_rounds: AtomicU32::new(0),
            file: Mutex::new(None),
            produced: Mutex::new(Vec::new()),
            loaded: Mutex::new(None),
            fail_on_stop: false,
            fail_on: None,
            transitions: Mutex::new(Vec::new()),
            panic_in_info: AtomicBool::new(false),
            dma: Mutex::new(None),
        }
    }
    pub fn cur(&self) -> MigState {
        *self.state.lock().unwrap()
    }
    fn append(&self, data: &[u8]) {
        let mut p = self.produced.lock().unwrap();
        if let Some(f) = &*self.file.lock().unwrap() {
            f.write_all_at(data, p.len() as u64).unwrap();
        }
        p.extend_from_slice(data);
    }
}

/// A 4 MiB source whose first two pages are filled, with one pre-copy
/// capable fake device `dev0` (10 000 bytes of initial data, 5 000 of
/// stop-copy data): the fixture of the failure and switch-over tests.
pub fn source_with_device() -> Arc<FakeSource> {
    let mut s = FakeSource::new(&[(0, 4 << 20)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        "dev0",
        true,
        pattern(1, 10_000),
        pattern(2, 5_000),
    ))];
    fill(&s, 0, 2, 1);
    Arc::new(s)
}

/// A destination factory for [`source_with_device`]'s layout that declares
/// its device `dev0`.
pub fn factory_for(src: &FakeSource) -> FakeFactory {
    let f = FakeFactory::new(src.layout());
    *f.devices.lock().unwrap() = vec![Arc::new(FakeDevice::new("dev0", true, vec![], vec![]))];
    f
}

/// After a failed migration: the source VM runs, was resumed as often as it
/// was paused, logs no dirty pages and its devices are RUNNING.
pub fn assert_source_running(src: &FakeSource) {
    assert!(!src.paused.load(SeqCst), "source VM paused");
    assert_eq!(src.pauses.load(SeqCst), src.resumes.load(SeqCst));
    assert!(!src.logging.load(SeqCst), "dirty logging still on");
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Running, "device {}", d.id);
    }
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

impl MigratableDevice for FakeDevice {
    fn id(&self) -> &str {
        &self.id
    }
    fn caps(&self) -> MigCaps {
        self.caps
    }
    fn state(&self) -> BackendResult<MigState> {
        Ok(self.cur())
    }
    fn set_state(&self, new: MigState) -> BackendResult<Option<File>> {
        self.transitions.lock().unwrap().push(new);
        if self.fail_on == Some(new) {
            return Err(BackendError::new(format!("cannot enter {new:?}")));
        }
        let old = self.cur();
        if let Some(d) = &*self.dma.lock().unwrap() {
            // A stopping device completes its last DMA before it is stopped.
            if matches!(old, MigState::Running | MigState::PreCopy) && new == MigState::StopCopy {
                d.write_last();
            }
        }
        *self.state.lock().unwrap() = new;
        match (old, new) {
            (MigState::Running, MigState::PreCopy) => {
                let f = memfd(&self.initial);
                *self.produced.lock().unwrap() = self.initial.clone();
                let c = f.try_clone().unwrap();
                *self.file.lock().unwrap() = Some(f);
                Ok(Some(c))
            }
            (MigState::PreCopy, MigState::StopCopy) => {
                self.append(&self.stop.clone());
                Ok(None)
            }
            (MigState::Running, MigState::StopCopy) => {
                let mut all = self.initial.clone();
                all.extend_from_slice(&self.stop);
                *self.produced.lock().unwrap() = all.clone();
                let f = memfd(&all);
                let c = f.try_clone().unwrap();
                *self.file.lock().unwrap() = Some(f);
                Ok(Some(c))
            }
            (_, MigState::Resuming) => {
                let f = memfd(&[]);
                let c = f.try_clone().unwrap();
                *self.file.lock().unwrap() = Some(f);
                Ok(Some(c))
            }
            (MigState::Resuming, MigState::Stop) => {
                let f = self.file.lock().unwrap().take().unwrap();
                let len = f.metadata().unwrap().len() as usize;
                let mut v = vec![0u8; len];
                f.read_exact_at(&mut v, 0).unwrap();
                *self.loaded.lock().unwrap() = Some(v);
                if self.fail_on_stop {
                    return Err(BackendError::new("state blob rejected by the fake device"));
                }
                Ok(None)
            }
            (_, MigState::Running) | (_, MigState::Stop) => {
                *self.file.lock().unwrap() = None;
                Ok(None)
            }
            (o, n) => Err(BackendError::new(format!("bad transition {o:?} -> {n:?}"))),
        }
    }
    fn precopy_info(&self) -> BackendResult<PrecopyInfo> {
        if self.panic_in_info.load(SeqCst) {
            panic!("fake device exploded");
        }
        let pos = {
            let g = self.file.lock().unwrap();
            let f = g
                .as_ref()
                .ok_or_else(|| BackendError::new("not in PRE_COPY"))?;
            let mut r = f;
            r.stream_position().unwrap()
        };
        let total = self.produced.lock().unwrap().len() as u64;
        let init = self.initial.len() as u64;
        if pos >= total && pos >= init && self.dirty_rounds.load(SeqCst) > 0 {
            self.dirty_rounds.fetch_sub(1, SeqCst);
            self.append(&pattern(0x55, 3000));
        }
        let total = self.produced.lock().unwrap().len() as u64;
        Ok(PrecopyInfo {
            initial_bytes: init.saturating_sub(pos),
            dirty_bytes: total.saturating_sub(pos.max(init)),
        })
    }
    fn stop_copy_size(&self) -> BackendResult<u64> {
        Ok(self.stop.len() as u64)
    }
    fn dma_log(&self) -> DmaLog {
        match &*self.dma.lock().unwrap() {
            None => DmaLog::NoDma,
            Some(d) => d.kind(),
        }
    }
    fn dma_log_start(&self, ranges: &[Range<u64>], page_size: u64) -> BackendResult<()> {
        match &*self.dma.lock().unwrap() {
            Some(d) => d.start(ranges, page_size),
            None => Err(BackendError::new("no DMA")),
        }
    }
    fn dma_log_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> BackendResult<()> {
        match &*self.dma.lock().unwrap() {
            Some(d) => d.report(iova, length, page_size, bitmap),
            None => Err(BackendError::new("no DMA")),
        }
    }
    fn dma_log_stop(&self) -> BackendResult<()> {
        if let Some(d) = &*self.dma.lock().unwrap() {
            d.stop();
        }
        Ok(())
    }
}

pub type Hook = Box<dyn Fn(&FakeSource, u64) + Send + Sync>;

/// A fake source VM: anon-mmap RAM regions, a dirty log the test controls.
pub struct FakeSource {
    pub regions: Vec<(u64, AnonMem, u64)>,
    touched: Mutex<Vec<Vec<u64>>>,
    dirty: Mutex<Vec<Vec<u64>>>,
    last_fetch: Mutex<Vec<Vec<u64>>>,
    pub manual: bool,
    pub logging: AtomicBool,
    pub paused: AtomicBool,
    pub user_paused: bool,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
    pub fetches: AtomicU64,
    pub stop_log_calls: AtomicU64,
    pub clears: Mutex<Vec<(usize, u64, u64)>>,
    pub hook: Mutex<Option<Hook>>,
    pub devices: Vec<Arc<FakeDevice>>,
    pub config: Vec<u8>,
    pub state_blob: Vec<u8>,
}

impl FakeSource {
    /// Regions given as (gpa, size).
    pub fn new(layout: &[(u64, u64)]) -> FakeSource {
        let regions: Vec<(u64, AnonMem, u64)> = layout
            .iter()
            .map(|&(g, s)| (g, AnonMem::new(s as usize), s))
            .collect();
        let words = |s: u64| vec![0u64; (s / 4096).div_ceil(64) as usize];
        FakeSource {
            touched: Mutex::new(regions.iter().map(|r| words(r.2)).collect()),
            dirty: Mutex::new(regions.iter().map(|r| words(r.2)).collect()),
            last_fetch: Mutex::new(regions.iter().map(|r| words(r.2)).collect()),
            regions,
            manual: false,
            logging: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            user_paused: false,
            pauses: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            stop_log_calls: AtomicU64::new(0),
            clears: Mutex::new(Vec::new()),
            hook: Mutex::new(None),
            devices: Vec::new(),
            config: b"fake-config-v1".to_vec(),
            state_blob: pattern(7, 10_000),
        }
    }

    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions.iter().map(|r| (r.0, r.2)).collect()
    }

    /// Guest write: memory + touched + dirty (when logging).
    pub fn write(&self, region: usize, off: u64, data: &[u8]) {
        self.regions[region].1.write(off as usize, data);
        let first = off / 4096;
        let last = (off + data.len() as u64 - 1) / 4096;
        let mut t = self.touched.lock().unwrap();
        let mut d = self.dirty.lock().unwrap();
        for p in first..=last {
            t[region][(p / 64) as usize] |= 1 << (p % 64);
            if self.logging.load(SeqCst) {
                d[region][(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    pub fn set_hook(&self, h: impl Fn(&FakeSource, u64) + Send + Sync + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(h));
    }

    pub fn mem(&self, region: usize) -> Vec<u8> {
        self.regions[region]
            .1
            .read(0, self.regions[region].2 as usize)
    }
}

impl SourceVm for FakeSource {
    fn config(&self) -> BackendResult<Vec<u8>> {
        Ok(self.config.clone())
    }
    fn ram(&self) -> Vec<RamRegion> {
        self.regions
            .iter()
            // SAFETY: the AnonMem mapping lives as long as `self`.
            .map(|r| unsafe { RamRegion::new(r.0, r.2, r.1.addr()) })
            .collect()
    }
    fn populated(&self, region: usize) -> BackendResult<Vec<Range<u64>>> {
        let t = self.touched.lock().unwrap();
        let bm = DirtyBitmap {
            words: t[region].clone(),
        };
        Ok(crate::send::runs_of(&bm, self.regions[region].2 / 4096)
            .into_iter()
            .map(|(s, n)| s * 4096..(s + n) * 4096)
            .collect())
    }
    fn start_dirty_log(&self) -> BackendResult<()> {
        self.logging.store(true, SeqCst);
        Ok(())
    }
    fn stop_dirty_log(&self) -> BackendResult<()> {
        self.logging.store(false, SeqCst);
        self.stop_log_calls.fetch_add(1, SeqCst);
        Ok(())
    }
    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap> {
        if region == 0 {
            let n = self.fetches.fetch_add(1, SeqCst) + 1;
            if let Some(h) = &*self.hook.lock().unwrap() {
                h(self, n);
            }
        }
        let mut d = self.dirty.lock().unwrap();
        let words = d[region].clone();
        if self.manual {
            self.last_fetch.lock().unwrap()[region] = words.clone();
        } else {
            d[region].iter_mut().for_each(|w| *w = 0);
        }
        Ok(DirtyBitmap { words })
    }
    fn manual_protect(&self) -> bool {
        self.manual
    }
    fn clear_dirty(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()> {
        let pages = self.regions[region].2 / 4096;
        assert!(first_page.is_multiple_of(64), "clear not aligned");
        assert!(
            npages.is_multiple_of(64) || first_page + npages == pages,
            "clear length not aligned"
        );
        self.clears
            .lock()
            .unwrap()
            .push((region, first_page, npages));
        // KVM semantics with the fetched mask: only bits reported by the last
        // fetch (or, before any fetch, every bit) are cleared.
        let fetched = self.fetches.load(SeqCst) > 0;
        let lf = self.last_fetch.lock().unwrap();
        let mut d = self.dirty.lock().unwrap();
        for p in first_page..first_page + npages {
            let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
            if !fetched || lf[region][w] & b != 0 {
                d[region][w] &= !b;
            }
        }
        Ok(())
    }
    fn pause(&self) -> BackendResult<()> {
        self.paused.store(true, SeqCst);
        self.pauses.fetch_add(1, SeqCst);
        Ok(())
    }
    fn resume(&self) -> BackendResult<()> {
        self.paused.store(false, SeqCst);
        self.resumes.fetch_add(1, SeqCst);
        Ok(())
    }
    fn user_paused(&self) -> bool {
        self.user_paused
    }
    fn save_state(&self) -> BackendResult<Vec<u8>> {
        assert!(self.paused.load(SeqCst));
        Ok(self.state_blob.clone())
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.devices
            .iter()
            .map(|d| d.clone() as Arc<dyn MigratableDevice>)
            .collect()
    }
}

/// A destination VM made by [`FakeFactory`].
pub struct FakeDest {
    pub regions: Vec<(u64, AnonMem, u64)>,
    pub devices: Vec<Arc<FakeDevice>>,
    pub restored: Mutex<Option<Vec<u8>>>,
    pub started: Mutex<Option<bool>>,
    pub discarded: AtomicBool,
    /// The post-copy backend, once asked for.
    pub pc: Mutex<Option<Arc<pcfake::FakePostcopy>>>,
    /// `postcopy()` refuses (a VMM or memory that cannot do post-copy).
    pub refuse_postcopy: bool,
}

impl DestinationVm for FakeDest {
    fn ram(&self) -> Vec<RamRegion> {
        self.regions
            .iter()
            // SAFETY: the AnonMem mapping lives as long as `self`.
            .map(|r| unsafe { RamRegion::new(r.0, r.2, r.1.addr()) })
            .collect()
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.devices
            .iter()
            .map(|d| d.clone() as Arc<dyn MigratableDevice>)
            .collect()
    }
    fn restore_state(&self, state: &[u8]) -> BackendResult<()> {
        *self.restored.lock().unwrap() = Some(state.to_vec());
        Ok(())
    }
    fn start(&self, paused: bool) -> BackendResult<()> {
        *self.started.lock().unwrap() = Some(paused);
        Ok(())
    }
    fn discard(&self) {
        self.discarded.store(true, SeqCst);
    }
    fn postcopy(&self) -> BackendResult<Arc<dyn PostcopyRam>> {
        if self.refuse_postcopy {
            return Err(BackendError::new("this fake cannot do post-copy"));
        }
        let pc = Arc::new(pcfake::FakePostcopy::new(
            self.regions.iter().map(|r| (r.1.addr(), r.2)).collect(),
        ));
        *self.pc.lock().unwrap() = Some(pc.clone());
        Ok(pc)
    }
}

/// Builds [`FakeDest`]s with a fixed layout and device list.
pub struct FakeFactory {
    pub layout: Vec<(u64, u64)>,
    pub refuse: Option<String>,
    pub devices: Mutex<Vec<Arc<FakeDevice>>>,
    pub created: Mutex<Vec<Arc<FakeDest>>>,
    /// Destinations it builds cannot do post-copy.
    pub refuse_postcopy: bool,
}

impl FakeFactory {
    pub fn new(layout: Vec<(u64, u64)>) -> FakeFactory {
        FakeFactory {
            layout,
            refuse: None,
            devices: Mutex::new(Vec::new()),
            created: Mutex::new(Vec::new()),
            refuse_postcopy: false,
        }
    }
    pub fn last(&self) -> Arc<FakeDest> {
        self.created.lock().unwrap().last().unwrap().clone()
    }
}

impl DestinationFactory for FakeFactory {
    fn create(&self, config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        if let Some(r) = &self.refuse {
            return Err(BackendError::new(r.clone()));
        }
        assert_eq!(config, b"fake-config-v1");
        let d = Arc::new(FakeDest {
            regions: self
                .layout
                .iter()
                .map(|&(g, s)| (g, AnonMem::new(s as usize), s))
                .collect(),
            devices: self.devices.lock().unwrap().clone(),
            restored: Mutex::new(None),
            started: Mutex::new(None),
            discarded: AtomicBool::new(false),
            pc: Mutex::new(None),
            refuse_postcopy: self.refuse_postcopy,
        });
        self.created.lock().unwrap().push(d.clone());
        Ok(d)
    }
}

pub fn params(port: u16, connections: u32) -> SendParams {
    SendParams {
        connections: connections.into(),
        timeout_s: 60,
        device_state: DeviceStateMode::Channels,
        tls: Some(false),
        ..SendParams::to(format!("tcp:127.0.0.1:{port}"))
    }
}

pub type RecvResult = Result<Arc<dyn DestinationVm>, MigrationError>;

/// A receiver running on a thread; `port` is where it listens.
pub struct Dest {
    pub port: u16,
    pub factory: Arc<FakeFactory>,
    pub stats: Arc<MigrationStats>,
    pub cancel: CancelToken,
    pub handle: JoinHandle<RecvResult>,
}

pub fn start_dest(factory: FakeFactory) -> Dest {
    start_dest_with(
        factory,
        ReceiveParams {
            receiver_url: "tcp:127.0.0.1:0".into(),
            device_buffer_bytes: None,
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        },
    )
}

pub fn start_dest_with(factory: FakeFactory, p: ReceiveParams) -> Dest {
    let _ = env_logger_init();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let factory = Arc::new(factory);
    let stats = Arc::new(MigrationStats::default());
    let cancel = CancelToken::default();
    let (f, s, c) = (factory.clone(), stats.clone(), cancel.clone());
    let handle = std::thread::spawn(move || receive(l, &*f, &p, &s, &c));
    Dest {
        port,
        factory,
        stats,
        cancel,
        handle,
    }
}

/// With `FERRY_TEST_LOG=debug` (or another level) set, the library's log
/// goes to stderr with the thread's name: the order of events across
/// threads is what a flaky failure needs.
fn env_logger_init() -> Option<()> {
    struct Stderr(std::time::Instant);
    impl log::Log for Stderr {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, r: &log::Record<'_>) {
            let t = std::thread::current();
            eprintln!(
                "{:>10.6} {:5} [{}] {}",
                self.0.elapsed().as_secs_f64(),
                r.level(),
                t.name().unwrap_or("?"),
                r.args()
            );
        }
        fn flush(&self) {}
    }
    static LOGGER: std::sync::OnceLock<Stderr> = std::sync::OnceLock::new();
    let level: log::LevelFilter = std::env::var("FERRY_TEST_LOG").ok()?.parse().ok()?;
    let logger = LOGGER.get_or_init(|| Stderr(std::time::Instant::now()));
    log::set_logger(logger).ok()?;
    log::set_max_level(level);
    Some(())
}

/// Fills some pages of region `r` with data and a few with zeroes.
pub fn fill(src: &FakeSource, r: usize, seed: u8, every: u64) {
    let pages = src.regions[r].2 / 4096;
    let mut p = 0;
    while p < pages {
        if p % 7 == 3 {
            src.write(r, p * 4096, &[0u8; 4096]); // populated but zero
        } else {
            src.write(r, p * 4096, &pattern(seed.wrapping_add(p as u8), 4096));
        }
        p += every;
    }
}

pub fn assert_same_ram(src: &FakeSource, dst: &FakeDest) {
    for (i, r) in src.regions.iter().enumerate() {
        let a = src.mem(i);
        let b = dst.regions[i].1.read(0, r.2 as usize);
        if a != b {
            let first = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
            panic!(
                "region {i} differs at byte {first:#x} (page {})",
                first / 4096
            );
        }
    }
}

/// What is left of a finished receiver.
pub struct Finished {
    pub factory: Arc<FakeFactory>,
    pub stats: Arc<MigrationStats>,
}

/// Runs a receiver with `f` and a sender from `src`; joins both.
pub fn migrate_with(
    src: Arc<FakeSource>,
    f: FakeFactory,
    p: &mut SendParams,
) -> (
    Result<(), MigrationError>,
    RecvResult,
    Finished,
    Arc<MigrationStats>,
) {
    let dest = start_dest(f);
    p.destination_url = format!("tcp:127.0.0.1:{}", dest.port);
    let stats = Arc::new(MigrationStats::default());
    let r = send(src, p, &stats, &CancelToken::default());
    let rr = dest.handle.join().unwrap();
    (
        r,
        rr,
        Finished {
            factory: dest.factory,
            stats: dest.stats,
        },
        stats,
    )
}

/// Like [`migrate_with`] for a source the destination refuses at SETUP:
/// the send fails, and the receive goes on waiting (it is still active
/// once the send has returned) until it is cancelled here.
pub fn migrate_refused(
    src: Arc<FakeSource>,
    f: FakeFactory,
    p: &mut SendParams,
) -> (Result<(), MigrationError>, Finished, Arc<MigrationStats>) {
    let dest = start_dest(f);
    p.destination_url = format!("tcp:127.0.0.1:{}", dest.port);
    let stats = Arc::new(MigrationStats::default());
    let r = send(src, p, &stats, &CancelToken::default());
    assert!(
        !dest.handle.is_finished(),
        "a refusal at SETUP ended the receive"
    );
    assert_eq!(
        dest.stats.snapshot().state,
        crate::api::MigrationState::Active
    );
    dest.cancel.cancel();
    let e = rerr(dest.handle.join().unwrap());
    assert!(matches!(e, MigrationError::Cancelled), "{e}");
    (
        r,
        Finished {
            factory: dest.factory,
            stats: dest.stats,
        },
        stats,
    )
}

/// The error of a receive result (DestinationVm is not Debug).
pub fn rerr(r: RecvResult) -> MigrationError {
    match r {
        Ok(_) => panic!("receive succeeded"),
        Err(e) => e,
    }
}
