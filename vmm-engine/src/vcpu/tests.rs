//! vCPU set-up and reset: topology fields, the MSRs a reset turns off, and
//! a real vCPU's steal-time and kvmclock areas after a reset.

use super::cpuid::bits_for;
use super::msrs::pv_reset_msrs;
use super::state::Vcpu;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

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
            v.fd.set_msrs(&Msrs::from_entries(&e).unwrap()) == Ok(1) && get_msr(&v.fd, i) == Some(d)
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
