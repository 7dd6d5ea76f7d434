//! What devices tell the VM: "stop the guest for this reason" (power-off,
//! reset) and, the other way, "the run is stopping" (output that would
//! block is dropped). A leaf module: devices hold a [`VmEvents`] handed to
//! them at construction and never import the VM.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Why a guest stopped, with bhyve's exit status: the protocol crate's
/// type, so that what the engine reports and what vmmfs serves are one.
pub use vmm_protocol::status::Exit as ExitReason;

/// Counters visible in status text, shared with the VM.
#[derive(Default, Debug)]
pub struct Counters {
    /// Total vCPU exits to user space.
    pub exits: AtomicU64,
    /// Microseconds from `run` to the first boot-timer write, plus one (0 = not marked).
    pub boot_time: AtomicU64,
    /// Port-I/O exits (each costs a round trip to user space; a boot should make few).
    pub io_exits: AtomicU64,
    /// `io_exits` when the boot timer was first written, plus one (0 = not marked).
    pub boot_io_exits: AtomicU64,
}

#[derive(Default)]
struct Inner {
    /// A stop request is waiting in `reason` (lock-free check per access).
    pending: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    /// The run is stopping.
    stopping: AtomicBool,
}

/// The events of one run, shared by the devices and the vCPU threads
/// (cheap to clone).
#[derive(Clone, Default)]
pub struct VmEvents {
    inner: Arc<Inner>,
}

impl VmEvents {
    pub fn new() -> VmEvents {
        VmEvents::default()
    }

    /// A device asks to stop the guest. The first request waiting wins; the
    /// vCPU whose access made it takes it with [`VmEvents::take_stop`].
    pub fn request_stop(&self, reason: ExitReason) {
        let mut r = self.inner.reason.lock();
        if r.is_none() {
            *r = Some(reason);
            self.inner.pending.store(true, Ordering::Release);
        }
    }

    /// The stop request waiting, if any (taken: the next call sees none).
    pub fn take_stop(&self) -> Option<ExitReason> {
        if !self.inner.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut r = self.inner.reason.lock();
        self.inner.pending.store(false, Ordering::Release);
        r.take()
    }

    /// The run is stopping: device output that would block gives up.
    /// Lock-free: a vCPU may hold a device lock while blocked in a write.
    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::Release);
    }

    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for VmEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmEvents")
            .field("stop", &*self.inner.reason.lock())
            .field("stopping", &self.stopping())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_stop_request_wins_and_is_taken_once() {
        let e = VmEvents::new();
        assert_eq!(e.take_stop(), None);
        let device = e.clone();
        device.request_stop(ExitReason::PowerOff);
        device.request_stop(ExitReason::Reboot);
        assert_eq!(e.take_stop(), Some(ExitReason::PowerOff));
        assert_eq!(e.take_stop(), None);
        device.request_stop(ExitReason::Reboot);
        assert_eq!(e.take_stop(), Some(ExitReason::Reboot));
    }

    #[test]
    fn stopping_is_seen_by_every_clone() {
        let e = VmEvents::new();
        let d = e.clone();
        assert!(!d.stopping());
        e.set_stopping();
        assert!(d.stopping());
    }
}
