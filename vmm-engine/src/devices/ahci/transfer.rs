//! What passes between the HBA and a drive: the port's attachment, a
//! command's PRDT in guest RAM, and how the command ended (status, error,
//! bytes moved).

use crate::memory::GuestMemory;
use std::os::fd::OwnedFd;
use std::sync::Arc;

/// ATA error register: aborted command; ID not found (LBA out of range).
pub(super) const ERR_ABRT: u8 = 0x04;
pub(super) const ERR_IDNF: u8 = 0x10;
/// CD sector size.
pub const CD_BLOCK: u64 = 2048;

/// ATA status: ready, seek complete; error.
pub const ST_READY: u8 = 0x50;
pub const ST_ERR: u8 = 0x01;

/// What a port has attached.
#[derive(Debug, Clone)]
pub struct PortConfig {
    pub file: Arc<OwnedFd>,
    pub cd: bool,
    pub ro: bool,
    /// Logical and physical sector size of a disk (512 unless `sectorsize`).
    pub sector_size: (u32, u32),
    pub serial: String,
    /// Nominal media rotation rate (IDENTIFY word 217; 1 = solid state).
    pub nmrr: u16,
}

/// A command's physical region descriptor table, read entry by entry.
pub struct Prdt<'a> {
    pub mem: &'a GuestMemory,
    pub base: u64,
    pub entries: usize,
}

impl Prdt<'_> {
    /// Entry `n`: (guest address, byte count); None outside RAM.
    fn entry(&self, n: usize) -> Option<(u64, usize)> {
        let mut e = [0u8; 16];
        self.mem.read(self.base + 16 * n as u64, &mut e).ok()?;
        let dba = u64::from_le_bytes(e[0..8].try_into().expect("8 bytes")) & !1;
        let dbc =
            (u32::from_le_bytes(e[12..16].try_into().expect("4 bytes")) & 0x3f_ffff) as usize + 1;
        Some((dba, dbc))
    }

    /// Visit the guest buffers covering `len` bytes, in order: `f(addr,
    /// offset in the transfer, bytes)`. Stops at the table's end, a bad
    /// entry, or an error from `f`; returns the bytes visited.
    pub fn walk(&self, len: usize, f: &mut dyn FnMut(u64, usize, usize) -> bool) -> usize {
        let mut done = 0;
        for n in 0..self.entries {
            if done >= len {
                break;
            }
            let Some((addr, count)) = self.entry(n) else {
                break;
            };
            let take = count.min(len - done);
            if !f(addr, done, take) {
                break;
            }
            done += take;
        }
        done
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub status: u8,
    pub error: u8,
    /// Bytes moved (PRDBC).
    pub bytes: usize,
    /// A PIO data-in command (IDENTIFY): a PIO Setup FIS goes first.
    pub pio_in: bool,
}

impl Outcome {
    pub fn ok(bytes: usize) -> Outcome {
        Outcome {
            status: ST_READY,
            error: 0,
            bytes,
            pio_in: false,
        }
    }
    pub fn abort() -> Outcome {
        Outcome::error(ERR_ABRT)
    }
    pub(super) fn error(error: u8) -> Outcome {
        Outcome {
            status: ST_READY | ST_ERR,
            error,
            bytes: 0,
            pio_in: false,
        }
    }
}
