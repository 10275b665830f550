//! `docs/openapi.yaml` against the router (every route, method and status),
//! against the crate's own types, and against the replies of a real
//! `ferry`: every GET route, the replies of the PUT routes, error replies
//! of every kind a request can reach, and the statuses of a migration on
//! both sides. Each error kind reachable from a real request is checked
//! here on the wire (`internal` from a panicking handler is a unit test of
//! the control loop: no real request panics).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use ferry_tests::openapi::Spec;
use ferry_tests::*;
use vmm::api::errors::{ErrorBody, ErrorKind};
use vmm::api::routes::{endpoints, COMMON_STATUSES};

// ---------------------------------------------------------------------------
// The spec against the router and the types (no VMM needed)
// ---------------------------------------------------------------------------

#[test]
fn spec_matches_the_router() {
    let spec = Spec::load();
    let ops = spec.operations();
    let in_spec: BTreeSet<(String, String)> = ops
        .iter()
        .map(|o| (o.name.clone(), o.method.clone()))
        .collect();
    let in_router: BTreeSet<(String, String)> = endpoints()
        .map(|(n, m, _)| (n.to_string(), m.to_string()))
        .collect();
    assert_eq!(in_spec, in_router, "routes of the spec and of the router");
    for (name, method, route) in endpoints() {
        let op = ops
            .iter()
            .find(|o| o.name == name && o.method == method)
            .unwrap();
        let want: BTreeSet<u16> = route
            .statuses()
            .iter()
            .chain(COMMON_STATUSES)
            .copied()
            .collect();
        assert_eq!(op.statuses, want, "{method} {name}: statuses");
        // Every error status has the error schema.
        for &st in op.statuses.iter().filter(|s| **s >= 400) {
            let s = spec.response_schema(name, method, st).unwrap();
            assert_eq!(
                s["$ref"], "#/components/schemas/Error",
                "{method} {name} {st}"
            );
        }
        let with_body = matches!(
            name,
            "vm.send-migration" | "vm.receive-migration" | "vm.migration-set-parameters"
        );
        assert_eq!(op.request.is_some(), with_body, "{method} {name}: body");
    }
    // The router's own answers, for any path.
    let router: Vec<&String> = spec.doc()["x-router-responses"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(router, ["404", "405"]);
}

#[test]
fn spec_lists_every_error_kind_with_its_status() {
    let spec = Spec::load();
    let names: Vec<String> = ErrorKind::ALL.iter().map(|k| k.to_string()).collect();
    assert_eq!(spec.enum_of("ErrorKind"), names);
    let statuses = spec.x_map("ErrorKind", "x-statuses");
    assert_eq!(statuses.len(), ErrorKind::ALL.len());
    for k in ErrorKind::ALL {
        assert_eq!(statuses[k.as_str()], k.status() as u64, "{k}");
        let body = serde_json::to_value(ErrorBody {
            error: "x".into(),
            kind: k,
            state: None,
        })
        .unwrap();
        spec.validate_named("Error", &body).unwrap();
    }
    assert!(spec
        .validate_named("Error", &json!({"error": "x", "kind": "teapot"}))
        .is_err());
    assert!(spec
        .validate_named("Error", &json!({"error": "x"}))
        .is_err());
}

#[test]
fn spec_fits_the_crate_types() {
    use migration::live::{MigrationParameters, ParametersUpdate, Policy, Technique};
    use migration::{MigrationStatus, SendParams};
    let spec = Spec::load();
    let v = |x: &dyn erased::Ser| x.value();
    spec.validate_named("MigrationStatus", &v(&MigrationStatus::default()))
        .unwrap();
    spec.validate_named(
        "DeviceStatus",
        &v(&migration::stats::DeviceStatus::default()),
    )
    .unwrap();
    let params = MigrationParameters::default();
    spec.validate_named("MigrationParameters", &v(&params))
        .unwrap();
    let mut reply = v(&params);
    reply["running"] = json!(false);
    spec.validate_named("ParametersReply", &reply).unwrap();
    let mut send = SendParams::to("tcp:127.0.0.1:1");
    send.tls = Some(false);
    spec.validate_named("SendParams", &v(&send)).unwrap();
    let all = ParametersUpdate {
        policy: Some(Policy::SuspendWorkloadIfNeeded),
        downtime_ms: Some(0),
        max_bandwidth_mib_s: Some(0.5),
        auto_converge: Some(true),
        throttle_initial_percent: Some(20),
        throttle_increment_percent: Some(10),
        throttle_max_percent: Some(99),
        stall_limit_s: Some(5),
        progress_timeout_s: Some(0),
        technique: Some(Technique::PostCopy),
    };
    spec.validate_named("ParametersUpdate", &v(&all)).unwrap();
    // What the crate refuses, the spec refuses too.
    for bad in [
        json!({"downtime_ms": -1}),
        json!({"throttle_max_percent": 100}),
        json!({"technique": "warp"}),
        json!({"bogus": 1}),
    ] {
        assert!(
            spec.validate_named("ParametersUpdate", &bad).is_err(),
            "{bad}"
        );
        assert!(
            serde_json::from_value::<ParametersUpdate>(bad.clone())
                .map_err(|e| e.to_string())
                .and_then(|u| u.validate().map_err(|e| e.to_string()))
                .is_err(),
            "{bad}"
        );
    }
    let mut extra = v(&MigrationStatus::default());
    extra["bogus"] = json!(1);
    assert!(spec.validate_named("MigrationStatus", &extra).is_err());
}

/// `serde_json::to_value` behind a trait object, to check many types alike.
mod erased {
    /// A serializable value.
    pub trait Ser {
        /// As JSON.
        fn value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn value(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap()
        }
    }
}

// ---------------------------------------------------------------------------
// Real replies
// ---------------------------------------------------------------------------

/// Sends `bytes` as they are and reads the whole answer: status, head and
/// JSON body (`Null` when empty).
fn raw(sock: &Path, bytes: &[u8], timeout: Duration) -> (u16, String, Value) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_write_timeout(Some(timeout)).ok();
    s.set_read_timeout(Some(timeout)).ok();
    // The server may answer and close before it read everything: fine.
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"));
    let body = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    };
    (status, head.to_string(), body)
}

/// Calls `method name` on `vm`, checks the reply against the spec and
/// returns it.
fn call(spec: &Spec, vm: &Vmm, method: &str, name: &str, body: Option<Value>) -> (u16, Value) {
    let (st, v) = vm.api(method, name, body);
    spec.check_reply(name, method, st, &v)
        .unwrap_or_else(|e| panic!("[{}] {e}", vm.name));
    (st, v)
}

/// Like [`call`], expecting an error of `kind`.
fn expect_error(spec: &Spec, vm: &Vmm, method: &str, name: &str, body: Option<&str>, kind: &str) {
    let (st, v) = try_api_raw(&vm.sock, method, name, body, Duration::from_secs(30)).unwrap();
    assert_eq!(v["kind"], kind, "{method} {name} {body:?} -> {st} {v}");
    spec.check_reply(name.trim_start_matches("/api/v1/"), method, st, &v)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// The GET routes, the PUT routes that need no migration, and every error
/// kind a request can reach, on a VMM running the stamp guest and on one
/// without a VM.
#[test]
fn replies_and_errors_match_the_spec() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let spec = Spec::load();
    let vm = Vmm::boot(
        "openapi",
        "region=4 passes=0",
        &["--sim-vfio", "id=d0,state=1M"],
    );
    vm.wait_pass(1);
    for name in [
        "vmm.ping",
        "vm.info",
        "vm.migration",
        "vm.migration-parameters",
    ] {
        let (st, _) = call(&spec, &vm, "GET", name, None);
        assert_eq!(st, 200, "GET {name}");
    }
    let (_, info) = call(&spec, &vm, "GET", "vm.info", None);
    assert_eq!(info["devices"][0]["kind"], "sim-vfio", "{info}");
    assert_eq!(call(&spec, &vm, "PUT", "vm.pause", None).0, 200);
    assert_eq!(vm.state(), "paused");
    assert_eq!(call(&spec, &vm, "PUT", "vm.resume", None).0, 200);
    let (st, p) = call(
        &spec,
        &vm,
        "PUT",
        "vm.migration-set-parameters",
        Some(json!({"downtime_ms": 250, "max_bandwidth_mib_s": 0})),
    );
    assert_eq!((st, &p["downtime_ms"]), (200, &json!(250)), "{p}");
    // vm.events, long-polled: each line an Event.
    let r = vmm::client::request_target(
        &vm.sock,
        "GET",
        "/api/v1/vm.events?since=1&wait_s=1",
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let schema = spec.response_schema("vm.events", "GET", 200).unwrap();
    let mut n = 0;
    for line in r.body.lines() {
        let ev: Value = serde_json::from_str(line).unwrap();
        spec.validate(&schema, &ev)
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        n += 1;
    }
    assert!(n > 0, "no event: {}", r.body);

    // Every error kind a request can reach, with the spec's schema.
    // not-found and method-not-allowed (with Allow).
    expect_error(&spec, &vm, "GET", "vm.nope", None, "not-found");
    expect_error(&spec, &vm, "GET", "/nothing", None, "not-found");
    expect_error(&spec, &vm, "PUT", "vm.info", None, "method-not-allowed");
    let (st, head, _) = raw(
        &vm.sock,
        b"DELETE /api/v1/vm.pause HTTP/1.1\r\n\r\n",
        Duration::from_secs(30),
    );
    assert_eq!(st, 405);
    assert!(head.contains("\r\nAllow: PUT"), "{head}");
    // conflict: resuming a running VM, cancelling no migration.
    expect_error(&spec, &vm, "PUT", "vm.resume", None, "conflict");
    expect_error(&spec, &vm, "PUT", "vm.migration-cancel", None, "conflict");
    expect_error(
        &spec,
        &vm,
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url":"tcp:127.0.0.1:1","tls":false}"#),
        "conflict",
    );
    // bad-request and invalid-parameter.
    for (name, body, kind) in [
        ("vm.send-migration", "{not json", "bad-request"),
        ("vm.send-migration", "", "bad-request"),
        ("vm.send-migration", "[1]", "bad-request"),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:127.0.0.1:1","connections":0,"tls":false}"#,
            "invalid-parameter",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url":"tcp:127.0.0.1:1","bogus":1}"#,
            "invalid-parameter",
        ),
        (
            "vm.migration-set-parameters",
            r#"{"throttle_max_percent":100}"#,
            "invalid-parameter",
        ),
        ("vm.migration-set-parameters", "{}", "invalid-parameter"),
    ] {
        expect_error(&spec, &vm, "PUT", name, Some(body), kind);
    }
    let r = vmm::client::request_target(
        &vm.sock,
        "GET",
        "/api/v1/vm.events?wait_s=0",
        None,
        Duration::from_secs(30),
    )
    .unwrap();
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!((r.status, &v["kind"]), (400, &json!("invalid-parameter")));
    spec.check_reply("vm.events", "GET", r.status, &v).unwrap();
    // The HTTP layer's kinds, on raw requests.
    let mut big_head = b"GET /api/v1/vmm.ping HTTP/1.1\r\nX-Big: ".to_vec();
    big_head.extend(std::iter::repeat_n(b'a', 20 << 10));
    big_head.extend(b"\r\n\r\n");
    let mut many = b"GET /api/v1/vmm.ping HTTP/1.1\r\n".to_vec();
    for i in 0..80 {
        many.extend(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    for (req, status, kind) in [
        (b"GARBAGE\x01\x02\r\n\r\n".to_vec(), 400, "bad-request"),
        (many, 400, "bad-request"),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 70000\r\n\r\n".to_vec(),
            413,
            "payload-too-large",
        ),
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_vec(),
            411,
            "length-required",
        ),
        (big_head, 431, "headers-too-large"),
        // Half a request, then silence: 408 once the 10 s deadline passed.
        (
            b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 10\r\n\r\n{".to_vec(),
            408,
            "request-timeout",
        ),
    ] {
        let (st, _, v) = raw(&vm.sock, &req, Duration::from_secs(60));
        assert_eq!((st, &v["kind"]), (status, &json!(kind)), "{v}");
        spec.check_reply("vm.pause", "PUT", st, &v)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // The VMM is unharmed, the guest unbothered.
    assert_eq!(vm.state(), "running");
    vm.wait_more_passes(1);
    assert_eq!(vm.serial.mismatch(), None);
    assert!(
        !vm.stderr().contains("does not list"),
        "a reply the spec does not list:\n{}",
        vm.stderr()
    );

    // Without a VM: vm.info is a conflict naming the state.
    let empty = Vmm::destination("openapi-empty", &[]);
    let (st, v) = call(&spec, &empty, "GET", "vm.info", None);
    assert_eq!((st, &v["state"]), (409, &json!("not_created")), "{v}");
    assert_eq!(v["kind"], "conflict");
    let (st, v) = call(&spec, &empty, "GET", "vm.migration", None);
    assert_eq!((st, &v["state"]), (200, &json!("none")));
    expect_error(&spec, &empty, "PUT", "vm.pause", None, "conflict");
    expect_error(
        &spec,
        &empty,
        "PUT",
        "vm.send-migration",
        Some(r#"{"destination_url":"tcp:127.0.0.1:1","tls":false}"#),
        "conflict",
    );
    let (st, _) = call(&spec, &empty, "PUT", "vmm.shutdown", None);
    assert_eq!(st, 200);
}

/// The statuses of a migration on both sides, while it runs and once it
/// completed, the send and receive replies, and the destination's VM.
///
/// Re-run after the progress/statistics branch of #11 is merged: the new
/// fields of `vm.migration` (`throughput_bytes_per_s`, `normal_pages`, ...)
/// are optional in the spec until then, and the source then stays up in
/// the `migrated` state.
#[test]
fn migration_replies_match_the_spec() {
    skip_unless_kvm!();
    let _g = serial_guard();
    let spec = Spec::load();
    let dev = ["--sim-vfio", "id=d0,state=4M,precopy=2M"];
    let (mut src, dst) = start_pair("region=32 passes=0", &dev, 2);
    let port = free_tcp_port();
    let recv_body = json!({"receiver_url": tcp_url(port), "tls": false});
    spec.validate_named("ReceiveParams", &recv_body).unwrap();
    let (st, v) = call(&spec, &dst, "PUT", "vm.receive-migration", Some(recv_body));
    assert_eq!((st, &v["state"]), (200, &json!("receiving")), "{v}");
    let (st, v) = call(&spec, &dst, "GET", "vm.info", None);
    assert_eq!((st, &v["state"]), (409, &json!("receiving")), "{v}");
    // Slow enough to be seen running.
    let send = json!({
        "destination_url": tcp_url(port),
        "connections": 2,
        "max_bandwidth_mib_s": 16,
        "tls": false,
    });
    spec.validate_named("SendParams", &send).unwrap();
    let (st, v) = call(&spec, &src, "PUT", "vm.send-migration", Some(send));
    assert_eq!((st, &v["state"]), (200, &json!("active")));
    let mut seen_active = 0;
    for _ in 0..5 {
        for vm in [&src, &dst] {
            if let Some(s) = vm.migration_status() {
                spec.check_reply("vm.migration", "GET", 200, &s)
                    .unwrap_or_else(|e| panic!("[{}] {e}", vm.name));
                if mig_state(&s) == "active" {
                    seen_active += 1;
                }
            }
        }
        if let Ok((st, v)) = try_api(&src.sock, "GET", "vm.migration-parameters", None) {
            spec.check_reply("vm.migration-parameters", "GET", st, &v)
                .unwrap();
        }
        if let Ok((st, v)) = try_api(&src.sock, "GET", "vm.info", None) {
            spec.check_reply("vm.info", "GET", st, &v).unwrap();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(seen_active > 0, "never saw the migration active");
    // Lift the cap live, then let it finish.
    let (st, _) = call(
        &spec,
        &src,
        "PUT",
        "vm.migration-set-parameters",
        Some(json!({"max_bandwidth_mib_s": 0})),
    );
    assert_eq!(st, 200);
    let m = finish_migration(&mut src, &dst, None);
    m.check_completed();
    spec.check_reply("vm.migration", "GET", 200, &m.dest_status)
        .unwrap();
    if let Some(s) = &m.source_status {
        spec.check_reply("vm.migration", "GET", 200, s).unwrap();
    }
    let (_, info) = call(&spec, &dst, "GET", "vm.info", None);
    assert_eq!(info["config"]["migrated_in"], true);
    check_guest_moved(&[&src.serial], &dst);
    for vm in [&src, &dst] {
        assert!(
            !vm.stderr().contains("does not list"),
            "[{}] a reply the spec does not list:\n{}",
            vm.name,
            vm.stderr()
        );
    }
}
