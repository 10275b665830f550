//! Setup of a send: the main connection, SETUP, the data connections and
//! their writers, the main link, dirty logging and the device streams, then
//! pass 1.

use std::sync::Arc;

use super::devices::{DeviceSavers, MainModeDevices};
use super::dma::DmaLogs;
use super::hostshare::{ShareInputs, ShareTicker};
use super::link::Link;
use super::passes::Passes;
use super::pool::{Pool, RateLimiter};
use super::writer::{spawn_writers, WriterCtx};
use super::{
    or_fail, Ctx, DataPlane, DeviceStreams, Failed, Linked, Phase, RestoreDevices, Streaming,
    CONN_QUEUE_BYTES, DEVICE_INFLIGHT_BYTES, SETUP_TIMEOUT,
};
use crate::api::DeviceStateMode;
use crate::error::MigrationError;
use crate::handshake::{await_reply, connect};
use crate::net::MainConn;
use crate::wire::{self, ConnRole, DeviceDesc, Frame, Setup};
use crate::worker::Workers;

/// Connects the main connection and completes its HELLO.
pub fn connect_main(ctx: &Ctx) -> Result<Arc<MainConn>, MigrationError> {
    let n = ctx.conns;
    let s = connect(&ctx.dial, ctx.session, ConnRole::Main, n, &ctx.ctl)?;
    ctx.stats.set_peer(s.tcp().peer_addr().ok());
    Ok(MainConn::new(s, ctx.session))
}

/// Sends SETUP and waits for the destination to accept it.
fn negotiate(ctx: &Ctx, main: &MainConn) -> Result<(), MigrationError> {
    let config = ctx
        .vm
        .config()
        .map_err(|e| MigrationError::vm("serializing the VM configuration", e))?;
    if config.len() as u64 > wire::MAX_CONFIG_LEN {
        return Err(MigrationError::InvalidParams(format!(
            "VM configuration of {} bytes is too large",
            config.len()
        )));
    }
    let setup = Setup {
        config,
        regions: ctx.mem.layout(),
        devices: ctx
            .devices
            .iter()
            .map(|d| DeviceDesc {
                id: d.id().to_string(),
                caps: d.caps(),
            })
            .collect(),
        chunk_bytes: ctx.p.device_chunk_bytes,
        device_mode: ctx.p.device_state,
        features: if zstd_level(ctx).is_some() {
            wire::SETUP_FEATURE_ZSTD
        } else {
            0
        },
        handover: false,
    };
    let lent = ctx.handover.as_ref().and_then(|h| {
        match crate::handover::offer(h, main.stream.version(), &setup.regions) {
            Ok(r) => Some(r),
            Err(why) => {
                log::info!("unix: migration copies RAM: {why}");
                None
            }
        }
    });
    let setup = Setup {
        handover: lent.is_some(),
        ..setup
    };
    let payload = setup.encode();
    main.send(
        &Frame::Setup {
            len: payload.len() as u64,
        },
        &payload,
        &ctx.ctl,
        "sending the VM configuration",
    )?;
    if let Some(regions) = &lent {
        crate::handover::send_regions(main, regions, &ctx.ctl)?;
    }
    await_reply(
        &main.stream,
        ctx.session,
        &ctx.ctl,
        SETUP_TIMEOUT,
        "waiting for the destination to accept the configuration",
    )
    .map_err(|e| match e {
        // A destination from before compression knows no feature word.
        MigrationError::Remote(m)
            if setup.features != 0 && m.contains("trailing bytes in SETUP") =>
        {
            MigrationError::Incompatible(format!(
                "the destination does not support \"compression\": \"zstd\" (an older ferry; it \
                 answered: {m}); send without compression"
            ))
        }
        e => e,
    })?;
    if let (Some(h), Some(regions)) = (&ctx.handover, &lent) {
        // Before the dirty log starts and pass 1: nothing of RAM moves.
        h.engage();
        ctx.stats.set_memory_handover();
        log::info!(
            "memory handed over ({} region(s), {} MiB): only vCPU and device state move",
            regions.len(),
            regions.iter().map(|r| r.size).sum::<u64>() >> 20
        );
        ctx.events.emit(
            "memory-handover",
            serde_json::json!({ "regions": regions.len() }),
        );
    }
    Ok(())
}

/// The zstd level of this send's writers (`None`: no compression). A
/// resumed post-copy sends as is: its destination agreed to compression
/// (or not) at the first SETUP, which a resume does not repeat.
fn zstd_level(ctx: &Ctx) -> Option<i32> {
    let level = ctx.p.zstd_level().ok().flatten();
    if ctx.p.resume {
        if level.is_some() {
            log::debug!("a resumed post-copy sends its pages uncompressed");
        }
        return None;
    }
    level
}

/// Connects the data connections and starts their writers.
pub(super) fn data_plane(ctx: &Ctx) -> Result<DataPlane, MigrationError> {
    let n = ctx.conns;
    let mut streams = Vec::new();
    for i in 0..n {
        let s = connect(
            &ctx.dial,
            ctx.session,
            ConnRole::Data { index: i },
            n,
            &ctx.ctl,
        )?;
        ctx.ctl.register(s.tcp());
        streams.push(Arc::new(s));
    }
    if ctx.p.zero_copy {
        super::zerocopy::enable(ctx, &streams)?;
    }
    let pool = Pool::new(
        n as usize,
        ctx.devices.len(),
        CONN_QUEUE_BYTES,
        DEVICE_INFLIGHT_BYTES,
        ctx.ctl.clone(),
    );
    let limiter = RateLimiter::new(
        ctx.live
            .get()
            .max_bandwidth_mib_s
            .map(|m| m * 1024.0 * 1024.0),
    );
    // The host's share is in force before the first byte is written.
    let share = ShareTicker::start(
        ShareInputs {
            slot: ctx.host_slot.clone(),
            host_max: ctx.host_max,
            from_dest: ctx.from_dest.clone(),
            limiter: limiter.clone(),
            stats: ctx.stats.clone(),
            events: ctx.events.clone(),
            live: ctx.live.clone(),
        },
        &ctx.ctl,
    )?;
    let wctx = Arc::new(WriterCtx {
        pool: pool.clone(),
        mem: ctx.mem.clone(),
        session: ctx.session,
        stats: ctx.stats.clone(),
        devs: ctx.counters.clone(),
        limiter: limiter.clone(),
        ctl: ctx.ctl.clone(),
        postcopy: std::sync::OnceLock::new(),
        zero_copy: ctx.p.zero_copy,
        zc_synced: WriterCtx::zc_slots(n as usize),
        zstd_level: zstd_level(ctx),
    });
    if let Some(l) = zstd_level(ctx) {
        ctx.stats.compression.enable(Some(l));
    }
    let live = ctx.live.clone();
    // With a DMA device post-copy is refused (see `Ctx::decision_params`):
    // nothing may interrupt a pass for it.
    let dma = ctx.dma.any();
    pool.set_interrupt(Box::new(move || {
        !dma && live.get().technique == crate::live::Technique::PostCopy
    }));
    let clones = streams.clone();
    let mut writers = Workers::new(&ctx.ctl);
    spawn_writers(wctx.clone(), clones, &mut writers)?;
    Ok(DataPlane {
        _share: share,
        pool,
        limiter,
        wctx,
        writers,
        _streams: streams,
    })
}

/// Connected → Linked: SETUP, data connections and writers, main reader
/// and keepalive.
pub fn link(ctx: &Ctx, main: Arc<MainConn>) -> Result<Phase, Failed> {
    // Dirty logging was being switched on since the send began (see
    // `Ctx::start_dirty_log`), while the main connection came up; it goes
    // on while the destination makes its VM and the data connections come
    // up. It only has to be on before pass 1 lists populated memory.
    let r = (|| {
        negotiate(ctx, &main)?;
        let data = data_plane(ctx)?;
        let link = Link::start(main.clone(), &ctx.ctl, &ctx.from_dest, &ctx.counters)?;
        Ok((link, data))
    })();
    let dirty = ctx.dirty_log();
    let r = r.and_then(|(link, data)| {
        Ok(Linked {
            link,
            data,
            dirty: dirty?,
        })
    });
    let linked = or_fail!(r, Phase::Connected(main));
    ctx.stats.mark_setup_done();
    let params = ctx.live.get();
    log::info!(
        "migration started to {} ({}, {}): {} data connections ({}), {:.0} MiB of RAM, {} \
         devices, policy {:?}, downtime {} ms, bandwidth cap {}",
        ctx.p.destination_url,
        main.stream
            .tcp()
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into()),
        if ctx.dial.tls.is_some() { "tls" } else { "tcp" },
        ctx.conns,
        ctx.stats.connections_reason().unwrap_or_default(),
        ctx.stats
            .total_bytes
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / (1024.0 * 1024.0),
        ctx.devices.len(),
        params.policy,
        params.downtime_ms,
        params
            .max_bandwidth_mib_s
            .map(|m| format!("{m} MiB/s"))
            .unwrap_or_else(|| "none".into())
    );
    Ok(Phase::Linked(Box::new(linked)))
}

/// Starts the device streams of the configured mode.
fn start_devices(ctx: &Ctx, l: &Linked) -> Result<DeviceStreams, MigrationError> {
    let chunk = ctx.p.device_chunk_bytes as usize;
    Ok(match ctx.p.device_state {
        DeviceStateMode::Channels => DeviceStreams::Channels(DeviceSavers::spawn(
            &ctx.devices,
            &l.data.pool,
            &ctx.ctl,
            &ctx.counters,
            chunk,
            ctx.p.device_precopy,
        )?),
        DeviceStateMode::Main => DeviceStreams::Main(MainModeDevices::precopy(
            &ctx.devices,
            &ctx.counters,
            &l.link.main,
            &ctx.ctl,
            chunk,
            ctx.p.device_precopy,
        )?),
    })
}

/// Linked → Streaming (dirty logging is on since Linked): device streams
/// started, pass 1 queued.
pub fn start_streaming(ctx: &Ctx, l: Box<Linked>) -> Result<Phase, Failed> {
    let r = (|| {
        let handed_over = ctx.handover.as_ref().is_some_and(|h| h.engaged());
        let dma = Arc::new(if handed_over {
            DmaLogs::none()
        } else {
            DmaLogs::start(&ctx.devices, &ctx.dma, ctx.mem.regions())?
        });
        let restore = RestoreDevices::new(&ctx.devices);
        let devs = start_devices(ctx, &l)?;
        Ok((dma, restore, devs))
    })();
    let (dma, restore, devs) = or_fail!(r, Phase::Linked(l));
    let Linked {
        link,
        data,
        mut dirty,
    } = *l;
    let mut passes = Passes::new(dma);
    *passes.held_mut() = dirty.take_buffers();
    let mut s = Box::new(Streaming {
        link,
        data,
        devs,
        restore,
        dirty,
        passes,
    });
    or_fail!(s.first_pass(ctx), Phase::Streaming(s));
    Ok(Phase::Streaming(s))
}
