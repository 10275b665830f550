//! What a migration says about the guest ([`MigrationConfig`], the
//! configuration bytes of SETUP), and the destination's checks of it against
//! what its own command line allows ([`DestPolicy`]).
//!
//! The trust model: **the stream describes the guest; the destination owns
//! its host resources.** The configuration names the vCPU count and the
//! CPUID, the memory size and layout, the optional vCPU state the saved
//! state holds, and each device's id, kind and state size. It names no
//! path, no backing, no boot file and no device parameter: the serial
//! output, the memory backing, VFIO host paths and simulated-device
//! resources come from the destination's own command line. Unknown fields
//! are refused, so an older or hostile peer cannot smuggle a host path in.
//! Every check here runs before anything is allocated or opened.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use crate::caps::HostCaps;
use crate::config::{host_memory_bytes, VmmConfig, MAX_CPUS, MAX_MEMORY, MIN_MEMORY};
use crate::device_set::{match_declared, validate_args, DeviceSpec, GuestDevice};
use crate::vm::Vm;

/// Format name of [`MigrationConfig`].
pub const CONFIG_FORMAT: &str = "ferry-vm-config";
/// Version of [`MigrationConfig`]. Version 1 also carried the source's
/// serial setting, boot files and device arguments; it is refused.
pub const CONFIG_VERSION: u32 = 2;
/// Largest configuration accepted from a source.
pub const MAX_CONFIG_BYTES: usize = 1 << 20;
/// Most CPUID entries accepted from a source (KVM lists at most 80 today).
pub const MAX_CPUID_ENTRIES: usize = 256;
/// Most MSR indices accepted from a source.
pub const MAX_MSRS: usize = 4096;
/// Most devices accepted from a source (also the SETUP bound).
pub const MAX_DEVICES: usize = 256;

/// One CPUID entry of the guest, as `KVM_SET_CPUID2` takes it.
///
/// Invariant: the values vCPU 0 of the source was given (or claims to be).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntry {
    /// Leaf.
    pub function: u32,
    /// Sub-leaf.
    pub index: u32,
    /// KVM flags (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`, ...).
    pub flags: u32,
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ECX.
    pub ecx: u32,
    /// EDX.
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_cpuid_entry2) -> CpuidEntry {
        CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl CpuidEntry {
    /// As KVM's structure.
    pub fn to_kvm(self) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function: self.function,
            index: self.index,
            flags: self.flags,
            eax: self.eax,
            ebx: self.ebx,
            ecx: self.ecx,
            edx: self.edx,
            ..Default::default()
        }
    }
}

/// The guest a source sends (JSON), and nothing about its host.
///
/// Invariant: describes the VM that produced it: RAM regions as
/// `arch::layout::ram_regions(memory_size)`, vCPU 0's CPUID, devices in
/// migration order, and the optional vCPU state its saved state contains
/// (`caps`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// [`CONFIG_FORMAT`].
    pub format: String,
    /// [`CONFIG_VERSION`].
    pub version: u32,
    /// vCPU count.
    pub cpus: u8,
    /// Total RAM bytes.
    pub memory_size: u64,
    /// RAM regions as (gpa, size).
    pub regions: Vec<(u64, u64)>,
    /// The CPUID of vCPU 0.
    pub cpuid: Vec<CpuidEntry>,
    /// Devices, in migration order.
    pub devices: Vec<GuestDevice>,
    /// Optional vCPU state included in the saved state.
    pub caps: HostCaps,
    /// The MSRs the saved state holds for each vCPU.
    pub msrs: Vec<u32>,
}

/// How much guest memory a destination accepts.
///
/// Invariant: sizes are in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLimit {
    /// `--memory size=S` was given: its backing is sized for exactly `S`
    /// bytes, so the guest must have exactly that much.
    Exact(u64),
    /// No `--memory`: anonymous memory of the guest's size, at most this
    /// much (the host's RAM + swap, and never over `MAX_MEMORY`).
    AtMost(u64),
}

/// What a destination accepts, from its own command line.
///
/// Invariant: `devices` parsed and have unique ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestPolicy {
    /// Memory the guest may have.
    pub memory: MemoryLimit,
    /// The devices declared with `--sim-vfio` / `--vfio`.
    pub devices: Vec<DeviceSpec>,
}

impl DestPolicy {
    /// The policy of a VMM started with `cfg`.
    pub fn of(cfg: &VmmConfig) -> Result<DestPolicy, String> {
        let memory = if cfg.memory_explicit {
            MemoryLimit::Exact(cfg.memory.size)
        } else {
            MemoryLimit::AtMost(host_memory_bytes().unwrap_or(MAX_MEMORY).min(MAX_MEMORY))
        };
        let devices = validate_args(&cfg.sim_vfio, &cfg.vfio).map_err(|e| e.to_string())?;
        Ok(DestPolicy { memory, devices })
    }
}

/// A configuration that passed every check, with the destination's own
/// device specs paired to it.
///
/// Invariant: `devices[i]` is the declared device with the id of
/// `cfg.devices[i]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The incoming guest.
    pub cfg: MigrationConfig,
    /// This destination's devices, in the guest's order.
    pub devices: Vec<DeviceSpec>,
}

fn mib(b: u64) -> u64 {
    b >> 20
}

impl MemoryLimit {
    /// Whether a guest of `size` bytes fits; the refusal names the limit.
    pub fn check(&self, size: u64) -> Result<(), String> {
        match *self {
            MemoryLimit::Exact(limit) if size > limit => Err(format!(
                "the incoming VM has {} MiB of RAM, more than this destination allows \
                 (--memory size={} MiB)",
                mib(size),
                mib(limit)
            )),
            MemoryLimit::Exact(limit) if size != limit => Err(format!(
                "memory size mismatch: the incoming VM has {} MiB of RAM, this destination \
                 was started with --memory size={} MiB (the sizes must be equal)",
                mib(size),
                mib(limit)
            )),
            MemoryLimit::AtMost(limit) if size > limit => Err(format!(
                "the incoming VM has {} MiB of RAM, more than this destination allows \
                 ({} MiB: the host's RAM + swap; --memory was not given)",
                mib(size),
                mib(limit)
            )),
            _ => Ok(()),
        }
    }
}

impl MigrationConfig {
    /// Describes `vm`.
    pub fn of(vm: &Vm) -> MigrationConfig {
        MigrationConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            cpus: vm.vcpu_count() as u8,
            memory_size: vm.ram().size(),
            regions: vm.ram().regions().iter().map(|r| (r.gpa, r.size)).collect(),
            cpuid: vm.cpuid().iter().map(CpuidEntry::from).collect(),
            devices: vm.devices().guest_devices(),
            caps: vm.caps().clone(),
            msrs: vm.spec.msr_list.clone(),
        }
    }

    /// Parses a received configuration and checks it against `policy`,
    /// allocating nothing: format, version, vCPU count, memory size
    /// (against [`DestPolicy::memory`]) and layout, CPUID entry count, and
    /// the devices (paired with the declared ones by id, kind and state
    /// size; see [`match_declared`]).
    pub fn parse_and_check(bytes: &[u8], policy: &DestPolicy) -> Result<Accepted, String> {
        if bytes.len() > MAX_CONFIG_BYTES {
            return Err(format!(
                "VM configuration is {} bytes (at most {MAX_CONFIG_BYTES})",
                bytes.len()
            ));
        }
        #[derive(Deserialize)]
        struct Head {
            format: String,
            version: u32,
        }
        let head: Head = serde_json::from_slice(bytes)
            .map_err(|e| format!("unreadable VM configuration: {e}"))?;
        if head.format != CONFIG_FORMAT || head.version != CONFIG_VERSION {
            let shown: String = head.format.chars().take(64).collect();
            return Err(format!(
                "VM configuration format {shown} v{} is not supported (this VMM reads \
                 {CONFIG_FORMAT} v{CONFIG_VERSION})",
                head.version
            ));
        }
        let cfg: MigrationConfig = serde_json::from_slice(bytes)
            .map_err(|e| format!("unreadable VM configuration: {e}"))?;
        if cfg.cpus == 0 || cfg.cpus > MAX_CPUS {
            return Err(format!("invalid vCPU count {} (1..={MAX_CPUS})", cfg.cpus));
        }
        if cfg.memory_size < MIN_MEMORY
            || cfg.memory_size > MAX_MEMORY
            || !cfg.memory_size.is_multiple_of(crate::memory::PAGE)
        {
            return Err(format!("invalid memory size {:#x}", cfg.memory_size));
        }
        policy.memory.check(cfg.memory_size)?;
        let layout: Vec<(u64, u64)> = arch::layout::ram_regions(cfg.memory_size)
            .into_iter()
            .map(|(g, s)| (g.0, s as u64))
            .collect();
        if layout != cfg.regions {
            return Err(format!(
                "memory layout differs: source {:x?}, this VMM would use {:x?}",
                cfg.regions, layout
            ));
        }
        if cfg.cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(format!(
                "{} CPUID entries (at most {MAX_CPUID_ENTRIES})",
                cfg.cpuid.len()
            ));
        }
        if cfg.msrs.len() > MAX_MSRS {
            return Err(format!("{} MSRs (at most {MAX_MSRS})", cfg.msrs.len()));
        }
        if cfg.devices.len() > MAX_DEVICES {
            return Err(format!(
                "{} devices (at most {MAX_DEVICES})",
                cfg.devices.len()
            ));
        }
        let devices = match_declared(&cfg.devices, &policy.devices)?;
        Ok(Accepted { cfg, devices })
    }

    /// Checks that this host can restore every MSR the guest's state holds:
    /// each is one this host saves too (`restorable`, probed on a fresh
    /// vCPU) or on the ignore list (`crate::state::MSR_RESTORE_IGNORE`).
    /// Run before any RAM moves; the restore itself still fails on any
    /// MSR that KVM refuses.
    pub fn check_msrs(&self, restorable: &[u32]) -> Result<(), String> {
        let ignored = |i: u32| {
            crate::state::MSR_RESTORE_IGNORE
                .iter()
                .any(|(x, _)| *x == i)
        };
        let missing: Vec<String> = self
            .msrs
            .iter()
            .filter(|&&i| !restorable.contains(&i) && !ignored(i))
            .take(16)
            .map(|i| format!("{i:#x}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!(
            "the guest's state holds MSRs this host cannot restore: {}",
            missing.join(", ")
        ))
    }

    /// Checks that `host` (the CPUID this host gives vCPU 0, see
    /// `crate::vm::host_guest_cpuid`) offers every guest-visible feature of
    /// the guest's CPUID (`arch::cpuid_compat`).
    pub fn check_cpuid(&self, host: &[kvm_cpuid_entry2]) -> Result<(), String> {
        let guest: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(|e| e.to_kvm()).collect();
        let missing = arch::cpuid_compat::missing_features(&guest, host);
        if missing.is_empty() {
            return Ok(());
        }
        let list: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
        Err(format!(
            "the guest uses CPU features this host lacks: {}",
            list.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_set::DeviceKind;

    fn cfg(size: u64) -> MigrationConfig {
        MigrationConfig {
            format: CONFIG_FORMAT.into(),
            version: CONFIG_VERSION,
            cpus: 1,
            memory_size: size,
            regions: arch::layout::ram_regions(size)
                .into_iter()
                .map(|(g, s)| (g.0, s as u64))
                .collect(),
            cpuid: vec![],
            devices: vec![],
            caps: HostCaps::default(),
            msrs: vec![0x10, 0x8b],
        }
    }

    fn bytes(c: &MigrationConfig) -> Vec<u8> {
        serde_json::to_vec(c).unwrap()
    }

    fn open() -> DestPolicy {
        DestPolicy {
            memory: MemoryLimit::AtMost(MAX_MEMORY),
            devices: vec![],
        }
    }

    fn exact(size: u64) -> DestPolicy {
        DestPolicy {
            memory: MemoryLimit::Exact(size),
            devices: vec![],
        }
    }

    fn sim(id: &str, state: &str) -> DeviceSpec {
        let arg = format!("id={id},state={state}");
        validate_args(&[arg], &[]).unwrap().remove(0)
    }

    fn check(c: &MigrationConfig, p: &DestPolicy) -> Result<Accepted, String> {
        MigrationConfig::parse_and_check(&bytes(c), p)
    }

    #[test]
    fn compatible_configs() {
        let c = cfg(512 << 20);
        assert_eq!(check(&c, &open()).unwrap().cfg, c);
        assert!(check(&c, &exact(512 << 20)).is_ok());
        let big = cfg(6 << 30);
        assert_eq!(big.regions.len(), 2);
        assert!(check(&big, &open()).is_ok());
    }

    #[test]
    fn memory_limits_name_the_limit() {
        let c = cfg(1 << 30);
        let e = check(&c, &exact(512 << 20)).unwrap_err();
        assert!(
            e.contains("1024 MiB") && e.contains("--memory size=512 MiB"),
            "{e}"
        );
        let e = check(&cfg(256 << 20), &exact(512 << 20)).unwrap_err();
        assert!(e.contains("mismatch") && e.contains("equal"), "{e}");
        let p = DestPolicy {
            memory: MemoryLimit::AtMost(768 << 20),
            devices: vec![],
        };
        let e = check(&c, &p).unwrap_err();
        assert!(e.contains("768 MiB") && e.contains("RAM + swap"), "{e}");
        assert!(check(&cfg(512 << 20), &p).is_ok());
    }

    #[test]
    fn incompatible_configs() {
        let c = cfg(512 << 20);
        let mut v = c.clone();
        v.version = 1;
        let e = check(&v, &open()).unwrap_err();
        assert!(e.contains("v1 is not supported"), "{e}");
        let mut v = c.clone();
        v.regions = vec![(0, 256 << 20)];
        assert!(check(&v, &open()).unwrap_err().contains("layout"));
        let mut v = c.clone();
        v.cpus = 0;
        assert!(check(&v, &open()).is_err());
        let mut v = c.clone();
        v.memory_size = 12345;
        assert!(check(&v, &open()).is_err());
        let mut v = c.clone();
        v.cpuid = vec![CpuidEntry::from(&kvm_cpuid_entry2::default()); MAX_CPUID_ENTRIES + 1];
        assert!(check(&v, &open()).unwrap_err().contains("CPUID entries"));
        let p = open();
        assert!(MigrationConfig::parse_and_check(b"{not json", &p).is_err());
        assert!(MigrationConfig::parse_and_check(&vec![b' '; MAX_CONFIG_BYTES + 1], &p).is_err());
    }

    /// A version-1 style configuration naming host resources, relabelled
    /// version 2, is refused by name: the stream cannot carry them.
    #[test]
    fn host_resources_cannot_be_smuggled_in() {
        let base = serde_json::to_value(cfg(512 << 20)).unwrap();
        for (field, value) in [
            ("serial", serde_json::json!({"file": "/tmp/x.log"})),
            (
                "boot",
                serde_json::json!({"kernel": "/k", "initramfs": null, "cmdline": ""}),
            ),
            ("memory_kind", serde_json::json!("file")),
        ] {
            let mut v = base.clone();
            v[field] = value;
            let e = MigrationConfig::parse_and_check(&serde_json::to_vec(&v).unwrap(), &open())
                .unwrap_err();
            assert!(
                e.contains("unknown field") && e.contains(field),
                "{field}: {e}"
            );
        }
        let mut v = base.clone();
        v["devices"] = serde_json::json!([
            {"kind": "vfio", "id": "v0", "arg": "path=/sys/bus/pci/devices/0000:00:01.0"}
        ]);
        let e = MigrationConfig::parse_and_check(&serde_json::to_vec(&v).unwrap(), &open())
            .unwrap_err();
        assert!(e.contains("unknown field") && e.contains("arg"), "{e}");
    }

    #[test]
    fn devices_are_matched_by_id_and_kind() {
        let mut c = cfg(512 << 20);
        c.devices = vec![sim("b", "4M").guest(), sim("a", "8M").guest()];
        // Declared in another order: the destination follows the guest's.
        let p = DestPolicy {
            devices: vec![sim("a", "8M"), sim("b", "4M")],
            ..open()
        };
        let acc = check(&c, &p).unwrap();
        let ids: Vec<&str> = acc.devices.iter().map(|d| d.id()).collect();
        assert_eq!(ids, ["b", "a"]);

        // Undeclared: named, with the flag that would declare it.
        let e = check(&c, &open()).unwrap_err();
        assert!(e.contains("'b'") && e.contains("did not declare"), "{e}");
        assert!(e.contains("--sim-vfio"), "{e}");
        // Declared but absent from the guest.
        let p2 = DestPolicy {
            devices: vec![sim("a", "8M"), sim("b", "4M"), sim("c", "1M")],
            ..open()
        };
        let e = check(&c, &p2).unwrap_err();
        assert!(e.contains("'c'") && e.contains("no such device"), "{e}");
        // Another kind.
        let mut k = c.clone();
        k.devices[0] = GuestDevice {
            id: "b".into(),
            kind: DeviceKind::Vfio,
            state_size: None,
        };
        let e = check(&k, &p).unwrap_err();
        assert!(e.contains("'b'") && e.contains("--vfio"), "{e}");
        // Another state size.
        let p3 = DestPolicy {
            devices: vec![sim("a", "8M"), sim("b", "2M")],
            ..open()
        };
        let e = check(&c, &p3).unwrap_err();
        assert!(e.contains("'b'") && e.contains("4194304 bytes"), "{e}");
        // Twice, or an id no command line could declare.
        let mut d = c.clone();
        d.devices[1].id = "b".into();
        assert!(check(&d, &p).unwrap_err().contains("twice"));
        let mut d = c.clone();
        d.devices[0].id = "../../etc/passwd".into();
        assert!(check(&d, &p).unwrap_err().contains("invalid device id"));
    }

    #[test]
    fn msrs_this_host_cannot_restore_refuse() {
        let c = cfg(512 << 20);
        // 0x8b is on the ignore list.
        assert!(c.check_msrs(&[0x10]).is_ok());
        let e = c.check_msrs(&[0x8b]).unwrap_err();
        assert!(e.contains("0x10"), "{e}");
    }

    #[test]
    fn cpuid_features_the_host_lacks_refuse() {
        let leaf7 = |ebx: u32| kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            flags: kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ebx,
            ..Default::default()
        };
        let host = vec![leaf7(0x9)];
        let mut c = cfg(512 << 20);
        c.cpuid = vec![CpuidEntry::from(&leaf7(0x1))];
        assert!(c.check_cpuid(&host).is_ok());
        c.cpuid = vec![CpuidEntry::from(&leaf7(0x1 | 1 << 5))];
        let e = c.check_cpuid(&host).unwrap_err();
        assert!(e.contains("lacks") && e.contains("avx2"), "{e}");
    }
}
