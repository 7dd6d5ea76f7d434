//! ACPI tables for the platform: RSDP, XSDT, FADT (+FACS), MADT and a minimal
//! DSDT carrying \_S5. They describe the PM1a blocks the `pm` device emulates,
//! so an ACPI OS powers off through port 0x404 and finds every vCPU (Linux
//! ignores MP tables: without a MADT only one CPU comes up).

use crate::devices::{PM1A_CNT, PM1A_EVT, PM_TMR, RESET_PORT, SCI_IRQ};
use crate::error::Result;
use crate::memory::GuestMemory;

/// Where the RSDP goes: inside the 0xe0000..0xfffff BIOS area OSes scan.
pub const RSDP_ADDR: u64 = 0xf_0000;
const XSDT_ADDR: u64 = 0xf_0040;
const FADT_ADDR: u64 = 0xf_0100;
const FACS_ADDR: u64 = 0xf_0200;
const DSDT_ADDR: u64 = 0xf_0300;
const MADT_ADDR: u64 = 0xf_0400;
/// End of the area the tables use (MADT for 255 vCPUs ends well before).
pub const ACPI_END: u64 = 0xf_1000;

pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

const OEM_ID: &[u8; 6] = b"VMMFS ";
const OEM_TABLE: &[u8; 8] = b"VMMENGIN";

fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A table under construction: standard 36-byte header, then the body.
struct Table(Vec<u8>);

impl Table {
    fn new(sig: &[u8; 4], revision: u8) -> Table {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(sig);
        v.extend_from_slice(&[0; 4]); // length, patched in finish
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE);
        v.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        v.extend_from_slice(b"VMME"); // creator id
        v.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Table(v)
    }
    fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Generic Address Structure for an I/O port register.
    fn gas_io(&mut self, bits: u8, port: u16) -> &mut Self {
        let access = match bits {
            8 => 1,
            16 => 2,
            _ => 3,
        };
        self.u8(1).u8(bits).u8(0).u8(access).u64(u64::from(port))
    }
    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

fn fadt() -> Vec<u8> {
    let mut t = Table::new(b"FACP", 4);
    t.u32(FACS_ADDR as u32)
        .u32(DSDT_ADDR as u32)
        .u8(0) // reserved (INT_MODEL)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ as u16)
        .u32(0) // SMI_CMD: none, ACPI is always enabled
        .u8(0)
        .u8(0)
        .u8(0) // S4BIOS_REQ
        .u8(0) // PSTATE_CNT
        .u32(u32::from(PM1A_EVT))
        .u32(0)
        .u32(u32::from(PM1A_CNT))
        .u32(0)
        .u32(0) // PM2
        .u32(u32::from(PM_TMR))
        .u32(0) // GPE0
        .u32(0) // GPE1
        .u8(4) // PM1_EVT_LEN
        .u8(2) // PM1_CNT_LEN
        .u8(0)
        .u8(4) // PM_TMR_LEN
        .u8(0)
        .u8(0)
        .u8(0) // GPE1_BASE
        .u8(0) // CST_CNT
        .u16(0xfff) // P_LVL2_LAT: C2 unsupported
        .u16(0xffff) // P_LVL3_LAT: C3 unsupported
        .u16(0)
        .u16(0)
        .u8(0)
        .u8(0)
        .u8(0)
        .u8(0) // DAY_ALRM, MON_ALRM
        .u8(0x32) // CENTURY (CMOS index)
        .u16(0x3) // IAPC_BOOT_ARCH: legacy devices, 8042
        .u8(0)
        // Flags: WBINVD, PROC_C1, SLP_BUTTON (none), TMR_VAL_EXT, RESET_REG_SUP.
        .u32((1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10))
        .gas_io(8, RESET_PORT)
        .u8(0x6) // RESET_VALUE
        .u16(0) // ARM boot arch
        .u8(0) // FADT minor version
        .u64(FACS_ADDR)
        .u64(DSDT_ADDR)
        .gas_io(32, PM1A_EVT)
        .bytes(&[0; 12])
        .gas_io(16, PM1A_CNT)
        .bytes(&[0; 12])
        .bytes(&[0; 12]) // PM2
        .gas_io(32, PM_TMR)
        .bytes(&[0; 12]) // GPE0
        .bytes(&[0; 12]); // GPE1
    t.finish()
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}

fn dsdt() -> Vec<u8> {
    let mut t = Table::new(b"DSDT", 2);
    // Name (_S5, Package (4) { 5, 5, 0, 0 }): SLP_TYP 5 for the PM1a control.
    t.bytes(&[
        0x08, b'_', b'S', b'5', b'_', 0x12, 0x08, 0x04, 0x0a, 0x05, 0x0a, 0x05, 0x00, 0x00,
    ]);
    t.finish()
}

fn madt(cpus: u16) -> Vec<u8> {
    let mut t = Table::new(b"APIC", 4);
    t.u32(LAPIC_ADDR).u32(1); // PCAT_COMPAT: there are 8259s
    for i in 0..cpus {
        // Processor local APIC: ACPI id, APIC id, enabled.
        t.u8(0).u8(8).u8(i as u8).u8(i as u8).u32(1);
    }
    // I/O APIC id = cpus (distinct from every LAPIC), GSI base 0.
    t.u8(1).u8(12).u8(cpus as u8).u8(0).u32(IOAPIC_ADDR).u32(0);
    // ISA IRQ 0 is wired to GSI 2.
    t.u8(2).u8(10).u8(0).u8(0).u32(2).u16(0);
    // SCI: level triggered, active high (KVM's IOAPIC line semantics).
    t.u8(2)
        .u8(10)
        .u8(0)
        .u8(SCI_IRQ as u8)
        .u32(SCI_IRQ)
        .u16(0x000d);
    // LINT1 of every processor is NMI.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

fn rsdp() -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0);
    v.extend_from_slice(OEM_ID);
    v.push(2); // revision: ACPI 2.0+, XSDT valid
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&XSDT_ADDR.to_le_bytes());
    v.extend_from_slice(&[0; 4]); // ext checksum + reserved
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}

/// Write the whole table set for `cpus` vCPUs into guest RAM.
pub fn write_tables(mem: &GuestMemory, cpus: u16) -> Result<()> {
    mem.zero(RSDP_ADDR, (ACPI_END - RSDP_ADDR) as usize)?;
    mem.write(FACS_ADDR, &facs())?;
    mem.write(DSDT_ADDR, &dsdt())?;
    mem.write(FADT_ADDR, &fadt())?;
    mem.write(MADT_ADDR, &madt(cpus))?;
    mem.write(XSDT_ADDR, &xsdt(&[FADT_ADDR, MADT_ADDR]))?;
    mem.write(RSDP_ADDR, &rsdp())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_checksum_and_fit() {
        assert_eq!(fadt().len(), 244);
        for t in [fadt(), dsdt(), madt(255), xsdt(&[1, 2])] {
            assert_eq!(sum(&t), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        let r = rsdp();
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        assert!(MADT_ADDR + madt(255).len() as u64 <= ACPI_END);
        assert!(XSDT_ADDR + xsdt(&[1, 2]).len() as u64 <= FADT_ADDR);
    }
}
