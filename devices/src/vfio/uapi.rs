//! VFIO migration v2 uAPI (include/uapi/linux/vfio.h) argument layouts and
//! the raw ioctls that `vfio-ioctls` does not expose with the data fd.
//!
//! Payload structs come from `vfio-bindings`; the variable-length
//! `struct vfio_device_feature { u32 argsz; u32 flags; u8 data[]; }` is
//! modelled as [`FeatureArg<T>`]: an 8-byte header followed by `T`.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_feature_mig_data_size, vfio_device_feature_mig_state,
    vfio_device_feature_migration, vfio_precopy_info,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

/// `VFIO_TYPE` (`';'`).
pub const VFIO_TYPE: u32 = 0x3B;
/// `VFIO_BASE`.
pub const VFIO_BASE: u32 = 100;

/// `VFIO_DEVICE_FEATURE_MASK`: the feature index bits of `flags`.
pub const FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`.
pub const FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`.
pub const FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`.
pub const FEATURE_PROBE: u32 = 1 << 18;
/// `VFIO_DEVICE_FEATURE_MIGRATION`.
pub const FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`.
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`.
pub const FEATURE_MIG_DATA_SIZE: u32 = 9;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET, payload
/// `vfio_device_feature_dma_logging_control`).
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (SET, no payload).
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET, payload
/// `vfio_device_feature_dma_logging_report`).
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// Size of `struct vfio_device_feature_dma_logging_control`.
pub const DMA_LOGGING_CONTROL_SIZE: usize = 24;
/// Size of `struct vfio_device_feature_dma_logging_range`.
pub const DMA_LOGGING_RANGE_SIZE: usize = 16;
/// Size of `struct vfio_device_feature_dma_logging_report`.
pub const DMA_LOGGING_REPORT_SIZE: usize = 32;
/// Ranges the kernel core accepts in one START (`LOG_MAX_RANGES` in
/// drivers/vfio/vfio_main.c: the ranges that fit one 4 KiB page).
pub const DMA_LOGGING_MAX_RANGES: usize = 256;

mod nr {
    use super::{VFIO_BASE, VFIO_TYPE};
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_FEATURE, VFIO_TYPE, VFIO_BASE + 17);
    vmm_sys_util::ioctl_io_nr!(VFIO_MIG_GET_PRECOPY_INFO, VFIO_TYPE, VFIO_BASE + 21);
}

/// `VFIO_DEVICE_FEATURE` = `_IO(VFIO_TYPE, VFIO_BASE + 17)` (0x3B75).
#[allow(non_snake_case)]
pub fn VFIO_DEVICE_FEATURE() -> std::os::raw::c_ulong {
    nr::VFIO_DEVICE_FEATURE()
}

/// `VFIO_MIG_GET_PRECOPY_INFO` = `_IO(VFIO_TYPE, VFIO_BASE + 21)` (0x3B79),
/// issued on a PRE_COPY data fd.
#[allow(non_snake_case)]
pub fn VFIO_MIG_GET_PRECOPY_INFO() -> std::os::raw::c_ulong {
    nr::VFIO_MIG_GET_PRECOPY_INFO()
}

/// The fixed part of `struct vfio_device_feature` (8 bytes).
///
/// Invariant: `argsz` covers the header plus the payload that follows it.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FeatureHeader {
    /// Size of header plus payload.
    pub argsz: u32,
    /// Feature index | GET/SET/PROBE.
    pub flags: u32,
}

/// `struct vfio_device_feature` with a `T` payload in `data[]`.
///
/// Invariant: `#[repr(C)]`, payload at offset 8 (the header's size; every
/// payload used here has alignment <= 8), `hdr.argsz == size_of::<Self>()`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct FeatureArg<T: Copy + Default> {
    /// Header.
    pub hdr: FeatureHeader,
    /// Payload (`data[]`).
    pub payload: T,
}

impl<T: Copy + Default> FeatureArg<T> {
    /// An argument for `flags` (feature index | direction) with `payload`.
    pub fn new(flags: u32, payload: T) -> Self {
        FeatureArg {
            hdr: FeatureHeader {
                argsz: size_of::<Self>() as u32,
                flags,
            },
            payload,
        }
    }
}

/// Issues `VFIO_DEVICE_FEATURE` on `fd` with `arg` (read back in place).
pub fn device_feature<F: AsRawFd, T: Copy + Default>(
    fd: &F,
    arg: &mut FeatureArg<T>,
) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed repr(C) object of exactly
    // `arg.hdr.argsz` bytes; the kernel reads/writes at most that many.
    let ret = unsafe { ioctl_with_mut_ref(fd, VFIO_DEVICE_FEATURE(), arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Issues `VFIO_DEVICE_FEATURE` on `fd` with the raw argument `arg`
/// (header + payload; `argsz` must equal `arg.len()`, checked here).
pub fn device_feature_bytes<F: AsRawFd>(fd: &F, arg: &mut [u8]) -> io::Result<()> {
    if arg.len() < size_of::<FeatureHeader>() || get_u32(arg, 0) != Some(arg.len() as u32) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: `arg` is a live, exclusively borrowed buffer of exactly
    // `argsz` bytes (checked above); the kernel reads/writes at most that
    // many. Pointers inside the payload (DMA logging) are the caller's.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ptr(fd, VFIO_DEVICE_FEATURE(), arg.as_mut_ptr())
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Reads a native-endian `u32` at `off` of `b` (`None` past the end).
pub fn get_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes(s.try_into().ok()?))
}

/// Reads a native-endian `u64` at `off` of `b` (`None` past the end).
pub fn get_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_ne_bytes(s.try_into().ok()?))
}

/// Reads a native-endian `u16` at `off` of `b` (`None` past the end).
pub fn get_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_ne_bytes(s.try_into().ok()?))
}

/// Writes a native-endian `u32` at `off` of `b` (ignored past the end).
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = off.checked_add(4).and_then(|e| b.get_mut(off..e)) {
        s.copy_from_slice(&v.to_ne_bytes());
    }
}

/// Writes a native-endian `u64` at `off` of `b` (ignored past the end).
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = off.checked_add(8).and_then(|e| b.get_mut(off..e)) {
        s.copy_from_slice(&v.to_ne_bytes());
    }
}

/// A `vfio_device_feature` header alone (`argsz` = 8): PROBE, or STOP.
pub fn feature_header_arg(flags: u32) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<FeatureHeader>()];
    let n = b.len() as u32;
    put_u32(&mut b, 0, n);
    put_u32(&mut b, 4, flags);
    b
}

/// PROBE | SET `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`: succeeds iff the
/// device can log DMA (the kernel returns ENOTTY for devices without
/// `log_ops`).
pub fn dma_logging_probe_arg() -> Vec<u8> {
    feature_header_arg(FEATURE_PROBE | FEATURE_SET | FEATURE_DMA_LOGGING_START)
}

/// The ranges array of a DMA logging START (`num_ranges` x
/// `vfio_device_feature_dma_logging_range`), kept in u64 words so the
/// pointer handed to the kernel is 8-byte aligned.
///
/// Invariant: `words.len() == 2 * num_ranges`; word `2i` is `iova`, `2i+1`
/// is `length` of range `i`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaLoggingRanges {
    /// The packed ranges.
    pub words: Vec<u64>,
}

impl DmaLoggingRanges {
    /// Packs `(iova, length)` pairs.
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        DmaLoggingRanges {
            words: ranges.iter().flat_map(|&(i, l)| [i, l]).collect(),
        }
    }
    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.words.len() / 2
    }
    /// No range.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }
}

/// SET `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` argument: header (8) +
/// `vfio_device_feature_dma_logging_control` (24) = 32 bytes. `ranges` must
/// outlive the ioctl (the payload holds its address).
pub fn dma_logging_start_arg(page_size: u64, ranges: &DmaLoggingRanges) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<FeatureHeader>() + DMA_LOGGING_CONTROL_SIZE];
    let n = b.len() as u32;
    put_u32(&mut b, 0, n);
    put_u32(&mut b, 4, FEATURE_SET | FEATURE_DMA_LOGGING_START);
    put_u64(&mut b, 8, page_size);
    put_u32(&mut b, 16, ranges.len() as u32);
    put_u32(&mut b, 20, 0);
    put_u64(&mut b, 24, ranges.words.as_ptr() as u64);
    b
}

/// The page size the kernel wrote back into a START argument (it may pick
/// another granularity than the one asked for).
pub fn dma_logging_start_page_size(arg: &[u8]) -> Option<u64> {
    get_u64(arg, 8)
}

/// GET `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` argument: header (8) +
/// `vfio_device_feature_dma_logging_report` (32) = 40 bytes. `bitmap` must
/// outlive the ioctl and hold `ceil(length / page_size)` bits.
pub fn dma_logging_report_arg(
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<FeatureHeader>() + DMA_LOGGING_REPORT_SIZE];
    let n = b.len() as u32;
    put_u32(&mut b, 0, n);
    put_u32(&mut b, 4, FEATURE_GET | FEATURE_DMA_LOGGING_REPORT);
    put_u64(&mut b, 8, iova);
    put_u64(&mut b, 16, length);
    put_u64(&mut b, 24, page_size);
    put_u64(&mut b, 32, bitmap.as_mut_ptr() as u64);
    b
}

/// SET `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` argument (header only).
pub fn dma_logging_stop_arg() -> Vec<u8> {
    feature_header_arg(FEATURE_SET | FEATURE_DMA_LOGGING_STOP)
}

/// GET `VFIO_DEVICE_FEATURE_MIGRATION`: the `VFIO_MIGRATION_*` flags.
pub fn get_migration_flags<F: AsRawFd>(fd: &F) -> io::Result<u64> {
    let mut arg = FeatureArg::new(
        FEATURE_GET | FEATURE_MIGRATION,
        vfio_device_feature_migration::default(),
    );
    device_feature(fd, &mut arg)?;
    Ok(arg.payload.flags)
}

/// GET `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: the raw current state.
pub fn get_mig_state<F: AsRawFd>(fd: &F) -> io::Result<u32> {
    let mut arg = FeatureArg::new(
        FEATURE_GET | FEATURE_MIG_DEVICE_STATE,
        vfio_device_feature_mig_state {
            device_state: 0,
            data_fd: -1,
        },
    );
    device_feature(fd, &mut arg)?;
    Ok(arg.payload.device_state)
}

/// SET `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` to `state` (one FSM arc).
/// Returns the data fd the kernel opened, if any (owned by the caller).
pub fn set_mig_state<F: AsRawFd>(fd: &F, state: u32) -> io::Result<Option<File>> {
    let mut arg = FeatureArg::new(
        FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
        vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    );
    device_feature(fd, &mut arg)?;
    let data_fd = arg.payload.data_fd;
    if data_fd >= 0 {
        // SAFETY: on success the kernel installed `data_fd` in our table and
        // hands its ownership to us; nobody else knows about it.
        Ok(Some(unsafe { File::from_raw_fd(data_fd) }))
    } else {
        Ok(None)
    }
}

/// GET `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: estimated STOP_COPY bytes.
pub fn get_mig_data_size<F: AsRawFd>(fd: &F) -> io::Result<u64> {
    let mut arg = FeatureArg::new(
        FEATURE_GET | FEATURE_MIG_DATA_SIZE,
        vfio_device_feature_mig_data_size::default(),
    );
    device_feature(fd, &mut arg)?;
    Ok(arg.payload.stop_copy_length)
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a PRE_COPY data fd:
/// `(initial_bytes, dirty_bytes)`.
pub fn get_precopy_info<F: AsRawFd>(data_fd: &F) -> io::Result<(u64, u64)> {
    let mut info = vfio_precopy_info {
        argsz: size_of::<vfio_precopy_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a live repr(C) vfio_precopy_info whose argsz states
    // its full size; the kernel writes at most that many bytes.
    let ret = unsafe { ioctl_with_mut_ref(data_fd, VFIO_MIG_GET_PRECOPY_INFO(), &mut info) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.initial_bytes, info.dirty_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of};

    #[test]
    fn struct_layouts_match_kernel() {
        // struct vfio_device_feature { __u32 argsz; __u32 flags; __u8 data[]; }
        assert_eq!(size_of::<FeatureHeader>(), 8);
        assert_eq!(
            size_of::<vfio_bindings::bindings::vfio::vfio_device_feature>(),
            8
        );
        assert_eq!(size_of::<vfio_device_feature_mig_state>(), 8);
        assert_eq!(size_of::<vfio_precopy_info>(), 24);
        assert_eq!(offset_of!(vfio_precopy_info, initial_bytes), 8);
        assert_eq!(offset_of!(vfio_precopy_info, dirty_bytes), 16);
        assert_eq!(size_of::<vfio_device_feature_migration>(), 8);
        assert_eq!(align_of::<vfio_device_feature_migration>(), 8);
        assert_eq!(size_of::<vfio_device_feature_mig_data_size>(), 8);
        // Header + payload: the full ioctl arguments are 16 bytes, payload at 8.
        assert_eq!(size_of::<FeatureArg<vfio_device_feature_mig_state>>(), 16);
        assert_eq!(size_of::<FeatureArg<vfio_device_feature_migration>>(), 16);
        assert_eq!(
            size_of::<FeatureArg<vfio_device_feature_mig_data_size>>(),
            16
        );
        assert_eq!(
            offset_of!(FeatureArg<vfio_device_feature_mig_state>, payload),
            8
        );
        assert_eq!(
            offset_of!(FeatureArg<vfio_device_feature_migration>, payload),
            8
        );
        assert_eq!(offset_of!(vfio_device_feature_mig_state, data_fd), 4);
        let a = FeatureArg::new(
            FEATURE_SET | FEATURE_MIG_DEVICE_STATE,
            vfio_device_feature_mig_state::default(),
        );
        assert_eq!(a.hdr.argsz, 16);
        assert_eq!(a.hdr.flags, 0x2_0002);
    }

    #[test]
    fn constants_match_kernel() {
        use vfio_bindings::bindings::vfio as b;
        assert_eq!(FEATURE_GET, 1 << 16);
        assert_eq!(FEATURE_SET, 1 << 17);
        assert_eq!(FEATURE_PROBE, 1 << 18);
        assert_eq!(FEATURE_GET, b::VFIO_DEVICE_FEATURE_GET);
        assert_eq!(FEATURE_SET, b::VFIO_DEVICE_FEATURE_SET);
        assert_eq!(FEATURE_PROBE, b::VFIO_DEVICE_FEATURE_PROBE);
        assert_eq!(FEATURE_MASK, b::VFIO_DEVICE_FEATURE_MASK);
        assert_eq!(FEATURE_MIGRATION, 1);
        assert_eq!(FEATURE_MIG_DEVICE_STATE, 2);
        assert_eq!(FEATURE_MIG_DATA_SIZE, 9);
        assert_eq!(FEATURE_MIGRATION, b::VFIO_DEVICE_FEATURE_MIGRATION);
        assert_eq!(
            FEATURE_MIG_DEVICE_STATE,
            b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE
        );
        assert_eq!(FEATURE_MIG_DATA_SIZE, b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE);
        assert_eq!(VFIO_TYPE, b::VFIO_TYPE as u32);
        assert_eq!(VFIO_BASE, b::VFIO_BASE);
        assert_eq!(
            crate::mig_fsm::FLAG_STOP_COPY,
            b::VFIO_MIGRATION_STOP_COPY as u64
        );
        assert_eq!(crate::mig_fsm::FLAG_P2P, b::VFIO_MIGRATION_P2P as u64);
        assert_eq!(
            crate::mig_fsm::FLAG_PRE_COPY,
            b::VFIO_MIGRATION_PRE_COPY as u64
        );
        for (i, s) in crate::mig_fsm::ALL_STATES.iter().enumerate() {
            assert_eq!(*s as u32, i as u32);
        }
        assert_eq!(
            migration::MigState::PreCopyP2p as u32,
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P
        );
        assert_eq!(
            migration::MigState::RunningP2p as u32,
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P
        );
        assert_eq!(
            migration::MigState::Resuming as u32,
            b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING
        );
    }

    #[test]
    fn dma_logging_abi_matches_kernel() {
        use vfio_bindings::bindings::vfio as b;
        // include/uapi/linux/vfio.h: START 6, STOP 7, REPORT 8.
        assert_eq!(FEATURE_DMA_LOGGING_START, 6);
        assert_eq!(FEATURE_DMA_LOGGING_STOP, 7);
        assert_eq!(FEATURE_DMA_LOGGING_REPORT, 8);
        assert_eq!(
            FEATURE_DMA_LOGGING_START,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START
        );
        assert_eq!(
            FEATURE_DMA_LOGGING_STOP,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP
        );
        assert_eq!(
            FEATURE_DMA_LOGGING_REPORT,
            b::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT
        );
        type Ctl = b::vfio_device_feature_dma_logging_control;
        type Rng = b::vfio_device_feature_dma_logging_range;
        type Rep = b::vfio_device_feature_dma_logging_report;
        assert_eq!(size_of::<Ctl>(), DMA_LOGGING_CONTROL_SIZE);
        assert_eq!(size_of::<Ctl>(), 24);
        assert_eq!(align_of::<Ctl>(), 8);
        assert_eq!(offset_of!(Ctl, page_size), 0);
        assert_eq!(offset_of!(Ctl, num_ranges), 8);
        assert_eq!(offset_of!(Ctl, __reserved), 12);
        assert_eq!(offset_of!(Ctl, ranges), 16);
        assert_eq!(size_of::<Rng>(), DMA_LOGGING_RANGE_SIZE);
        assert_eq!(size_of::<Rng>(), 16);
        assert_eq!(offset_of!(Rng, iova), 0);
        assert_eq!(offset_of!(Rng, length), 8);
        assert_eq!(size_of::<Rep>(), DMA_LOGGING_REPORT_SIZE);
        assert_eq!(size_of::<Rep>(), 32);
        assert_eq!(offset_of!(Rep, iova), 0);
        assert_eq!(offset_of!(Rep, length), 8);
        assert_eq!(offset_of!(Rep, page_size), 16);
        assert_eq!(offset_of!(Rep, bitmap), 24);
        // The payload sits right after the 8-byte header (data[] at 8).
        assert_eq!(offset_of!(FeatureArg<Ctl>, payload), 8);
        assert_eq!(size_of::<FeatureArg<Ctl>>(), 32);
        assert_eq!(size_of::<FeatureArg<Rep>>(), 40);

        let ranges = DmaLoggingRanges::new(&[(0x1000, 0x2000), (0x10_0000, 0x4000)]);
        assert_eq!(ranges.len(), 2);
        assert_eq!(ranges.words.as_ptr() as usize % 8, 0);
        let a = dma_logging_start_arg(4096, &ranges);
        assert_eq!(a.len(), 32);
        assert_eq!(get_u32(&a, 0), Some(32));
        assert_eq!(get_u32(&a, 4), Some(FEATURE_SET | 6));
        assert_eq!(get_u32(&a, 4), Some(0x2_0006));
        assert_eq!(get_u64(&a, 8), Some(4096));
        assert_eq!(get_u32(&a, 16), Some(2));
        assert_eq!(get_u32(&a, 20), Some(0));
        assert_eq!(get_u64(&a, 24), Some(ranges.words.as_ptr() as u64));
        assert_eq!(dma_logging_start_page_size(&a), Some(4096));

        let mut bm = vec![0u64; 3];
        let r = dma_logging_report_arg(0x4000, 0x10_0000, 4096, &mut bm);
        assert_eq!(r.len(), 40);
        assert_eq!(get_u32(&r, 0), Some(40));
        assert_eq!(get_u32(&r, 4), Some(0x1_0008));
        assert_eq!(get_u64(&r, 8), Some(0x4000));
        assert_eq!(get_u64(&r, 16), Some(0x10_0000));
        assert_eq!(get_u64(&r, 24), Some(4096));
        assert_eq!(get_u64(&r, 32), Some(bm.as_ptr() as u64));

        let p = dma_logging_probe_arg();
        assert_eq!(p.len(), 8);
        assert_eq!(get_u32(&p, 0), Some(8));
        assert_eq!(get_u32(&p, 4), Some(0x6_0006));
        let s = dma_logging_stop_arg();
        assert_eq!((get_u32(&s, 0), get_u32(&s, 4)), (Some(8), Some(0x2_0007)));
    }

    #[test]
    fn byte_helpers_are_bounded() {
        let mut b = [0u8; 6];
        put_u32(&mut b, 4, 1);
        put_u64(&mut b, usize::MAX, 1);
        assert_eq!(b, [0; 6]);
        assert_eq!(get_u32(&b, 3), None);
        assert_eq!(get_u64(&b, usize::MAX - 2), None);
        assert_eq!(get_u16(&b, 4), Some(0));
        let mut short = [0u8; 4];
        assert!(device_feature_bytes(&File::open("/dev/null").unwrap(), &mut short).is_err());
    }

    #[test]
    fn ioctl_numbers_match_kernel() {
        // _IO(';', 100 + 17) and _IO(';', 100 + 21): no direction, no size.
        assert_eq!(VFIO_DEVICE_FEATURE(), 0x3B75);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO(), 0x3B79);
    }

    #[test]
    fn ioctls_on_a_non_vfio_fd_fail_cleanly() {
        let f = File::open("/dev/null").unwrap();
        assert!(get_migration_flags(&f).is_err());
        assert!(get_precopy_info(&f).is_err());
        assert!(set_mig_state(&f, 1).is_err());
    }
}
