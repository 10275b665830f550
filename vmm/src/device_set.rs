//! Devices with migratable (VFIO-v2-shaped) state: `--sim-vfio` and
//! `--vfio`, in command-line order (sim-vfio first, then vfio).

use std::sync::Arc;

use devices::sim_vfio::{parse_sim_vfio_arg, SimVfioDevice};
use devices::vfio::{parse_vfio_arg, KernelVfioDevice};
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

/// How a device was configured (carried in the migration config so that the
/// destination builds the same devices).
///
/// Invariant: `arg` parsed successfully on the side that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
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

impl DeviceSpec {
    /// The device id.
    pub fn id(&self) -> &str {
        match self {
            DeviceSpec::SimVfio { id, .. } | DeviceSpec::Vfio { id, .. } => id,
        }
    }
}

enum Handle {
    Sim(Arc<SimVfioDevice>),
    Vfio(Arc<KernelVfioDevice>),
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
                    Handle::Vfio(Arc::new(
                        KernelVfioDevice::open(&cfg).map_err(DeviceError::Create)?,
                    ))
                }
            };
            entries.push((spec.clone(), handle));
        }
        Ok(DeviceSet { entries })
    }

    /// The specs, in order.
    pub fn specs(&self) -> Vec<DeviceSpec> {
        self.entries.iter().map(|(s, _)| s.clone()).collect()
    }

    /// The devices as the migration crate sees them, in order.
    pub fn migratable(&self) -> Vec<Arc<dyn MigratableDevice>> {
        self.entries
            .iter()
            .map(|(_, h)| -> Arc<dyn MigratableDevice> {
                match h {
                    Handle::Sim(d) => d.clone(),
                    Handle::Vfio(d) => d.clone(),
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
                    Handle::Vfio(d) => (
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

    /// Number of devices.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no device.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
