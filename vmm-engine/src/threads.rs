//! A hook every engine thread runs first, so that an embedder can confine
//! each kind of thread before it touches guest input (vmmfs's VM worker
//! installs a seccomp filter per kind). Without a hook nothing happens.

use std::sync::OnceLock;

/// What a thread does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs one vCPU: KVM_RUN and the exits it brings (port and MMIO
    /// emulation, which may start device threads).
    Vcpu,
    /// A virtio device's queue service (client disks, sockets, taps).
    Device,
    /// The halt watchdog and serial input readers.
    Helper,
}

static HOOK: OnceLock<fn(ThreadKind)> = OnceLock::new();

/// Set the hook once, before any VM runs; false if one was already set.
pub fn set_start_hook(f: fn(ThreadKind)) -> bool {
    HOOK.set(f).is_ok()
}

/// Called by each engine thread before anything else.
pub(crate) fn started(kind: ThreadKind) {
    if let Some(f) = HOOK.get() {
        f(kind);
    }
}
