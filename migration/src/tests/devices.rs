//! Device streams: pre-copy + stop-copy in both modes, failures.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use super::*;
use crate::api::*;

const MIB: u64 = 1 << 20;

/// Source with two devices (one pre-copy with dirty rounds, one stop-copy
/// only) and a factory with matching destination devices.
fn setup(big: bool) -> (Arc<FakeSource>, FakeFactory) {
    let mut s = FakeSource::new(&[(0, 8 * MIB)]);
    let init = if big { 5 * MIB as usize + 123 } else { 70_000 };
    let d0 = FakeDevice::new("gpu0", true, pattern(1, init), pattern(2, 300_000));
    d0.dirty_rounds.store(3, SeqCst);
    let d1 = FakeDevice::new("nic1", false, pattern(3, 50_000), pattern(4, 2_500_000));
    s.devices = vec![Arc::new(d0), Arc::new(d1)];
    fill(&s, 0, 1, 3);
    let f = FakeFactory::new(s.layout());
    *f.devices.lock().unwrap() = vec![
        Arc::new(FakeDevice::new("gpu0", true, vec![], vec![])),
        Arc::new(FakeDevice::new("nic1", false, vec![], vec![])),
    ];
    (Arc::new(s), f)
}

fn check_devices(src: &FakeSource, d: &FakeDest) {
    for (s, t) in src.devices.iter().zip(&d.devices) {
        let produced = s.produced.lock().unwrap().clone();
        let loaded = t.loaded.lock().unwrap().clone().expect("device loaded");
        assert_eq!(produced.len(), loaded.len(), "device {}", s.id);
        assert!(produced == loaded, "device {} state differs", s.id);
        // Loaded (RESUMING -> STOP), then RUNNING when the VM started.
        assert_eq!(t.cur(), MigState::Running, "device {}", t.id);
        let tr = t.transitions.lock().unwrap().clone();
        assert_eq!(
            tr[tr.len() - 2..],
            [MigState::Stop, MigState::Running],
            "device {}: {:?}",
            t.id,
            tr
        );
    }
}

#[test]
fn device_streams_channels_and_main() {
    for (mode, precopy, conns, chunk) in [
        (DeviceStateMode::Channels, true, 4, 1 << 20),
        (DeviceStateMode::Channels, true, 1, 64 << 10),
        (DeviceStateMode::Channels, false, 3, 1 << 20),
        (DeviceStateMode::Main, true, 2, 256 << 10),
        (DeviceStateMode::Main, false, 2, 1 << 20),
    ] {
        let (src, f) = setup(true);
        let mut p = params(0, conns);
        p.device_state = mode;
        p.device_precopy = precopy;
        p.device_chunk_bytes = chunk;
        let (r, rr, fin, stats) = migrate_with(src.clone(), f, &mut p);
        r.unwrap_or_else(|e| panic!("{mode:?}/{precopy}: {e}"));
        rr.unwrap();
        let d = fin.factory.last();
        assert_same_ram(&src, &d);
        check_devices(&src, &d);
        let s = stats.snapshot();
        let total: usize = src
            .devices
            .iter()
            .map(|d| d.produced.lock().unwrap().len())
            .sum();
        assert_eq!(s.device_bytes_transferred, total as u64, "{mode:?}");
        assert_eq!(s.devices.len(), 2);
        if precopy && mode == DeviceStateMode::Channels {
            assert!(s.devices[0].initial_loaded, "switch-over ack recorded");
            let st = src.devices[0].transitions.lock().unwrap().clone();
            assert_eq!(st.first(), Some(&MigState::PreCopy));
        }
        let ds = fin.stats.snapshot();
        assert_eq!(ds.device_bytes_transferred, total as u64);
    }
}

#[test]
fn small_reorder_buffer_does_not_deadlock() {
    let (src, f) = setup(true);
    let dest = start_dest_with(
        f,
        ReceiveParams {
            receiver_url: "tcp:127.0.0.1:0".into(),
            device_buffer_bytes: Some(16 << 20),
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        },
    );
    let mut p = params(dest.port, 8);
    p.device_chunk_bytes = 16 << 20;
    let stats = Arc::new(MigrationStats::default());
    send(src.clone(), &p, &stats, &CancelToken::default()).unwrap();
    dest.handle.join().unwrap().unwrap();
    check_devices(&src, &dest.factory.last());
}

#[test]
fn destination_device_refusing_its_state_fails_cleanly() {
    let (src, f) = setup(false);
    let mut bad = FakeDevice::new("nic1", false, vec![], vec![]);
    bad.fail_on_stop = true;
    f.devices.lock().unwrap()[1] = Arc::new(bad);
    let mut p = params(0, 2);
    let (r, rr, fin, stats) = migrate_with(src.clone(), f, &mut p);
    let e = r.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("nic1") && msg.contains("rejected"), "{msg}");
    assert!(rerr(rr).to_string().contains("nic1"));
    assert!(fin.factory.last().discarded.load(SeqCst));
    // Source: devices back to RUNNING, VM resumed, logging off.
    for d in &src.devices {
        assert_eq!(d.cur(), MigState::Running, "{}", d.id);
    }
    assert_eq!(src.pauses.load(SeqCst), 1);
    assert_eq!(src.resumes.load(SeqCst), 1);
    assert!(!src.paused.load(SeqCst));
    assert_eq!(src.stop_log_calls.load(SeqCst), 1);
    assert_eq!(stats.snapshot().state, MigrationState::Failed);
}

#[test]
fn source_device_error_names_the_device() {
    let mut s = FakeSource::new(&[(0, MIB)]);
    let mut d = FakeDevice::new("vf7", true, pattern(1, 1000), pattern(2, 1000));
    d.fail_on = Some(MigState::StopCopy);
    s.devices = vec![Arc::new(d)];
    let src = Arc::new(s);
    let f = FakeFactory::new(src.layout());
    *f.devices.lock().unwrap() = vec![Arc::new(FakeDevice::new("vf7", true, vec![], vec![]))];
    let mut p = params(0, 2);
    let (r, rr, fin, _) = migrate_with(src.clone(), f, &mut p);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("vf7") && msg.contains("STOP_COPY"), "{msg}");
    assert!(rr.is_err());
    assert!(fin.factory.last().discarded.load(SeqCst));
    assert_eq!(src.devices[0].cur(), MigState::Running);
    assert_eq!(src.resumes.load(SeqCst), 1);
}

#[test]
fn device_mismatch_is_refused_before_ram_moves() {
    let (src, f) = setup(false);
    f.devices.lock().unwrap().pop();
    let mut p = params(0, 2);
    let (r, fin, stats) = migrate_refused(src.clone(), f, &mut p);
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("devices differ"), "{msg}");
    assert!(fin.factory.last().discarded.load(SeqCst));
    assert_eq!(stats.snapshot().transferred_bytes, 0);
    assert_eq!(src.pauses.load(SeqCst), 0);
    assert_eq!(src.devices[0].cur(), MigState::Running);
}
