//! The KVM_RUN loop of a vCPU thread: run, dispatch the exit (or the
//! error), until the run stops.

use super::ctx::RunCtx;
use super::exits::{describe_internal_error, handle_io, handle_mmio};
use super::halt::check_halt;
use super::kick::{unblock_kick_signal, KVM_RUN};
use super::state::{describe_state, Vcpu};
use super::trail::Trail;
use crate::events::ExitReason;
use kvm_bindings::{
    kvm_run, KVM_EXIT_DEBUG, KVM_EXIT_EXCEPTION, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN,
    KVM_EXIT_SYSTEM_EVENT,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What a vCPU thread keeps between exits.
struct Loop<'a> {
    index: usize,
    run_size: usize,
    ctx: &'a RunCtx,
    /// The halt watchdog's round this vCPU last answered.
    checked_round: u64,
    /// KVM_RUN's EAGAIN in a row.
    eagain: u32,
    /// The last device accesses, for a run that ends badly.
    trail: Trail,
}

impl Loop<'_> {
    /// One completed KVM_RUN: handle its exit; Some(reason) ends the run.
    fn exit(&mut self, vcpu: &mut Vcpu) -> Option<ExitReason> {
        let (index, ctx) = (self.index, self.ctx);
        self.eagain = 0;
        ctx.counters.exits.fetch_add(1, Ordering::Relaxed);
        let exit_reason = vcpu.fd.get_kvm_run().exit_reason;
        match exit_reason {
            KVM_EXIT_IO => {
                ctx.counters.io_exits.fetch_add(1, Ordering::Relaxed);
                return handle_io(&mut vcpu.fd, self.run_size, &ctx.platform, &mut self.trail);
            }
            KVM_EXIT_MMIO => handle_mmio(&mut vcpu.fd, &ctx.platform, &mut self.trail),
            KVM_EXIT_INTR => {
                vcpu.fd.set_kvm_immediate_exit(0);
                check_halt(vcpu, index, ctx, &mut self.checked_round);
            }
            KVM_EXIT_SHUTDOWN => {
                // Rare and timing-dependent in CI: say where. On AMD, KVM
                // has re-initialised the vCPU by now (its reset state), so
                // the device accesses before it are the better clue.
                log::warn!(
                    "triple fault on vCPU {index}: {}; its last device accesses: {}",
                    describe_state(vcpu),
                    self.trail
                );
                return Some(ExitReason::TripleFault);
            }
            KVM_EXIT_HLT => {
                // Only without an in-kernel irqchip; treat like a kick.
                check_halt(vcpu, index, ctx, &mut self.checked_round);
            }
            KVM_EXIT_INTERNAL_ERROR => {
                log::warn!("vCPU {index}'s last device accesses: {}", self.trail);
                let rip = vcpu.fd.get_regs().ok().map(|r| r.rip);
                return Some(ExitReason::Error(describe_internal_error(
                    vcpu.fd.get_kvm_run(),
                    rip,
                )));
            }
            KVM_EXIT_FAIL_ENTRY => {
                // SAFETY: exit_reason selects `fail_entry`.
                let f = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.fail_entry };
                return Some(ExitReason::Error(format!(
                    "VM entry failed: hardware reason {:#x} on cpu {}",
                    f.hardware_entry_failure_reason, f.cpu
                )));
            }
            KVM_EXIT_SYSTEM_EVENT => {
                // SAFETY: exit_reason selects `system_event`.
                let ty = unsafe { vcpu.fd.get_kvm_run().__bindgen_anon_1.system_event.type_ };
                return Some(match ty {
                    1 => ExitReason::PowerOff,
                    2 => ExitReason::Reboot,
                    t => ExitReason::Error(format!("system event {t}")),
                });
            }
            KVM_EXIT_EXCEPTION | KVM_EXIT_DEBUG => {
                return Some(ExitReason::Error(format!(
                    "unexpected exit {exit_reason} on vCPU {index}"
                )))
            }
            other => {
                return Some(ExitReason::Error(format!(
                    "unhandled KVM exit {other} on vCPU {index}"
                )))
            }
        }
        None
    }

    /// A KVM_RUN that failed with `errno`; Some(reason) ends the run.
    fn error(&mut self, vcpu: &mut Vcpu, errno: i32) -> Option<ExitReason> {
        match errno {
            libc::EINTR => {
                vcpu.fd.set_kvm_immediate_exit(0);
            }
            libc::EAGAIN => {
                // An AP's first KVM_RUN here may say "try again" until it is started.
                self.eagain += 1;
                if self.eagain > 16 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            e => {
                return Some(ExitReason::Error(format!(
                    "KVM_RUN on vCPU {}: {}",
                    self.index,
                    std::io::Error::from_raw_os_error(e)
                )))
            }
        }
        check_halt(vcpu, self.index, self.ctx, &mut self.checked_round);
        None
    }
}

/// Body of a vCPU thread: run until the run stops, then hand the vCPU back.
pub fn vcpu_thread(mut vcpu: Vcpu, index: usize, run_size: usize, ctx: Arc<RunCtx>) -> Vcpu {
    unblock_kick_signal();
    let run_ptr: *mut kvm_run = vcpu.fd.get_kvm_run();
    KVM_RUN.with(|p| p.set(run_ptr));
    // SAFETY: pthread_self has no preconditions.
    ctx.tids.lock()[index] = Some(unsafe { libc::pthread_self() });
    let mut l = Loop {
        index,
        run_size,
        ctx: &ctx,
        checked_round: 0,
        eagain: 0,
        trail: Trail::default(),
    };
    let reason = loop {
        if ctx.stopping() {
            break None;
        }
        // The exit is decoded from kvm_run here rather than through
        // kvm_ioctls' VcpuExit: its IoIn/IoOut hand over count*size bytes
        // without the access size, and string I/O (OVMF reads fw_cfg's data
        // port with rep insb) must be split into accesses of that size.
        let res = vcpu.fd.run().map(|_| ()).map_err(|e| e.errno());
        let end = match res {
            Ok(()) => l.exit(&mut vcpu),
            Err(errno) => l.error(&mut vcpu, errno),
        };
        if end.is_some() {
            break end;
        }
    };
    if let Some(r) = reason {
        ctx.finish(r);
    }
    // After this no kick can target this thread, so joining it is safe.
    ctx.tids.lock()[index] = None;
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    vcpu.fd.set_kvm_immediate_exit(0);
    vcpu
}
