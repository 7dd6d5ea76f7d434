//! What every ACPI table shares: the standard header with our OEM ids, a
//! little-endian body builder, and the checksum.

pub(super) const OEM_ID: &[u8; 6] = b"VMMFS ";
pub(super) const OEM_TABLE: &[u8; 8] = b"VMMENGIN";

/// A length or offset inside tables we build ourselves, for a 32-bit field.
/// They are a few KiB at most (everything must fit below ACPI_END or in the
/// fw_cfg blob), so the fallback is never taken.
pub(super) fn small_u32(v: usize) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

pub(super) fn checksum(b: &[u8]) -> u8 {
    0u8.wrapping_sub(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)))
}

/// A table under construction: standard 36-byte header, then the body.
pub(super) struct Table(Vec<u8>);

impl Table {
    pub(super) fn new(sig: &[u8; 4], revision: u8) -> Table {
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
    pub(super) fn u8(&mut self, x: u8) -> &mut Self {
        self.0.push(x);
        self
    }
    pub(super) fn u16(&mut self, x: u16) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn u32(&mut self, x: u32) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn u64(&mut self, x: u64) -> &mut Self {
        self.0.extend_from_slice(&x.to_le_bytes());
        self
    }
    pub(super) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// Generic Address Structure for an I/O port register.
    pub(super) fn gas_io(&mut self, bits: u8, port: u16) -> &mut Self {
        let access = match bits {
            8 => 1,
            16 => 2,
            _ => 3,
        };
        self.u8(1).u8(bits).u8(0).u8(access).u64(u64::from(port))
    }
    pub(super) fn finish(mut self) -> Vec<u8> {
        let len = small_u32(self.0.len());
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}
