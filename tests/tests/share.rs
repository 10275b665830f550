//! Host bandwidth shared between concurrent migrations (issue #10 part 6),
//! `connections: "auto"` (part 7), and the two-namespace test bed.
//!
//! Every migration is witnessed by the stamp guest: it runs on at the
//! destination with its passes numbered on and no MISMATCH.

use std::time::Duration;

use ferry_tests::*;

/// The guest: a 32 MiB region rewritten forever.
const GUEST: &str = "region=32 passes=0";
/// The host budget of the concurrent test, MiB/s.
const HOST_MAX: f64 = 64.0;

/// The share and the two host counts a source reports.
fn share_of(s: &Value) -> (Option<f64>, Option<u64>, Option<u64>) {
    (
        s["bandwidth_share_mib_s"].as_f64(),
        s["host_migrations"]["source"].as_u64(),
        s["host_migrations"]["destination"].as_u64(),
    )
}

/// Two migrations at once between two source and two destination VMMs
/// that share one registry and a 64 MiB/s host budget: while both run,
/// each reports two migrations on each host and a share of 32 MiB/s; both
/// complete and the guests run on.
///
/// Both start capped at 1 MiB/s (`max_bandwidth_mib_s`, which applies
/// below the share), so that they surely overlap while the shares are read;
/// the cap is then lifted and they finish at their share.
#[test]
fn concurrent_migrations_share_the_host_bandwidth() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let reg = TempDir::new("registry");
    let reg_s = reg.path().to_str().unwrap().to_string();
    let max = HOST_MAX.to_string();
    let host_args: Vec<&str> = vec![
        "--migration-registry",
        &reg_s,
        "--host-migration-bandwidth-mib-s",
        &max,
    ];
    let mut srcs = [
        Vmm::boot("src1", GUEST, &host_args),
        Vmm::boot("src2", GUEST, &host_args),
    ];
    for s in &srcs {
        s.wait_pass(2);
    }
    let dsts = [
        Vmm::destination("dst1", &host_args),
        Vmm::destination("dst2", &host_args),
    ];
    let mut recvs = Vec::new();
    for (i, (s, d)) in srcs.iter().zip(&dsts).enumerate() {
        let port = free_tcp_port();
        recvs.push(start_receive(d, port));
        let mut p = send_params(port, 2);
        p["max_bandwidth_mib_s"] = json!(1);
        if i == 0 {
            p["connections"] = json!("auto");
        }
        start_send(s, p);
    }

    // Both run: each sees 2 + 2 migrations and half of the budget.
    let mut seen = [None, None];
    let all = poll(LONG, || {
        for (i, s) in srcs.iter().enumerate() {
            let st = s.migration_status()?;
            assert_eq!(mig_state(&st), "active", "[{}] {}", s.name, st);
            if share_of(&st) == (Some(HOST_MAX / 2.0), Some(2), Some(2)) {
                seen[i] = Some(st);
            }
        }
        seen.iter().all(Option::is_some).then_some(())
    });
    assert!(
        all.is_some(),
        "the shares never read half of {HOST_MAX} with 2 + 2 migrations: {:?} / {:?}",
        srcs[0].migration_status().map(|s| share_of(&s)),
        srcs[1].migration_status().map(|s| share_of(&s)),
    );
    for d in &dsts {
        let st = d.migration_status().expect("destination status");
        assert_eq!(
            st["host_migrations"]["destination"].as_u64(),
            Some(2),
            "[{}] {st}",
            d.name
        );
    }
    // connections "auto" over loopback: lo has no speed, the vCPU count
    // (1) decides, and the status says so.
    let st = seen[0].take().unwrap();
    let why = st["connections_reason"].as_str().unwrap_or("");
    assert!(
        why.starts_with("auto:") && why.contains("lo") && why.contains("unknown"),
        "{st}"
    );
    assert_eq!(st["connections"], 1, "{st}");
    let st = seen[1].take().unwrap();
    assert_eq!(st["connections_reason"], "requested: 2", "{st}");
    eprintln!(
        "both migrations read a share of {} MiB/s with 2 + 2 migrations",
        HOST_MAX / 2.0
    );

    // Lift the caps: both finish at their share.
    for s in &srcs {
        s.api_ok(
            "PUT",
            "vm.migration-set-parameters",
            Some(json!({ "max_bandwidth_mib_s": 0 })),
        );
    }
    let [s1, s2] = &mut srcs;
    let mut recvs = recvs.into_iter();
    for (s, d) in [(s1, &dsts[0]), (s2, &dsts[1])] {
        finish_migration(s, d, recvs.next()).check_completed();
        check_guest_moved(&[&s.serial], d);
    }
    // Nothing is left in the registry.
    let left: Vec<_> = std::fs::read_dir(reg.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(left.is_empty(), "registry entries left: {left:?}");
}

/// One migration between two network namespaces over a veth link shaped
/// to 1 Gbit/s, with `connections: "auto"` (the veth is the outgoing
/// interface the status names).
#[test]
fn migration_over_a_shaped_link_between_namespaces() {
    skip_unless_kvm!();
    if skip_unless_netns() {
        return;
    }
    let _g = serial_guard();
    let net = NetPair::new("1gbit").expect("network namespaces");
    let reg = TempDir::new("registry");
    let reg_s = reg.path().to_str().unwrap().to_string();
    let guest = stamp_guest().to_str().unwrap().to_string();
    let mut src = Vmm::spawn_netns(
        "src",
        &net.src_ns,
        &net.src_ip,
        &[
            "--kernel",
            &guest,
            "--cmdline",
            GUEST,
            "--migration-registry",
            &reg_s,
        ],
    );
    src.wait_api();
    src.wait_pass(2);
    let dst = Vmm::spawn_netns(
        "dst",
        &net.dst_ns,
        &net.dst_ip,
        &["--migration-registry", &reg_s],
    );
    dst.wait_api();
    let mut p = send_params(0, 1);
    p["connections"] = json!("auto");
    let m = migrate(&mut src, &dst, p);
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);
    if let Some(s) = &m.source_status {
        let why = s["connections_reason"].as_str().unwrap_or("");
        assert!(why.starts_with("auto: link fy"), "{s}");
        assert_eq!(s["host_migrations"]["source"], 1, "{s}");
    }
    eprintln!(
        "migrated {} -> {} over {}: {}",
        net.src_ip, net.dst_ip, net.rate, m.dest_status["throughput_bps"]
    );
    drop(dst);
    drop(src);
    drop(net);
    std::thread::sleep(Duration::from_millis(10));
}
