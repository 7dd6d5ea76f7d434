//! The MADT: every vCPU's local APIC, the I/O APIC, the ISA interrupt
//! overrides (PIT on GSI 2, the SCI level-triggered) and LINT1 as NMI.

use super::table::Table;
use crate::cast;
use crate::devices::{PIT_IOAPIC_PIN, SCI_IRQ};

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

/// The SCI's ISA IRQ in the MADT's 8-bit field.
const SCI_IRQ8: u8 = cast::const_u8(SCI_IRQ as u64);

/// APIC ids are 8 bits; the protocol caps `cpus` at 255, so the clamp
/// never changes a value.
pub(super) fn apic_ids(cpus: u16) -> u8 {
    u8::try_from(cpus).unwrap_or(u8::MAX)
}

pub(super) fn madt(cpus: u16) -> Vec<u8> {
    let cpus = apic_ids(cpus);
    let mut t = Table::new(b"APIC", 4);
    t.u32(LAPIC_ADDR).u32(1); // PCAT_COMPAT: there are 8259s
    for i in 0..cpus {
        // Processor local APIC: ACPI id, APIC id, enabled.
        t.u8(0).u8(8).u8(i).u8(i).u32(1);
    }
    // I/O APIC id = cpus (distinct from every LAPIC), GSI base 0.
    t.u8(1).u8(12).u8(cpus).u8(0).u32(IOAPIC_ADDR).u32(0);
    // ISA IRQ 0 is wired to GSI 2 (devices::legacy_routes).
    t.u8(2).u8(10).u8(0).u8(0).u32(PIT_IOAPIC_PIN).u16(0);
    // SCI: level triggered, active high (KVM's IOAPIC line semantics).
    t.u8(2).u8(10).u8(0).u8(SCI_IRQ8).u32(SCI_IRQ).u16(0x000d);
    // LINT1 of every processor is NMI.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}
