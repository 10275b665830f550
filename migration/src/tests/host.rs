//! The host hooks end to end over loopback: the share of the host
//! bandwidth follows the destination's HOST_LOAD, and `connections:
//! "auto"` follows the link speed the host reports.

use std::net::{IpAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::api::*;
use crate::host::{Direction, Host, HostSlot, LinkSpeed};

const MIB: u64 = 1 << 20;

/// A host with fixed counts and a 100 Gbit/s link.
#[derive(Debug)]
struct FakeHost {
    outgoing: u32,
    incoming: u32,
}

struct Slot(u32);

impl HostSlot for Slot {
    fn count(&self) -> Result<u32, String> {
        Ok(self.0)
    }
}

impl Host for FakeHost {
    fn register(&self, dir: Direction) -> Result<Box<dyn HostSlot>, String> {
        Ok(Box::new(Slot(match dir {
            Direction::Outgoing => self.outgoing,
            Direction::Incoming => self.incoming,
        })))
    }
    fn link_speed(&self, dest: IpAddr) -> LinkSpeed {
        assert!(dest.is_loopback(), "{dest}");
        LinkSpeed {
            interface: Some("fake0".into()),
            mbit_s: Ok(100_000),
        }
    }
}

#[test]
fn the_share_follows_the_destination_host_load() {
    let src = Arc::new(FakeSource::new(&[(0, 24 * MIB), (4 << 30, 8 * MIB)]));
    fill(&src, 0, 1, 1);
    fill(&src, 1, 2, 1);
    let f = Arc::new(FakeFactory::new(src.layout()));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let dst_hooks = Hooks {
        host: Some(Arc::new(FakeHost {
            outgoing: 9,
            incoming: 2,
        })),
        ..Default::default()
    };
    let dst_stats = Arc::new(MigrationStats::default());
    let (ff, ds) = (f.clone(), dst_stats.clone());
    let recv = std::thread::spawn(move || {
        let p = ReceiveParams {
            receiver_url: "tcp:127.0.0.1:0".into(),
            device_buffer_bytes: None,
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        };
        receive_with(l, &*ff, &p, &ds, &CancelToken::default(), &dst_hooks).map(|_| ())
    });
    // 32 MiB at no more than 32 MiB/s: the send outlasts a share interval.
    let src_hooks = Hooks {
        host: Some(Arc::new(FakeHost {
            outgoing: 1,
            incoming: 9,
        })),
        host_max_mib_s: Some(32.0),
        ..Default::default()
    };
    let mut p = params(port, 1);
    p.connections = Connections::Auto;
    let stats = Arc::new(MigrationStats::default());
    let from = src_hooks.events.next_seq();
    send_with(src, &p, &stats, &CancelToken::default(), &src_hooks).unwrap();
    recv.join().unwrap().unwrap();
    let s = stats.snapshot();
    // Source host 1, destination host 2: half of 32.
    assert_eq!(s.bandwidth_share_mib_s, Some(16.0), "{s:?}");
    assert_eq!(
        s.host_migrations,
        Some(HostMigrations {
            source: Some(1),
            destination: Some(2)
        })
    );
    // 100 Gbit/s, vCPUs unknown: 10 connections.
    assert_eq!(s.connections, 10);
    let why = s.connections_reason.unwrap_or_default();
    assert!(why.contains("fake0 at 100000 Mbit/s gives 10"), "{why}");
    let ds = dst_stats.snapshot();
    assert_eq!(ds.host_migrations.and_then(|h| h.destination), Some(2));
    assert_eq!(ds.bandwidth_share_mib_s, None);
    let ev = src_hooks.events.read_after(from, Duration::ZERO);
    let shares: Vec<&String> = ev
        .lines
        .iter()
        .filter(|l| l.contains("bandwidth-share-changed"))
        .collect();
    assert!(shares.len() >= 2, "{:?}", ev.lines);
    assert!(
        shares[0].contains("\"bandwidth_share_mib_s\":32"),
        "{shares:?}"
    );
    assert!(
        shares
            .last()
            .unwrap()
            .contains("\"bandwidth_share_mib_s\":16"),
        "{shares:?}"
    );
}

#[test]
fn without_a_host_nothing_is_shared() {
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 3, 3);
    let f = FakeFactory::new(src.layout());
    let mut p = params(0, 2);
    let (r, rr, _dest, stats) = migrate_with(src, f, &mut p);
    r.unwrap();
    rr.unwrap();
    let s = stats.snapshot();
    assert_eq!(s.bandwidth_share_mib_s, None);
    assert_eq!(s.host_migrations, None);
    assert_eq!(s.connections_reason.as_deref(), Some("requested: 2"));
}
