//! The host's own limits, measured in the same run as the migrations.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::vmm::Env;

/// Loopback TCP throughput of iperf3 with `-P parallel`, in bytes/s.
pub fn iperf3(env: &Env, parallel: u32, seconds: u32) -> Result<f64, String> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let mut server = Command::new("iperf3")
        .args(["-s", "-1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("iperf3 -s: {e} (install it: apt-get install -y iperf3)"))?;
    std::thread::sleep(Duration::from_millis(500));
    env.settle();
    let out = Command::new("iperf3")
        .args([
            "-c",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-P",
            &parallel.to_string(),
        ])
        .args(["-t", &seconds.to_string(), "-J"])
        .output()
        .map_err(|e| format!("iperf3 -c: {e}"));
    let _ = server.kill();
    let _ = server.wait();
    let out = out?;
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("iperf3 JSON: {e}"))?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .map(|b| b / 8.0)
        .ok_or_else(|| {
            format!(
                "iperf3: no sum_received ({})",
                v.get("error").cloned().unwrap_or(Value::Null)
            )
        })
}

/// First-touch rate of fresh anonymous memory with `threads` threads, in bytes/s.
pub fn first_touch(env: &Env, gib: u32, threads: u32) -> Result<f64, String> {
    env.settle();
    let out = Command::new(&env.first_touch)
        .args([
            "--gib",
            &gib.to_string(),
            "--threads",
            &threads.to_string(),
            "--json",
        ])
        .output()
        .map_err(|e| format!("{}: {e}", env.first_touch.display()))?;
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("first-touch JSON: {e}"))?;
    v.get("cold_gbps")
        .and_then(Value::as_f64)
        .map(|g| g * 1e9)
        .ok_or_else(|| "first-touch: no cold_gbps".into())
}
