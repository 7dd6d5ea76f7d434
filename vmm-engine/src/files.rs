//! What the engine asks of the descriptors it is handed.

use std::os::fd::{AsRawFd, OwnedFd};

/// Whether `file` was opened read-only. A disk whose descriptor is
/// read-only is a read-only disk even without `ro`: writes would fail anyway.
pub fn opened_read_only(file: &OwnedFd) -> bool {
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let fl = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDONLY
}
