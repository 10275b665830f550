//! Routing of `/api/v1/...` paths to endpoints, and the reply type.

use serde_json::{json, Value};

/// Path prefix of every endpoint.
pub const PREFIX: &str = "/api/v1/";

/// An API endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `GET vmm.ping`
    Ping,
    /// `PUT vmm.shutdown`
    VmmShutdown,
    /// `GET vm.info`
    VmInfo,
    /// `PUT vm.pause`
    VmPause,
    /// `PUT vm.resume`
    VmResume,
    /// `PUT vm.shutdown`
    VmShutdown,
    /// `PUT vm.send-migration`
    SendMigration,
    /// `PUT vm.receive-migration`
    ReceiveMigration,
    /// `GET vm.migration`
    MigrationStatus,
    /// `PUT vm.migration-cancel`
    MigrationCancel,
    /// `PUT vm.migration-set-parameters`
    SetParameters,
    /// `GET vm.migration-parameters`
    GetParameters,
    /// `GET vm.events` (streamed by the connection thread)
    Events,
}

const TABLE: &[(&str, &str, Route)] = &[
    ("vmm.ping", "GET", Route::Ping),
    ("vmm.shutdown", "PUT", Route::VmmShutdown),
    ("vm.info", "GET", Route::VmInfo),
    ("vm.pause", "PUT", Route::VmPause),
    ("vm.resume", "PUT", Route::VmResume),
    ("vm.shutdown", "PUT", Route::VmShutdown),
    ("vm.send-migration", "PUT", Route::SendMigration),
    ("vm.receive-migration", "PUT", Route::ReceiveMigration),
    ("vm.migration", "GET", Route::MigrationStatus),
    ("vm.migration-cancel", "PUT", Route::MigrationCancel),
    ("vm.migration-set-parameters", "PUT", Route::SetParameters),
    ("vm.migration-parameters", "GET", Route::GetParameters),
    ("vm.events", "GET", Route::Events),
];

/// A reply: status and JSON body (`None` for 204).
///
/// Invariant: error replies (status >= 400) carry `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: Option<Value>,
}

impl Reply {
    /// 200 with a JSON body.
    pub fn ok(body: Value) -> Reply {
        Reply {
            status: 200,
            body: Some(body),
        }
    }

    /// An error reply `{"error": msg}`.
    pub fn error(status: u16, msg: impl Into<String>) -> Reply {
        Reply {
            status,
            body: Some(json!({ "error": msg.into() })),
        }
    }
}

/// Maps a method and path to an endpoint: 404 for an unknown path, 405
/// (with the allowed method named) for a known path with the wrong method.
pub fn route(method: &str, path: &str) -> Result<Route, Reply> {
    let name = path.strip_prefix(PREFIX).ok_or_else(|| {
        Reply::error(
            404,
            format!("unknown path {path}: endpoints live under {PREFIX}"),
        )
    })?;
    let name = name.trim_end_matches('/');
    let (_, allowed, r) = TABLE
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| Reply::error(404, format!("unknown endpoint {path}")))?;
    if method.eq_ignore_ascii_case(allowed) {
        Ok(*r)
    } else {
        Err(Reply::error(
            405,
            format!("{path} accepts {allowed}, not {method}"),
        ))
    }
}

/// The allowed method of an endpoint name (for `Allow` headers).
pub fn allowed_method(path: &str) -> Option<&'static str> {
    let name = path.strip_prefix(PREFIX)?.trim_end_matches('/');
    TABLE
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, m, _)| *m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        assert_eq!(route("GET", "/api/v1/vmm.ping"), Ok(Route::Ping));
        assert_eq!(route("PUT", "/api/v1/vm.pause"), Ok(Route::VmPause));
        assert_eq!(route("put", "/api/v1/vm.resume"), Ok(Route::VmResume));
        assert_eq!(
            route("GET", "/api/v1/vm.migration"),
            Ok(Route::MigrationStatus)
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.send-migration"),
            Ok(Route::SendMigration)
        );
        assert_eq!(route("GET", "/api/v1/nope").unwrap_err().status, 404);
        assert_eq!(route("GET", "/").unwrap_err().status, 404);
        assert_eq!(route("GET", "/api/v2/vmm.ping").unwrap_err().status, 404);
        assert_eq!(route("PUT", "/api/v1/vmm.ping").unwrap_err().status, 405);
        assert_eq!(route("GET", "/api/v1/vm.pause").unwrap_err().status, 405);
        assert_eq!(route("DELETE", "/api/v1/vm.info").unwrap_err().status, 405);
        let e = route("GET", "/api/v1/x").unwrap_err();
        assert!(e.body.unwrap()["error"].is_string());
        assert_eq!(allowed_method("/api/v1/vm.info"), Some("GET"));
    }
}
