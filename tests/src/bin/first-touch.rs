//! `first-touch`: how fast can this host hand out fresh anonymous memory?
//!
//! Maps `--gib N` GiB of private anonymous memory (MAP_NORESERVE, never used
//! before), then `--threads T` threads, each owning a contiguous slice, write
//! one byte to every 4 KiB page. The time from the first write to the last
//! thread finishing gives the first-touch rate: the ceiling of any
//! destination that receives into memory it has never touched ("cold").
//!
//! Usage: `first-touch [--gib 4] [--threads 2] [--warm] [--json]`
//!   --warm  also time a second write pass over the same (now resident) pages
//!   --json  print one JSON object instead of text
//!
//! Wait at least 6 s after anything freed a lot of memory before running it:
//! the host reclaims freed memory within seconds and the rate swings 2-4x.

use std::time::Instant;

const PAGE: usize = 4096;

struct Args {
    gib: f64,
    threads: usize,
    warm: bool,
    json: bool,
}

fn usage() -> ! {
    eprintln!("usage: first-touch [--gib N] [--threads T] [--warm] [--json]");
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        gib: 4.0,
        threads: 2,
        warm: false,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--gib" => {
                a.gib = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--threads" => {
                a.threads = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--warm" => a.warm = true,
            "--json" => a.json = true,
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if a.gib <= 0.0 || a.threads == 0 {
        usage()
    }
    a
}

/// Writes one byte per page over `[base, base + len)` with `threads` threads
/// splitting the range into contiguous, page-aligned slices. Returns seconds.
fn touch(base: usize, len: usize, threads: usize, value: u8) -> f64 {
    let pages = len / PAGE;
    let per = pages.div_ceil(threads);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let first = t * per;
            let last = ((t + 1) * per).min(pages);
            if first >= last {
                continue;
            }
            s.spawn(move || {
                for p in first..last {
                    // SAFETY: the page lies inside our own live mapping, and no
                    // other thread touches this slice.
                    unsafe { std::ptr::write_volatile((base + p * PAGE) as *mut u8, value) };
                }
            });
        }
    });
    start.elapsed().as_secs_f64()
}

fn main() {
    let a = parse_args();
    let len = ((a.gib * (1u64 << 30) as f64) as usize) / PAGE * PAGE;
    // SAFETY: a fresh private anonymous mapping, no aliasing.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        eprintln!(
            "first-touch: mmap of {len} bytes failed: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let base = ptr as usize;
    let cold_s = touch(base, len, a.threads, 1);
    let warm_s = if a.warm {
        Some(touch(base, len, a.threads, 2))
    } else {
        None
    };
    // SAFETY: unmapping exactly what we mapped.
    unsafe { libc::munmap(ptr, len) };

    let gb = len as f64 / 1e9;
    let gib = len as f64 / (1u64 << 30) as f64;
    if a.json {
        let mut o = serde_json::json!({
            "bytes": len,
            "threads": a.threads,
            "cold_seconds": cold_s,
            "cold_gbps": gb / cold_s,
            "cold_gibps": gib / cold_s,
            "us_per_page": cold_s * 1e6 / (len / PAGE) as f64 * a.threads as f64,
        });
        if let Some(w) = warm_s {
            o["warm_seconds"] = w.into();
            o["warm_gbps"] = (gb / w).into();
        }
        println!("{o}");
    } else {
        println!(
            "first-touch: {gib:.2} GiB, {} thread(s): {:.3} s, {:.3} GB/s ({:.3} GiB/s), {:.2} us/page/thread",
            a.threads,
            cold_s,
            gb / cold_s,
            gib / cold_s,
            cold_s * 1e6 / (len / PAGE) as f64 * a.threads as f64
        );
        if let Some(w) = warm_s {
            println!("rewrite (warm): {:.3} s, {:.2} GB/s", w, gb / w);
        }
    }
}
