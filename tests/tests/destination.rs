//! The destination owns its host resources (issue #9, part 2).
//!
//! The migration stream describes the guest only; the serial output, the
//! memory backing, VFIO host paths and simulated-device resources come from
//! the destination's own command line. These tests play a hostile source
//! that crafts its configuration (a SETUP naming host paths, undeclared
//! devices, CPU features the host lacks, more memory than allowed), and
//! check that each is refused by name, that nothing was created on the
//! destination host, and that the armed receive goes on serving a real
//! migration afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use ferry_tests::*;
use migration::wire::{message_text, DeviceDesc, Header, Kind, Setup, HEADER_LEN, ROLE_MAIN};
use migration::{DeviceStateMode, MigCaps};
use vmm::device_set::{DeviceKind, GuestDevice};
use vmm::jobs::guest_config::{CpuidEntry, MigrationConfig, CONFIG_FORMAT, CONFIG_VERSION};

const GUEST: &str = "region=16 passes=0";
const MIB: u64 = 1 << 20;

/// A plausible guest of `size` bytes (one vCPU, no CPUID, `devices`).
fn config(size: u64, devices: Vec<GuestDevice>) -> MigrationConfig {
    MigrationConfig {
        format: CONFIG_FORMAT.into(),
        version: CONFIG_VERSION,
        cpus: 1,
        memory_size: size,
        // Below the 32-bit gap the layout is one region from 0.
        regions: vec![(0, size)],
        cpuid: vec![],
        devices,
        caps: Default::default(),
        msrs: vec![],
    }
}

fn read_frame(s: &mut TcpStream) -> Result<(Header, Vec<u8>), String> {
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).map_err(|e| format!("reading: {e}"))?;
    let h = Header::decode(&b).map_err(|e| e.to_string())?;
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).map_err(|e| format!("reading: {e}"))?;
    Ok((h, p))
}

/// Plays a source that sends `config` in its SETUP (with `devices` as the
/// SETUP's device list) and returns the destination's ERROR message.
/// Panics if the destination accepts it.
fn crafted_setup(port: u16, session: u128, config: &[u8], devices: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the receiver");
    s.write_all(
        &Header::new(Kind::Hello, session)
            .args(ROLE_MAIN, 0, 1)
            .encode(),
    )
    .unwrap();
    let (h, _) = read_frame(&mut s).expect("reply to HELLO");
    assert_eq!(h.kind, Kind::Ok, "HELLO refused");
    let setup = Setup {
        config: config.to_vec(),
        regions: serde_json::from_slice::<Value>(config)
            .ok()
            .and_then(|v| serde_json::from_value(v["regions"].clone()).ok())
            .unwrap_or_else(|| vec![(0, 512 * MIB)]),
        devices: devices
            .iter()
            .map(|id| DeviceDesc {
                id: id.to_string(),
                caps: MigCaps {
                    stop_copy: true,
                    p2p: false,
                    pre_copy: false,
                },
            })
            .collect(),
        chunk_bytes: 1 << 20,
        device_mode: DeviceStateMode::Channels,
        features: 0,
        handover: false,
    };
    let payload = setup.encode();
    s.write_all(
        &Header::new(Kind::Setup, session)
            .with_len(payload.len() as u64)
            .encode(),
    )
    .unwrap();
    s.write_all(&payload).unwrap();
    loop {
        let (h, p) = read_frame(&mut s).expect("reply to SETUP");
        match h.kind {
            Kind::Error => return message_text(&p),
            Kind::Keepalive => continue,
            k => panic!("a crafted SETUP was answered with {k:?}, not refused"),
        }
    }
}

/// The destination still waits for a migration: its process and API are
/// up, and the receive it was given is still active.
fn assert_still_armed(dst: &Vmm, port: u16, after: &str) {
    assert!(dst.is_running(), "destination died after {after}");
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200, "API after {after}");
    let st = dst.migration_status().unwrap_or(Value::Null);
    assert_eq!(
        mig_state(&st),
        "active",
        "the receive ended after {after}: {st}"
    );
    assert!(tcp_listening(port), "nothing listens after {after}");
    let (st, info) = dst.api("GET", "vm.info", None);
    assert_eq!(
        (st, info["state"].as_str()),
        (409, Some("receiving")),
        "a VM exists after {after}: {info}"
    );
}

/// A bit of CPUID leaf 7.0 EBX that this CPU does not have (KVM never
/// offers a guest a feature the CPU lacks).
fn a_feature_this_host_lacks() -> u32 {
    // SAFETY: CPUID is available on every x86-64 CPU; leaf 7 exists on
    // every CPU that runs KVM guests with these tests. (Newer compilers
    // consider the intrinsic safe; the MSRV does not.)
    #[allow(unused_unsafe)]
    let ebx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.ebx;
    // avx512f, avx512dq, avx512ifma, avx512pf, avx512er, avx512cd, sha_ni,
    // avx512bw, avx512vl, then anything.
    [16u32, 17, 21, 26, 27, 28, 29, 30, 31]
        .into_iter()
        .chain(0..32)
        .find(|b| ebx & (1 << b) == 0)
        .expect("a CPU with every leaf 7.0 EBX bit set")
}

#[test]
fn crafted_configurations_touching_host_resources_are_refused() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = Vmm::boot("src", GUEST, &["--sim-vfio", "id=mine,state=1M"]);
    src.wait_pass(1);
    // Started without --serial: the peer used to choose the serial file.
    let dst = Vmm::spawn_serial_default("dst", &["--sim-vfio", "id=mine,state=1M"]);
    dst.wait_api();
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let evil = TempDir::new("evil");
    let evil_serial = evil.join("peer-chosen-serial.log");
    let evil_file = evil.join("peer-chosen-memory");
    let mine = GuestDevice {
        id: "mine".into(),
        kind: DeviceKind::SimVfio,
        state_size: Some(MIB),
    };
    let base = serde_json::to_value(config(512 * MIB, vec![mine.clone()])).unwrap();

    let mut cases: Vec<(&str, Value, Vec<&str>, Vec<&str>)> = Vec::new();
    // A version-1 configuration, which named the serial file.
    let mut v1 = base.clone();
    v1["version"] = json!(1);
    v1["serial"] = json!({ "file": evil_serial });
    cases.push((
        "a v1 config naming a serial file",
        v1,
        vec!["mine"],
        vec!["v1"],
    ));
    // The same fields relabelled as the current version.
    let mut v = base.clone();
    v["serial"] = json!({ "file": evil_serial });
    cases.push((
        "a serial path",
        v,
        vec!["mine"],
        vec!["unknown field", "serial"],
    ));
    let mut v = base.clone();
    v["memory_kind"] = json!({ "file": evil_file });
    cases.push((
        "a memory file",
        v,
        vec!["mine"],
        vec!["unknown field", "memory_kind"],
    ));
    let mut v = base.clone();
    v["boot"] = json!({ "kernel": evil.join("kernel"), "initramfs": null, "cmdline": "" });
    cases.push(("boot files", v, vec!["mine"], vec!["unknown field", "boot"]));
    // A VFIO host path in a device, and sim-vfio parameters.
    let mut v = base.clone();
    v["devices"] = json!([
        { "id": "mine", "kind": "sim_vfio", "state_size": MIB },
        { "id": "v0", "kind": "vfio", "arg": "path=/sys/bus/pci/devices/0000:00:1f.0" }
    ]);
    cases.push((
        "a VFIO host path",
        v,
        vec!["mine", "v0"],
        vec!["unknown field", "arg"],
    ));
    let mut v = base.clone();
    v["devices"] = json!([
        { "id": "mine", "kind": "sim_vfio", "state_size": MIB, "arg": "id=mine,state=16G" }
    ]);
    cases.push((
        "sim-vfio parameters",
        v,
        vec!["mine"],
        vec!["unknown field", "arg"],
    ));
    // Devices the destination did not declare, and one it did, missing.
    let mut v = base.clone();
    v["devices"] = json!([
        { "id": "mine", "kind": "sim_vfio", "state_size": MIB },
        { "id": "huge", "kind": "sim_vfio", "state_size": 16u64 << 30 }
    ]);
    cases.push((
        "an undeclared sim-vfio device",
        v,
        vec!["mine", "huge"],
        vec!["'huge'", "did not declare", "--sim-vfio"],
    ));
    let mut v = base.clone();
    v["devices"] = json!([{ "id": "v1", "kind": "vfio" }]);
    cases.push((
        "an undeclared VFIO device",
        v,
        vec!["v1"],
        vec!["'v1'", "did not declare", "--vfio"],
    ));
    let mut v = base.clone();
    v["devices"] = json!([]);
    cases.push((
        "a declared device missing",
        v,
        vec![],
        vec!["'mine'", "no such device"],
    ));
    let mut v = base.clone();
    v["devices"] = json!([{ "id": "mine", "kind": "vfio" }]);
    cases.push((
        "a device of another kind",
        v,
        vec!["mine"],
        vec!["'mine'", "--vfio", "--sim-vfio"],
    ));
    let mut v = base.clone();
    v["devices"] = json!([{ "id": "mine", "kind": "sim_vfio", "state_size": 16u64 << 30 }]);
    cases.push((
        "a device state larger than declared",
        v,
        vec!["mine"],
        vec!["'mine'", "state", "1048576 bytes"],
    ));
    // A guest-visible CPU feature this host lacks.
    let bit = a_feature_this_host_lacks();
    let mut c = config(512 * MIB, vec![mine.clone()]);
    c.cpuid = vec![CpuidEntry {
        function: 7,
        index: 0,
        flags: 1,
        eax: 0,
        ebx: 1 << bit,
        ecx: 0,
        edx: 0,
    }];
    let bit_text = format!("bit {bit}");
    cases.push((
        "a CPU feature the host lacks",
        serde_json::to_value(&c).unwrap(),
        vec!["mine"],
        vec!["CPU features this host lacks", "0x7.0 EBX", &bit_text],
    ));

    for (i, (what, cfg, devices, expect)) in cases.iter().enumerate() {
        let bytes = serde_json::to_vec(cfg).unwrap();
        let err = crafted_setup(port, 0xbad0 + i as u128, &bytes, devices);
        eprintln!("[dst] {what}: refused with {err:?}");
        for e in expect {
            assert!(err.contains(e), "{what}: {e:?} not in the refusal {err:?}");
        }
        assert_still_armed(&dst, port, what);
        for p in [&evil_serial, &evil_file] {
            assert!(
                !Path::new(p).exists(),
                "{what}: {} was created",
                p.display()
            );
        }
    }

    // The armed receive then takes the real migration; the guest writes to
    // the destination's own serial output (its default, stdout), not to
    // the source's file.
    start_send(&src, send_params(port, 2));
    finish_migration(&mut src, &dst, Some(recv)).check_completed();
    check_guest_moved(&[&src.serial], &dst);
    assert!(!evil_serial.exists());
    let info = dst.info();
    assert_eq!(info["devices"][0]["id"], "mine", "{info}");
}

#[test]
fn a_real_source_with_undeclared_devices_is_refused() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = Vmm::boot(
        "src",
        GUEST,
        &[
            "--sim-vfio",
            "id=d0,state=4M,precopy=2M",
            "--sim-vfio",
            "id=d1,state=2M",
        ],
    );
    src.wait_pass(1);
    // Declares d0 only.
    let dst = Vmm::destination("dst", &["--sim-vfio", "id=d0,state=4M"]);
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    start_send(&src, send_params(port, 2));
    let s = expect_migration_end(&src, &["failed"], MIGRATION_TIMEOUT);
    let err = s["error"].as_str().unwrap_or("");
    assert!(
        err.contains("'d1'") && err.contains("did not declare"),
        "the refusal should name d1: {err:?}"
    );
    assert_eq!(s["transferred_bytes"].as_u64(), Some(0), "RAM moved: {s}");
    assert_guest_runs(&src, 1);
    assert_still_armed(&dst, port, "a source with an undeclared device");
    assert_eq!(dst.serial.passes(), Vec::<u64>::new());
}

#[test]
fn sim_vfio_devices_declared_by_the_destination_migrate() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = Vmm::boot(
        "src",
        GUEST,
        &[
            "--sim-vfio",
            "id=d0,state=4M,precopy=2M",
            "--sim-vfio",
            "id=d1,state=2M,dirty-rate=5",
        ],
    );
    src.wait_pass(1);
    // Declared in another order: devices pair by id.
    let dst = Vmm::destination(
        "dst",
        &[
            "--sim-vfio",
            "id=d1,state=2M,load-rate=500",
            "--sim-vfio",
            "id=d0,state=4M",
        ],
    );
    let before = src.info();
    migrate_and_check(&mut src, &dst, send_params(0, 2), &[]);
    let info = dst.info();
    let devs = info["devices"].as_array().expect("devices in vm.info");
    let ids: Vec<&str> = devs.iter().filter_map(|d| d["id"].as_str()).collect();
    assert_eq!(
        ids,
        ["d0", "d1"],
        "devices follow the guest's order: {info}"
    );
    for d in devs {
        assert_eq!(
            d["digest"], d["source_digest"],
            "device {} did not load the source's state: {d}",
            d["id"]
        );
    }
    let d0_before = before["devices"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["id"] == "d0"))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(devs[0]["digest"], d0_before["digest"], "d0's state");
}

#[test]
fn memory_larger_than_the_destination_allows_is_refused() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = Vmm::boot("src", GUEST, &["--memory", "size=512M"]);
    src.wait_pass(1);
    let dst = Vmm::destination("dst", &["--memory", "size=256M"]);
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    start_send(&src, send_params(port, 2));
    let s = expect_migration_end(&src, &["failed"], MIGRATION_TIMEOUT);
    let err = s["error"].as_str().unwrap_or("");
    assert!(
        err.contains("512 MiB") && err.contains("--memory size=256 MiB"),
        "the refusal should name the limit: {err:?}"
    );
    assert_eq!(s["transferred_bytes"].as_u64(), Some(0), "RAM moved: {s}");
    assert_guest_runs(&src, 1);
    assert_still_armed(&dst, port, "a guest larger than --memory");
}

/// A simulated device's parameters are the destination's own: a fault the
/// source's argument asks for (`fail-load=1`) does not travel, and one the
/// destination declares applies.
#[test]
fn the_destination_uses_its_own_device_parameters() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = Vmm::boot("src", GUEST, &["--sim-vfio", "id=d0,state=2M,fail-load=1"]);
    src.wait_pass(1);
    let dst = Vmm::destination("dst", &["--sim-vfio", "id=d0,state=2M"]);
    migrate_and_check(&mut src, &dst, send_params(0, 2), &[]);

    let src2 = Vmm::boot("src2", GUEST, &["--sim-vfio", "id=d0,state=2M"]);
    src2.wait_pass(1);
    let dst2 = Vmm::destination("dst2", &["--sim-vfio", "id=d0,state=2M,fail-load=1"]);
    let port = free_tcp_port();
    let _recv = start_receive(&dst2, port);
    start_send(&src2, send_params(port, 2));
    let s = expect_migration_end(&src2, &["failed"], MIGRATION_TIMEOUT);
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("d0"), "the error should name d0: {err:?}");
    assert_guest_runs(&src2, 1);
}
