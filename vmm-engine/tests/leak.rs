//! create/run/destroy many times: descriptors and threads must stay flat.
mod common;
use common::*;
use std::time::Duration;
use vmm_engine::{Command, ExitReason, Vm, VmState};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

fn cycle(i: usize, hello: &[u8], multi: &[u8]) {
    let vm = Vm::create(&format!("leak{i}")).unwrap();
    let (in_r, mut in_w) = {
        let (r, w) = pipe();
        (r, std::fs::File::from(w))
    };
    let (out_r, out_w) = pipe();
    let mut fds = Fds::default();
    let a = fds.add(in_r);
    let b = fds.add(out_w);
    vm.execute(Command::parse(&format!("com1 {a} {b}")).unwrap(), &mut fds)
        .unwrap();
    vm.execute(Command::parse("memory 32M").unwrap(), &mut fds)
        .unwrap();
    vm.execute(Command::parse("cpus 2").unwrap(), &mut fds)
        .unwrap();
    let rom = if i.is_multiple_of(2) { hello } else { multi };
    let n = fds.add(memfd_with(rom));
    vm.execute(Command::Bootrom(n), &mut fds).unwrap();
    vm.execute(Command::Run, &mut fds).unwrap();
    if i.is_multiple_of(2) {
        // Let it power off by itself.
        let t = std::time::Instant::now();
        while vm.state() == VmState::Running {
            assert!(t.elapsed() < Duration::from_secs(20));
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(vm.state(), VmState::Exited(ExitReason::PowerOff));
    } else {
        // Destroy it while it idles.
        use std::io::Write;
        in_w.write_all(b"z").unwrap();
    }
    vm.destroy();
    drop(out_r);
}

#[test]
fn no_leaks_over_many_cycles() {
    if !kvm_or_skip() {
        return;
    }
    let hello = guest("hello.rom");
    let multi = guest("multi.rom");
    // Warm up: one-time state (the /dev/kvm descriptor, CPUID cache, the
    // kick signal handler) is created by the first VM.
    for i in 0..4 {
        cycle(i, &hello, &multi);
    }
    let fds0 = count("/proc/self/fd");
    let threads0 = count("/proc/self/task");
    let cycles = std::env::var("LEAK_CYCLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    for i in 0..cycles {
        cycle(i, &hello, &multi);
    }
    // Threads are joined by destroy; give the kernel a moment to reap.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(count("/proc/self/fd"), fds0, "descriptor leak");
    assert_eq!(count("/proc/self/task"), threads0, "thread leak");
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let memfds = maps.lines().filter(|l| l.contains("memfd:")).count();
    assert_eq!(memfds, 0, "mappings left:\n{maps}");
}
