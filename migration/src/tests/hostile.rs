//! Hostile peers: a raw protocol client sends malformed handshakes and
//! frames; the receiver must refuse cleanly, never panic, and stay usable.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::api::*;
use crate::traits::MigCaps;
use crate::wire::*;

const MIB: u64 = 1 << 20;

pub fn raw_connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

pub fn raw_send(mut s: &TcpStream, h: Header, payload: &[u8]) {
    s.write_all(&h.with_len(payload.len() as u64).encode())
        .unwrap();
    s.write_all(payload).unwrap();
}

/// Reads one reply: Ok(header) or Err(message of an ERROR frame).
pub fn raw_reply(mut s: &TcpStream) -> Result<Header, String> {
    let mut b = [0u8; HEADER_LEN];
    s.read_exact(&mut b).map_err(|e| format!("io: {e}"))?;
    let h = Header::decode(&b).map_err(|e| e.to_string())?;
    let mut p = vec![0u8; h.len as usize];
    s.read_exact(&mut p).map_err(|e| format!("io: {e}"))?;
    if h.kind == Kind::Error {
        return Err(message_text(&p));
    }
    Ok(h)
}

/// Skips keepalives, load rates and host loads and returns the first other
/// frame's result.
pub fn raw_reply_skip(s: &TcpStream) -> Result<Header, String> {
    loop {
        match raw_reply(s) {
            Ok(h) if matches!(h.kind, Kind::Keepalive | Kind::Rate | Kind::HostLoad) => continue,
            r => return r,
        }
    }
}

pub struct RawSource {
    pub main: TcpStream,
    pub data: Vec<TcpStream>,
    pub session: u128,
}

pub fn hello(
    port: u16,
    session: u128,
    role: u64,
    idx: u64,
    n: u64,
) -> (TcpStream, Result<Header, String>) {
    let s = raw_connect(port);
    raw_send(
        &s,
        Header::new(Kind::Hello, session).args(role, idx, n),
        &[],
    );
    let r = raw_reply(&s);
    (s, r)
}

impl RawSource {
    /// Handshake + setup + `n` data connections for `layout` and `devices`.
    pub fn start(
        port: u16,
        n: u64,
        layout: &[(u64, u64)],
        devices: &[&str],
        mode: DeviceStateMode,
        chunk: u64,
    ) -> RawSource {
        Self::start_with(port, n, layout, devices, mode, chunk, 0)
    }

    /// [`RawSource::start`] with SETUP `features`.
    pub fn start_with(
        port: u16,
        n: u64,
        layout: &[(u64, u64)],
        devices: &[&str],
        mode: DeviceStateMode,
        chunk: u64,
        features: u32,
    ) -> RawSource {
        let session = 0x1234_5678_9abc_def0_u128 << 3;
        let (main, r) = hello(port, session, ROLE_MAIN, 0, n);
        r.unwrap();
        let setup = Setup {
            config: b"fake-config-v1".to_vec(),
            regions: layout.to_vec(),
            devices: devices
                .iter()
                .map(|d| DeviceDesc {
                    id: d.to_string(),
                    caps: MigCaps {
                        stop_copy: true,
                        p2p: false,
                        pre_copy: true,
                    },
                })
                .collect(),
            chunk_bytes: chunk,
            device_mode: mode,
            features,
            handover: false,
        };
        raw_send(&main, Header::new(Kind::Setup, session), &setup.encode());
        raw_reply(&main).unwrap();
        let data = (0..n)
            .map(|i| {
                let (s, r) = hello(port, session, ROLE_DATA, i, n);
                r.unwrap();
                s
            })
            .collect();
        RawSource {
            main,
            data,
            session,
        }
    }

    pub fn h(&self, kind: Kind) -> Header {
        Header::new(kind, self.session)
    }

    pub fn ram(&self, conn: usize, pass: u64, entries: &[RangeEntry], data: &[u8]) {
        let mut t = Vec::new();
        entries.iter().for_each(|e| e.encode_into(&mut t));
        let mut h = self.h(Kind::Ram).args(pass, 0, 0);
        h.count = entries.len() as u32;
        t.extend_from_slice(data);
        raw_send(&self.data[conn], h, &t);
    }

    pub fn sync_all(&self, pass: u64) {
        for s in &self.data {
            raw_send(s, self.h(Kind::Sync).args(pass, 0, 0), &[]);
        }
    }

    pub fn device(&self, conn: usize, dev: u64, seq: u64, kind: DevItemKind, data: &[u8]) {
        raw_send(
            &self.data[conn],
            self.h(Kind::Device).args(dev, seq, kind as u64),
            data,
        );
    }

    /// The ERROR message the receiver sends on main.
    pub fn main_error(&self) -> String {
        raw_reply_skip(&self.main).unwrap_err()
    }
}

fn layout() -> Vec<(u64, u64)> {
    vec![(0, MIB), (1 << 32, MIB)]
}

fn dest_with_devices(devs: &[&str]) -> Dest {
    let f = FakeFactory::new(layout());
    *f.devices.lock().unwrap() = devs
        .iter()
        .map(|d| Arc::new(FakeDevice::new(d, true, vec![], vec![])))
        .collect();
    start_dest(f)
}

#[test]
fn bad_handshakes_are_refused_and_receiver_stays_usable() {
    let dest = start_dest(FakeFactory::new(vec![(0, 4 * MIB)]));
    // Garbage instead of a header.
    let s = raw_connect(dest.port);
    (&s).write_all(&[0xAB; 64]).unwrap();
    let e = raw_reply(&s).unwrap_err();
    assert!(e.contains("magic"), "{e}");
    // Unknown version.
    let s = raw_connect(dest.port);
    let mut b = Header::new(Kind::Hello, 5).args(ROLE_MAIN, 0, 1).encode();
    b[4] = 9;
    (&s).write_all(&b).unwrap();
    let e = raw_reply(&s).unwrap_err();
    assert!(e.contains("version 9"), "{e}");
    // A data connection while no migration runs.
    let (_s, r) = hello(dest.port, 77, ROLE_DATA, 0, 2);
    assert!(r.unwrap_err().contains("no migration in progress"));
    // Truncated header, then close.
    let s = raw_connect(dest.port);
    (&s).write_all(&b[..10]).unwrap();
    drop(s);
    // A real migration still succeeds on the same receive() call.
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 1, 1);
    let p = params(dest.port, 2);
    send(
        src.clone(),
        &p,
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap();
    let vm = dest.handle.join().unwrap();
    assert!(vm.is_ok());
    assert_same_ram(&src, &dest.factory.last());
}

#[test]
fn strangers_during_a_migration_are_refused() {
    let dest = start_dest(FakeFactory::new(vec![(0, 4 * MIB)]));
    let port = dest.port;
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 1, 1);
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let r2 = refusals.clone();
    src.set_hook(move |s, n| {
        if n == 2 {
            let (_c, r) = hello(port, 999, ROLE_DATA, 0, 4);
            r2.lock().unwrap().push(r.unwrap_err());
            let c = raw_connect(port);
            (&c).write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            (&c).write_all(&[0u8; 64]).unwrap();
            r2.lock().unwrap().push(raw_reply(&c).unwrap_err());
        }
        if n < 4 {
            s.write(0, n * 4096, &[n as u8; 100]);
        }
    });
    let mut p = params(port, 4);
    p.downtime_ms = Some(0);
    send(
        src.clone(),
        &p,
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap();
    assert!(dest.handle.join().unwrap().is_ok());
    assert_same_ram(&src, &dest.factory.last());
    let r = refusals.lock().unwrap().clone();
    assert!(r[0].contains("in progress"), "{r:?}");
    assert!(r[1].contains("magic"), "{r:?}");
}

#[test]
fn raw_source_protocol_and_refusals() {
    let dest = start_dest(FakeFactory::new(layout()));
    let port = dest.port;
    let session = 0x1234_5678_9abc_def0_u128 << 3;
    let (main, r) = hello(port, session, ROLE_MAIN, 0, 2);
    r.unwrap();
    let setup = Setup {
        config: b"fake-config-v1".to_vec(),
        regions: layout(),
        devices: vec![],
        chunk_bytes: 4096,
        device_mode: DeviceStateMode::Channels,
        features: 0,
        handover: false,
    };
    raw_send(&main, Header::new(Kind::Setup, session), &setup.encode());
    raw_reply(&main).unwrap();
    let (_x, r) = hello(port, session + 1, ROLE_DATA, 0, 2);
    assert!(r.unwrap_err().contains("session"));
    let (d0, r) = hello(port, session, ROLE_DATA, 0, 2);
    r.unwrap();
    let (_y, r) = hello(port, session, ROLE_DATA, 0, 2);
    assert!(r.unwrap_err().contains("duplicate"));
    let (d1, r) = hello(port, session, ROLE_DATA, 1, 2);
    r.unwrap();
    let rs = RawSource {
        main,
        data: vec![d0, d1],
        session,
    };
    let page = pattern(9, 8192);
    rs.ram(
        0,
        1,
        &[RangeEntry {
            gpa: 4096,
            npages: 2,
            flags: 0,
        }],
        &page,
    );
    rs.ram(
        1,
        1,
        &[
            RangeEntry {
                gpa: (1 << 32) + 8192,
                npages: 3,
                flags: RANGE_ZERO,
            },
            RangeEntry {
                gpa: 1 << 32,
                npages: 1,
                flags: 0,
            },
        ],
        &page[..4096],
    );
    rs.sync_all(1);
    // Pass 2 zeroes a page written in pass 1.
    rs.ram(
        1,
        2,
        &[RangeEntry {
            gpa: 4096,
            npages: 1,
            flags: RANGE_ZERO,
        }],
        &[],
    );
    rs.sync_all(2);
    raw_send(
        &rs.main,
        rs.h(Kind::State).args(2, 0, crate::net::epoch_us()),
        b"state",
    );
    // Restored, then READY; the VM starts only on COMMIT.
    let h = raw_reply_skip(&rs.main).unwrap();
    assert_eq!(h.kind, Kind::Ready);
    assert!(dest.factory.last().restored.lock().unwrap().is_some());
    assert!(
        dest.factory.last().started.lock().unwrap().is_none(),
        "started before COMMIT"
    );
    raw_send(&rs.main, rs.h(Kind::Commit), &[]);
    let h = raw_reply_skip(&rs.main).unwrap();
    assert_eq!(h.kind, Kind::Resumed);
    assert!(dest.handle.join().unwrap().is_ok());
    let d = dest.factory.last();
    assert_eq!(d.regions[0].1.read(4096, 4096), vec![0u8; 4096]);
    assert_eq!(d.regions[0].1.read(8192, 4096), page[4096..].to_vec());
    assert_eq!(d.regions[1].1.read(0, 4096), page[..4096].to_vec());
    assert_eq!(d.restored.lock().unwrap().as_deref(), Some(&b"state"[..]));
}

/// Runs `attack` against a fresh receiver (1 device "d0", 2 data
/// connections) and returns (receiver error, error frame on main).
fn attack(chunk: u64, f: impl FnOnce(&RawSource)) -> (String, String) {
    let dest = dest_with_devices(&["d0"]);
    let rs = RawSource::start(
        dest.port,
        2,
        &layout(),
        &["d0"],
        DeviceStateMode::Channels,
        chunk,
    );
    f(&rs);
    let e = rerr(dest.handle.join().unwrap()).to_string();
    let m = rs.main_error();
    assert!(
        dest.factory.last().discarded.load(SeqCst),
        "VM discarded after: {e}"
    );
    (e, m)
}

#[test]
fn hostile_frames_fail_cleanly() {
    let (e, m) = attack(4096, |rs| {
        rs.ram(
            0,
            1,
            &[RangeEntry {
                gpa: 2 * MIB,
                npages: 1,
                flags: 0,
            }],
            &[1; 4096],
        )
    });
    assert!(
        e.contains("outside guest RAM") && m.contains("outside guest RAM"),
        "{e} / {m}"
    );
    let (e, _) = attack(4096, |rs| {
        rs.ram(
            0,
            1,
            &[RangeEntry {
                gpa: MIB - 4096,
                npages: 2,
                flags: 0,
            }],
            &[1; 8192],
        )
    });
    assert!(e.contains("outside guest RAM"), "{e}");
    let (e, _) = attack(4096, |rs| {
        rs.ram(
            0,
            2,
            &[RangeEntry {
                gpa: 0,
                npages: 1,
                flags: 0,
            }],
            &[1; 4096],
        )
    });
    assert!(e.contains("pass 2"), "{e}");
    let (e, _) = attack(4096, |rs| {
        rs.device(0, 5, 0, DevItemKind::PrecopyData, &[1; 10])
    });
    assert!(e.contains("unknown device"), "{e}");
    let (e, _) = attack(4096, |rs| {
        rs.device(0, 0, 0, DevItemKind::PrecopyData, &[1; 8192])
    });
    assert!(e.contains("over the announced"), "{e}");
    let (e, _) = attack(4096, |rs| {
        rs.device(0, 0, 0, DevItemKind::PrecopyData, &[1; 10]);
        rs.device(1, 0, 0, DevItemKind::PrecopyData, &[1; 10]);
    });
    assert!(e.contains("duplicate"), "{e}");
    let (e, m) = attack(4096, |rs| {
        rs.device(0, 0, 0, DevItemKind::PrecopyData, &[1; 10]);
        rs.device(0, 0, 2, DevItemKind::PrecopyData, &[1; 10]);
        rs.sync_all(1);
    });
    assert!(
        e.contains("sequence gap") && e.contains("d0") && m.contains("sequence gap"),
        "{e}"
    );
    let (e, _) = attack(4096, |rs| {
        rs.device(0, 0, 0, DevItemKind::End, &[]);
        rs.device(1, 0, 1, DevItemKind::PrecopyData, &[1; 10]);
    });
    assert!(e.contains("after the end"), "{e}");
    let (e, _) = attack(4096, |rs| (&rs.data[1]).write_all(&[0x5A; 200]).unwrap());
    assert!(e.contains("magic"), "{e}");
    let (e, _) = attack(4096, |rs| {
        // Frame of another session on an accepted connection.
        raw_send(&rs.data[0], Header::new(Kind::Sync, 1).args(1, 0, 0), &[]);
    });
    assert!(e.contains("another session"), "{e}");
    let (e, _) = attack(4096, |rs| {
        // Range table announcing more data than the frame carries.
        let mut t = Vec::new();
        RangeEntry {
            gpa: 0,
            npages: 2,
            flags: 0,
        }
        .encode_into(&mut t);
        let mut h = rs.h(Kind::Ram).args(1, 0, 0);
        h.count = 1;
        t.extend_from_slice(&[0; 4096]);
        raw_send(&rs.data[0], h, &t);
    });
    assert!(e.contains("announces"), "{e}");
}

#[test]
fn truncated_stream_and_source_death() {
    let dest = dest_with_devices(&["d0"]);
    let port = dest.port;
    let rs = RawSource::start(port, 2, &layout(), &["d0"], DeviceStateMode::Channels, 4096);
    // A RAM frame announcing a page of data, of which only 100 bytes come.
    let mut t = Vec::new();
    RangeEntry {
        gpa: 0,
        npages: 1,
        flags: 0,
    }
    .encode_into(&mut t);
    let mut h = rs.h(Kind::Ram).args(1, 0, 0);
    h.count = 1;
    (&rs.data[0])
        .write_all(&h.with_len(16 + 4096).encode())
        .unwrap();
    (&rs.data[0]).write_all(&t).unwrap();
    (&rs.data[0]).write_all(&[7; 100]).unwrap();
    drop(rs); // source dies
    let e = rerr(dest.handle.join().unwrap());
    assert!(
        matches!(e, MigrationError::PeerClosed(_) | MigrationError::Io { .. }),
        "{e}"
    );
    assert!(dest.factory.last().discarded.load(SeqCst));
    // The same port can receive again.
    let l = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let f = Arc::new(FakeFactory::new(vec![(0, 2 * MIB)]));
    let (f2, st) = (f.clone(), Arc::new(MigrationStats::default()));
    let h = std::thread::spawn(move || {
        let p = ReceiveParams {
            receiver_url: format!("tcp:127.0.0.1:{port}"),
            device_buffer_bytes: None,
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        };
        receive(l, &*f2, &p, &st, &CancelToken::default()).is_ok()
    });
    let src = Arc::new(FakeSource::new(&[(0, 2 * MIB)]));
    fill(&src, 0, 4, 1);
    send(
        src.clone(),
        &params(port, 2),
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap();
    assert!(h.join().unwrap());
    assert_same_ram(&src, &f.last());
}

/// Sources refused at SETUP (another layout, other devices, a SETUP that
/// does not decode, a peer that leaves before SETUP) get an ERROR naming
/// the reason, and the receive goes on waiting: a real migration then
/// succeeds on the same `receive` call.
#[test]
fn refused_setups_leave_the_receive_armed() {
    let dest = dest_with_devices(&["d0"]);
    let refused = |session: u128, setup: Vec<u8>| -> String {
        let (main, r) = hello(dest.port, session, ROLE_MAIN, 0, 1);
        r.unwrap();
        raw_send(&main, Header::new(Kind::Setup, session), &setup);
        raw_reply(&main).unwrap_err()
    };
    let good = Setup {
        config: b"fake-config-v1".to_vec(),
        regions: layout(),
        devices: vec![DeviceDesc {
            id: "d0".into(),
            caps: MigCaps {
                stop_copy: true,
                p2p: false,
                pre_copy: true,
            },
        }],
        chunk_bytes: 4096,
        device_mode: DeviceStateMode::Channels,
        features: 0,
        handover: false,
    };
    let mut other_layout = good.clone();
    other_layout.regions = vec![(0, 4 * MIB)];
    let e = refused(1, other_layout.encode());
    assert!(e.contains("RAM layout differs"), "{e}");
    let mut other_devices = good.clone();
    other_devices.devices[0].id = "intruder".into();
    let e = refused(2, other_devices.encode());
    assert!(
        e.contains("devices differ") && e.contains("intruder"),
        "{e}"
    );
    let e = refused(3, vec![0xa5; 16]);
    assert!(e.contains("protocol error"), "{e}");
    let (gone, r) = hello(dest.port, 4, ROLE_MAIN, 0, 1);
    r.unwrap();
    drop(gone);
    assert!(
        !dest.handle.is_finished(),
        "a refused source ended the receive"
    );
    for d in dest.factory.created.lock().unwrap().iter() {
        assert!(d.discarded.load(SeqCst), "a refused VM was kept");
    }

    let mut src = FakeSource::new(&layout());
    src.devices = vec![Arc::new(FakeDevice::new(
        "d0",
        true,
        pattern(3, 3000),
        pattern(4, 2000),
    ))];
    let src = Arc::new(src);
    fill(&src, 0, 5, 1);
    send(
        src.clone(),
        &params(dest.port, 2),
        &Arc::new(MigrationStats::default()),
        &CancelToken::default(),
    )
    .unwrap();
    assert!(dest.handle.join().unwrap().is_ok());
    assert_same_ram(&src, &dest.factory.last());
}
