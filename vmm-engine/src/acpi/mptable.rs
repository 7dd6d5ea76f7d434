//! The Intel MP table (floating pointer and configuration table), for OSes
//! or command lines that do not take interrupt routing from ACPI.

use super::madt::{apic_ids, IOAPIC_ADDR, LAPIC_ADDR};
use super::table::checksum;
use crate::cast;
use crate::devices::{intx_route, PIT_IOAPIC_PIN, SCI_IRQ};

/// Intel MP specification 1.4 configuration table: processors, the PCI
/// and ISA buses, the I/O APIC, ISA and PCI interrupt routing (the same
/// lines as the MADT and the DSDT's _PRT), LINT0 ExtINT and LINT1 NMI.
pub(super) fn mp_config(cpus: u16) -> Vec<u8> {
    const PCI_BUS: u8 = 0;
    const ISA_BUS: u8 = 1;
    let cpus = apic_ids(cpus);
    let ioapic = cpus;
    let mut e: Vec<u8> = Vec::new();
    let mut count = 0u16;
    for i in 0..cpus {
        // Processor: APIC id, version, enabled (+ BSP), signature, features (FPU, APIC).
        e.extend_from_slice(&[0, i, 0x14, if i == 0 { 3 } else { 1 }]);
        e.extend_from_slice(&0x600u32.to_le_bytes());
        e.extend_from_slice(&0x201u32.to_le_bytes());
        e.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(PCI_BUS, b"PCI   "), (ISA_BUS, b"ISA   ")] {
        e.extend_from_slice(&[1, id]);
        e.extend_from_slice(name);
        count += 1;
    }
    e.extend_from_slice(&[2, ioapic, 0x11, 1]);
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    let mut intr = |kind: u8, flags: u16, bus: u8, irq: u8, pin: u8| {
        e.extend_from_slice(&[3, kind]);
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&[bus, irq, ioapic, pin]);
        count += 1;
    };
    // The 8259 behind pin 0; ISA IRQ 0 (PIT) on pin 2 (devices::legacy_routes),
    // the rest identity.
    const PIT_PIN: u8 = cast::const_u8(PIT_IOAPIC_PIN as u64);
    intr(3, 0, ISA_BUS, 0, 0);
    for irq in 0..16u8 {
        match irq {
            0 => intr(0, 0, ISA_BUS, 0, PIT_PIN),
            PIT_PIN => {}
            // SCI: level, active high (the MADT says the same).
            i if u32::from(i) == SCI_IRQ => intr(0, 0x0d, ISA_BUS, i, i),
            i => intr(0, 0, ISA_BUS, i, i),
        }
    }
    // PCI: source IRQ = slot << 2 | pin; level, active low by the bus's rules.
    for slot in 0..32u8 {
        for pin in 0..4u8 {
            // IOAPIC pins are below 24.
            let line = cast::low_u8(u64::from(intx_route(slot, pin).1));
            intr(0, 0, PCI_BUS, (slot << 2) | pin, line);
        }
    }
    for (kind, lint) in [(3u8, 0u8), (1, 1)] {
        e.extend_from_slice(&[4, kind, 0, 0, ISA_BUS, 0, 0xff, lint]);
        count += 1;
    }
    let mut v = Vec::with_capacity(44 + e.len());
    v.extend_from_slice(b"PCMP");
    // At most 255 processors, 2 buses, 1 I/O APIC, 17 + 128 interrupts and
    // 2 local interrupts of 8 or 20 bytes: well below 64 KiB.
    v.extend_from_slice(
        &u16::try_from(44 + e.len())
            .unwrap_or(u16::MAX)
            .to_le_bytes(),
    );
    v.push(4); // spec revision 1.4
    v.push(0); // checksum
    v.extend_from_slice(b"VMMFS   ");
    v.extend_from_slice(b"VMM-ENGINE  ");
    v.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&count.to_le_bytes());
    v.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    v.extend_from_slice(&[0; 4]); // no extended table
    v.extend_from_slice(&e);
    v[7] = checksum(&v);
    v
}

/// MP floating pointer structure pointing at the configuration table.
pub(super) fn mp_floating(config: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(b"_MP_");
    // A 32-bit physical address field; the table is below 1 MiB (0, never
    // taken, would mean "no table").
    v.extend_from_slice(&u32::try_from(config).unwrap_or(0).to_le_bytes());
    v.extend_from_slice(&[1, 4, 0]); // 16 bytes, revision 1.4, checksum
    v.extend_from_slice(&[0; 5]); // a configuration table is present; no IMCR
    v[10] = checksum(&v);
    v
}
