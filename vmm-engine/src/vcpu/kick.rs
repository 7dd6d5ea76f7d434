//! Kicking vCPU threads out of KVM_RUN: a real-time signal whose handler
//! sets the thread's own `immediate_exit`, so a kick that lands just before
//! KVM_RUN is not lost.

use kvm_bindings::kvm_run;
use std::cell::Cell;
use std::sync::Once;

/// The real-time signal used to kick vCPU threads out of KVM_RUN. The host
/// process must not use it for anything else.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

thread_local! {
    // kvm_run of the vCPU this thread runs; the kick handler sets its
    // immediate_exit so a kick that lands just before KVM_RUN is not lost.
    pub(super) static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    let _ = KVM_RUN.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: p points at this thread's live kvm_run mapping; it is
            // cleared before the mapping can go away.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
        }
    });
}

pub(super) fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing an async-signal-safe handler (it only writes a byte).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            // No SA_RESTART: KVM_RUN must come back with EINTR.
            sa.sa_flags = 0;
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

pub(super) fn unblock_kick_signal() {
    // SAFETY: plain signal-mask manipulation of the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}
