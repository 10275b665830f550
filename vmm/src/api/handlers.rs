//! Endpoint implementations over the [`Vmm`].

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{info, warn};
use migration::{CancelToken, MigrationStats, MigrationStatus, ReceiveParams, SendParams};
use serde_json::{json, Value};

use super::routes::{After, Reply, Route};
use crate::config::{MemoryBacking, SerialConfig};
use crate::controller::{Direction, Inner, Job};
use crate::migration_glue::{DestFactory, SourceAdapter};
use crate::vm::Vm;
use crate::Vmm;

/// How long a source waits, after a completed send, for someone to read
/// `vm.migration` before it exits anyway.
pub const EXIT_GRACE: Duration = Duration::from_millis(1500);

/// Runs one endpoint.
pub fn handle(vmm: &Arc<Vmm>, route: Route, body: &[u8]) -> Reply {
    match route {
        Route::Ping => Reply::ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "pid": std::process::id(),
        })),
        Route::VmmShutdown => {
            info!("API: vmm.shutdown");
            Reply::ok(json!({"state": "shutting_down"})).then(After::Exit(0))
        }
        Route::VmInfo => vm_info(vmm),
        Route::VmPause => pause_resume(vmm, true),
        Route::VmResume => pause_resume(vmm, false),
        Route::VmShutdown => match vmm.shutdown_vm() {
            Ok(()) => {
                let r = Reply::ok(json!({"state": "shut_down"}));
                if vmm.booted() {
                    r.then(After::Exit(0))
                } else {
                    r
                }
            }
            Err(e) => Reply::error(409, e),
        },
        Route::SendMigration => send_migration(vmm, body),
        Route::ReceiveMigration => receive_migration(vmm, body),
        Route::MigrationStatus => migration_status(vmm),
        Route::MigrationCancel => {
            let g = vmm.lock();
            match &g.job {
                Some(j) if j.running() => {
                    j.cancel.cancel();
                    info!("API: migration cancel requested");
                    Reply::ok(json!({"state": "cancelling"}))
                }
                _ => Reply::error(409, "no migration is running"),
            }
        }
    }
}

fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Reply> {
    if body.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(Reply::error(400, "this request needs a JSON body"));
    }
    serde_json::from_slice(body).map_err(|e| Reply::error(400, format!("invalid JSON body: {e}")))
}

fn send_running(g: &Inner) -> bool {
    g.job
        .as_ref()
        .is_some_and(|j| j.direction == Direction::Send && j.running())
}

/// The `state` string of `vm.info`.
pub fn vm_state(g: &Inner, vm: &Vm) -> &'static str {
    if g.migrated_out {
        "migrated"
    } else if send_running(g) {
        "migrating"
    } else if vm.user_paused() {
        "paused"
    } else {
        "running"
    }
}

fn serial_str(s: &SerialConfig) -> String {
    match s {
        SerialConfig::Tty => "tty".into(),
        SerialConfig::Off => "off".into(),
        SerialConfig::File(p) => format!("file={}", p.display()),
    }
}

fn vm_info(vmm: &Arc<Vmm>) -> Reply {
    let g = vmm.lock();
    let Some(vm) = g.vm.clone() else {
        let receiving = g
            .job
            .as_ref()
            .is_some_and(|j| j.direction == Direction::Receive && j.running());
        let mut r = Reply::error(409, "no VM has been created");
        if let Some(Value::Object(m)) = r.body.as_mut() {
            m.insert(
                "state".into(),
                json!(if receiving {
                    "receiving"
                } else {
                    "not_created"
                }),
            );
        }
        return r;
    };
    let state = vm_state(&g, &vm);
    drop(g);
    let desc = vm.description();
    let ram = vm.ram();
    let file = match ram.backing() {
        MemoryBacking::File(p) => Some(p.display().to_string()),
        _ => None,
    };
    let alive = vm.vcpu_alive();
    Reply::ok(json!({
        "state": state,
        "config": {
            "kernel": desc.boot.as_ref().map(|b| b.kernel.display().to_string()),
            "initramfs": desc.boot.as_ref().and_then(|b| b.initramfs.as_ref()).map(|p| p.display().to_string()),
            "cmdline": desc.boot.as_ref().map(|b| b.cmdline.clone()),
            "cpus": vm.vcpu_count(),
            "memory": {
                "size": ram.size(),
                "size_mib": ram.size() >> 20,
                "kind": ram.backing().kind(),
                "file": file,
                "prefault": vmm.config().memory.prefault && (vmm.booted() || vmm.has_provisioned_ram()),
            },
            "serial": serial_str(&desc.serial),
            "migrated_in": desc.migrated_in,
        },
        "vcpus": alive.iter().enumerate().map(|(i, a)| json!({"id": i, "thread_running": a})).collect::<Vec<_>>(),
        "memory_regions": ram.regions().iter().enumerate().map(|(i, r)| json!({
            "slot": i, "gpa": r.gpa, "size": r.size,
        })).collect::<Vec<_>>(),
        "devices": vm.devices().info(),
        "optional_state": vm.caps(),
    }))
}

fn pause_resume(vmm: &Arc<Vmm>, pause: bool) -> Reply {
    let g = vmm.lock();
    let Some(vm) = g.vm.clone() else {
        return Reply::error(409, "no VM has been created");
    };
    if g.migrated_out {
        return Reply::error(409, "the VM has been migrated away");
    }
    if send_running(&g) {
        return Reply::error(409, "a migration is running");
    }
    let uncertain = !pause && g.commit_uncertain;
    drop(g);
    if uncertain {
        // The failed send left the devices in STOP: bring them back first.
        for dev in vm.devices().migratable() {
            if let Err(e) = dev.set_state(migration::MigState::Running) {
                return Reply::error(
                    500,
                    format!("device {}: returning to RUNNING: {e}", dev.id()),
                );
            }
        }
    }
    let r = if pause {
        vm.user_pause()
    } else {
        vm.user_resume()
    };
    if uncertain && r.is_ok() {
        vmm.lock().commit_uncertain = false;
        warn!("VM resumed by the user after an uncertain migration commit: the user confirmed the destination did not start the guest");
    }
    match r {
        Ok(()) => Reply::ok(json!({"state": if pause { "paused" } else { "running" }})),
        Err(e) => Reply::error(409, e.to_string()),
    }
}

fn new_job(direction: Direction) -> Job {
    Job {
        direction,
        stats: Arc::new(MigrationStats::default()),
        cancel: CancelToken::default(),
        outcome: Arc::new(Mutex::new(None)),
    }
}

fn set_outcome(outcome: &Mutex<Option<Result<(), String>>>, r: Result<(), String>) {
    *outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
}

fn send_migration(vmm: &Arc<Vmm>, body: &[u8]) -> Reply {
    let params: SendParams = match parse_body(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Err(e) = params.validate() {
        return Reply::error(400, e.to_string());
    }
    let mut g = vmm.lock();
    let Some(vm) = g.vm.clone() else {
        return Reply::error(409, "no VM to send");
    };
    if g.migrated_out {
        return Reply::error(409, "the VM has already been migrated");
    }
    if g.job.as_ref().is_some_and(|j| j.running()) {
        return Reply::error(409, "a migration is already running");
    }
    if g.commit_uncertain {
        return Reply::error(
            409,
            "the last migration's outcome is uncertain (the guest may run on its destination): resume or shut down this VM first",
        );
    }
    let job = new_job(Direction::Send);
    let (stats, cancel, outcome) = (job.stats.clone(), job.cancel.clone(), job.outcome.clone());
    g.job = Some(job);
    drop(g);
    info!(
        "API: sending the VM to {} over {} connection(s)",
        params.destination_url, params.connections
    );
    let v = vmm.clone();
    let out = outcome.clone();
    let vm2 = vm.clone();
    let spawned = std::thread::Builder::new()
        .name("migration-send".into())
        .spawn(move || {
            let src = Arc::new(SourceAdapter::new(vm));
            match migration::send(src, &params, &stats, &cancel) {
                Ok(()) => {
                    v.lock().migrated_out = true;
                    set_outcome(&out, Ok(()));
                    info!("migration completed; the VM now runs on the destination");
                    let t0 = std::time::Instant::now();
                    while t0.elapsed() < EXIT_GRACE && !v.lock().completion_reported {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    v.request_exit(0);
                }
                Err(e) if e.is_commit_uncertain() => {
                    // The guest may run on the destination: keep it paused
                    // here; the user decides (vm.resume or vm.shutdown).
                    vm2.mark_user_paused();
                    v.lock().commit_uncertain = true;
                    log::error!("{e}");
                    set_outcome(&out, Err(e.to_string()));
                }
                Err(e) => {
                    warn!("migration failed: {e}; the VM keeps running here");
                    set_outcome(&out, Err(e.to_string()));
                }
            }
        });
    match spawned {
        Ok(_) => Reply::ok(json!({"state": "active"})),
        Err(e) => {
            set_outcome(&outcome, Err(format!("spawning the migration thread: {e}")));
            Reply::error(500, format!("spawning the migration thread: {e}"))
        }
    }
}

fn receive_migration(vmm: &Arc<Vmm>, body: &[u8]) -> Reply {
    let params: ReceiveParams = match parse_body(body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Err(e) = params.validate() {
        return Reply::error(400, e.to_string());
    }
    let addr = match params.listen_addr() {
        Ok(a) => a,
        Err(e) => return Reply::error(400, e.to_string()),
    };
    let mut g = vmm.lock();
    if g.vm.is_some() {
        return Reply::error(409, "this VMM already has a VM");
    }
    if g.job.as_ref().is_some_and(|j| j.running()) {
        return Reply::error(409, "a migration is already running");
    }
    let listener = match TcpListener::bind(addr) {
        Ok(l) => l,
        Err(e) => {
            return Reply::error(
                400,
                format!("cannot listen on {}: {e}", params.receiver_url),
            )
        }
    };
    let job = new_job(Direction::Receive);
    let (stats, cancel, outcome) = (job.stats.clone(), job.cancel.clone(), job.outcome.clone());
    g.job = Some(job);
    drop(g);
    info!("API: waiting for a migration on {addr}");
    let v = vmm.clone();
    let out = outcome.clone();
    let spawned = std::thread::Builder::new()
        .name("migration-recv".into())
        .spawn(move || {
            let factory = DestFactory::new(v);
            match migration::receive(listener, &factory, &params, &stats, &cancel) {
                Ok(_) => {
                    set_outcome(&out, Ok(()));
                    info!("migration received; the VM runs here now");
                }
                Err(e) => {
                    warn!("receiving a migration failed: {e}");
                    set_outcome(&out, Err(e.to_string()));
                }
            }
        });
    match spawned {
        Ok(_) => Reply::ok(json!({"state": "receiving", "listening": addr.to_string()})),
        Err(e) => {
            set_outcome(&outcome, Err(format!("spawning the migration thread: {e}")));
            Reply::error(500, format!("spawning the migration thread: {e}"))
        }
    }
}

/// Status JSON of a job, with the worker's final result overlaid (the
/// result wins over counters that were not updated).
pub fn job_status(job: &Job) -> Value {
    let mut v = serde_json::to_value(job.stats.snapshot()).unwrap_or_else(|_| json!({}));
    let outcome = job
        .outcome
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if let Value::Object(m) = &mut v {
        let state = m
            .get("state")
            .and_then(Value::as_str)
            .unwrap_or("none")
            .to_string();
        match outcome {
            None if state == "none" => {
                m.insert("state".into(), json!("active"));
            }
            None => {}
            Some(Ok(())) => {
                m.insert("state".into(), json!("completed"));
            }
            Some(Err(e)) => {
                if state != "failed" && state != "cancelled" {
                    let s = if job.cancel.is_cancelled() {
                        "cancelled"
                    } else {
                        "failed"
                    };
                    m.insert("state".into(), json!(s));
                }
                if m.get("error").is_none_or(Value::is_null) {
                    m.insert("error".into(), json!(e));
                }
            }
        }
        m.insert(
            "direction".into(),
            json!(match job.direction {
                Direction::Send => "send",
                Direction::Receive => "receive",
            }),
        );
    }
    v
}

fn migration_status(vmm: &Arc<Vmm>) -> Reply {
    let mut g = vmm.lock();
    let Some(job) = &g.job else {
        return Reply::ok(
            serde_json::to_value(MigrationStatus::default()).unwrap_or(json!({"state": "none"})),
        );
    };
    let v = job_status(job);
    let completed_send = job.direction == Direction::Send && g.migrated_out;
    if completed_send {
        g.completion_reported = true;
        return Reply::ok(v).then(After::Exit(0));
    }
    Reply::ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, VmmConfig};
    use clap::Parser;

    fn vmm() -> Arc<Vmm> {
        let cli = Cli::parse_from(["ferry", "--api-socket", "/nonexistent/x.sock"]);
        let cfg = VmmConfig::parse(&cli).unwrap();
        Vmm::new(cfg).unwrap().0
    }

    fn status(r: &Reply) -> u16 {
        r.status
    }

    #[test]
    fn no_vm_requests_conflict() {
        let v = vmm();
        let r = handle(&v, Route::VmInfo, b"");
        assert_eq!(status(&r), 409);
        assert_eq!(r.body.as_ref().unwrap()["state"], "not_created");
        for route in [
            Route::VmPause,
            Route::VmResume,
            Route::VmShutdown,
            Route::MigrationCancel,
        ] {
            let r = handle(&v, route, b"");
            assert_eq!(status(&r), 409, "{route:?}");
            assert!(r.body.unwrap()["error"].is_string());
        }
        let r = handle(
            &v,
            Route::SendMigration,
            br#"{"destination_url":"tcp:127.0.0.1:1"}"#,
        );
        assert_eq!(status(&r), 409);
    }

    #[test]
    fn ping_and_status() {
        let v = vmm();
        let r = handle(&v, Route::Ping, b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.unwrap()["pid"], std::process::id());
        let r = handle(&v, Route::MigrationStatus, b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.unwrap()["state"], "none");
        let r = handle(&v, Route::VmmShutdown, b"");
        assert_eq!(r.after, After::Exit(0));
    }

    #[test]
    fn bad_bodies_are_400() {
        let v = vmm();
        for body in [
            &b""[..],
            b"{not json",
            b"[1,2]",
            br#"{"receiver_url": 5}"#,
            br#"{"receiver_url":"udp:x:1"}"#,
            br#"{"receiver_url":"tcp:127.0.0.1:1","bogus":1}"#,
        ] {
            let r = handle(&v, Route::ReceiveMigration, body);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        }
        for body in [
            &b""[..],
            b"{}",
            br#"{"destination_url":"tcp:127.0.0.1:1","connections":0}"#,
        ] {
            let r = handle(&v, Route::SendMigration, body);
            assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn receive_binds_and_reports_bind_errors() {
        let v = vmm();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let body = format!(r#"{{"receiver_url":"tcp:127.0.0.1:{port}"}}"#);
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 400, "{:?}", r.body);
        drop(taken);
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 200, "{:?}", r.body);
        // A second receive while the first waits is a conflict.
        let r = handle(&v, Route::ReceiveMigration, body.as_bytes());
        assert_eq!(r.status, 409);
        let r = handle(&v, Route::MigrationCancel, b"");
        assert_eq!(r.status, 200);
        // The worker ends as cancelled.
        let t0 = std::time::Instant::now();
        loop {
            let s = handle(&v, Route::MigrationStatus, b"").body.unwrap();
            if s["state"] == "cancelled" || s["state"] == "failed" {
                assert!(s["error"].is_string());
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "status {s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
