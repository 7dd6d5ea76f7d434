//! Firmware tables for the platform: ACPI (RSDP, XSDT, FADT + FACS, MADT,
//! DSDT), unless turned off an Intel MP table, and SMBIOS. The ACPI tables
//! describe the PM1a blocks the `pm` device emulates (an ACPI OS powers off
//! through port 0x404), every vCPU (Linux takes CPUs from the MADT: without
//! one only one CPU comes up), the PCI root bridge with its windows and INTx
//! routing (x86 Linux with ACPI scans PCI only below an ACPI root bridge),
//! the RTC and the COM ports. The MP table serves OSes or command lines that
//! do not use ACPI for interrupt routing (`pci=noacpi`, `acpi=off`). SMBIOS
//! names the machine as bhyve does, and its processors and memory.

mod bios;
mod dsdt;
mod fadt;
mod loader;
mod madt;
mod mcfg;
mod mptable;
mod root;
mod smbios;
mod table;
#[cfg(test)]
mod tests;

pub use bios::{write_tables, RSDP_ADDR, TABLES_END};
pub use loader::{loader_files, LoaderFiles, LOADER_FILE, RSDP_FILE, TABLES_FILE};
pub use madt::{IOAPIC_ADDR, LAPIC_ADDR};
pub use smbios::{fw_cfg_files as smbios_fw_cfg_files, vm_uuid};
