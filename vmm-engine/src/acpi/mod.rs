//! Firmware tables for the platform: ACPI (RSDP, XSDT, FADT + FACS, MADT,
//! DSDT) and, unless turned off, an Intel MP table. They describe the PM1a
//! blocks the `pm` device emulates (an ACPI OS powers off through port 0x404),
//! every vCPU (Linux takes CPUs from the MADT: without one only one CPU comes
//! up), the PCI root bridge with its windows and INTx routing (x86 Linux with
//! ACPI scans PCI only below an ACPI root bridge), the RTC and the COM ports.
//! The MP table serves OSes or command lines that do not use ACPI for
//! interrupt routing (`pci=noacpi`, `acpi=off`).

mod bios;
mod dsdt;
mod fadt;
mod loader;
mod madt;
mod mcfg;
mod mptable;
mod root;
mod table;
#[cfg(test)]
mod tests;

pub use bios::{write_tables, ACPI_END, RSDP_ADDR};
pub use loader::{loader_files, LoaderFiles, LOADER_FILE, RSDP_FILE, TABLES_FILE};
pub use madt::{IOAPIC_ADDR, LAPIC_ADDR};
