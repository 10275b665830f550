//! One migration socket, TCP or UNIX stream ([`Sock`]), and its listener
//! ([`Listener`]). A UNIX socket reaches a destination on the same host
//! (`unix:PATH`, the live-upgrade path); everything above the socket (the
//! frames, TLS, the state machines) is the same on both.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// A connected stream socket.
///
/// Invariant: the socket is connected (or was, before a shutdown); the
/// TCP-only calls ([`Sock::set_nodelay`], [`Sock::peer_addr`]) are no-ops or
/// errors on a UNIX socket, never a panic.
#[derive(Debug)]
pub enum Sock {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A UNIX stream connection (same host).
    Unix(UnixStream),
}

impl From<TcpStream> for Sock {
    fn from(s: TcpStream) -> Sock {
        Sock::Tcp(s)
    }
}

impl From<UnixStream> for Sock {
    fn from(s: UnixStream) -> Sock {
        Sock::Unix(s)
    }
}

impl Sock {
    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }

    /// Sets the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_read_timeout(t),
            Sock::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Sets the write timeout.
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_write_timeout(t),
            Sock::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nonblocking(on),
            Sock::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// TCP_NODELAY on TCP; nothing to do on a UNIX socket (no Nagle).
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.set_nodelay(on),
            Sock::Unix(_) => Ok(()),
        }
    }

    /// Reads without consuming.
    pub fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.peek(buf),
            Sock::Unix(s) => {
                // SAFETY: recv with MSG_PEEK into `buf`, valid for
                // `buf.len()` writable bytes for the duration of the call.
                let r = unsafe {
                    libc::recv(
                        s.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_PEEK,
                    )
                };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }
        }
    }

    /// A second handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
        })
    }

    /// The peer's address (TCP only; a UNIX peer has none worth showing).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Sock::Tcp(s) => s.peer_addr(),
            Sock::Unix(_) => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a UNIX socket has no IP peer",
            )),
        }
    }

    /// The UNIX stream, if this is one (SCM_RIGHTS needs it).
    pub fn unix(&self) -> Option<&UnixStream> {
        match self {
            Sock::Unix(s) => Some(s),
            Sock::Tcp(_) => None,
        }
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&*s).write(buf),
            Sock::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket, TCP or UNIX.
///
/// Invariant: a UNIX listener owns its path: it unlinks it when dropped
/// (only while the path still names a socket).
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// UNIX stream, with the path it is bound to.
    Unix(UnixListener, std::path::PathBuf),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

impl Listener {
    /// Accepts one connection and names its peer for logs.
    pub fn accept(&self) -> io::Result<(Sock, String)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, a)| (Sock::Tcp(s), a.to_string())),
            Listener::Unix(l, p) => l
                .accept()
                .map(|(s, _)| (Sock::Unix(s), format!("unix:{}", p.display()))),
        }
    }

    /// Blocking or not.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l, _) => l.set_nonblocking(on),
        }
    }

    /// The TCP address, if TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            use std::os::unix::fs::FileTypeExt;
            // Unlink the path only while it still names a socket.
            if std::fs::symlink_metadata(&*p).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(&*p);
            }
        }
    }
}
