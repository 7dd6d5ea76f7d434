// scratch: run a bootrom for a while and dump registers
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
fn main() {
    let rom = std::fs::read(std::env::args().nth(1).unwrap()).unwrap();
    let input: Vec<u8> = std::env::args().nth(2).unwrap_or_default().into_bytes();
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = 64usize << 20;
    let ram = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem,
            3,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let romp = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            rom.len(),
            3,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    unsafe { std::ptr::copy_nonoverlapping(rom.as_ptr(), romp as *mut u8, rom.len()) };
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem as u64,
            userspace_addr: ram as u64,
        })
        .unwrap();
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: (1u64 << 32) - rom.len() as u64,
            memory_size: rom.len() as u64,
            userspace_addr: romp as u64,
        })
        .unwrap();
    }
    vm.create_irq_chip().unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm.get_supported_cpuid(256).unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut inp = input.iter();
    let mut pending: Option<u8> = None;
    for i in 0..200000 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(p, d)) => {
                if p == 0x3f8 {
                    print!("{}", d[0] as char)
                } else if p != 0x80 {
                    println!("out {p:#x} {d:?}");
                    if p == 0x404 {
                        break;
                    }
                }
            }
            Ok(VcpuExit::IoIn(p, d)) => {
                if p == 0x3fd {
                    if pending.is_none() {
                        pending = inp.next().copied();
                    }
                    d[0] = 0x60 | pending.is_some() as u8
                } else if p == 0x3f8 {
                    d[0] = pending.take().unwrap_or(0)
                } else {
                    d.fill(0xff)
                }
            }
            Ok(e) => {
                println!("exit {e:?} after {i}");
                break;
            }
            Err(e) => {
                println!("err {e}");
                break;
            }
        }
        if i % 50000 == 0 {}
    }
    let r = vcpu.get_regs().unwrap();
    let s = vcpu.get_sregs().unwrap();
    println!(
        "\nrip {:#x} rflags {:#x} cs {:?}\ncr0 {:#x} gdt {:?} idt {:?}",
        r.rip, r.rflags, s.cs, s.cr0, s.gdt, s.idt
    );
}
