//! The last few device accesses of a vCPU, for the log line of a run that
//! ends badly.
//!
//! On AMD, KVM re-initialises a vCPU that triple faulted before user space
//! sees the exit, so its registers say nothing about where the guest died.
//! What the guest last asked of its devices does: a triple fault right after
//! a device's DMA-completion register points at that device. Consecutive
//! accesses of the same kind to the same place (a polling loop) share one
//! entry with a count, so the trail reaches further back than [`LEN`] exits.

use std::fmt;

/// Entries kept.
pub(super) const LEN: usize = 16;

/// One device access as the vCPU made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Io {
        out: bool,
        port: u16,
        size: u8,
        /// More than one for string I/O.
        count: u32,
    },
    Mmio {
        write: bool,
        addr: u64,
        len: u8,
    },
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    access: Access,
    /// The first 8 bytes the caller passed, little-endian: the bytes moved,
    /// for string I/O only its first access's (`handle_io`).
    value: u64,
    times: u32,
}

/// A ring of the last [`LEN`] distinct accesses, oldest overwritten.
#[derive(Debug, Default)]
pub(super) struct Trail {
    ring: [Option<Entry>; LEN],
    /// Where the next new entry goes.
    next: usize,
}

impl Trail {
    /// Record `access`, which moved `data` (at most 8 bytes are kept).
    pub(super) fn record(&mut self, access: Access, data: &[u8]) {
        let mut v = [0u8; 8];
        let n = data.len().min(8);
        v[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(v);
        let last = (self.next + LEN - 1) % LEN;
        if let Some(e) = &mut self.ring[last] {
            if e.access == access {
                e.times = e.times.saturating_add(1);
                e.value = value;
                return;
            }
        }
        self.ring[self.next] = Some(Entry {
            access,
            value,
            times: 1,
        });
        self.next = (self.next + 1) % LEN;
    }
}

/// Oldest first, `; ` between entries.
impl fmt::Display for Trail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for i in 0..LEN {
            let Some(e) = &self.ring[(self.next + i) % LEN] else {
                continue;
            };
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            match e.access {
                Access::Io {
                    out,
                    port,
                    size,
                    count,
                } => {
                    let dir = if out { "out" } else { "in" };
                    write!(f, "{dir} {port:#x}/{size} {:#x}", e.value)?;
                    if count > 1 {
                        write!(f, " (x{count} string)")?;
                    }
                }
                Access::Mmio { write, addr, len } => {
                    let dir = if write { "write" } else { "read" };
                    write!(f, "mmio {dir} {addr:#x}/{len} {:#x}", e.value)?;
                }
            }
            if e.times > 1 {
                write!(f, " x{}", e.times)?;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(port: u16) -> Access {
        Access::Io {
            out: true,
            port,
            size: 1,
            count: 1,
        }
    }

    #[test]
    fn repeats_share_an_entry_and_the_oldest_go() {
        let mut t = Trail::default();
        assert_eq!(t.to_string(), "none");
        t.record(io(0x3f8), b"h");
        t.record(io(0x3f8), b"i");
        let rd = Access::Mmio {
            write: false,
            addr: 0xfebf_0000,
            len: 4,
        };
        t.record(rd, &0x1234_5678u32.to_le_bytes());
        assert_eq!(
            t.to_string(),
            "out 0x3f8/1 0x69 x2; mmio read 0xfebf0000/4 0x12345678"
        );
        // LEN more distinct accesses push both out.
        for p in 0..u16::try_from(LEN).unwrap() {
            t.record(io(0x100 + p), &[]);
        }
        let s = t.to_string();
        assert!(s.starts_with("out 0x100/1 0x0; "), "{s}");
        assert!(
            s.ends_with(&format!("; out {:#x}/1 0x0", 0x100 + LEN - 1)),
            "{s}"
        );
        assert_eq!(s.matches("; ").count(), LEN - 1);
        let string = Access::Io {
            out: false,
            port: 0x511,
            size: 1,
            count: 4096,
        };
        t.record(string, &[0xAB; 4096]);
        assert!(t
            .to_string()
            .ends_with("in 0x511/1 0xabababababababab (x4096 string)"));
    }
}
