//! The legacy part of KVM's GSI routing table. Its own module, below
//! everything that sets routes (the irqchip's creation and the MSI router
//! of virtio-pci), so that they share one table without importing each
//! other.

use crate::error::{Error, Result};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::VmFd;

/// IOAPIC pin of ISA IRQ 0, the PIT: pin 0 carries the 8259's ExtINT, as on
/// a PC. The MADT's interrupt source override and the MP table say so.
pub const PIT_IOAPIC_PIN: u32 = 2;

/// The legacy lines of KVM's GSI routing table: GSI n is ISA IRQ n on the
/// 8259s (0..15 but 2, their cascade) and IOAPIC pin n (0..23), except that
/// GSI 0, which KVM's in-kernel PIT raises, goes to IOAPIC pin 2.
///
/// KVM's own default table puts GSI 0 on pin 0. With ACPI, Linux never
/// notices: it runs on the local APIC timer, calibrated against the PM
/// timer. With `acpi=off` it checks that timer against PIT ticks on pin 2,
/// finds none, disables it and is left with no timer interrupt at all: the
/// boot then crawls on device interrupts and hangs in the first wait for a
/// timer. QEMU routes GSI 0 the same way. KVM_SET_GSI_ROUTING replaces the
/// whole table, so every table the engine sets starts with these.
pub fn legacy_routes() -> Vec<kvm_irq_routing_entry> {
    let route = |gsi: u32, chip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = chip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut v = Vec::with_capacity(40);
    for gsi in 0..24u32 {
        match gsi {
            0..=7 if gsi != 2 => v.push(route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi)),
            8..=15 => v.push(route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8)),
            _ => {}
        }
        match gsi {
            0 => v.push(route(0, KVM_IRQCHIP_IOAPIC, PIT_IOAPIC_PIN)),
            g if g == PIT_IOAPIC_PIN => {}
            g => v.push(route(g, KVM_IRQCHIP_IOAPIC, g)),
        }
    }
    v
}

/// Set the VM's GSI routing to [`legacy_routes`] plus `extra` (MSI routes).
pub fn set_gsi_routing(vm: &VmFd, extra: &[kvm_irq_routing_entry]) -> Result<()> {
    let mut v = legacy_routes();
    v.extend_from_slice(extra);
    let table = KvmIrqRouting::from_entries(&v).map_err(|e| {
        Error::io(
            "KVM_SET_GSI_ROUTING",
            std::io::Error::other(format!("{e:?}")),
        )
    })?;
    vm.set_gsi_routing(&table)
        .map_err(|e| Error::kvm("KVM_SET_GSI_ROUTING", e))
}
