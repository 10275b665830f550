//! Kernel VFIO device-state backend (VFIO migration v2).
//!
//! A [`KernelVfioDevice`] opens a PCI device bound to `vfio-pci` (or a
//! variant driver with migration support) through `vfio-ioctls`, and drives
//! its migration state with the raw uAPI ioctls of [`uapi`]. Every transition
//! handed to the kernel is a single FSM arc: combined transitions are walked
//! with [`crate::mig_fsm::path`].

pub mod dma_log;
#[cfg(test)]
#[allow(missing_docs)]
mod fake;
pub mod pci;
pub mod pci_caps;
pub mod pci_ops;
pub mod pci_uapi;
pub mod pci_virt;
pub mod uapi;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, info, warn};
use migration::{
    BackendError, BackendResult, DmaLog, MigCaps, MigState, MigratableDevice, PrecopyInfo,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::error::{Error, Result};
use crate::mig_fsm;
use crate::options::{KeyValues, OptionError};

/// Longest accepted device id (bytes).
pub const MAX_ID_LEN: usize = 64;
/// Directory holding PCI devices in sysfs.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// Parsed `--vfio` argument.
///
/// Invariant: `path` is `/sys/bus/pci/devices/<bdf>` with `bdf` a canonical
/// `DDDD:BB:DD.F`; `id` is a valid id (see [`validate_id`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioConfig {
    /// sysfs path of the PCI device.
    pub path: PathBuf,
    /// PCI address, e.g. `0000:01:00.0`.
    pub bdf: String,
    /// Device id used in migration streams and errors.
    pub id: String,
}

/// Checks a device id: 1..=[`MAX_ID_LEN`] bytes of `[A-Za-z0-9_.:-]`.
pub fn validate_id(arg: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArg {
            arg: arg.to_string(),
            reason: format!(
                "id must be 1 to {MAX_ID_LEN} characters of letters, digits, `_`, `-`, `.`, `:`"
            ),
        })
    }
}

fn is_bdf(s: &str) -> bool {
    // DDDD:BB:DD.F
    let b = s.as_bytes();
    b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && [0, 1, 2, 3, 5, 6, 8, 9, 11]
            .iter()
            .all(|&i| b[i].is_ascii_hexdigit())
        && (b[11] as char).to_digit(16).is_some_and(|f| f <= 7)
}

/// Keys of `--vfio`, in the order `ferry --help` documents them.
pub const KEYS: &[&str] = &["path", "id"];

/// Parses `path=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=NAME]` (default id:
/// the BDF; grammar of the list: [`crate::options`]).
pub fn parse_vfio_arg(s: &str) -> Result<VfioConfig> {
    let bad = |reason: &str| Error::InvalidArg {
        arg: s.to_string(),
        reason: reason.to_string(),
    };
    if s.len() > 4096 {
        return Err(bad("too long"));
    }
    let opt = |e: OptionError| bad(&e.to_string());
    let kv = KeyValues::parse(s, KEYS, None).map_err(opt)?;
    let path = kv.required("path").map_err(opt)?;
    let id = kv.get("id");
    let bdf = path
        .strip_prefix(SYSFS_PCI_DEVICES)
        .and_then(|r| r.strip_prefix('/'))
        .map(|r| r.trim_end_matches('/'))
        .ok_or_else(|| bad("path must be /sys/bus/pci/devices/DDDD:BB:DD.F"))?;
    if !is_bdf(bdf) {
        return Err(bad("path must end in a PCI address DDDD:BB:DD.F"));
    }
    let bdf = bdf.to_ascii_lowercase();
    let id = id.map(str::to_string).unwrap_or_else(|| bdf.clone());
    validate_id(s, &id)?;
    Ok(VfioConfig {
        path: Path::new(SYSFS_PCI_DEVICES).join(&bdf),
        bdf,
        id,
    })
}

/// The raw migration operations of one device (one FSM arc per
/// `set_state`). Implemented over ioctls for the kernel; tests substitute a
/// model.
pub trait RawMigOps: Send + Sync {
    /// `VFIO_MIGRATION_*` flags (GET MIGRATION).
    fn migration_flags(&self) -> io::Result<u64>;
    /// Raw current state (GET MIG_DEVICE_STATE).
    fn get_state(&self) -> io::Result<u32>;
    /// Moves along one arc (SET MIG_DEVICE_STATE); returns a new data fd.
    fn set_state(&self, state: u32) -> io::Result<Option<File>>;
    /// Estimated STOP_COPY length (GET MIG_DATA_SIZE).
    fn data_size(&self) -> io::Result<u64>;
    /// VFIO_MIG_GET_PRECOPY_INFO on `data_fd`.
    fn precopy_info(&self, data_fd: &File) -> io::Result<(u64, u64)>;
    /// Raw `VFIO_DEVICE_FEATURE` (header + payload, `argsz` = length), for
    /// the DMA logging features. Default: ENOTTY (no such feature).
    fn device_feature(&self, _arg: &mut [u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
}

/// [`RawMigOps`] over a real VFIO device fd.
struct KernelOps {
    device: Arc<VfioDevice>,
}

impl RawMigOps for KernelOps {
    fn migration_flags(&self) -> io::Result<u64> {
        uapi::get_migration_flags(&*self.device)
    }
    fn get_state(&self) -> io::Result<u32> {
        uapi::get_mig_state(&*self.device)
    }
    fn set_state(&self, state: u32) -> io::Result<Option<File>> {
        uapi::set_mig_state(&*self.device, state)
    }
    fn data_size(&self) -> io::Result<u64> {
        uapi::get_mig_data_size(&*self.device)
    }
    fn precopy_info(&self, data_fd: &File) -> io::Result<(u64, u64)> {
        uapi::get_precopy_info(data_fd)
    }
    fn device_feature(&self, arg: &mut [u8]) -> io::Result<()> {
        uapi::device_feature_bytes(&*self.device, arg)
    }
}

struct Inner {
    state: MigState,
    /// A duplicate of the data fd handed out, kept for PRECOPY_INFO.
    data_fd: Option<File>,
    /// DMA logging started: the page size the kernel chose.
    dma_log_page: Option<u64>,
}

/// A kernel VFIO device with migration v2 support.
///
/// Invariants: `caps.stop_copy` is true (open fails otherwise); every state
/// programmed is one uAPI arc from the previous one; `inner.data_fd` is
/// `Some` only while the device is in a PRE_COPY/STOP_COPY/RESUMING state
/// entered with a fresh fd.
pub struct KernelVfioDevice {
    id: String,
    caps: MigCaps,
    dma_log: DmaLog,
    ops: Box<dyn RawMigOps>,
    container: Option<Arc<VfioContainer>>,
    device: Option<Arc<VfioDevice>>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for KernelVfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfioDevice")
            .field("id", &self.id)
            .field("caps", &self.caps)
            .finish()
    }
}

fn vfio_err(id: &str, msg: impl Into<String>) -> Error {
    Error::Vfio {
        id: id.to_string(),
        msg: msg.into(),
    }
}

/// IOMMU group number of the device at `sysfs` (from its `iommu_group` link).
pub fn iommu_group_of(id: &str, sysfs: &Path) -> Result<u32> {
    let link = std::fs::read_link(sysfs.join("iommu_group")).map_err(|e| {
        vfio_err(
            id,
            format!(
                "{}: no iommu_group link ({e}); is the IOMMU enabled?",
                sysfs.display()
            ),
        )
    })?;
    link.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| vfio_err(id, format!("bad iommu_group link {}", link.display())))
}

impl KernelVfioDevice {
    /// Opens the device of `cfg` (container + group + device fd), probes
    /// migration support and reads its current state. Fails with a message
    /// naming the device when VFIO is unavailable, the device does not
    /// exist or is not bound to VFIO, or it lacks migration v2 (STOP_COPY).
    pub fn open(cfg: &VfioConfig) -> Result<Self> {
        let id = cfg.id.as_str();
        if !cfg.path.exists() {
            return Err(vfio_err(
                id,
                format!("no such device {}", cfg.path.display()),
            ));
        }
        let group = iommu_group_of(id, &cfg.path)?;
        if !Path::new("/dev/vfio/vfio").exists() {
            return Err(vfio_err(
                id,
                "VFIO is not available on this host: /dev/vfio/vfio is missing (load vfio-pci)",
            ));
        }
        let group_dev = format!("/dev/vfio/{group}");
        if !Path::new(&group_dev).exists() {
            return Err(vfio_err(
                id,
                format!("{group_dev} is missing: is {} bound to vfio-pci?", cfg.bdf),
            ));
        }
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(|e| vfio_err(id, format!("opening container: {e}")))?,
        );
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = Arc::new(
            VfioDevice::new(&cfg.path, ops, false)
                .map_err(|e| vfio_err(id, format!("opening device (group {group}): {e}")))?,
        );
        info!("vfio {id}: opened {} (IOMMU group {group})", cfg.bdf);
        let kops = KernelOps {
            device: device.clone(),
        };
        let mut dev = Self::with_ops(id, Box::new(kops))?;
        dev.container = Some(container);
        dev.device = Some(device);
        Ok(dev)
    }

    /// Builds a device over `ops`: probes migration flags and reads the
    /// current state.
    pub fn with_ops(id: &str, ops: Box<dyn RawMigOps>) -> Result<Self> {
        let flags = match ops.migration_flags() {
            Ok(f) => f,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY) | Some(libc::EINVAL)) => {
                return Err(vfio_err(
                    id,
                    format!("device does not support VFIO migration v2 ({e})"),
                ))
            }
            Err(e) => return Err(vfio_err(id, format!("probing migration support: {e}"))),
        };
        let caps = mig_fsm::caps_from_flags(flags);
        if !caps.stop_copy {
            return Err(vfio_err(
                id,
                format!(
                    "device does not support VFIO migration v2 (flags {flags:#x} lack STOP_COPY)"
                ),
            ));
        }
        let raw = ops
            .get_state()
            .map_err(|e| vfio_err(id, format!("reading migration state: {e}")))?;
        let state = mig_fsm::state_from_u32(raw)
            .ok_or_else(|| vfio_err(id, format!("kernel reported unknown state {raw}")))?;
        let dma_log = dma_log::probe(&*ops);
        debug!("vfio {id}: migration caps {caps:?}, state {state:?}, DMA logging {dma_log:?}");
        Ok(KernelVfioDevice {
            id: id.to_string(),
            caps,
            dma_log,
            ops,
            container: None,
            device: None,
            inner: Mutex::new(Inner {
                state,
                data_fd: None,
                dma_log_page: None,
            }),
        })
    }

    /// The VFIO container (for DMA mapping guest memory); `None` for a
    /// device built with [`KernelVfioDevice::with_ops`].
    pub fn container(&self) -> Option<&Arc<VfioContainer>> {
        self.container.as_ref()
    }

    /// The `vfio-ioctls` device (regions, interrupts); `None` for a device
    /// built with [`KernelVfioDevice::with_ops`].
    pub fn vfio_device(&self) -> Option<&Arc<VfioDevice>> {
        self.device.as_ref()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn err(&self, msg: impl std::fmt::Display) -> BackendError {
        BackendError::new(format!("vfio device {}: {msg}", self.id))
    }
}

fn is_streaming(s: MigState) -> bool {
    matches!(
        s,
        MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy | MigState::Resuming
    )
}

impl MigratableDevice for KernelVfioDevice {
    fn id(&self) -> &str {
        &self.id
    }

    fn caps(&self) -> MigCaps {
        self.caps
    }

    /// Asks the kernel; falls back to the last programmed state if that
    /// fails (and reports the failure).
    fn state(&self) -> BackendResult<MigState> {
        let raw = self
            .ops
            .get_state()
            .map_err(|e| self.err(format_args!("reading migration state: {e}")))?;
        let s = mig_fsm::state_from_u32(raw)
            .ok_or_else(|| self.err(format_args!("kernel reported unknown state {raw}")))?;
        self.lock().state = s;
        Ok(s)
    }

    /// Walks the uAPI FSM from the current state to `new` one arc at a time
    /// (as `vfio_mig_get_next_state` does). On failure of an arc the state is
    /// re-read from the kernel (it may be ERROR) and an error naming the arc
    /// is returned.
    fn set_state(&self, new: MigState) -> BackendResult<Option<File>> {
        let mut inner = self.lock();
        let cur = inner.state;
        let steps = mig_fsm::path(self.caps, cur, new).ok_or_else(|| {
            self.err(format_args!("transition {cur:?} -> {new:?} is not allowed"))
        })?;
        let mut fd = None;
        for step in steps {
            match self.ops.set_state(mig_fsm::state_to_u32(step)) {
                Ok(f) => {
                    debug!("vfio {}: {:?} -> {step:?}", self.id, inner.state);
                    inner.state = step;
                    if let Some(f) = f {
                        if fd.replace(f).is_some() {
                            warn!("vfio {}: dropped an intermediate data fd", self.id);
                        }
                    }
                }
                Err(e) => {
                    let from = inner.state;
                    inner.data_fd = None;
                    if let Some(s) = self.ops.get_state().ok().and_then(mig_fsm::state_from_u32) {
                        inner.state = s;
                    }
                    return Err(self.err(format_args!(
                        "setting migration state {from:?} -> {step:?} (toward {new:?}) failed: {e}; now {:?}",
                        inner.state
                    )));
                }
            }
        }
        if !is_streaming(new) {
            inner.data_fd = None;
            return Ok(None);
        }
        match fd {
            Some(f) => {
                let dup = f
                    .try_clone()
                    .map_err(|e| self.err(format_args!("duplicating data fd: {e}")))?;
                inner.data_fd = Some(dup);
                Ok(Some(f))
            }
            None => Ok(None),
        }
    }

    /// Only valid in PRE_COPY / PRE_COPY_P2P on the fd handed out by the
    /// transition into it.
    fn precopy_info(&self) -> BackendResult<PrecopyInfo> {
        let inner = self.lock();
        if !mig_fsm::is_pre_copy(inner.state) {
            return Err(self.err(format_args!(
                "precopy info asked in state {:?}",
                inner.state
            )));
        }
        let fd = inner
            .data_fd
            .as_ref()
            .ok_or_else(|| self.err("precopy info asked without a data fd"))?;
        let (initial_bytes, dirty_bytes) = self
            .ops
            .precopy_info(fd)
            .map_err(|e| self.err(format_args!("VFIO_MIG_GET_PRECOPY_INFO: {e}")))?;
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes,
        })
    }

    fn stop_copy_size(&self) -> BackendResult<u64> {
        self.ops
            .data_size()
            .map_err(|e| self.err(format_args!("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: {e}")))
    }

    /// A PCI function may always DMA: `Supported` when the PROBE of
    /// DMA_LOGGING_START succeeded at open, `Unsupported` otherwise.
    fn dma_log(&self) -> DmaLog {
        self.dma_log
    }

    fn dma_log_start(&self, ranges: &[std::ops::Range<u64>], page_size: u64) -> BackendResult<()> {
        let mut inner = self.lock();
        if inner.dma_log_page.is_some() {
            return Err(self.err("DMA logging is already started"));
        }
        let got = dma_log::start(&*self.ops, ranges, page_size).map_err(|e| self.err(e))?;
        if got != page_size {
            info!(
                "vfio {}: DMA logging at {got} byte pages (asked {page_size})",
                self.id
            );
        }
        inner.dma_log_page = Some(got);
        Ok(())
    }

    fn dma_log_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> BackendResult<()> {
        let inner = self.lock();
        if inner.dma_log_page.is_none() {
            return Err(self.err("DMA logging report without a start"));
        }
        dma_log::report(&*self.ops, iova, length, page_size, bitmap).map_err(|e| self.err(e))
    }

    fn dma_log_stop(&self) -> BackendResult<()> {
        let mut inner = self.lock();
        if inner.dma_log_page.take().is_none() {
            return Ok(());
        }
        dma_log::stop(&*self.ops).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests;
