//! The platform as a guest sees it: emulation names, a UART that blocks on
//! a full pipe without stalling the other devices, and stop requests
//! coming back from the write that made them.

use super::*;

#[test]
fn emulation_names() {
    assert!(matches!(
        PciEmulation::parse("hostbridge"),
        Some(PciEmulation::HostBridge)
    ));
    assert!(matches!(
        PciEmulation::parse("lpc"),
        Some(PciEmulation::Lpc)
    ));
    assert!(PciEmulation::parse("virtio-blk").is_none());
}

/// A pipe whose write end is full: a blocking write on it waits.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both were just created and are owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let fd = w.as_raw_fd();
    // SAFETY: flag changes and writes on a descriptor we own.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK);
        let buf = [0u8; 4096];
        while libc::write(fd, buf.as_ptr().cast(), buf.len()) > 0 {}
        libc::fcntl(fd, libc::F_SETFL, 0);
    }
    (r, w)
}

#[test]
fn a_uart_blocked_on_a_full_pipe_does_not_stall_other_devices() {
    use std::os::fd::AsRawFd;
    use std::sync::mpsc;
    use std::time::Duration;
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("skipping: no /dev/kvm");
        return;
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let (r, w) = full_pipe();
    let cfg = PlatformConfig {
        serial_out: [Some(Arc::new(w)), None, None, None],
        pci: Vec::new(),
        ram: Vec::new(),
        rtc_utc: true,
        firmware: None,
    };
    let p = Arc::new(Platform::new(vm, cfg, Arc::default()).unwrap());
    // A vCPU writes COM1's THR and blocks in write(2), holding COM1.
    let (tx, blocked) = mpsc::channel();
    let p1 = p.clone();
    let writer = std::thread::spawn(move || {
        let r = p1.io_out(0x3f8, b"x");
        tx.send(()).unwrap();
        r
    });
    assert!(blocked.recv_timeout(Duration::from_millis(200)).is_err());
    // Another vCPU reaches PCI configuration space, COM2 and the RTC.
    let (tx, rx) = mpsc::channel();
    let p2 = p.clone();
    std::thread::spawn(move || {
        p2.io_out(0xcf8, &0x8000_0000u32.to_le_bytes());
        let mut id = [0u8; 4];
        p2.io_in(0xcfc, &mut id);
        let mut lsr = [0u8];
        p2.io_in(0x2f8 + 5, &mut lsr);
        p2.io_out(0x70, &[0x0a]);
        tx.send((u32::from_le_bytes(id), lsr[0])).unwrap();
    });
    let (id, lsr) = rx.recv_timeout(Duration::from_secs(5)).expect("stalled");
    assert_eq!(id, 0x1275_1275);
    assert_eq!(lsr & 0x60, 0x60, "COM2's transmitter is empty");
    // Room in the pipe lets the blocked write finish.
    let mut buf = [0u8; 4096];
    // SAFETY: reading into a local buffer from a descriptor we own.
    unsafe { libc::read(r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    blocked
        .recv_timeout(Duration::from_secs(5))
        .expect("write done");
    assert_eq!(writer.join().unwrap(), None);
}

#[test]
fn stop_requests_come_back_from_the_write_that_made_them() {
    let Ok(kvm) = kvm_ioctls::Kvm::new() else {
        eprintln!("skipping: no /dev/kvm");
        return;
    };
    let cfg = PlatformConfig {
        serial_out: [None, None, None, None],
        pci: Vec::new(),
        ram: Vec::new(),
        rtc_utc: true,
        firmware: None,
    };
    let vm = Arc::new(kvm.create_vm().unwrap());
    let p = Platform::new(vm, cfg, Arc::default()).unwrap();
    assert_eq!(p.io_out(RESET_PORT, &[0x2]), None);
    assert_eq!(p.io_out(RESET_PORT, &[0x6]), Some(ExitReason::Reboot));
    assert_eq!(p.io_out(0x64, &[0xfe]), Some(ExitReason::Reboot));
    // SLP_TYP 5 with SLP_EN: S5.
    let s5 = ((5u16 << 10) | (1 << 13)).to_le_bytes();
    assert_eq!(p.io_out(PM1A_CNT, &s5), Some(ExitReason::PowerOff));
    assert_eq!(p.io_out(0x80, &[1]), None);
}

/// Every IOAPIC pin but 0 (the 8259's ExtINT) has exactly one GSI; GSI 0,
/// the PIT, is on pin 2 and on the master 8259's pin 0; GSI 2 (the 8259
/// cascade) goes nowhere.
#[test]
fn legacy_routes_put_the_pit_on_pin_2() {
    use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER};
    let routes = super::legacy_routes();
    let targets: Vec<(u32, u32, u32)> = routes
        .iter()
        .map(|e| {
            // SAFETY: legacy_routes only makes irqchip entries.
            let (chip, pin) = unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
            (e.gsi, chip, pin)
        })
        .collect();
    for pin in 0..24u32 {
        let gsis: Vec<u32> = targets
            .iter()
            .filter(|&&(_, chip, p)| chip == KVM_IRQCHIP_IOAPIC && p == pin)
            .map(|&(g, _, _)| g)
            .collect();
        let want = match pin {
            0 => vec![],
            2 => vec![0],
            p => vec![p],
        };
        assert_eq!(gsis, want, "IOAPIC pin {pin}");
    }
    assert!(targets.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)));
    assert!(!targets.iter().any(|&(g, _, _)| g == 2));
    assert_eq!(super::PIT_IOAPIC_PIN, 2);
}
