use super::*;
use std::os::fd::FromRawFd;

#[test]
fn parse_ok_with_default_and_explicit_id() {
    let c = parse_vfio_arg("path=/sys/bus/pci/devices/0000:01:00.0").unwrap();
    assert_eq!(c.bdf, "0000:01:00.0");
    assert_eq!(c.id, "0000:01:00.0");
    assert_eq!(c.path, PathBuf::from("/sys/bus/pci/devices/0000:01:00.0"));
    let c = parse_vfio_arg("path=/sys/bus/pci/devices/0000:3B:1f.7/,id=nic0").unwrap();
    assert_eq!(c.bdf, "0000:3b:1f.7");
    assert_eq!(c.id, "nic0");
    let c = parse_vfio_arg("id=gpu,path=/sys/bus/pci/devices/0001:02:03.4").unwrap();
    assert_eq!(c.id, "gpu");
}

#[test]
fn parse_rejects_malformed() {
    for bad in [
        "",
        "path=/dev/vfio/3",
        "path=/sys/bus/pci/devices/01:00.0",
        "path=/sys/bus/pci/devices/0000:01:00.8",
        "path=/sys/bus/pci/devices/0000:01:00.0/../x",
        "path=/sys/bus/pci/devices/0000:01:00.0,id=",
        "path=/sys/bus/pci/devices/0000:01:00.0,id=a b",
        "path=/sys/bus/pci/devices/0000:01:00.0,foo=1",
        "path=/sys/bus/pci/devices/0000:01:00.0,path=/sys/bus/pci/devices/0000:01:00.1",
        "id=x",
        "path",
    ] {
        assert!(parse_vfio_arg(bad).is_err(), "{bad:?} accepted");
    }
    let long = format!(
        "path=/sys/bus/pci/devices/0000:01:00.0,id={}",
        "a".repeat(65)
    );
    assert!(parse_vfio_arg(&long).is_err());
}

#[test]
fn open_missing_device_is_a_clear_error() {
    let cfg = parse_vfio_arg("path=/sys/bus/pci/devices/0000:ff:1f.7,id=nodev").unwrap();
    let e = KernelVfioDevice::open(&cfg).unwrap_err().to_string();
    assert!(e.contains("nodev") && e.contains("no such device"), "{e}");
}

#[test]
fn open_without_vfio_is_a_clear_error() {
    // A fake sysfs device with an iommu_group link gets past the sysfs checks.
    let dir = std::env::temp_dir().join(format!("ferry-vfio-test-{}", std::process::id()));
    let dev = dir.join("0000:00:04.0");
    std::fs::create_dir_all(&dev).unwrap();
    let _ = std::fs::remove_file(dev.join("iommu_group"));
    std::os::unix::fs::symlink("../../kernel/iommu_groups/7", dev.join("iommu_group")).unwrap();
    assert_eq!(iommu_group_of("x", &dev).unwrap(), 7);
    let cfg = VfioConfig {
        path: dev.clone(),
        bdf: "0000:00:04.0".into(),
        id: "fake0".into(),
    };
    let r = KernelVfioDevice::open(&cfg);
    let _ = std::fs::remove_dir_all(&dir);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("fake0"), "{e}");
    if !Path::new("/dev/vfio/vfio").exists() {
        assert!(e.contains("/dev/vfio/vfio"), "{e}");
    }
}

#[test]
fn no_iommu_group_is_a_clear_error() {
    let e = iommu_group_of("g", Path::new("/nonexistent"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("iommu_group"), "{e}");
}

/// A model of the kernel side that only accepts single FSM arcs.
struct FakeOps {
    flags: u64,
    st: Mutex<(u32, Vec<u32>)>,
    fail_at: Option<u32>,
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: pipe() returned two fresh fds we now own.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

impl RawMigOps for FakeOps {
    fn migration_flags(&self) -> io::Result<u64> {
        if self.flags == 0 {
            Err(io::Error::from_raw_os_error(libc::ENOTTY))
        } else {
            Ok(self.flags)
        }
    }
    fn get_state(&self) -> io::Result<u32> {
        Ok(self.st.lock().unwrap().0)
    }
    fn set_state(&self, new: u32) -> io::Result<Option<File>> {
        let mut st = self.st.lock().unwrap();
        let caps = mig_fsm::caps_from_flags(self.flags);
        let cur = mig_fsm::state_from_u32(st.0).unwrap();
        let n = mig_fsm::state_from_u32(new).ok_or(io::Error::from_raw_os_error(libc::EINVAL))?;
        if mig_fsm::path(caps, cur, n) != Some(vec![n]) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if self.fail_at == Some(new) {
            st.0 = 0;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        st.0 = new;
        st.1.push(new);
        let fresh = match (cur, n) {
            (_, MigState::PreCopy) | (_, MigState::PreCopyP2p) => !is_streaming(cur),
            (MigState::Stop, MigState::StopCopy) | (MigState::Stop, MigState::Resuming) => true,
            _ => false,
        };
        Ok(if fresh { Some(pipe().0) } else { None })
    }
    fn data_size(&self) -> io::Result<u64> {
        Ok(4096)
    }
    fn precopy_info(&self, _fd: &File) -> io::Result<(u64, u64)> {
        Ok((100, 5))
    }
}

fn fake(flags: u64, fail_at: Option<MigState>) -> KernelVfioDevice {
    let ops = FakeOps {
        flags,
        st: Mutex::new((MigState::Running as u32, Vec::new())),
        fail_at: fail_at.map(|s| s as u32),
    };
    KernelVfioDevice::with_ops("fk", Box::new(ops)).unwrap()
}

#[test]
fn walker_drives_single_arcs_full_caps() {
    let d = fake(7, None);
    assert_eq!(
        d.caps(),
        MigCaps {
            stop_copy: true,
            p2p: true,
            pre_copy: true
        }
    );
    assert!(d.precopy_info().is_err());
    assert!(d.set_state(MigState::PreCopy).unwrap().is_some());
    assert_eq!(
        d.precopy_info().unwrap(),
        PrecopyInfo {
            initial_bytes: 100,
            dirty_bytes: 5
        }
    );
    // PRE_COPY -> PRE_COPY_P2P -> STOP_COPY keeps the fd.
    assert!(d.set_state(MigState::StopCopy).unwrap().is_none());
    assert_eq!(d.state().unwrap(), MigState::StopCopy);
    assert!(d.precopy_info().is_err());
    assert!(d.set_state(MigState::PreCopy).is_err(), "blocked arc");
    // STOP_COPY -> STOP -> RUNNING_P2P -> RUNNING
    assert!(d.set_state(MigState::Running).unwrap().is_none());
    // RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY returns a fresh fd.
    assert!(d.set_state(MigState::StopCopy).unwrap().is_some());
    assert_eq!(d.stop_copy_size().unwrap(), 4096);
}

#[test]
fn walker_without_p2p() {
    let d = fake(1, None);
    assert!(d.set_state(MigState::PreCopy).is_err());
    assert!(d.set_state(MigState::RunningP2p).is_err());
    assert!(d.set_state(MigState::StopCopy).unwrap().is_some());
    assert!(d.set_state(MigState::Resuming).unwrap().is_some());
    assert!(d.set_state(MigState::Running).unwrap().is_none());
}

#[test]
fn failed_arc_reports_device_and_state() {
    let d = fake(7, Some(MigState::Stop));
    let e = d.set_state(MigState::StopCopy).unwrap_err().to_string();
    assert!(e.contains("fk") && e.contains("Stop"), "{e}");
    assert_eq!(d.state().unwrap(), MigState::Error);
    assert!(d.set_state(MigState::Running).is_err());
}

#[test]
fn no_migration_support_is_a_clear_error() {
    let ops = FakeOps {
        flags: 0,
        st: Mutex::new((2, vec![])),
        fail_at: None,
    };
    let e = KernelVfioDevice::with_ops("nomig", Box::new(ops))
        .unwrap_err()
        .to_string();
    assert!(e.contains("nomig") && e.contains("migration"), "{e}");
    let ops = FakeOps {
        flags: 2,
        st: Mutex::new((2, vec![])),
        fail_at: None,
    };
    assert!(KernelVfioDevice::with_ops("p2ponly", Box::new(ops)).is_err());
}
