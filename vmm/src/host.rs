//! The host as the migration crate sees it ([`migration::host::Host`]): a
//! registry of the migrations running on this host, shared by every
//! `ferry` process without a daemon, and the speed of the link towards a
//! destination.
//!
//! **Registry.** A directory (default [`DEFAULT_REGISTRY`], `--migration-registry
//! DIR`) holds one file per running migration, named `out-PID-N` or
//! `in-PID-N`, on which its process holds an exclusive `flock` for as long as
//! the migration runs. The count of a direction is the number of such files
//! that are locked now: a file whose lock can be taken belongs to a process
//! that died, and is removed by whoever finds it. A file is created under a
//! dot name, locked, and only then renamed into place, so a counter never
//! sees an unlocked live file.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use migration::host::{Direction, Host, HostSlot, LinkSpeed};

/// Where migrations register when `--migration-registry` is not given.
pub const DEFAULT_REGISTRY: &str = "/run/ferry/migrations";

/// Bound of the directory entries a count looks at (a full directory
/// counts as that many).
const MAX_ENTRIES: usize = 65_536;

fn prefix(dir: Direction) -> &'static str {
    match dir {
        Direction::Outgoing => "out-",
        Direction::Incoming => "in-",
    }
}

/// `flock(fd, op)`; `Ok(false)` when the lock is held elsewhere (only with
/// `LOCK_NB`).
fn flock(f: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: flock only reads its arguments; `f` is an open descriptor
    // that outlives the call.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The registry directory of this host's running migrations.
///
/// Invariant: every file it creates is locked by its [`Registration`] from
/// before it carries its visible name until it is removed.
#[derive(Debug, Clone)]
pub struct Registry {
    dir: PathBuf,
}

/// One running migration in a [`Registry`]; removed when dropped.
#[derive(Debug)]
pub struct Registration {
    dir: PathBuf,
    path: PathBuf,
    direction: Direction,
    /// Holds the exclusive lock.
    _file: File,
}

impl Registry {
    /// A registry in `dir` (created when the first migration registers).
    pub fn new(dir: impl Into<PathBuf>) -> Registry {
        Registry { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Registers a running migration of `direction`.
    pub fn register(&self, direction: Direction) -> std::io::Result<Registration> {
        static N: AtomicU64 = AtomicU64::new(0);
        fs::create_dir_all(&self.dir)?;
        let name = format!(
            "{}{}-{}",
            prefix(direction),
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let tmp = self.dir.join(format!(".{name}"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&tmp)?;
        if !flock(&file, libc::LOCK_EX | libc::LOCK_NB)? {
            return Err(std::io::Error::other(format!(
                "{} is locked by another process",
                tmp.display()
            )));
        }
        let path = self.dir.join(&name);
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Registration {
            dir: self.dir.clone(),
            path,
            direction,
            _file: file,
        })
    }

    /// Running migrations of `direction`: the locked files of that kind.
    /// Files of dead processes (lockable) are removed on the way.
    pub fn count(&self, direction: Direction) -> std::io::Result<u32> {
        let mut n = 0u32;
        for (i, e) in fs::read_dir(&self.dir)?.enumerate() {
            if i >= MAX_ENTRIES {
                break;
            }
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if !name.starts_with(prefix(direction)) {
                continue;
            }
            let path = e.path();
            let f = match File::open(&path) {
                Ok(f) => f,
                Err(_) => continue, // removed meanwhile
            };
            match flock(&f, libc::LOCK_SH | libc::LOCK_NB) {
                Ok(false) => n = n.saturating_add(1),
                Ok(true) => {
                    log::info!("removing {} of a migration that ended", path.display());
                    let _ = fs::remove_file(&path);
                }
                Err(e) => log::debug!("{}: {e}", path.display()),
            }
        }
        Ok(n)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Removed while still locked: no counter can count it stale first.
        let _ = fs::remove_file(&self.path);
    }
}

impl HostSlot for Registration {
    fn count(&self) -> Result<u32, String> {
        Registry::new(self.dir.clone())
            .count(self.direction)
            .map(|n| n.max(1))
            .map_err(|e| format!("{}: {e}", self.dir.display()))
    }
}

/// The interface that holds local address `ip`, from `getifaddrs`.
fn interface_of(ip: IpAddr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`, freed below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = list;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet
        // freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a non-null ifa_addr points to a sockaddr whose family
        // tells its real type; the casts below follow that family.
        let addr = unsafe {
            match (*ifa.ifa_addr).sa_family as libc::c_int {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    IpAddr::from(a.sin_addr.s_addr.to_ne_bytes())
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    IpAddr::from(a.sin6_addr.s6_addr)
                }
                _ => continue,
            }
        };
        if addr == ip {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            found = Some(name.to_string_lossy().into_owned());
            break;
        }
    }
    // SAFETY: `list` came from getifaddrs and is freed once; no reference
    // into it survives (the name was copied).
    unsafe { libc::freeifaddrs(list) };
    found
}

/// Parses `/sys/class/net/IF/speed` text: Mbit/s, or why there is none.
pub fn parse_speed(text: &str) -> Result<u64, String> {
    match text.trim().parse::<i64>() {
        Ok(v) if v > 0 => Ok(v as u64),
        Ok(v) => Err(format!("the interface reports speed {v}")),
        Err(_) => Err(format!("unreadable speed {:?}", text.trim())),
    }
}

/// The outgoing interface towards `dest` (the kernel's route lookup, by
/// connecting a UDP socket, which sends nothing) and its speed.
pub fn link_speed(dest: IpAddr) -> LinkSpeed {
    let bind: SocketAddr = match dest {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let local = UdpSocket::bind(bind)
        .and_then(|s| s.connect(SocketAddr::new(dest, 9)).map(|()| s))
        .and_then(|s| s.local_addr());
    let local = match local {
        Ok(a) => a.ip(),
        Err(e) => {
            return LinkSpeed {
                interface: None,
                mbit_s: Err(format!("no route to {dest}: {e}")),
            }
        }
    };
    let Some(iface) = interface_of(local) else {
        return LinkSpeed {
            interface: None,
            mbit_s: Err(format!("no interface holds the local address {local}")),
        };
    };
    let path = format!("/sys/class/net/{iface}/speed");
    let mbit_s = match fs::read_to_string(&path) {
        Ok(t) => parse_speed(&t).map_err(|e| format!("{path}: {e}")),
        Err(e) => Err(format!("{path}: {e}")),
    };
    LinkSpeed {
        interface: Some(iface),
        mbit_s,
    }
}

/// This host for the migration crate: the registry and the links.
#[derive(Debug, Clone)]
pub struct HostResources {
    registry: Registry,
}

impl HostResources {
    /// The host with its registry in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> HostResources {
        HostResources {
            registry: Registry::new(dir),
        }
    }
}

impl Host for HostResources {
    fn register(&self, dir: Direction) -> Result<Box<dyn HostSlot>, String> {
        self.registry
            .register(dir)
            .map(|r| Box::new(r) as Box<dyn HostSlot>)
            .map_err(|e| format!("registry {}: {e}", self.registry.dir().display()))
    }

    fn link_speed(&self, dest: IpAddr) -> LinkSpeed {
        link_speed(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        std::env::temp_dir().join(format!(
            "ferry-registry-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    #[test]
    fn the_registry_counts_live_migrations_per_direction() {
        let dir = temp();
        let r = Registry::new(&dir);
        let a = r.register(Direction::Outgoing).unwrap();
        let b = r.register(Direction::Outgoing).unwrap();
        let c = r.register(Direction::Incoming).unwrap();
        assert_eq!(r.count(Direction::Outgoing).unwrap(), 2);
        assert_eq!(r.count(Direction::Incoming).unwrap(), 1);
        assert_eq!(HostSlot::count(&a).unwrap(), 2);
        drop(b);
        assert_eq!(HostSlot::count(&a).unwrap(), 1);
        drop(a);
        assert_eq!(r.count(Direction::Outgoing).unwrap(), 0);
        // Counting opens each file anew: a lock held through another open
        // file (as by another process) conflicts, so `a` counted above.
        // A file left by a process that died is not locked: not counted,
        // and removed.
        let stale = dir.join("out-999999-0");
        fs::write(&stale, b"").unwrap();
        fs::write(dir.join(".out-999999-1"), b"").unwrap();
        assert_eq!(r.count(Direction::Outgoing).unwrap(), 0);
        assert!(!stale.exists());
        assert_eq!(r.count(Direction::Incoming).unwrap(), 1);
        drop(c);
        assert_eq!(r.count(Direction::Incoming).unwrap(), 0);
        let left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn speeds() {
        assert_eq!(parse_speed("1000\n"), Ok(1000));
        assert!(parse_speed("-1\n").is_err());
        assert!(parse_speed("0").is_err());
        assert!(parse_speed("").is_err());
        let l = link_speed("127.0.0.1".parse().unwrap());
        assert_eq!(l.interface.as_deref(), Some("lo"), "{l:?}");
        assert!(l.mbit_s.is_err(), "lo has no speed: {l:?}");
    }
}
