//! Bad input on the command line (issue #2): exit code 2, one line on
//! stderr that says "error", nothing started and no API socket left behind.

use std::fs;
use std::time::Duration;

use ferry_tests::*;

fn expect_usage_error(what: &str, args: &[&str]) {
    let out = run_ferry(args, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}: expected exit code 2, got {}; stderr:\n{}",
        what,
        out.status,
        stderr
    );
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("PVM"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{}: expected one line on stderr, got:\n{}",
        what,
        stderr
    );
    assert!(
        lines[0].to_lowercase().contains("error"),
        "{}: stderr should say error: {:?}",
        what,
        lines[0]
    );
}

/// Paths shared by the bad-input cases.
struct Bad {
    dir: TempDir,
    kernel: String,
    sock: String,
}

impl Bad {
    fn new() -> Bad {
        let dir = TempDir::new("badinput");
        let sock = dir.join("api.sock").to_str().unwrap().to_string();
        Bad {
            kernel: stamp_guest().to_str().unwrap().to_string(),
            sock,
            dir,
        }
    }
    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
    /// Runs ferry with `args` (`K` = the guest, `S` = a fresh socket path)
    /// and expects a usage error; the socket must not be left behind.
    fn check(&self, what: &str, args: &[&str]) {
        let args: Vec<&str> = args
            .iter()
            .map(|a| match *a {
                "K" => self.kernel.as_str(),
                "S" => self.sock.as_str(),
                other => other,
            })
            .collect();
        expect_usage_error(what, &args);
        assert!(
            !std::path::Path::new(&self.sock).exists(),
            "{}: API socket left behind",
            what
        );
    }
}

macro_rules! bad_input {
    ($name:ident, [$($arg:expr),* $(,)?]) => {
        #[test]
        fn $name() {
            skip_unless_kvm!();
            let b = Bad::new();
            b.check(stringify!($name), &[$($arg),*]);
        }
    };
}

bad_input!(
    bad_unknown_flag,
    ["--kernel", "K", "--bogus-flag", "1", "--api-socket", "S"]
);
bad_input!(bad_unknown_flag_alone, ["--frobnicate"]);
bad_input!(
    bad_missing_kernel,
    ["--kernel", "/nonexistent/ferry/kernel", "--api-socket", "S"]
);
bad_input!(
    bad_kernel_is_a_directory,
    ["--kernel", "/tmp", "--api-socket", "S"]
);
bad_input!(
    bad_unparsable_size,
    ["--kernel", "K", "--memory", "size=12Q", "--api-socket", "S"]
);
bad_input!(
    bad_unparsable_size_text,
    [
        "--kernel",
        "K",
        "--memory",
        "size=lots",
        "--api-socket",
        "S"
    ]
);
bad_input!(
    bad_zero_vcpus,
    ["--kernel", "K", "--cpus", "boot=0", "--api-socket", "S"]
);
bad_input!(
    bad_vcpu_count,
    ["--kernel", "K", "--cpus", "boot=two", "--api-socket", "S"]
);
bad_input!(
    bad_memory_larger_than_host,
    [
        "--kernel",
        "K",
        "--memory",
        "size=100T",
        "--api-socket",
        "S"
    ]
);
bad_input!(
    bad_unknown_memory_option,
    [
        "--kernel",
        "K",
        "--memory",
        "size=512M,colour=blue",
        "--api-socket",
        "S"
    ]
);
bad_input!(
    bad_serial,
    [
        "--kernel",
        "K",
        "--serial",
        "carrier-pigeon",
        "--api-socket",
        "S"
    ]
);
bad_input!(
    bad_sim_vfio_size,
    [
        "--kernel",
        "K",
        "--sim-vfio",
        "id=d0,state=lots",
        "--api-socket",
        "S"
    ]
);
// A destination's declared devices are checked at start too.
bad_input!(
    bad_declared_sim_vfio,
    ["--sim-vfio", "id=d0,state=lots", "--api-socket", "S"]
);
bad_input!(
    duplicate_declared_device,
    [
        "--sim-vfio",
        "id=d0,state=1M",
        "--sim-vfio",
        "id=d0,state=2M",
        "--api-socket",
        "S"
    ]
);

#[test]
fn bad_memory_file_missing() {
    skip_unless_kvm!();
    let b = Bad::new();
    let mem = format!("size=512M,file={}", b.path("nope.mem"));
    b.check(
        "memory file missing",
        &["--kernel", "K", "--memory", &mem, "--api-socket", "S"],
    );
}

#[test]
fn bad_memory_file_too_small() {
    skip_unless_kvm!();
    let b = Bad::new();
    let small = b.path("small.mem");
    fs::File::create(&small).unwrap().set_len(16 << 20).unwrap();
    let mem = format!("size=512M,file={}", small);
    b.check(
        "memory file too small",
        &["--kernel", "K", "--memory", &mem, "--api-socket", "S"],
    );
    assert_eq!(
        fs::metadata(&small).unwrap().len(),
        16 << 20,
        "the memory file was resized"
    );
}

#[test]
fn bad_api_socket_path_is_a_regular_file() {
    skip_unless_kvm!();
    let b = Bad::new();
    let regular = b.path("not-a-socket");
    fs::write(&regular, b"precious").unwrap();
    expect_usage_error(
        "API socket path is a regular file",
        &["--kernel", &b.kernel, "--api-socket", &regular],
    );
    expect_usage_error(
        "API socket path is a regular file (no VM)",
        &["--api-socket", &regular],
    );
    assert_eq!(
        fs::read(&regular).unwrap(),
        b"precious",
        "the regular file was modified"
    );
    let d = b.path("");
    expect_usage_error(
        "API socket path is a directory",
        &["--kernel", &b.kernel, "--api-socket", &d],
    );
}
