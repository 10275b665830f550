//! The source and its host: `connections: "auto"` resolved once at the
//! start, and the share of the host's migration bandwidth, recomputed every
//! [`SHARE_INTERVAL`] while the data connections run ([`ShareTicker`],
//! which also keeps the operator's live cap current in the bucket).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::link::FromDest;
use super::pool::RateLimiter;
use crate::api::{Connections, Hooks, SendParams};
use crate::error::MigrationError;
use crate::events::EventLog;
use crate::handshake::Dial;
use crate::host::{self, Direction, HostSlot, SHARE_INTERVAL};
use crate::live::LiveParams;
use crate::net::Ctl;
use crate::stats::MigrationStats;
use crate::traits::SourceVm;
use crate::worker::{self, Worker};

/// The number of data connections of this send and why: the requested
/// count, or the `auto` rule on the outgoing link and the VM's vCPUs.
pub(super) fn choose_connections(
    p: &SendParams,
    vm: &dyn SourceVm,
    dial: &Dial,
    hooks: &Hooks,
) -> (u32, String) {
    match p.connections {
        Connections::Count(n) => (n, format!("requested: {n}")),
        Connections::Auto => {
            let link = match (&hooks.host, dial.addrs.first()) {
                (Some(h), Some(a)) => h.link_speed(a.ip()),
                (None, _) => host::LinkSpeed {
                    interface: None,
                    mbit_s: Err("this VMM reports no host links".into()),
                },
                (_, None) => host::LinkSpeed {
                    interface: None,
                    mbit_s: Err("the destination resolves to no address".into()),
                },
            };
            let (n, why) = host::auto_connections(&link, vm.vcpus());
            log::debug!("connections {why}");
            (n, why)
        }
    }
}

/// Registers this send on the host (`None` without a host, or when the
/// registry refuses: the migration then counts itself alone, with a
/// warning).
pub(super) fn register(hooks: &Hooks) -> Option<Arc<dyn HostSlot>> {
    let h = hooks.host.as_ref()?;
    match h.register(Direction::Outgoing) {
        Ok(s) => Some(Arc::from(s)),
        Err(e) => {
            log::warn!("cannot register this migration on the host ({e}); it counts itself alone");
            None
        }
    }
}

/// What one share computation reads and where it writes.
pub(super) struct ShareInputs {
    /// This host's registration.
    pub slot: Option<Arc<dyn HostSlot>>,
    /// The host budget in MiB/s (`None`: counts only).
    pub host_max: Option<f64>,
    /// Where the destination's count arrives.
    pub from_dest: Arc<FromDest>,
    /// The writers' bucket.
    pub limiter: Arc<RateLimiter>,
    /// Counters of the status.
    pub stats: Arc<MigrationStats>,
    /// Where a changed share is reported.
    pub events: Arc<EventLog>,
    /// The live parameters: the operator's cap is refreshed with the share
    /// (also while a pass is being queued, when nothing else reads it).
    pub live: Arc<LiveParams>,
}

impl ShareInputs {
    /// Counts the migrations of both hosts and applies the share; reports
    /// a change of more than 1 %.
    fn apply(&self) {
        let cap = self.live.get().max_bandwidth_mib_s;
        self.limiter.set_user(cap.map(|m| m * 1024.0 * 1024.0));
        let own = match &self.slot {
            Some(s) => s.count().unwrap_or_else(|e| {
                log::debug!("counting this host's migrations: {e}");
                1
            }),
            None => 0,
        };
        let dst = u32::try_from(self.from_dest.host_load.load(Relaxed)).unwrap_or(u32::MAX);
        self.stats.set_host_migrations(own, dst);
        let Some(max) = self.host_max else { return };
        let share = host::share_mib_s(max, own, dst);
        let old = self.stats.share_mib_s();
        self.limiter.set_share(Some(share * 1024.0 * 1024.0));
        self.stats.set_share(Some(share));
        if old.is_none_or(|o| (o - share).abs() > o * 0.01) {
            log::info!(
                "bandwidth share {share:.1} MiB/s of {max} (source host {own}, destination host {dst} migration(s))"
            );
            self.events.emit(
                "bandwidth-share-changed",
                serde_json::json!({
                    "bandwidth_share_mib_s": share,
                    "host_max_mib_s": max,
                    "source_migrations": own,
                    "destination_migrations": dst,
                }),
            );
        }
    }
}

/// The thread that recomputes the share (and re-reads the operator's cap)
/// every [`SHARE_INTERVAL`].
///
/// Invariant: the share was applied once before [`ShareTicker::start`]
/// returned; dropping the ticker stops and joins its thread.
pub(super) struct ShareTicker {
    /// Dropping it wakes and ends the thread at once.
    stop: Option<std::sync::mpsc::Sender<()>>,
    handle: Option<Worker>,
}

impl ShareTicker {
    /// Applies the share now and keeps it current on a thread.
    pub fn start(inputs: ShareInputs, ctl: &Arc<Ctl>) -> Result<ShareTicker, MigrationError> {
        inputs.apply();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = worker::spawn("mig-share", ctl, move || {
            // A message or the sender's drop ends the thread without
            // waiting out the interval (the join is on the completion path).
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(SHARE_INTERVAL)
            {
                inputs.apply();
            }
            Ok(())
        })?;
        Ok(ShareTicker {
            stop: Some(stop),
            handle: Some(handle),
        })
    }
}

impl Drop for ShareTicker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(h) = self.handle.take() {
            let _ = worker::join(h);
        }
    }
}
