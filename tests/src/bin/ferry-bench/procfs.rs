//! CPU time and memory of a process, from /proc.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// utime + stime of a process (all threads), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut + st) / clk_tck())
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Memory figures of /proc/PID/status, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Mem {
    pub rss: u64,
    pub anon: u64,
    pub shmem: u64,
    pub file: u64,
    pub hwm: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut m = Mem::default();
    let mut seen = false;
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let key = it.next().unwrap_or("");
        let kb: u64 = match it.next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => continue,
        };
        let b = kb * 1024;
        match key {
            "VmRSS:" => {
                m.rss = b;
                seen = true
            }
            "RssAnon:" => m.anon = b,
            "RssShmem:" => m.shmem = b,
            "RssFile:" => m.file = b,
            "VmHWM:" => m.hwm = b,
            _ => {}
        }
    }
    seen.then_some(m)
}

/// Peaks seen by a [`Sampler`] for one process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peaks {
    /// Memory at the first sample.
    pub first: Mem,
    pub max_rss: u64,
    pub max_anon: u64,
    /// max over samples of RssAnon + RssShmem.
    pub max_anon_shmem: u64,
    pub max_hwm: u64,
    /// Last CPU time read (seconds), for processes that exit before the end.
    pub last_cpu: Option<f64>,
    pub samples: u64,
}

/// Samples /proc/PID/status of some processes every `period` until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    peaks: Arc<Mutex<Vec<Peaks>>>,
    handle: Option<JoinHandle<()>>,
}

impl Sampler {
    pub fn start(pids: Vec<u32>, period: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new(Mutex::new(vec![Peaks::default(); pids.len()]));
        let (s2, p2) = (stop.clone(), peaks.clone());
        let handle = std::thread::spawn(move || {
            let mut n = 0u64;
            loop {
                let done = s2.load(Ordering::Relaxed);
                for (i, &pid) in pids.iter().enumerate() {
                    let m = mem(pid);
                    let cpu = if n.is_multiple_of(5) {
                        cpu_seconds(pid)
                    } else {
                        None
                    };
                    let mut g = p2.lock().unwrap();
                    let p = &mut g[i];
                    if let Some(m) = m {
                        if p.samples == 0 {
                            p.first = m;
                        }
                        p.samples += 1;
                        p.max_rss = p.max_rss.max(m.rss);
                        p.max_anon = p.max_anon.max(m.anon);
                        p.max_anon_shmem = p.max_anon_shmem.max(m.anon + m.shmem);
                        p.max_hwm = p.max_hwm.max(m.hwm);
                    }
                    if cpu.is_some() {
                        p.last_cpu = cpu;
                    }
                }
                if done {
                    break;
                }
                n += 1;
                std::thread::sleep(period);
            }
        });
        Sampler {
            stop,
            peaks,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> Vec<Peaks> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.peaks.lock().unwrap().clone()
    }
}

/// Total and available memory of the host (bytes).
pub fn meminfo() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |k: &str| {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (get("MemTotal:"), get("MemAvailable:"))
}
