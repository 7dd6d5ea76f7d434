//! What virtio device threads use of the host: the guest-RAM view, eventfds
//! and a readiness probe. A leaf: the transport, queues and interrupts build on it.

use crate::cast;
use crate::error::{Error, Result};
use crate::memory::Region;
use std::os::fd::{AsRawFd, RawFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM as device threads see it: the rust-vmm view for the queue crate
/// plus the engine's regions for zero-copy I/O straight into guest pages.
pub struct Ram {
    pub mem: GuestMemoryMmap,
    regions: Vec<Region>,
}

impl Ram {
    /// Build from the engine's RAM regions.
    ///
    /// The host mappings belong to the VM's `Control` and outlive every run:
    /// device threads are joined before the mappings can change.
    pub fn new(regions: &[Region]) -> Result<Ram> {
        Ok(Ram {
            mem: crate::memory::GuestMemory::new(regions.to_vec()).view()?,
            regions: regions.to_vec(),
        })
    }

    /// Host address of guest range [gpa, gpa+len), if it lies entirely in one
    /// RAM region. Every guest-supplied buffer goes through here.
    pub fn host(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        let end = gpa.checked_add(len as u64)?;
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.gpa + r.len)?;
        Some((r.host + cast::usize_from(gpa - r.gpa)) as *mut u8)
    }

    /// Copy guest bytes out (bounds-checked).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> bool {
        match self.host(gpa, buf.len()) {
            Some(p) => {
                // SAFETY: host() checked the range lies in live guest RAM. The
                // guest may change it concurrently; we only copy bytes.
                unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
                true
            }
            None => false,
        }
    }

    /// Copy bytes into the guest (bounds-checked).
    pub fn write(&self, gpa: u64, data: &[u8]) -> bool {
        match self.host(gpa, data.len()) {
            Some(p) => {
                // SAFETY: as in read.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
                true
            }
            None => false,
        }
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
