//! Routing of `/api/v1/...` paths to endpoints, and the reply type.

use serde_json::{json, Value};

use super::errors::ErrorKind;

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

/// Every endpoint: name (the path after [`PREFIX`]), method, route.
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

/// Statuses any request can get, whatever its endpoint: a malformed
/// request (400), its deadline (408), a chunked body (411), a body or head
/// over its limit (413, 431), a failure of the VMM or the host, a panic
/// included (500), and no capacity or a VMM shutting down (503).
pub const COMMON_STATUSES: &[u16] = &[400, 408, 411, 413, 431, 500, 503];

impl Route {
    /// The statuses this endpoint's handler itself can answer with, besides
    /// [`COMMON_STATUSES`] (and 404/405 of the router, which belong to no
    /// endpoint). `docs/openapi.yaml` lists exactly these plus the common
    /// ones for each operation (a test checks it).
    pub fn statuses(self) -> &'static [u16] {
        match self {
            Route::Ping
            | Route::VmmShutdown
            | Route::MigrationStatus
            | Route::SetParameters
            | Route::GetParameters
            | Route::Events => &[200],
            Route::VmInfo
            | Route::VmPause
            | Route::VmResume
            | Route::VmShutdown
            | Route::SendMigration
            | Route::ReceiveMigration
            | Route::MigrationCancel => &[200, 409],
        }
    }

    /// Whether `status` is documented for this endpoint (its own statuses
    /// and the common ones).
    pub fn documents(self, status: u16) -> bool {
        self.statuses().contains(&status) || COMMON_STATUSES.contains(&status)
    }
}

/// Every endpoint as (name after [`PREFIX`], method, route), in the order
/// of the router.
pub fn endpoints() -> impl Iterator<Item = (&'static str, &'static str, Route)> {
    TABLE.iter().copied()
}

/// A reply: status and JSON body (`None` for 204).
///
/// Invariant: error replies (status >= 400) carry `{"error": "...",
/// "kind": "..."}` ([`super::errors::ErrorBody`]) and their status is the
/// kind's.
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

    /// An error reply `{"error": msg, "kind": kind}` with the kind's status.
    pub fn error(kind: ErrorKind, msg: impl Into<String>) -> Reply {
        Reply {
            status: kind.status(),
            body: Some(json!({ "error": msg.into(), "kind": kind })),
        }
    }

    /// The `kind` of an error reply.
    pub fn kind(&self) -> Option<ErrorKind> {
        let k = self.body.as_ref()?.get("kind")?;
        serde_json::from_value(k.clone()).ok()
    }
}

/// Maps a method and path to an endpoint: 404 for an unknown path, 405
/// (with the allowed method named) for a known path with the wrong method.
pub fn route(method: &str, path: &str) -> Result<Route, Reply> {
    let name = path.strip_prefix(PREFIX).ok_or_else(|| {
        Reply::error(
            ErrorKind::NotFound,
            format!("unknown path {path}: endpoints live under {PREFIX}"),
        )
    })?;
    let name = name.trim_end_matches('/');
    let (_, allowed, r) = TABLE
        .iter()
        .find(|(n, _, _)| *n == name)
        .ok_or_else(|| Reply::error(ErrorKind::NotFound, format!("unknown endpoint {path}")))?;
    if method.eq_ignore_ascii_case(allowed) {
        Ok(*r)
    } else {
        Err(Reply::error(
            ErrorKind::MethodNotAllowed,
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
        assert_eq!(e.kind(), Some(ErrorKind::NotFound));
        assert!(e.body.unwrap()["error"].is_string());
        let e = route("PUT", "/api/v1/vm.info").unwrap_err();
        assert_eq!(e.kind(), Some(ErrorKind::MethodNotAllowed));
        assert_eq!(allowed_method("/api/v1/vm.info"), Some("GET"));
    }
}
