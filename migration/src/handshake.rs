//! Connection setup: the sender's connect (+ TLS) + HELLO, the receiver's
//! acceptor (which runs each newcomer's TLS handshake and reads its HELLO
//! on its own short-lived thread, under one deadline) and refusals with an
//! ERROR frame the sender can show.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::CancelToken;
use crate::error::MigrationError;
use crate::net::{
    self, lock, prepare_stream, recv_frame, recv_payload, send_frame, Channel, Ctl, Listener, Recv,
    Sock, TlsFailure,
};
use crate::tls::{ClientTls, ServerTls};
use crate::wire::{self, ConnRole, Frame, HEADER_LEN};

/// Time a newcomer has for its whole handshake: TLS and HELLO together.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of connections whose handshake runs at once (flood guard); more
/// are closed at once.
pub const MAX_PENDING: usize = 128;
/// Bound of connections that completed their handshake and wait for the
/// receiver to claim them; more are refused.
pub const MAX_UNCLAIMED: usize = 16;
/// Time to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The host part of a `tcp:HOST:PORT` URL (brackets of an IPv6 literal
/// removed): the name the destination's certificate must carry.
pub fn url_host(url: &str) -> Result<String, MigrationError> {
    let rest = url.strip_prefix("tcp:").unwrap_or(url);
    let host = match rest.rsplit_once(':') {
        Some((h, _)) => h,
        None => {
            return Err(MigrationError::InvalidParams(format!(
                "no port in URL {url:?} (expected tcp:HOST:PORT)"
            )))
        }
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(MigrationError::InvalidParams(format!(
            "no host in URL {url:?}"
        )));
    }
    Ok(host.to_string())
}

/// How the source reaches the destination.
///
/// Invariant: exactly one of `addrs` (not empty) and `unix` names the
/// destination; with `tls`, every connection runs a mutual-TLS handshake
/// that must verify the destination as the host name (never with `unix`).
#[derive(Debug, Clone)]
pub struct Dial {
    /// Resolved addresses, tried in order (empty with `unix`).
    pub addrs: Vec<SocketAddr>,
    /// The UNIX socket of a destination on this host (`unix:PATH`).
    pub unix: Option<PathBuf>,
    /// The protocol version announced on every connection (accepted by
    /// [`wire::version_accepted`]; [`wire::VERSION`] unless the request
    /// asked for an older one to reach an older destination).
    pub version: u16,
    /// TLS configuration and the destination's expected name.
    pub tls: Option<(ClientTls, String)>,
}

/// Checks a destination URL, `tcp:HOST:PORT` (resolved) or `unix:PATH`.
pub fn check_url(url: &str) -> Result<(), MigrationError> {
    if crate::handover::is_unix(url) {
        crate::handover::parse_unix(url).map(drop)
    } else {
        parse_url(url).map(drop)
    }
}

/// Parses `tcp:HOST:PORT` into socket addresses.
pub fn parse_url(url: &str) -> Result<Vec<SocketAddr>, MigrationError> {
    let rest = url.strip_prefix("tcp:").ok_or_else(|| {
        MigrationError::InvalidParams(format!(
            "unsupported URL {url:?} (expected tcp:HOST:PORT or unix:PATH)"
        ))
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
    s: &Channel,
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

/// Connects one connection of the session, runs TLS if configured, and
/// completes its HELLO. A destination that closes or resets the connection
/// before answering (its bound of pending handshakes is full: a flood) is
/// tried again, with backoff, for up to [`CONNECT_TIMEOUT`]; a refusal
/// with a reason, a TLS failure or a refused connect fail at once.
pub fn connect(
    dial: &Dial,
    session: u128,
    role: ConnRole,
    connections: u32,
    ctl: &Ctl,
) -> Result<Channel, MigrationError> {
    let start = Instant::now();
    let mut wait = Duration::from_millis(50);
    loop {
        match connect_once(dial, session, role, connections, ctl) {
            Err(e) if dropped_unanswered(&e) && start.elapsed() + wait < CONNECT_TIMEOUT => {
                log::info!("destination dropped the connection unanswered ({e}); trying again");
                std::thread::sleep(wait);
                ctl.check()?;
                wait = (wait * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

/// Whether `e` says the destination dropped the connection without a word.
fn dropped_unanswered(e: &MigrationError) -> bool {
    match e {
        MigrationError::PeerClosed(_) => true,
        MigrationError::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::BrokenPipe
                | std::io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

fn connect_once(
    dial: &Dial,
    session: u128,
    role: ConnRole,
    connections: u32,
    ctl: &Ctl,
) -> Result<Channel, MigrationError> {
    let what = match role {
        ConnRole::Main => "on the main connection".to_string(),
        ConnRole::Data { index } => format!("on data connection {index}"),
    };
    let mut last = None;
    let mut stream: Option<Sock> = None;
    if let Some(p) = &dial.unix {
        match UnixStream::connect(p) {
            Ok(s) => stream = Some(s.into()),
            Err(e) => {
                last = Some(std::io::Error::new(
                    e.kind(),
                    format!("unix:{}: {e}", p.display()),
                ))
            }
        }
    }
    for a in &dial.addrs {
        match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s.into());
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
    let s = match &dial.tls {
        None => Channel::plain(s),
        Some((tls, host)) => {
            let conn = tls.connect(host)?;
            let deadline = Instant::now() + ctl.stall.min(CONNECT_TIMEOUT);
            match Channel::handshake(s, conn.into(), deadline, &|| ctl.stopped(), true) {
                Ok(c) => c,
                Err(TlsFailure::NotTls(first)) => return Err(plain_answer(&first, &what)),
                Err(f) => return Err(MigrationError::tls_failure(f, &what)),
            }
        }
    };
    s.set_version(dial.version);
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

/// The error for a destination that answered our TLS handshake in plain
/// TCP: its ERROR frame's text when it sent one.
fn plain_answer(first: &[u8], what: &str) -> MigrationError {
    let msg = first
        .get(..HEADER_LEN)
        .and_then(|h| <&[u8; HEADER_LEN]>::try_from(h).ok())
        .and_then(|h| Frame::decode(h).ok())
        .and_then(|env| match env.frame {
            Frame::Error { len } => first
                .get(HEADER_LEN..HEADER_LEN + len as usize)
                .map(wire::message_text),
            _ => None,
        });
    MigrationError::Tls(match msg {
        Some(m) => {
            format!("the destination does not use TLS and refused the connection {what}: {m}")
        }
        None => format!(
            "the destination does not speak TLS {what} (is it receiving with \"tls\": false?)"
        ),
    })
}

/// A connection that presented a well-formed HELLO.
pub struct Incoming {
    /// The connection (blocking, with poll timeouts; TLS done if required).
    pub stream: Channel,
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
    /// Starts accepting on `listener`; with `tls`, every newcomer must
    /// complete a mutual-TLS handshake (and pass the subject check) first.
    pub fn start(listener: Listener, tls: Option<ServerTls>) -> Result<Acceptor, MigrationError> {
        listener
            .set_nonblocking(true)
            .map_err(|e| MigrationError::io("configuring the migration listener", e))?;
        net::set_big_buffers(&listener);
        let stop = CancelToken::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (tx, rx) = sync_channel(MAX_UNCLAIMED);
        let (st, th) = (stop.clone(), threads.clone());
        let main = std::thread::Builder::new()
            .name("mig-acceptor".into())
            .spawn(move || accept_loop(listener, st, th, tx, tls))
            .map_err(|e| MigrationError::io("spawning the acceptor", e))?;
        Ok(Acceptor {
            stop,
            threads,
            main: Some(main),
            rx,
        })
    }

    /// Refuses `s` with `msg` on a background thread (the sender shows it).
    pub fn refuse(&self, s: Channel, session: u128, msg: String) {
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
    s: Channel,
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
pub fn refuse_now(s: &Channel, session: u128, msg: &str, stop: &CancelToken) {
    net::send_message(s, session, |len| Frame::Error { len }, msg);
    s.close_write();
    let _ = s.tcp().set_read_timeout(Some(Duration::from_millis(50)));
    net::drain(s.tcp(), Duration::from_secs(1), &|| stop.is_cancelled());
}

/// Longest wait of the accept loop before it re-checks its stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(5);

fn accept_loop(
    listener: Listener,
    stop: CancelToken,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    tx: SyncSender<Incoming>,
    tls: Option<ServerTls>,
) {
    let mut dropped: u64 = 0;
    while !stop.is_cancelled() {
        match listener.accept() {
            Ok((s, peer)) => {
                let busy = {
                    let mut t = lock(&threads);
                    t.retain(|h| !h.is_finished());
                    t.len() >= MAX_PENDING
                };
                if busy {
                    dropped += 1;
                    if dropped.is_power_of_two() {
                        log::warn!(
                            "dropping migration connection from {peer}: {MAX_PENDING} handshakes \
                             pending ({dropped} dropped so far)"
                        );
                    }
                    continue;
                }
                log::debug!("migration connection from {peer}");
                let (st, tx, tls) = (stop.clone(), tx.clone(), tls.clone());
                let h = std::thread::Builder::new()
                    .name("mig-hello".into())
                    .spawn(move || {
                        let th = Handshake { stop: st, tx, tls };
                        th.run(s, peer)
                    });
                if let Ok(h) = h {
                    let mut t = lock(&threads);
                    t.retain(|h| !h.is_finished());
                    t.push(h);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Woken by the next connection at once (each data connection
                // of a session waits here for the one before it), by the
                // time-out otherwise, to see `stop`.
                net::wait_readable(&listener, ACCEPT_POLL);
            }
            Err(e) => {
                log::warn!("accepting a migration connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One newcomer's handshake: optional TLS, then HELLO, all before one
/// deadline ([`HELLO_TIMEOUT`]).
struct Handshake {
    stop: CancelToken,
    tx: SyncSender<Incoming>,
    tls: Option<ServerTls>,
}

/// Waits for the first byte of `s` (without consuming it) until `deadline`.
fn peek_first(s: &Sock, deadline: Instant, stop: &CancelToken) -> Option<u8> {
    let mut b = [0u8; 1];
    while Instant::now() < deadline && !stop.is_cancelled() {
        match s.peek(&mut b) {
            Ok(0) => return None,
            Ok(_) => return Some(b[0]),
            Err(e) if net::is_timeout(&e) => {}
            Err(_) => return None,
        }
    }
    None
}

impl Handshake {
    fn run(self, s: Sock, peer: String) {
        if prepare_stream(&s, true).is_err() {
            return;
        }
        let deadline = Instant::now() + HELLO_TIMEOUT;
        let Some(first) = peek_first(&s, deadline, &self.stop) else {
            log::debug!("migration connection from {peer}: closed or silent before its handshake");
            return;
        };
        let tls_hello = first == TLS_HANDSHAKE_RECORD;
        let ch = match (&self.tls, tls_hello) {
            (None, false) => Channel::plain(s),
            (None, true) => {
                let msg =
                    "connection refused: this destination receives in plain TCP (\"tls\": false), \
                           but the source started TLS";
                log::warn!("migration connection from {peer}: {msg}");
                return refuse_now(&Channel::plain(s), 0, msg, &self.stop);
            }
            (Some(_), false) => {
                let msg = "connection refused: this destination requires TLS; \
                           give the source a tls_dir (or receive with \"tls\": false)";
                log::warn!("migration connection from {peer}: {msg}");
                return refuse_now(&Channel::plain(s), 0, msg, &self.stop);
            }
            (Some(tls), true) => {
                let conn = match tls.accept() {
                    Ok(c) => c,
                    Err(e) => return log::warn!("TLS session for {peer}: {e}"),
                };
                let stop = self.stop.clone();
                match Channel::handshake(s, conn.into(), deadline, &|| stop.is_cancelled(), false) {
                    Ok(ch) => {
                        if let Err(msg) = tls.check_subject(ch.peer_leaf().as_deref()) {
                            log::warn!("migration connection from {peer} refused: {msg}");
                            let msg = format!("connection refused: {msg}");
                            return refuse_now(&ch, 0, &msg, &self.stop);
                        }
                        ch
                    }
                    Err(f) => {
                        let e = MigrationError::tls_failure(f, &format!("from {peer}"));
                        return log::warn!("migration connection refused: {e}");
                    }
                }
            }
        };
        self.read_hello(ch, deadline, peer)
    }

    fn read_hello(self, s: Channel, deadline: Instant, peer: String) {
        let ctl = Ctl::new(self.stop.clone(), HELLO_TIMEOUT);
        ctl.set_deadline(deadline, format!("no HELLO within {HELLO_TIMEOUT:?}"));
        let res = loop {
            match recv_frame(&s, &ctl, true, "reading HELLO") {
                Ok(Recv::Idle) if Instant::now() < deadline => continue,
                Ok(Recv::Idle) => break Err(format!("no HELLO within {HELLO_TIMEOUT:?}")),
                Ok(Recv::Eof) => return,
                Ok(Recv::Frame(env)) => match env.frame {
                    Frame::Hello { role, connections } => {
                        // Answer in the version the source spoke (accepted
                        // by the header check: MIN_VERSION..=VERSION).
                        s.set_version(env.version);
                        if env.version != wire::VERSION {
                            log::info!(
                                "migration connection from {peer} speaks protocol version {} \
                                 (this build: {}); answering in {}",
                                env.version,
                                wire::VERSION,
                                env.version
                            );
                        }
                        break Ok((env.session, role, connections));
                    }
                    f => break Err(format!("expected HELLO, got {:?}", f.kind())),
                },
                Err(MigrationError::Aborted) => match ctl.take_error() {
                    Some(MigrationError::Timeout(m)) => break Err(m),
                    _ => return,
                },
                Err(e) => break Err(e.to_string()),
            }
        };
        match res {
            Ok((session, role, connections)) => {
                let inc = Incoming {
                    stream: s,
                    session,
                    role,
                    connections,
                };
                match self.tx.try_send(inc) {
                    Ok(()) => {}
                    Err(TrySendError::Full(inc)) => {
                        let msg = format!(
                            "connection refused: {MAX_UNCLAIMED} connections already wait to be claimed"
                        );
                        log::warn!("migration connection from {peer}: {msg}");
                        refuse_now(&inc.stream, session, &msg, &self.stop);
                    }
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            Err(msg) => {
                log::warn!("migration connection from {peer} refused: {msg}");
                refuse_now(&s, 0, &format!("connection refused: {msg}"), &self.stop)
            }
        }
    }
}
