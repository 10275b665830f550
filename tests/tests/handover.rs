//! Local migration over `unix:PATH` (issue #13 §3): the memory handover of
//! shareable RAM (`shared=on`, `file=`: the memory file descriptors move
//! with SCM_RIGHTS, no page is copied), the copy of anonymous RAM over
//! UNIX connections, an older protocol version received, and a refused
//! handover that leaves the source running.
//!
//! Every migration is witnessed by the stamp guest: it runs on at the
//! destination with its passes numbered on and no MISMATCH.

use std::fs;

use ferry_tests::*;

/// A 32 MiB region rewritten forever.
const GUEST: &str = "region=32 passes=0";

/// What a completed handover reports on the source: the guest's RAM, none
/// of it sent as pages.
fn check_handover_status(s: &Value) {
    assert_eq!(mig_state(s), "completed", "{s}");
    assert_eq!(s["transport"], "unix", "{s}");
    assert_eq!(s["memory_handover"], true, "{s}");
    assert_eq!(s["normal_pages"], 0, "RAM pages were copied: {s}");
    assert!(s["total_bytes"].as_u64().unwrap_or(0) >= 512 << 20, "{s}");
    assert!(s["downtime_ms"].is_number(), "{s}");
}

fn handover(mem: &str) {
    let src_args = ["--memory", mem];
    let (mut src, dst) = start_pair(GUEST, &src_args, 2);
    let m = migrate_unix(&mut src, &dst, send_params(0, 2));
    if let Some(s) = &m.source_status {
        check_handover_status(s);
    }
    check_handover_status(&m.dest_status);
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn unix_handover_of_shared_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    handover("size=512M,shared=on");
}

#[test]
fn unix_handover_of_file_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("handover-file");
    let file = dir.join("guest.mem");
    fs::File::create(&file).unwrap().set_len(512 << 20).unwrap();
    handover(&format!("size=512M,file={}", file.display()));
    assert!(file.exists(), "the memory file must not be removed");
}

/// A destination started with the guest's memory (`--memory`, as a live
/// upgrade starts the new binary with the guest's configuration) has its
/// KVM VM and memory slots made before the migration: the handed-over
/// memory is mapped over that RAM, in place, and the guest runs on the
/// source's memory there, not on the destination's own.
#[test]
fn unix_handover_into_a_destination_prepared_with_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mem = "size=512M,shared=on";
    let mut src = Vmm::boot("src", GUEST, &["--memory", mem]);
    src.wait_pass(2);
    let dst = Vmm::destination("dst", &["--memory", mem]);
    let m = migrate_unix(&mut src, &dst, send_params(0, 2));
    if let Some(s) = &m.source_status {
        check_handover_status(s);
    }
    check_handover_status(&m.dest_status);
    check_guest_moved(&[&src.serial], &dst);
}

#[test]
fn unix_copy_of_anonymous_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &[], 2);
    let m = migrate_unix(&mut src, &dst, send_params(0, 2));
    let s = m.source_status.as_ref().unwrap_or(&m.dest_status);
    assert!(
        s["normal_pages"].as_u64().unwrap_or(0) > 0,
        "anonymous RAM must be copied: {s}"
    );
    assert_eq!(s["transport"], "unix", "{s}");
    assert!(s["memory_handover"].is_null(), "{s}");
    check_guest_moved(&[&src.serial], &dst);
}

/// A source announcing the previous protocol version (as an older `ferry`
/// does) is received; shared memory then moves by copy (no handover
/// below version 4).
#[test]
fn unix_migration_from_an_older_protocol_version() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let (mut src, dst) = start_pair(GUEST, &["--memory", "size=512M,shared=on"], 2);
    let mut p = send_params(0, 2);
    p["protocol_version"] = json!(migration::wire::VERSION - 1);
    let m = migrate_unix(&mut src, &dst, p);
    assert!(
        m.dest_status["normal_pages"].as_u64().unwrap_or(0) > 0,
        "{}",
        m.dest_status
    );
    assert!(
        m.dest_status["memory_handover"].is_null(),
        "{}",
        m.dest_status
    );
    check_guest_moved(&[&src.serial], &dst);
}

/// The destination refuses the handed-over guest (its memory size
/// differs): the source resumes, its guest runs on without a MISMATCH,
/// and a second handover to a fitting destination then succeeds.
#[test]
fn a_refused_unix_handover_leaves_the_source_running() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut src = Vmm::boot("src", GUEST, &["--memory", "size=512M,shared=on"]);
    src.wait_pass(2);
    let bad = Vmm::destination("bad", &["--memory", "size=256M"]);
    let path = unix_sock_of(&bad);
    let _recv = start_receive_unix(&bad, &path);
    let mut p = send_params(0, 1);
    p["destination_url"] = json!(format!("unix:{}", path.display()));
    start_send(&src, p);
    let s = expect_migration_end(&src, &["failed"], LONG);
    assert!(
        s["error"].as_str().unwrap_or("").contains("memory size"),
        "{s}"
    );
    assert_guest_runs(&src, 2);
    let dst = Vmm::destination("dst", &[]);
    let m = migrate_unix(&mut src, &dst, send_params(0, 1));
    if let Some(s) = &m.source_status {
        check_handover_status(s);
    }
    check_guest_moved(&[&src.serial], &dst);
}

/// Bad `unix:` URLs are refused at the request with a reason.
#[test]
fn bad_unix_urls_are_refused_at_the_request() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let src = Vmm::boot("src", GUEST, &[]);
    let long = format!("unix:/{}", "a".repeat(120));
    for (url, why) in [
        ("unix:", "empty"),
        (long.as_str(), "at most 107"),
        ("unix:@abstract", "abstract"),
    ] {
        let mut p = send_params(0, 1);
        p["destination_url"] = json!(url);
        let (st, v) = src.api("PUT", "vm.send-migration", Some(p));
        assert!(!ok(st), "{url} accepted: {v}");
        assert!(v.to_string().contains(why), "{url}: {v}");
    }
    let dst = Vmm::destination("dst", &[]);
    let (st, v) = dst.api(
        "PUT",
        "vm.receive-migration",
        Some(json!({ "receiver_url": long })),
    );
    assert!(!ok(st) && v.to_string().contains("at most 107"), "{v}");
}

/// A destination started with `--memory file=P` receives a guest, then
/// hands it over by `unix:` to a newer process, which runs it on P. Asked
/// to receive again, the first process must not open P anew (receiving
/// clears the memory first): the receive fails with the reason, and the
/// guest in the newer process runs on without a MISMATCH.
#[test]
fn a_handed_over_memory_file_is_never_received_into_again() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("handover-again");
    let file = dir.join("guest.mem");
    fs::File::create(&file).unwrap().set_len(512 << 20).unwrap();
    let mem = format!("size=512M,file={}", file.display());
    let mut src = Vmm::boot("src", GUEST, &["--memory", "size=512M"]);
    src.wait_pass(2);
    let a = Vmm::destination("a", &["--memory", &mem]);
    migrate(&mut src, &a, send_params(0, 2)).check_completed();
    // A hands the guest over to C and stays up.
    let c = Vmm::destination("c", &[]);
    let path = unix_sock_of(&c);
    let _recv = start_receive_unix(&c, &path);
    let mut p = send_params(0, 1);
    p["destination_url"] = json!(format!("unix:{}", path.display()));
    start_send(&a, p);
    let s = expect_migration_end(&a, &["completed"], LONG);
    assert_eq!(s["memory_handover"], true, "{s}");
    assert_guest_runs(&c, 1);
    let (st, v) = a.api("PUT", "vm.shutdown", None);
    assert!(ok(st), "vm.shutdown on the handed-over source: {v}");
    // A second guest is offered to A: refused, P untouched.
    let src2 = Vmm::boot("src2", GUEST, &["--memory", "size=512M"]);
    src2.wait_pass(1);
    let port = free_tcp_port();
    let _recv = start_receive(&a, port);
    let mut p = send_params(0, 1);
    p["destination_url"] = json!(tcp_url_of(&a, port));
    start_send(&src2, p);
    let s = expect_migration_end(&src2, &["failed"], LONG);
    assert!(
        s["error"].as_str().unwrap_or("").contains("handed over"),
        "{s}"
    );
    assert_guest_runs(&src2, 1);
    assert_guest_runs(&c, 2);
}
