//! The HTTP/1.1 + JSON API on a UNIX socket (`/api/v1/...`).

pub mod events;
pub mod handlers;
pub mod http;
pub mod routes;
pub mod server;
