//! Getting a guest started: a bootrom at the reset vector, or a Linux kernel
//! entered directly in 64-bit mode through the x86 boot protocol.

pub mod linux;

use crate::error::{Error, Result};
use crate::memory::MAX_BOOTROM;
use std::io::Read;
use std::os::fd::OwnedFd;

/// Read a whole image from a descriptor, refusing more than `limit` bytes.
pub fn read_image(fd: OwnedFd, what: &str, limit: u64) -> Result<Vec<u8>> {
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    // Read one byte past the limit to tell "exactly limit" from "too big".
    (&mut f)
        .take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(format!("read {what}"), e))?;
    if buf.len() as u64 > limit {
        return Err(Error::InvalidCommand(format!(
            "{what} larger than {limit} bytes"
        )));
    }
    Ok(buf)
}

/// Check a bootrom image: non-empty, a multiple of 4 KiB, at most 16 MiB.
pub fn check_bootrom(img: &[u8]) -> Result<()> {
    let len = img.len() as u64;
    if len == 0 || !len.is_multiple_of(4096) || len > MAX_BOOTROM {
        return Err(Error::InvalidCommand(format!(
            "bootrom size {len} is not a multiple of 4 KiB up to 16 MiB"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootrom_sizes() {
        assert!(check_bootrom(&[]).is_err());
        assert!(check_bootrom(&[0; 4095]).is_err());
        assert!(check_bootrom(&[0; 4096]).is_ok());
        assert!(check_bootrom(&vec![0; 16 << 20]).is_ok());
        assert!(check_bootrom(&vec![0; (16 << 20) + 4096]).is_err());
    }
}
