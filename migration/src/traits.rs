//! The contract between the migration machinery and a VMM.
//!
//! The migration crate never calls KVM. A VMM hands it objects implementing
//! these traits; unit tests hand it in-memory fakes. Everything here is
//! object-safe so that the VMM can pass `Arc<dyn ...>`.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

/// Error reported by a VMM-side backend (KVM, a device, the host).
///
/// The string is shown to the user as is, so it must name what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

impl BackendError {
    /// Builds an error from anything printable.
    pub fn new(msg: impl Into<String>) -> Self {
        BackendError(msg.into())
    }
}

/// Result of a backend call.
pub type BackendResult<T> = Result<T, BackendError>;

/// Size of a guest page as tracked by dirty logging and moved by migration.
pub const PAGE_SIZE: u64 = 4096;

pub use crate::guest_mem::RamRegion;

/// A dirty bitmap of one region: bit `i` of word `i / 64` is page `i`.
///
/// Invariant: `words.len() == ceil(region.pages() / 64)`; bits past the last
/// page are zero.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// The bitmap words, little-endian bit order as KVM returns them.
    pub words: Vec<u64>,
}

impl DirtyBitmap {
    /// ORs `src` into this bitmap (growing it as needed).
    pub fn merge(&mut self, src: &DirtyBitmap) {
        if self.words.len() < src.words.len() {
            self.words.resize(src.words.len(), 0);
        }
        for (d, s) in self.words.iter_mut().zip(&src.words) {
            *d |= *s;
        }
    }
}

/// The source-side VM, as seen by the sender.
///
/// All methods may be called from the migration worker thread while vCPUs run.
pub trait SourceVm: Send + Sync {
    /// Opaque, serialized VM configuration (memory layout, vCPUs, devices).
    /// The destination's [`DestinationFactory`] parses it.
    fn config(&self) -> BackendResult<Vec<u8>>;

    /// The guest RAM regions, sorted by `gpa`. Stable for the whole
    /// migration; each region's mapping stays valid while this object lives
    /// (the [`RamRegion::new`] contract). The guest keeps writing it while
    /// the VM runs: the sender reads it only with volatile loads and
    /// `writev`.
    fn ram(&self) -> Vec<RamRegion>;

    /// Byte ranges (offsets inside region `region`, page-aligned, sorted) that
    /// may hold non-zero data. Memory outside them was never populated and is
    /// not scanned by the first pass. Returning the whole region is correct,
    /// only slower.
    fn populated(&self, region: usize) -> BackendResult<Vec<Range<u64>>>;

    /// Starts dirty logging on all regions (KVM_MEM_LOG_DIRTY_PAGES). Pages
    /// written after this returns are reported by [`SourceVm::fetch_dirty`].
    fn start_dirty_log(&self) -> BackendResult<()>;

    /// Stops dirty logging. Called once, on success and on failure.
    fn stop_dirty_log(&self) -> BackendResult<()>;

    /// Returns the pages of `region` dirtied since the previous fetch
    /// (KVM's log plus the VMM's own writes). When [`SourceVm::manual_protect`]
    /// is true, the pages stay writable until [`SourceVm::clear_dirty`].
    fn fetch_dirty(&self, region: usize) -> BackendResult<DirtyBitmap>;

    /// ORs what [`SourceVm::fetch_dirty`] returns into `into` (grown to the
    /// region's words if it is shorter). A VM whose log is large overrides
    /// it to fetch without allocating.
    fn fetch_dirty_into(&self, region: usize, into: &mut DirtyBitmap) -> BackendResult<()> {
        into.merge(&self.fetch_dirty(region)?);
        Ok(())
    }

    /// Whether KVM_CLEAR_DIRTY_LOG is in use: then the sender must call
    /// [`SourceVm::clear_dirty`] on each range just before reading it.
    fn manual_protect(&self) -> bool;

    /// Re-protects pages `[first_page, first_page + npages)` of `region` so
    /// that later writes show up in the next fetch. A no-op without manual
    /// protection. Ranges given by the sender are 64-page aligned or reach the
    /// region's end.
    fn clear_dirty(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()>;

    /// Stops all vCPUs. Returns once none runs guest code. Idempotent.
    fn pause(&self) -> BackendResult<()>;

    /// Resumes vCPUs, unless the VM was paused by the user before the
    /// migration started ([`SourceVm::user_paused`]).
    fn resume(&self) -> BackendResult<()>;

    /// Whether the user had paused the VM before the migration started; the
    /// destination then starts paused.
    fn user_paused(&self) -> bool;

    /// Serializes vCPU, VM (irqchip, PIT, clock) and small device state.
    /// Only called while paused.
    fn save_state(&self) -> BackendResult<Vec<u8>>;

    /// Devices with migratable (VFIO-v2-shaped) state, in a stable order.
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>>;

    /// The VM's vCPU count, for `connections: "auto"` (`None`: unknown).
    fn vcpus(&self) -> Option<u32> {
        None
    }

    /// Throttles the vCPUs: each gets `percent` (0..=99) of its time taken
    /// away while the VM runs, until set back to 0. Returns once the new
    /// throttle is in force. The sender sets it back to 0 when the
    /// migration ends however it ends. A VMM that cannot throttle refuses.
    fn set_throttle(&self, percent: u32) -> BackendResult<()> {
        if percent == 0 {
            Ok(())
        } else {
            Err(BackendError::new("this VMM cannot throttle vCPUs"))
        }
    }

    /// The memory handover of this VM (`None`: this VMM cannot hand its
    /// memory over; a `unix:` migration then copies RAM).
    fn memory_handover(&self) -> Option<&dyn MemoryHandover> {
        None
    }
}

/// One RAM region's backing file, for a memory handover on the same host
/// (`unix:` migrations).
///
/// Invariant: `fd` is open read-write; `offset..offset+size` of it backs
/// the guest range `gpa..gpa+size` (page multiples). On the destination it
/// passed [`crate::handover::validate_fd`] (a regular file or memfd of at
/// least `offset + size` bytes).
#[derive(Debug)]
pub struct RegionFd {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in `fd`.
    pub offset: u64,
    /// The backing file (owned: a duplicate of the VMM's).
    pub fd: std::os::fd::OwnedFd,
}

/// The memory handover of a source VM whose RAM is shareable (`shared=on`
/// or `file=`): the destination maps the same memory, nothing is copied.
pub trait MemoryHandover: Send + Sync {
    /// The backing of every RAM region, in [`SourceVm::ram`] order, as
    /// duplicated descriptors; `Err(why)` when this RAM cannot be handed
    /// over (anonymous memory). Taking them marks the RAM as lent: the VMM
    /// must never clear it afterwards (the destination may own it).
    fn lend(&self) -> Result<Vec<RegionFd>, String>;
}

/// Builds the destination VM from a received configuration.
pub trait DestinationFactory: Send + Sync {
    /// Parses `config` and builds a VM whose RAM is ready to be written and
    /// reads as zero (see [`DestinationVm::ram`]).
    /// An incompatible configuration fails with a message that the sender
    /// shows to its user.
    fn create(&self, config: &[u8]) -> BackendResult<Arc<dyn DestinationVm>>;

    /// Builds the VM of a memory handover: like [`Self::create`], but its
    /// RAM is `regions` mapped `MAP_SHARED` at their guest addresses, as is
    /// (the guest's live memory: never cleared, never written before the
    /// VM starts). A VMM that cannot map handed-over memory refuses.
    fn create_mapped(
        &self,
        _config: &[u8],
        _regions: Vec<RegionFd>,
    ) -> BackendResult<Arc<dyn DestinationVm>> {
        Err(BackendError::new("this VMM cannot map handed-over memory"))
    }
}

/// The destination-side VM while it is being received.
pub trait DestinationVm: Send + Sync {
    /// The guest RAM regions, sorted by `gpa`; same layout as the source's.
    /// Each region's mapping stays valid while this object lives (the
    /// [`RamRegion::new`] contract).
    ///
    /// **Receiver contract:** until the receiver writes a page, it reads as
    /// zero. The sender does not send pages it never populated, and sends
    /// zero pages as markers that the receiver applies only to pages it
    /// wrote earlier in the same migration, so memory that is not fresh (a
    /// file with old contents, memory reused from an earlier attempt) must
    /// be zeroed (or its holes punched) before it is returned here.
    fn ram(&self) -> Vec<RamRegion>;

    /// Devices with migratable state, in the same order and with the same ids
    /// as on the source.
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>>;

    /// Restores what [`SourceVm::save_state`] produced.
    fn restore_state(&self, state: &[u8]) -> BackendResult<()>;

    /// Starts the vCPUs (or leaves them paused) and hands the VM to the VMM.
    fn start(&self, paused: bool) -> BackendResult<()>;

    /// Drops the half-built VM after a failed migration. Called after every
    /// migration thread touching its RAM has been joined.
    fn discard(&self);

    /// The post-copy backend of this VM's RAM (userfaultfd in the VMM),
    /// asked for once, when the source switches to post-copy. A VMM that
    /// cannot resolve missing-page faults refuses: the switch then fails
    /// before COMMIT and the source resumes its VM.
    fn postcopy(&self) -> BackendResult<Arc<dyn PostcopyRam>> {
        Err(BackendError::new("this VMM cannot receive post-copy"))
    }
}

/// A missing-page fault on guest RAM: page `page` of region `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestFault {
    /// Region index (as in [`DestinationVm::ram`]).
    pub region: usize,
    /// Page within the region.
    pub page: u64,
}

/// Post-copy on the destination: guest RAM whose missing pages fault into
/// the migration instead of reading as zero, and the calls that fill them
/// (on Linux: userfaultfd in MISSING mode, `UFFDIO_COPY` /
/// `UFFDIO_ZEROPAGE`).
///
/// Invariants the implementation keeps: after [`PostcopyRam::register`], a
/// thread (vCPU or VMM) touching a page that is not present blocks until
/// the page is placed (or the RAM unregistered); a page is placed at most
/// once: placing a page that is already present leaves it as it is and
/// reports it in `present`. Pages are never written through the mapping.
/// Page numbers are relative to their region; ranges lie inside it.
pub trait PostcopyRam: Send + Sync {
    /// Drops pages `[first, first + n)` of `region` so that they are missing
    /// (anonymous memory: `MADV_DONTNEED`; shared memory: a punched hole).
    /// Only called before [`PostcopyRam::register`].
    fn discard(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()>;

    /// Makes every missing page of every region fault (MISSING mode).
    fn register(&self) -> BackendResult<()>;

    /// Waits up to `timeout` for faults and appends them to `out` (nothing
    /// when none came).
    fn wait_faults(&self, timeout: Duration, out: &mut Vec<GuestFault>) -> BackendResult<()>;

    /// Places `data` (whole pages) at pages `first_page..` of `region`
    /// atomically, waking the threads that wait for them; pages already
    /// present are left alone and appended to `present`.
    fn place(
        &self,
        region: usize,
        first_page: u64,
        data: &[u8],
        present: &mut Vec<u64>,
    ) -> BackendResult<()>;

    /// Like [`PostcopyRam::place`] with zero pages.
    fn place_zero(
        &self,
        region: usize,
        first_page: u64,
        npages: u64,
        present: &mut Vec<u64>,
    ) -> BackendResult<()>;

    /// Wakes threads waiting for pages `[first, first + n)` (already placed).
    fn wake(&self, region: usize, first_page: u64, npages: u64) -> BackendResult<()>;

    /// Ends post-copy: no page faults into the migration any more (missing
    /// pages then read as zero again) and every waiting thread is woken.
    fn unregister(&self) -> BackendResult<()>;
}

/// Device migration states, as in the kernel's VFIO migration v2 uAPI
/// (`enum vfio_device_mig_state`). The discriminants are the uAPI values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigState {
    /// VFIO_DEVICE_STATE_ERROR
    Error = 0,
    /// VFIO_DEVICE_STATE_STOP
    Stop = 1,
    /// VFIO_DEVICE_STATE_RUNNING
    Running = 2,
    /// VFIO_DEVICE_STATE_STOP_COPY
    StopCopy = 3,
    /// VFIO_DEVICE_STATE_RESUMING
    Resuming = 4,
    /// VFIO_DEVICE_STATE_RUNNING_P2P
    RunningP2p = 5,
    /// VFIO_DEVICE_STATE_PRE_COPY
    PreCopy = 6,
    /// VFIO_DEVICE_STATE_PRE_COPY_P2P
    PreCopyP2p = 7,
}

/// What a device offers (VFIO_DEVICE_FEATURE_MIGRATION flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MigCaps {
    /// VFIO_MIGRATION_STOP_COPY: always set for a migratable device.
    pub stop_copy: bool,
    /// VFIO_MIGRATION_P2P: RUNNING_P2P (and PRE_COPY_P2P) exist.
    pub p2p: bool,
    /// VFIO_MIGRATION_PRE_COPY: PRE_COPY exists.
    pub pre_copy: bool,
}

/// VFIO_MIG_GET_PRECOPY_INFO: bytes the device can hand out now in PRE_COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Bytes of initial state not yet read.
    pub initial_bytes: u64,
    /// Bytes of state that changed again (an estimate, may grow).
    pub dirty_bytes: u64,
}

/// A device with VFIO-v2-shaped migration state.
///
/// The data of a state lives behind a file descriptor handed out by
/// [`MigratableDevice::set_state`]: in PRE_COPY and STOP_COPY it is read
/// until `read` returns 0 (end of stream; in PRE_COPY a read may instead
/// fail with `ENOMSG` when nothing is available right now); in RESUMING it is
/// written, and the stream ends when the state is set to the next state.
/// Implementations must be usable from one save or load thread at a time
/// per device, concurrently with other devices.
pub trait MigratableDevice: Send + Sync {
    /// A short unique name (`id=` on the command line); used in errors.
    fn id(&self) -> &str;

    /// What the device supports.
    fn caps(&self) -> MigCaps;

    /// Current state.
    fn state(&self) -> BackendResult<MigState>;

    /// Moves to `new` (the arc must be one the uAPI allows, or a combination
    /// the implementation walks through). Returns the data fd when the new
    /// state is PRE_COPY, STOP_COPY or RESUMING and the device opened one.
    /// In VFIO, PRE_COPY -> STOP_COPY keeps the PRE_COPY fd: `None`.
    fn set_state(&self, new: MigState) -> BackendResult<Option<File>>;

    /// VFIO_MIG_GET_PRECOPY_INFO on the current PRE_COPY data fd.
    fn precopy_info(&self) -> BackendResult<PrecopyInfo>;

    /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: estimated STOP_COPY size in bytes.
    fn stop_copy_size(&self) -> BackendResult<u64>;

    /// Whether the device writes guest memory by DMA, and whether it can log
    /// those writes (VFIO_DEVICE_FEATURE_DMA_LOGGING_*).
    fn dma_log(&self) -> DmaLog {
        DmaLog::NoDma
    }

    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_START: starts logging the pages the
    /// device writes in `ranges` (guest-physical, identity IOVA) at
    /// `page_size` granularity. Only called when [`MigratableDevice::dma_log`]
    /// is [`DmaLog::Supported`].
    fn dma_log_start(&self, _ranges: &[Range<u64>], _page_size: u64) -> BackendResult<()> {
        Err(BackendError::new("DMA logging is not supported"))
    }

    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: sets bit `i` of `bitmap`
    /// (64 pages per word, least significant bit first) for every page
    /// `iova + i * page_size` of `[iova, iova + length)` written since the
    /// previous report (or the start), and clears those pages in the
    /// device's log. Bits already set in `bitmap` are kept.
    ///
    /// Invariant the caller keeps: `bitmap.len() * 64 * page_size >= length`.
    fn dma_log_report(
        &self,
        _iova: u64,
        _length: u64,
        _page_size: u64,
        _bitmap: &mut [u64],
    ) -> BackendResult<()> {
        Err(BackendError::new("DMA logging is not supported"))
    }

    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: ends logging (idempotent).
    fn dma_log_stop(&self) -> BackendResult<()> {
        Ok(())
    }
}

/// What a device does to guest memory, as the sender must know it.
///
/// Invariant: a device that may write guest memory by DMA never reports
/// [`DmaLog::NoDma`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaLog {
    /// The device never writes guest memory.
    NoDma,
    /// The device writes guest memory and logs those writes.
    Supported,
    /// The device writes guest memory and cannot log it: a migration must
    /// re-send every page it may have written, after stopping it.
    Unsupported,
}
