//! The table set in guest RAM for boots without firmware of ours to load
//! it: where each table goes in the BIOS area that OSes scan, and writing
//! them there. The ACPI and MP tables come first, the SMBIOS entry point
//! and structures after them.

use super::dsdt::dsdt;
use super::fadt::{facs, fadt};
use super::madt::madt;
use super::mcfg::mcfg;
use super::mptable::{mp_config, mp_floating};
use super::root::{rsdp, xsdt};
use super::smbios;
use crate::cast;
use crate::command::Topology;
use crate::error::Result;
use crate::memory::GuestMemory;

/// Where the RSDP goes: inside the 0xe0000..0xfffff BIOS area OSes scan.
pub const RSDP_ADDR: u64 = 0xf_0000;
/// MP floating pointer: in the BIOS area too, 16-byte aligned.
pub(super) const MPFP_ADDR: u64 = 0xf_0030;
pub(super) const XSDT_ADDR: u64 = 0xf_0040;
pub(super) const FADT_ADDR: u64 = 0xf_0100;
pub(super) const FACS_ADDR: u64 = 0xf_0200;
pub(super) const MADT_ADDR: u64 = 0xf_0400;
pub(super) const MPC_ADDR: u64 = 0xf_1000;
pub(super) const MCFG_ADDR: u64 = 0xf_0d00;
pub(super) const DSDT_ADDR: u64 = 0xf_3000;
/// End of the ACPI and MP tables (sizes for 255 vCPUs are checked in the tests).
pub(super) const ACPI_END: u64 = 0xf_6000;
/// The SMBIOS entry point: 16-byte aligned in 0xf0000..0xfffff, where
/// Linux's dmi_scan looks for its anchor.
pub(super) const SMBIOS_ADDR: u64 = ACPI_END;
/// The SMBIOS structure table, after the 31-byte entry point.
pub(super) const SMBIOS_TABLE_ADDR: u64 = SMBIOS_ADDR + 0x20;
/// The entry point's 32-bit field for it.
const SMBIOS_TABLE_ADDR32: u32 = cast::const_u32(SMBIOS_TABLE_ADDR);
/// End of the area the whole table set uses, SMBIOS included (sizes for
/// 255 vCPUs and 64 GiB are checked in the tests): zeroed before the
/// tables are written, and reserved in the memory map.
pub const TABLES_END: u64 = 0xf_c000;

// The SMBIOS entry point after the ACPI tables, on a 16-byte boundary of
// the area guests scan, before its structures; everything below 1 MiB.
const _: () = assert!(
    ACPI_END <= SMBIOS_ADDR
        && SMBIOS_ADDR >= 0xf_0000
        && SMBIOS_ADDR.is_multiple_of(16)
        && SMBIOS_ADDR + smbios::ENTRY_POINT_LEN as u64 <= SMBIOS_TABLE_ADDR
        && TABLES_END <= 0x10_0000
);

/// Write the whole table set for the vCPUs of `topology` into guest RAM;
/// the MP table unless `mptable` is false (bhyve -Y). The SMBIOS tables
/// describe `mem`, with `uuid` (RFC 4122 byte order) as the system's.
pub fn write_tables(
    mem: &GuestMemory,
    topology: &Topology,
    mptable: bool,
    coms: [bool; 4],
    uuid: [u8; 16],
) -> Result<()> {
    let cpus = topology.cpus;
    mem.zero(RSDP_ADDR, cast::usize_from(TABLES_END - RSDP_ADDR))?;
    if mptable {
        mem.write(MPC_ADDR, &mp_config(cpus))?;
        mem.write(MPFP_ADDR, &mp_floating(MPC_ADDR))?;
    }
    mem.write(FACS_ADDR, &facs())?;
    mem.write(DSDT_ADDR, &dsdt(coms))?;
    mem.write(FADT_ADDR, &fadt(FACS_ADDR, DSDT_ADDR))?;
    mem.write(MADT_ADDR, &madt(cpus))?;
    mem.write(MCFG_ADDR, &mcfg())?;
    mem.write(XSDT_ADDR, &xsdt(&[FADT_ADDR, MADT_ADDR, MCFG_ADDR]))?;
    mem.write(RSDP_ADDR, &rsdp(XSDT_ADDR))?;
    let table = smbios::for_guest(topology, mem, uuid);
    mem.write(SMBIOS_TABLE_ADDR, &table.bytes)?;
    mem.write(
        SMBIOS_ADDR,
        &smbios::entry_point(&table, SMBIOS_TABLE_ADDR32),
    )?;
    Ok(())
}
