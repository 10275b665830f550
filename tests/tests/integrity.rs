//! No silent corruption (issue #9), each case witnessed by the stamp guest:
//!
//! - `timer=1`: the guest's LAPIC timer, in TSC-deadline mode and re-armed by
//!   its interrupt handler, keeps ticking on the destination (an armed
//!   deadline lost on restore stops it for good);
//! - `zero-check=1`: after every pass the guest samples every RAM page it
//!   never writes, which must read zero (`stamp: NONZERO page=..` otherwise),
//!   also on a destination whose memory file held old bytes or whose
//!   pre-provisioned memory was used by a cancelled attempt.
//!
//! No timing is asserted: the tests count lines, with generous bounds.

use std::fs;
use std::path::Path;

use ferry_tests::*;

/// Guest RAM of these tests: small, so that a zero-check sweep is quick.
const MEM: u64 = 64 << 20;

/// The zero-check guest: an 8 MiB region rewritten forever, everything
/// else checked for zeros after every pass.
const ZERO_GUEST: &str = "region=8 passes=0 zero-check=1";

/// Waits until `vm`'s guest printed `n` tick lines with counts above
/// `above`; returns those counts.
fn wait_ticks_above(vm: &Vmm, above: u64, n: usize) -> Vec<u64> {
    poll(LONG, || {
        let t: Vec<u64> = vm.serial.ticks().into_iter().filter(|&t| t > above).collect();
        (t.len() >= n).then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "[{}] fewer than {} `stamp: ticks` lines above {} within {:?} (the timer stopped?); serial:\n{}",
            vm.name,
            n,
            above,
            LONG,
            vm.serial.tail(10)
        )
    })
}

/// Waits until `vm`'s guest completed `n` more zero-check sweeps than it
/// has now; fails at once on a NONZERO line.
fn wait_more_zero_checks(vm: &Vmm, n: usize) {
    let now = vm.serial.zero_checks().len();
    poll(LONG, || {
        if let Some(l) = vm.serial.nonzero() {
            panic!(
                "[{}] a page the guest never wrote holds data: {}\nserial:\n{}",
                vm.name,
                l,
                vm.serial.tail(10)
            );
        }
        (vm.serial.zero_checks().len() >= now + n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "[{}] fewer than {} more zero-check sweeps within {:?}; serial:\n{}",
            vm.name,
            n,
            LONG,
            vm.serial.tail(10)
        )
    });
}

/// Writes `size` bytes of 0xa5 (no byte is zero) to `path`.
fn garbage_file(path: &Path, size: u64) {
    fs::write(path, vec![0xa5u8; size as usize]).expect("write the garbage file");
}

fn memory_arg(size: u64, extra: &str) -> String {
    format!("size={}M{}", size >> 20, extra)
}

/// A source booting the zero-check guest with `memory` and waiting for its
/// first sweeps, and a destination with `dst_memory`.
fn start_zero_pair(memory: &str, dst_memory: &str) -> (Vmm, Vmm) {
    let src = Vmm::boot("src", ZERO_GUEST, &["--memory", memory]);
    src.wait_pass(1);
    wait_more_zero_checks(&src, 1);
    let dst = Vmm::destination("dst", &["--memory", dst_memory]);
    (src, dst)
}

/// After a completed live migration: the guest runs on at `dst`, sweeps
/// clean at least twice more there and its whole output is one clean stream.
fn check_zero_guest_moved(src: &Vmm, dst: &Vmm) {
    wait_more_zero_checks(dst, 2);
    check_guest_moved(&[&src.serial], dst);
    let sweeps = dst.serial.zero_checks();
    eprintln!(
        "[{}] zero-check sweeps on the destination: {:?}",
        dst.name, sweeps
    );
}

#[test]
fn timer_ticks_go_on_after_migration() {
    skip_unless_kvm!();
    let _g = serial_guard();
    // region=0: the guest idles in hlt; only its timer interrupt wakes it.
    let mut src = Vmm::boot(
        "src",
        "region=0 timer=1",
        &["--memory", &memory_arg(MEM, "")],
    );
    wait_ticks_above(&src, 0, 2);
    let dst = Vmm::destination("dst", &[]);
    migrate(&mut src, &dst, send_params(0, 2)).check_completed();
    assert_eq!(dst.state(), "running", "destination VM state");
    let last = src.serial.ticks().last().copied().unwrap_or(0);
    let after = wait_ticks_above(&dst, last, 3);
    // One stream: counts strictly increasing across the move.
    check_stream(&[&src.serial, &dst.serial]);
    assert_eq!(dst.serial.boot(), None, "the guest rebooted");
    eprintln!(
        "[dst] ticks went on: source's last {}, destination {:?}",
        last, after
    );
}

/// Compares two memory files page by page; panics naming the differing
/// pages.
fn assert_same_memory(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    assert_eq!(x.len(), y.len(), "memory file sizes");
    let differing: Vec<usize> = x
        .chunks(4096)
        .zip(y.chunks(4096))
        .enumerate()
        .filter(|(_, (p, q))| p != q)
        .map(|(i, _)| i)
        .collect();
    assert!(
        differing.is_empty(),
        "{} of {} pages differ between the source's and the destination's memory (first: {:?})",
        differing.len(),
        x.len() / 4096,
        &differing[..differing.len().min(8)]
    );
}

#[test]
fn dirty_memory_file_ends_identical_and_reads_zero() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("zero");
    let (src_file, dst_file) = (dir.join("src.ram"), dir.join("dst.ram"));
    fs::File::create(&src_file)
        .and_then(|f| f.set_len(MEM))
        .expect("create the source's memory file");
    garbage_file(&dst_file, MEM);
    let (mut src, dst) = start_zero_pair(
        &memory_arg(MEM, &format!(",file={}", src_file.display())),
        &memory_arg(MEM, &format!(",file={}", dst_file.display())),
    );
    // Paused, the source's memory stops changing: the destination's, which
    // arrives paused, must end byte-identical to it.
    src.api_ok("PUT", "vm.pause", None);
    migrate(&mut src, &dst, send_params(0, 2)).check_completed();
    assert_eq!(dst.state(), "paused", "destination VM state");
    assert_same_memory(&src_file, &dst_file);
    dst.api_ok("PUT", "vm.resume", None);
    check_zero_guest_moved(&src, &dst);
}

#[test]
fn dirty_provisioned_memory_reads_zero() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("zero");
    let dst_file = dir.join("dst.ram");
    garbage_file(&dst_file, MEM);
    // prefault=on: the destination maps and faults its memory in at start.
    let (mut src, dst) = start_zero_pair(
        &memory_arg(MEM, ""),
        &memory_arg(MEM, &format!(",file={},prefault=on", dst_file.display())),
    );
    migrate(&mut src, &dst, send_params(0, 2)).check_completed();
    check_zero_guest_moved(&src, &dst);
}

#[test]
fn provisioned_memory_reused_after_a_cancelled_attempt_reads_zero() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mem = 2 * MEM;
    let dir = TempDir::new("zero");
    let dst_file = dir.join("dst.ram");
    garbage_file(&dst_file, mem);
    let src = Vmm::boot(
        "src",
        "region=64 passes=0 zero-check=1",
        &["--memory", &memory_arg(mem, "")],
    );
    src.wait_pass(1);
    let dst = Vmm::destination(
        "dst",
        &[
            "--memory",
            &memory_arg(mem, &format!(",file={},prefault=on", dst_file.display())),
        ],
    );
    let mut src = src;
    // Attempt 1, slow enough to be cancelled while RAM moves.
    let port = free_tcp_port();
    let _recv = start_receive(&dst, port);
    let mut slow = send_params(port, 2);
    slow["max_bandwidth_mbps"] = json!(4);
    start_send(&src, slow);
    wait_transfer_started(&src);
    // Some MiB of guest RAM are in the destination's memory by now.
    poll(LONG, || {
        let s = src.migration_status()?;
        (s["transferred_bytes"].as_u64().unwrap_or(0) > 2 << 20 || mig_state(&s) != "active")
            .then_some(())
    });
    src.api_ok("PUT", "vm.migration-cancel", None);
    expect_migration_end(&src, &["cancelled"], LONG);
    wait_migration_state(&dst, &["failed", "cancelled"], LONG);
    // Attempt 2 reuses the destination's memory.
    migrate(&mut src, &dst, send_params(0, 2)).check_completed();
    check_zero_guest_moved(&src, &dst);
}

/// Migrates `src` to `dst` over 2 connections capped at 64 MiB/s, so that
/// the passes last while the guest writes; the generous downtime lets the
/// migration end soon after (nothing here is timed). Checks that it
/// completed and that the guest moved with no MISMATCH; returns the
/// source's final status (the destination's if the source's was missed).
fn migrate_capped(src: &mut Vmm, dst: &Vmm) -> Value {
    let mut p = send_params(0, 2);
    p["max_bandwidth_mib_s"] = json!(64);
    p["downtime_ms"] = json!(10_000);
    let m = migrate(src, dst, p);
    m.check_completed();
    check_guest_moved(&[&src.serial], dst);
    m.source_status.unwrap_or(m.dest_status)
}

/// Memory the guest populates while it migrates arrives: the send starts
/// during the guest's first pass over a 256 MiB region, so pages are
/// touched for the first time during every pass of the migration. The
/// source tracks such pages without having write-protected them (KVM's
/// dirty log starts all set, and a page nobody cleared is found because
/// it is populated); a page missed here reads as zero on the destination,
/// and the guest's next pass reports it as a MISMATCH.
#[test]
fn memory_populated_during_the_migration_arrives() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = Vmm::boot("src", "region=256 passes=0", &["--memory", "size=512M"]);
    src.serial
        .wait_for_line(LONG, |l| l.starts_with("stamp: boot"))
        .unwrap_or_else(|| panic!("no boot line: {}", src.serial.tail(3)));
    let dst = Vmm::destination("dst", &[]);
    assert!(
        src.serial.passes().is_empty(),
        "the guest finished its first pass before the send"
    );
    // Capped, the passes last long enough for the guest to touch tens of
    // MiB it never touched before (it touches ~180 MiB/s).
    let s = migrate_capped(&mut src, &dst);
    assert!(
        s["transferred_bytes"].as_u64().unwrap_or(0) > 16 << 20,
        "the guest populated too little during the migration: {s}"
    );
}

/// Memory above 4 GiB migrates: with `high=1` the guest's region lies past
/// the 32-bit gap, in the VM's second KVM memory slot. The send starts after
/// the guest's first pass, so the whole region is populated and armed at
/// once, and the guest rewrites it while the passes run: only KVM's dirty
/// log of that slot tells which pages changed (its fetch is skipped only
/// while nothing in the slot is armed). A rewrite the source missed reads
/// stale on the destination, and the guest's next pass reports it as a
/// MISMATCH.
#[test]
fn memory_above_4_gib_migrates() {
    skip_unless_kvm!();
    let _g = serial_guard();
    // 3 GiB below the gap and 256 MiB above it (at 4 GiB).
    let mut src = Vmm::boot(
        "src",
        "high=1 region=192 passes=0",
        &["--memory", "size=3328M"],
    );
    src.serial
        .wait_for_line(LONG, |l| l.trim() == "stamp: region at 100000000")
        .unwrap_or_else(|| panic!("the region is not at 4 GiB: {}", src.serial.tail(3)));
    src.serial
        .wait_for_line(LONG, |l| l.starts_with("stamp: pass 1 ok"))
        .unwrap_or_else(|| panic!("no first pass: {}", src.serial.tail(3)));
    let dst = Vmm::destination("dst", &[]);
    // Capped, so that the guest rewrites the region while pass 1 runs.
    let s = migrate_capped(&mut src, &dst);
    assert!(
        s["transferred_bytes"].as_u64().unwrap_or(0) > 192 << 20,
        "less than the region moved: {s}"
    );
}
