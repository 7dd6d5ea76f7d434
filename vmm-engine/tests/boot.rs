//! Real guests on /dev/kvm: bootrom at the reset vector, exit reasons.
mod common;
use common::*;
use vmm_engine::ExitReason;

#[test]
fn hello_bootrom_prints_and_powers_off() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = TestVm::new("hello", &["memory 64M"]);
    t.bootrom(&guest("hello.rom"));
    t.run();
    assert_eq!(t.wait_exit(20), ExitReason::PowerOff);
    assert_eq!(t.drain(), "hello from bootrom\n");
    let s = t.vm.status();
    assert!(s.contains("state=exited\n"), "{s}");
    assert!(s.contains("exit=poweroff\nstatus=1\n"), "{s}");
    assert!(t
        .vm
        .segments()
        .iter()
        .any(|s| s.name == "bootrom" && s.size == 65536));
}
