//! Real Linux guests under ferry, in the nested test bed
//! (`ferry_tests::nested`): QEMU TCG emulates SVM, and ferry runs inside
//! it on real (emulated) KVM. Each test boots one L1 machine, runs one
//! scenario there, and checks what the L2 guests printed: their ticks
//! (timer interrupts), the checksum of their random tmpfs file, their
//! console (tty and /dev/kmsg), and the kernel warnings they counted.
//!
//! These tests skip, with a printed reason, only when QEMU is missing.

use ferry_tests::nested::{bed_or_skip, L1Run, Scenario};

/// L2 guest memory for every VM of these tests.
const L2_MEM: &str = "--memory size=256M";

/// Runs `sc`, printing the transcript if the scenario did not exit 0.
fn run_ok(sc: Scenario) -> Option<L1Run> {
    let bed = bed_or_skip()?;
    let run = bed.run(&sc);
    // The lines that say what went wrong come first: CI logs keep only the
    // head and the tail of a long transcript.
    let key: Vec<&str> = run
        .lines
        .iter()
        .map(String::as_str)
        .filter(|l| {
            [
                "FAIL",
                "triple fault",
                "kernel warning",
                "panicked",
                "ERROR",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    assert_eq!(
        run.exit_code(),
        Some(0),
        "scenario {} failed; key lines:\n{}\ntranscript:\n{}",
        sc.name,
        key.join("\n"),
        run.transcript()
    );
    Some(run)
}

/// The warning count of the L2 guest at boot (`l2: ready ... warn=N`).
fn boot_warnings(run: &L1Run, vm: &str) -> u64 {
    run.log(vm)
        .iter()
        .find_map(|l| {
            let rest = l.strip_prefix("l2: ready ")?;
            rest.split_whitespace()
                .find_map(|kv| kv.strip_prefix("warn=")?.parse().ok())
        })
        .unwrap_or_else(|| panic!("{vm}: no ready line; transcript:\n{}", run.transcript()))
}

/// Checks that the guest, whose life is spread over the logs `vms` in
/// order, ticked without a gap, at least `min_after` times in the last of
/// them, with its checksum intact and no kernel warning beyond those of
/// its boot.
fn check_guest_moved(run: &L1Run, vms: &[&str], min_after: usize) {
    let base = boot_warnings(run, vms[0]);
    // What the guests reported, first in every message: CI logs keep the
    // head and the tail of a long transcript only.
    let reported: Vec<String> = vms
        .iter()
        .flat_map(|vm| {
            run.log(vm)
                .into_iter()
                .filter(|l| l.contains("kernel warning"))
                .map(move |l| format!("[{vm}] {l}"))
        })
        .collect();
    let reported = reported.join("\n");
    let mut all = Vec::new();
    for vm in vms {
        let t = run.ticks(vm);
        assert!(
            !t.is_empty(),
            "{vm}: no tick; transcript:\n{}",
            run.transcript()
        );
        all.extend(t);
    }
    let last = run.ticks(vms[vms.len() - 1]);
    assert!(
        last.len() >= min_after,
        "{}: only {} ticks after the move; transcript:\n{}",
        vms[vms.len() - 1],
        last.len(),
        run.transcript()
    );
    for w in all.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "ticks not contiguous: {w:?}");
    }
    for (n, rest) in &all {
        assert!(rest.contains("sum=ok"), "tick {n}: checksum broken: {rest}");
        assert!(
            rest.contains(&format!("warn={base} ")),
            "tick {n}: kernel warnings beyond the {base} of boot: {rest}; the guests reported:\n{reported}\ntranscript:\n{}",
            run.transcript()
        );
    }
    for vm in &vms[1..] {
        let log = run.log(vm);
        assert!(
            log.iter().any(|l| l.contains("l2-kmsg: tick")),
            "{vm}: nothing written through /dev/kmsg reached the console"
        );
        assert!(
            !log.iter().any(|l| l.contains("kernel warning")),
            "{vm}: the guest reported kernel warnings: {log:#?}"
        );
    }
}

#[test]
fn linux_boots_to_userspace() {
    let Some(run) = run_ok(Scenario::new(
        "boot",
        &format!(
            r#"
boot_vm vm "" {L2_MEM}
wait_tick vm 2 180 || fail "no tick"
dump vm
"#
        ),
    )) else {
        return;
    };
    let log = run.log("vm");
    // Userspace output on the console tty goes through the interrupt-driven
    // 8250 driver: the guest counts its serial interrupts.
    let ready = log
        .iter()
        .find(|l| l.starts_with("l2: ready "))
        .expect("ready line");
    let irqs: u64 = ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("serial_irqs=")?.parse().ok())
        .expect("serial_irqs in the ready line");
    assert!(irqs > 0, "no serial interrupt was taken: {ready}");
    assert!(
        log.iter().any(|l| l.contains("l2-kmsg: ready")),
        "kmsg line"
    );
    for bad in [
        "i8042: Can't read CTR",
        "i8042: No controller found",
        "Kernel panic",
    ] {
        assert!(!log.iter().any(|l| l.contains(bad)), "{bad}: {log:#?}");
    }
    assert!(run.ticks("vm").len() >= 2);
}

/// A real Linux finds the host bridge through ACPI (PNP0A08 and MCFG),
/// uses ECAM, and enumerates a simulated device with its BAR inside the
/// bridge's window, as firmware assigned it.
#[test]
fn linux_sees_the_pci_bus_and_a_simulated_device() {
    let Some(run) = run_ok(Scenario::new(
        "pci",
        &format!(
            r#"
boot_vm vm "l2.dmesg=1" {L2_MEM} --sim-vfio id=d0,state=1M
wait_tick vm 1 180 || fail "no tick"
dump vm
"#
        ),
    )) else {
        return;
    };
    let log = run.log("vm");
    let dmesg: Vec<&str> = log
        .iter()
        .copied()
        .filter(|l| l.contains("l2: dmesg:"))
        .collect();
    let has = |needle: &str| dmesg.iter().any(|l| l.contains(needle));
    assert!(has("PCI0"), "no PCI0 root bridge: {dmesg:#?}");
    assert!(
        dmesg
            .iter()
            .any(|l| (l.contains("ECAM") || l.contains("MMCONFIG")) && l.contains("e0000000")),
        "ECAM not used: {dmesg:#?}"
    );
    assert!(
        has("[1b36:fe77]"),
        "simulated device not enumerated: {dmesg:#?}"
    );
    for bad in [
        "can't claim",
        "no compatible bridge window",
        "not reserved",
        "Kernel panic",
    ] {
        assert!(!has(bad), "{bad}: {dmesg:#?}");
    }
}

#[test]
fn linux_reboot_and_poweroff_end_ferry() {
    let Some(run) = run_ok(Scenario::new(
        "power",
        &format!(
            r#"
boot_vm rb "l2.end=reboot:1" {L2_MEM}
boot_vm po "l2.end=poweroff:1" {L2_MEM}
wait_exit rb 240
wait_exit po 240
dump rb
dump po
"#
        ),
    )) else {
        return;
    };
    assert!(run.said("rb exited code=0"), "{}", run.transcript());
    assert!(run.said("po exited code=0"), "{}", run.transcript());
    let rb = run.log("rb stderr").join("\n");
    assert!(rb.contains("guest ended the VM"), "{rb}");
    let po = run.log("po stderr").join("\n");
    assert!(po.contains("power off"), "{po}");
}

/// Boots `src` (with the ferry arguments `boot_args` besides the memory,
/// waiting up to `boot_wait_s` for its third tick), moves it to `dst` over
/// `conns` connections, waits for ticks there and for the source to exit
/// (`migrate` shuts it down once it reads `migrated`).
fn migrate_script(conns: u32, boot_args: &str, boot_wait_s: u32) -> String {
    format!(
        r#"
boot_vm src "" {L2_MEM} {boot_args}
wait_tick src 3 {boot_wait_s} || fail "boot"
start_vm dst {L2_MEM}
migrate src dst 6000 {conns} || fail "migration"
t=$(last_tick src)
wait_tick dst $((t + 4)) 60 || fail "no ticks on dst"
wait_exit src 30
dump src
dump dst
"#
    )
}

#[test]
fn linux_live_migration_one_connection() {
    let Some(run) = run_ok(Scenario::new("migrate1", &migrate_script(1, "", 180))) else {
        return;
    };
    assert!(run.said("src state migrated"), "{}", run.transcript());
    assert!(run.said("src exited code=0"), "{}", run.transcript());
    check_guest_moved(&run, &["src", "dst"], 4);
}

#[test]
fn linux_live_migration_back_and_forth_four_connections() {
    let Some(run) = run_ok(Scenario::new(
        "back-and-forth",
        &format!(
            r#"
boot_vm a "" {L2_MEM}
wait_tick a 3 180 || fail "boot"
start_vm b {L2_MEM}
migrate a b 6000 4 || fail "a -> b"
t=$(last_tick a)
wait_tick b $((t + 3)) 60 || fail "no ticks on b"
start_vm c {L2_MEM}
migrate b c 6001 4 || fail "b -> c"
t=$(last_tick b)
wait_tick c $((t + 3)) 60 || fail "no ticks on c"
dump a
dump b
dump c
"#
        ),
    )) else {
        return;
    };
    check_guest_moved(&run, &["a", "b", "c"], 3);
}

#[test]
fn linux_two_vcpus_boot_and_migrate() {
    let mut sc = Scenario::new("smp2", &migrate_script(4, "--cpus boot=2", 240));
    sc.smp = 2;
    let Some(run) = run_ok(sc) else { return };
    let ready = run
        .log("src")
        .into_iter()
        .find(|l| l.starts_with("l2: ready "));
    assert!(
        ready.is_some_and(|l| l.contains("cpus=2 ")),
        "the guest does not see 2 CPUs: {ready:?}"
    );
    check_guest_moved(&run, &["src", "dst"], 4);
}

#[test]
fn linux_paused_guest_arrives_paused() {
    let Some(run) = run_ok(Scenario::new(
        "paused",
        &format!(
            r#"
boot_vm src "" {L2_MEM}
wait_tick src 3 180 || fail "boot"
remote src pause >/dev/null || fail "pause"
t=$(last_tick src)
start_vm dst {L2_MEM}
migrate src dst 6000 4 || fail "migration"
say "dst state $(vm_state dst)"
sleep 4
say "ticks while paused: $(count dst 'l2: tick')"
remote dst resume >/dev/null || fail "resume"
wait_tick dst $((t + 3)) 60 || fail "no ticks after resume"
say "dst state $(vm_state dst)"
dump src
dump dst
"#
        ),
    )) else {
        return;
    };
    assert!(run.said("dst state paused"), "{}", run.transcript());
    assert!(run.said("ticks while paused: 0"), "{}", run.transcript());
    assert!(run.said("dst state running"), "{}", run.transcript());
    check_guest_moved(&run, &["src", "dst"], 3);
}

#[test]
fn linux_cancelled_migration_leaves_the_guest_on_the_source() {
    let Some(run) = run_ok(Scenario::new(
        "cancel",
        &format!(
            r#"
boot_vm src "l2.data=64" {L2_MEM}
wait_tick src 2 180 || fail "boot"
start_vm dst {L2_MEM}
remote dst receive-migration tcp:127.0.0.1:6000 --no-tls >/dev/null || fail "receive"
remote src send-migration tcp:127.0.0.1:6000 --no-tls --connections 2 --max-bandwidth-mbps 4 >/dev/null || fail "send"
i=0
until remote src migration-status | grep -q '"transferred_bytes": *[1-9]'; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no transfer"
    sleep 0.1
done
remote src migration-cancel >/dev/null || fail "cancel"
i=0
until remote src migration-status | grep -q '"state": *"cancelled"'; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "not cancelled"
    sleep 0.1
done
say "src state $(vm_state src)"
t=$(last_tick src)
wait_tick src $((t + 3)) 60 || fail "no ticks after cancel"
dump src
dump dst
"#
        ),
    )) else {
        return;
    };
    assert!(run.said("src state running"), "{}", run.transcript());
    assert!(run.ticks("dst").is_empty(), "the destination ran the guest");
    check_guest_moved(&run, &["src"], 5);
}
