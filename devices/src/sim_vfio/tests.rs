use super::*;
use migration::{MigCaps, MigratableDevice, PrecopyInfo};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::Instant;
use stream::END_LEN;

fn cfg(id: &str, state: u64, pre: u64) -> SimVfioConfig {
    SimVfioConfig::new(id, state, pre)
}

/// Makes reads on `f` fail after 5 s instead of hanging a broken test.
fn timeout(f: &File) {
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: valid fd and a timeval of the right size.
    let r = unsafe {
        libc::setsockopt(
            f.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    assert_eq!(r, 0);
}

fn readable_now(f: &File) -> bool {
    stream::poll_fd(f, libc::POLLIN, Duration::from_millis(30)).unwrap()
}

/// Copies exactly `n` bytes from `src` to `dst`.
fn copy_n(src: &mut File, dst: &mut File, n: u64) {
    let mut buf = vec![0u8; n as usize];
    src.read_exact(&mut buf).unwrap();
    dst.write_all(&buf).unwrap();
}

/// Runs a migration; returns (source digest at switch-over, bytes moved,
/// number of precopy rounds that reported dirty bytes).
fn migrate(src: &SimVfioDevice, dst: &SimVfioDevice, rounds: usize) -> (u64, u64, usize) {
    let mut wr = dst
        .set_state(MigState::Resuming)
        .unwrap()
        .expect("resuming fd");
    let mut moved = 0;
    let mut dirty_rounds = 0;
    let mut rd = if rounds > 0 {
        let mut rd = src
            .set_state(MigState::PreCopy)
            .unwrap()
            .expect("precopy fd");
        timeout(&rd);
        for _ in 0..rounds {
            let info = src.precopy_info().unwrap();
            let n = info.initial_bytes + info.dirty_bytes;
            if info.dirty_bytes > 0 {
                dirty_rounds += 1;
            }
            copy_n(&mut rd, &mut wr, n);
            moved += n;
            assert!(!readable_now(&rd), "pump wrote uncommitted bytes");
            std::thread::sleep(Duration::from_millis(15));
        }
        assert!(src.set_state(MigState::StopCopy).unwrap().is_none());
        rd
    } else {
        let rd = src
            .set_state(MigState::StopCopy)
            .unwrap()
            .expect("stop-copy fd");
        timeout(&rd);
        rd
    };
    let digest = src.digest();
    assert_eq!(src.switchover_digest(), Some(digest));
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).unwrap();
    moved += rest.len() as u64;
    wr.write_all(&rest).unwrap();
    drop(wr);
    // Leaving RESUMING checks the loaded state against the end marker.
    dst.set_state(MigState::Stop).unwrap();
    assert_eq!(dst.source_digest(), Some(digest));
    (digest, moved, dirty_rounds)
}

#[test]
fn source_has_content_destination_is_zero() {
    let c = cfg("d0", 10_000, 0);
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    assert_ne!(s.digest(), d.digest());
    assert_eq!(d.digest(), stream::digest(&[0u8; 10_000]));
    assert_eq!(s.digest(), SimVfioDevice::new_source(&c).unwrap().digest());
    assert_ne!(
        s.digest(),
        SimVfioDevice::new_source(&cfg("d1", 10_000, 0))
            .unwrap()
            .digest()
    );
    assert_eq!(s.state_size(), 10_000);
    assert_eq!(
        s.caps(),
        MigCaps {
            stop_copy: true,
            p2p: true,
            pre_copy: false
        }
    );
    assert!(SimVfioDevice::new_source(&cfg("big", 17 << 30, 0)).is_err());
}

#[test]
fn stop_copy_only_migration() {
    let mut c = cfg("nopre", (1 << 20) + 123, 0);
    c.dirty_rate = 100.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    let before = s.digest();
    std::thread::sleep(Duration::from_millis(30));
    let expect = s.stop_copy_size().unwrap();
    let (dg, moved, _) = migrate(&s, &d, 0);
    assert_ne!(before, dg, "dirtier changed the state while running");
    assert_eq!(moved, expect, "stop_copy_size is exact without pre-copy");
    assert_eq!(d.digest(), dg);
    d.set_state(MigState::Running).unwrap();
    assert_eq!(d.state().unwrap(), MigState::Running);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(d.digest(), dg, "a destination does not dirty its state");
    // Source recovers to RUNNING (pump gone) and keeps running.
    s.set_state(MigState::Running).unwrap();
    assert_eq!(s.state().unwrap(), MigState::Running);
}

#[test]
fn precopy_migration_with_dirtying() {
    let mut c = cfg("pre", 2 << 20, (3 << 19) + 5);
    c.dirty_rate = 400.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    assert!(s.caps().pre_copy);
    let (dg, _moved, dirty_rounds) = migrate(&s, &d, 6);
    assert!(dirty_rounds > 0, "no dirty data was reported");
    assert_eq!(d.digest(), dg);
    // Frozen after STOP_COPY: digest does not move.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(s.digest(), dg);
    s.set_state(MigState::Running).unwrap();
}

#[test]
fn precopy_info_semantics() {
    let c = cfg("pi", 1 << 20, 1 << 19);
    let s = SimVfioDevice::new_source(&c).unwrap();
    assert!(s.precopy_info().is_err(), "not in PRE_COPY");
    let mut rd = s.set_state(MigState::PreCopy).unwrap().unwrap();
    timeout(&rd);
    let i = s.precopy_info().unwrap();
    let total = HEADER_LEN + stream::stream_len(1 << 19);
    assert_eq!(i.initial_bytes, total);
    assert_eq!(i.dirty_bytes, 0);
    // VFIO-style: what is reported is what is still unread.
    let mut buf = vec![0u8; 100_000];
    rd.read_exact(&mut buf).unwrap();
    let i = s.precopy_info().unwrap();
    assert_eq!(i.initial_bytes, total - 100_000);
    assert_eq!(i.dirty_bytes, 0);
    let mut buf = vec![0u8; i.initial_bytes as usize];
    rd.read_exact(&mut buf).unwrap();
    assert!(!readable_now(&rd));
    // No dirtying configured: nothing more to commit.
    assert_eq!(s.precopy_info().unwrap(), PrecopyInfo::default());
    assert_eq!(
        s.stop_copy_size().unwrap(),
        stream::stream_len(1 << 19) + TAIL_LEN
    );
    // Back to RUNNING: the pump stops, the reader sees EOF.
    s.set_state(MigState::Running).unwrap();
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// The migration crate's pattern: read at most a chunk of what is reported,
/// then ask again; the initial data is done when it reports 0.
#[test]
fn chunked_reader_with_dirtying() {
    let mut c = cfg("chunky", 2 << 20, 1 << 20);
    c.dirty_rate = 200.0;
    c.save_rate = 64.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    let mut wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    let mut rd = s.set_state(MigState::PreCopy).unwrap().unwrap();
    timeout(&rd);
    let chunk = 64 << 10;
    let mut initial_read = 0;
    loop {
        let i = s.precopy_info().unwrap();
        if i.initial_bytes == 0 {
            break;
        }
        copy_n(&mut rd, &mut wr, i.initial_bytes.min(chunk));
        initial_read += i.initial_bytes.min(chunk);
    }
    assert_eq!(initial_read, HEADER_LEN + stream::stream_len(1 << 20));
    let mut dirty_seen = 0;
    for _ in 0..20 {
        let i = s.precopy_info().unwrap();
        assert_eq!(i.initial_bytes, 0);
        dirty_seen += u64::from(i.dirty_bytes > 0);
        copy_n(&mut rd, &mut wr, i.dirty_bytes.min(chunk));
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(dirty_seen > 0);
    assert!(s.set_state(MigState::StopCopy).unwrap().is_none());
    let dg = s.digest();
    let mut rest = Vec::new();
    rd.read_to_end(&mut rest).unwrap();
    wr.write_all(&rest).unwrap();
    drop(wr);
    d.set_state(MigState::Stop).unwrap();
    assert_eq!(d.digest(), dg);
}

#[test]
fn rate_limits_slow_save_and_load() {
    let mut c = cfg("rl", 1 << 20, 0);
    c.save_rate = 8.0; // 1 MiB at 8 MiB/s: >= ~75 ms (50 ms burst)
    c.load_rate = 8.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    // Throttled save and load still move the state intact. (How long they
    // take is a benchmark figure, not a test assertion.)
    let t = Instant::now();
    let (dg, _, _) = migrate(&s, &d, 0);
    log::debug!("1 MiB at 8 MiB/s took {:?}", t.elapsed());
    assert_eq!(d.digest(), dg);
}

fn full_stream(c: &SimVfioConfig) -> Vec<u8> {
    let s = SimVfioDevice::new_source(c).unwrap();
    let mut rd = s.set_state(MigState::StopCopy).unwrap().unwrap();
    timeout(&rd);
    let mut v = Vec::new();
    rd.read_to_end(&mut v).unwrap();
    v
}

fn load(c: &SimVfioConfig, bytes: &[u8]) -> BackendResult<Option<File>> {
    let d = SimVfioDevice::new_destination(c).unwrap();
    let mut wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    let _ = wr.write_all(bytes); // may fail with EPIPE once the loader gave up
    drop(wr);
    let r = d.set_state(MigState::Stop);
    if r.is_err() {
        assert_eq!(d.state().unwrap(), MigState::Error);
        // A reset brings it back.
        d.set_state(MigState::Running).unwrap();
    }
    r
}

#[test]
fn truncated_or_malformed_streams_are_rejected() {
    let c = cfg("trunc", 300_000, 0);
    let full = full_stream(&c);
    assert!(load(&c, &full).is_ok());
    for cut in [
        0,
        10,
        HEADER_LEN as usize + 5,
        full.len() / 2,
        full.len() - 1,
    ] {
        let e = load(&c, &full[..cut]).unwrap_err().to_string();
        assert!(e.contains("trunc") && e.contains("truncated"), "{cut}: {e}");
    }
    // Wrong state size in the header.
    let e = load(&cfg("trunc", 300_001, 0), &full)
        .unwrap_err()
        .to_string();
    assert!(e.contains("300001"), "{e}");
    // A record pointing outside the state.
    let mut bad = full[..HEADER_LEN as usize].to_vec();
    bad.extend_from_slice(&stream::encode_record(299_999, 2));
    bad.extend_from_slice(&[0, 0]);
    let e = load(&c, &bad).unwrap_err().to_string();
    assert!(e.contains("outside"), "{e}");
    // An oversized record length.
    let mut bad = full[..HEADER_LEN as usize].to_vec();
    bad.extend_from_slice(&stream::encode_record(0, u32::MAX));
    assert!(load(&c, &bad).is_err());
}

#[test]
fn injected_save_failure() {
    let mut c = cfg("fsave", 1 << 20, 1 << 19);
    c.fail_save_after = Some(100_000);
    let s = SimVfioDevice::new_source(&c).unwrap();
    let mut rd = s.set_state(MigState::StopCopy).unwrap().unwrap();
    timeout(&rd);
    let mut v = Vec::new();
    rd.read_to_end(&mut v).unwrap();
    assert_eq!(v.len(), 100_000);
    assert_eq!(s.state().unwrap(), MigState::Error);
    let e = s.set_state(MigState::Stop).unwrap_err().to_string();
    assert!(e.contains("fsave") && e.contains("injected"), "{e}");
    // Recovery: back to RUNNING.
    s.set_state(MigState::Running).unwrap();
    assert_eq!(s.state().unwrap(), MigState::Running);
    // In PRE_COPY the failure shows up in precopy_info.
    let mut rd = s.set_state(MigState::PreCopy).unwrap().unwrap();
    timeout(&rd);
    let i = s.precopy_info().unwrap();
    let mut v = Vec::new();
    rd.read_to_end(&mut v).unwrap();
    assert!((v.len() as u64) < i.initial_bytes);
    let e = s.precopy_info().unwrap_err().to_string();
    assert!(e.contains("fsave"), "{e}");
    assert!(s.set_state(MigState::StopCopy).is_err());
    s.set_state(MigState::Running).unwrap();
}

#[test]
fn injected_load_failure() {
    let c = cfg("fload", 200_000, 0);
    let full = full_stream(&c);
    let mut bad = c.clone();
    bad.fail_load = true;
    let e = load(&bad, &full).unwrap_err().to_string();
    assert!(e.contains("fload") && e.contains("refuses"), "{e}");
}

#[test]
fn walker_arcs_and_refusals() {
    let c = cfg("walk", 64 << 10, 32 << 10);
    let s = SimVfioDevice::new_source(&c).unwrap();
    for (to, fd) in [
        (MigState::Stop, false),
        (MigState::PreCopyP2p, true),
        (MigState::Running, false),
        (MigState::StopCopy, true),
        (MigState::Resuming, true),
    ] {
        let r = s.set_state(to).unwrap();
        assert_eq!(r.is_some(), fd, "to {to:?}");
        assert_eq!(s.state().unwrap(), to);
    }
    // Leaving RESUMING without a stream fails; RUNNING resets from ERROR.
    let e = s.set_state(MigState::RunningP2p).unwrap_err().to_string();
    assert!(e.contains("walk") && e.contains("truncated"), "{e}");
    assert_eq!(s.state().unwrap(), MigState::Error);
    assert!(s.set_state(MigState::Stop).is_err());
    s.set_state(MigState::Running).unwrap();
    for (to, fd) in [
        (MigState::RunningP2p, false),
        (MigState::PreCopy, true),
        (MigState::StopCopy, false),
        (MigState::Stop, false),
    ] {
        let r = s.set_state(to).unwrap();
        assert_eq!(r.is_some(), fd, "to {to:?}");
        assert_eq!(s.state().unwrap(), to);
    }
    s.set_state(MigState::StopCopy).unwrap();
    assert!(s.set_state(MigState::PreCopy).is_err());
    assert!(s.set_state(MigState::Error).is_err());
    s.set_state(MigState::Running).unwrap();
    let n = SimVfioDevice::new_source(&cfg("nopre", 4096, 0)).unwrap();
    let e = n.set_state(MigState::PreCopy).unwrap_err().to_string();
    assert!(e.contains("nopre"), "{e}");
}

#[test]
fn drop_with_busy_threads_does_not_hang() {
    let mut c = cfg("busy", 8 << 20, 4 << 20);
    c.dirty_rate = 50.0;
    c.load_rate = 1.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let rd = s.set_state(MigState::PreCopy).unwrap().unwrap();
    s.precopy_info().unwrap(); // pump blocks: nobody reads
    let d = SimVfioDevice::new_destination(&c).unwrap();
    let wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    // Dropping must stop and join every worker although each is blocked:
    // the test finishing at all is the check.
    drop(s);
    drop(d);
    drop((rd, wr));
}

#[test]
#[ignore = "timing; run with --release"]
fn digest_speed() {
    let s = SimVfioDevice::new_source(&cfg("speed", 1 << 30, 0)).unwrap();
    let t = Instant::now();
    let _ = s.digest();
    eprintln!("digest of 1 GiB: {:?}", t.elapsed());
}

#[test]
#[ignore = "timing; run with --release --nocapture"]
fn throughput_report() {
    let mut c = cfg("tp", 256 << 20, 128 << 20);
    c.dirty_rate = 100.0;
    let t = Instant::now();
    let s = SimVfioDevice::new_source(&c).unwrap();
    eprintln!("create source: {:?}", t.elapsed());
    let t = Instant::now();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    eprintln!("create destination: {:?}", t.elapsed());
    let t = Instant::now();
    let dg = s.digest();
    eprintln!("digest 256 MiB: {:?} ({dg:x})", t.elapsed());
    let t = Instant::now();
    let (dg, moved, dr) = migrate(&s, &d, 3);
    eprintln!(
        "migrate: {moved} bytes in {:?}, {dr} dirty rounds",
        t.elapsed()
    );
    assert_eq!(d.digest(), dg);
}

#[test]
#[ignore = "timing; run with --release --nocapture"]
fn stop_copy_throughput_report() {
    let c = cfg("tp2", 256 << 20, 0);
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    let mut wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    let t = Instant::now();
    let mut rd = s.set_state(MigState::StopCopy).unwrap().unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0;
    loop {
        let k = rd.read(&mut buf).unwrap();
        if k == 0 {
            break;
        }
        wr.write_all(&buf[..k]).unwrap();
        n += k;
    }
    drop(wr);
    d.set_state(MigState::Stop).unwrap();
    let el = t.elapsed();
    eprintln!(
        "stop-copy {n} bytes in {el:?}: {:.0} MiB/s",
        n as f64 / el.as_secs_f64() / 1048576.0
    );
    assert_eq!(d.digest(), s.digest());
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
#[ignore = "counts process-wide fds; run alone with --test-threads=1"]
fn no_fd_or_thread_leaks() {
    let before = open_fds();
    {
        let mut c = cfg("leak", 1 << 20, 1 << 19);
        c.dirty_rate = 50.0;
        let s = SimVfioDevice::new_source(&c).unwrap();
        let d = SimVfioDevice::new_destination(&c).unwrap();
        let (dg, _, _) = migrate(&s, &d, 2);
        assert_eq!(d.digest(), dg);
        // An abandoned session too.
        s.set_state(MigState::Running).unwrap();
        let _rd = s.set_state(MigState::PreCopy).unwrap();
        s.precopy_info().unwrap();
    }
    assert_eq!(open_fds(), before);
}

/// Offset of the end marker in a complete stream (it is the last thing).
fn end_at(full: &[u8]) -> usize {
    full.len() - END_LEN as usize
}

#[test]
fn matching_digest_loads_and_is_kept() {
    let mut c = cfg("dgok", 1 << 20, 1 << 19);
    c.dirty_rate = 200.0;
    let s = SimVfioDevice::new_source(&c).unwrap();
    let d = SimVfioDevice::new_destination(&c).unwrap();
    assert_eq!(s.switchover_digest(), None);
    assert_eq!(d.source_digest(), None);
    let (dg, _, _) = migrate(&s, &d, 3);
    assert_eq!(d.digest(), dg);
    assert_eq!(d.source_digest(), Some(dg));
    assert_eq!(s.switchover_digest(), Some(dg));
    // The end marker carries exactly the switch-over digest.
    let full = full_stream(&cfg("dgok2", 300_000, 0));
    let src = SimVfioDevice::new_source(&cfg("dgok2", 300_000, 0)).unwrap();
    let mut dgb = [0u8; 8];
    dgb.copy_from_slice(&full[full.len() - 8..]);
    assert_eq!(stream::decode_end_digest(&dgb), src.digest());
    let mut hdr = [0u8; RECORD_HDR_LEN as usize];
    hdr.copy_from_slice(&full[end_at(&full)..end_at(&full) + RECORD_HDR_LEN as usize]);
    assert_eq!(
        stream::decode_record(&hdr, 300_000),
        Ok(stream::Record::End)
    );
    // A new load forgets the previous source digest until its end marker.
    let _wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    assert_eq!(d.source_digest(), None);
}

/// Loads `bytes` into a fresh destination; returns the error (if any) and
/// the source digest the destination kept.
fn load_keep(c: &SimVfioConfig, bytes: &[u8]) -> (Option<String>, Option<u64>) {
    let d = SimVfioDevice::new_destination(c).unwrap();
    let mut wr = d.set_state(MigState::Resuming).unwrap().unwrap();
    let _ = wr.write_all(bytes);
    drop(wr);
    let r = d.set_state(MigState::Stop).err().map(|e| e.to_string());
    if r.is_some() {
        assert_eq!(d.state().unwrap(), MigState::Error);
    }
    (r, d.source_digest())
}

#[test]
fn corrupted_state_fails_digest_check() {
    let c = cfg("corrupt", 300_000, 0);
    let full = full_stream(&c);
    let sent = SimVfioDevice::new_source(&c).unwrap().digest();
    // Flip one payload byte of the first record: the stream stays well
    // formed, only the loaded state differs.
    let mut bad = full.clone();
    bad[(HEADER_LEN + RECORD_HDR_LEN) as usize + 17] ^= 0x40;
    let (e, kept) = load_keep(&c, &bad);
    let e = e.expect("corrupted state must fail");
    assert!(
        e.contains("device corrupt: state digest mismatch after load: source 0x")
            && e.contains(&format!("source 0x{sent:016x} loaded 0x")),
        "{e}"
    );
    assert_eq!(kept, Some(sent), "the received source digest is kept");
    // Dropping a whole record (so part of the state stays zero) is caught too.
    let mut bad = full[..HEADER_LEN as usize].to_vec();
    let second = (HEADER_LEN + RECORD_HDR_LEN + CHUNK.min(300_000)) as usize;
    bad.extend_from_slice(&full[second..]);
    let (e, _) = load_keep(&c, &bad);
    let e = e.expect("missing record must fail");
    assert!(
        e.contains("corrupt") && e.contains("digest mismatch"),
        "{e}"
    );
}

#[test]
fn mismatched_end_digest_fails() {
    let c = cfg("wrongdg", 200_000, 0);
    let mut bad = full_stream(&c);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let (e, kept) = load_keep(&c, &bad);
    let e = e.expect("wrong digest must fail");
    assert!(
        e.contains("device wrongdg: state digest mismatch after load"),
        "{e}"
    );
    let loaded = stream::digest(&SimVfioDevice::new_source(&c).unwrap().shared.lock().data);
    assert!(e.contains(&format!("loaded 0x{loaded:016x}")), "{e}");
    assert_eq!(kept.map(|k| k ^ loaded), Some(1u64 << 56));
}

#[test]
fn truncated_or_malformed_end_marker_fails() {
    let c = cfg("endcut", 200_000, 0);
    let full = full_stream(&c);
    // Cut inside the digest or inside the end record header.
    for cut in [1, 4, 8, 13, END_LEN as usize] {
        let (e, kept) = load_keep(&c, &full[..full.len() - cut]);
        let e = e.unwrap_or_else(|| panic!("cut {cut} must fail"));
        assert!(
            e.contains("endcut") && e.contains("truncated"),
            "{cut}: {e}"
        );
        assert_eq!(kept, None, "no digest was received");
    }
    // A version-1 end marker (no digest).
    let mut bad = full[..end_at(&full)].to_vec();
    bad.extend_from_slice(&stream::encode_record(stream::END_OFFSET, 0));
    let (e, _) = load_keep(&c, &bad);
    let e = e.expect("v1 end marker must fail");
    assert!(e.contains("endcut") && e.contains("end marker"), "{e}");
    // A version-1 header.
    let mut bad = full.clone();
    bad[8..12].copy_from_slice(&1u32.to_le_bytes());
    let (e, _) = load_keep(&c, &bad);
    let e = e.expect("v1 stream must fail");
    assert!(e.contains("endcut") && e.contains("version 1"), "{e}");
}
