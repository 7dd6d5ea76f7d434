//! virtio-blk's I/O on the disk descriptor: preadv/pwritev straight into
//! guest pages (no bounce buffer), data sync, hole punching.

use super::super::queue::Desc;
use super::super::Ram;
use crate::cast;
use std::os::fd::RawFd;

/// Host iovecs of `descs` (zero-length ones skipped); None if one is not
/// in guest RAM.
pub fn iovecs(ram: &Ram, descs: &[Desc]) -> Option<Vec<libc::iovec>> {
    let mut v = Vec::with_capacity(descs.len());
    for d in descs {
        if d.len == 0 {
            continue;
        }
        let p = ram.host(d.addr, d.len as usize)?;
        v.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: d.len as usize,
        });
    }
    Some(v)
}

/// preadv/pwritev the whole of `iov` at `off`; short transfers continue.
pub fn rw_all(
    fd: RawFd,
    mut iov: Vec<libc::iovec>,
    mut off: u64,
    write: bool,
) -> std::io::Result<u64> {
    let mut total = 0u64;
    let mut i = 0;
    while i < iov.len() {
        let cnt = libc::c_int::try_from((iov.len() - i).min(1024)).unwrap_or(1024);
        // SAFETY: every iovec points into guest RAM checked by Ram::host and
        // stays valid while the device thread runs (RAM outlives the run).
        let r = unsafe {
            if write {
                libc::pwritev(fd, iov[i..].as_ptr(), cnt, cast::off_t(off))
            } else {
                libc::preadv(fd, iov[i..].as_ptr(), cnt, cast::off_t(off))
            }
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        let mut n = cast::count(r); // r > 0 here
        total += n as u64;
        off += n as u64;
        while n > 0 && i < iov.len() {
            if n >= iov[i].iov_len {
                n -= iov[i].iov_len;
                i += 1;
            } else {
                // SAFETY: advancing within the same buffer.
                iov[i].iov_base = unsafe { iov[i].iov_base.cast::<u8>().add(n) }.cast();
                iov[i].iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(total)
}

/// fdatasync(2) of the disk.
pub fn sync(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fdatasync on a descriptor the device owns.
    if unsafe { libc::fdatasync(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Make [off, off+len) a hole (reads then return zeros; the size stays).
pub fn punch_hole(fd: RawFd, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor the device owns, with offsets the
    // caller checked against the disk.
    let r = unsafe {
        libc::fallocate(
            fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            cast::off_t(off),
            cast::off_t(len),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
