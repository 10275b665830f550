//! KVM tests of [`super::msi`]: an MSI route delivers its vector to the
//! LAPIC, and the legacy IOAPIC routes keep working once a table with MSI
//! routes replaced KVM's default one. Skipped when /dev/kvm is absent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::pci::{MsiMessage, MsiSink};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use super::msi::MsiRouter;

const APIC_SVR: usize = 0xf0;
const APIC_IRR: usize = 0x200;

fn lapic_u32(fd: &VcpuFd, off: usize) -> u32 {
    let l = fd.get_lapic().unwrap();
    let b: Vec<u8> = (0..4).map(|i| l.regs[off + i] as u8).collect();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn enable_lapic(fd: &VcpuFd) {
    let mut l = fd.get_lapic().unwrap();
    l.regs[APIC_SVR + 1] |= 1; // bit 8: APIC software enable
    fd.set_lapic(&l).unwrap();
}

fn irr_has(fd: &VcpuFd, vector: u32) -> bool {
    let word = lapic_u32(fd, APIC_IRR + 0x10 * (vector as usize / 32));
    word & (1 << (vector % 32)) != 0
}

fn wait_irr(fd: &VcpuFd, vector: u32) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        if irr_has(fd, vector) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn msi_routes_deliver_and_keep_the_legacy_routes() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("SKIPPED: no /dev/kvm");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    enable_lapic(&vcpu);

    let router = MsiRouter::new(vm.clone());
    let sink = router.sink("d0", 2).unwrap();
    assert_eq!(sink.count(), 2);
    assert_eq!(sink.base_gsi(), super::msi::FIRST_MSI_GSI);
    assert!(sink.eventfd(1).is_some() && sink.eventfd(2).is_none());
    assert!(sink.signal(0).is_err(), "no route yet");
    assert!(sink.set_route(2, None).is_err(), "vector out of range");

    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    sink.set_route(0, Some(msg)).unwrap();
    sink.set_route(1, Some(MsiMessage { data: 0x42, ..msg }))
        .unwrap();
    assert_eq!(router.msi_routes(), 2);
    sink.signal(0).unwrap();
    assert!(wait_irr(&vcpu, 0x41), "MSI vector 0x41 reached the LAPIC");
    assert!(!irr_has(&vcpu, 0x42));
    sink.set_route(1, None).unwrap();
    assert!(sink.signal(1).is_err(), "a removed route refuses signals");

    // Legacy: an irqfd on GSI 4 (COM1) through IOAPIC pin 4, with the
    // table that now holds MSI routes.
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
    unsafe { chip.chip.ioapic.redirtbl[4].bits = 0x34 };
    vm.set_irqchip(&chip).unwrap();
    let serial = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    vm.register_irqfd(&serial, 4).unwrap();
    serial.write(1).unwrap();
    assert!(wait_irr(&vcpu, 0x34), "IOAPIC pin 4 still delivers");

    // A second function gets the GSIs after the first's; dropping a sink
    // removes its routes.
    let other = router.sink("d1", 1).unwrap();
    assert_eq!(other.base_gsi(), super::msi::FIRST_MSI_GSI + 2);
    drop(sink);
    assert_eq!(router.msi_routes(), 0);
}
