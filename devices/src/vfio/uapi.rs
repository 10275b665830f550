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
