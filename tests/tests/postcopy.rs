//! Post-copy live migration (issue #10 part 3) with the busy stamp guest:
//! a 256 MiB region rewritten without pause, under a 100 MiB/s cap, so that
//! pre-copy never converges. The guest runs on at the destination while
//! its missing pages are pulled (vCPU faults served first, the rest pushed
//! over the data connections); every page it finds stale or zero shows up
//! as `stamp: MISMATCH` in the destination's serial log.

use std::time::{Duration, Instant};

use ferry_tests::*;

/// The busy guest: 256 MiB rewritten forever (~1.4 s per pass here).
const BUSY: &str = "region=256 passes=0";

fn busy_params(extra: Value) -> Value {
    let mut p = send_params(0, 4);
    p["max_bandwidth_mib_s"] = json!(100);
    p["max_bandwidth_mbps"] = Value::Null;
    if let Value::Object(m) = extra {
        for (k, v) in m {
            p[k] = v;
        }
    }
    p
}

/// What a post-copy test reports about its run.
fn report(what: &str, m: &Migration, started: Instant) {
    let d = &m.dest_status;
    eprintln!(
        "{what}: downtime {} ms, {} missing pages, {} page requests, fault latency p50 {} µs \
         p99 {} µs, {} post-copy bytes, migration {} ms, test {:.1?}",
        d["downtime_ms"],
        d["postcopy_missing_pages"],
        d["postcopy_requests"],
        d["postcopy_fault_latency_us_p50"],
        d["postcopy_fault_latency_us_p99"],
        d["postcopy_bytes"],
        d["total_time_ms"],
        started.elapsed()
    );
}

/// Checks what every completed post-copy reports, on both sides.
fn check_postcopy(m: &Migration, reason: &str) {
    let d = &m.dest_status;
    assert_eq!(d["postcopy"], "completed", "{d}");
    assert!(d["postcopy_missing_pages"].as_u64().unwrap_or(0) > 0, "{d}");
    assert!(d["postcopy_bytes"].as_u64().unwrap_or(0) > 0, "{d}");
    assert!(d["postcopy_fault_latency_us_p50"].is_u64(), "{d}");
    assert!(d["postcopy_fault_latency_us_p99"].is_u64(), "{d}");
    if let Some(s) = &m.source_status {
        assert_eq!(s["switchover_reason"], reason, "{s}");
        assert_eq!(s["postcopy"], "completed", "{s}");
        assert_eq!(s["source_vm"], "migrated", "{s}");
        assert!(s["postcopy_requests"].as_u64().is_some(), "{s}");
    }
}

/// Migrates `src` to `dst` with `params`; `during` runs once the transfer
/// has started. Checks the guest moved (0 MISMATCH on `dst`).
fn postcopy_migration(
    src: &mut Vmm,
    dst: &Vmm,
    params: Value,
    during: impl FnOnce(&Vmm),
) -> Migration {
    let port = free_tcp_port();
    let mut params = params;
    params["destination_url"] = json!(tcp_url(port));
    let recv = start_receive(dst, port);
    start_send(src, params);
    wait_transfer_started(src);
    during(src);
    let m = finish_migration(src, dst, Some(recv));
    m.check_completed();
    check_guest_moved(&[&src.serial], dst);
    assert_eq!(dst.serial.mismatch(), None, "MISMATCH on the destination");
    m
}

#[test]
fn postcopy_on_request_while_running() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let (mut src, dst) = start_pair(BUSY, &[], 2);
    let m = postcopy_migration(&mut src, &dst, busy_params(json!({})), |src| {
        std::thread::sleep(Duration::from_millis(500));
        let (st, v) = src.api(
            "PUT",
            "vm.migration-set-parameters",
            Some(json!({ "technique": "post-copy" })),
        );
        assert!(ok(st), "set-parameters: {st} {v}");
    });
    check_postcopy(&m, "user");
    assert!(
        m.dest_status["postcopy_requests"].as_u64().unwrap_or(0) > 0,
        "{}",
        m.dest_status
    );
    report("post-copy on request", &m, t0);
}

#[test]
fn postcopy_by_policy_after_the_first_stall() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let (mut src, dst) = start_pair(BUSY, &[], 2);
    let params = busy_params(json!({ "policy": "post-copy", "stall_limit_s": 1 }));
    let m = postcopy_migration(&mut src, &dst, params, |_| {});
    check_postcopy(&m, "post-copy");
    if let Some(s) = &m.source_status {
        assert!(s["stalls"].as_u64().unwrap_or(0) >= 1, "{s}");
    }
    report("post-copy by policy", &m, t0);
}

/// `technique: post-copy` at send: no pre-copy pass; shared (memfd) memory
/// on both sides.
#[test]
fn postcopy_from_the_start_into_shared_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let mem = ["--memory", "size=512M,shared=on"];
    let mut src = Vmm::boot("src", BUSY, &mem);
    src.wait_pass(2);
    let dst = Vmm::destination("dst", &mem);
    let params = busy_params(json!({ "technique": "post-copy" }));
    let m = postcopy_migration(&mut src, &dst, params, |_| {});
    check_postcopy(&m, "user");
    report("post-copy from the start (memfd)", &m, t0);
}

/// Into a memory file on tmpfs (`--memory file=` under /dev/shm).
#[test]
fn postcopy_into_a_tmpfs_memory_file() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let path = format!("/dev/shm/ferry-postcopy-{}", std::process::id());
    /// Removes the memory file however the test ends.
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _rm = Remove(path.clone());
    std::fs::write(&path, b"").unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(512 << 20).unwrap();
    drop(f);
    let arg = format!("size=512M,file={path}");
    let mut src = Vmm::boot("src", BUSY, &[]);
    src.wait_pass(2);
    let dst = Vmm::destination("dst", &["--memory", &arg]);
    let params = busy_params(json!({ "technique": "post-copy", "connections": 2 }));
    let m = postcopy_migration(&mut src, &dst, params, |_| {});
    check_postcopy(&m, "user");
    report("post-copy from the start (tmpfs file)", &m, t0);
}

/// A TCP forwarder from a local port to `to` whose connections can all be
/// cut at once (a lost network between the two hosts).
struct Proxy {
    port: u16,
    conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn new(to: u16) -> Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let conns: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>> = Default::default();
        let c = conns.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { return };
                let Ok(b) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
                    continue;
                };
                if let (Ok(a3), Ok(b3)) = (a.try_clone(), b.try_clone()) {
                    c.lock().unwrap().extend([a3, b3]);
                }
                for (mut x, mut y) in [(a2, b2), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut x, &mut y);
                        let _ = y.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, conns }
    }

    /// Cuts the connections `which` selects; connection 0 is the first
    /// accepted, which is the main connection (the source dials it, and
    /// finishes its handshake, before any data connection).
    fn cut(&self, which: Cut) {
        let conns = self.conns.lock().unwrap();
        let n = conns.len() / 2;
        assert!(n >= 2, "only {n} connections went through the proxy");
        let picked: Vec<usize> = match which {
            Cut::All => (0..n).collect(),
            Cut::Main => vec![0],
            Cut::OneData => vec![n - 1],
        };
        for i in picked {
            for s in &conns[2 * i..2 * i + 2] {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Which of the proxied connections [`Proxy::cut`] breaks.
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Every connection: the network between the hosts is gone.
    All,
    /// The main connection only (page requests and control).
    Main,
    /// One data connection only.
    OneData,
}

/// The network breaks in the middle of the post-copy: the source stays
/// paused (it never resumes the guest, which runs on the destination), the
/// destination waits with the faulting vCPUs blocked; a send with
/// `"resume": true` reconnects and finishes, witnessed by the guest.
#[test]
fn postcopy_survives_a_lost_network_and_resumes() {
    lost_connection_and_resume(Cut::All);
}

/// As above, with only the main connection (page requests) cut: the data
/// connections still work, but both sides must give them up and pause.
#[test]
fn postcopy_survives_a_cut_main_connection_and_resumes() {
    lost_connection_and_resume(Cut::Main);
}

/// As above, with only one data connection cut.
#[test]
fn postcopy_survives_a_cut_data_connection_and_resumes() {
    lost_connection_and_resume(Cut::OneData);
}

fn lost_connection_and_resume(cut: Cut) {
    skip_unless_kvm!();
    let _g = serial_guard();
    let t0 = Instant::now();
    let (mut src, dst) = start_pair(BUSY, &[], 2);
    let port = free_tcp_port();
    let recv = start_receive(&dst, port);
    let proxy = Proxy::new(port);
    let mut p = busy_params(json!({ "technique": "post-copy" }));
    p["destination_url"] = json!(tcp_url(proxy.port));
    start_send(&src, p.clone());
    poll(LONG, || {
        let s = dst.migration_status()?;
        (s["postcopy"] == "active").then_some(())
    })
    .expect("post-copy did not start");
    std::thread::sleep(Duration::from_millis(400));
    proxy.cut(cut);
    let s = expect_migration_end(&src, &["failed"], LONG);
    assert_eq!(s["source_vm"], "postcopy_paused", "{s}");
    assert_eq!(s["postcopy"], "paused", "{s}");
    assert_eq!(src.state(), "postcopy-paused");
    let (st, v) = src.api("PUT", "vm.resume", None);
    assert_eq!(st, 409, "vm.resume must be refused: {v}");
    let d = poll(LONG, || {
        let d = dst.migration_status()?;
        (d["postcopy"] == "paused").then_some(d)
    })
    .expect("destination did not pause");
    assert_eq!(d["state"], "active", "{d}");
    assert_eq!(dst.state(), "running");
    // Resume, straight to the destination's port this time.
    p["destination_url"] = json!(tcp_url(port));
    p["resume"] = json!(true);
    start_send(&src, p);
    let m = finish_migration(&mut src, &dst, Some(recv));
    m.check_completed();
    check_guest_moved(&[&src.serial], &dst);
    assert_eq!(dst.serial.mismatch(), None, "MISMATCH on the destination");
    assert_eq!(m.dest_status["postcopy_resumes"], 1, "{}", m.dest_status);
    report(&format!("post-copy, resumed after cut {cut:?}"), &m, t0);
}
