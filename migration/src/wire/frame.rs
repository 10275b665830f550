//! Typed frames: a validated [`Header`] decoded once into a [`Frame`], and
//! every frame the state machines send encoded from one.
//!
//! The mapping to the raw header fields (`a`, `b`, `c`, `count`, `len`) is
//! written down here and nowhere else; `docs/migration-protocol.md` has the
//! same table.

use super::{
    DevItemKind, Header, Kind, WireError, HEADER_LEN, RANGE_ENTRY_LEN, ROLE_DATA, ROLE_MAIN,
};

/// Role of a connection, announced by HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnRole {
    /// The main (control) connection.
    Main,
    /// Data connection `index` (`index < connections`).
    Data {
        /// Index of the connection, `0..connections`.
        index: u32,
    },
}

/// `a` of an ERROR frame whose sender discarded its VM unstarted
/// ([`Frame::Discarded`]); a plain ERROR has 0.
pub const ERROR_DISCARDED: u64 = 1;

/// One frame as the state machines see it: the kind with its typed
/// arguments. Payload lengths (`len`) are bounded as [`Header::decode`]
/// checks; the payload itself follows the header on the wire.
///
/// Invariant of a decoded frame: every field is within the bounds its kind
/// allows (device indexes < `MAX_DEVICES`, connection counts
/// `1..=MAX_CONNECTIONS`, `index < connections`, lengths within bounds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// First frame of every connection (source → destination).
    Hello {
        /// Main or data connection.
        role: ConnRole,
        /// Data connections of the session.
        connections: u32,
    },
    /// Positive reply to HELLO or SETUP.
    Ok,
    /// Refusal or failure; a UTF-8 message of `len` bytes follows.
    Error {
        /// Message bytes.
        len: u64,
    },
    /// ERROR with `a` = [`ERROR_DISCARDED`]: the destination failed and
    /// discarded its VM without ever starting the guest, and never will; a
    /// UTF-8 message of `len` bytes follows. Unlike a plain ERROR it lets the
    /// source resume its VM even after COMMIT.
    Discarded {
        /// Message bytes.
        len: u64,
    },
    /// Configuration, RAM layout and devices; `len` bytes of SETUP follow.
    Setup {
        /// Payload bytes.
        len: u64,
    },
    /// RAM packet: `ranges` range-table entries, then `data_len` page bytes
    /// (or, compressed, `zstd_len` bytes that decompress to them).
    Ram {
        /// Pass of the pages (≥ 1 when sent).
        pass: u64,
        /// Range-table entries (1..=`MAX_RANGES`).
        ranges: u32,
        /// Page data bytes (a multiple of the page size), raw.
        data_len: u64,
        /// Compressed page data bytes on the wire, `1..data_len`; 0: the
        /// data is not compressed ([`super::FLAG_ZSTD`]).
        zstd_len: u64,
    },
    /// End of pass `pass` on this connection.
    Sync {
        /// The pass that ends.
        pass: u64,
    },
    /// Device stream item `seq` of device `dev`; `len` bytes follow.
    Device {
        /// Device index.
        dev: u32,
        /// Sequence number within the device's stream.
        seq: u64,
        /// What the item is.
        item: DevItemKind,
        /// Payload bytes (non-zero exactly for data items).
        len: u64,
    },
    /// Final VM state (`len` bytes follow).
    State {
        /// Last RAM pass.
        final_pass: u64,
        /// Whether the destination starts paused.
        user_paused: bool,
        /// Source pause time, µs since the epoch.
        pause_us: u64,
        /// State bytes.
        len: u64,
    },
    /// The destination started the VM.
    Resumed {
        /// Resume time, µs since the epoch.
        resume_us: u64,
    },
    /// Switch-over ack: device `dev` loaded its initial data.
    Ack {
        /// Device index.
        dev: u32,
        /// Bytes loaded.
        bytes: u64,
        /// Load time in µs.
        load_us: u64,
    },
    /// The source gives up; a UTF-8 message of `len` bytes follows.
    Abort {
        /// Message bytes.
        len: u64,
    },
    /// Liveness on the main connection, both ways.
    Keepalive,
    /// The destination restored the VM state and waits for COMMIT.
    Ready,
    /// The source commits the switch-over.
    Commit,
    /// Device load rate measured by the destination.
    Rate {
        /// Device index.
        dev: u32,
        /// Bytes per second.
        rate_bps: u64,
        /// Bytes loaded so far.
        loaded: u64,
    },
    /// Incoming migrations running on the destination host now (its own
    /// included), for the source's share of the host bandwidth.
    HostLoad {
        /// Migrations, 1..=[`crate::host::MAX_HOST_MIGRATIONS`].
        migrations: u32,
    },
    /// Switch to post-copy; the bitmap of the missing pages (`len` bytes,
    /// see [`super::decode_bitmap`]) follows.
    Postcopy {
        /// The last pass on the data connections (its SYNC ends pre-copy).
        final_pass: u64,
        /// Pages set in the bitmap.
        missing: u64,
        /// Bitmap bytes.
        len: u64,
    },
    /// A vCPU of the destination faulted on a missing page.
    PageRequest {
        /// Guest-physical address, page-aligned.
        gpa: u64,
        /// Pages asked for (1..=`MAX_REQUEST_PAGES`).
        npages: u64,
    },
    /// Post-copy RAM packet: `ranges` range-table entries, then `data_len`
    /// page bytes (the RAM layout).
    Pages {
        /// It answers a PAGE_REQUEST (else: background push).
        requested: bool,
        /// Range-table entries (1..=`MAX_RANGES`).
        ranges: u32,
        /// Page data bytes (a multiple of the page size), raw.
        data_len: u64,
        /// Compressed page data bytes, as for [`Frame::Ram`] (0: plain).
        zstd_len: u64,
    },
    /// The destination has every page: post-copy is over.
    PostcopyDone {
        /// Page requests the destination sent.
        requests: u64,
        /// Median fault latency, µs.
        p50_us: u64,
        /// 99th percentile of the fault latency, µs.
        p99_us: u64,
    },
    /// Reconnects a paused post-copy (after HELLO with the old session).
    Resume {
        /// Connection epoch, ≥ 1 (the first connection was epoch 0).
        epoch: u64,
    },
    /// Memory handover: `regions` entries of (gpa, size, offset) follow
    /// (`len` bytes), one SCM_RIGHTS file descriptor per region rides on
    /// the frame (version 4, `unix:` only).
    Handover {
        /// Regions (and fds), `1..=MAX_HANDOVER_REGIONS`.
        regions: u64,
        /// Payload bytes (`regions` × 24).
        len: u64,
    },
    /// Answer to RESUME: the pages still missing (`len` bytes of bitmap).
    ResumeAck {
        /// The epoch of the RESUME answered.
        epoch: u64,
        /// Pages set in the bitmap.
        missing: u64,
        /// Bitmap bytes.
        len: u64,
    },
}

/// A decoded header: the session it carries and its typed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// The protocol version the frame was stamped with (accepted).
    pub version: u16,
    /// Session id (0 in refusals of strangers).
    pub session: u128,
    /// The frame.
    pub frame: Frame,
}

impl Frame {
    /// The frame's kind.
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Hello { .. } => Kind::Hello,
            Frame::Ok => Kind::Ok,
            Frame::Error { .. } | Frame::Discarded { .. } => Kind::Error,
            Frame::Setup { .. } => Kind::Setup,
            Frame::Ram { .. } => Kind::Ram,
            Frame::Sync { .. } => Kind::Sync,
            Frame::Device { .. } => Kind::Device,
            Frame::State { .. } => Kind::State,
            Frame::Resumed { .. } => Kind::Resumed,
            Frame::Ack { .. } => Kind::Ack,
            Frame::Abort { .. } => Kind::Abort,
            Frame::Keepalive => Kind::Keepalive,
            Frame::Ready => Kind::Ready,
            Frame::Commit => Kind::Commit,
            Frame::Rate { .. } => Kind::Rate,
            Frame::HostLoad { .. } => Kind::HostLoad,
            Frame::Postcopy { .. } => Kind::Postcopy,
            Frame::PageRequest { .. } => Kind::PageRequest,
            Frame::Pages { .. } => Kind::Pages,
            Frame::PostcopyDone { .. } => Kind::PostcopyDone,
            Frame::Resume { .. } => Kind::Resume,
            Frame::ResumeAck { .. } => Kind::ResumeAck,
            Frame::Handover { .. } => Kind::Handover,
        }
    }

    /// Bytes that follow the header on the wire.
    pub fn payload_len(&self) -> u64 {
        match *self {
            Frame::Error { len }
            | Frame::Discarded { len }
            | Frame::Setup { len }
            | Frame::Abort { len }
            | Frame::Device { len, .. }
            | Frame::State { len, .. }
            | Frame::Postcopy { len, .. }
            | Frame::ResumeAck { len, .. }
            | Frame::Handover { len, .. } => len,
            Frame::Ram {
                ranges,
                data_len,
                zstd_len,
                ..
            }
            | Frame::Pages {
                ranges,
                data_len,
                zstd_len,
                ..
            } => {
                let data = if zstd_len > 0 { zstd_len } else { data_len };
                ranges as u64 * RANGE_ENTRY_LEN as u64 + data
            }
            _ => 0,
        }
    }

    /// The raw header of this frame in `session`.
    pub fn header(&self, session: u128) -> Header {
        let h = Header::new(self.kind(), session).with_len(self.payload_len());
        match *self {
            Frame::Hello { role, connections } => {
                let (r, i) = match role {
                    ConnRole::Main => (ROLE_MAIN, 0),
                    ConnRole::Data { index } => (ROLE_DATA, index as u64),
                };
                h.args(r, i, connections as u64)
            }
            Frame::Ram {
                pass,
                ranges,
                data_len,
                zstd_len,
            } => {
                let mut h = h.args(pass, 0, if zstd_len > 0 { data_len } else { 0 });
                h.count = ranges;
                if zstd_len > 0 {
                    h.flags = super::FLAG_ZSTD;
                }
                h
            }
            Frame::Pages {
                requested,
                ranges,
                data_len,
                zstd_len,
            } => {
                let mut h = h.args(requested as u64, 0, if zstd_len > 0 { data_len } else { 0 });
                h.count = ranges;
                if zstd_len > 0 {
                    h.flags = super::FLAG_ZSTD;
                }
                h
            }
            Frame::Postcopy {
                final_pass,
                missing,
                ..
            } => h.args(final_pass, missing, 0),
            Frame::PageRequest { gpa, npages } => h.args(gpa, npages, 0),
            Frame::PostcopyDone {
                requests,
                p50_us,
                p99_us,
            } => h.args(requests, p50_us, p99_us),
            Frame::Resume { epoch } => h.args(epoch, 0, 0),
            Frame::ResumeAck { epoch, missing, .. } => h.args(epoch, missing, 0),
            Frame::Handover { regions, .. } => h.args(regions, 0, 0),
            Frame::Sync { pass } => h.args(pass, 0, 0),
            Frame::Discarded { .. } => h.args(ERROR_DISCARDED, 0, 0),
            Frame::Device { dev, seq, item, .. } => h.args(dev as u64, seq, item as u64),
            Frame::State {
                final_pass,
                user_paused,
                pause_us,
                ..
            } => h.args(final_pass, user_paused as u64, pause_us),
            Frame::Resumed { resume_us } => h.args(resume_us, 0, 0),
            Frame::Ack {
                dev,
                bytes,
                load_us,
            } => h.args(dev as u64, bytes, load_us),
            Frame::Rate {
                dev,
                rate_bps,
                loaded,
            } => h.args(dev as u64, rate_bps, loaded),
            Frame::HostLoad { migrations } => h.args(migrations as u64, 0, 0),
            Frame::Ok
            | Frame::Error { .. }
            | Frame::Setup { .. }
            | Frame::Abort { .. }
            | Frame::Keepalive
            | Frame::Ready
            | Frame::Commit => h,
        }
    }

    /// Encodes the frame's header in `session` at [`super::VERSION`].
    pub fn encode(&self, session: u128) -> [u8; HEADER_LEN] {
        self.header(session).encode()
    }

    /// Encodes the frame's header in `session` at protocol `version` (the
    /// one its connection negotiated).
    pub fn encode_v(&self, session: u128, version: u16) -> [u8; HEADER_LEN] {
        self.header(session).with_version(version).encode()
    }

    /// Decodes and validates a header into a typed frame.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Envelope, WireError> {
        let h = Header::decode(b)?;
        Ok(Envelope {
            version: h.version,
            session: h.session,
            frame: Frame::from_header(&h)?,
        })
    }

    /// Types a header that passed [`Header::decode`]'s validation.
    pub fn from_header(h: &Header) -> Result<Frame, WireError> {
        let dev = |v: u64| u32::try_from(v).map_err(|_| h.invalid(format!("device index {v}")));
        Ok(match h.kind {
            Kind::Hello => {
                let connections = u32::try_from(h.c)
                    .map_err(|_| h.invalid(format!("{} data connections", h.c)))?;
                let role = if h.a == ROLE_MAIN {
                    ConnRole::Main
                } else {
                    ConnRole::Data {
                        index: u32::try_from(h.b)
                            .map_err(|_| h.invalid(format!("index {}", h.b)))?,
                    }
                };
                Frame::Hello { role, connections }
            }
            Kind::Ok => Frame::Ok,
            // `Header::decode` allows only 0 and ERROR_DISCARDED.
            Kind::Error if h.a == ERROR_DISCARDED => Frame::Discarded { len: h.len },
            Kind::Error => Frame::Error { len: h.len },
            Kind::Setup => Frame::Setup { len: h.len },
            Kind::Ram => Frame::Ram {
                pass: h.a,
                ranges: h.count,
                data_len: h.ram_data_len(),
                zstd_len: h.ram_zstd_len(),
            },
            Kind::Sync => Frame::Sync { pass: h.a },
            Kind::Device => Frame::Device {
                dev: dev(h.a)?,
                seq: h.b,
                item: DevItemKind::from_u64(h.c)
                    .ok_or_else(|| h.invalid(format!("unknown item kind {}", h.c)))?,
                len: h.len,
            },
            Kind::State => Frame::State {
                final_pass: h.a,
                user_paused: h.b != 0,
                pause_us: h.c,
                len: h.len,
            },
            Kind::Resumed => Frame::Resumed { resume_us: h.a },
            Kind::Ack => Frame::Ack {
                dev: dev(h.a)?,
                bytes: h.b,
                load_us: h.c,
            },
            Kind::Abort => Frame::Abort { len: h.len },
            Kind::Keepalive => Frame::Keepalive,
            Kind::Ready => Frame::Ready,
            Kind::Commit => Frame::Commit,
            Kind::Rate => Frame::Rate {
                dev: dev(h.a)?,
                rate_bps: h.b,
                loaded: h.c,
            },
            // `Header::decode` bounds `a` by MAX_HOST_MIGRATIONS.
            Kind::HostLoad => Frame::HostLoad {
                migrations: u32::try_from(h.a)
                    .map_err(|_| h.invalid(format!("{} migrations", h.a)))?,
            },
            Kind::Postcopy => Frame::Postcopy {
                final_pass: h.a,
                missing: h.b,
                len: h.len,
            },
            Kind::PageRequest => Frame::PageRequest {
                gpa: h.a,
                npages: h.b,
            },
            Kind::Pages => Frame::Pages {
                requested: h.a == 1,
                ranges: h.count,
                data_len: h.ram_data_len(),
                zstd_len: h.ram_zstd_len(),
            },
            Kind::PostcopyDone => Frame::PostcopyDone {
                requests: h.a,
                p50_us: h.b,
                p99_us: h.c,
            },
            Kind::Resume => Frame::Resume { epoch: h.a },
            Kind::ResumeAck => Frame::ResumeAck {
                epoch: h.a,
                missing: h.b,
                len: h.len,
            },
            Kind::Handover => Frame::Handover {
                regions: h.a,
                len: h.len,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traits::PAGE_SIZE;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello {
                role: ConnRole::Main,
                connections: 4,
            },
            Frame::Hello {
                role: ConnRole::Data { index: 3 },
                connections: 4,
            },
            Frame::Ok,
            Frame::Error { len: 12 },
            Frame::Discarded { len: 7 },
            Frame::Setup { len: 300 },
            Frame::Ram {
                pass: 2,
                ranges: 3,
                data_len: 5 * PAGE_SIZE,
                zstd_len: 0,
            },
            Frame::Ram {
                pass: 2,
                ranges: 1,
                data_len: 1024 * PAGE_SIZE,
                zstd_len: 77,
            },
            Frame::Sync { pass: 9 },
            Frame::Device {
                dev: 1,
                seq: 7,
                item: DevItemKind::StopCopyData,
                len: 100,
            },
            Frame::Device {
                dev: 2,
                seq: 8,
                item: DevItemKind::End,
                len: 0,
            },
            Frame::State {
                final_pass: 4,
                user_paused: true,
                pause_us: 123,
                len: 1000,
            },
            Frame::Resumed { resume_us: 456 },
            Frame::Ack {
                dev: 0,
                bytes: 10,
                load_us: 20,
            },
            Frame::Abort { len: 5 },
            Frame::Keepalive,
            Frame::Ready,
            Frame::Commit,
            Frame::Rate {
                dev: 3,
                rate_bps: 1 << 30,
                loaded: 77,
            },
            Frame::HostLoad { migrations: 3 },
            Frame::Postcopy {
                final_pass: 3,
                missing: 9,
                len: 64,
            },
            Frame::PageRequest {
                gpa: 0x5000,
                npages: 1,
            },
            Frame::Pages {
                requested: true,
                ranges: 2,
                data_len: PAGE_SIZE,
                zstd_len: 0,
            },
            Frame::Pages {
                requested: false,
                ranges: 1,
                data_len: 0,
                zstd_len: 0,
            },
            Frame::Pages {
                requested: false,
                ranges: 3,
                data_len: 2 * PAGE_SIZE,
                zstd_len: 2 * PAGE_SIZE - 1,
            },
            Frame::PostcopyDone {
                requests: 5,
                p50_us: 100,
                p99_us: 900,
            },
            Frame::Resume { epoch: 2 },
            Frame::ResumeAck {
                epoch: 2,
                missing: 7,
                len: 8,
            },
        ]
    }

    #[test]
    fn frames_round_trip() {
        for f in all() {
            let e = Frame::decode(&f.encode(0xabc)).unwrap();
            assert_eq!(
                e,
                Envelope {
                    version: super::super::VERSION,
                    session: 0xabc,
                    frame: f
                }
            );
        }
    }

    /// The typed encoding is byte-identical to the raw layout the protocol
    /// document describes (and earlier builds produced).
    #[test]
    fn frames_match_the_raw_layout() {
        let s = 0x55_u128;
        let eq = |f: Frame, h: Header| assert_eq!(f.encode(s), h.encode(), "{f:?}");
        eq(
            Frame::Hello {
                role: ConnRole::Data { index: 2 },
                connections: 4,
            },
            Header::new(Kind::Hello, s).args(ROLE_DATA, 2, 4),
        );
        eq(
            Frame::Hello {
                role: ConnRole::Main,
                connections: 4,
            },
            Header::new(Kind::Hello, s).args(ROLE_MAIN, 0, 4),
        );
        let mut ram = Header::new(Kind::Ram, s)
            .args(3, 0, 0)
            .with_len(2 * 16 + 4096);
        ram.count = 2;
        eq(
            Frame::Ram {
                pass: 3,
                ranges: 2,
                data_len: 4096,
                zstd_len: 0,
            },
            ram,
        );
        eq(
            Frame::State {
                final_pass: 5,
                user_paused: true,
                pause_us: 99,
                len: 8,
            },
            Header::new(Kind::State, s).args(5, 1, 99).with_len(8),
        );
        eq(
            Frame::Device {
                dev: 1,
                seq: 2,
                item: DevItemKind::InitialDone,
                len: 0,
            },
            Header::new(Kind::Device, s).args(1, 2, 2),
        );
        eq(
            Frame::Ack {
                dev: 1,
                bytes: 2,
                load_us: 3,
            },
            Header::new(Kind::Ack, s).args(1, 2, 3),
        );
        eq(
            Frame::Rate {
                dev: 1,
                rate_bps: 2,
                loaded: 3,
            },
            Header::new(Kind::Rate, s).args(1, 2, 3),
        );
        eq(
            Frame::Resumed { resume_us: 7 },
            Header::new(Kind::Resumed, s).args(7, 0, 0),
        );
        eq(
            Frame::Sync { pass: 7 },
            Header::new(Kind::Sync, s).args(7, 0, 0),
        );
        eq(
            Frame::Error { len: 3 },
            Header::new(Kind::Error, s).with_len(3),
        );
        eq(
            Frame::Discarded { len: 3 },
            Header::new(Kind::Error, s).args(1, 0, 0).with_len(3),
        );
        let bad = Header::new(Kind::Error, s).args(2, 0, 0).with_len(3);
        assert!(Frame::decode(&bad.encode()).is_err());
        eq(
            Frame::HostLoad { migrations: 2 },
            Header::new(Kind::HostLoad, s).args(2, 0, 0),
        );
        for a in [0, crate::host::MAX_HOST_MIGRATIONS + 1, u64::MAX] {
            let bad = Header::new(Kind::HostLoad, s).args(a, 0, 0);
            assert!(Frame::decode(&bad.encode()).is_err(), "{a} migrations");
        }
        let bad = Header::new(Kind::HostLoad, s).args(1, 0, 0).with_len(1);
        assert!(
            Frame::decode(&bad.encode()).is_err(),
            "HOST_LOAD with a payload"
        );
        // Kinds 23 and 24 (reserved) are unknown to this build.
        let mut raw = Header::new(Kind::HostLoad, s).args(1, 0, 0).encode();
        raw[6..8].copy_from_slice(&23u16.to_le_bytes());
        assert!(Frame::decode(&raw).is_err());
    }

    /// The post-copy kinds refuse what their bounds exclude.
    #[test]
    fn postcopy_frames_are_bounded() {
        let s = 0x77_u128;
        let bad = |h: Header| assert!(Frame::decode(&h.encode()).is_err(), "{h:?}");
        bad(Header::new(Kind::PageRequest, s).args(0x1001, 1, 0));
        bad(Header::new(Kind::PageRequest, s).args(0x1000, 0, 0));
        bad(Header::new(Kind::PageRequest, s).args(0x1000, 65, 0));
        bad(Header::new(Kind::PageRequest, s)
            .args(0x1000, 1, 0)
            .with_len(1));
        bad(Header::new(Kind::Postcopy, s).with_len(super::super::MAX_BITMAP_LEN + 1));
        bad(Header::new(Kind::Resume, s));
        bad(Header::new(Kind::PostcopyDone, s).with_len(8));
        let mut pages = Header::new(Kind::Pages, s).args(2, 0, 0).with_len(16);
        pages.count = 1;
        bad(pages);
        let mut pages = Header::new(Kind::Pages, s).with_len(16 + 1025 * PAGE_SIZE);
        pages.count = 1;
        bad(pages);
    }

    /// A compressed RAM/PAGES header carries the raw length in `c` and the
    /// flag; its compressed data must be non-empty and strictly shorter
    /// than the raw data, which keeps the RAM bounds; the flag is refused
    /// on every other kind.
    #[test]
    fn compressed_frames_are_bounded() {
        let s = 0x99_u128;
        let f = Frame::Ram {
            pass: 1,
            ranges: 2,
            data_len: 3 * PAGE_SIZE,
            zstd_len: 100,
        };
        let mut h = Header::new(Kind::Ram, s)
            .args(1, 0, 3 * PAGE_SIZE)
            .with_len(32 + 100);
        h.count = 2;
        h.flags = super::super::FLAG_ZSTD;
        assert_eq!(f.encode(s), h.encode());
        assert_eq!(f.payload_len(), 132);
        let bad = |h: Header| assert!(Frame::decode(&h.encode()).is_err(), "{h:?}");
        for (raw, packed) in [
            (3 * PAGE_SIZE, 0),
            (3 * PAGE_SIZE, 3 * PAGE_SIZE),
            (3 * PAGE_SIZE, 3 * PAGE_SIZE + 1),
            (3 * PAGE_SIZE + 1, 100),
            (1025 * PAGE_SIZE, 100),
            (0, 100),
        ] {
            let mut b = h.args(1, 0, raw).with_len(32 + packed);
            b.count = 2;
            bad(b);
        }
        let mut p = Header::new(Kind::Pages, s)
            .args(0, 0, 2 * PAGE_SIZE)
            .with_len(16 + 10);
        p.count = 1;
        bad(p);
        p.flags = super::super::FLAG_ZSTD;
        assert!(Frame::decode(&p.encode()).is_ok());
        p.flags = 2;
        bad(p);
        let mut sync = Header::new(Kind::Sync, s).args(1, 0, 0);
        sync.flags = super::super::FLAG_ZSTD;
        bad(sync);
    }
}
