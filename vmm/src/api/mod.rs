//! The HTTP/1.1 + JSON API on a UNIX socket (`/api/v1/...`), described by
//! `docs/openapi.yaml` (see `spec_tests` for the checks that keep the two
//! in agreement).

pub mod errors;
pub mod events;
pub mod handlers;
pub mod http;
pub mod routes;
pub mod server;
