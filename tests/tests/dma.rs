//! DMA devices through a live migration (issue 12).
//!
//! The stamp guest in `dev=1` mode finds the simulated DMA devices
//! (`--sim-vfio`) on the PCI bus through ECAM, programs their BAR, MSI-X
//! and descriptor ring, and lets them write sequence-numbered pages into
//! its memory by DMA while it stamps its own region. After every pass it
//! stops each device, checks every DMA page against the device's SEQ
//! register (`stamp: DMA MISMATCH` on a stale page), reads back the
//! registers it wrote (`stamp: REG MISMATCH`), restarts the device and
//! waits for its MSI-X interrupt, then prints `stamp: dev <pass> ok`.
//!
//! So a destination that prints `dev <n> ok` lines after a live migration
//! received every page the devices wrote (DMA dirty tracking), their
//! registers, their PCI layer and working interrupt routes. With the
//! devices' logging turned off (`dma-log=off`) the same run must report a
//! `DMA MISMATCH`: the witness can fail. A device that cannot log
//! (`dma-log=none`) must be refused unless `allow_untracked_dma` is set.

use ferry_tests::*;

/// The guest: runs forever; a 1 MiB region so that a pass is short, and
/// 1024 DMA pages per device. With `dma-rate=16` (MiB/s) a device needs
/// 250 ms to rewrite its whole ring, much longer than a pass: the check
/// after the switch-over comes before the destination's device rewrote
/// every page, so a page the migration lost is still stale when checked.
/// (With a ring the device rewrites within a pass, the witness would be
/// blind.)
const GUEST: &str = "region=1 passes=0 dev=1 dma=1024";

/// `dev <n> ok` lines the destination must print after the migration.
const DEST_DEV_PASSES: usize = 2;

/// Arguments declaring `n` DMA devices, each with `extra` appended.
fn dev_args(n: usize, extra: &str) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            [
                "--sim-vfio".to_string(),
                format!("id=d{i},state=1M,precopy=256K,dma-rate=16{extra}"),
            ]
        })
        .collect()
}

/// Parses `stamp: dev <pass> ok seq=<sum>` into (pass, sum).
fn parse_dev_ok(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim().strip_prefix("stamp: dev ")?;
    let (pass, rest) = rest.split_once(' ')?;
    let seq = rest.strip_prefix("ok seq=")?;
    Some((pass.parse().ok()?, seq.trim().parse().ok()?))
}

fn dev_oks(log: &SerialLog) -> Vec<(u64, u64)> {
    log.lines().iter().filter_map(|l| parse_dev_ok(l)).collect()
}

/// The first line of `log` that reports a failure of the witness, or that
/// it is blind (`dev WARNING ring too short`: a device rewrote its whole
/// ring between two checks, so lost pages could not be seen).
fn failure(log: &SerialLog) -> Option<String> {
    log.lines().into_iter().find(|l| {
        l.contains("MISMATCH") || l.contains("ERROR") || l.contains("WARNING ring too short")
    })
}

/// Boots `devices` DMA devices (logging mode `extra`) with the witness and
/// waits until the guest checked them twice; returns (source, destination).
fn start(devices: usize, extra: &str) -> (Vmm, Vmm) {
    let args = dev_args(devices, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (src, dst) = start_pair(GUEST, &args, 2);
    let found = format!("stamp: dev found={devices}");
    assert!(
        src.serial.lines().iter().any(|l| l.trim() == found),
        "[src] no '{found}' line:\n{}",
        src.serial.tail(10)
    );
    poll(LONG, || (dev_oks(&src.serial).len() >= 2).then_some(())).unwrap_or_else(|| {
        panic!(
            "[src] fewer than 2 'dev <n> ok' lines before the migration:\n{}",
            src.serial.tail(10)
        )
    });
    assert_eq!(failure(&src.serial), None, "[src] before the migration");
    (src, dst)
}

/// Waits until `dst` printed [`DEST_DEV_PASSES`] `dev <n> ok` lines, or a
/// failure; returns the failure line, if any.
fn wait_dest_checks(dst: &Vmm) -> Option<String> {
    poll(LONG * 2, || {
        if let Some(f) = failure(&dst.serial) {
            return Some(Some(f));
        }
        (dev_oks(&dst.serial).len() >= DEST_DEV_PASSES).then_some(None)
    })
    .unwrap_or_else(|| {
        panic!(
            "[dst] fewer than {DEST_DEV_PASSES} 'dev <n> ok' lines after the migration:\n{}\nstderr:\n{}",
            dst.serial.tail(10),
            dst.stderr()
        )
    })
}

fn dma_migration(devices: usize, connections: u32) {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start(devices, "");
    let before = dev_oks(&src.serial);
    let m = migrate(&mut src, &dst, send_params(0, connections));
    m.check_completed();
    // The source merged the devices' DMA logs into its dirty pages.
    if let Some(s) = &m.source_status {
        assert!(
            s["dma_dirty_pages"].as_u64().unwrap_or(0) > 0,
            "[src] no DMA-dirtied pages reported: {s}"
        );
    }
    if let Some(f) = wait_dest_checks(&dst) {
        panic!(
            "[dst] the witness failed after the migration: {f}\n{}",
            dst.serial.tail(10)
        );
    }
    // The witness goes on where it was: the pass numbers run on, and the
    // devices' SEQ sum keeps growing (the engines run again).
    check_guest_moved(&[&src.serial], &dst);
    let after = dev_oks(&dst.serial);
    let (last_pass, last_seq) = dev_oks(&src.serial).last().copied().unwrap_or((0, 0));
    let (first_pass, first_seq) = after[0];
    assert!(
        first_pass > last_pass && first_seq > last_seq,
        "device checks after the migration ({after:?}) do not follow those before ({before:?})"
    );
    assert_eq!(failure(&dst.serial), None, "[dst]");
    eprintln!(
        "[dst] {devices} device(s) over {connections} connection(s): {} device checks after the switch-over",
        after.len()
    );
}

#[test]
fn dma_1_device_1_connection() {
    dma_migration(1, 1);
}

#[test]
fn dma_4_devices_4_connections() {
    dma_migration(4, 4);
}

#[test]
fn dma_4_devices_8_connections() {
    dma_migration(4, 8);
}

#[test]
fn dma_1_device_8_connections() {
    dma_migration(1, 8);
}

/// With the devices' DMA logging off (advertised, never recording), pages
/// they wrote after being sent are lost: the witness must see it.
#[test]
fn dma_log_off_is_caught_by_the_witness() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start(1, ",dma-log=off");
    let m = migrate(&mut src, &dst, send_params(0, 4));
    m.check_completed();
    let line = poll(LONG * 2, || {
        dst.serial
            .lines()
            .into_iter()
            .find(|l| l.contains("stamp: DMA MISMATCH"))
    })
    .unwrap_or_else(|| {
        panic!(
            "[dst] no 'stamp: DMA MISMATCH' with dma-log=off:\n{}",
            dst.serial.tail(10)
        )
    });
    assert!(
        !dst.serial.text().contains("WARNING ring too short"),
        "[dst] the witness is blind:\n{}",
        dst.serial.tail(10)
    );
    eprintln!("[dst] the witness caught the untracked DMA: {line}");
}

/// A device that cannot log its DMA (`dma-log=none`) is refused with an
/// error that names it and the way out; with `allow_untracked_dma` the
/// migration re-sends all populated RAM after the devices stopped, and
/// the witness finds every page.
#[test]
fn untracked_dma_refused_unless_allowed() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start(1, ",dma-log=none");
    // Refused before any connection is made: no receiver is needed.
    let params = send_params(free_tcp_port(), 2);
    let (st, v) = src.api("PUT", "vm.send-migration", Some(params));
    let error = if ok(st) {
        let s = expect_migration_end(&src, &["failed"], LONG);
        s["error"].to_string()
    } else {
        v.to_string()
    };
    assert!(
        error.contains("d0") && error.contains("allow_untracked_dma"),
        "[src] the refusal does not name the device and allow_untracked_dma: {error}"
    );
    eprintln!("[src] refused as expected: {error}");
    assert_eq!(
        src.state(),
        "running",
        "[src] the guest runs on after the refusal"
    );

    let mut params = send_params(0, 4);
    params["allow_untracked_dma"] = json!(true);
    let m = migrate(&mut src, &dst, params);
    m.check_completed();
    if let Some(f) = wait_dest_checks(&dst) {
        panic!(
            "[dst] the witness failed after a migration with allow_untracked_dma: {f}\n{}",
            dst.serial.tail(10)
        );
    }
    check_guest_moved(&[&src.serial], &dst);
}
