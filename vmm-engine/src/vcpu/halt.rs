//! Halt detection: with the in-kernel irqchip HLT never reaches user space,
//! so a watchdog kicks every vCPU out of KVM_RUN each period and each kicked
//! thread records whether its own vCPU sits halted with interrupts off.

use super::ctx::RunCtx;
use super::state::Vcpu;
use crate::events::ExitReason;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// How often idle vCPUs are checked for "halted with interrupts off".
pub const HALT_POLL: Duration = Duration::from_millis(50);
/// Consecutive all-halted observations (each vCPU at the same instruction)
/// needed before the VM is declared halted: one second. A guest with PV
/// spinlocks (KVM_FEATURE_PV_UNHALT) halts with IF=0 while it waits for a
/// kick, and the samples of different vCPUs are not simultaneous, so on a
/// slow host a few rounds can see every vCPU in such a wait; a real halt
/// stays put.
const HALT_ROUNDS: u32 = 20;

pub(super) fn check_halt(vcpu: &Vcpu, index: usize, ctx: &RunCtx, checked: &mut u64) {
    let round = ctx.round.load(Ordering::Acquire);
    if round > *checked {
        *checked = round;
        if let Some(rip) = vcpu.halted_at() {
            ctx.halted_rip[index].store(rip, Ordering::Relaxed);
            ctx.halted[index].store(round, Ordering::Release);
        }
    }
}

/// The halt watchdog: kicks every vCPU each period and declares the guest
/// halted when all of them were halted with IF=0, each at an unchanged
/// instruction, for HALT_ROUNDS rounds in a row.
pub fn watchdog_thread(ctx: Arc<RunCtx>) {
    let mut consecutive = 0;
    let mut rips: Vec<u64> = vec![u64::MAX; ctx.halted.len()];
    loop {
        {
            let mut g = ctx.wd_lock.lock();
            if !ctx.stopping() {
                ctx.wd_cv.wait_for(&mut g, HALT_POLL);
            }
        }
        if ctx.stopping() {
            return;
        }
        let round = ctx.round.load(Ordering::Acquire);
        if round > 0 {
            let all = ctx
                .halted
                .iter()
                .all(|h| h.load(Ordering::Acquire) == round);
            let now: Vec<u64> = ctx
                .halted_rip
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .collect();
            consecutive = match (all, now == rips) {
                (false, _) => 0,
                (true, true) => consecutive + 1,
                (true, false) => 1,
            };
            rips = now;
            if consecutive >= HALT_ROUNDS {
                log::warn!("halted: every vCPU in HLT with interrupts off, at {rips:#x?} (0: never started)");
                ctx.finish(ExitReason::Halt);
                return;
            }
        }
        ctx.round.store(round + 1, Ordering::Release);
        ctx.kick_all();
    }
}
