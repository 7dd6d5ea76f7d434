//! What virtio device threads use of the host: the guest-RAM view, eventfds
//! and a readiness probe. A leaf: the transport, queues and interrupts build on it.

use crate::error::{Error, Result};
use crate::memory::Region;
use std::os::fd::{AsRawFd, RawFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as device threads see it: rust-vmm's view, the one the queue
/// crate reads the rings through, also serves every buffer (copies, and
/// host addresses for zero-copy I/O straight into guest pages).
pub struct Ram {
    pub mem: GuestMemoryMmap,
}

impl Ram {
    /// Build from the engine's RAM regions.
    ///
    /// The host mappings belong to the VM's `Control` and outlive every run:
    /// device threads are joined before the mappings can change.
    pub fn new(regions: &[Region]) -> Result<Ram> {
        Ok(Ram {
            mem: crate::memory::GuestMemory::new(regions.to_vec()).view()?,
        })
    }

    /// Guest range [gpa, gpa+len), if it lies entirely in one RAM region.
    /// Every guest-supplied buffer goes through here.
    fn slice(&self, gpa: u64, len: usize) -> Option<VolatileSlice<'_>> {
        self.mem.get_slice(GuestAddress(gpa), len).ok()
    }

    /// Host address of guest range [gpa, gpa+len), as [`Ram::slice`]
    /// checks it: valid as long as the VM's RAM mappings (every run).
    pub fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        Some(self.slice(gpa, len)?.ptr_guard_mut().as_ptr())
    }

    /// Copy guest bytes out (bounds-checked; the guest may change them
    /// meanwhile, which only changes what is copied).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        self.slice(gpa, buf.len()).map(|s| s.copy_to(buf)).is_some()
    }

    /// Copy bytes into the guest (bounds-checked).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        self.slice(gpa, data.len())
            .map(|s| s.copy_from(data))
            .is_some()
    }
}

/// The `events` (POLLIN, POLLOUT) `fd` is ready for right now, by poll(2)
/// with no wait: back ends on blocking descriptors shared with the client
/// (console pipes, a tap) are read or written only when this says they
/// will not block. EINTR or a failure counts as "nothing ready".
pub fn probe(fd: RawFd, events: i16) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    if r <= 0 {
        return 0;
    }
    p.revents
}

/// Read an eventfd's counter without blocking (it is only a wake-up).
pub fn drain(e: &EventFd) {
    let mut v = 0u64;
    // SAFETY: reading 8 bytes into v; the eventfd is non-blocking.
    unsafe { libc::read(e.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// A non-blocking eventfd.
pub fn eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| Error::io("eventfd", e))
}
