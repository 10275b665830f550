//! The API server: a UNIX socket (mode 0600), an accept thread, and one
//! short-lived thread per connection (bounded), one request each.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};

use super::handlers::handle;
use super::http::{read_request, write_response};
use super::routes::{allowed_method, route, After, Reply};
use crate::Vmm;

/// Most connections served at once. A further connection waits up to
/// [`SLOT_WAIT`] for a slot, then is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection beyond [`MAX_CONNECTIONS`] waits for a slot.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);
/// Time a client has to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors starting the server.
///
/// Invariant: names the socket path.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Binding or configuring the socket failed.
    #[error("API socket '{path}': {source}")]
    Socket {
        /// The path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running API server; the socket file is removed by [`ApiServer::shutdown`]
/// or on drop.
///
/// Invariant: `path` is the socket this server bound.
pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl ApiServer {
    /// Binds `path` (which must not exist; see
    /// [`crate::config::check_api_socket`]) and serves `vmm` on a thread.
    pub fn start(path: &Path, vmm: Arc<Vmm>) -> Result<ApiServer, ApiError> {
        let serr = |source| ApiError::Socket {
            path: path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(serr)?;
        let server = ApiServer {
            path: path.to_path_buf(),
            stop: Arc::new(AtomicBool::new(false)),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(serr)?;
        let stop = server.stop.clone();
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, vmm, stop))
            .map_err(serr)?;
        info!("API listening on {}", path.display());
        Ok(server)
    }

    /// Stops accepting and removes the socket file.
    pub fn shutdown(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn accept_loop(listener: UnixListener, vmm: Arc<Vmm>, stop: Arc<AtomicBool>) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!("API accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let t0 = std::time::Instant::now();
        while active.load(Ordering::SeqCst) >= MAX_CONNECTIONS && t0.elapsed() < SLOT_WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let body = Reply::error(503, "too many API connections").body;
            let _ = write_response(&mut stream, 503, body.as_ref(), &[]);
            continue;
        }
        let vmm = vmm.clone();
        let act = active.clone();
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                serve(stream, &vmm);
                act.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            warn!("API: cannot spawn a connection thread: {e}");
        }
    }
}

fn serve(mut stream: UnixStream, vmm: &Arc<Vmm>) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let req = match read_request(&mut stream) {
        Ok(r) => r,
        Err(e) => {
            debug!("API: bad request: {} ({})", e.message, e.status);
            if e.status != 0 {
                let body = Reply::error(e.status, e.message).body;
                let _ = write_response(&mut stream, e.status, body.as_ref(), &[]);
            }
            return;
        }
    };
    debug!("API: {} {}", req.method, req.path);
    let reply = match route(&req.method, &req.path) {
        Ok(r) => handle(vmm, r, &req.body),
        Err(reply) => reply,
    };
    let allow = if reply.status == 405 {
        allowed_method(&req.path)
    } else {
        None
    };
    let extra: Vec<(&str, &str)> = allow.map(|m| vec![("Allow", m)]).unwrap_or_default();
    if let Err(e) = write_response(&mut stream, reply.status, reply.body.as_ref(), &extra) {
        debug!("API: writing the response failed: {e}");
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let After::Exit(code) = reply.after {
        vmm.request_exit(code);
    }
}
