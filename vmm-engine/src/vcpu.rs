//! vCPUs: creation-time set-up (CPUID with topology, MSRs, FPU, LAPIC), the
//! KVM_RUN loop of each vCPU thread, how threads are stopped (a real-time
//! signal plus `immediate_exit`), and halt detection.
//!
//! With the in-kernel irqchip HLT never reaches user space, so "the guest
//! halted" (every vCPU in HLT with interrupts disabled and nothing pending)
//! is found by a watchdog that kicks vCPUs out of KVM_RUN every 50 ms; each
//! kicked thread inspects its own MP state and RFLAGS.IF (vCPU ioctls from
//! other threads would block on the vCPU mutex while it runs).

use crate::cast;
use crate::command::Topology;
use crate::devices::{Counters, Platform};
use crate::error::{Error, Result};
use crate::events::ExitReason;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, CpuId, Msrs, KVM_EXIT_DEBUG, KVM_EXIT_EXCEPTION, KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;
use parking_lot::{Condvar, Mutex};
use std::cell::Cell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
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

/// The real-time signal used to kick vCPU threads out of KVM_RUN. The host
/// process must not use it for anything else.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

thread_local! {
    // kvm_run of the vCPU this thread runs; the kick handler sets its
    // immediate_exit so a kick that lands just before KVM_RUN is not lost.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
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

fn install_kick_handler() {
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

fn unblock_kick_signal() {
    // SAFETY: plain signal-mask manipulation of the calling thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// Ceiling of log2 for topology field widths.
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// CPUID for vCPU `id`: the host's supported set, with APIC ids, topology
/// and the hypervisor bit.
pub fn cpuid_for(base: &CpuId, id: u32, topo: &Topology) -> Result<CpuId> {
    let threads = u32::from(topo.threads.max(1));
    let cores = u32::from(topo.cores.max(1));
    let smt_bits = bits_for(threads);
    let core_bits = bits_for(cores);
    let per_pkg = threads * cores;
    let mut entries: Vec<_> = base.as_slice().to_vec();
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0xffff) | (id << 24) | (per_pkg.min(255) << 16);
                e.ecx |= 1 << 31; // hypervisor present
                if per_pkg > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is valid
                }
            }
            4 => {
                e.eax = (e.eax & 0x03ff_ffff) | ((cores.min(64) - 1) << 26);
            }
            0xb | 0x1f => {
                let (shift, count, level) = match e.index {
                    0 => (smt_bits, threads, 1),
                    1 => (smt_bits + core_bits, per_pkg, 2),
                    _ => (0, 0, 0),
                };
                e.eax = shift;
                e.ebx = count;
                e.ecx = (level << 8) | (e.index & 0xff);
                e.edx = id;
            }
            _ => {}
        }
    }
    CpuId::from_entries(&entries)
        .map_err(|_| Error::kvm("CPUID entries", std::io::Error::other("too many")))
}

/// MSRs a VMM sets at power-on (as Firecracker): syscall/sysenter state
/// zeroed, MTRRs on with write-back default, fast strings.
fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index: u32, data: u64| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(0x174, 0),             // SYSENTER_CS
        e(0x175, 0),             // SYSENTER_ESP
        e(0x176, 0),             // SYSENTER_EIP
        e(0xc000_0081, 0),       // STAR
        e(0xc000_0082, 0),       // LSTAR
        e(0xc000_0083, 0),       // CSTAR
        e(0xc000_0084, 0),       // SFMASK
        e(0xc000_0102, 0),       // KERNEL_GS_BASE
        e(0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, WB
        e(0x1a0, 1),             // MISC_ENABLE: fast strings
    ]
}

/// KVM's paravirtual MSRs that point KVM at guest memory, and their
/// power-on values. KVM clears them itself only when a vCPU takes an INIT
/// (an AP being started); a VMM-driven reset of the boot vCPU leaves them
/// set, and KVM then keeps writing the kvmclock page, the steal-time record
/// and PV EOI flags into the previous kernel's addresses, which the next
/// kernel has put to other use (QEMU clears them on reset too). The wall
/// clock MSRs are left alone: KVM writes that page once, when the MSR is
/// written, so there is nothing to turn off.
fn pv_reset_msrs() -> [(u32, u64); 7] {
    [
        (0x12, 0),        // MSR_KVM_SYSTEM_TIME (kvmclock, old)
        (0x4b56_4d01, 0), // MSR_KVM_SYSTEM_TIME_NEW (kvmclock)
        (0x4b56_4d02, 0), // MSR_KVM_ASYNC_PF_EN
        (0x4b56_4d06, 0), // MSR_KVM_ASYNC_PF_INT
        (0x4b56_4d03, 0), // MSR_KVM_STEAL_TIME
        (0x4b56_4d04, 0), // MSR_KVM_PV_EOI_EN
        (0x4b56_4d05, 1), // MSR_KVM_POLL_CONTROL: host polling allowed
    ]
}

/// Write each MSR on its own: a KVM without the paravirtual interface
/// refuses them, and KVM_SET_MSRS stops at the first refusal.
fn clear_pv_msrs(fd: &VcpuFd) {
    for (index, data) in pv_reset_msrs() {
        let e = [kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }];
        match Msrs::from_entries(&e).map(|m| fd.set_msrs(&m)) {
            Ok(Ok(1)) => {}
            other => log::debug!("reset MSR {index:#x}: {other:?}"),
        }
    }
}

/// Power-on state of a vCPU, restored by `reinit`.
pub struct Snapshot {
    regs: kvm_regs,
    pub sregs: kvm_sregs,
    fpu: kvm_fpu,
    lapic: kvm_lapic_state,
    mp_state: Option<kvm_mp_state>,
    events: Option<kvm_vcpu_events>,
}

/// A vCPU with its power-on state.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub id: u16,
    snap: Snapshot,
}

fn lapic_set_delivery(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = lapic.regs[reg + i].cast_unsigned();
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[reg + i] = x.cast_signed();
    }
}

impl Vcpu {
    /// Set up a freshly created vCPU and remember its power-on state.
    pub fn new(fd: VcpuFd, id: u16, cpuid: &CpuId) -> Result<Vcpu> {
        fd.set_cpuid2(cpuid)
            .map_err(|e| Error::kvm("KVM_SET_CPUID2", e))?;
        set_boot_msrs(&fd);
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fd.set_fpu(&fpu).map_err(|e| Error::kvm("KVM_SET_FPU", e))?;
        let mut lapic = fd.get_lapic().map_err(|e| Error::kvm("KVM_GET_LAPIC", e))?;
        // LINT0 takes the 8259's ExtINT, LINT1 is NMI: what firmware sets up.
        lapic_set_delivery(&mut lapic, 0x350, 7);
        lapic_set_delivery(&mut lapic, 0x360, 4);
        fd.set_lapic(&lapic)
            .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))?;
        let snap = Snapshot {
            regs: fd.get_regs().map_err(|e| Error::kvm("KVM_GET_REGS", e))?,
            sregs: fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?,
            fpu,
            lapic,
            mp_state: fd.get_mp_state().ok(),
            events: fd.get_vcpu_events().ok(),
        };
        Ok(Vcpu { fd, id, snap })
    }

    /// Back to the power-on state (reset vector for vCPU 0, wait-for-SIPI for APs).
    pub fn reset(&mut self) -> Result<()> {
        let s = &self.snap;
        self.fd
            .set_sregs(&s.sregs)
            .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        self.fd
            .set_regs(&s.regs)
            .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
        self.fd
            .set_fpu(&s.fpu)
            .map_err(|e| Error::kvm("KVM_SET_FPU", e))?;
        self.fd
            .set_lapic(&s.lapic)
            .map_err(|e| Error::kvm("KVM_SET_LAPIC", e))?;
        set_boot_msrs(&self.fd);
        clear_pv_msrs(&self.fd);
        if let Some(ev) = &s.events {
            if let Err(e) = self.fd.set_vcpu_events(ev) {
                log::debug!("KVM_SET_VCPU_EVENTS: {e}");
            }
        }
        if let Some(mp) = s.mp_state {
            if let Err(e) = self.fd.set_mp_state(mp) {
                log::debug!("KVM_SET_MP_STATE: {e}");
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        Ok(())
    }

    /// Power-on segment registers (base for building boot state).
    pub fn initial_sregs(&self) -> kvm_sregs {
        self.snap.sregs
    }

    /// Where this vCPU is stopped, if it looks stopped for good: halted with
    /// IF=0 and no NMI pending (its RIP), or never started (waiting for
    /// INIT/SIPI: 0).
    fn halted_at(&self) -> Option<u64> {
        let mp = self.fd.get_mp_state().ok()?;
        match mp.mp_state {
            KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => Some(0),
            KVM_MP_STATE_HALTED => {
                let regs = self.fd.get_regs().ok()?;
                let nmi_pending = self
                    .fd
                    .get_vcpu_events()
                    .map(|e| e.nmi.pending != 0 || e.nmi.injected != 0)
                    .unwrap_or(true);
                (regs.rflags & 0x200 == 0 && !nmi_pending).then_some(regs.rip)
            }
            _ => None,
        }
    }
}

fn set_boot_msrs(fd: &VcpuFd) {
    let entries = boot_msrs();
    match Msrs::from_entries(&entries) {
        Ok(msrs) => match fd.set_msrs(&msrs) {
            Ok(n) if n == entries.len() => {}
            Ok(n) => log::debug!("KVM_SET_MSRS set {n} of {}", entries.len()),
            Err(e) => log::debug!("KVM_SET_MSRS: {e}"),
        },
        Err(e) => log::debug!("MSR list: {e:?}"),
    }
}

/// Everything the threads of one run share.
pub struct RunCtx {
    stop: AtomicBool,
    tids: Mutex<Vec<Option<libc::pthread_t>>>,
    round: AtomicU64,
    /// Per vCPU: the last watchdog round in which it was seen halted...
    halted: Vec<AtomicU64>,
    /// ...and where (RIP).
    halted_rip: Vec<AtomicU64>,
    pub platform: Arc<Platform>,
    counters: Arc<Counters>,
    on_exit: Box<dyn Fn(ExitReason) + Send + Sync>,
    wd_lock: Mutex<()>,
    wd_cv: Condvar,
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

    fn kick_all(&self) {
        for tid in self.tids.lock().iter().flatten() {
            // SAFETY: tid belongs to a vCPU thread that is not joined yet
            // (threads are joined only after the run is stopped and the
            // Runtime drops its handles, which happens after this returns).
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }
}

fn describe_internal_error(run: &kvm_run, rip: Option<u64>) -> String {
    // SAFETY: exit_reason said KVM_EXIT_INTERNAL_ERROR: `internal` is the active field.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let n = (internal.ndata as usize).min(internal.data.len());
    let what = match internal.suberror {
        1 => "emulation failure",
        2 => "simultaneous exceptions",
        3 => "delivery event",
        _ => "internal error",
    };
    let mut s = format!("KVM internal error suberror {} ({what})", internal.suberror);
    if let Some(rip) = rip {
        s.push_str(&format!(" at rip {rip:#x}"));
    }
    if internal.suberror == 1 && n >= 2 && internal.data[0] & 1 != 0 {
        // KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: the failing
        // instruction follows the flags word.
        // SAFETY: suberror 1 with that flag selects the `emulation_failure` view.
        let ef = unsafe {
            run.__bindgen_anon_1
                .emulation_failure
                .__bindgen_anon_1
                .__bindgen_anon_1
        };
        let len = usize::from(ef.insn_size).min(ef.insn_bytes.len());
        if len > 0 {
            s.push_str(", instruction");
            for b in &ef.insn_bytes[..len] {
                s.push_str(&format!(" {b:02x}"));
            }
        }
    } else if n > 0 {
        s.push_str(", data");
        for w in &internal.data[..n] {
            s.push_str(&format!(" {w:#x}"));
        }
    }
    s
}

/// Handle a port I/O exit: one access of `size` bytes, `count` times (string I/O).
fn handle_io(vcpu: &mut VcpuFd, run_size: usize, platform: &Platform) -> Option<ExitReason> {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason said KVM_EXIT_IO: `io` is the active field.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let total = size.saturating_mul(io.count as usize);
    let off = cast::usize_from(io.data_offset);
    if size == 0 || off.checked_add(total).is_none_or(|e| e > run_size) {
        return Some(ExitReason::Error(format!(
            "malformed I/O exit (port {:#x} size {size} count {})",
            io.port, io.count
        )));
    }
    let base = run as *mut kvm_run as *mut u8;
    // SAFETY: [off, off+total) was checked to lie inside the kvm_run mapping
    // of run_size bytes, which the kernel shares with us for data exchange.
    let data = unsafe { std::slice::from_raw_parts_mut(base.add(off), total) };
    for chunk in data.chunks_mut(size) {
        if u32::from(io.direction) == KVM_EXIT_IO_OUT {
            if let Some(r) = platform.io_out(io.port, chunk) {
                return Some(r);
            }
        } else {
            platform.io_in(io.port, chunk);
        }
    }
    None
}

fn handle_mmio(vcpu: &mut VcpuFd, platform: &Platform) {
    let run = vcpu.get_kvm_run();
    // SAFETY: exit_reason said KVM_EXIT_MMIO: `mmio` is the active field.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    let len = (mmio.len as usize).min(mmio.data.len());
    if mmio.is_write != 0 {
        platform.mmio_write(mmio.phys_addr, &mmio.data[..len]);
    } else {
        platform.mmio_read(mmio.phys_addr, &mut mmio.data[..len]);
    }
}

/// What a vCPU thread keeps between exits.
struct Loop<'a> {
    index: usize,
    run_size: usize,
    ctx: &'a RunCtx,
    /// The halt watchdog's round this vCPU last answered.
    checked_round: u64,
    /// KVM_RUN's EAGAIN in a row.
    eagain: u32,
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
                return handle_io(&mut vcpu.fd, self.run_size, &ctx.platform);
            }
            KVM_EXIT_MMIO => handle_mmio(&mut vcpu.fd, &ctx.platform),
            KVM_EXIT_INTR => {
                vcpu.fd.set_kvm_immediate_exit(0);
                check_halt(vcpu, index, ctx, &mut self.checked_round);
            }
            KVM_EXIT_SHUTDOWN => {
                // Rare and timing-dependent in CI: say where. (On AMD, KVM
                // has re-initialised the vCPU by now: this is its reset state.)
                log::warn!("triple fault on vCPU {index}: {}", describe_state(vcpu));
                return Some(ExitReason::TripleFault);
            }
            KVM_EXIT_HLT => {
                // Only without an in-kernel irqchip; treat like a kick.
                check_halt(vcpu, index, ctx, &mut self.checked_round);
            }
            KVM_EXIT_INTERNAL_ERROR => {
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

/// A vCPU's registers in one line, for the log when a guest dies.
fn describe_state(vcpu: &Vcpu) -> String {
    let mut out = String::new();
    if let Ok(r) = vcpu.fd.get_regs() {
        out.push_str(&format!(
            "rip {:#x} rsp {:#x} rflags {:#x}",
            r.rip, r.rsp, r.rflags
        ));
    }
    if let Ok(s) = vcpu.fd.get_sregs() {
        out.push_str(&format!(
            " cs {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x}",
            s.cs.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit
        ));
    }
    if let Ok(e) = vcpu.fd.get_vcpu_events() {
        out.push_str(&format!(
            " exception {}/{} vector {} error {:#x}",
            e.exception.injected, e.exception.pending, e.exception.nr, e.exception.error_code
        ));
    }
    out
}

fn check_halt(vcpu: &Vcpu, index: usize, ctx: &RunCtx, checked: &mut u64) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(4), 2);
        assert_eq!(bits_for(5), 3);
    }

    #[test]
    fn reset_disables_pv_areas_but_not_the_wall_clock() {
        let m = pv_reset_msrs();
        let val = |i: u32| m.iter().find(|e| e.0 == i).map(|e| e.1);
        // kvmclock (both generations), async PF, steal time, PV EOI: off.
        for i in [0x12, 0x4b56_4d01, 0x4b56_4d02, 0x4b56_4d03, 0x4b56_4d04] {
            assert_eq!(val(i), Some(0), "MSR {i:#x}");
        }
        assert_eq!(val(0x4b56_4d05), Some(1), "poll control powers on as 1");
        // Writing a wall clock MSR makes KVM write at that address.
        assert_eq!(val(0x11), None);
        assert_eq!(val(0x4b56_4d00), None);
    }

    fn get_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        (fd.get_msrs(&mut m).ok()? == 1).then(|| m.as_slice()[0].data)
    }

    /// A guest that registered a steal-time area, then a reset: KVM must no
    /// longer write there (the next kernel owns that memory).
    #[test]
    fn reset_clears_steal_time_and_kvmclock() {
        let kvm = kvm_ioctls::Kvm::new().expect("KVM must be available for engine tests");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        let mut v = Vcpu::new(vm.create_vcpu(0).unwrap(), 0, &cpuid).unwrap();
        let armed: Vec<u32> = [(0x4b56_4d03u32, 0x10_0001u64), (0x4b56_4d01, 0x20_0001)]
            .into_iter()
            .filter(|&(i, d)| {
                let e = [kvm_msr_entry {
                    index: i,
                    data: d,
                    ..Default::default()
                }];
                v.fd.set_msrs(&Msrs::from_entries(&e).unwrap()) == Ok(1)
                    && get_msr(&v.fd, i) == Some(d)
            })
            .map(|(i, _)| i)
            .collect();
        if armed.is_empty() {
            eprintln!("this KVM has no steal-time or kvmclock MSRs: nothing to check");
            return;
        }
        v.reset().unwrap();
        for i in armed {
            assert_eq!(get_msr(&v.fd, i), Some(0), "MSR {i:#x} after reset");
        }
    }
}
