//! What the threads of one run share: the stop flag and how stopping wakes
//! everyone (kicks, the watchdog's condition variable, an eventfd for the
//! serial readers), the vCPU threads' ids, and the halt watchdog's rounds.

use super::kick::{install_kick_handler, kick_signal};
use crate::devices::{Counters, Platform};
use crate::error::{Error, Result};
use crate::events::ExitReason;
use parking_lot::{Condvar, Mutex};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Everything the threads of one run share.
pub struct RunCtx {
    stop: AtomicBool,
    pub(super) tids: Mutex<Vec<Option<libc::pthread_t>>>,
    pub(super) round: AtomicU64,
    /// Per vCPU: the last watchdog round in which it was seen halted...
    pub(super) halted: Vec<AtomicU64>,
    /// ...and where (RIP).
    pub(super) halted_rip: Vec<AtomicU64>,
    pub platform: Arc<Platform>,
    pub(super) counters: Arc<Counters>,
    on_exit: Box<dyn Fn(ExitReason) + Send + Sync>,
    pub(super) wd_lock: Mutex<()>,
    pub(super) wd_cv: Condvar,
    /// Readable once the run stops: wakes the serial reader threads.
    stop_fd: OwnedFd,
}

impl RunCtx {
    pub fn new(
        vcpus: usize,
        platform: Arc<Platform>,
        counters: Arc<Counters>,
        on_exit: Box<dyn Fn(ExitReason) + Send + Sync>,
    ) -> Result<Arc<RunCtx>> {
        install_kick_handler();
        // SAFETY: plain syscall.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::io("eventfd", std::io::Error::last_os_error()));
        }
        Ok(Arc::new(RunCtx {
            stop: AtomicBool::new(false),
            tids: Mutex::new(vec![None; vcpus]),
            round: AtomicU64::new(0),
            halted: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            halted_rip: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            platform,
            counters,
            on_exit,
            wd_lock: Mutex::new(()),
            wd_cv: Condvar::new(),
            // SAFETY: efd was just created and is owned by nobody else.
            stop_fd: unsafe { OwnedFd::from_raw_fd(efd) },
        }))
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Descriptor that becomes readable when the run stops.
    pub fn stop_fd(&self) -> &OwnedFd {
        &self.stop_fd
    }

    /// The guest stopped for `reason`; the first caller wins and reports it.
    pub fn finish(&self, reason: ExitReason) {
        if !self.stop.swap(true, Ordering::AcqRel) {
            log::debug!("guest exit: {reason:?}");
            self.wake_all();
            (self.on_exit)(reason);
        }
    }

    /// Stop the run from outside. True if nobody had stopped it before.
    pub fn stop(&self) -> bool {
        let first = !self.stop.swap(true, Ordering::AcqRel);
        self.wake_all();
        first
    }

    fn wake_all(&self) {
        self.platform.set_stopping();
        self.kick_all();
        {
            let _g = self.wd_lock.lock();
            self.wd_cv.notify_all();
        }
        let one = 1u64;
        // SAFETY: writing 8 bytes to our eventfd.
        unsafe { libc::write(self.stop_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub(super) fn kick_all(&self) {
        for tid in self.tids.lock().iter().flatten() {
            // SAFETY: tid belongs to a vCPU thread that is not joined yet
            // (threads are joined only after the run is stopped and the
            // Runtime drops its handles, which happens after this returns).
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }
}
