//! RAM compression end to end over loopback with the fakes: compressible
//! and incompressible pages over several connections, several passes, a
//! destination that does not know compression, and hostile compressed
//! frames.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::hostile::RawSource;
use super::*;
use crate::api::*;
use crate::wire::*;

const MIB: u64 = 1 << 20;

/// Text pages (compressible) in region 0, xorshift pages (not) in region
/// 1, with zero pages among them.
fn mixed_source() -> Arc<FakeSource> {
    let src = Arc::new(FakeSource::new(&[(0, 16 * MIB), (4 << 30, 8 * MIB)]));
    let text: Vec<u8> = b"Ferry moves guests. "
        .iter()
        .copied()
        .cycle()
        .take(16 * MIB as usize)
        .collect();
    src.write(0, 0, &text);
    src.write(0, 5 * 4096, &[0u8; 4096]);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..8 * MIB)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect();
    src.write(1, 0, &noise);
    src
}

fn zstd_params(n: u32, level: Option<i64>) -> SendParams {
    SendParams {
        compression: Compression::Zstd,
        compression_level: level,
        ..params(0, n)
    }
}

#[test]
fn compressible_and_random_pages_over_4_connections() {
    for level in [None, Some(9)] {
        let src = mixed_source();
        let mut p = zstd_params(4, level);
        let f = FakeFactory::new(src.layout());
        let (r, rr, dest, stats) = migrate_with(src.clone(), f, &mut p);
        r.unwrap();
        rr.unwrap();
        assert_same_ram(&src, &dest.factory.last());
        let s = stats.snapshot();
        let c = s.compression.clone().expect("compression status");
        assert_eq!(c.algorithm, "zstd");
        assert_eq!(c.level, Some(level.unwrap_or(1) as i32));
        // All data pages went through compression (zero pages did not).
        assert_eq!(c.raw_bytes, s.normal_pages * 4096, "{c:?}");
        assert!(
            c.compressed_packets > 0 && c.uncompressed_packets > 0,
            "{c:?}"
        );
        // 16 MiB of text shrink a lot, 8 MiB of noise not at all.
        assert!(c.wire_bytes < 9 * MIB && c.wire_bytes > 8 * MIB, "{c:?}");
        assert!(c.ratio > 2.5, "{c:?}");
        assert!(s.transferred_bytes < 10 * MIB, "{s:?}");
        let d = dest.stats.snapshot();
        let dc = d.compression.expect("destination compression status");
        assert_eq!(dc.level, None);
        assert_eq!(
            (dc.raw_bytes, dc.wire_bytes, dc.compressed_packets),
            (c.raw_bytes, c.wire_bytes, c.compressed_packets)
        );
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["compression"]["algorithm"], "zstd");
    }
}

#[test]
fn no_compression_object_without_compression() {
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 1, 1);
    let mut p = params(0, 2);
    let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    assert!(stats.snapshot().compression.is_none());
    assert!(dest.stats.snapshot().compression.is_none());
    let j = serde_json::to_value(stats.snapshot()).unwrap();
    assert!(j.get("compression").is_none());
}

fn migrate(
    src: Arc<FakeSource>,
    p: &mut SendParams,
) -> (
    Result<(), MigrationError>,
    RecvResult,
    Finished,
    Arc<MigrationStats>,
) {
    let f = FakeFactory::new(src.layout());
    migrate_with(src, f, p)
}

/// Pages rewritten and zeroed between passes arrive as last written.
#[test]
fn several_passes_last_writer_wins() {
    let src = mixed_source();
    src.set_hook(|s, n| {
        if n <= 5 {
            for p in (0..4096u64).step_by(2 + n as usize) {
                s.write(0, p * 4096, &[b'a' + n as u8; 4096]);
            }
            for p in (0..2048u64).step_by(7) {
                s.write(1, p * 4096 + 100, &pattern(n as u8, 64));
            }
            s.write(0, 40 * 4096, &[0u8; 4096]);
        }
    });
    let mut p = zstd_params(3, None);
    p.downtime_ms = Some(0);
    let (r, rr, dest, stats) = migrate(src.clone(), &mut p);
    r.unwrap();
    rr.unwrap();
    assert_same_ram(&src, &dest.factory.last());
    assert!(stats.snapshot().iteration >= 6);
}

/// A destination from before compression refuses the feature word of
/// SETUP ("trailing bytes"): the source fails at setup with a clear
/// error and keeps running.
#[test]
fn an_older_destination_is_refused_at_setup() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let old = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut h = [0u8; HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let hello = Header::decode(&h).unwrap();
        s.write_all(&Header::new(Kind::Ok, hello.session).encode())
            .unwrap();
        s.read_exact(&mut h).unwrap();
        let setup = Header::decode(&h).unwrap();
        let mut payload = vec![0u8; setup.len as usize];
        s.read_exact(&mut payload).unwrap();
        // What an earlier build answers: its decoder stops before the
        // feature word.
        let msg = b"protocol error: trailing bytes in SETUP";
        s.write_all(
            &Header::new(Kind::Error, hello.session)
                .with_len(msg.len() as u64)
                .encode(),
        )
        .unwrap();
        s.write_all(msg).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Setup::decode(&payload).unwrap().features
    });
    let src = Arc::new(FakeSource::new(&[(0, 4 * MIB)]));
    fill(&src, 0, 1, 1);
    let mut p = zstd_params(2, None);
    p.destination_url = format!("tcp:127.0.0.1:{port}");
    let stats = Arc::new(MigrationStats::default());
    let e = send(src.clone(), &p, &stats, &CancelToken::default()).unwrap_err();
    assert!(
        matches!(e, MigrationError::Incompatible(_))
            && e.to_string()
                .contains("does not support \"compression\": \"zstd\""),
        "{e}"
    );
    assert_eq!(old.join().unwrap(), SETUP_FEATURE_ZSTD);
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
    assert_source_running(&src);
    assert_eq!(src.resumes.load(SeqCst), 0, "never paused");
}

fn layout() -> Vec<(u64, u64)> {
    vec![(0, MIB), (1 << 32, MIB)]
}

/// Runs `f` against a fresh receiver after a SETUP with `features`;
/// returns the receiver's error and the ERROR frame on main.
fn attack(features: u32, f: impl FnOnce(&RawSource)) -> (String, String) {
    let dest = start_dest(FakeFactory::new(layout()));
    let rs = RawSource::start_with(
        dest.port,
        2,
        &layout(),
        &[],
        DeviceStateMode::Channels,
        4096,
        features,
    );
    f(&rs);
    let e = rerr(dest.handle.join().unwrap()).to_string();
    let m = rs.main_error();
    assert!(dest.factory.last().discarded.load(SeqCst), "{e}");
    (e, m)
}

/// A compressed RAM frame of `packed` bytes for `pages` data pages at 0.
fn zram(rs: &RawSource, pages: u32, raw_len: u64, packed: &[u8]) {
    let mut t = Vec::new();
    RangeEntry {
        gpa: 0,
        npages: pages,
        flags: 0,
    }
    .encode_into(&mut t);
    let mut h = rs.h(Kind::Ram).args(1, 0, raw_len);
    h.count = 1;
    h.flags = FLAG_ZSTD;
    t.extend_from_slice(packed);
    hostile::raw_send(&rs.data[0], h, &t);
}

fn zstd_of(data: &[u8]) -> Vec<u8> {
    ::zstd::bulk::compress(data, 1).unwrap()
}

#[test]
fn hostile_compressed_frames_fail_cleanly() {
    // Compressed data without the SETUP feature.
    let good = zstd_of(&[7u8; 8192]);
    let (e, m) = attack(0, |rs| zram(rs, 2, 8192, &good));
    assert!(
        e.contains("SETUP did not ask for compression") && m.contains("compression"),
        "{e} / {m}"
    );
    // Garbage.
    let (e, _) = attack(SETUP_FEATURE_ZSTD, |rs| zram(rs, 2, 8192, &[0x42; 300]));
    assert!(e.contains("does not decompress"), "{e}");
    // A bomb: 64 MiB of zeroes for a 2-page packet.
    let bomb = ::zstd::bulk::compress(&vec![0u8; 64 << 20], 19).unwrap();
    assert!(bomb.len() < 8192);
    let (e, _) = attack(SETUP_FEATURE_ZSTD, |rs| zram(rs, 2, 8192, &bomb));
    assert!(e.contains("does not decompress"), "{e}");
    // Fewer bytes than announced (one page of two).
    let short = zstd_of(&[7u8; 4096]);
    let (e, _) = attack(SETUP_FEATURE_ZSTD, |rs| zram(rs, 2, 8192, &short));
    assert!(e.contains("gave 4096 bytes"), "{e}");
    // The header's raw length disagrees with the table's pages.
    let (e, _) = attack(SETUP_FEATURE_ZSTD, |rs| zram(rs, 1, 8192, &good));
    assert!(e.contains("announces"), "{e}");
    // "Compressed" data as long as the raw data: refused by the header.
    let (e, _) = attack(SETUP_FEATURE_ZSTD, |rs| zram(rs, 1, 4096, &[1u8; 4096]));
    assert!(e.contains("compressed bytes"), "{e}");
}

/// A good compressed frame from a raw source lands in guest memory.
#[test]
fn a_raw_compressed_frame_lands() {
    let dest = start_dest(FakeFactory::new(layout()));
    let rs = RawSource::start_with(
        dest.port,
        2,
        &layout(),
        &[],
        DeviceStateMode::Channels,
        4096,
        SETUP_FEATURE_ZSTD,
    );
    let page = pattern(3, 8192);
    zram(&rs, 2, 8192, &zstd_of(&page));
    rs.sync_all(1);
    hostile::raw_send(
        &rs.main,
        rs.h(Kind::State).args(1, 0, crate::net::epoch_us()),
        b"state",
    );
    let h = hostile::raw_reply_skip(&rs.main).unwrap();
    assert_eq!(h.kind, Kind::Ready);
    let d = dest.factory.last();
    assert_eq!(d.regions[0].1.read(0, 8192), page);
    hostile::raw_send(&rs.main, rs.h(Kind::Commit), &[]);
    let _ = hostile::raw_reply_skip(&rs.main);
    dest.handle.join().unwrap().unwrap();
    let c = dest.stats.snapshot().compression.unwrap();
    assert_eq!((c.raw_bytes, c.compressed_packets), (8192, 1));
}

/// The request fields: `"zstd"` or `"none"`, a level in 1..=19 only with
/// zstd; anything else is refused naming the field.
#[test]
fn compression_is_zstd_with_a_bounded_level() {
    let p = |j: &str| {
        serde_json::from_str::<SendParams>(&format!(
            r#"{{"destination_url":"tcp:127.0.0.1:1","tls":false{j}}}"#
        ))
    };
    assert_eq!(p("").unwrap().zstd_level().unwrap(), None);
    let z = p(r#","compression":"zstd""#).unwrap();
    assert_eq!(z.compression, Compression::Zstd);
    assert_eq!(
        z.zstd_level().unwrap(),
        Some(crate::compress::DEFAULT_ZSTD_LEVEL)
    );
    z.validate().unwrap();
    let z9 = p(r#","compression":"zstd","compression_level":9"#).unwrap();
    assert_eq!(z9.zstd_level().unwrap(), Some(9));
    assert_eq!(
        p(r#","compression":"none""#).unwrap().compression,
        Compression::None
    );
    for bad in [r#""lz4""#, r#""ZSTD""#, "1", "true", "null"] {
        let e = p(&format!(r#","compression":{bad}"#));
        assert!(e.is_err(), "{bad} accepted");
    }
    let e = p(r#","compression":"lz4""#).unwrap_err().to_string();
    assert!(
        e.contains("unknown variant `lz4`") && e.contains("zstd"),
        "{e}"
    );
    for (j, want) in [
        (
            r#","compression":"zstd","compression_level":0"#,
            "compression_level must be in 1..=19, got 0",
        ),
        (
            r#","compression":"zstd","compression_level":20"#,
            "compression_level must be in 1..=19, got 20",
        ),
        (
            r#","compression":"zstd","compression_level":-5"#,
            "compression_level must be in 1..=19, got -5",
        ),
        (
            r#","compression_level":3"#,
            "compression_level needs \"compression\": \"zstd\"",
        ),
    ] {
        let e = p(j).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains(want), "{j}: {e}");
    }
    let v = serde_json::to_value(&z9).unwrap();
    assert_eq!(v["compression"], "zstd");
    assert_eq!(serde_json::from_value::<SendParams>(v).unwrap(), z9);
}
