//! The API server: a UNIX socket (mode 0600) watched by the control loop,
//! and one short-lived thread per connection (bounded), one request each.
//!
//! A connection thread reads the request, translates it
//! ([`super::handlers::translate`]), hands the typed request to the control
//! loop, and writes the loop's answer back as HTTP. It never changes the
//! VMM itself.

use std::io::ErrorKind as IoErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::channel;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{debug, error, info, warn};
use vmm_sys_util::epoll::EventSet;

use super::errors::ErrorKind;
use super::events::{self as vm_events, Followers};
use super::handlers::{reply_for, translate};
use super::http::{read_request, write_response, DeadlineReader};
use super::routes::{allowed_method, route, Reply, Route};
use crate::control::{DeliveryAck, EventSink, VmmEvent};
use migration::api::EventLog;

/// Most connections served at once. A further connection waits up to
/// [`SLOT_WAIT`] for a slot, then is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// Most connections waiting for a slot; beyond that they are answered 503
/// at once.
pub const MAX_WAITING: usize = 64;
/// How long a connection beyond [`MAX_CONNECTIONS`] waits for a slot.
pub const SLOT_WAIT: Duration = Duration::from_secs(2);
/// Time a client has to send its whole request (one deadline for all its
/// bytes, not a limit per read: a client trickling bytes gets 408 after
/// it); also the limit of each write of the answer.
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

/// Connection slots: a counting semaphore.
///
/// Invariant: `busy <= MAX_CONNECTIONS`.
#[derive(Default)]
struct Slots {
    busy: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn acquire(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while *b >= MAX_CONNECTIONS {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            b = self
                .cv
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *b += 1;
        true
    }

    fn release(&self) {
        let mut b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        *b = b.saturating_sub(1);
        self.cv.notify_one();
    }
}

/// What `vm.events` serves from: the VMM's event log and its followers.
///
/// Invariant: one per server; `followers` counts streaming readers of `log`.
pub struct EventFeed {
    log: Arc<EventLog>,
    followers: Followers,
}

/// The API socket, a subscriber of the control loop; the socket file is
/// removed on drop.
///
/// Invariant: `path` is the socket `listener` bound (non-blocking);
/// `threads` counts live connection threads (serving or waiting).
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    events: EventSink,
    feed: Arc<EventFeed>,
    slots: Arc<Slots>,
    threads: Arc<AtomicUsize>,
}

impl ApiServer {
    /// Binds `path` (which must not exist; see
    /// [`crate::config::check_api_socket`]); requests go to `events`,
    /// `vm.events` reads `log`.
    pub fn bind(path: &Path, events: EventSink, log: Arc<EventLog>) -> Result<ApiServer, ApiError> {
        let serr = |source| ApiError::Socket {
            path: path.display().to_string(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(serr)?;
        let server = ApiServer {
            path: path.to_path_buf(),
            listener,
            events,
            feed: Arc::new(EventFeed {
                log,
                followers: Followers::default(),
            }),
            slots: Arc::new(Slots::default()),
            threads: Arc::new(AtomicUsize::new(0)),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(serr)?;
        server.listener.set_nonblocking(true).map_err(serr)?;
        info!("API listening on {}", path.display());
        Ok(server)
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == IoErrorKind::WouldBlock => return,
                Err(e) if e.kind() == IoErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. out of fds: the connection stays queued and the
                    // listener readable; the next round retries.
                    warn!("API accept failed: {e}");
                    return;
                }
            };
            self.dispatch(stream);
        }
    }

    fn dispatch(&self, mut stream: UnixStream) {
        if self.threads.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS + MAX_WAITING {
            self.threads.fetch_sub(1, Ordering::SeqCst);
            // Never block the loop: a client that does not read loses it.
            let _ = stream.set_nonblocking(true);
            busy(&mut stream);
            return;
        }
        let (events, feed, slots, threads) = (
            self.events.clone(),
            self.feed.clone(),
            self.slots.clone(),
            self.threads.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("api-conn".into())
            .spawn(move || {
                // Released on every way out, a panic included.
                let _thread = OnDrop(|| {
                    threads.fetch_sub(1, Ordering::SeqCst);
                });
                if slots.acquire(SLOT_WAIT) {
                    let _slot = OnDrop(|| slots.release());
                    serve(stream, &events, &feed);
                } else {
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    busy(&mut stream);
                }
            });
        if let Err(e) = spawned {
            self.threads.fetch_sub(1, Ordering::SeqCst);
            warn!("API: cannot spawn a connection thread: {e}");
        }
    }
}

/// Runs its closure when dropped (also while a panic unwinds).
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            self.accept_all();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            error!("control loop: cannot watch the API socket: {e}");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn busy(stream: &mut UnixStream) {
    let r = Reply::error(ErrorKind::Unavailable, "too many API connections");
    let _ = write_response(stream, r.status, r.body.as_ref(), &[]);
}

/// Reads one request, has the control loop execute it, writes the answer.
fn serve(stream: UnixStream, events: &EventSink, feed: &EventFeed) {
    serve_within(stream, events, feed, READ_TIMEOUT)
}

/// [`serve`] with `limit` for the whole request.
fn serve_within(mut stream: UnixStream, events: &EventSink, feed: &EventFeed, limit: Duration) {
    let _ = stream.set_write_timeout(Some(READ_TIMEOUT));
    let req = match read_request(&mut DeadlineReader::new(&stream, limit)) {
        Ok(r) => r,
        Err(e) => {
            debug!("API: bad request: {} ({})", e.message, e.status());
            if let Some(kind) = e.kind {
                let msg = if kind == ErrorKind::RequestTimeout {
                    format!(
                        "{}: the whole request must arrive within {} s",
                        e.message,
                        limit.as_secs_f64()
                    )
                } else {
                    e.message
                };
                let r = Reply::error(kind, msg);
                let _ = write_response(&mut stream, r.status, r.body.as_ref(), &[]);
            }
            return;
        }
    };
    debug!("API: {} {}", req.method, req.path);
    if route(&req.method, &req.path) == Ok(Route::Events) {
        match vm_events::parse_query(&req.query) {
            Ok(q) => vm_events::serve(&mut stream, &feed.log, &feed.followers, q),
            Err(reply) => {
                let _ = write_response(&mut stream, reply.status, reply.body.as_ref(), &[]);
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        return;
    }
    let (reply, delivered) = guarded(|| answer(&req, events));
    if let Ok(r) = route(&req.method, &req.path) {
        if !r.documents(reply.status) {
            error!(
                "API: {} {} answered {}, which docs/openapi.yaml does not list for it",
                req.method, req.path, reply.status
            );
        }
    }
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
    // Only now may the loop act on the reply having left (e.g. exit).
    drop(delivered);
}

/// Routes and translates `req`, has the control loop execute it, and
/// returns the reply with the loop's delivery ack (if it waits for one).
fn answer(req: &super::http::Request, events: &EventSink) -> (Reply, Option<DeliveryAck>) {
    #[cfg(test)]
    if req.path == TEST_PANIC_PATH {
        panic!("test: a handler panicked");
    }
    let routed = route(&req.method, &req.path).and_then(|r| translate(r, &req.body));
    #[cfg(test)]
    let routed = if req.path == TEST_PANIC_IN_LOOP_PATH {
        Ok(crate::control::requests::Request::TestPanic)
    } else {
        routed
    };
    match routed {
        Ok(request) => {
            let (tx, rx) = channel();
            events.send(VmmEvent::Api { request, reply: tx });
            match rx.recv() {
                Ok(answer) => (reply_for(answer.outcome.result), answer.delivered),
                Err(_) => (
                    Reply::error(ErrorKind::Unavailable, "the VMM is shutting down"),
                    None,
                ),
            }
        }
        Err(reply) => (reply, None),
    }
}

/// Runs `f`; a panic in it becomes a 500 of kind `internal` (the panic
/// message itself went to stderr), so that the client gets an answer and
/// the API goes on serving.
fn guarded(f: impl FnOnce() -> (Reply, Option<DeliveryAck>)) -> (Reply, Option<DeliveryAck>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            error!("API: a request handler panicked: {what}");
            (
                Reply::error(
                    ErrorKind::Internal,
                    format!(
                        "internal error: the request handler panicked ({what}); the VMM goes on"
                    ),
                ),
                None,
            )
        }
    }
}

/// A path whose request panics in the connection thread (unit tests only).
#[cfg(test)]
pub(crate) const TEST_PANIC_PATH: &str = "/api/v1/test.panic";
/// A path whose request panics on the control loop (unit tests only).
#[cfg(test)]
pub(crate) const TEST_PANIC_IN_LOOP_PATH: &str = "/api/v1/test.panic-in-loop";

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// A trickling client is answered 408 and closed once the whole-request
    /// deadline passed.
    #[test]
    fn trickling_client_gets_408_and_is_closed() {
        let (sink, source) = crate::control::event_channel().unwrap();
        let (server, client) = UnixStream::pair().unwrap();
        let mut reader = client.try_clone().unwrap();
        let trickler = std::thread::spawn(move || {
            let mut c = &client;
            let _ = c.write_all(b"PUT /api/v1/vm.pause HTTP/1.1\r\nContent-Length: 60000\r\n\r\n{");
            // Until the server cuts it off, or a bound far beyond the
            // deadline (then the test fails below).
            for _ in 0..600 {
                if c.write_all(b" ").is_err() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        });
        let feed = EventFeed {
            log: Arc::new(EventLog::new()),
            followers: Followers::default(),
        };
        serve_within(server, &sink, &feed, Duration::from_millis(500));
        let mut answer = String::new();
        reader
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        reader.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(
            answer.contains("whole request must arrive within"),
            "{answer}"
        );
        assert!(answer.contains(r#""kind":"request-timeout""#), "{answer}");
        drop(reader);
        assert!(trickler.join().unwrap(), "the trickler was never cut off");
        drop(source);
    }
}
