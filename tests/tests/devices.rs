//! Migration of device state (issue #4), with simulated VFIO devices
//! (`--sim-vfio`): some pre-copyable, some dirtying their state while the
//! VM runs, moved on the shared data connections (`device_state: channels`)
//! or on the main connection (`main`).
//!
//! Digests: every device's stream ends with the digest of its state when
//! the source entered STOP_COPY; the destination checks it on load and shows
//! it in `vm.info` as `source_digest`. So for every device (dirtying ones
//! included) the destination's `digest` must equal its `source_digest`.
//! A device without `dirty-rate` keeps a constant state, so both must also
//! equal the source's `digest` before the migration. (Destination devices
//! never dirty their state, so their `digest` is stable after migration.)

use std::collections::BTreeMap;

use ferry_tests::*;

/// (ferry argument, dirties its state?)
const DEVICES: [(&str, bool); 4] = [
    ("id=d0,state=16M,precopy=8M", false),
    ("id=d1,state=8M,dirty-rate=10", true),
    ("id=d2,state=4M", false),
    ("id=d3,state=16M,precopy=16M,dirty-rate=5", true),
];

fn device_args(n: usize) -> Vec<String> {
    DEVICES[..n]
        .iter()
        .flat_map(|(d, _)| ["--sim-vfio".to_string(), d.to_string()])
        .collect()
}

fn dev_id(spec: &str) -> &str {
    spec.split(',')
        .find_map(|kv| kv.strip_prefix("id="))
        .unwrap()
}

/// id -> device object, from `vm.info`.
fn devices_of(info: &Value) -> BTreeMap<String, Value> {
    info["devices"]
        .as_array()
        .unwrap_or_else(|| panic!("vm.info has no devices array: {}", info))
        .iter()
        .filter_map(|d| Some((d["id"].as_str()?.to_string(), d.clone())))
        .collect()
}

/// Checks, for every device of `specs`, that the destination loaded exactly
/// the state the source had at switch-over, and for non-dirtying devices
/// that this is also the source's state before the migration.
fn check_digests(
    specs: &[(&str, bool)],
    before: &BTreeMap<String, Value>,
    after: &BTreeMap<String, Value>,
) {
    for (spec, dirtying) in specs {
        let id = dev_id(spec);
        let b = &before[id];
        let a = after
            .get(id)
            .unwrap_or_else(|| panic!("device {} not on the destination: {:?}", id, after));
        assert!(
            b.get("source_digest").is_none(),
            "a source device has no source_digest: {}",
            b
        );
        let digest = a["digest"]
            .as_str()
            .unwrap_or_else(|| panic!("digest of {} on the destination: {}", id, a));
        let source_digest = a["source_digest"]
            .as_str()
            .unwrap_or_else(|| panic!("source_digest of {} on the destination: {}", id, a));
        assert_eq!(digest.len(), 16, "digest format of {}: {:?}", id, digest);
        assert_eq!(
            digest, source_digest,
            "digest of {} on the destination vs the source's at switch-over",
            id
        );
        if !dirtying {
            assert_eq!(
                a["digest"], b["digest"],
                "digest of non-dirtying {} after migration vs before",
                id
            );
        }
    }
}

/// id -> digest from a `vm.migration` status, when it reports devices.
fn status_digests(s: &Value) -> BTreeMap<String, Value> {
    s["devices"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| Some((d["id"].as_str()?.to_string(), d.get("digest")?.clone())))
                .collect()
        })
        .unwrap_or_default()
}

fn migrate_devices(n: usize, connections: u32, mode: &str) {
    skip_unless_kvm!();
    let _g = serial_guard();
    let args = device_args(n);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut src, dst) = start_pair("region=32 passes=0", &args, 1);

    let before = devices_of(&src.info());
    for (spec, _) in &DEVICES[..n] {
        let d = before
            .get(dev_id(spec))
            .unwrap_or_else(|| panic!("device {} not in vm.info: {:?}", dev_id(spec), before));
        assert!(
            d["state_size"].as_u64().unwrap_or(0) > 0,
            "state_size of {}: {}",
            dev_id(spec),
            d
        );
        assert!(!d["digest"].is_null(), "digest of {}: {}", dev_id(spec), d);
    }
    // Constant devices really are constant.
    src.wait_more_passes(1);
    let again = devices_of(&src.info());
    for (spec, dirtying) in &DEVICES[..n] {
        if !dirtying {
            let id = dev_id(spec);
            assert_eq!(
                before[id]["digest"], again[id]["digest"],
                "digest of non-dirtying {} changed on the source",
                id
            );
        }
    }

    let mut params = send_params(0, connections);
    params["device_state"] = json!(mode);
    let m = migrate_and_check(&mut src, &dst, params, &[]);

    let after = devices_of(&dst.info());
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>(),
        "device set on the destination"
    );
    for (spec, _) in &DEVICES[..n] {
        let id = dev_id(spec);
        assert_eq!(
            after[id]["state_size"], before[id]["state_size"],
            "state_size of {}",
            id
        );
    }
    check_digests(&DEVICES[..n], &before, &after);
    // Per-device digests at switch-over, where both sides report them.
    if let Some(src_status) = &m.source_status {
        let s = status_digests(src_status);
        let d = status_digests(&m.dest_status);
        for (id, digest) in &s {
            if let Some(dd) = d.get(id) {
                assert_eq!(
                    digest, dd,
                    "switch-over digest of {}: source vs destination",
                    id
                );
            }
        }
    }
}

macro_rules! device_matrix {
    ($($name:ident: $n:expr, $conns:expr, $mode:expr;)*) => {
        $(
            #[test]
            fn $name() {
                migrate_devices($n, $conns, $mode);
            }
        )*
    };
}

device_matrix! {
    devices_1_conn_1_channels: 1, 1, "channels";
    devices_1_conn_4_channels: 1, 4, "channels";
    devices_2_conn_1_channels: 2, 1, "channels";
    devices_2_conn_4_channels: 2, 4, "channels";
    devices_4_conn_1_channels: 4, 1, "channels";
    devices_4_conn_4_channels: 4, 4, "channels";
    devices_1_conn_1_main: 1, 1, "main";
    devices_1_conn_4_main: 1, 4, "main";
    devices_2_conn_1_main: 2, 1, "main";
    devices_2_conn_4_main: 2, 4, "main";
    devices_4_conn_1_main: 4, 1, "main";
    devices_4_conn_4_main: 4, 4, "main";
}

#[test]
fn devices_without_precopy() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let args = device_args(4);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (mut src, dst) = start_pair("region=32 passes=0", &args, 1);
    let before = devices_of(&src.info());
    let mut params = send_params(0, 4);
    params["device_precopy"] = json!(false);
    migrate_and_check(&mut src, &dst, params, &[]);
    let after = devices_of(&dst.info());
    check_digests(&DEVICES, &before, &after);
}

/// After a migration the destination's devices run again (VFIO RUNNING,
/// out of the STOP that loading their state left them in), and a device
/// that ran there migrates on with its state.
#[test]
fn devices_run_again_on_the_destination() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut a, mut b) = start_pair("region=16 passes=0", &["--sim-vfio", DEVICES[2].0], 1);
    let id = dev_id(DEVICES[2].0);
    let mig_state = |vm: &Vmm| devices_of(&vm.info())[id]["mig_state"].clone();
    assert_eq!(mig_state(&a), json!("running"), "source device before");
    let before = devices_of(&a.info());
    migrate_and_check(&mut a, &b, send_params(0, 2), &[]);
    assert_eq!(mig_state(&b), json!("running"), "device on the destination");
    let c = Vmm::destination("c", &["--sim-vfio", DEVICES[2].0]);
    migrate_and_check(&mut b, &c, send_params(0, 2), &[&a.serial]);
    assert_eq!(mig_state(&c), json!("running"), "device after a second hop");
    check_digests(&DEVICES[2..3], &before, &devices_of(&c.info()));
}

/// A device fault makes the migration fail: the source runs on with its
/// devices, the error names the faulty device, the destination stays usable.
fn device_fault(faulty: &str, mode: &str) {
    skip_unless_kvm!();
    let _g = serial_guard();
    let id = dev_id(faulty).to_string();
    let (src, dst) = start_pair(
        "region=32 passes=0",
        &["--sim-vfio", DEVICES[0].0, "--sim-vfio", faulty],
        1,
    );
    let before = devices_of(&src.info());
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    let mut params = send_params(port, 4);
    params["device_state"] = json!(mode);
    start_send(&src, params);
    let s = expect_migration_end(&src, &["failed"], MIGRATION_TIMEOUT);
    let err = s["error"].as_str().unwrap_or("");
    assert!(
        err.contains(&id),
        "the error should name device {}: {:?}",
        id,
        err
    );

    assert_guest_runs(&src, 1);
    let now = devices_of(&src.info());
    assert_eq!(
        now.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        now["d0"]["digest"], before["d0"]["digest"],
        "d0's state changed by the failed migration"
    );

    let d = wait_migration_state(&dst, &["failed", "cancelled"], LONG);
    assert!(d["error"].is_string(), "{}", d);
    assert_eq!(dst.api("GET", "vmm.ping", None).0, 200);
    assert_eq!(
        dst.serial.passes(),
        Vec::<u64>::new(),
        "no guest may run after a failed receive"
    );
    drop(src);
}

#[test]
fn device_save_fails_midway_channels() {
    device_fault(
        "id=faulty,state=16M,precopy=8M,fail-save-after=4M",
        "channels",
    );
}

#[test]
fn device_save_fails_midway_main() {
    device_fault("id=faulty,state=16M,precopy=8M,fail-save-after=4M", "main");
}

#[test]
fn device_load_refused_channels() {
    device_fault("id=badload,state=8M,precopy=4M,fail-load=1", "channels");
}

#[test]
fn device_load_refused_main() {
    device_fault("id=badload,state=8M,fail-load=1", "main");
}
