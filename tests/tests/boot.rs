//! Boot, serial, API and command-line tests (issue #2).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use ferry_tests::*;

// ---------------------------------------------------------------------------
// Booting the stamp guest
// ---------------------------------------------------------------------------

#[test]
fn boots_runs_passes_and_exits_on_reset() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot_no_wait("boot", "region=16 passes=3", &[]);
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(
        vm.serial.boot(),
        Some((512, 16)),
        "boot line; serial:\n{}",
        vm.serial.text()
    );
    assert_eq!(
        vm.serial.passes(),
        vec![1, 2, 3],
        "serial:\n{}",
        vm.serial.text()
    );
    assert_eq!(vm.serial.mismatch(), None);
    let lines = vm.serial.lines();
    assert!(
        lines[0].starts_with("stamp: boot"),
        "first line is the boot line: {:?}",
        lines
    );
    assert!(!vm.sock.exists(), "API socket not removed on exit");
}

#[test]
fn boots_with_two_vcpus() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot_no_wait("cpus2", "region=4 passes=2", &["--cpus", "boot=2"]);
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(vm.serial.boot(), Some((512, 4)));
    assert_eq!(vm.serial.passes(), vec![1, 2]);
    assert_eq!(vm.serial.mismatch(), None);
}

#[test]
fn vm_info_reports_config() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot(
        "info",
        "region=4 passes=0",
        &["--cpus", "boot=2", "--memory", "size=256M"],
    );
    vm.wait_pass(1);
    let info = vm.info();
    assert_eq!(info["state"], "running", "{}", info);
    assert!(!info["config"].is_null(), "vm.info has no config: {}", info);
    assert!(!info["vcpus"].is_null(), "vm.info has no vcpus: {}", info);
    assert!(
        !info["memory"].is_null() || !info["memory_regions"].is_null(),
        "vm.info has no memory: {}",
        info
    );
    if let Some(v) = info["vcpus"].as_array() {
        assert_eq!(v.len(), 2, "vcpus: {}", info);
    }
    assert!(
        info.to_string().contains("268435456") || info.to_string().contains("256"),
        "memory size not reported: {}",
        info
    );
    assert!(
        info["devices"].is_array(),
        "vm.info has no devices array: {}",
        info
    );
    assert_eq!(vm.serial.boot(), Some((256, 4)));
}

#[test]
fn boots_with_shared_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot_no_wait(
        "shared",
        "region=4 passes=2",
        &["--memory", "size=512M,shared=on"],
    );
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(vm.serial.boot(), Some((512, 4)));
    assert_eq!(vm.serial.passes(), vec![1, 2]);
    assert_eq!(vm.serial.mismatch(), None);
}

#[test]
fn boots_with_file_backed_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let dir = TempDir::new("memfile");
    let file = dir.join("guest.mem");
    fs::File::create(&file).unwrap().set_len(256 << 20).unwrap();
    let mem = format!("size=256M,file={}", file.display());
    let mut vm = Vmm::boot_no_wait("filemem", "region=4 passes=2", &["--memory", &mem]);
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(vm.serial.boot(), Some((256, 4)));
    assert_eq!(vm.serial.passes(), vec![1, 2]);
    assert_eq!(vm.serial.mismatch(), None);
    assert!(file.exists(), "the memory file must not be removed");
}

#[test]
fn boots_with_prefaulted_memory() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot_no_wait(
        "prefault",
        "region=4 passes=1",
        &["--memory", "size=256M,prefault=on"],
    );
    vm.expect_exit_ok(Duration::from_secs(300));
    assert_eq!(vm.serial.boot(), Some((256, 4)));
    assert_eq!(vm.serial.passes(), vec![1]);
}

#[test]
fn pvm_warning_printed_once() {
    skip_unless_kvm!();
    if !is_pvm_host() {
        eprintln!("not a PVM host: nothing to check");
        return;
    }
    let _g = serial_guard();
    let mut vm = Vmm::boot_no_wait("pvm", "region=4 passes=1", &[]);
    vm.expect_exit_ok(Duration::from_secs(300));
    let stderr = vm.stderr() + &vm.stdout();
    let n = stderr.lines().filter(|l| l.contains("PVM")).count();
    assert_eq!(
        n, 1,
        "expected exactly one line mentioning PVM, got:\n{}",
        stderr
    );
}

// ---------------------------------------------------------------------------
// API: pause / resume / errors / shutdown
// ---------------------------------------------------------------------------

#[test]
fn pause_freezes_the_guest_and_resume_continues() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("pause", "region=4 passes=0", &[]);
    vm.wait_pass(2);

    vm.api_ok("PUT", "vm.pause", None);
    assert_eq!(vm.state(), "paused");
    // Let anything already written reach the file, then freeze the view.
    thread::sleep(Duration::from_millis(300));
    let paused_at = vm.serial.last_pass().unwrap();
    let text = vm.serial.text();
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        vm.serial.last_pass(),
        Some(paused_at),
        "a pass completed while paused"
    );
    assert_eq!(vm.serial.text(), text, "serial output while paused");
    assert_eq!(vm.state(), "paused");

    // Pausing a paused VM is a state conflict.
    let (st, body) = vm.api("PUT", "vm.pause", None);
    assert_eq!(st, 409, "{}", body);
    assert!(body["error"].is_string(), "error body: {}", body);

    vm.api_ok("PUT", "vm.resume", None);
    assert_eq!(vm.state(), "running");
    vm.wait_pass(paused_at + 1);
    let passes = vm.serial.passes();
    assert_eq!(passes, (1..=passes.len() as u64).collect::<Vec<_>>());
    assert_eq!(vm.serial.mismatch(), None);
}

#[test]
fn api_errors() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("apierr", "region=4 passes=0", &[]);

    let (st, body) = vm.api("GET", "vmm.ping", None);
    assert_eq!(st, 200, "{}", body);

    // 404: unknown path, in and out of /api/v1.
    for path in ["vm.nonexistent", "/api/v2/vmm.ping", "/", "/nothing"] {
        let (st, body) = vm.api("GET", path, None);
        assert_eq!(st, 404, "GET {} -> {}", path, body);
        assert!(
            body["error"].is_string(),
            "GET {}: error body {}",
            path,
            body
        );
    }
    // 405: wrong method.
    for (m, path) in [
        ("GET", "vm.pause"),
        ("GET", "vm.resume"),
        ("PUT", "vm.info"),
        ("POST", "vmm.ping"),
        ("DELETE", "vm.info"),
    ] {
        let (st, body) = vm.api(m, path, None);
        assert_eq!(st, 405, "{} {} -> {}", m, path, body);
        assert!(
            body["error"].is_string(),
            "{} {}: error body {}",
            m,
            path,
            body
        );
    }
    assert_eq!(
        vm.state(),
        "running",
        "a refused request changed the VM state"
    );
    // 400: malformed bodies.
    for body in [
        "{not json",
        "[1,2,3]",
        "{\"destination_url\": 5}",
        "{\"destination_url\":\"tcp:127.0.0.1:1\",\"bogus_field\":1}",
        "",
    ] {
        let (st, resp) = try_api_raw(
            &vm.sock,
            "PUT",
            "vm.send-migration",
            Some(body),
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(st, 400, "send-migration body {:?} -> {} {}", body, st, resp);
        assert!(resp["error"].is_string(), "error body {}", resp);
    }
    // 400 naming the field: a timeout no deadline can hold (it used to
    // panic the send thread and wedge the API).
    let (st, resp) = try_api_raw(
        &vm.sock,
        "PUT",
        "vm.send-migration",
        Some(
            r#"{"destination_url":"tcp:127.0.0.1:1","timeout_s":18446744073709551615,"tls":false}"#,
        ),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(st, 400, "huge timeout_s -> {st} {resp}");
    assert!(
        resp["error"]
            .as_str()
            .is_some_and(|e| e.contains("timeout_s must be in 1..=604800")),
        "{resp}"
    );
    // Every other number too: the 400 names the field and its range.
    for (body, want) in [
        (
            r#"{"destination_url":"tcp:127.0.0.1:1","connections":-1}"#,
            "connections must be in 1..=64",
        ),
        (
            r#"{"destination_url":"tcp:127.0.0.1:1","max_bandwidth_mbps":1e300}"#,
            "max_bandwidth_mbps must be in 0.1..=1048576",
        ),
        (
            r#"{"receiver_url":"tcp:127.0.0.1:1","device_buffer_bytes":5}"#,
            "device_buffer_bytes must be in 16777216..=4294967296",
        ),
    ] {
        let path = if body.contains("receiver_url") {
            "vm.receive-migration"
        } else {
            "vm.send-migration"
        };
        let (st, resp) =
            try_api_raw(&vm.sock, "PUT", path, Some(body), Duration::from_secs(30)).unwrap();
        assert_eq!(st, 400, "{body} -> {st} {resp}");
        assert!(
            resp["error"].as_str().is_some_and(|e| e.contains(want)),
            "{body}: {resp}"
        );
    }
    // The next request is served.
    assert_eq!(vm.state(), "running");
    // The VM is unharmed.
    assert_eq!(vm.state(), "running");
    vm.wait_more_passes(1);
    assert_eq!(vm.serial.mismatch(), None);
}

#[test]
fn api_socket_mode_is_0600() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("sockmode", "region=4 passes=0", &[]);
    use std::os::unix::fs::FileTypeExt;
    assert!(fs::metadata(&vm.sock).unwrap().file_type().is_socket());
    assert_eq!(
        file_mode(&vm.sock),
        0o600,
        "API socket mode {:o}",
        file_mode(&vm.sock)
    );
    let dst = Vmm::destination("sockmode-dst", &[]);
    assert_eq!(
        file_mode(&dst.sock),
        0o600,
        "API socket mode (no VM) {:o}",
        file_mode(&dst.sock)
    );
}

#[test]
fn vm_shutdown_exits_zero_and_removes_socket() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot("vmshut", "region=4 passes=0", &[]);
    vm.wait_pass(1);
    let (st, body) = vm.api("PUT", "vm.shutdown", None);
    assert!(ok(st), "vm.shutdown -> {} {}", st, body);
    vm.expect_exit_ok(LONG);
    assert!(!vm.sock.exists(), "API socket not removed on exit");
}

#[test]
fn vmm_shutdown_exits_zero_and_removes_socket() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot("vmmshut", "region=4 passes=0", &[]);
    vm.wait_pass(1);
    let (st, body) = vm.api("PUT", "vmm.shutdown", None);
    assert!(ok(st), "vmm.shutdown -> {} {}", st, body);
    vm.expect_exit_ok(LONG);
    assert!(!vm.sock.exists(), "API socket not removed on exit");

    // A paused VM shuts down too.
    let mut vm = Vmm::boot("vmmshut-paused", "region=4 passes=0", &[]);
    vm.api_ok("PUT", "vm.pause", None);
    vm.api_ok("PUT", "vmm.shutdown", None);
    vm.expect_exit_ok(LONG);
    assert!(!vm.sock.exists());
}

#[test]
fn vmless_ferry_serves_api_and_shuts_down() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut dst = Vmm::destination("vmless", &[]);
    let (st, _) = dst.api("GET", "vmm.ping", None);
    assert_eq!(st, 200);
    // No VM: pausing is refused (not a crash).
    let (st, body) = dst.api("PUT", "vm.pause", None);
    assert!(
        (400..500).contains(&st),
        "pause without a VM -> {} {}",
        st,
        body
    );
    dst.api_ok("PUT", "vmm.shutdown", None);
    dst.expect_exit_ok(LONG);
    assert!(!dst.sock.exists(), "API socket not removed on exit");
}

// ---------------------------------------------------------------------------
// Garbage on the API socket
// ---------------------------------------------------------------------------

fn send_garbage(sock: &std::path::Path, bytes: &[u8], read_reply: bool) {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) => panic!("connect: {}", e),
    };
    s.set_write_timeout(Some(Duration::from_secs(10))).ok();
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let _ = s.write_all(bytes); // the server may close early: fine
    if read_reply {
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    }
}

#[test]
fn garbage_requests_leave_the_vmm_healthy() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("garbage", "region=4 passes=0", &[]);
    let healthy = |what: &str| {
        let (st, body) = vm.api("GET", "vmm.ping", None);
        assert_eq!(st, 200, "ping after {}: {}", what, body);
        assert_eq!(vm.state(), "running", "after {}", what);
    };

    // Random bytes.
    send_garbage(&vm.sock, &random_bytes(64 << 10), true);
    healthy("random bytes");
    send_garbage(&vm.sock, &random_bytes(100), false);
    healthy("random bytes, closed without reading");

    // An oversized header.
    let mut big = b"GET /api/v1/vmm.ping HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 4 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    send_garbage(&vm.sock, &big, true);
    healthy("an oversized header");

    // An oversized body announced but never sent.
    send_garbage(
        &vm.sock,
        b"PUT /api/v1/vm.pause HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{",
        false,
    );
    healthy("a huge Content-Length");

    // A request cut mid-way (headers, then body).
    send_garbage(&vm.sock, b"PUT /api/v1/vm.pau", false);
    healthy("a request cut in the request line");
    send_garbage(
        &vm.sock,
        b"PUT /api/v1/vm.send-migration HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"destination_url\":",
        false,
    );
    healthy("a request cut in the body");

    // Opened and closed.
    drop(UnixStream::connect(&vm.sock).unwrap());
    healthy("an empty connection");

    // Not HTTP at all but line-shaped.
    send_garbage(&vm.sock, b"HELLO\r\n\r\n", true);
    send_garbage(&vm.sock, b"GET\r\n\r\n", true);
    send_garbage(&vm.sock, b"GET /api/v1/vmm.ping HTTP/9.9\r\n\r\n", true);
    send_garbage(&vm.sock, &[0u8; 4096], true);
    healthy("malformed request lines");

    // Many connections at once, all dropped.
    let conns: Vec<_> = (0..64)
        .filter_map(|_| UnixStream::connect(&vm.sock).ok())
        .collect();
    drop(conns);
    healthy("64 dropped connections");

    vm.wait_more_passes(1);
    assert_eq!(vm.serial.mismatch(), None);
}

#[test]
fn idle_connection_does_not_block_the_api() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("idleconn", "region=4 passes=0", &[]);
    // A client that connects and sends half a request, then goes silent.
    let mut idle = UnixStream::connect(&vm.sock).unwrap();
    idle.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n")
        .unwrap();
    let idle2 = UnixStream::connect(&vm.sock).unwrap();
    let r = try_api_raw(&vm.sock, "GET", "vmm.ping", None, Duration::from_secs(30));
    assert!(
        matches!(r, Ok((200, _))),
        "ping while another client idles: {:?}",
        r
    );
    drop((idle, idle2));
}

#[test]
fn trickling_client_gets_408_and_the_api_stays_usable() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let vm = Vmm::boot("trickle", "region=4 passes=0", &[]);
    // A client that sends a byte every 100 ms and never ends its request:
    // no single read waits long, but the whole request has a deadline.
    let s = UnixStream::connect(&vm.sock).unwrap();
    let mut r = s.try_clone().unwrap();
    let trickler = thread::spawn(move || {
        let mut w = &s;
        let _ = w.write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Slow: ");
        // Until the VMM cuts it off, or far beyond the documented 10 s.
        for _ in 0..1200 {
            if w.write_all(b"a").is_err() {
                return true;
            }
            thread::sleep(Duration::from_millis(100));
        }
        false
    });
    r.set_read_timeout(Some(Duration::from_secs(180))).unwrap();
    let mut answer = String::new();
    let _ = r.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 408 "), "answer: {answer:?}");
    assert!(answer.contains("whole request"), "{answer}");
    drop(r);
    assert!(
        trickler.join().unwrap(),
        "the trickling client was never cut off"
    );
    let (st, _) = vm.api("GET", "vmm.ping", None);
    assert_eq!(st, 200);
    assert_eq!(vm.state(), "running");
}

// ---------------------------------------------------------------------------
// ferry-remote
// ---------------------------------------------------------------------------

fn stdout_json(out: &std::process::Output, what: &str) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "{}: stdout is not JSON ({}): {:?}; stderr: {}",
            what,
            e,
            text,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn ferry_remote_controls_the_vm() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let mut vm = Vmm::boot("remote", "region=4 passes=0", &[]);
    vm.wait_pass(1);

    for cmd in ["ping", "info"] {
        let out = vm.remote(&[cmd]);
        assert!(
            out.status.success(),
            "ferry-remote {}: {}; {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        stdout_json(&out, cmd);
    }
    let info = stdout_json(&vm.remote(&["info"]), "info");
    assert_eq!(info["state"], "running", "{}", info);

    let out = vm.remote(&["pause"]);
    assert!(
        out.status.success(),
        "pause: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out, "pause");
    assert_eq!(vm.state(), "paused");

    let out = vm.remote(&["pause"]);
    assert!(!out.status.success(), "a second pause must fail");

    let out = vm.remote(&["resume"]);
    assert!(
        out.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out, "resume");
    assert_eq!(vm.state(), "running");

    let out = vm.remote(&["migration-status"]);
    assert!(
        out.status.success(),
        "migration-status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out, "migration-status");

    let out = vm.remote(&["no-such-command"]);
    assert!(!out.status.success(), "an unknown command must fail");

    let out = vm.remote(&["shutdown"]);
    assert!(
        out.status.success(),
        "shutdown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    vm.expect_exit_ok(LONG);

    // Nobody listening: fails.
    let out = run_remote(
        &["--api-socket", "/nonexistent/ferry.sock", "ping"],
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "ping on a missing socket must fail");
    assert!(!out.stderr.is_empty(), "a failure should say why on stderr");
}
