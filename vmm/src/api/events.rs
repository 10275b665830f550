//! `GET /api/v1/vm.events`: the VMM's event log as JSON lines
//! (`application/x-ndjson`), one object per event, served by the
//! connection thread itself so that a follower never holds up the control
//! loop.
//!
//! * Without `wait_s`, the reply is chunked and never ends: the retained
//!   events from `since` on, then each new event as it happens, until the
//!   client goes away or the VMM exits.
//! * With `wait_s=N` (1..=[`MAX_WAIT_S`]) it is a long poll: the events
//!   from `since` on, waiting up to N s for the first, in one reply whose
//!   `X-Ferry-Next-Seq` header is the `since` of the next poll.
//!
//! `since` defaults to the oldest event kept; `since=now` starts with the
//! next event. A reader that fell behind the ring gets a `missed` event
//! saying how many it lost.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use migration::api::EventLog;
use serde_json::json;

use super::errors::ErrorKind;
use super::http::write_response;
use super::routes::Reply;

/// Longest long poll.
pub const MAX_WAIT_S: u64 = 300;
/// Most followers at once (each holds a connection slot); more get 503.
pub const MAX_FOLLOWERS: usize = 8;
/// How often a follower checks that its client is still there.
const LIVENESS: Duration = Duration::from_secs(1);

/// A parsed query of `vm.events`.
///
/// Invariant: `wait_s`, when set, is in 1..=[`MAX_WAIT_S`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EventQuery {
    /// First event wanted; `None`: the oldest kept; `Some(u64::MAX)`
    /// stands for `now` until resolved.
    pub since: Option<u64>,
    /// Long poll for at most this many seconds; `None`: stream.
    pub wait_s: Option<u64>,
}

/// Parses `since=N|now` and `wait_s=N`; unknown keys are refused.
pub fn parse_query(q: &str) -> Result<EventQuery, Reply> {
    let mut out = EventQuery::default();
    for kv in q.split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match k {
            "since" if v == "now" => out.since = Some(u64::MAX),
            "since" => {
                out.since = Some(v.parse().map_err(|_| {
                    Reply::error(
                        ErrorKind::InvalidParameter,
                        format!("since must be an event number or \"now\", got {v:?}"),
                    )
                })?)
            }
            "wait_s" => {
                let w: u64 = v.parse().unwrap_or(0);
                if !(1..=MAX_WAIT_S).contains(&w) {
                    return Err(Reply::error(
                        ErrorKind::InvalidParameter,
                        format!("wait_s must be in 1..={MAX_WAIT_S}, got {v:?}"),
                    ));
                }
                out.wait_s = Some(w);
            }
            _ => {
                return Err(Reply::error(
                    ErrorKind::InvalidParameter,
                    format!("unknown query parameter {k:?} (vm.events takes since and wait_s)"),
                ))
            }
        }
    }
    Ok(out)
}

/// Counts followers; a slot is released when its guard drops.
#[derive(Debug, Default)]
pub struct Followers(AtomicUsize);

/// A follower's place, released on drop.
pub struct FollowerSlot<'a>(&'a Followers);

impl Followers {
    /// A place for one more follower, if there is one.
    pub fn join(&self) -> Option<FollowerSlot<'_>> {
        let n = self.0.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_FOLLOWERS {
            self.0.fetch_sub(1, Ordering::SeqCst);
            None
        } else {
            Some(FollowerSlot(self))
        }
    }
}

impl Drop for FollowerSlot<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether the client closed its side (a read would return end of file).
fn client_gone(stream: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most 1 byte into `b`, which lives across the
    // call; the fd is owned by `stream` and open.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

fn write_chunk(stream: &mut UnixStream, data: &[u8]) -> std::io::Result<()> {
    stream.write_all(format!("{:x}\r\n", data.len()).as_bytes())?;
    stream.write_all(data)?;
    stream.write_all(b"\r\n")?;
    stream.flush()
}

fn lines_of(batch: &migration::api::EventBatch, from: u64) -> String {
    let mut out = String::new();
    if batch.missed > 0 {
        out.push_str(
            &json!({ "event": "missed", "count": batch.missed, "since": from }).to_string(),
        );
        out.push('\n');
    }
    for l in &batch.lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Serves one `vm.events` request on `stream`.
pub fn serve(stream: &mut UnixStream, log: &EventLog, followers: &Followers, q: EventQuery) {
    let mut from = match q.since {
        Some(u64::MAX) => log.next_seq(),
        Some(n) => n.max(1),
        None => 1,
    };
    if let Some(w) = q.wait_s {
        let batch = log.read_after(from, Duration::from_secs(w));
        let body = lines_of(&batch, from);
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: ferry\r\nConnection: close\r\n\
             Content-Type: application/x-ndjson\r\nX-Ferry-Next-Seq: {}\r\n\
             Content-Length: {}\r\n\r\n",
            batch.next,
            body.len()
        );
        let _ = stream
            .write_all(head.as_bytes())
            .and_then(|()| stream.write_all(body.as_bytes()))
            .and_then(|()| stream.flush());
        return;
    }
    let Some(_slot) = followers.join() else {
        let body = Reply::error(
            ErrorKind::Unavailable,
            format!("too many vm.events followers (at most {MAX_FOLLOWERS}); use wait_s to poll"),
        )
        .body;
        let _ = write_response(stream, 503, body.as_ref(), &[]);
        return;
    };
    let head = "HTTP/1.1 200 OK\r\nServer: ferry\r\nConnection: close\r\n\
                Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
    if stream.write_all(head.as_bytes()).is_err() {
        return;
    }
    loop {
        let batch = log.read_after(from, LIVENESS);
        if !batch.lines.is_empty() || batch.missed > 0 {
            let text = lines_of(&batch, from);
            if write_chunk(stream, text.as_bytes()).is_err() {
                return;
            }
        }
        from = batch.next;
        if client_gone(stream) {
            log::debug!("API: a vm.events follower left");
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        assert_eq!(parse_query("").unwrap(), EventQuery::default());
        let q = parse_query("since=5&wait_s=10").unwrap();
        assert_eq!((q.since, q.wait_s), (Some(5), Some(10)));
        assert_eq!(parse_query("since=now").unwrap().since, Some(u64::MAX));
        for bad in ["since=x", "wait_s=0", "wait_s=301", "follow=1"] {
            let r = parse_query(bad).unwrap_err();
            assert_eq!(r.status, 400, "{bad}");
        }
    }

    #[test]
    fn long_poll_and_follow() {
        use std::io::Read;
        let log = std::sync::Arc::new(EventLog::new());
        log.emit("a", json!({}));
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let followers = Followers::default();
        serve(
            &mut a,
            &log,
            &followers,
            EventQuery {
                since: None,
                wait_s: Some(1),
            },
        );
        drop(a);
        let mut s = String::new();
        b.read_to_string(&mut s).unwrap();
        assert!(s.contains("X-Ferry-Next-Seq: 2"), "{s}");
        assert!(s.contains("\"event\":\"a\""), "{s}");

        let (mut a, mut b) = UnixStream::pair().unwrap();
        let l2 = log.clone();
        let t = std::thread::spawn(move || {
            let f = Followers::default();
            serve(&mut a, &l2, &f, EventQuery::default());
        });
        log.emit("b", json!({"x": 1}));
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"event\":\"b\"") {
            let n = b.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
        assert!(text.contains("\"event\":\"a\""), "{text}");
        b.shutdown(std::net::Shutdown::Both).unwrap();
        drop(b);
        t.join().unwrap();
        let f = Followers::default();
        let slots: Vec<_> = (0..MAX_FOLLOWERS).map(|_| f.join().unwrap()).collect();
        assert!(f.join().is_none());
        drop(slots);
        assert!(f.join().is_some());
    }
}
