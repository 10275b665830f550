//! Tests of the command line ([`super`]).

use super::*;

fn cli(args: &[&str]) -> Result<Cli, clap::Error> {
    let mut v = vec!["ferry"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v)
}

#[test]
fn memory_sizes_use_the_shared_grammar() {
    for (s, v) in [
        ("size=512M", 512 << 20),
        ("size=4G", 4 << 30),
        ("size=4GiB", 4 << 30),
        ("size=16384K", 16 << 20),
        ("size=1g", 1 << 30),
        ("size=268435456", 256 << 20),
        ("1G", 1 << 30),
    ] {
        assert_eq!(parse_memory(s).unwrap().size, v, "{s}");
    }
    for bad in [
        "size=",
        "size=M",
        "size=12X",
        "size=12Q",
        "size=-1G",
        "size=1.5G",
        "size=lots",
        "size=99999999999999999999G",
        "size=17179869184G",
    ] {
        assert!(parse_memory(bad).is_err(), "{bad}");
    }
}

#[test]
fn memory_options() {
    let m = parse_memory("size=1G").unwrap();
    assert_eq!(m.size, 1 << 30);
    assert_eq!(m.backing, MemoryBacking::Anonymous);
    assert!(!m.prefault);
    let m = parse_memory("size=64M,shared=on,prefault=on").unwrap();
    assert_eq!(m.backing, MemoryBacking::Shared);
    assert!(m.prefault);
    let m = parse_memory("size=64M,file=/tmp/x").unwrap();
    assert_eq!(m.backing, MemoryBacking::File("/tmp/x".into()));
    assert_eq!(parse_memory("2G").unwrap().size, 2 << 30);
    assert!(parse_memory("size=abc").is_err());
    assert!(parse_memory("size=512K").is_err(), "too small");
    assert!(parse_memory("size=10000001").is_err(), "not page aligned");
    assert!(parse_memory("size=2T").is_err(), "too large");
    assert!(parse_memory("size=64M,shared=maybe").is_err());
    assert!(parse_memory("size=64M,bogus=1").is_err());
    assert!(parse_memory("size=64M,shared=on,file=/x").is_err());
    assert!(parse_memory("size=64M,file=").is_err());
    assert!(parse_memory("size=64M,,").is_err());
    assert!(parse_memory("").is_err());
    assert!(parse_memory("size=64M,size=128M").is_err(), "duplicate");
    assert!(parse_memory("1G,2G").is_err(), "two bare sizes");
    assert!(parse_memory("Size=1G").is_err(), "keys are case-sensitive");
    let m = parse_memory("shared=yes,256M,prefault=1").unwrap();
    assert_eq!(
        (m.size, m.backing, m.prefault),
        (256 << 20, MemoryBacking::Shared, true)
    );
}

#[test]
fn serial_options() {
    assert_eq!(parse_serial("tty").unwrap(), SerialConfig::Tty);
    assert_eq!(parse_serial("off").unwrap(), SerialConfig::Off);
    assert_eq!(
        parse_serial("file=/tmp/s.log").unwrap(),
        SerialConfig::File("/tmp/s.log".into())
    );
    assert!(parse_serial("file=").is_err());
    assert!(parse_serial("pty").is_err());
    assert!(parse_serial("file=/a,file=/b").is_err());
    assert!(parse_serial("path=/a").is_err());
}

#[test]
fn cpus() {
    assert_eq!(parse_cpus("boot=1").unwrap(), 1);
    assert_eq!(parse_cpus("boot=4").unwrap(), 4);
    assert_eq!(parse_cpus("2").unwrap(), 2);
    assert_eq!(parse_cpus("boot=254").unwrap(), 254);
    assert!(parse_cpus("boot=0").is_err());
    assert!(parse_cpus("boot=255").is_err());
    assert!(parse_cpus("boot=100000").is_err());
    assert!(parse_cpus("boot=x").is_err());
    assert!(parse_cpus("max=2").is_err());
    assert!(parse_cpus("").is_err());
    assert!(parse_cpus("boot=2,boot=3").is_err(), "duplicate");
    assert!(parse_cpus("boot=-1").is_err());
    assert!(parse_cpus("boot=").is_err());
    assert_eq!(parse_cpus("boot= 3").unwrap(), 3);
}

#[test]
fn cli_forms() {
    let c = VmmConfig::parse(&cli(&["--kernel", "k", "--cmdline", "a=1"]).unwrap()).unwrap();
    let b = c.boot.unwrap();
    assert_eq!(b.cmdline, "a=1");
    assert_eq!(c.cpus, 1);
    assert_eq!(c.memory.size, DEFAULT_MEMORY);
    assert!(!c.memory_explicit);
    let c = VmmConfig::parse(&cli(&["--api-socket", "/tmp/a.sock"]).unwrap()).unwrap();
    assert!(c.boot.is_none());
    assert!(VmmConfig::parse(&cli(&[]).unwrap()).is_err());
    assert!(VmmConfig::parse(&cli(&["--api-socket", "s", "--cmdline", "x"]).unwrap()).is_err());
    assert!(VmmConfig::parse(&cli(&["--kernel", "k", "--cpus", "boot=0"]).unwrap()).is_err());
    let c = VmmConfig::parse(
        &cli(&["--kernel", "k", "--sim-vfio", "id=a", "--sim-vfio", "id=b"]).unwrap(),
    )
    .unwrap();
    assert_eq!(c.sim_vfio, vec!["id=a", "id=b"]);
    // A destination declares the devices it accepts, without --kernel.
    let c = VmmConfig::parse(
        &cli(&[
            "--api-socket",
            "s",
            "--sim-vfio",
            "id=a,state=1M",
            "--vfio",
            "path=/sys/bus/pci/devices/0000:00:01.0",
            "--serial",
            "off",
        ])
        .unwrap(),
    )
    .unwrap();
    assert!(c.boot.is_none());
    assert_eq!((c.sim_vfio.len(), c.vfio.len()), (1, 1));
    assert!(VmmConfig::parse(&cli(&["--sim-vfio", "id=a,state=1M"]).unwrap()).is_err());
}

#[test]
fn host_sharing_options() {
    let c = VmmConfig::parse(&cli(&["--api-socket", "s"]).unwrap()).unwrap();
    assert_eq!(c.host_migration_bandwidth_mib_s, None);
    assert_eq!(
        c.migration_registry,
        PathBuf::from(crate::host::DEFAULT_REGISTRY)
    );
    let c = VmmConfig::parse(
        &cli(&[
            "--api-socket",
            "s",
            "--migration-registry",
            "/tmp/r",
            "--host-migration-bandwidth-mib-s",
            "64",
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(c.host_migration_bandwidth_mib_s, Some(64.0));
    assert_eq!(c.migration_registry, PathBuf::from("/tmp/r"));
    for bad in ["0", "-1", "NaN", "inf", "1e9"] {
        let r = cli(&["--api-socket", "s", "--host-migration-bandwidth-mib-s", bad]);
        let refused = match r {
            Err(_) => true,
            Ok(c) => VmmConfig::parse(&c)
                .unwrap_err()
                .to_string()
                .contains("--host-migration-bandwidth-mib-s"),
        };
        assert!(refused, "{bad}");
    }
    let empty = cli(&["--api-socket", "s", "--migration-registry", ""]);
    assert!(empty.is_err() || VmmConfig::parse(&empty.unwrap()).is_err());
}

#[test]
fn clap_errors_are_one_line() {
    let e = cli(&["--kernal", "x"]).unwrap_err();
    let line = clap_error_line(&e);
    assert!(!line.contains('\n'));
    assert!(line.contains("--kernal"), "{line}");
    let e = cli(&["--kernel"]).unwrap_err();
    assert!(!clap_error_line(&e).contains('\n'));
}

#[test]
fn meminfo() {
    let t = "MemTotal:       24000000 kB\nMemFree: 1 kB\nSwapTotal:      1000 kB\n";
    assert_eq!(parse_meminfo(t), Some((24000000 + 1000) * 1024));
    assert_eq!(parse_meminfo("garbage"), None);
}

#[test]
fn host_memory_limits() {
    let huge = MemoryConfig {
        size: 1 << 50,
        ..MemoryConfig::default()
    };
    assert!(check_host_memory(&huge).is_err());
    assert!(check_host_memory(&MemoryConfig::default()).is_ok());
    let dir = std::env::temp_dir().join(format!("ferry-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("mem");
    std::fs::write(&f, vec![0u8; 8192]).unwrap();
    let small = MemoryConfig {
        size: 1 << 20,
        backing: MemoryBacking::File(f.clone()),
        prefault: false,
    };
    assert!(check_host_memory(&small).is_err(), "file too small");
    let missing = MemoryConfig {
        backing: MemoryBacking::File(dir.join("nope")),
        ..small.clone()
    };
    assert!(check_host_memory(&missing).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn api_socket_checks() {
    let dir = std::env::temp_dir().join(format!("ferry-sock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let regular = dir.join("regular");
    std::fs::write(&regular, b"x").unwrap();
    assert!(check_api_socket(&regular).is_err());
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(check_api_socket(&stale).is_ok());
    assert!(!stale.exists());
    let live = dir.join("live.sock");
    let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
    assert!(check_api_socket(&live).is_err());
    assert!(check_api_socket(&dir.join("nodir/x.sock")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
