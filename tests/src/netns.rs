//! Two "hosts" on one machine: a source and a destination network
//! namespace joined by a veth pair whose source side is shaped with
//! `tc qdisc ... tbf` to a set rate ([`NetPair`]).
//!
//! Addresses are a private /30 (`10.199.X.1` source, `10.199.X.2`
//! destination) that exists only inside the two namespaces; nothing is
//! routed anywhere else. Everything is removed on drop, also when a test
//! panics; namespaces left by a test process that was killed are removed
//! by the next [`NetPair::new`] (their names carry the owner's pid).
//! `ferry` runs inside with `ip netns exec NAME` ([`crate::Vmm::spawn_netns`]);
//! its API is a UNIX socket in the shared file system, so the test talks to
//! it from outside.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Prefix of every namespace this harness creates.
const PREFIX: &str = "ferry-t";

/// A source and a destination namespace joined by a shaped veth pair.
///
/// Invariant: while it lives both namespaces exist with the veth ends up,
/// addressed and shaped; dropping it deletes both namespaces (which
/// deletes the veth pair and its qdisc).
#[derive(Debug)]
pub struct NetPair {
    /// Namespace of the source.
    pub src_ns: String,
    /// Namespace of the destination.
    pub dst_ns: String,
    /// The source's address (in `src_ns`).
    pub src_ip: String,
    /// The destination's address (in `dst_ns`).
    pub dst_ip: String,
    /// The shaped rate as given to tc (e.g. `1gbit`).
    pub rate: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why network namespaces cannot be used here (not root, no `ip`/`tc`),
/// or `None` when they can.
pub fn netns_unavailable() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool).arg("-V").output().is_err() {
            return Some(format!("`{tool}` (iproute2) is missing"));
        }
    }
    None
}

/// Prints why and returns `true` when network namespaces cannot be used.
pub fn skip_unless_netns() -> bool {
    match netns_unavailable() {
        Some(why) => {
            eprintln!("SKIPPED: {why}");
            true
        }
        None => false,
    }
}

/// Deletes namespaces of this harness whose owner process is gone.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        if pid.parse::<u32>().is_ok() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!("netns: removing {name} left by process {pid}");
            let _ = run(&["ip", "netns", "del", name]);
        }
    }
}

impl NetPair {
    /// Creates the pair with the source → destination direction shaped to
    /// `rate` (a tc rate: `1gbit`, `500mbit`, ...).
    pub fn new(rate: &str) -> Result<NetPair, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        if let Some(why) = netns_unavailable() {
            return Err(why);
        }
        remove_stale();
        let pid = std::process::id();
        let n = N.fetch_add(1, Ordering::SeqCst);
        // The subnet is only ever seen inside these two namespaces, so two
        // pairs with the same X do not meet.
        let x = (pid.wrapping_mul(31).wrapping_add(n)) % 250 + 1;
        let pair = NetPair {
            src_ns: format!("{PREFIX}{pid}-{n}-s"),
            dst_ns: format!("{PREFIX}{pid}-{n}-d"),
            src_ip: format!("10.199.{x}.1"),
            dst_ip: format!("10.199.{x}.2"),
            rate: rate.to_string(),
        };
        // Interface names: at most 15 bytes.
        let (va, vb) = (format!("fy{}{}a", pid % 1_000_000, n % 100), {
            format!("fy{}{}b", pid % 1_000_000, n % 100)
        });
        run(&["ip", "netns", "add", &pair.src_ns])?;
        // From here on, drop removes whatever was created.
        run(&["ip", "netns", "add", &pair.dst_ns])?;
        run(&[
            "ip",
            "link",
            "add",
            &va,
            "netns",
            &pair.src_ns,
            "type",
            "veth",
            "peer",
            "name",
            &vb,
            "netns",
            &pair.dst_ns,
        ])?;
        for (ns, dev, ip) in [
            (&pair.src_ns, &va, &pair.src_ip),
            (&pair.dst_ns, &vb, &pair.dst_ip),
        ] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                dev,
            ])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        }
        run(&[
            "tc",
            "-n",
            &pair.src_ns,
            "qdisc",
            "add",
            "dev",
            &va,
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "512kb",
            "latency",
            "50ms",
        ])?;
        eprintln!(
            "netns: {} ({}) -> {} ({}), {} shaped to {rate}",
            pair.src_ns, pair.src_ip, pair.dst_ns, pair.dst_ip, va
        );
        Ok(pair)
    }

    /// `tcp:DST_IP:PORT`: a destination URL inside the pair.
    pub fn dst_url(&self, port: u16) -> String {
        format!("tcp:{}:{port}", self.dst_ip)
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in [&self.src_ns, &self.dst_ns] {
            if let Err(e) = run(&["ip", "netns", "del", ns]) {
                eprintln!("netns: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_created_and_removed() {
        if skip_unless_netns() {
            return;
        }
        let (s, d) = {
            let p = NetPair::new("100mbit").unwrap();
            let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
            let list = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(
                list.contains(&p.src_ns) && list.contains(&p.dst_ns),
                "{list}"
            );
            (p.src_ns.clone(), p.dst_ns.clone())
        };
        let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!list.contains(&s) && !list.contains(&d), "{list}");
    }
}
