//! Device state on the destination: a reorder buffer per device in front of
//! one load thread per device, all under one byte budget. The load thread
//! starts on the device's first item, sets RESUMING and writes the data
//! strictly in sequence order; at END it drops the fd and sets STOP.
//!
//! The budget (`ReceiveParams::device_buffer_bytes`) counts every item from
//! the moment a reader is admitted to read its payload until the load
//! thread has applied it: every reorder buffer, every chunk being read from
//! any connection and every chunk being written to a device. Readers wait
//! for budget before they allocate anything. The last [`HEADROOM`] bytes
//! of it are kept for items that their device's load thread needs next, so
//! the buffers cannot deadlock (see `docs/migration-protocol.md`).
//!
//! Payloads are read from the socket straight into the buffer that the load
//! thread later writes to the device fd (no copy in between), and buffers
//! are reused: an applied item's buffer goes to a cache that counts
//! against the same budget (cached bytes + admitted bytes ≤ bound), and an
//! admission that needs the room evicts cached buffers first. A buffer is
//! reused only for a payload of nearly its size ([`fits`]), so a small
//! item never holds a large buffer.

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
use crate::wire::{DevItemKind, MAX_DEVICE_CHUNK};
use crate::worker::{self, Worker};

/// Buffer cost of a marker item, so that markers are bounded too.
const MARKER_COST: u64 = 4096;
/// Part of the budget only items that their device needs next may use:
/// one chunk of the largest size.
pub const HEADROOM: u64 = MAX_DEVICE_CHUNK;

/// A switch-over ack to send: (device index, bytes loaded, load µs).
pub type Ack = (usize, u64, u64);

enum DevItem {
    Data(Vec<u8>),
    InitialDone,
    End,
}

/// Whether a cached buffer of `cap` bytes may carry a payload of `len`
/// bytes: at least as large, and at most an eighth larger (so the memory an
/// item holds stays within 9/8 of the budget it was charged).
fn fits(cap: usize, len: usize) -> bool {
    cap >= len && cap - len <= len / 8
}

/// Budget cost of an item of `kind` with `len` payload bytes.
fn cost_of(kind: DevItemKind, len: u64) -> u64 {
    if kind.has_data() {
        len
    } else {
        MARKER_COST
    }
}

/// The budget shared by all devices and readers, and the cache of payload
/// buffers of applied items.
///
/// Invariant: `used + cached <= bound` at all times, where `cached` is the
/// total capacity of the buffers in `free`; `peak` is the highest `used`.
#[derive(Debug, Default)]
struct Budget {
    used: u64,
    peak: u64,
    cached: u64,
    free: Vec<Vec<u8>>,
}

impl Budget {
    /// Takes a cached buffer that [`fits`] a payload of `len` bytes.
    fn take_fitting(&mut self, len: usize) -> Option<Vec<u8>> {
        let i = self.free.iter().position(|b| fits(b.capacity(), len))?;
        let b = self.free.swap_remove(i);
        self.cached -= b.capacity() as u64;
        Some(b)
    }

    /// Moves cached buffers out (into `evicted`, to be freed outside the
    /// lock) until `used + cached <= bound`.
    fn evict(&mut self, bound: u64, evicted: &mut Vec<Vec<u8>>) {
        while self.used + self.cached > bound {
            let Some(b) = self.free.pop() else { break };
            self.cached -= b.capacity() as u64;
            evicted.push(b);
        }
    }
}

/// Budget reserved for one item whose payload a reader is about to read
/// ([`DeviceInbox::admit`]), with the buffer the payload goes into
/// ([`Admitted::payload_mut`]); then handed to [`DeviceInbox::deliver`].
/// Dropped undelivered (a failed read), it gives the budget back.
///
/// Invariant: `buf.len()` is the item's payload length (0 for markers).
pub struct Admitted<'a> {
    inbox: &'a DeviceInbox,
    dev: usize,
    seq: u64,
    kind: DevItemKind,
    cost: u64,
    buf: Vec<u8>,
}

impl Admitted<'_> {
    /// The buffer to read the item's payload into (exactly its length).
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.inbox.release(self.cost, std::mem::take(&mut self.buf));
    }
}

#[derive(Default)]
struct SlotState {
    next: u64,
    buf: BTreeMap<u64, (DevItem, u64)>,
    end_seq: Option<u64>,
    started: bool,
    done: bool,
    progress: u64,
    /// Items whose effect on the device is complete (written, or for END
    /// the device left RESUMING). Invariant: `applied <= next`.
    applied: u64,
    /// Since when the load thread has been applying its current item
    /// (`Some` exactly while `applied < next`).
    busy_since: Option<Instant>,
}

#[derive(Default)]
struct Slot {
    st: Mutex<SlotState>,
    cv: Condvar,
}

/// The reorder buffers and load threads of all devices.
///
/// Invariants: items are applied in sequence order, each sequence number at
/// most once; the bytes admitted and not yet applied, all devices and
/// readers together, stay ≤ `bound`; beyond `bound - HEADROOM` only an item
/// whose sequence number is its device's next expected one is admitted (so
/// the buffers can never deadlock against their own load threads).
pub struct DeviceInbox {
    slots: Vec<Slot>,
    devices: Vec<Arc<dyn MigratableDevice>>,
    counters: Vec<Arc<DeviceCounters>>,
    bound: u64,
    budget: Mutex<Budget>,
    budget_cv: Condvar,
    ctl: Arc<Ctl>,
    acks: Mutex<Sender<Ack>>,
    notify: Arc<Notify>,
    loaders: Mutex<Vec<Worker>>,
}

impl DeviceInbox {
    /// Buffers for `devices`, all together bounded by `bound` bytes
    /// (at least [`HEADROOM`]: smaller values are raised to it).
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
            bound: bound.max(HEADROOM),
            budget: Mutex::new(Budget::default()),
            budget_cv: Condvar::new(),
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

    /// Checks item `seq` of `kind` (`len` payload bytes) for device `dev`
    /// against its stream (duplicates, items after the end, an END before
    /// buffered items, and with `in_order` anything but the next expected
    /// item are errors), then waits until the budget admits it: always
    /// within `bound - HEADROOM`, and within `bound` if it is the next item
    /// its device needs. Nothing is allocated before the budget admitted
    /// the item; then the payload buffer (`len` bytes) is a cached one that
    /// [`fits`], or a new one. Waiting with no item applied anywhere for
    /// the stall timeout is an error.
    pub fn admit(
        &self,
        dev: usize,
        seq: u64,
        kind: DevItemKind,
        len: u64,
        in_order: bool,
    ) -> Result<Admitted<'_>, MigrationError> {
        self.check_index(dev as u64)?;
        let cost = cost_of(kind, len);
        let mut since = (Instant::now(), self.progress());
        loop {
            let next = {
                let st = lock(&self.slots[dev].st);
                self.check_item(dev, &st, seq, kind)?;
                if in_order && seq != st.next {
                    return Err(MigrationError::proto(format!(
                        "device {}: state chunk {seq} out of order on the main connection \
                         (expected {})",
                        self.id(dev),
                        st.next
                    )));
                }
                st.next
            };
            {
                let mut b = lock(&self.budget);
                let limit = if seq == next {
                    self.bound
                } else {
                    self.bound - HEADROOM
                };
                if b.used + cost <= limit {
                    b.used += cost;
                    b.peak = b.peak.max(b.used);
                    // Bounded by the header check (≤ MAX_DEVICE_CHUNK) and
                    // admitted against the budget just now.
                    let len = if kind.has_data() { len as usize } else { 0 };
                    let reused = if len > 0 { b.take_fitting(len) } else { None };
                    let mut evicted = Vec::new();
                    b.evict(self.bound, &mut evicted);
                    drop(b);
                    drop(evicted);
                    let buf = match reused {
                        Some(mut buf) => {
                            // Within capacity: no reallocation; only bytes
                            // beyond the buffer's last length are zeroed.
                            buf.resize(len, 0);
                            buf
                        }
                        None => vec![0; len],
                    };
                    return Ok(Admitted {
                        inbox: self,
                        dev,
                        seq,
                        kind,
                        cost,
                        buf,
                    });
                }
                let now = self.progress();
                if now != since.1 {
                    since = (Instant::now(), now);
                } else if since.0.elapsed() > self.ctl.stall {
                    return Err(self.budget_stalled(dev, seq, next));
                }
                let _ = self
                    .budget_cv
                    .wait_timeout(b, POLL_INTERVAL)
                    .unwrap_or_else(|e| e.into_inner());
            }
            self.ctl.check()?;
        }
    }

    /// The error of an item that waited for budget for the stall timeout:
    /// a device that does not take its data, or (nothing being applied
    /// anywhere) a peer that filled the budget with items that cannot be
    /// applied yet.
    fn budget_stalled(&self, dev: usize, seq: u64, next: u64) -> MigrationError {
        let busy = self.slots.iter().position(|s| {
            let st = lock(&s.st);
            st.applied < st.next || st.buf.contains_key(&st.next)
        });
        if let Some(stuck) = busy {
            return MigrationError::device(
                self.id(stuck),
                format!(
                    "device state budget of {} bytes full and not draining for the stall \
                     timeout: the device is not loading its state",
                    self.bound
                ),
            );
        }
        MigrationError::proto(format!(
            "device state budget of {} bytes (device_buffer_bytes) exhausted by chunks that \
             cannot be applied: device {} chunk {seq} waits while the device needs chunk {next}",
            self.bound,
            self.id(dev)
        ))
    }

    /// Stream checks of item `seq` of `kind` against device `dev`'s state.
    fn check_item(
        &self,
        dev: usize,
        st: &SlotState,
        seq: u64,
        kind: DevItemKind,
    ) -> Result<(), MigrationError> {
        if seq < st.next || st.buf.contains_key(&seq) {
            return Err(MigrationError::device(
                self.id(dev),
                format!("duplicate state chunk {seq}"),
            ));
        }
        if let Some(e) = st.end_seq {
            if seq > e || kind == DevItemKind::End {
                return Err(MigrationError::device(
                    self.id(dev),
                    format!("chunk {seq} after the end of its stream ({e})"),
                ));
            }
        }
        if kind == DevItemKind::End && st.buf.keys().next_back().is_some_and(|&k| k > seq) {
            return Err(MigrationError::device(
                self.id(dev),
                format!("end of stream at {seq} before buffered chunks"),
            ));
        }
        Ok(())
    }

    /// Gives `cost` bytes of budget back, and keeps `buf` (a payload buffer
    /// no longer needed) in the cache if the budget has room for it.
    fn release(&self, cost: u64, buf: Vec<u8>) {
        let mut b = lock(&self.budget);
        b.used = b.used.saturating_sub(cost);
        let cap = buf.capacity() as u64;
        let spare = if cap > 0 && b.used + b.cached + cap <= self.bound {
            b.cached += cap;
            b.free.push(buf);
            None
        } else {
            Some(buf)
        };
        drop(b);
        self.budget_cv.notify_all();
        // Freed outside the lock.
        drop(spare);
    }

    /// Highest budget use so far, in bytes (at most the bound).
    pub fn peak_bytes(&self) -> u64 {
        lock(&self.budget).peak
    }

    /// Hands an admitted item, its payload read into
    /// [`Admitted::payload_mut`], to its device's reorder buffer (the
    /// budget it holds stays taken until the item was applied). The stream
    /// checks run again: another reader may have delivered the same
    /// sequence number meanwhile.
    pub fn deliver(self: &Arc<Self>, mut t: Admitted<'_>) -> Result<(), MigrationError> {
        let (dev, seq, kind, cost) = (t.dev, t.seq, t.kind, t.cost);
        let data = std::mem::take(&mut t.buf);
        let item = match kind {
            DevItemKind::PrecopyData | DevItemKind::StopCopyData => DevItem::Data(data),
            DevItemKind::InitialDone => DevItem::InitialDone,
            DevItemKind::End => DevItem::End,
        };
        let slot = &self.slots[dev];
        let mut st = lock(&slot.st);
        self.check_item(dev, &st, seq, kind)?;
        if matches!(item, DevItem::End) {
            st.end_seq = Some(seq);
        }
        // The buffer owns the budget now; the load thread releases it.
        t.cost = 0;
        st.buf.insert(seq, (item, cost));
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
        let mut st = lock(&slot.st);
        st.applied += 1;
        st.busy_since = None;
        drop(st);
        slot.cv.notify_all();
    }

    /// Fails for a device whose load thread has been applying one item for
    /// longer than the stall timeout (a device that stopped taking its
    /// data), in every device-state mode and phase.
    pub fn check_loading(&self) -> Result<(), MigrationError> {
        for (i, s) in self.slots.iter().enumerate() {
            if lock(&s.st)
                .busy_since
                .is_some_and(|t| t.elapsed() > self.ctl.stall)
            {
                return Err(MigrationError::device(
                    self.id(i),
                    format!(
                        "state not loading: the device took no data for the stall timeout ({:?})",
                        self.ctl.stall
                    ),
                ));
            }
        }
        Ok(())
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
        log::debug!(
            "device state held in memory peaked at {} of {} bytes",
            self.peak_bytes(),
            self.bound
        );
    }

    /// The next item of device `dev` in sequence order and its budget cost
    /// (released by the caller once the item was applied).
    fn next_item(&self, dev: usize) -> Result<(DevItem, u64), MigrationError> {
        let slot = &self.slots[dev];
        let mut st = lock(&slot.st);
        loop {
            let next = st.next;
            if let Some(item) = st.buf.remove(&next) {
                st.next += 1;
                st.progress += 1;
                st.busy_since = Some(Instant::now());
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

    /// The load thread of device `dev`.
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
            let (item, cost) = self.next_item(dev)?;
            // The budget of the item comes back once it was applied (also
            // if applying it fails), and its buffer goes to the cache.
            let mut applied = Released(self, cost, Vec::new());
            match item {
                DevItem::Data(data) => {
                    let t = Instant::now();
                    if let Some(f) = f.as_mut() {
                        // Straight from the buffer the reader filled.
                        f.write_all(&data).map_err(|e| {
                            MigrationError::device(&id, format!("loading state: {e}"))
                        })?;
                    }
                    busy += t.elapsed();
                    let n = data.len() as u64;
                    // Budget and buffer back before the item counts as
                    // applied, so that whoever waits for that finds both.
                    applied.2 = data;
                    drop(applied);
                    loaded += n;
                    c.transferred.fetch_add(n, Relaxed);
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

/// Gives an item's budget back when dropped, and its payload buffer (if
/// any) to the cache.
struct Released<'a>(&'a DeviceInbox, u64, Vec<u8>);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.release(self.1, std::mem::take(&mut self.2));
    }
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;
