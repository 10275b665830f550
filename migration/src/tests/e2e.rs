//! End-to-end migrations over loopback with the fakes.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::*;
use crate::api::*;

const MIB: u64 = 1 << 20;

fn two_regions() -> FakeSource {
    FakeSource::new(&[(0, 24 * MIB), (4 << 30, 8 * MIB)])
}

fn migrate(
    src: Arc<FakeSource>,
    p: &mut SendParams,
) -> (
    Result<(), MigrationError>,
    RecvResult,
    Finished,
    Arc<MigrationStats>,
) {
    let f = FakeFactory::new(src.layout());
    migrate_with(src, f, p)
}

#[test]
fn full_migration_1_4_8_connections() {
    for n in [1u32, 4, 8] {
        let src = Arc::new(two_regions());
        fill(&src, 0, n as u8, 2); // every other page populated
        fill(&src, 1, 9, 5);
        let mut p = params(0, n);
        let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
        r.unwrap();
        rr.unwrap();
        let d = dest.factory.last();
        assert_eq!(
            d.restored.lock().unwrap().as_deref(),
            Some(&src.state_blob[..])
        );
        assert_eq!(*d.started.lock().unwrap(), Some(false));
        assert!(!d.discarded.load(SeqCst));
        // Pages never written on the source were never touched here.
        let res = d.regions[0].1.resident(0, (24 * MIB) as usize);
        for (pg, resident) in res.iter().enumerate() {
            if pg % 2 == 1 || pg % 7 == 3 {
                assert!(!resident, "page {pg} of region 0 was touched (n={n})");
            }
        }
        assert_same_ram(&src, &d); // reads (maps) every page: after mincore
        let s = stats.snapshot();
        assert_eq!(s.state, MigrationState::Completed);
        assert!(s.zero_pages > 0);
        assert!(s.normal_pages > 0);
        assert_eq!(s.page_size_bytes, 4096);
        assert_eq!(s.remaining_bytes, 0);
        assert!(s.precopy_bytes > 0 && s.dirty_sync_count >= 2, "{s:?}");
        assert!(
            s.downtime_bytes > 0,
            "the final pass and the VM state: {s:?}"
        );
        assert!(s.peer_address.is_some());
        assert_eq!(s.throughput_bps, s.throughput_bytes_per_s);
        assert!(
            s.throughput_bytes_per_s > 0 && s.pages_per_s > 0,
            "averages: {s:?}"
        );
        assert!(s.downtime_ms.is_some() && s.total_time_ms.is_some() && s.setup_time_ms.is_some());
        assert_eq!(s.total_bytes, 32 * MIB);
        let ds = dest.stats.snapshot();
        assert_eq!(ds.state, MigrationState::Completed);
        assert_eq!(ds.role.as_deref(), Some("destination"));
        assert_eq!(ds.normal_pages, s.normal_pages);
        assert_eq!(ds.zero_pages, s.zero_pages);
        assert!(ds.peer_address.is_some());
        assert_eq!((ds.precopy_bytes, ds.downtime_bytes), (0, 0), "n/a");
        assert!(src.paused.load(SeqCst), "source stays paused after success");
        assert_eq!(src.stop_log_calls.load(SeqCst), 1);
        assert_eq!(src.resumes.load(SeqCst), 0);
        // JSON shape the API returns.
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["state"], "completed");
    }
}

#[test]
fn multi_pass_last_writer_wins() {
    for manual in [false, true] {
        let mut s = two_regions();
        s.manual = manual;
        let src = Arc::new(s);
        fill(&src, 0, 1, 1);
        // Between passes, rewrite overlapping page sets with the fetch number
        // so that every page has copies in several passes; zero some pages
        // that were written before (the destination must zero them too).
        src.set_hook(|s, n| {
            if n <= 8 {
                for p in (0..6144u64).step_by(3 + n as usize % 3) {
                    s.write(0, p * 4096, &pattern(n as u8 * 17, 4096));
                }
                for p in (0..2048u64).step_by(5) {
                    s.write(1, p * 4096 + 8, &[n as u8; 16]);
                }
                s.write(0, 42 * 4096, &[0u8; 4096]);
            }
        });
        let mut p = params(0, 8);
        p.downtime_ms = Some(0); // only converge once nothing is dirty
        let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
        r.unwrap();
        rr.unwrap();
        assert_same_ram(&src, &dest.factory.last());
        assert!(
            stats.snapshot().iteration >= 9,
            "passes: {}",
            stats.snapshot().iteration
        );
        if manual {
            assert!(!src.clears.lock().unwrap().is_empty());
        }
    }
}

#[test]
fn forced_switchover_when_not_converging() {
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 3, 1);
    src.set_hook(|s, n| s.write(0, (n % 1024) * 4096, &pattern(n as u8, 4096)));
    let mut p = params(0, 2);
    p.downtime_ms = Some(0);
    p.stall_limit_s = Some(1);
    let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let st = stats.snapshot();
    assert!(st.stalls >= 1, "{st:?}");
    assert_eq!(
        st.switchover_reason,
        Some(crate::live::SwitchoverReason::ForcedByPolicy)
    );
}

/// Regression: a paused (never dirtying) VM behind a slow bandwidth cap used
/// to count passes while pass 1 was still queued, never fit the estimate
/// (the queued backlog counted) and force a switch-over after
/// 30 passes with that backlog left to drain during the downtime. It must
/// switch over right after pass 1 reached the wire.
#[test]
fn paused_vm_with_bandwidth_cap_converges_after_first_pass() {
    let mut s = FakeSource::new(&[(0, 12 * MIB)]);
    s.user_paused = true;
    s.paused.store(true, SeqCst);
    let src = Arc::new(s);
    fill(&src, 0, 9, 1);
    let mut p = params(0, 1);
    p.max_bandwidth_mbps = Some(10.0);
    p.downtime_ms = Some(300);
    let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    assert_same_ram(&src, &dest.factory.last());
    let st = stats.snapshot();
    // Pass 1 (all memory), then the final pass (nothing dirty).
    assert!(st.iteration <= 3, "took {} passes", st.iteration);
    assert!(
        st.expected_downtime_ms <= p.downtime_ms.unwrap_or(300),
        "switch-over was forced (estimate {} ms)",
        st.expected_downtime_ms
    );
    // The destination reports a live receive throughput (~1 s of transfer).
    let ds = dest.stats.snapshot();
    assert_eq!(ds.role.as_deref(), Some("destination"));
    assert!(ds.throughput_bps > 0, "destination throughput not measured");
}

#[test]
fn user_paused_vm_starts_paused_and_bandwidth_cap() {
    let mut s = FakeSource::new(&[(0, 4 * MIB)]);
    s.user_paused = true;
    let src = Arc::new(s);
    fill(&src, 0, 5, 1);
    let mut p = params(0, 3);
    p.max_bandwidth_mbps = Some(200.0);
    let (r, rr, dest, _) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    let d = dest.factory.last();
    assert_same_ram(&src, &d);
    assert_eq!(*d.started.lock().unwrap(), Some(true));
}

#[test]
fn untouched_16g_guest() {
    let src = Arc::new(FakeSource::new(&[(0, 3 << 30), (4 << 30, 13 << 30)]));
    src.write(0, 0, &pattern(1, 8192));
    src.write(1, 5 << 30, &pattern(2, 4096));
    let mut p = params(0, 4);
    let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    let d = dest.factory.last();
    assert_eq!(d.regions[0].1.read(0, 8192), pattern(1, 8192));
    assert_eq!(d.regions[1].1.read(5 << 30, 4096), pattern(2, 4096));
    let resident: usize = d
        .regions
        .iter()
        .map(|r| r.1.resident(0, r.2 as usize).iter().filter(|&&x| x).count())
        .sum();
    assert!(resident < 64, "{resident} destination pages touched");
    assert!(stats.snapshot().transferred_bytes < MIB);
}

#[test]
fn params_are_validated() {
    let src: Arc<dyn SourceVm> = Arc::new(FakeSource::new(&[(0, MIB)]));
    let stats = Arc::new(MigrationStats::default());
    let c = CancelToken::default();
    for mutate in [
        (|p: &mut SendParams| p.connections = 0.into()) as fn(&mut SendParams),
        |p| p.connections = 65.into(),
        |p| p.destination_url = "unix:".into(),
        |p| p.max_bandwidth_mbps = Some(-1.0),
        |p| p.device_chunk_bytes = 1,
        |p| p.timeout_s = 0,
        |p| p.timeout_s = u64::MAX,
        |p| p.timeout_s = crate::api::MAX_TIMEOUT_S + 1,
    ] {
        let mut p = params(1, 4);
        mutate(&mut p);
        let e = send(src.clone(), &p, &stats, &c).unwrap_err();
        assert!(matches!(e, MigrationError::InvalidParams(_)), "{e}");
        assert_eq!(stats.snapshot().state, MigrationState::Failed);
    }
    let j: SendParams = serde_json::from_str(r#"{"destination_url":"tcp:127.0.0.1:1"}"#).unwrap();
    assert_eq!(
        (
            j.connections,
            j.downtime_ms,
            j.timeout_s,
            j.device_chunk_bytes
        ),
        (4.into(), None, 3600, 1 << 20)
    );
    assert!(serde_json::from_str::<SendParams>(r#"{"destination_url":"x","bogus":1}"#).is_err());
}

/// Pass 1 of a capped migration, sampled while it runs: `remaining_bytes`
/// starts at the populated size and counts down, the throughput is live.
#[test]
fn remaining_counts_down_during_pass_1() {
    let mut s = FakeSource::new(&[(0, 24 * MIB)]);
    s.user_paused = true;
    s.paused.store(true, SeqCst);
    let src = Arc::new(s);
    fill(&src, 0, 3, 1);
    let mut p = params(0, 1);
    p.max_bandwidth_mbps = Some(8.0);
    let dest = start_dest(FakeFactory::new(src.layout()));
    p.destination_url = format!("tcp:127.0.0.1:{}", dest.port);
    let stats = Arc::new(MigrationStats::default());
    let seen = stats.clone();
    let sampler = std::thread::spawn(move || {
        let mut v = Vec::new();
        loop {
            let s = seen.snapshot();
            if matches!(
                s.state,
                MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
            ) {
                return v;
            }
            if s.iteration == 1 && s.transferred_bytes > 0 {
                v.push(s);
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
    });
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    dest.handle.join().unwrap().unwrap();
    let v = sampler.join().unwrap();
    let rem: Vec<u64> = v.iter().map(|s| s.remaining_bytes).collect();
    assert!(v.len() >= 3, "{rem:?}");
    assert!(rem[0] <= 24 * MIB && rem[0] > 12 * MIB, "{rem:?}");
    assert!(rem.windows(2).all(|w| w[1] <= w[0]), "{rem:?}");
    assert!(
        rem.windows(3).any(|w| w[2] < w[1] && w[1] < w[0]),
        "{rem:?}"
    );
    let last = v.last().unwrap();
    assert!(
        last.throughput_bytes_per_s > 0 && last.pages_per_s > 0,
        "{last:?}"
    );
    assert!(last.peer_address.is_some());
}
