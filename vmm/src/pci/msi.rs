//! MSI/MSI-X delivery through KVM: one GSI (from [`FIRST_MSI_GSI`] up) and
//! one eventfd (registered with `KVM_IRQFD`) per vector, and one routing
//! table per VM applied with `KVM_SET_GSI_ROUTING`.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, including the routes
//! KVM installs by default with the in-kernel irqchip (GSI 0..=23 to the
//! IOAPIC pins, GSI 0..=15 also to the PIC pins): every table applied here
//! starts with exactly those ([`default_irqchip_routes`]), so the legacy
//! devices (PIT, COM1, i8042 irqfds) keep working unchanged.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use devices::pci::{MsiMessage, MsiSink};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use log::{debug, warn};
use vmm_sys_util::eventfd::EventFd;

/// Number of IOAPIC pins (GSIs 0..=23 route to them by default).
pub const IOAPIC_PINS: u32 = 24;
/// Number of PIC pins (GSIs 0..=15 also route to the two 8259s).
pub const PIC_PINS: u32 = 16;
/// The first GSI given to an MSI vector (above the IOAPIC pins).
pub const FIRST_MSI_GSI: u32 = IOAPIC_PINS;
/// Upper bound of GSIs (and of routing entries) this router uses: KVM's
/// `KVM_MAX_IRQ_ROUTES`.
pub const MAX_GSI: u32 = kvm_bindings::KVM_MAX_IRQ_ROUTES as u32;

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routes KVM installs with `KVM_CREATE_IRQCHIP` on x86
/// (`kvm_setup_default_irq_routing`): GSI `g` to IOAPIC pin `g` for
/// `g < 24`, and for `g < 16` also to the PIC (master for `g < 8`, else
/// slave) pin `g % 8`.
pub fn default_irqchip_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity((IOAPIC_PINS + PIC_PINS) as usize);
    for gsi in 0..IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < PIC_PINS {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

/// The KVM route of an MSI message on `gsi`.
pub fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = msg.address as u32;
    e.u.msi.address_hi = (msg.address >> 32) as u32;
    e.u.msi.data = msg.data;
    e
}

/// The whole routing table: the default irqchip routes, then one MSI route
/// per routed GSI (in GSI order).
pub fn routing_table(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = default_irqchip_routes();
    v.extend(msi.iter().map(|(&gsi, &m)| msi_entry(gsi, m)));
    v
}

/// The GSI routing of one VM.
///
/// Invariant: `table` is the only copy of the MSI routes; every change is
/// applied to KVM under its lock (so KVM's table equals
/// `routing_table(&table.routes)` after each successful change, and
/// concurrent changes never interleave); GSIs are handed out once, in
/// increasing order, from [`FIRST_MSI_GSI`] below [`MAX_GSI`].
pub struct MsiRouter {
    fd: Arc<VmFd>,
    table: Mutex<Table>,
}

struct Table {
    next_gsi: u32,
    routes: BTreeMap<u32, MsiMessage>,
}

impl std::fmt::Debug for MsiRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRouter").finish_non_exhaustive()
    }
}

fn kvm_error(id: &str, what: &str, e: impl std::fmt::Display) -> devices::Error {
    devices::Error::Device {
        id: id.to_string(),
        msg: format!("{what}: {e}"),
    }
}

impl MsiRouter {
    /// A router for the VM `fd` (which has an in-kernel irqchip). No table
    /// is applied until the first route is set.
    pub fn new(fd: Arc<VmFd>) -> Arc<MsiRouter> {
        Arc::new(MsiRouter {
            fd,
            table: Mutex::new(Table {
                next_gsi: FIRST_MSI_GSI,
                routes: BTreeMap::new(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the sink of function `id` with `count` vectors: `count` fresh
    /// GSIs, each with an eventfd registered as its irqfd. No vector has a
    /// route yet.
    pub fn sink(self: &Arc<Self>, id: &str, count: u16) -> devices::Result<Arc<KvmMsiSink>> {
        let base = {
            let mut t = self.lock();
            let base = t.next_gsi;
            let end = base
                .checked_add(u32::from(count))
                .filter(|&e| e <= MAX_GSI)
                .ok_or_else(|| {
                    kvm_error(
                        id,
                        "allocating MSI GSIs",
                        format!("{count} vectors do not fit below GSI {MAX_GSI}"),
                    )
                })?;
            t.next_gsi = end;
            base
        };
        let mut fds = Vec::with_capacity(usize::from(count));
        for v in 0..u32::from(count) {
            let e = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| devices::Error::Io {
                what: format!("device {id}: MSI vector {v} eventfd"),
                source,
            })?;
            if let Err(err) = self.fd.register_irqfd(&e, base + v) {
                for (i, f) in fds.iter().enumerate() {
                    let _ = self.fd.unregister_irqfd(f, base + i as u32);
                }
                return Err(kvm_error(
                    id,
                    &format!("KVM_IRQFD for GSI {}", base + v),
                    err,
                ));
            }
            fds.push(e);
        }
        debug!("device {id}: {count} MSI vector(s) on GSI {base}..");
        Ok(Arc::new(KvmMsiSink {
            router: self.clone(),
            id: id.to_string(),
            base,
            fds,
        }))
    }

    /// Sets (`Some`) or removes (`None`) the route of `gsi` and applies the
    /// table. On failure the previous route is kept (in the table and in KVM).
    fn set(&self, id: &str, gsi: u32, msg: Option<MsiMessage>) -> devices::Result<()> {
        let mut t = self.lock();
        let old = match msg {
            Some(m) => t.routes.insert(gsi, m),
            None => t.routes.remove(&gsi),
        };
        if old == msg {
            return Ok(());
        }
        if let Err(e) = self.apply(&t.routes) {
            match old {
                Some(m) => t.routes.insert(gsi, m),
                None => t.routes.remove(&gsi),
            };
            return Err(kvm_error(id, "KVM_SET_GSI_ROUTING", e));
        }
        Ok(())
    }

    fn apply(&self, routes: &BTreeMap<u32, MsiMessage>) -> Result<(), String> {
        let entries = routing_table(routes);
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
        self.fd.set_gsi_routing(&table).map_err(|e| e.to_string())
    }

    /// Whether `gsi` has a route now.
    fn routed(&self, gsi: u32) -> bool {
        self.lock().routes.contains_key(&gsi)
    }

    /// Number of MSI routes now (for tests and `vm.info`).
    pub fn msi_routes(&self) -> usize {
        self.lock().routes.len()
    }
}

/// The [`MsiSink`] of one PCI function.
///
/// Invariant: vector `v` is GSI `base + v`, and `fds[v]` is registered as
/// its irqfd for the sink's whole life (unregistered, and its route
/// removed, on drop).
pub struct KvmMsiSink {
    router: Arc<MsiRouter>,
    id: String,
    base: u32,
    fds: Vec<EventFd>,
}

impl std::fmt::Debug for KvmMsiSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMsiSink")
            .field("id", &self.id)
            .field("base", &self.base)
            .field("count", &self.fds.len())
            .finish()
    }
}

impl KvmMsiSink {
    fn gsi(&self, vector: u16) -> devices::Result<u32> {
        if usize::from(vector) < self.fds.len() {
            Ok(self.base + u32::from(vector))
        } else {
            Err(kvm_error(
                &self.id,
                "MSI",
                format!("vector {vector} out of range (0..{})", self.fds.len()),
            ))
        }
    }

    /// The GSI of vector 0.
    pub fn base_gsi(&self) -> u32 {
        self.base
    }
}

impl MsiSink for KvmMsiSink {
    fn count(&self) -> u16 {
        self.fds.len() as u16
    }

    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) -> devices::Result<()> {
        let gsi = self.gsi(vector)?;
        self.router.set(&self.id, gsi, msg)
    }

    fn signal(&self, vector: u16) -> devices::Result<()> {
        let gsi = self.gsi(vector)?;
        if !self.router.routed(gsi) {
            return Err(kvm_error(
                &self.id,
                "MSI",
                format!("vector {vector} has no route (masked or not programmed)"),
            ));
        }
        self.fds[usize::from(vector)]
            .write(1)
            .map_err(|source| devices::Error::Io {
                what: format!("device {}: signalling MSI vector {vector}", self.id),
                source,
            })
    }

    fn eventfd(&self, vector: u16) -> Option<RawFd> {
        self.fds.get(usize::from(vector)).map(|f| f.as_raw_fd())
    }
}

impl Drop for KvmMsiSink {
    fn drop(&mut self) {
        for (v, f) in self.fds.iter().enumerate() {
            let gsi = self.base + v as u32;
            if let Err(e) = self.router.set(&self.id, gsi, None) {
                warn!("{e}");
            }
            if let Err(e) = self.router.fd.unregister_irqfd(f, gsi) {
                warn!(
                    "device {}: unregistering the irqfd of GSI {gsi}: {e}",
                    self.id
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_irqchip_routes();
        assert_eq!(r.len(), 40);
        let (chips, pins): (Vec<u32>, Vec<u32>) = r
            .iter()
            // SAFETY: every entry here is an irqchip route (checked below).
            .map(|e| unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) })
            .unzip();
        assert!(r.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        // GSI 0: IOAPIC pin 0 and PIC master pin 0; GSI 9: IOAPIC 9, slave 1.
        assert_eq!((r[0].gsi, chips[0], pins[0]), (0, KVM_IRQCHIP_IOAPIC, 0));
        assert_eq!(
            (r[1].gsi, chips[1], pins[1]),
            (0, KVM_IRQCHIP_PIC_MASTER, 0)
        );
        let i9 = r.iter().position(|e| e.gsi == 9).unwrap();
        assert_eq!((chips[i9], pins[i9]), (KVM_IRQCHIP_IOAPIC, 9));
        assert_eq!((chips[i9 + 1], pins[i9 + 1]), (KVM_IRQCHIP_PIC_SLAVE, 1));
        // GSI 16..23: IOAPIC only.
        assert_eq!(r.iter().filter(|e| e.gsi >= 16).count(), 8);
        assert_eq!(r.last().unwrap().gsi, 23);
    }

    #[test]
    fn msi_entries_follow_the_defaults() {
        let mut m = BTreeMap::new();
        m.insert(
            25,
            MsiMessage {
                address: 0x1_fee0_1000,
                data: 0x42,
            },
        );
        m.insert(
            24,
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41,
            },
        );
        let t = routing_table(&m);
        assert_eq!(t.len(), 42);
        let (a, b) = (t[40], t[41]);
        assert_eq!((a.gsi, a.type_, b.gsi), (24, KVM_IRQ_ROUTING_MSI, 25));
        // SAFETY: both are MSI routes (type checked above).
        unsafe {
            assert_eq!(
                (a.u.msi.address_lo, a.u.msi.address_hi, a.u.msi.data),
                (0xfee0_0000, 0, 0x41)
            );
            assert_eq!(
                (b.u.msi.address_lo, b.u.msi.address_hi, b.u.msi.data),
                (0xfee0_1000, 1, 0x42)
            );
        }
    }
}
