//! `unix:PATH` migrations (a destination on the same host): the socket
//! path of a destination, receiving on it, and a whole migration over it.

use std::path::PathBuf;
use std::thread;

use serde_json::{json, Value};

use crate::api::{ok, try_api_raw, ApiResponse};
use crate::migrate::{finish_migration, Migration};
use crate::proc::Vmm;
use crate::util::poll;
use crate::{LONG, MIGRATION_TIMEOUT};

/// A socket path for `dst` (in its temp dir when that is short enough for
/// `sun_path`, else under /tmp), not yet existing.
pub fn unix_sock_of(dst: &Vmm) -> PathBuf {
    let p = dst.dir().join("mig.sock");
    if p.as_os_str().len() <= 100 {
        return p;
    }
    PathBuf::from(format!(
        "/tmp/ferry-{}-{}.sock",
        std::process::id(),
        dst.name
    ))
}

/// Asks `dst` to receive on `unix:path` and returns once the socket
/// exists (the request runs on a thread, whose handle is returned).
pub fn start_receive_unix(
    dst: &Vmm,
    path: &std::path::Path,
) -> thread::JoinHandle<Result<ApiResponse, String>> {
    let body = json!({ "receiver_url": format!("unix:{}", path.display()) });
    let sock = dst.sock.clone();
    let h = thread::spawn(move || {
        try_api_raw(
            &sock,
            "PUT",
            "vm.receive-migration",
            Some(&body.to_string()),
            MIGRATION_TIMEOUT,
        )
    });
    let up = poll(LONG, || (path.exists() || h.is_finished()).then_some(()));
    assert!(up.is_some(), "[{}] no socket {}", dst.name, path.display());
    if h.is_finished() {
        let r = h.join().unwrap();
        match &r {
            Ok((st, _)) if ok(*st) => {}
            other => panic!(
                "[{}] vm.receive-migration failed: {:?}; stderr:\n{}",
                dst.name,
                other,
                dst.stderr()
            ),
        }
        return thread::spawn(move || r);
    }
    h
}

/// Migrates `src` to `dst` over `unix:` with `params` (its
/// `destination_url` is replaced) and waits for completion (see
/// [`crate::migrate`]).
pub fn migrate_unix(src: &mut Vmm, dst: &Vmm, mut params: Value) -> Migration {
    let path = unix_sock_of(dst);
    params["destination_url"] = json!(format!("unix:{}", path.display()));
    let recv = start_receive_unix(dst, &path);
    crate::migrate::start_send(src, params);
    finish_migration(src, dst, Some(recv))
}
