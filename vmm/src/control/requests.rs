//! Typed API requests and their execution on the VMM ([`Vmm::execute`]).
//!
//! The HTTP layer (`crate::api`) turns a request into a [`Request`] and an
//! [`Outcome`] back into a reply; everything between happens here, on the
//! control loop's thread.

use std::sync::Arc;

use log::{info, warn};
use migration::api::ListenAddr;
use migration::live::{MigrationParameters, ParametersUpdate};
use migration::{ReceiveParams, SendParams};
use serde::Serialize;
use serde_json::{json, Value};

use crate::caps::HostCaps;
use crate::config::{MemoryBacking, SerialConfig};
use crate::controller::Lifecycle;
use crate::jobs::migration::{start_receive, start_send, Direction, StartError};
use crate::vm::Vm;
use crate::Vmm;

/// A request to the VMM.
///
/// Invariant: migration parameters have been validated.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// `vmm.ping`
    Ping,
    /// `vmm.shutdown`: end the process.
    VmmShutdown,
    /// `vm.info`
    VmInfo,
    /// `vm.pause`
    Pause,
    /// `vm.resume`
    Resume,
    /// `vm.shutdown`
    VmShutdown,
    /// `vm.send-migration`
    SendMigration(SendParams),
    /// `vm.receive-migration`, listening on `addr`.
    ReceiveMigration {
        /// Parameters.
        params: ReceiveParams,
        /// The address of `params.receiver_url`.
        addr: ListenAddr,
    },
    /// `vm.migration`
    MigrationStatus,
    /// `vm.migration-cancel`
    MigrationCancel,
    /// `vm.migration-set-parameters`: change the live parameters.
    SetParameters(ParametersUpdate),
    /// `vm.migration-parameters`: the parameters in force.
    GetParameters,
    /// Panics while executed (unit tests of the control loop's guard).
    #[cfg(test)]
    TestPanic,
}

/// A successful answer.
///
/// Invariant: answers the request of the same name.
#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    /// Ping: this VMM's version and process id.
    Pong {
        /// Crate version.
        version: &'static str,
        /// Process id.
        pid: u32,
    },
    /// The process ends after this answer.
    ShuttingDown,
    /// Description of the VM.
    VmInfo(Box<VmInfo>),
    /// The VM is paused.
    Paused,
    /// The VM runs.
    Resumed,
    /// The VM was shut down.
    ShutDown,
    /// A send started.
    SendStarted,
    /// A receive listens on `listening`.
    Receiving {
        /// Bound address (TCP) or socket path (`unix:`).
        listening: ListenAddr,
    },
    /// Status of the current or last migration.
    MigrationStatus(Value),
    /// Cancel requested.
    Cancelling,
    /// The parameters in force (after a change: the new ones); `running`
    /// says whether a migration runs on them now.
    Parameters {
        /// The values.
        params: MigrationParameters,
        /// Whether a send runs on them now.
        running: bool,
    },
}

/// Why a request failed.
///
/// Invariant: `BadRequest` is the user's fault, `Conflict` the VMM's state,
/// `Internal` the host's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The request is invalid.
    BadRequest(String),
    /// The request does not fit the VMM's state.
    Conflict(String),
    /// `vm.info` without a VM; `state` says why (`receiving`, `not_created`).
    NoVm {
        /// The `state` of the reply.
        state: &'static str,
    },
    /// The host failed.
    Internal(String),
}

/// The result of a request and what the control loop does after its
/// reply was delivered.
///
/// Invariant: `exit_after_reply` is set only by the control loop's rules
/// (shutdown requests, the read of a completed send's status).
#[derive(Debug)]
pub struct Outcome {
    /// The answer.
    pub result: Result<Response, RequestError>,
    /// End the process with this code once the reply was delivered.
    pub exit_after_reply: Option<i32>,
}

impl Outcome {
    fn of(result: Result<Response, RequestError>) -> Outcome {
        Outcome {
            result,
            exit_after_reply: None,
        }
    }
}

/// `vm.info` of a VM.
///
/// Invariant: describes one VM at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmInfo {
    /// `running`, `paused`, `migrating` or `migrated`.
    pub state: &'static str,
    /// Configuration.
    pub config: VmConfigInfo,
    /// vCPU threads.
    pub vcpus: Vec<VcpuInfo>,
    /// RAM regions.
    pub memory_regions: Vec<RegionInfo>,
    /// Devices.
    pub devices: Vec<Value>,
    /// Optional vCPU state in use.
    pub optional_state: HostCaps,
}

/// The configuration part of [`VmInfo`].
///
/// Invariant: descriptive only.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VmConfigInfo {
    /// Kernel path.
    pub kernel: Option<String>,
    /// Initramfs path.
    pub initramfs: Option<String>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// vCPU count.
    pub cpus: usize,
    /// Memory.
    pub memory: MemoryInfo,
    /// Serial console setting.
    pub serial: String,
    /// Whether the VM arrived by migration.
    pub migrated_in: bool,
}

/// The memory part of [`VmConfigInfo`].
///
/// Invariant: `size_mib == size >> 20`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryInfo {
    /// Bytes.
    pub size: u64,
    /// MiB.
    pub size_mib: u64,
    /// Backing kind.
    pub kind: &'static str,
    /// Backing file, if any.
    pub file: Option<String>,
    /// Whether the RAM was faulted in at start.
    pub prefault: bool,
}

/// One vCPU of [`VmInfo`].
///
/// Invariant: `id` is the vCPU index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VcpuInfo {
    /// Index.
    pub id: usize,
    /// Whether its thread runs the guest (paused or not).
    pub thread_running: bool,
}

/// One RAM region of [`VmInfo`].
///
/// Invariant: `slot` is the KVM memslot of the region.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionInfo {
    /// KVM slot.
    pub slot: usize,
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
}

fn serial_str(s: &SerialConfig) -> String {
    match s {
        SerialConfig::Tty => "tty".into(),
        SerialConfig::Off => "off".into(),
        SerialConfig::File(p) => format!("file={}", p.display()),
    }
}

impl VmInfo {
    /// Describes `vm` in `state`; `prefault` as the VMM applied it.
    pub fn of(vm: &Vm, state: &'static str, prefault: bool) -> VmInfo {
        let desc = vm.description();
        let ram = vm.ram();
        let boot = desc.boot.as_ref();
        VmInfo {
            state,
            config: VmConfigInfo {
                kernel: boot.map(|b| b.kernel.display().to_string()),
                initramfs: boot
                    .and_then(|b| b.initramfs.as_ref())
                    .map(|p| p.display().to_string()),
                cmdline: boot.map(|b| b.cmdline.clone()),
                cpus: vm.vcpu_count(),
                memory: MemoryInfo {
                    size: ram.size(),
                    size_mib: ram.size() >> 20,
                    kind: ram.backing().kind(),
                    file: match ram.backing() {
                        MemoryBacking::File(p) => Some(p.display().to_string()),
                        _ => None,
                    },
                    prefault,
                },
                serial: serial_str(&desc.serial),
                migrated_in: desc.migrated_in,
            },
            vcpus: vm
                .vcpu_alive()
                .into_iter()
                .enumerate()
                .map(|(id, thread_running)| VcpuInfo { id, thread_running })
                .collect(),
            memory_regions: ram
                .regions()
                .iter()
                .enumerate()
                .map(|(slot, r)| RegionInfo {
                    slot,
                    gpa: r.gpa,
                    size: r.size,
                })
                .collect(),
            devices: vm.devices().info(),
            optional_state: vm.caps().clone(),
        }
    }
}

fn conflict(msg: impl Into<String>) -> RequestError {
    RequestError::Conflict(msg.into())
}

impl Vmm {
    /// Executes one request (on the control loop's thread). The job's end
    /// is applied first, so that every answer sees the current life cycle.
    pub fn execute(self: &Arc<Self>, req: Request) -> Outcome {
        self.reap_job();
        match req {
            Request::Ping => Outcome::of(Ok(Response::Pong {
                version: env!("CARGO_PKG_VERSION"),
                pid: std::process::id(),
            })),
            Request::VmmShutdown => {
                info!("API: vmm.shutdown");
                Outcome {
                    result: Ok(Response::ShuttingDown),
                    exit_after_reply: Some(0),
                }
            }
            Request::VmInfo => Outcome::of(self.vm_info()),
            Request::Pause => Outcome::of(self.pause_resume(true)),
            Request::Resume => Outcome::of(self.pause_resume(false)),
            Request::VmShutdown => match self.shutdown_vm() {
                // A VMM that booted its own VM has nothing left to do.
                Ok(()) => Outcome {
                    result: Ok(Response::ShutDown),
                    exit_after_reply: self.booted().then_some(0),
                },
                Err(e) => Outcome::of(Err(conflict(e))),
            },
            Request::SendMigration(params) => Outcome::of(self.send_migration(params)),
            Request::ReceiveMigration { params, addr } => {
                Outcome::of(self.receive_migration(params, addr))
            }
            Request::MigrationStatus => self.migration_status(),
            Request::SetParameters(u) => Outcome::of(self.set_parameters(&u)),
            Request::GetParameters => Outcome::of(Ok(Response::Parameters {
                params: self.hooks().live.get(),
                running: self.sending(),
            })),
            #[cfg(test)]
            Request::TestPanic => panic!("test: a request panicked on the control loop"),
            Request::MigrationCancel => {
                let g = self.lock();
                Outcome::of(match &g.job {
                    Some(j) if j.running() => {
                        j.cancel.cancel();
                        info!("API: migration cancel requested");
                        Ok(Response::Cancelling)
                    }
                    _ => Err(conflict("no migration is running")),
                })
            }
        }
    }

    /// The VM's state as `vm-state-changed` events name it: `vm.info`'s
    /// state, or `not_created`/`receiving` without a VM, or
    /// `commit-uncertain`.
    pub(crate) fn state_name(&self) -> &'static str {
        let g = self.lock();
        match &g.state {
            Lifecycle::Empty => "not_created",
            Lifecycle::Receiving => "receiving",
            Lifecycle::CommitUncertain(_) => "commit-uncertain",
            Lifecycle::PostcopyPaused(_) => "postcopy-paused",
            other => match other.vm() {
                Some(vm) => other.vm_state(vm.user_paused()),
                None => "not_created",
            },
        }
    }

    fn vm_info(&self) -> Result<Response, RequestError> {
        let g = self.lock();
        let Some(vm) = g.state.vm().cloned() else {
            return Err(RequestError::NoVm {
                state: if matches!(g.state, Lifecycle::Receiving) {
                    "receiving"
                } else {
                    "not_created"
                },
            });
        };
        let state = g.state.vm_state(vm.user_paused());
        drop(g);
        let prefault =
            self.config().memory.prefault && (self.booted() || self.has_provisioned_ram());
        Ok(Response::VmInfo(Box::new(VmInfo::of(&vm, state, prefault))))
    }

    fn pause_resume(&self, pause: bool) -> Result<Response, RequestError> {
        let g = self.lock();
        let (vm, uncertain) = match &g.state {
            Lifecycle::Empty | Lifecycle::Receiving => {
                return Err(conflict("no VM has been created"))
            }
            Lifecycle::MigratedOut { .. } => return Err(conflict(
                "the VM was migrated to its destination and runs there: its vCPUs stay paused here for good (read vm.migration for the final record, then end this VMM with vmm.shutdown)",
            )),
            Lifecycle::Sending(_) => return Err(conflict("a migration is running")),
            Lifecycle::PostcopyPaused(_) => return Err(conflict(
                "the guest runs on the destination, which waits for its missing pages (post-copy paused): finish the migration with vm.send-migration and \"resume\": true",
            )),
            Lifecycle::Active(vm) => (vm.clone(), false),
            Lifecycle::CommitUncertain(vm) => (vm.clone(), !pause),
        };
        drop(g);
        if uncertain {
            // The failed send left the devices in STOP: bring them back first.
            for dev in vm.devices().migratable() {
                if let Err(e) = dev.set_state(migration::MigState::Running) {
                    return Err(RequestError::Internal(format!(
                        "device {}: returning to RUNNING: {e}",
                        dev.id()
                    )));
                }
            }
        }
        let r = if pause {
            vm.user_pause()
        } else {
            vm.user_resume()
        };
        if uncertain && r.is_ok() {
            let mut g = self.lock();
            if matches!(&g.state, Lifecycle::CommitUncertain(v) if v.id == vm.id) {
                g.state = Lifecycle::Active(vm.clone());
            }
            warn!("VM resumed by the user after an uncertain migration commit: the user confirmed the destination did not start the guest");
        }
        match r {
            Ok(()) => Ok(if pause {
                Response::Paused
            } else {
                Response::Resumed
            }),
            Err(e) => Err(conflict(e.to_string())),
        }
    }

    fn send_migration(self: &Arc<Self>, params: SendParams) -> Result<Response, RequestError> {
        let mut g = self.lock();
        let vm = match &g.state {
            Lifecycle::Empty | Lifecycle::Receiving => return Err(conflict("no VM to send")),
            Lifecycle::MigratedOut { .. } => {
                return Err(conflict("the VM has already been migrated"))
            }
            _ if g.job.as_ref().is_some_and(|j| j.busy()) => {
                return Err(conflict("a migration is already running"))
            }
            Lifecycle::CommitUncertain(_) => return Err(conflict(
                "the last migration's outcome is uncertain (the guest may run on its destination): resume or shut down this VM first",
            )),
            Lifecycle::PostcopyPaused(vm) if params.resume => vm.clone(),
            Lifecycle::PostcopyPaused(_) => return Err(conflict(
                "a post-copy of this VM is paused: send again with \"resume\": true to finish it",
            )),
            Lifecycle::Active(_) | Lifecycle::Sending(_) if params.resume => {
                return Err(conflict("\"resume\": true, but no post-copy of this VM is paused"))
            }
            Lifecycle::Active(vm) | Lifecycle::Sending(vm) => vm.clone(),
        };
        let job = start_send(self, vm.clone(), params).map_err(start_error)?;
        g.job = Some(job);
        g.state = Lifecycle::Sending(vm);
        Ok(Response::SendStarted)
    }

    fn receive_migration(
        self: &Arc<Self>,
        params: ReceiveParams,
        addr: ListenAddr,
    ) -> Result<Response, RequestError> {
        let mut g = self.lock();
        if g.state.vm().is_some() {
            return Err(conflict("this VMM already has a VM"));
        }
        if g.job.as_ref().is_some_and(|j| j.busy()) {
            return Err(conflict("a migration is already running"));
        }
        let job = start_receive(self, addr.clone(), params).map_err(start_error)?;
        g.job = Some(job);
        g.state = Lifecycle::Receiving;
        Ok(Response::Receiving { listening: addr })
    }

    /// Whether a send runs now.
    fn sending(&self) -> bool {
        matches!(self.lock().state, Lifecycle::Sending(_))
    }

    /// Applies `u` to the live parameters (a running send picks them up at
    /// its next decision; the bandwidth cap at once) and reports the change
    /// as a `parameters-changed` event.
    fn set_parameters(&self, u: &ParametersUpdate) -> Result<Response, RequestError> {
        if u.is_empty() {
            return Err(RequestError::BadRequest(
                "no parameter given: name at least one of the fields of vm.migration-parameters"
                    .into(),
            ));
        }
        let params = self
            .hooks()
            .live
            .update(u)
            .map_err(|e| RequestError::BadRequest(e.to_string()))?;
        let running = self.sending();
        info!(
            "migration parameters changed{}: {}",
            if running { " while sending" } else { "" },
            serde_json::to_string(u).unwrap_or_default()
        );
        self.hooks().events.emit(
            "parameters-changed",
            json!({ "changed": u, "parameters": params, "running": running }),
        );
        Ok(Response::Parameters { params, running })
    }

    fn migration_status(&self) -> Outcome {
        let g = self.lock();
        let Some(job) = &g.job else {
            return Outcome::of(Ok(Response::MigrationStatus(
                // Fresh counters: state "none", constants (page size) filled.
                serde_json::to_value(migration::MigrationStats::default().snapshot())
                    .unwrap_or(json!({"state": "none"})),
            )));
        };
        let status = Response::MigrationStatus(job.status());
        // With --exit-after-migration, a source whose send completed has
        // nothing left to do once someone learnt of it: it exits after this
        // reply. Without, it keeps serving the final record.
        let completed_send = self.config().exit_after_migration
            && job.direction == Direction::Send
            && matches!(g.state, Lifecycle::MigratedOut { .. });
        Outcome {
            result: Ok(status),
            exit_after_reply: completed_send.then_some(0),
        }
    }
}

fn start_error(e: StartError) -> RequestError {
    match e {
        StartError::Bind { .. } => RequestError::BadRequest(e.to_string()),
        StartError::Spawn(_) => RequestError::Internal(e.to_string()),
    }
}
