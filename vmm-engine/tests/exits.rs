//! Exit reasons, serial, PCI, interrupts and hostile accesses with multi.rom.
mod common;
use common::*;
use std::time::Duration;
use vmm_engine::{ExitReason, VmState};

fn multi(name: &str, cmds: &str, extra: &[&str]) -> TestVm {
    let mut cfg = vec!["memory 64M"];
    cfg.extend_from_slice(extra);
    let mut t = TestVm::new(name, &cfg);
    t.bootrom(&guest("multi.rom"));
    t.send(cmds);
    t.run();
    t
}

#[test]
fn poweroff_via_pm1a() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("p", "p", &[]);
    assert_eq!(t.wait_exit(20), ExitReason::PowerOff);
    assert_eq!(t.drain(), "ready\n");
}

#[test]
fn reset_via_cf9_and_i8042_is_reboot() {
    if !kvm_or_skip() {
        return;
    }
    for c in ["r", "k"] {
        let t = multi("r", c, &[]);
        assert_eq!(t.wait_exit(20), ExitReason::Reboot, "{c}");
        assert!(t.vm.status().contains("exit=reboot\nstatus=0\n"));
    }
}

#[test]
fn cli_hlt_is_halt() {
    if !kvm_or_skip() {
        return;
    }
    let t = multi("h", "h", &[]);
    assert_eq!(t.wait_exit(20), ExitReason::Halt);
    assert!(t.vm.status().contains("status=2\n"));
}

#[test]
fn fault_with_empty_idt_is_triple_fault() {
    if !kvm_or_skip() {
        return;
    }
    let t = multi("t", "t", &[]);
    assert_eq!(t.wait_exit(20), ExitReason::TripleFault);
    assert!(t.vm.status().contains("exit=triple-fault\nstatus=3\n"));
}

#[test]
fn idle_guest_with_interrupts_on_is_not_halted() {
    if !kvm_or_skip() {
        return;
    }
    let t = multi("z", "z", &[]);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(t.vm.state(), VmState::Running);
    t.exec("force-poweroff").unwrap();
    assert_eq!(t.vm.state(), VmState::Exited(ExitReason::PowerOff));
}

#[test]
fn serial_echo_through_pipes() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi(
        "e",
        "ehello, echo 0123456789 abcdefghijklmnopqrstuvwxyz.",
        &[],
    );
    assert_eq!(t.wait_exit(30), ExitReason::PowerOff);
    assert_eq!(
        t.drain(),
        "ready\nhello, echo 0123456789 abcdefghijklmnopqrstuvwxyz\nbye\n"
    );
}

#[test]
fn serial_input_raises_irq4() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("i", "i", &[]);
    assert_eq!(t.read_until("irq ready\n", 20), "ready\nirq ready\n");
    // The guest now sleeps in HLT with IF=1: it must stay running.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(t.vm.state(), VmState::Running);
    t.send("ab.");
    assert_eq!(t.wait_exit(20), ExitReason::PowerOff);
    assert_eq!(t.drain(), "[a][b][.]\n");
}

#[test]
fn pci_bus_walk() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("c", "cp", &["device 31 lpc"]);
    assert_eq!(t.wait_exit(30), ExitReason::PowerOff);
    assert_eq!(
        t.drain(),
        "ready\n\
         pci 0:00.0 id 12751275 class 06000000\n\
         pci 0:1f.0 id 70008086 class 06010000\n\
         pci done\n"
    );
}

#[test]
fn power_button_command() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("w", "w", &[]);
    t.read_until("waiting for power button\n", 20);
    t.exec("poweroff").unwrap();
    assert_eq!(t.wait_exit(20), ExitReason::PowerOff);
    assert_eq!(t.drain(), "power button pressed\n");
}

#[test]
fn hostile_accesses_are_survived() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("x", "x", &[]);
    let r = t.wait_exit(30);
    assert_eq!(r, ExitReason::PowerOff, "{}", t.vm.status());
    assert_eq!(t.drain(), "ready\nsurvived\n");
}

#[test]
fn user_mode_port_loop_and_boot_timer() {
    if !kvm_or_skip() {
        return;
    }
    let t = multi("L", "bL", &[]);
    assert_eq!(t.wait_exit(30), ExitReason::PowerOff);
    assert!(t.vm.exits() >= 10_000, "{}", t.vm.status());
    let s = t.vm.status();
    assert!(s.contains("boot_time_us="), "{s}");
}

#[test]
fn force_commands_and_reinit() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("f", "l", &[]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(t.vm.state(), VmState::Running);
    assert_eq!(t.exec("memory 128M").unwrap_err().errno(), libc::EBUSY);
    t.exec("suspend").unwrap();
    assert_eq!(t.vm.state(), VmState::Exited(ExitReason::Suspend));
    assert!(t.vm.status().contains("exit=suspend\nstatus=5\n"));
    assert_eq!(t.exec("reset").unwrap_err().errno(), libc::EBUSY);
    // reinit: same VM and memory, guest starts again from the reset vector.
    t.exec("reinit").unwrap();
    assert_eq!(t.vm.state(), VmState::Configuring);
    t.drain();
    t.send("r");
    t.run();
    assert_eq!(t.read_until("ready\n", 20), "ready\n");
    assert_eq!(t.wait_exit(20), ExitReason::Reboot);
    t.exec("reinit").unwrap();
    t.send("z");
    t.run();
    t.read_until("ready\n", 20);
    t.exec("reset").unwrap();
    assert_eq!(t.vm.state(), VmState::Exited(ExitReason::Reboot));
}

#[test]
fn two_vcpus_run_and_halt() {
    if !kvm_or_skip() {
        return;
    }
    // The AP waits for INIT/SIPI and counts as stopped: cli;hlt on the BSP halts the VM.
    let t = multi("smp", "h", &["cpus 2"]);
    assert_eq!(t.wait_exit(20), ExitReason::Halt);
    assert!(t.vm.status().contains("cpus=2\n"));
}

#[test]
fn bad_bootroms_are_einval() {
    if !kvm_or_skip() {
        return;
    }
    let vm = vmm_engine::Vm::create("bad").unwrap();
    for size in [0usize, 100, 4097, (16 << 20) + 4096] {
        let mut fds = Fds::default();
        let n = fds.add(memfd_with(&vec![0u8; size]));
        let e = vm
            .execute(vmm_engine::Command::Bootrom(n), &mut fds)
            .unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL, "size {size}");
    }
    assert!(vm.segments().iter().all(|s| s.name != "bootrom"));
}

#[test]
fn unemulated_instruction_is_error_with_cause() {
    if !kvm_or_skip() {
        return;
    }
    let t = multi("n", "n", &[]);
    match t.wait_exit(20) {
        ExitReason::Error(cause) => {
            let s = t.vm.status();
            assert!(s.contains("exit=error\nstatus=4\ncause="), "{s}");
            assert!(cause.contains("KVM"), "{cause}");
        }
        // A KVM that emulates int3 delivers #BP through the empty IDT.
        other => assert_eq!(other, ExitReason::TripleFault),
    }
}

#[test]
fn aps_start_with_init_sipi_then_all_halt() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("s", "s", &["cpus 2"]);
    assert_eq!(t.wait_exit(30), ExitReason::Halt, "{}", t.vm.status());
    assert_eq!(t.drain(), "ready\nap started\n");
}

#[test]
fn destroy_while_output_pipe_is_full() {
    if !kvm_or_skip() {
        return;
    }
    // Nobody reads COM1: the vCPU blocks writing to the full pipe.
    let t = multi("y", "y", &[]);
    // Wait until output stalls (pipe full: 64 KiB, two exits per byte).
    let start = std::time::Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = t.vm.exits();
        if (now == last && now > 100_000) || start.elapsed() > Duration::from_secs(20) {
            break;
        }
        last = now;
    }
    let t0 = std::time::Instant::now();
    t.vm.destroy();
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "destroy took {:?}",
        t0.elapsed()
    );
    assert_eq!(t.vm.state(), VmState::Destroyed);
}

#[test]
fn detach_stops_the_guest_and_lets_go_of_descriptors() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = multi("d", "l", &[]);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(t.vm.state(), VmState::Running);
    t.vm.detach();
    match t.vm.state() {
        VmState::Exited(ExitReason::Error(cause)) => {
            assert!(cause.contains("went away"), "{cause}")
        }
        s => panic!("state after detach: {s:?}"),
    }
    assert!(t.vm.status().contains("status=4\n"));
    // The engine held the only other copy of COM1's write end: now the reader sees end-of-file.
    use std::io::Read;
    use std::os::fd::AsRawFd;
    // SAFETY: setting O_NONBLOCK on our own pipe end.
    unsafe { libc::fcntl(t.output.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match t.output.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(
                    t0.elapsed() < Duration::from_secs(2),
                    "COM1 output still held by the engine"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The VM itself stays and can be configured and run again.
    t.exec("reinit").unwrap();
    assert_eq!(t.vm.state(), VmState::Configuring);
}
