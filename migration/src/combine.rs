//! The one place that decides which transport features a send request may
//! combine: the transport (`tcp:`, TLS over TCP, `unix:`), zero-copy,
//! compression, post-copy and the connection count.
//!
//! Over TCP (plain or TLS) everything combines with everything, at any
//! connection count: zero-copy applies to the guest pages sent as they
//! are (with TLS: to the sealed records), compression runs in each writer
//! thread before the record layer, compressed packets go copied (they are
//! the writer's reused buffer, not guest memory), and post-copy's
//! background push is compressed and zero-copy like a pass. Each of those
//! combinations is run end to end by `tests::combine`.
//!
//! A `unix:` destination is this host: its RAM is handed over when it is
//! shareable (nothing of it moves) and copied once by the kernel
//! otherwise. There TLS, zero-copy, compression and post-copy cannot help
//! and are refused with the reason, so that a request never silently means
//! less than it says.

use crate::api::{Compression, SendParams};
use crate::error::MigrationError;
use crate::live::{Policy, Technique};

/// The transport of a send request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tcp:HOST:PORT`, plain.
    Tcp,
    /// `tcp:HOST:PORT` with mutual TLS 1.3.
    Tls,
    /// `unix:PATH`, a destination on this host.
    Unix,
}

/// The features of one send request that interact.
///
/// Invariant: built from a request by [`Features::of`]; `postcopy` is set
/// when the request can end in post-copy (from the start, or by the
/// `post-copy` policy after a stall).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// Where the migration goes.
    pub transport: Transport,
    /// `"zero_copy": true`.
    pub zero_copy: bool,
    /// `"compression": "zstd"`.
    pub compression: bool,
    /// Post-copy from the start or by the policy.
    pub postcopy: bool,
}

impl Features {
    /// The features `p` asks for (its TLS choice as [`SendParams::validate`]
    /// reads it: `tls_dir` given, or `tls` not false).
    pub fn of(p: &SendParams) -> Features {
        let unix = crate::handover::is_unix(&p.destination_url);
        let tls = p.tls_dir.is_some() || p.tls == Some(true);
        Features {
            transport: match (unix, tls) {
                (true, _) => Transport::Unix,
                (false, true) => Transport::Tls,
                (false, false) => Transport::Tcp,
            },
            zero_copy: p.zero_copy,
            compression: p.compression != Compression::None,
            postcopy: p.technique == Some(Technique::PostCopy)
                || p.policy == Some(Policy::PostCopy),
        }
    }

    /// `Ok` when these features work together; otherwise the reason, for
    /// an `invalid-parameter` refusal of the request.
    pub fn check(&self) -> Result<(), String> {
        if self.transport != Transport::Unix {
            return Ok(());
        }
        // A unix: URL with TLS asked for is refused by the TLS choice
        // itself (`SendParams::client_tls`), with its own reason.
        if self.zero_copy {
            return Err(
                "\"zero_copy\" is for TCP: the kernel has no MSG_ZEROCOPY on UNIX \
                        sockets, and a unix: migration hands shareable memory over without \
                        any copy (and copies other memory once, in the kernel)"
                    .into(),
            );
        }
        if self.compression {
            return Err(
                "\"compression\" does not apply to a unix: destination: shareable \
                        memory is handed over, not sent, and other memory crosses a local \
                        socket faster than zstd could compress it"
                    .into(),
            );
        }
        if self.postcopy {
            return Err(
                "post-copy does not apply to a unix: destination: shareable memory \
                        is handed over whole at the switch-over, and other memory is copied \
                        at memory speed; use pre-copy (the default technique and policy)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Checks the combination of `p`'s features ([`Features::check`]).
pub fn check(p: &SendParams) -> Result<(), MigrationError> {
    Features::of(p)
        .check()
        .map_err(MigrationError::InvalidParams)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Features> {
        let mut v = Vec::new();
        for transport in [Transport::Tcp, Transport::Tls, Transport::Unix] {
            for bits in 0..8u8 {
                v.push(Features {
                    transport,
                    zero_copy: bits & 1 != 0,
                    compression: bits & 2 != 0,
                    postcopy: bits & 4 != 0,
                });
            }
        }
        v
    }

    #[test]
    fn everything_combines_over_tcp_and_tls() {
        for f in all() {
            if f.transport != Transport::Unix {
                assert_eq!(f.check(), Ok(()), "{f:?}");
            }
        }
    }

    #[test]
    fn unix_refuses_what_cannot_help_with_a_reason() {
        for f in all().into_iter().filter(|f| f.transport == Transport::Unix) {
            let plain = !f.zero_copy && !f.compression && !f.postcopy;
            match f.check() {
                Ok(()) => assert!(plain, "{f:?} accepted"),
                Err(why) => {
                    assert!(!plain, "{f:?} refused");
                    assert!(why.contains("unix:"), "{why}");
                }
            }
        }
    }

    #[test]
    fn features_are_read_from_the_request() {
        let mut p = SendParams::to("tcp:127.0.0.1:1");
        p.tls = Some(false);
        assert_eq!(
            Features::of(&p),
            Features {
                transport: Transport::Tcp,
                zero_copy: false,
                compression: false,
                postcopy: false
            }
        );
        p.tls_dir = Some("/etc/ferry/tls".into());
        p.zero_copy = true;
        p.compression = Compression::Zstd;
        p.policy = Some(Policy::PostCopy);
        let f = Features::of(&p);
        assert_eq!(f.transport, Transport::Tls);
        assert!(f.zero_copy && f.compression && f.postcopy);
        let mut u = SendParams::to("unix:/run/ferry.sock");
        u.technique = Some(Technique::PostCopy);
        assert_eq!(Features::of(&u).transport, Transport::Unix);
        let e = check(&u).unwrap_err().to_string();
        assert!(e.contains("post-copy"), "{e}");
    }
}
