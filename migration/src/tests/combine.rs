//! Every combination that `crate::combine` accepts over TCP, end to end
//! with the fakes: plain or mutual TLS × zero-copy × zstd × post-copy from
//! the start × 1 or 4 connections. Each run ends with the destination's
//! memory equal to the source's and, in post-copy, every page a fake vCPU
//! faulted on equal to the source's final copy.

use std::sync::Arc;

use super::postcopy::{check_read, every_page, factory_for_layout, guest};
use super::tls::{tls_receive, Ca};
use super::*;
use crate::api::*;
use crate::combine::{Features, Transport};
use crate::live::Technique;

const MIB: u64 = 1 << 20;

#[test]
fn every_tcp_combination_migrates() {
    let ca = Ca::new("combine");
    let dst_dir = ca.host("dst.test", &ca);
    let src_dir = ca.host("src.test", &ca);
    for bits in 0..32u32 {
        let tls = bits & 1 != 0;
        let zero_copy = bits & 2 != 0;
        let zstd = bits & 4 != 0;
        let postcopy = bits & 8 != 0;
        let conns = if bits & 16 != 0 { 4 } else { 1 };
        let what = format!(
            "tls={tls} zero_copy={zero_copy} zstd={zstd} postcopy={postcopy} connections={conns}"
        );
        let src = Arc::new(FakeSource::new(&[(0, 8 * MIB), (4 << 30, 2 * MIB)]));
        fill(&src, 0, bits as u8, 2);
        fill(&src, 1, bits as u8 + 1, 3);
        let recv = if tls {
            tls_receive(&dst_dir, &["src.test"])
        } else {
            ReceiveParams {
                receiver_url: "tcp:127.0.0.1:0".into(),
                device_buffer_bytes: None,
                tls_dir: None,
                tls: Some(false),
                tls_allowed_subjects: Vec::new(),
            }
        };
        let dest = start_dest_with(factory_for_layout(&src), recv);
        let mut p = params(dest.port, conns);
        if tls {
            p.tls_dir = Some(src_dir.clone());
            p.tls = None;
        }
        p.zero_copy = zero_copy;
        if zstd {
            p.compression = Compression::Zstd;
        }
        if postcopy {
            p.technique = Some(Technique::PostCopy);
        }
        let f = Features::of(&p);
        assert_eq!(
            f.transport,
            if tls { Transport::Tls } else { Transport::Tcp },
            "{what}"
        );
        p.validate()
            .unwrap_or_else(|e| panic!("{what}: refused: {e}"));
        let pages = every_page(&src, 5);
        let vcpu = postcopy.then(|| guest(dest.factory.clone(), pages.clone()));
        let stats = Arc::new(MigrationStats::default());
        send(src.clone(), &p, &stats, &CancelToken::default())
            .unwrap_or_else(|e| panic!("{what}: send failed: {e}"));
        dest.handle
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{what}: receive failed: {e}"));
        if let Some(v) = vcpu {
            check_read(&src, &pages, &v.join().unwrap());
        }
        assert_same_ram(&src, &dest.factory.last());
        let s = stats.snapshot();
        assert_eq!(s.state, MigrationState::Completed, "{what}");
        assert_eq!(
            s.transport.as_deref(),
            Some(if tls { "tls" } else { "tcp" }),
            "{what}"
        );
        assert_eq!(s.zero_copy.is_some(), zero_copy, "{what}: {s:?}");
        if let Some(z) = &s.zero_copy {
            assert_eq!(z.in_flight_bytes, 0, "{what}: {z:?}");
        }
        assert_eq!(s.compression.is_some(), zstd, "{what}: {s:?}");
        if postcopy {
            assert_eq!(s.postcopy.as_deref(), Some("completed"), "{what}");
        }
    }
}
