//! The table set in guest RAM for boots without firmware of ours to load
//! it: where each table goes in the BIOS area that OSes scan, and writing
//! them there.

use super::dsdt::dsdt;
use super::fadt::{facs, fadt};
use super::madt::madt;
use super::mcfg::mcfg;
use super::mptable::{mp_config, mp_floating};
use super::root::{rsdp, xsdt};
use crate::cast;
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
/// End of the area the tables use (sizes for 255 vCPUs are checked in the tests).
pub const ACPI_END: u64 = 0xf_6000;

/// Write the whole table set for `cpus` vCPUs into guest RAM; the MP table
/// unless `mptable` is false (bhyve -Y).
pub fn write_tables(mem: &GuestMemory, cpus: u16, mptable: bool, coms: [bool; 4]) -> Result<()> {
    mem.zero(RSDP_ADDR, cast::usize_from(ACPI_END - RSDP_ADDR))?;
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
    Ok(())
}
