//! vCPUs: creation-time set-up (CPUID with topology, MSRs, FPU, LAPIC), the
//! KVM_RUN loop of each vCPU thread, how threads are stopped (a real-time
//! signal plus `immediate_exit`), and halt detection.
//!
//! With the in-kernel irqchip HLT never reaches user space, so "the guest
//! halted" (every vCPU in HLT with interrupts disabled and nothing pending)
//! is found by a watchdog that kicks vCPUs out of KVM_RUN every 50 ms; each
//! kicked thread inspects its own MP state and RFLAGS.IF (vCPU ioctls from
//! other threads would block on the vCPU mutex while it runs).

mod cpuid;
mod ctx;
mod exits;
mod halt;
mod kick;
mod msrs;
mod run;
mod state;
#[cfg(test)]
mod tests;
mod trail;

pub use cpuid::cpuid_for;
pub use ctx::RunCtx;
pub use halt::{watchdog_thread, HALT_POLL};
pub use kick::kick_signal;
pub use run::vcpu_thread;
pub use state::{Snapshot, Vcpu};
