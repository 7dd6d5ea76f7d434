//! The MCFG: where PCI Express configuration space (the ECAM window) is.

use super::table::Table;
use crate::cast;
use crate::devices::{ECAM_BASE, ECAM_SIZE};

/// The last bus number the ECAM window covers (1 MiB per bus).
const ECAM_LAST_BUS: u8 = cast::const_u8((ECAM_SIZE >> 20) - 1);

/// PCI Express memory-mapped configuration: segment 0, bus 0.
pub(super) fn mcfg() -> Vec<u8> {
    let mut t = Table::new(b"MCFG", 1);
    t.u64(0) // reserved
        .u64(ECAM_BASE)
        .u16(0) // segment
        .u8(0) // first bus
        .u8(ECAM_LAST_BUS)
        .u32(0);
    t.finish()
}
