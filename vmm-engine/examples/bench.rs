//! Engine overhead against bare KVM, printed side by side in one run:
//! - guest port-I/O exits/s (multi.rom's CPL3 `out` loop, native here) through
//!   the engine vs a bare KVM_RUN loop on the same guest;
//! - VM create+destroy time vs the same by hand (KVM_CREATE_VM, 256 MiB memfd RAM, close);
//! - engine RSS per idle VM beyond guest RAM.
//!
//! `cargo run --release -p vmm-engine --example bench [-- SECONDS]`

mod baseline;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};
use vmm_engine::command::OwnedFds;
use vmm_engine::{Command, Vm, VmState};

fn memfd_with(data: &[u8]) -> OwnedFd {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::memfd_create(c"rom".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fresh descriptor.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(data).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.into()
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: plain syscall into a 2-int array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: new descriptors.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// An engine VM running multi.rom with `cmd` on COM1 (output discarded).
fn engine_vm(rom: &[u8], cmd: &str, memory: &str) -> (Vm, std::fs::File) {
    let vm = Vm::create("bench").expect("create");
    let (in_r, in_w) = pipe();
    let devnull = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let out: OwnedFd = devnull.into();
    let rom_fd = memfd_with(rom);
    let (a, b, r) = (in_r.as_raw_fd(), out.as_raw_fd(), rom_fd.as_raw_fd());
    let mut fds = OwnedFds::from(vec![in_r, out, rom_fd]);
    for c in [
        format!("memory {memory}"),
        format!("com1 {a} {b}"),
        format!("bootrom {r}"),
    ] {
        vm.execute(Command::parse(&c).unwrap(), &mut fds).unwrap();
    }
    let mut w = std::fs::File::from(in_w);
    w.write_all(cmd.as_bytes()).unwrap();
    vm.execute(Command::Run, &mut fds).unwrap();
    (vm, w)
}

fn engine_exit_rate(rom: &[u8], secs: f64) -> f64 {
    let (vm, _w) = engine_vm(rom, "l", "64M");
    // Wait until the guest is in its loop (exits climbing fast).
    std::thread::sleep(Duration::from_millis(300));
    let (e0, t0) = (vm.exits(), Instant::now());
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (e1, dt) = (vm.exits(), t0.elapsed());
    assert_eq!(vm.state(), VmState::Running, "{}", vm.status());
    vm.destroy();
    (e1 - e0) as f64 / dt.as_secs_f64()
}

/// The same guest with nothing but KVM: one vCPU, in-kernel irqchip, a
/// match on the exit, COM1 answered inline.
fn bare_exit_rate(rom: &[u8], secs: f64) -> f64 {
    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let mem = 64usize << 20;
    // SAFETY: anonymous mappings that outlive the VM (leaked on purpose in this benchmark).
    let (ram, romp) = unsafe {
        let ram = libc::mmap(
            std::ptr::null_mut(),
            mem,
            3,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        let romp = libc::mmap(
            std::ptr::null_mut(),
            rom.len(),
            3,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        std::ptr::copy_nonoverlapping(rom.as_ptr(), romp as *mut u8, rom.len());
        (ram, romp)
    };
    // SAFETY: the mappings above stay alive for the VM's life.
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
    vcpu.set_cpuid2(
        &kvm.get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap(),
    )
    .unwrap();
    let mut cmd = Some(b'l');
    let mut looping = 0u64;
    let mut start = None;
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0x80, _)) => {
                looping += 1;
                if looping == 1000 {
                    start = Some(Instant::now());
                } else if looping.is_multiple_of(1024) {
                    if let Some(t) = start {
                        if t.elapsed().as_secs_f64() >= secs {
                            return (looping - 1000) as f64 / t.elapsed().as_secs_f64();
                        }
                    }
                }
            }
            Ok(VcpuExit::IoOut(..)) => {}
            Ok(VcpuExit::IoIn(0x3fd, d)) => d[0] = 0x60 | u8::from(cmd.is_some()),
            Ok(VcpuExit::IoIn(0x3f8, d)) => d[0] = cmd.take().unwrap_or(0),
            Ok(VcpuExit::IoIn(_, d)) => d.fill(0xff),
            Ok(e) => panic!("bare loop: unexpected exit {e:?}"),
            Err(e) => panic!("bare loop: {e}"),
        }
    }
}

fn engine_create_destroy(n: u32) -> Duration {
    let t = Instant::now();
    for _ in 0..n {
        Vm::create("cd").unwrap().destroy();
    }
    t.elapsed() / n
}

/// The same work as `Vm::create` + `destroy` by hand.
fn bare_create_destroy(n: u32) -> Duration {
    let kvm = Kvm::new().unwrap();
    let t = Instant::now();
    for _ in 0..n {
        baseline::bare_vm_with_ram(&kvm, 256 << 20);
    }
    t.elapsed() / n
}

/// (RssAnon + RssFile, RssShmem) of this process in KiB.
fn rss() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let get = |k: &str| -> u64 {
        s.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("RssAnon:") + get("RssFile:"), get("RssShmem:"))
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let dir = std::path::PathBuf::from(env!("VMM_GUESTS_DIR"));
    let rom = std::fs::read(dir.join("multi.rom")).expect("multi.rom (guests not built?)");

    let bare_rate = bare_exit_rate(&rom, secs);
    let eng_rate = engine_exit_rate(&rom, secs);
    let n = 200;
    let bare_cd = bare_create_destroy(n);
    let eng_cd = engine_create_destroy(n);

    let idle_vms = 16;
    let (anon0, shm0) = rss();
    let vms: Vec<_> = (0..idle_vms).map(|_| engine_vm(&rom, "z", "64M")).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (anon1, shm1) = rss();
    for (vm, _) in &vms {
        assert_eq!(vm.state(), VmState::Running, "{}", vm.status());
    }
    for (vm, _) in &vms {
        vm.destroy();
    }
    drop(vms);
    let per_vm_anon = anon1.saturating_sub(anon0) as f64 / idle_vms as f64;
    let per_vm_shm = shm1.saturating_sub(shm0) as f64 / idle_vms as f64;

    println!(
        "{:<40} {:>14} {:>14} {:>8}",
        "measure", "engine", "bare KVM", "ratio"
    );
    println!(
        "{:<40} {:>14.0} {:>14.0} {:>8.2}",
        "port-I/O exits/s (CPL3 out loop)",
        eng_rate,
        bare_rate,
        eng_rate / bare_rate
    );
    println!(
        "{:<40} {:>14.1} {:>14.1} {:>8.2}",
        "VM create+destroy (us)",
        eng_cd.as_secs_f64() * 1e6,
        bare_cd.as_secs_f64() * 1e6,
        eng_cd.as_secs_f64() / bare_cd.as_secs_f64()
    );
    println!(
        "{:<40} {:>14.0} {:>14} {:>8}",
        "RSS per idle VM beyond guest RAM (KiB)", per_vm_anon, "-", "-"
    );
    println!(
        "{:<40} {:>14.0} {:>14} {:>8}",
        "guest RAM touched per idle VM (KiB)", per_vm_shm, "-", "-"
    );
}
