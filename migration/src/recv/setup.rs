//! Setup of a receive: the main connection, SETUP (compatibility, the VM is
//! built), the data connections and their readers.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::barrier::PassBarrier;
use super::devices::DeviceInbox;
use super::reader::{spawn_readers, DestRam, ReaderCtx};
use super::{or_fail, BuiltVm, Ctx, Failed, Phase, Prepared, Receiving, Session};
use crate::api::DeviceStateMode;
use crate::error::MigrationError;
use crate::guest_mem::GuestMemory;
use crate::net::{
    self, recv_frame, recv_payload, Channel, Ctl, Keepalive, MainConn, Recv, POLL_INTERVAL,
};
use crate::stats::RxMeter;
use crate::wire::{ConnRole, Frame, Setup};
use crate::worker::Workers;

/// Read timeout of the main connection while receiving (ack latency).
const MAIN_POLL: Duration = Duration::from_millis(10);

/// Waits one poll interval for a main connection; refuses data connections
/// that arrive first. `None`: nothing yet.
pub fn wait_main(ctx: &Ctx) -> Result<Option<Session>, MigrationError> {
    let Some(inc) = ctx.next_incoming(POLL_INTERVAL) else {
        return Ok(None);
    };
    if inc.role != ConnRole::Main {
        ctx.refuse(inc, "no migration in progress for this data connection");
        return Ok(None);
    }
    let s = inc.stream;
    net::prepare_stream(s.tcp(), false)?;
    let main = MainConn::new(s, inc.session);
    main.send(&Frame::Ok, &[], &ctx.ctl, "accepting the main connection")?;
    let peer = main.stream.tcp().peer_addr().ok();
    ctx.stats.set_peer(peer);
    log::info!(
        "incoming migration started from {}: session {:032x}, {} data connections",
        peer.map(|a| a.to_string()).unwrap_or_else(|| "?".into()),
        inc.session,
        inc.connections
    );
    Ok(Some(Session {
        main,
        session: inc.session,
        n: inc.connections as usize,
    }))
}

/// Sends ERROR(`e`) on main and returns `e`.
fn refuse_setup(ctx: &Ctx, main: &MainConn, e: MigrationError) -> MigrationError {
    main.send_message(|len| Frame::Error { len }, &e.to_string());
    ctx.error_sent.set(true);
    e
}

/// Reads SETUP, builds the VM and checks that it matches the source's.
fn read_setup(ctx: &Ctx, s: &Session) -> Result<(Setup, BuiltVm), MigrationError> {
    let main = &s.main;
    let what = "reading the VM configuration";
    let start = Instant::now();
    let env = loop {
        match recv_frame(&main.stream, &ctx.ctl, true, what)? {
            Recv::Frame(env) => break env,
            Recv::Eof => return Err(MigrationError::PeerClosed(what.into())),
            Recv::Idle if start.elapsed() > ctx.ctl.stall => {
                return Err(MigrationError::Timeout(what.into()))
            }
            Recv::Idle => {}
        }
    };
    let len = match env.frame {
        Frame::Setup { len } if env.session == s.session => len,
        f => {
            return Err(refuse_setup(
                ctx,
                main,
                MigrationError::proto(format!("expected SETUP, got {:?}", f.kind())),
            ))
        }
    };
    let payload = recv_payload(&main.stream, len, &ctx.ctl, what)?;
    let setup = Setup::decode(&payload).map_err(|e| refuse_setup(ctx, main, e))?;
    let vm = if setup.handover {
        let regions = crate::handover::receive_regions(main, &setup, &ctx.ctl)
            .map_err(|e| refuse_setup(ctx, main, e))?;
        log::info!(
            "memory handover: mapping {} region(s) of the source",
            regions.len()
        );
        ctx.stats.set_memory_handover();
        ctx.factory.create_mapped(&setup.config, regions)
    } else {
        ctx.factory.create(&setup.config)
    };
    let vm = vm.map_err(|e| {
        refuse_setup(
            ctx,
            main,
            MigrationError::Incompatible(format!("VM configuration refused: {e}")),
        )
    })?;
    let vm = BuiltVm::new(vm);
    let dst: Vec<(u64, u64)> = vm.vm.ram().iter().map(|r| (r.gpa(), r.size())).collect();
    if dst != setup.regions {
        return Err(refuse_setup(
            ctx,
            main,
            MigrationError::Incompatible(format!(
                "RAM layout differs: source {:x?}, destination {:x?}",
                setup.regions, dst
            )),
        ));
    }
    let ids: Vec<String> = vm.vm.devices().iter().map(|d| d.id().to_string()).collect();
    let src_ids: Vec<String> = setup.devices.iter().map(|d| d.id.clone()).collect();
    if ids != src_ids {
        return Err(refuse_setup(
            ctx,
            main,
            MigrationError::Incompatible(format!(
                "devices differ: source {src_ids:?}, destination {ids:?}"
            )),
        ));
    }
    Ok((setup, vm))
}

/// Registers this receive on the host, once its SETUP was accepted (a
/// registry that refuses is logged; the migration then goes uncounted).
fn register(ctx: &Ctx) {
    let Some(h) = &ctx.host else { return };
    match h.register(crate::host::Direction::Incoming) {
        Ok(slot) => *ctx.host_slot.borrow_mut() = Some(slot),
        Err(e) => log::warn!("cannot register this migration on the host ({e})"),
    }
}

/// Negotiate → AcceptData: SETUP read and checked, VM built, data path
/// prepared, OK sent.
pub fn negotiate(ctx: &Ctx, s: Box<Session>) -> Result<Phase, Failed> {
    let (setup, vm) = or_fail!(read_setup(ctx, &s), Phase::Negotiate(s));
    register(ctx);
    let mem = GuestMemory::of_destination(&vm.vm);
    let devices = vm.vm.devices();
    let ids: Vec<String> = devices.iter().map(|d| d.id().to_string()).collect();
    ctx.stats
        .total_bytes
        .store(mem.regions().iter().map(|r| r.size()).sum(), Relaxed);
    ctx.stats.connections.store(s.n as u64, Relaxed);
    let counters = ctx.stats.set_devices(&ids);
    let (tx, ack_rx) = channel();
    let inbox = DeviceInbox::new(
        devices,
        counters.clone(),
        ctx.bound,
        ctx.ctl.clone(),
        tx,
        ctx.notify.clone(),
    );
    let rctx = Arc::new(ReaderCtx {
        ram: Arc::new(DestRam::new(mem)),
        barrier: Arc::new(PassBarrier::new(s.n)),
        inbox: (setup.device_mode == DeviceStateMode::Channels).then(|| inbox.clone()),
        session: s.session,
        ctl: ctx.ctl.clone(),
        stats: ctx.stats.clone(),
        chunk_max: setup.chunk_bytes,
        notify: ctx.notify.clone(),
        sealed: AtomicBool::new(false),
        postcopy: std::sync::OnceLock::new(),
        stale: std::sync::OnceLock::new(),
        zstd: setup.features & crate::wire::SETUP_FEATURE_ZSTD != 0,
    });
    if rctx.zstd {
        ctx.stats.compression.enable(None);
    }
    let p = Box::new(Prepared {
        s: *s,
        inbox,
        ack_rx,
        rctx,
        counters,
        mode: setup.device_mode,
        chunk_max: setup.chunk_bytes,
        vm,
    });
    or_fail!(
        p.s.main
            .send(&Frame::Ok, &[], &ctx.ctl, "accepting the VM configuration"),
        Phase::AcceptData(p)
    );
    Ok(Phase::AcceptData(p))
}

/// Accepts the session's data connections (refusing strangers).
/// Every connection of a session speaks the version of its main one.
fn accept_all(ctx: &Ctx, p: &Prepared) -> Result<Vec<Channel>, MigrationError> {
    let data = accept_data_of(ctx, p.s.session, p.s.n, &ctx.ctl)?;
    let v = p.s.main.stream.version();
    if let Some(d) = data.iter().find(|d| d.version() != v) {
        return Err(MigrationError::proto(format!(
            "a data connection speaks protocol version {}, its main connection {v}",
            d.version()
        )));
    }
    Ok(data)
}

/// Accepts the `n` data connections of `session` (refusing strangers);
/// each is registered with `ctl`.
pub fn accept_data_of(
    ctx: &Ctx,
    session: u128,
    n: usize,
    ctl: &Ctl,
) -> Result<Vec<Channel>, MigrationError> {
    let mut data: Vec<Option<Channel>> = (0..n).map(|_| None).collect();
    let start = Instant::now();
    while data.iter().any(|d| d.is_none()) {
        ctl.check()?;
        if start.elapsed() > ctl.stall {
            return Err(MigrationError::Timeout(
                "waiting for the data connections".into(),
            ));
        }
        let Some(inc) = ctx.next_incoming(POLL_INTERVAL) else {
            continue;
        };
        let idx = match inc.role {
            ConnRole::Data { index } => Some(index as usize),
            ConnRole::Main => None,
        };
        if inc.session != session {
            ctx.refuse(inc, "another migration is in progress (session mismatch)");
        } else if idx.is_none() || inc.connections as usize != n {
            ctx.refuse(inc, "unexpected connection role or count for this session");
        } else if let Some(slot @ None) = idx.and_then(|i| data.get_mut(i)) {
            net::send_frame(
                &inc.stream,
                session,
                &Frame::Ok,
                &[],
                ctl,
                "accepting a data connection",
            )?;
            ctl.register(inc.stream.tcp());
            *slot = Some(inc.stream);
        } else {
            let i = idx.unwrap_or_default();
            ctx.refuse(inc, &format!("duplicate data connection index {i}"));
        }
    }
    Ok(data.into_iter().flatten().collect())
}

/// AcceptData → Receive: every data connection accepted, readers and
/// keepalive running.
pub fn accept_data(ctx: &Ctx, p: Box<Prepared>) -> Result<Phase, Failed> {
    let r = (|| {
        let streams = accept_all(ctx, &p)?;
        let mut readers = Workers::new(&ctx.ctl);
        spawn_readers(&p.rctx, streams, &mut readers)?;
        p.s.main
            .stream
            .tcp()
            .set_read_timeout(Some(MAIN_POLL))
            .map_err(|e| MigrationError::io("configuring the main connection", e))?;
        Ok(readers)
    })();
    let readers = or_fail!(r, Phase::AcceptData(p));
    let keepalive = Keepalive::spawn(p.s.main.clone(), ctx.ctl.clone());
    ctx.stats.mark_setup_done();
    Ok(Phase::Receive(Box::new(Receiving {
        keepalive,
        readers,
        p: *p,
        last_main: Instant::now(),
        rates: (Instant::now(), Vec::new()),
        rx: RxMeter::new(),
        host_load_at: None,
        post: None,
    })))
}
