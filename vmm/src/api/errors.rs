//! Machine-readable API errors: every error reply is
//! `{"error": "<message>", "kind": "<kind>"}` ([`ErrorBody`]), with one
//! [`ErrorKind`] out of a closed set. Each kind has one HTTP status
//! ([`ErrorKind::status`]); only 400 has two kinds (the request itself is
//! malformed, or a field of a well-formed body is refused). The set, the
//! codes and their meaning are documented in `docs/openapi.yaml` (a test
//! checks that they agree).

use serde::{Deserialize, Serialize};

/// What went wrong, for programs (the `kind` of an error reply).
///
/// Invariant: the set is closed and each kind maps to exactly one HTTP
/// status; a client may match on the kind without reading the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// 400: the request is not well-formed HTTP, or its body is missing,
    /// not JSON, or not a JSON object.
    BadRequest,
    /// 400: the body is a JSON object but a field is missing, unknown, of
    /// the wrong type or out of its range, or a value cannot be used (an
    /// address that cannot be bound); the message names the field.
    InvalidParameter,
    /// 404: no endpoint at this path.
    NotFound,
    /// 405: the endpoint exists but takes another method (named in the
    /// `Allow` header).
    MethodNotAllowed,
    /// 408: the whole request did not arrive within the deadline.
    RequestTimeout,
    /// 409: the request does not fit the state of the VM or of a
    /// migration (no VM, already migrated, a migration running, ...).
    Conflict,
    /// 411: a body without Content-Length (chunked request bodies).
    LengthRequired,
    /// 413: the body is larger than the limit.
    PayloadTooLarge,
    /// 431: the request line and headers are larger than the limit.
    HeadersTooLarge,
    /// 500: the VMM or the host failed (a handler that panicked included).
    Internal,
    /// 503: the VMM cannot take the request now (too many connections or
    /// event followers, or it is shutting down); retry later.
    Unavailable,
}

impl ErrorKind {
    /// Every kind, in the order of the documentation.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::BadRequest,
        ErrorKind::InvalidParameter,
        ErrorKind::NotFound,
        ErrorKind::MethodNotAllowed,
        ErrorKind::RequestTimeout,
        ErrorKind::Conflict,
        ErrorKind::LengthRequired,
        ErrorKind::PayloadTooLarge,
        ErrorKind::HeadersTooLarge,
        ErrorKind::Internal,
        ErrorKind::Unavailable,
    ];

    /// The HTTP status of this kind.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest | ErrorKind::InvalidParameter => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::RequestTimeout => 408,
            ErrorKind::Conflict => 409,
            ErrorKind::LengthRequired => 411,
            ErrorKind::PayloadTooLarge => 413,
            ErrorKind::HeadersTooLarge => 431,
            ErrorKind::Internal => 500,
            ErrorKind::Unavailable => 503,
        }
    }

    /// The kind's name as it appears in `kind` (`"bad-request"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad-request",
            ErrorKind::InvalidParameter => "invalid-parameter",
            ErrorKind::NotFound => "not-found",
            ErrorKind::MethodNotAllowed => "method-not-allowed",
            ErrorKind::RequestTimeout => "request-timeout",
            ErrorKind::Conflict => "conflict",
            ErrorKind::LengthRequired => "length-required",
            ErrorKind::PayloadTooLarge => "payload-too-large",
            ErrorKind::HeadersTooLarge => "headers-too-large",
            ErrorKind::Internal => "internal",
            ErrorKind::Unavailable => "unavailable",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of an error reply. `vm.info` without a VM adds `state`
/// (`not_created` or `receiving`).
///
/// Invariant: `error` is a message for people, `kind` the same error for
/// programs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, naming the field at fault where there is one.
    pub error: String,
    /// The kind of error.
    pub kind: ErrorKind,
    /// `vm.info` without a VM: why there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_their_names_and_have_error_statuses() {
        for k in ErrorKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
            assert_eq!(
                serde_json::from_value::<ErrorKind>(k.as_str().into()).unwrap(),
                k
            );
            assert!((400..600).contains(&k.status()), "{k}");
        }
        // One-to-one with the status, except the two kinds of 400.
        let mut statuses: Vec<u16> = ErrorKind::ALL.iter().map(|k| k.status()).collect();
        statuses.dedup();
        assert_eq!(statuses.len(), ErrorKind::ALL.len() - 1);
        let b: ErrorBody =
            serde_json::from_str(r#"{"error":"x","kind":"payload-too-large"}"#).unwrap();
        assert_eq!(b.kind, ErrorKind::PayloadTooLarge);
        assert!(serde_json::from_str::<ErrorBody>(r#"{"error":"x","kind":"nope"}"#).is_err());
    }
}
