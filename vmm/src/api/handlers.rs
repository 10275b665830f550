//! Translation between HTTP and typed requests: a route and a body become a
//! [`Request`] ([`translate`]), and an outcome becomes a [`Reply`]
//! ([`reply_for`]). Nothing here looks at or changes the VMM.

use migration::api::{Limit, RECEIVE_LIMITS, SEND_LIMITS};
use migration::live::{self, ParametersUpdate};
use migration::{ReceiveParams, SendParams};
use serde_json::{json, Value};

use super::errors::ErrorKind;
use super::routes::{Reply, Route};
use crate::control::requests::{Request, RequestError, Response};

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Reply::error(
            ErrorKind::BadRequest,
            "this request needs a JSON body",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| Reply::error(ErrorKind::BadRequest, format!("invalid JSON body: {e}")))
}

/// A JSON object body typed as `T`, its numeric fields first checked
/// against `limits` on the untyped JSON, so that a value serde would refuse
/// (negative, fractional, too large for the type, not a number) still gets
/// a 400 naming the field and its range.
fn typed_body<T: serde::de::DeserializeOwned>(body: &[u8], limits: &[Limit]) -> Result<T, Reply> {
    let v: Value = parse_body(body)?;
    let Some(obj) = v.as_object() else {
        return Err(Reply::error(
            ErrorKind::BadRequest,
            "the body must be a JSON object",
        ));
    };
    for l in limits {
        match obj.get(l.field) {
            None | Some(Value::Null) => {}
            Some(n) => l.check_json(n).map_err(|e| invalid(e.to_string()))?,
        }
    }
    // The path names the field at fault ("technique: unknown variant ...").
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            invalid(format!("invalid JSON body: {inner}"))
        } else {
            invalid(format!("invalid JSON body: {path}: {inner}"))
        }
    })
}

/// A 400 of kind `invalid-parameter`: a field of a well-formed body is
/// refused.
fn invalid(msg: impl Into<String>) -> Reply {
    Reply::error(ErrorKind::InvalidParameter, msg)
}

/// The limits of `vm.migration-set-parameters` checked on the untyped
/// JSON: those that take no 0 ([`ParametersUpdate::validate`] checks the
/// rest, where 0 means "none").
const PARAM_LIMITS_UNTYPED: &[Limit] = &[
    live::LIMIT_DOWNTIME_MS,
    live::LIMIT_THROTTLE_INITIAL,
    live::LIMIT_THROTTLE_INCREMENT,
    live::LIMIT_THROTTLE_MAX,
    live::LIMIT_STALL_LIMIT_S,
];

/// The request of `route` with `body`; a 400 reply for an invalid body or
/// invalid parameters.
pub fn translate(route: Route, body: &[u8]) -> Result<Request, Reply> {
    Ok(match route {
        Route::Ping => Request::Ping,
        Route::VmmShutdown => Request::VmmShutdown,
        Route::VmInfo => Request::VmInfo,
        Route::VmPause => Request::Pause,
        Route::VmResume => Request::Resume,
        Route::VmShutdown => Request::VmShutdown,
        Route::SendMigration => {
            let params: SendParams = typed_body(body, SEND_LIMITS)?;
            params.validate().map_err(|e| invalid(e.to_string()))?;
            Request::SendMigration(params)
        }
        Route::ReceiveMigration => {
            let params: ReceiveParams = typed_body(body, RECEIVE_LIMITS)?;
            params.validate().map_err(|e| invalid(e.to_string()))?;
            let addr = params.listen_addr().map_err(|e| invalid(e.to_string()))?;
            Request::ReceiveMigration { params, addr }
        }
        Route::MigrationStatus => Request::MigrationStatus,
        Route::MigrationCancel => Request::MigrationCancel,
        Route::SetParameters => {
            let u: ParametersUpdate = typed_body(body, PARAM_LIMITS_UNTYPED)?;
            u.validate().map_err(|e| invalid(e.to_string()))?;
            Request::SetParameters(u)
        }
        Route::GetParameters => Request::GetParameters,
        // Served by the connection thread itself (it streams).
        Route::Events => {
            return Err(Reply::error(
                ErrorKind::Internal,
                "vm.events is not a request",
            ))
        }
    })
}

/// The HTTP reply for an outcome.
pub fn reply_for(result: Result<Response, RequestError>) -> Reply {
    match result {
        Ok(r) => Reply::ok(match r {
            Response::Pong { version, pid } => json!({ "version": version, "pid": pid }),
            Response::ShuttingDown => json!({"state": "shutting_down"}),
            Response::VmInfo(info) => serde_json::to_value(&info).unwrap_or_else(|_| json!({})),
            Response::Paused => json!({"state": "paused"}),
            Response::Resumed => json!({"state": "running"}),
            Response::ShutDown => json!({"state": "shut_down"}),
            Response::SendStarted => json!({"state": "active"}),
            Response::Receiving { listening } => {
                json!({"state": "receiving", "listening": listening.to_string()})
            }
            Response::MigrationStatus(v) => v,
            Response::Cancelling => json!({"state": "cancelling"}),
            Response::Parameters { params, running } => {
                let mut v = serde_json::to_value(&params).unwrap_or_else(|_| json!({}));
                if let Value::Object(m) = &mut v {
                    m.insert("running".into(), json!(running));
                }
                v
            }
        }),
        Err(RequestError::BadRequest(m)) => invalid(m),
        Err(RequestError::Conflict(m)) => Reply::error(ErrorKind::Conflict, m),
        Err(RequestError::Internal(m)) => Reply::error(ErrorKind::Internal, m),
        Err(RequestError::NoVm { state }) => {
            let mut r = Reply::error(ErrorKind::Conflict, "no VM has been created");
            if let Some(Value::Object(m)) = r.body.as_mut() {
                m.insert("state".into(), json!(state));
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::config::{Cli, VmmConfig};
    use crate::Vmm;
    use clap::Parser;

    fn vmm() -> Arc<Vmm> {
        let cli = Cli::parse_from(["ferry", "--api-socket", "/nonexistent/x.sock"]);
        let cfg = VmmConfig::parse(&cli).unwrap();
        Vmm::new(cfg).unwrap().0
    }

    /// What the control loop does with one request: the reply, and the
    /// exit code the loop applies once it was delivered.
    fn handle_exit(v: &Arc<Vmm>, route: Route, body: &[u8]) -> (Reply, Option<i32>) {
        let (r, exit) = match translate(route, body) {
            Ok(req) => {
                let o = v.execute(req);
                (reply_for(o.result), o.exit_after_reply)
            }
            Err(r) => (r, None),
        };
        // Every reply is one docs/openapi.yaml lists for the endpoint, and
        // every error names its kind, whose status it has.
        assert!(route.documents(r.status), "{route:?}: {r:?}");
        if r.status >= 400 {
            let kind = r.kind().unwrap_or_else(|| panic!("no kind: {r:?}"));
            assert_eq!(kind.status(), r.status, "{r:?}");
        }
        (r, exit)
    }

    fn handle(v: &Arc<Vmm>, route: Route, body: &[u8]) -> Reply {
        handle_exit(v, route, body).0
    }

    #[test]
    fn no_vm_requests_conflict() {
        let v = vmm();
        let r = handle(&v, Route::VmInfo, b"");
        assert_eq!(r.status, 409);
        assert_eq!(r.kind(), Some(ErrorKind::Conflict));
        assert_eq!(r.body.as_ref().unwrap()["state"], "not_created");
        for route in [
            Route::VmPause,
            Route::VmResume,
            Route::VmShutdown,
            Route::MigrationCancel,
        ] {
            let (r, exit) = handle_exit(&v, route, b"");
            assert_eq!(r.status, 409, "{route:?}");
            assert!(r.body.unwrap()["error"].is_string());
            assert_eq!(exit, None, "{route:?}");
        }
        let r = handle(
            &v,
            Route::SendMigration,
            br#"{"destination_url":"tcp:127.0.0.1:1","tls":false}"#,
        );
        assert_eq!(r.status, 409);
    }

    #[test]
    fn ping_and_status() {
        let v = vmm();
        let r = handle(&v, Route::Ping, b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.unwrap()["pid"], std::process::id());
        let (r, exit) = handle_exit(&v, Route::MigrationStatus, b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.unwrap()["state"], "none");
        assert_eq!(exit, None, "no completed send: no exit");
        let (r, exit) = handle_exit(&v, Route::VmmShutdown, b"");
        assert_eq!(r.body.unwrap()["state"], "shutting_down");
        assert_eq!(exit, Some(0));
    }

    #[test]
    fn bad_bodies_are_400() {
        let v = vmm();
        use ErrorKind::{BadRequest, InvalidParameter};
        let receive: [(&[u8], ErrorKind); 8] = [
            (b"", BadRequest),
            (b"  \n", BadRequest),
            (b"{not json", BadRequest),
            (b"[1,2]", BadRequest),
            (b"\"text\"", BadRequest),
            (br#"{"receiver_url": 5}"#, InvalidParameter),
            (br#"{"receiver_url":"udp:x:1"}"#, InvalidParameter),
            (
                br#"{"receiver_url":"tcp:127.0.0.1:1","bogus":1}"#,
                InvalidParameter,
            ),
        ];
        for (body, kind) in receive {
            let r = handle(&v, Route::ReceiveMigration, body);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(r.kind(), Some(kind), "{}", String::from_utf8_lossy(body));
        }
        let send: [(&[u8], ErrorKind); 4] = [
            (b"", BadRequest),
            (b"{}", InvalidParameter),
            (
                br#"{"destination_url":"tcp:127.0.0.1:1","connections":0}"#,
                InvalidParameter,
            ),
            (
                br#"{"destination_url":"tcp:127.0.0.1:1","technique":"warp"}"#,
                InvalidParameter,
            ),
        ];
        for (body, kind) in send {
            let r = handle(&v, Route::SendMigration, body);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(r.kind(), Some(kind), "{}", String::from_utf8_lossy(body));
        }
        // A field at fault is named.
        let r = handle(
            &v,
            Route::SendMigration,
            br#"{"destination_url":"tcp:127.0.0.1:1","technique":"warp"}"#,
        );
        let m = r.body.unwrap()["error"].as_str().unwrap().to_string();
        assert!(m.contains("technique"), "{m}");
        // An empty parameter change is refused by the VMM, also as a 400.
        let r = handle(&v, Route::SetParameters, b"{}");
        assert_eq!(r.kind(), Some(InvalidParameter), "{r:?}");
    }

    /// Every numeric field out of its range is a 400 that names the field
    /// and the range, whether it is too small, too large or not a number
    /// of the right kind (a huge timeout_s once panicked the send thread).
    #[test]
    fn numbers_out_of_range_are_400_naming_field_and_range() {
        let v = vmm();
        let send = |field: &str, val: &str, want: &str| {
            let body = format!(r#"{{"destination_url":"tcp:127.0.0.1:1","{field}":{val}}}"#);
            let r = handle(&v, Route::SendMigration, body.as_bytes());
            assert_eq!(r.status, 400, "{body}");
            let m = r.body.unwrap()["error"].as_str().unwrap().to_string();
            assert!(m.contains(want), "{body}: {m}");
        };
        send(
            "connections",
            "0",
            "connections must be in 1..=64 or \"auto\", got 0",
        );
        send("connections", "65", "connections must be in 1..=64");
        send(
            "connections",
            "-3",
            "connections must be in 1..=64 or \"auto\", got -3",
        );
        send("connections", "4294967297", "connections must be in 1..=64");
        send(
            "downtime_ms",
            "3600001",
            "downtime_ms must be in 0..=3600000",
        );
        send("downtime_ms", "1.5", "downtime_ms must be in 0..=3600000");
        send(
            "max_bandwidth_mbps",
            "0",
            "max_bandwidth_mbps must be in 0.1..=1048576",
        );
        send(
            "max_bandwidth_mbps",
            "1e308",
            "max_bandwidth_mbps must be in",
        );
        send(
            "max_bandwidth_mbps",
            "\"fast\"",
            "max_bandwidth_mbps must be in",
        );
        send(
            "timeout_s",
            "18446744073709551615",
            "timeout_s must be in 1..=604800",
        );
        send("timeout_s", "0", "timeout_s must be in 1..=604800");
        send(
            "device_chunk_bytes",
            "16777217",
            "device_chunk_bytes must be in 4096..=16777216",
        );
        for (val, want) in [
            (
                "1",
                "device_buffer_bytes must be in 16777216..=4294967296, got 1",
            ),
            ("4294967297", "device_buffer_bytes must be in"),
            ("-1", "device_buffer_bytes must be in"),
        ] {
            let body =
                format!(r#"{{"receiver_url":"tcp:127.0.0.1:1","device_buffer_bytes":{val}}}"#);
            let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
            assert_eq!(r.status, 400, "{body}");
            let m = r.body.unwrap()["error"].as_str().unwrap().to_string();
            assert!(m.contains(want), "{body}: {m}");
        }
    }

    #[test]
    fn receive_binds_and_reports_bind_errors() {
        let v = vmm();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let body = format!(r#"{{"receiver_url":"tcp:127.0.0.1:{port}","tls":false}}"#);
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 400, "{:?}", r.body);
        drop(taken);
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 200, "{:?}", r.body);
        // While waiting for the source, vm.info says so.
        let r = handle(&v, Route::VmInfo, b"");
        assert_eq!(r.status, 409);
        assert_eq!(r.body.as_ref().unwrap()["state"], "receiving");
        // A second receive while the first waits is a conflict.
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 409);
        let r = handle(&v, Route::MigrationCancel, b"");
        assert_eq!(r.status, 200);
        // The worker ends as cancelled.
        let t0 = std::time::Instant::now();
        loop {
            let s = handle(&v, Route::MigrationStatus, b"").body.unwrap();
            if s["state"] == "cancelled" || s["state"] == "failed" {
                assert!(s["error"].is_string());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "status {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The VMM is back to having no VM once the job's end is reaped (the
        // worker marks its statistics cancelled a moment before it ends).
        loop {
            let r = handle(&v, Route::VmInfo, b"");
            let state = r.body.as_ref().unwrap()["state"].clone();
            if state == "not_created" {
                break;
            }
            assert_eq!(state, "receiving", "while the job ends");
            assert!(t0.elapsed() < Duration::from_secs(20), "vm.info {state}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
