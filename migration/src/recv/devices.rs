//! Device state on the destination: a bounded reorder buffer per device in
//! front of one load thread per device. The load thread starts on the
//! device's first item, sets RESUMING and writes the data strictly in
//! sequence order; at END it drops the fd and sets STOP.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::MigrationError;
use crate::net::{lock, Ctl, Notify, POLL_INTERVAL};
use crate::stats::DeviceCounters;
use crate::traits::{MigState, MigratableDevice};
use crate::wire::DevItemKind;
use crate::worker::{self, Worker};

/// Buffer cost of a marker item, so that markers are bounded too.
const MARKER_COST: u64 = 4096;

/// A switch-over ack to send: (device index, bytes loaded, load µs).
pub type Ack = (usize, u64, u64);

enum DevItem {
    Data(Vec<u8>),
    InitialDone,
    End,
}

impl DevItem {
    fn cost(&self) -> u64 {
        match self {
            DevItem::Data(d) => d.len() as u64,
            _ => MARKER_COST,
        }
    }
}

#[derive(Default)]
struct SlotState {
    next: u64,
    buf: BTreeMap<u64, DevItem>,
    bytes: u64,
    end_seq: Option<u64>,
    started: bool,
    done: bool,
    progress: u64,
    /// Items whose effect on the device is complete (written, or for END
    /// the device left RESUMING). Invariant: `applied <= next`.
    applied: u64,
}

#[derive(Default)]
struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

/// The reorder buffers and load threads of all devices.
///
/// Invariants: items are applied in sequence order, each sequence number at
/// most once; a device's buffered bytes stay ≤ `bound` except for the item
/// whose sequence number is the next expected one, which is always admitted
/// (so the buffer can never deadlock against its own load thread).
pub struct DeviceInbox {
    slots: Vec<Slot>,
    devices: Vec<Arc<dyn MigratableDevice>>,
    counters: Vec<Arc<DeviceCounters>>,
    bound: u64,
    ctl: Arc<Ctl>,
    acks: Mutex<Sender<Ack>>,
    notify: Arc<Notify>,
    loaders: Mutex<Vec<Worker>>,
}

impl DeviceInbox {
    /// Buffers for `devices`, each bounded by `bound` bytes.
    pub fn new(
        devices: Vec<Arc<dyn MigratableDevice>>,
        counters: Vec<Arc<DeviceCounters>>,
        bound: u64,
        ctl: Arc<Ctl>,
        acks: Sender<Ack>,
        notify: Arc<Notify>,
    ) -> Arc<DeviceInbox> {
        Arc::new(DeviceInbox {
            slots: devices.iter().map(|_| Slot::default()).collect(),
            devices,
            counters,
            bound,
            ctl,
            acks: Mutex::new(acks),
            notify,
            loaders: Mutex::new(Vec::new()),
        })
    }

    /// Fails for a device index the destination does not have.
    pub fn check_index(&self, dev: u64) -> Result<(), MigrationError> {
        if (dev as usize) < self.slots.len() {
            Ok(())
        } else {
            Err(MigrationError::proto(format!(
                "chunk for unknown device index {dev}"
            )))
        }
    }

    fn id(&self, dev: usize) -> &str {
        self.devices[dev].id()
    }

    /// Hands an item to device `dev`'s buffer, waiting while the buffer is
    /// full (unless `seq` is the next expected). Duplicates, items after the
    /// end of the stream and a stalled buffer are errors.
    pub fn deliver(
        self: &Arc<Self>,
        dev: usize,
        seq: u64,
        kind: DevItemKind,
        data: Vec<u8>,
    ) -> Result<(), MigrationError> {
        self.check_index(dev as u64)?;
        let item = match kind {
            DevItemKind::PrecopyData | DevItemKind::StopCopyData => DevItem::Data(data),
            DevItemKind::InitialDone => DevItem::InitialDone,
            DevItemKind::End => DevItem::End,
        };
        let cost = item.cost();
        let slot = &self.slots[dev];
        let mut st = lock(&slot.st);
        let mut since = (Instant::now(), st.progress);
        loop {
            if seq < st.next || st.buf.contains_key(&seq) {
                return Err(MigrationError::device(
                    self.id(dev),
                    format!("duplicate state chunk {seq}"),
                ));
            }
            if let Some(e) = st.end_seq {
                if seq > e || matches!(item, DevItem::End) {
                    return Err(MigrationError::device(
                        self.id(dev),
                        format!("chunk {seq} after the end of its stream ({e})"),
                    ));
                }
            }
            if matches!(item, DevItem::End) && st.buf.keys().next_back().is_some_and(|&k| k > seq) {
                return Err(MigrationError::device(
                    self.id(dev),
                    format!("end of stream at {seq} before buffered chunks"),
                ));
            }
            if seq == st.next || st.bytes + cost <= self.bound {
                break;
            }
            self.ctl.check()?;
            if st.progress != since.1 {
                since = (Instant::now(), st.progress);
            } else if since.0.elapsed() > self.ctl.stall {
                return Err(MigrationError::device(
                    self.id(dev),
                    "state reorder buffer full and not draining",
                ));
            }
            st = slot
                .cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        if matches!(item, DevItem::End) {
            st.end_seq = Some(seq);
        }
        st.buf.insert(seq, item);
        st.bytes += cost;
        let start = !st.started;
        st.started = true;
        drop(st);
        slot.cv.notify_all();
        if start {
            let me = self.clone();
            let h = worker::spawn(&format!("mig-load-{dev}"), &self.ctl, move || {
                if let Err(e) = me.load(dev) {
                    me.ctl.fail(e);
                }
                me.notify.notify();
                Ok(())
            })?;
            lock(&self.loaders).push(h);
        }
        Ok(())
    }

    /// Checks at a pass barrier (all items enqueued before the SYNC have
    /// arrived): every buffer must hold a gap-free run starting at its next
    /// expected sequence number.
    pub fn check_contiguous(&self) -> Result<(), MigrationError> {
        for (i, s) in self.slots.iter().enumerate() {
            let st = lock(&s.st);
            if let (Some(&first), Some(&last)) = (st.buf.keys().next(), st.buf.keys().next_back()) {
                if first != st.next || last - first + 1 != st.buf.len() as u64 {
                    return Err(MigrationError::device(
                        self.id(i),
                        format!(
                            "state sequence gap: expected {}, have {first}..={last} ({} chunks)",
                            st.next,
                            st.buf.len()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether every device stream has been received up to its END.
    pub fn check_all_ended(&self) -> Result<(), MigrationError> {
        for (i, s) in self.slots.iter().enumerate() {
            if lock(&s.st).end_seq.is_none() {
                return Err(MigrationError::device(
                    self.id(i),
                    "state stream did not end before the final state",
                ));
            }
        }
        Ok(())
    }

    /// Waits until every item delivered so far to device `dev` has been
    /// applied to the device (its load thread is idle). The main-connection
    /// path (`device_state = main`) calls this after each chunk, so devices
    /// load one chunk at a time, strictly one after another, as in QEMU's
    /// single-channel path.
    ///
    /// A device that applies nothing for the stall timeout fails the
    /// migration, as a full reorder buffer that does not drain does in
    /// channels mode.
    pub fn wait_applied(&self, dev: usize) -> Result<(), MigrationError> {
        self.check_index(dev as u64)?;
        let slot = &self.slots[dev];
        let mut st = lock(&slot.st);
        let mut since = (Instant::now(), st.applied);
        while !(st.buf.is_empty() && st.applied == st.next) {
            self.ctl.check()?;
            if st.applied != since.1 {
                since = (Instant::now(), st.applied);
            } else if since.0.elapsed() > self.ctl.stall {
                return Err(MigrationError::device(
                    self.id(dev),
                    format!(
                        "state not loading: the device took no data for the stall timeout ({:?})",
                        self.ctl.stall
                    ),
                ));
            }
            st = slot
                .cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    fn mark_applied(&self, dev: usize) {
        let slot = &self.slots[dev];
        lock(&slot.st).applied += 1;
        slot.cv.notify_all();
    }

    /// Items applied so far, all devices (a progress measure).
    pub fn progress(&self) -> u64 {
        self.slots.iter().map(|s| lock(&s.st).progress).sum()
    }

    /// Whether every device finished loading (END applied, STOP set).
    pub fn all_done(&self) -> bool {
        self.slots.iter().all(|s| lock(&s.st).done)
    }

    /// Joins the load threads (they stop on abort).
    pub fn join(&self) {
        let hs: Vec<_> = lock(&self.loaders).drain(..).collect();
        for h in hs {
            let _ = worker::join(h);
        }
    }

    fn next_item(&self, dev: usize) -> Result<DevItem, MigrationError> {
        let slot = &self.slots[dev];
        let mut st = lock(&slot.st);
        loop {
            let next = st.next;
            if let Some(item) = st.buf.remove(&next) {
                st.next += 1;
                st.bytes -= item.cost();
                st.progress += 1;
                drop(st);
                slot.cv.notify_all();
                return Ok(item);
            }
            self.ctl.check()?;
            st = slot
                .cv
                .wait_timeout(st, POLL_INTERVAL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn load(&self, dev: usize) -> Result<(), MigrationError> {
        let d = self.devices[dev].clone();
        let id = d.id().to_string();
        let c = &self.counters[dev];
        let mut f: Option<File> = Some(
            d.set_state(MigState::Resuming)
                .map_err(|e| MigrationError::device(&id, format!("entering RESUMING: {e}")))?
                .ok_or_else(|| MigrationError::device(&id, "RESUMING returned no data fd"))?,
        );
        let (mut loaded, mut busy) = (0u64, Duration::ZERO);
        loop {
            match self.next_item(dev)? {
                DevItem::Data(data) => {
                    let t = Instant::now();
                    if let Some(f) = f.as_mut() {
                        f.write_all(&data).map_err(|e| {
                            MigrationError::device(&id, format!("loading state: {e}"))
                        })?;
                    }
                    busy += t.elapsed();
                    loaded += data.len() as u64;
                    c.transferred.fetch_add(data.len() as u64, Relaxed);
                    if busy.as_micros() > 0 {
                        c.load_rate.store(
                            (loaded as u128 * 1_000_000 / busy.as_micros()) as u64,
                            Relaxed,
                        );
                    }
                    self.mark_applied(dev);
                }
                DevItem::InitialDone => {
                    c.initial_loaded.store(true, Relaxed);
                    let _ = lock(&self.acks).send((dev, loaded, busy.as_micros() as u64));
                    self.notify.notify();
                    self.mark_applied(dev);
                }
                DevItem::End => {
                    drop(f.take());
                    d.set_state(MigState::Stop).map_err(|e| {
                        MigrationError::device(&id, format!("refused its state: {e}"))
                    })?;
                    lock(&self.slots[dev].st).done = true;
                    self.mark_applied(dev);
                    log::debug!("device {id}: {loaded} bytes loaded");
                    return Ok(());
                }
            }
        }
    }
}
