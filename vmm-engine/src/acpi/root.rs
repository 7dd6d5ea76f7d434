//! The root of the table set: the XSDT listing the tables and the RSDP
//! pointing at it.

use super::table::{checksum, Table, OEM_ID};

pub(super) fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Table::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

/// RSDP offset of the XSDT address.
pub(super) const RSDP_XSDT: usize = 24;

pub(super) fn rsdp(xsdt: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0);
    v.extend_from_slice(OEM_ID);
    v.push(2); // revision: ACPI 2.0+, XSDT valid
    v.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&xsdt.to_le_bytes());
    v.extend_from_slice(&[0; 4]); // ext checksum + reserved
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}
