//! Connection setup: the sender's connect + HELLO, the receiver's acceptor
//! (which reads and validates each newcomer's HELLO on its own short-lived
//! thread) and refusals with an ERROR frame the sender can show.

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::net::{self, lock, prepare_stream, recv_frame, recv_payload, send_frame, Ctl, Recv};
use crate::wire::{self, ConnRole, Frame};

/// Time a newcomer has to send its HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of connections whose HELLO is being read at once (flood guard).
const MAX_PENDING: usize = 128;
/// Time to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses `tcp:HOST:PORT` into socket addresses.
pub fn parse_url(url: &str) -> Result<Vec<SocketAddr>, MigrationError> {
    let rest = url.strip_prefix("tcp:").ok_or_else(|| {
        MigrationError::InvalidParams(format!("unsupported URL {url:?} (expected tcp:HOST:PORT)"))
    })?;
    let addrs: Vec<SocketAddr> = rest
        .to_socket_addrs()
        .map_err(|e| MigrationError::InvalidParams(format!("cannot resolve {rest:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(MigrationError::InvalidParams(format!(
            "{rest:?} resolves to nothing"
        )));
    }
    Ok(addrs)
}

/// Waits up to `timeout` for the reply to a request: OK → `Ok(())`, ERROR →
/// [`MigrationError::Remote`] with the destination's message.
pub fn await_reply(
    s: &TcpStream,
    session: u128,
    ctl: &Ctl,
    timeout: Duration,
    what: &str,
) -> Result<(), MigrationError> {
    let start = Instant::now();
    loop {
        match recv_frame(s, ctl, true, what)? {
            Recv::Idle => {
                if start.elapsed() > timeout {
                    return Err(MigrationError::Timeout(format!(
                        "no reply within {timeout:?} {what}"
                    )));
                }
            }
            Recv::Eof => return Err(MigrationError::PeerClosed(what.to_string())),
            Recv::Frame(env) => {
                return match env.frame {
                    Frame::Error { len } => {
                        let m = recv_payload(s, len, ctl, what)?;
                        Err(MigrationError::Remote(wire::message_text(&m)))
                    }
                    Frame::Ok if env.session == session => Ok(()),
                    Frame::Keepalive => continue,
                    f => Err(MigrationError::proto(format!(
                        "unexpected {:?} reply {what}",
                        f.kind()
                    ))),
                };
            }
        }
    }
}

/// Connects one connection of the session and completes its HELLO.
pub fn connect(
    addrs: &[SocketAddr],
    session: u128,
    role: ConnRole,
    connections: u32,
    ctl: &Ctl,
) -> Result<TcpStream, MigrationError> {
    let what = match role {
        ConnRole::Main => "on the main connection".to_string(),
        ConnRole::Data { index } => format!("on data connection {index}"),
    };
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let s = match stream {
        Some(s) => s,
        None => {
            let e = last.unwrap_or_else(|| std::io::Error::other("no address"));
            return Err(MigrationError::io(
                format!("connecting to the destination {what}"),
                e,
            ));
        }
    };
    prepare_stream(&s, role != ConnRole::Main)?;
    let hello = Frame::Hello { role, connections };
    send_frame(
        &s,
        session,
        &hello,
        &[],
        ctl,
        &format!("sending HELLO {what}"),
    )?;
    await_reply(
        &s,
        session,
        ctl,
        ctl.stall,
        &format!("waiting for the HELLO reply {what}"),
    )?;
    Ok(s)
}

/// A connection that presented a well-formed HELLO.
pub struct Incoming {
    /// The connection (blocking, with poll timeouts).
    pub stream: TcpStream,
    /// The session its HELLO names.
    pub session: u128,
    /// Its role.
    pub role: ConnRole,
    /// The data connections its HELLO announces.
    pub connections: u32,
}

/// Background acceptor of one `receive` call.
///
/// Invariant: every thread it starts (accept loop, HELLO readers, refusals)
/// is joined by [`Acceptor::stop`]; each is bounded by a short timeout and
/// by the stop token.
pub struct Acceptor {
    stop: CancelToken,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    main: Option<JoinHandle<()>>,
    /// Newcomers with a valid HELLO, in arrival order.
    pub rx: Receiver<Incoming>,
}

impl Acceptor {
    /// Starts accepting on `listener`.
    pub fn start(listener: TcpListener) -> Result<Acceptor, MigrationError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| MigrationError::io("configuring the migration listener", e))?;
        net::set_big_buffers(&listener);
        let stop = CancelToken::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (tx, rx) = channel();
        let (st, th) = (stop.clone(), threads.clone());
        let main = std::thread::Builder::new()
            .name("mig-acceptor".into())
            .spawn(move || accept_loop(listener, st, th, tx))
            .map_err(|e| MigrationError::io("spawning the acceptor", e))?;
        Ok(Acceptor {
            stop,
            threads,
            main: Some(main),
            rx,
        })
    }

    /// Refuses `s` with `msg` on a background thread (the sender shows it).
    pub fn refuse(&self, s: TcpStream, session: u128, msg: String) {
        spawn_refusal(&self.threads, self.stop.clone(), s, session, msg);
    }

    /// Stops accepting and joins every thread.
    pub fn stop(mut self) {
        self.stop.cancel();
        if let Some(h) = self.main.take() {
            let _ = h.join();
        }
        let hs: Vec<_> = lock(&self.threads).drain(..).collect();
        for h in hs {
            let _ = h.join();
        }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(h) = self.main.take() {
            let _ = h.join();
        }
    }
}

fn spawn_refusal(
    threads: &Mutex<Vec<JoinHandle<()>>>,
    stop: CancelToken,
    s: TcpStream,
    session: u128,
    msg: String,
) {
    log::warn!("refusing migration connection: {msg}");
    let h = std::thread::Builder::new()
        .name("mig-refuse".into())
        .spawn(move || refuse_now(&s, session, &msg, &stop));
    if let Ok(h) = h {
        let mut t = lock(threads);
        t.retain(|h| !h.is_finished());
        t.push(h);
    }
}

/// Sends ERROR(msg), closes the write side, and drains what the peer still
/// sends for a moment so that the close does not reset the error away.
pub fn refuse_now(s: &TcpStream, session: u128, msg: &str, stop: &CancelToken) {
    net::send_message(s, session, |len| Frame::Error { len }, msg);
    let _ = s.shutdown(Shutdown::Write);
    let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(1) && !stop.is_cancelled() {
        match std::io::Read::read(&mut &*s, &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    stop: CancelToken,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    tx: Sender<Incoming>,
) {
    while !stop.is_cancelled() {
        match listener.accept() {
            Ok((s, peer)) => {
                let busy = {
                    let mut t = lock(&threads);
                    t.retain(|h| !h.is_finished());
                    t.len() >= MAX_PENDING
                };
                if busy {
                    log::warn!(
                        "dropping migration connection from {peer}: too many pending handshakes"
                    );
                    continue;
                }
                log::debug!("migration connection from {peer}");
                let (st, tx) = (stop.clone(), tx.clone());
                let h = std::thread::Builder::new()
                    .name("mig-hello".into())
                    .spawn(move || read_hello(s, st, tx));
                if let Ok(h) = h {
                    let mut t = lock(&threads);
                    t.retain(|h| !h.is_finished());
                    t.push(h);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                log::warn!("accepting a migration connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn read_hello(s: TcpStream, stop: CancelToken, tx: Sender<Incoming>) {
    if prepare_stream(&s, true).is_err() {
        return;
    }
    let ctl = Ctl::new(stop.clone(), HELLO_TIMEOUT);
    let start = Instant::now();
    let res = loop {
        match recv_frame(&s, &ctl, true, "reading HELLO") {
            Ok(Recv::Idle) if start.elapsed() < HELLO_TIMEOUT => continue,
            Ok(Recv::Idle) => break Err("no HELLO within 5 s".to_string()),
            Ok(Recv::Eof) => return,
            Ok(Recv::Frame(env)) => match env.frame {
                Frame::Hello { role, connections } => break Ok((env.session, role, connections)),
                f => break Err(format!("expected HELLO, got {:?}", f.kind())),
            },
            Err(MigrationError::Aborted) => return,
            Err(e) => break Err(e.to_string()),
        }
    };
    match res {
        Ok((session, role, connections)) => {
            let _ = tx.send(Incoming {
                stream: s,
                session,
                role,
                connections,
            });
        }
        Err(msg) => refuse_now(&s, 0, &format!("connection refused: {msg}"), &stop),
    }
}
