//! Devices with migratable (VFIO-v2-shaped) state: `--sim-vfio` and
//! `--vfio`, in command-line order (sim-vfio first, then vfio) on a source;
//! on a migration destination, the devices it declared, paired by id with
//! those of the incoming VM ([`match_declared`]).

use std::sync::Arc;

use devices::sim_vfio::{parse_sim_vfio_arg, SimVfioDevice};
use devices::vfio::pci::KernelVfioPci;
use devices::vfio::{parse_vfio_arg, validate_id, KernelVfioDevice};
use migration::MigratableDevice;
use serde::{Deserialize, Serialize};

/// Errors creating devices.
///
/// Invariant: the message names the argument or device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An argument did not parse.
    #[error("invalid {flag} argument: {source}")]
    Parse {
        /// `--sim-vfio` or `--vfio`.
        flag: &'static str,
        /// The parser's error.
        #[source]
        source: devices::Error,
    },
    /// Two devices share an id.
    #[error("duplicate device id '{0}'")]
    DuplicateId(String),
    /// The device could not be created or opened.
    #[error("{0}")]
    Create(#[source] devices::Error),
}

/// How a device was configured on this host's command line.
///
/// Invariant: `arg` parsed successfully; it names host resources (paths,
/// sizes, rates, fault injection) and never leaves this host: a migration
/// carries only [`DeviceSpec::guest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `--sim-vfio ARG`.
    SimVfio {
        /// Device id.
        id: String,
        /// The argument as given.
        arg: String,
        /// Bytes of state.
        state_size: u64,
    },
    /// `--vfio ARG`.
    Vfio {
        /// Device id.
        id: String,
        /// The argument as given.
        arg: String,
    },
}

/// The kind of a migratable device, as the migration stream names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A simulated VFIO device (`--sim-vfio`).
    SimVfio,
    /// A kernel VFIO device (`--vfio`).
    Vfio,
}

impl DeviceKind {
    /// The command-line flag that declares a device of this kind.
    pub fn flag(self) -> &'static str {
        match self {
            DeviceKind::SimVfio => "--sim-vfio",
            DeviceKind::Vfio => "--vfio",
        }
    }
}

/// A device as the migration stream describes it: what the guest sees,
/// nothing about the host that backs it.
///
/// Invariant: `state_size` is `Some` exactly for [`DeviceKind::SimVfio`]
/// (the bytes of state its stream carries), when produced by
/// [`DeviceSpec::guest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestDevice {
    /// Device id, unique in the VM.
    pub id: String,
    /// Its kind.
    pub kind: DeviceKind,
    /// Bytes of device state (sim-vfio), compared with the destination's
    /// own declaration before anything is allocated.
    #[serde(default)]
    pub state_size: Option<u64>,
}

impl DeviceSpec {
    /// The device id.
    pub fn id(&self) -> &str {
        match self {
            DeviceSpec::SimVfio { id, .. } | DeviceSpec::Vfio { id, .. } => id,
        }
    }

    /// The device's kind.
    pub fn kind(&self) -> DeviceKind {
        match self {
            DeviceSpec::SimVfio { .. } => DeviceKind::SimVfio,
            DeviceSpec::Vfio { .. } => DeviceKind::Vfio,
        }
    }

    /// What the migration stream says about this device.
    pub fn guest(&self) -> GuestDevice {
        GuestDevice {
            id: self.id().to_string(),
            kind: self.kind(),
            state_size: match self {
                DeviceSpec::SimVfio { state_size, .. } => Some(*state_size),
                DeviceSpec::Vfio { .. } => None,
            },
        }
    }
}

/// Pairs the devices an incoming VM has (`incoming`, in migration order)
/// with the devices this destination declared on its command line
/// (`declared`): same ids, same kinds, same state sizes, no device missing
/// on either side. Returns the declared specs in `incoming`'s order.
/// Nothing is created or opened here.
pub fn match_declared(
    incoming: &[GuestDevice],
    declared: &[DeviceSpec],
) -> Result<Vec<DeviceSpec>, String> {
    let mut out: Vec<DeviceSpec> = Vec::with_capacity(incoming.len());
    for g in incoming {
        if validate_id(&g.id, &g.id).is_err() {
            let shown: String = g.id.chars().take(64).collect();
            return Err(format!(
                "the incoming VM has an invalid device id {shown:?}"
            ));
        }
        if out.iter().any(|s| s.id() == g.id) {
            return Err(format!("the incoming VM lists device '{}' twice", g.id));
        }
        let Some(spec) = declared.iter().find(|s| s.id() == g.id) else {
            return Err(format!(
                "the incoming VM has device '{}' ({}), which this destination did not declare \
                 (start it with {} id={},...)",
                g.id,
                g.kind.flag(),
                g.kind.flag(),
                g.id
            ));
        };
        if spec.kind() != g.kind {
            return Err(format!(
                "device '{}' is a {} device in the incoming VM but was declared here with {}",
                g.id,
                g.kind.flag(),
                spec.kind().flag()
            ));
        }
        let mine = spec.guest().state_size;
        if g.state_size != mine {
            let show = |s: Option<u64>| s.map_or("none".to_string(), |b| format!("{b} bytes"));
            return Err(format!(
                "device '{}': the incoming device has {} of state, this destination declared {}",
                g.id,
                show(g.state_size),
                show(mine)
            ));
        }
        out.push(spec.clone());
    }
    if let Some(extra) = declared
        .iter()
        .find(|s| !incoming.iter().any(|g| g.id == s.id()))
    {
        return Err(format!(
            "device '{}' was declared on this destination ({}) but the incoming VM has no such device",
            extra.id(),
            extra.kind().flag()
        ));
    }
    Ok(out)
}

enum Handle {
    Sim(Arc<SimVfioDevice>),
    /// The migration side and the PCI side over the same fds.
    Vfio(Arc<KernelVfioDevice>, Arc<KernelVfioPci>),
}

/// The devices of one VM.
///
/// Invariant: ids are unique; `entries` keeps command-line order, the
/// order in which migration pairs source and destination devices.
#[derive(Default)]
pub struct DeviceSet {
    entries: Vec<(DeviceSpec, Handle)>,
}

impl std::fmt::Debug for DeviceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(s, _)| s))
            .finish()
    }
}

/// Parses the arguments without creating anything (exit-2 validation).
pub fn validate_args(sim: &[String], vfio: &[String]) -> Result<Vec<DeviceSpec>, DeviceError> {
    let mut specs = Vec::new();
    for arg in sim {
        let cfg = parse_sim_vfio_arg(arg).map_err(|source| DeviceError::Parse {
            flag: "--sim-vfio",
            source,
        })?;
        specs.push(DeviceSpec::SimVfio {
            id: cfg.id.clone(),
            arg: arg.clone(),
            state_size: cfg.state_size,
        });
    }
    for arg in vfio {
        let cfg = parse_vfio_arg(arg).map_err(|source| DeviceError::Parse {
            flag: "--vfio",
            source,
        })?;
        specs.push(DeviceSpec::Vfio {
            id: cfg.id.clone(),
            arg: arg.clone(),
        });
    }
    let mut ids: Vec<&str> = Vec::new();
    for s in &specs {
        if ids.contains(&s.id()) {
            return Err(DeviceError::DuplicateId(s.id().to_string()));
        }
        ids.push(s.id());
    }
    Ok(specs)
}

/// The `vm.info` entry of a sim-vfio device, without `mig_state`.
fn sim_info(spec: &DeviceSpec, d: &SimVfioDevice) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": spec.id(),
        "kind": "sim-vfio",
        "state_size": d.state_size(),
        "digest": hex_digest(d.digest()),
    });
    // Destination: the source's digest at switch-over, as received (equal to
    // `digest` after a good load).
    if let Some(sd) = d.source_digest() {
        v["source_digest"] = hex_digest(sd).into();
    }
    // Source: the digest it sent at switch-over.
    if let Some(sw) = d.switchover_digest() {
        v["switchover_digest"] = hex_digest(sw).into();
    }
    v
}

/// Formats a state digest for `vm.info`: 16 lowercase hex digits, no prefix.
fn hex_digest(d: u64) -> String {
    format!("{d:016x}")
}

impl DeviceSet {
    /// No devices.
    pub fn empty() -> DeviceSet {
        DeviceSet::default()
    }

    /// Creates the devices of `specs`: source devices (initial state) or
    /// destination devices (waiting for state).
    pub fn create(specs: &[DeviceSpec], source: bool) -> Result<DeviceSet, DeviceError> {
        let mut entries = Vec::with_capacity(specs.len());
        for spec in specs {
            if entries
                .iter()
                .any(|(s, _): &(DeviceSpec, Handle)| s.id() == spec.id())
            {
                return Err(DeviceError::DuplicateId(spec.id().to_string()));
            }
            let handle = match spec {
                DeviceSpec::SimVfio { arg, .. } => {
                    let cfg = parse_sim_vfio_arg(arg).map_err(|source| DeviceError::Parse {
                        flag: "--sim-vfio",
                        source,
                    })?;
                    let dev = if source {
                        SimVfioDevice::new_source(&cfg)
                    } else {
                        SimVfioDevice::new_destination(&cfg)
                    }
                    .map_err(DeviceError::Create)?;
                    Handle::Sim(Arc::new(dev))
                }
                DeviceSpec::Vfio { arg, .. } => {
                    let cfg = parse_vfio_arg(arg).map_err(|source| DeviceError::Parse {
                        flag: "--vfio",
                        source,
                    })?;
                    let dev = Arc::new(KernelVfioDevice::open(&cfg).map_err(DeviceError::Create)?);
                    let pci =
                        KernelVfioPci::from_device(dev.clone()).map_err(DeviceError::Create)?;
                    Handle::Vfio(dev, Arc::new(pci))
                }
            };
            entries.push((spec.clone(), handle));
        }
        Ok(DeviceSet { entries })
    }

    /// The devices as the migration stream describes them, in order.
    pub fn guest_devices(&self) -> Vec<GuestDevice> {
        self.entries.iter().map(|(s, _)| s.guest()).collect()
    }

    /// The devices as the migration crate sees them, in order.
    pub fn migratable(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.entries
            .iter()
            .map(|(_, h)| -> Arc<dyn MigratableDevice> {
                match h {
                    Handle::Sim(d) => d.clone(),
                    Handle::Vfio(d, _) => d.clone(),
                }
            })
            .collect()
    }

    /// `vm.info` entries: id, kind, state size, `mig_state` (the VFIO
    /// migration state in snake case, e.g. `running`; null if the device
    /// cannot tell) and, for sim-vfio, `digest` (current state),
    /// `source_digest` (destination, once a load stream's end marker was
    /// read) and `switchover_digest` (source, once a save session entered
    /// STOP_COPY), all as 16 lowercase hex digits.
    pub fn info(&self) -> Vec<serde_json::Value> {
        self.entries
            .iter()
            .map(|(spec, h)| {
                let (mut v, dev): (_, &dyn MigratableDevice) = match h {
                    Handle::Sim(d) => (sim_info(spec, d), &**d),
                    Handle::Vfio(d, _) => (
                        serde_json::json!({
                            "id": spec.id(),
                            "kind": "vfio",
                            "state_size": d.stop_copy_size().ok(),
                        }),
                        &**d,
                    ),
                };
                v["mig_state"] = dev
                    .state()
                    .ok()
                    .and_then(|s| serde_json::to_value(s).ok())
                    .unwrap_or(serde_json::Value::Null);
                v
            })
            .collect()
    }

    /// The devices as PCI functions, in order (the PCI bus order).
    pub fn pci_functions(&self) -> Vec<Arc<dyn devices::pci::PciDevice>> {
        self.entries
            .iter()
            .map(|(_, h)| -> Arc<dyn devices::pci::PciDevice> {
                match h {
                    Handle::Sim(d) => d.pci(),
                    Handle::Vfio(_, p) => p.clone(),
                }
            })
            .collect()
    }

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
