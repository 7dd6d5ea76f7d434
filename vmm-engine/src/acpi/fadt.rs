//! The FADT (fixed hardware: the PM1a blocks, the PM timer, the reset
//! register, the SCI) and the FACS it points at.

use super::table::Table;
use crate::cast;
use crate::devices::rtc::CENTURY;
use crate::devices::{PM1A_CNT, PM1A_EVT, PM_TMR, RESET_PORT, SCI_IRQ};

/// The SCI's ISA IRQ in the FADT's 16-bit field.
const SCI_IRQ16: u16 = cast::const_u16(SCI_IRQ as u64);

/// FADT offsets of the FACS and DSDT pointers (32-bit, then 64-bit).
pub(super) const FADT_FACS32: usize = 36;
pub(super) const FADT_DSDT32: usize = 40;
pub(super) const FADT_FACS64: usize = 132;
pub(super) const FADT_DSDT64: usize = 140;

pub(super) fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut t = Table::new(b"FACP", 4);
    // The 32-bit pointer fields; ours are below 1 MiB, or offsets into the
    // loader blob. 0 (never taken) defers to the 64-bit fields below.
    t.u32(u32::try_from(facs).unwrap_or(0))
        .u32(u32::try_from(dsdt).unwrap_or(0))
        .u8(0) // reserved (INT_MODEL)
        .u8(0) // preferred PM profile: unspecified
        .u16(SCI_IRQ16)
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
        .u8(CENTURY) // CENTURY (CMOS index)
        // IAPC_BOOT_ARCH: legacy devices, and no 8042: Linux then skips the
        // PS/2 probe (2.5 s and "Can't read CTR" against a missing one).
        .u16(0x1)
        .u8(0)
        // Flags: WBINVD, PROC_C1, SLP_BUTTON (none), TMR_VAL_EXT, RESET_REG_SUP.
        .u32((1 << 0) | (1 << 2) | (1 << 5) | (1 << 8) | (1 << 10))
        .gas_io(8, RESET_PORT)
        .u8(0x6) // RESET_VALUE
        .u16(0) // ARM boot arch
        .u8(0) // FADT minor version
        .u64(facs)
        .u64(dsdt)
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

pub(super) fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}
