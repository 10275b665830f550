//! Post-copy end to end over loopback with the fakes: the switch (from the
//! start, by the policy, in the middle of a pass), a fake vCPU faulting on
//! missing pages while the background push runs, first copy wins.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::api::*;
use crate::recv::postcopy::PcDest;

const MIB: u64 = 1 << 20;

/// A fake vCPU on the destination: once the VM started, reads `pages`
/// (region, page) in order through the post-copy backend and returns what
/// it read.
pub(super) fn guest(f: Arc<FakeFactory>, pages: Vec<(usize, u64)>) -> JoinHandle<Vec<Vec<u8>>> {
    std::thread::spawn(move || {
        let start = Instant::now();
        let d = loop {
            let d = f.created.lock().unwrap().last().cloned();
            if let Some(d) = d {
                if d.started.lock().unwrap().is_some() {
                    break d;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "VM never started"
            );
            std::thread::sleep(Duration::from_millis(1));
        };
        let pc = d.pc.lock().unwrap().clone().expect("post-copy backend");
        pages
            .iter()
            .map(|&(r, p)| pc.guest_read(r, p).expect("page never arrived"))
            .collect()
    })
}

struct Run {
    send: Result<(), MigrationError>,
    recv: RecvResult,
    src_stats: Arc<MigrationStats>,
    dst_stats: Arc<MigrationStats>,
    factory: Arc<FakeFactory>,
    read: Vec<Vec<u8>>,
    events: Arc<EventLog>,
}

fn run(src: Arc<FakeSource>, mut p: SendParams, pages: Vec<(usize, u64)>, hooks: Hooks) -> Run {
    let dest = start_dest(factory_for_layout(&src));
    p.destination_url = format!("tcp:127.0.0.1:{}", dest.port);
    let g = guest(dest.factory.clone(), pages);
    let stats = Arc::new(MigrationStats::default());
    let send = send_with(src, &p, &stats, &CancelToken::default(), &hooks);
    let recv = dest.handle.join().unwrap();
    let read = g.join().unwrap();
    Run {
        send,
        recv,
        src_stats: stats,
        dst_stats: dest.stats,
        factory: dest.factory,
        read,
        events: hooks.events,
    }
}

pub(super) fn factory_for_layout(src: &FakeSource) -> FakeFactory {
    let f = FakeFactory::new(src.layout());
    *f.devices.lock().unwrap() = src
        .devices
        .iter()
        .map(|d| Arc::new(FakeDevice::new(&d.id, d.caps.pre_copy, vec![], vec![])))
        .collect();
    f
}

/// Every page the fake vCPU read equals the source's final copy.
pub(super) fn check_read(src: &FakeSource, pages: &[(usize, u64)], read: &[Vec<u8>]) {
    for (&(r, p), got) in pages.iter().zip(read) {
        let want = src.regions[r].1.read((p * 4096) as usize, 4096);
        assert!(
            &want == got,
            "page {p} of region {r} differs from the source's"
        );
    }
}

fn check_completed(r: &Run, reason: SwitchoverReason) {
    if let Err(e) = &r.send {
        panic!("send failed: {e}");
    }
    if let Err(e) = &r.recv {
        panic!("receive failed: {e}");
    }
    let s = r.src_stats.snapshot();
    assert_eq!(s.state, MigrationState::Completed, "{s:?}");
    assert_eq!(s.switchover_reason, Some(reason));
    assert_eq!(s.postcopy.as_deref(), Some("completed"));
    assert_eq!(s.source_vm, Some(SourceVmOutcome::Migrated));
    assert!(s.downtime_ms.is_some());
    let d = r.dst_stats.snapshot();
    assert_eq!(d.state, MigrationState::Completed, "{d:?}");
    assert_eq!(d.postcopy.as_deref(), Some("completed"));
    assert!(d.postcopy_bytes > 0, "{d:?}");
    let dst = r.factory.last();
    assert!(!dst.discarded.load(SeqCst));
    let pc = dst.pc.lock().unwrap().clone().unwrap();
    assert!(pc.ended.load(SeqCst), "RAM not unregistered at the end");
    let ev = r.events.read_after(0, Duration::ZERO);
    assert!(
        ev.lines.iter().any(|l| l.contains("\"postcopy-started\"")),
        "{:?}",
        ev.lines
    );
}

pub(super) fn every_page(src: &FakeSource, step: u64) -> Vec<(usize, u64)> {
    let mut v = Vec::new();
    for (r, reg) in src.regions.iter().enumerate() {
        let n = reg.2 / 4096;
        // From the middle on, then the start: not the push's order.
        for p in (n / 2..n).chain(0..n / 2).step_by(step as usize) {
            v.push((r, p));
        }
    }
    v
}

#[test]
fn postcopy_from_the_start() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB), (4 << 30, 4 * MIB)]));
    fill(&src, 0, 3, 2);
    fill(&src, 1, 5, 3);
    let mut p = params(0, 4);
    p.technique = Some(Technique::PostCopy);
    // The background push of the 20 MiB takes ~0.5 s at this cap, so the
    // fake vCPU's faults are served by requests, not only by the push.
    p.max_bandwidth_mib_s = Some(40.0);
    let pages = every_page(&src, 1);
    let r = run(src.clone(), p, pages.clone(), Hooks::default());
    check_completed(&r, SwitchoverReason::User);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
    let d = r.dst_stats.snapshot();
    // Nothing was pre-copied: every populated page was missing.
    assert!(d.postcopy_missing_pages >= 16 * 256 / 2, "{d:?}");
    assert!(d.postcopy_requests > 0, "{d:?}");
    assert!(d.postcopy_fault_latency_us_p50.is_some(), "{d:?}");
    assert!(d.postcopy_fault_latency_us_p99 >= d.postcopy_fault_latency_us_p50);
    let s = r.src_stats.snapshot();
    assert!(s.postcopy_fault_latency_us_p99.is_some(), "{s:?}");
    assert_eq!(s.iteration, 2, "pass 1 interrupted, then the final pass");
}

/// Post-copy with zero-copy: the background push goes with MSG_ZEROCOPY
/// too, and every send completed by the end.
#[test]
fn postcopy_with_zero_copy() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB)]));
    fill(&src, 0, 3, 1);
    let mut p = params(0, 4);
    p.technique = Some(Technique::PostCopy);
    p.zero_copy = true;
    let pages = every_page(&src, 3);
    let r = run(src.clone(), p, pages.clone(), Hooks::default());
    check_completed(&r, SwitchoverReason::User);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
    let s = r.src_stats.snapshot();
    let z = s.zero_copy.clone().expect("zero_copy in the status");
    assert_eq!(z.in_flight_bytes, 0, "{z:?}");
    assert_eq!(z.zero_copy_bytes + z.copied_bytes, z.sent_bytes, "{z:?}");
    assert!(z.sent_bytes > 0, "{z:?}");
}

#[test]
fn postcopy_policy_after_a_stall_with_stale_precopied_pages() {
    let src = Arc::new(FakeSource::new(&[(0, 8 * MIB)]));
    fill(&src, 0, 1, 1);
    // Keep rewriting a third of the pages: no progress, a stall, post-copy.
    src.set_hook(|s, n| {
        for p in (0..2048u64).step_by(3) {
            s.write(0, p * 4096, &pattern(n as u8, 4096));
        }
        s.write(0, 7 * 4096, &[0u8; 4096]);
    });
    let mut p = params(0, 2);
    p.policy = Some(Policy::PostCopy);
    p.stall_limit_s = Some(1);
    p.downtime_ms = Some(0);
    let pages = every_page(&src, 5);
    let r = run(src.clone(), p, pages.clone(), Hooks::default());
    check_completed(&r, SwitchoverReason::PostCopy);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
    let s = r.src_stats.snapshot();
    assert!(s.stalls >= 1 && s.iteration >= 3, "{s:?}");
    // Only the rewritten third was missing.
    let d = r.dst_stats.snapshot();
    assert!(d.postcopy_missing_pages <= 2048 / 3 + 2, "{d:?}");
}

#[test]
fn postcopy_switch_in_the_middle_of_a_slow_pass_with_a_device() {
    let mut s = FakeSource::new(&[(0, 24 * MIB)]);
    s.devices = vec![Arc::new(FakeDevice::new(
        "dev0",
        true,
        pattern(1, 10_000),
        pattern(2, 5_000),
    ))];
    let src = Arc::new(s);
    fill(&src, 0, 9, 1);
    let hooks = Hooks::default();
    let live = hooks.live.clone();
    let mut p = params(0, 2);
    p.max_bandwidth_mib_s = Some(8.0); // pass 1 would take 3 s
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        live.update(&ParametersUpdate {
            technique: Some(Technique::PostCopy),
            ..Default::default()
        })
        .unwrap();
    });
    let pages = every_page(&src, 7);
    let t0 = Instant::now();
    let r = run(src.clone(), p, pages.clone(), hooks);
    check_completed(&r, SwitchoverReason::User);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
    let dst = r.factory.last();
    assert_eq!(
        dst.devices[0].loaded.lock().unwrap().as_deref(),
        Some(&src.devices[0].produced.lock().unwrap()[..])
    );
    eprintln!("mid-pass post-copy took {:?}", t0.elapsed());
}

#[test]
fn main_mode_devices_and_post_copy() {
    let src = source_with_device();
    let mut p = params(0, 1);
    p.device_state = DeviceStateMode::Main;
    p.technique = Some(Technique::PostCopy);
    let pages = every_page(&src, 3);
    let r = run(src.clone(), p, pages.clone(), Hooks::default());
    check_completed(&r, SwitchoverReason::User);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
}

/// The first copy of a page wins: a page placed twice is counted once, and
/// the second copy is dropped.
#[test]
fn a_page_placed_twice_is_dropped_the_second_time() {
    let mem = AnonMem::new(1 << 20);
    let pc = Arc::new(pcfake::FakePostcopy::new(vec![(mem.addr(), 1 << 20)]));
    pc.register().unwrap();
    let stats = Arc::new(MigrationStats::default());
    let pcd = PcDest::new(
        pc.clone(),
        vec![(0, 1 << 20)],
        vec![vec![u64::MAX, 0, 0, 0]],
        stats,
        Arc::new(crate::net::Notify::default()),
    );
    let r = |first, n, zero| crate::wire::ResolvedRange {
        region: 0,
        first_page: first,
        npages: n,
        zero,
    };
    pcd.accept_all(&[r(0, 2, false)], &pattern(1, 8192))
        .unwrap();
    assert!(!pcd.complete());
    // Pages 1..3: page 1 again (dropped), 2 fresh.
    pcd.accept_all(&[r(1, 2, false)], &pattern(2, 8192))
        .unwrap();
    assert_eq!(pc.duplicates.load(SeqCst), 1);
    assert_eq!(mem.read(4096, 4096), pattern(1, 8192)[4096..].to_vec());
    pcd.accept_all(&[r(3, 61, true)], &[]).unwrap();
    assert!(pcd.complete());
}

/// A TCP forwarder from a local port to `to` whose connections can all be
/// cut at once.
struct Proxy {
    port: u16,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn new(to: u16) -> Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Arc::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { return };
                let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    return;
                };
                c.lock().unwrap().push(a.try_clone().unwrap());
                c.lock().unwrap().push(b.try_clone().unwrap());
                for (mut x, mut y) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut x, &mut y);
                        let _ = y.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, conns }
    }

    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A post-copy whose connections are cut halfway pauses on both sides: the
/// source stays paused (`postcopy_paused`), the destination keeps its
/// running VM and the fake vCPU waits; a send with `"resume": true`
/// reconnects and finishes, and the guest saw only the source's pages.
#[test]
fn a_cut_post_copy_pauses_and_resumes() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB)]));
    fill(&src, 0, 4, 1);
    let dest = start_dest(factory_for_layout(&src));
    let proxy = Proxy::new(dest.port);
    let pages = every_page(&src, 3);
    let g = guest(dest.factory.clone(), pages.clone());
    let hooks = Hooks::default();
    let mut p = params(proxy.port, 2);
    p.technique = Some(Technique::PostCopy);
    p.max_bandwidth_mib_s = Some(4.0); // the push takes ~4 s
    let dstats = dest.stats.clone();
    let cutter = {
        let conns = proxy.conns.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            while dstats.snapshot().postcopy.as_deref() != Some("active") {
                assert!(t.elapsed() < Duration::from_secs(30));
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(500));
            for s in conns.lock().unwrap().drain(..) {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        })
    };
    let stats = Arc::new(MigrationStats::default());
    let e = send_with(src.clone(), &p, &stats, &CancelToken::default(), &hooks).unwrap_err();
    cutter.join().unwrap();
    assert!(matches!(e, MigrationError::PostcopyPaused { .. }), "{e}");
    let s = stats.snapshot();
    assert_eq!(s.source_vm, Some(SourceVmOutcome::PostcopyPaused), "{s:?}");
    assert_eq!(s.postcopy.as_deref(), Some("paused"));
    assert!(
        src.paused.load(SeqCst) && src.resumes.load(SeqCst) == 0,
        "the source never resumes"
    );
    assert!(hooks.postcopy_paused());
    // The destination waits with its VM.
    let t = Instant::now();
    while dest.stats.snapshot().postcopy.as_deref() != Some("paused") {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "destination not paused"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dest.handle.is_finished());
    assert!(!dest.factory.last().discarded.load(SeqCst));
    // A cancel of the destination is ignored now (the guest runs there).
    dest.cancel.cancel();
    // Without resume, nothing to resume is refused on another VM's hooks.
    let mut q = params(dest.port, 3);
    q.resume = true;
    let e = send_with(
        src.clone(),
        &q,
        &Arc::default(),
        &CancelToken::default(),
        &Hooks::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("no post-copy"), "{e}");
    // Resume straight to the destination (the proxy stays cut).
    proxy.cut();
    let stats2 = Arc::new(MigrationStats::default());
    send_with(src.clone(), &q, &stats2, &CancelToken::default(), &hooks).unwrap();
    let rr = dest.handle.join().unwrap();
    assert!(rr.is_ok(), "receive failed");
    let read = g.join().unwrap();
    check_read(&src, &pages, &read);
    assert_same_ram(&src, &dest.factory.last());
    let s2 = stats2.snapshot();
    assert_eq!(s2.state, MigrationState::Completed, "{s2:?}");
    assert_eq!(s2.postcopy_resumes, 1);
    assert_eq!(s2.source_vm, Some(SourceVmOutcome::Migrated));
    assert!(s2.downtime_ms.is_some());
    let d = dest.stats.snapshot();
    assert_eq!(d.postcopy.as_deref(), Some("completed"));
    assert_eq!(d.postcopy_resumes, 1);
    assert!(!hooks.postcopy_paused());
}

/// A destination that cannot do post-copy fails the switch before COMMIT:
/// the source runs on, the destination discards its VM.
#[test]
fn a_destination_without_post_copy_fails_before_commit() {
    let src = source_with_device();
    let mut f = factory_for_layout(&src);
    f.refuse_postcopy = true;
    let mut p = params(0, 2);
    p.technique = Some(Technique::PostCopy);
    let (r, rr, dest, stats) = migrate_with(src.clone(), f, &mut p);
    let e = r.unwrap_err();
    assert!(e.to_string().contains("cannot do post-copy"), "{e}");
    assert!(rr.is_err());
    assert_source_running(&src);
    assert_eq!(stats.snapshot().source_vm, Some(SourceVmOutcome::Resumed));
    assert!(dest.factory.last().discarded.load(SeqCst));
}

/// With compression the background push sends compressed PAGES on the
/// data connections (requested pages go as is on main); every page the
/// vCPU reads is the source's.
#[test]
fn postcopy_with_compression() {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB), (4 << 30, 4 * MIB)]));
    fill(&src, 0, 3, 1);
    fill(&src, 1, 5, 2);
    let mut p = params(0, 4);
    p.technique = Some(Technique::PostCopy);
    p.compression = Compression::Zstd;
    let pages = every_page(&src, 3);
    let r = run(src.clone(), p, pages.clone(), Hooks::default());
    check_completed(&r, SwitchoverReason::User);
    check_read(&src, &pages, &r.read);
    assert_same_ram(&src, &r.factory.last());
    let c = r.dst_stats.snapshot().compression.expect("compression");
    assert!(
        c.compressed_packets > 0 && c.wire_bytes < c.raw_bytes,
        "{c:?}"
    );
}
