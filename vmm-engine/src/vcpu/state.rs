//! A vCPU's register state: its power-on set-up (CPUID, MSRs, FPU, LAPIC),
//! the snapshot a reset restores, whether it sits halted for good, and a
//! one-line description for the log.

use super::msrs::{clear_pv_msrs, set_boot_msrs};
use crate::error::{Error, Result};
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_regs, kvm_sregs, kvm_vcpu_events, CpuId,
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;

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
    pub(super) fn halted_at(&self) -> Option<u64> {
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

/// A vCPU's registers in one line, for the log when a guest dies.
pub(super) fn describe_state(vcpu: &Vcpu) -> String {
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
