//! The MSRs a vCPU powers on with, and the paravirtual ones a reset must
//! turn off.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

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
pub(super) fn pv_reset_msrs() -> [(u32, u64); 7] {
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
pub(super) fn clear_pv_msrs(fd: &VcpuFd) {
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

pub(super) fn set_boot_msrs(fd: &VcpuFd) {
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
