//! The floor the benchmarks compare against: what `Vm::create` + `destroy`
//! do, done by hand on /dev/kvm. Shared by the engine's and vmmfs's benchmarks
//! (vmmfs includes this file by path).

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use kvm_ioctls::Kvm;

/// KVM_CREATE_VM, `ram` bytes of memfd memory mapped and registered as guest
/// RAM at 0; then everything closed again.
pub fn bare_vm_with_ram(kvm: &Kvm, ram: u64) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: plain syscalls on a descriptor and a mapping this function owns.
    unsafe {
        let fd = libc::memfd_create(c"sysmem".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0 && libc::ftruncate(fd, ram as i64) == 0, "memfd");
        let p = libc::mmap(
            std::ptr::null_mut(),
            ram as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram,
            userspace_addr: p as u64,
        };
        vm.set_user_memory_region(region)
            .expect("KVM_SET_USER_MEMORY_REGION");
        drop(vm);
        libc::munmap(p, ram as usize);
        libc::close(fd);
    }
}
