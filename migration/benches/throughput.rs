//! Loopback RAM-migration throughput: `cargo bench -p migration --bench
//! throughput [-- SIZE_MIB CONNECTIONS]`. Prints GB/s of guest data moved
//! (non-zero pages) and the downtime; compare with `iperf3 -c 127.0.0.1`.

use std::fs::File;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use migration::*;

struct Mem(usize, usize);

impl Mem {
    fn new(len: usize) -> Mem {
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // picks, so no existing memory is affected; MAP_FAILED is checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Mem(p as usize, len)
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: (self.0, self.1) is exactly the mapping `Mem::new` made, and
        // nothing uses it after drop.
        unsafe { libc::munmap(self.0 as *mut libc::c_void, self.1) };
    }
}

struct Src(Mem);

impl SourceVm for Src {
    fn config(&self) -> BackendResult<Vec<u8>> {
        Ok(vec![1])
    }
    fn ram(&self) -> Vec<RamRegion> {
        // SAFETY: the mapping is owned by `self` and lives as long as it.
        vec![unsafe { RamRegion::new(0, self.0 .1 as u64, self.0 .0) }]
    }
    fn populated(&self, _: usize) -> BackendResult<Vec<Range<u64>>> {
        Ok(std::iter::once(0..self.0 .1 as u64).collect())
    }
    fn start_dirty_log(&self) -> BackendResult<()> {
        Ok(())
    }
    fn stop_dirty_log(&self) -> BackendResult<()> {
        Ok(())
    }
    fn fetch_dirty(&self, _: usize) -> BackendResult<DirtyBitmap> {
        Ok(DirtyBitmap {
            words: vec![0; (self.0 .1 / 4096).div_ceil(64)],
        })
    }
    fn manual_protect(&self) -> bool {
        false
    }
    fn clear_dirty(&self, _: usize, _: u64, _: u64) -> BackendResult<()> {
        Ok(())
    }
    fn pause(&self) -> BackendResult<()> {
        Ok(())
    }
    fn resume(&self) -> BackendResult<()> {
        Ok(())
    }
    fn user_paused(&self) -> bool {
        false
    }
    fn save_state(&self) -> BackendResult<Vec<u8>> {
        Ok(vec![0; 4096])
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        vec![]
    }
}

struct Dst(Mem);

impl DestinationVm for Dst {
    fn ram(&self) -> Vec<RamRegion> {
        // SAFETY: the mapping is owned by `self` and lives as long as it.
        vec![unsafe { RamRegion::new(0, self.0 .1 as u64, self.0 .0) }]
    }
    fn devices(&self) -> Vec<Arc<dyn MigratableDevice>> {
        vec![]
    }
    fn restore_state(&self, _: &[u8]) -> BackendResult<()> {
        Ok(())
    }
    fn start(&self, _: bool) -> BackendResult<()> {
        Ok(())
    }
    fn discard(&self) {}
}

struct Factory(usize);

impl DestinationFactory for Factory {
    fn create(&self, _: &[u8]) -> BackendResult<Arc<dyn DestinationVm>> {
        let m = Mem::new(self.0);
        // Pre-fault so that the measurement is the network path, not page faults.
        // SAFETY: writes exactly the `m.1` bytes of the fresh mapping, which
        // nothing else references yet.
        unsafe { std::ptr::write_bytes(m.0 as *mut u8, 1, m.1) };
        Ok(Arc::new(Dst(m)))
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mib: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2048);
    let conns: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let len = mib << 20;
    let src = Mem::new(len);
    for (i, b) in (0..len).step_by(4096).enumerate() {
        // SAFETY: `len` is a whole number of MiB and `b` steps by 4096 below
        // it, so the page lies inside the mapping; no other thread uses it yet.
        unsafe { std::ptr::write_bytes((src.0 + b) as *mut u8, (i as u8) | 1, 4096) };
    }
    let _ = File::open("/dev/null");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let rstats = Arc::new(MigrationStats::default());
    let rs = rstats.clone();
    let h = std::thread::spawn(move || {
        let p = ReceiveParams {
            receiver_url: format!("tcp:127.0.0.1:{port}"),
            device_buffer_bytes: None,
            tls_dir: None,
            tls: Some(false),
            tls_allowed_subjects: Vec::new(),
        };
        receive(l, &Factory(len), &p, &rs, &CancelToken::default()).map(|_| ())
    });
    let p: SendParams = serde_json::from_str(&format!(
        r#"{{"destination_url":"tcp:127.0.0.1:{port}","connections":{conns},"tls":false}}"#
    ))
    .unwrap();
    let stats = Arc::new(MigrationStats::default());
    let t = Instant::now();
    send(Arc::new(Src(src)), &p, &stats, &CancelToken::default()).unwrap();
    let el = t.elapsed();
    h.join().unwrap().unwrap();
    let s = stats.snapshot();
    // Exclude setup (the fake destination pre-faults its RAM there).
    let xfer = el.as_secs_f64() - s.setup_time_ms.unwrap_or(0) as f64 / 1000.0;
    println!(
        "{mib} MiB, {conns} connections: {:.3} s total, {:.3} s transfer, {:.2} GB/s, setup {:?} ms, downtime {:?} ms, passes {}",
        el.as_secs_f64(),
        xfer,
        len as f64 / xfer / 1e9,
        s.setup_time_ms,
        s.downtime_ms,
        s.iteration
    );
}
