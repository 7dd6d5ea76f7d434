//! Helpers for engine integration tests: real VMs on /dev/kvm with the
//! guests from guests/, serial through pipes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vmm_engine::{Command, ExitReason, Vm, VmState};

/// Directory with the built guests.
pub fn guest_path(name: &str) -> PathBuf {
    PathBuf::from(env!("VMM_GUESTS_DIR")).join(name)
}

pub fn guest(name: &str) -> Vec<u8> {
    std::fs::read(guest_path(name))
        .unwrap_or_else(|e| panic!("guest {name} missing (gcc/binutils needed): {e}"))
}

/// Skip here, fail in CI, when /dev/kvm is not usable.
pub fn kvm_or_skip() -> bool {
    test_support::kvm_or_skip("vmm-engine tests")
}

/// Hands over our own descriptors, keyed by the numbers used in commands.
pub use vmm_engine::command::OwnedFds as Fds;

pub use test_support::pipe;

pub fn memfd_with(data: &[u8]) -> OwnedFd {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::memfd_create(c"img".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: new descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = std::fs::File::from(fd);
    f.write_all(data).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.into()
}

/// A VM with COM1 on pipes.
pub struct TestVm {
    pub vm: Vm,
    pub input: Option<std::fs::File>,
    pub output: std::fs::File,
}

impl TestVm {
    pub fn new(name: &str, config: &[&str]) -> TestVm {
        let vm = Vm::create(name).expect("create VM");
        let (in_r, in_w) = pipe();
        let (out_r, out_w) = pipe();
        let mut fds = Fds::default();
        let a = fds.add(in_r);
        let b = fds.add(out_w);
        vm.execute(Command::parse(&format!("com1 {a} {b}")).unwrap(), &mut fds)
            .unwrap();
        for c in config {
            vm.execute(Command::parse(c).unwrap(), &mut Fds::default())
                .unwrap_or_else(|e| panic!("{c}: {e}"));
        }
        TestVm {
            vm,
            input: Some(std::fs::File::from(in_w)),
            output: std::fs::File::from(out_r),
        }
    }

    pub fn exec(&self, line: &str) -> vmm_engine::Result<()> {
        self.vm
            .execute(Command::parse(line).unwrap(), &mut Fds::default())
    }

    pub fn bootrom(&self, data: &[u8]) {
        let mut fds = Fds::default();
        let n = fds.add(memfd_with(data));
        self.vm
            .execute(Command::Bootrom(n), &mut fds)
            .expect("bootrom");
    }

    pub fn send(&mut self, s: &str) {
        self.input
            .as_mut()
            .unwrap()
            .write_all(s.as_bytes())
            .unwrap();
    }

    pub fn run(&self) {
        self.vm
            .execute(Command::Run, &mut Fds::default())
            .expect("run");
    }

    /// Wait for the guest to exit (panics after `secs`).
    pub fn wait_exit(&self, secs: u64) -> ExitReason {
        let t = Instant::now();
        loop {
            if let VmState::Exited(r) = self.vm.state() {
                return r;
            }
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "guest did not exit in {secs}s; status:\n{}",
                self.vm.status()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Everything the guest wrote to COM1 so far (the VM must have stopped,
    /// or output must end at `until`).
    pub fn read_until(&mut self, until: &str, secs: u64) -> String {
        let fd = self.output.as_raw_fd();
        // SAFETY: setting O_NONBLOCK on our own pipe end.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let t = Instant::now();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.output.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if String::from_utf8_lossy(&out).contains(until) {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(secs) {
                        panic!(
                            "timeout waiting for {until:?}; got {:?}; status:\n{}",
                            String::from_utf8_lossy(&out),
                            self.vm.status()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("{e}"),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// Output after the guest exited: drain what is in the pipe.
    pub fn drain(&mut self) -> String {
        let fd = self.output.as_raw_fd();
        // SAFETY: setting O_NONBLOCK on our own pipe end.
        unsafe { libc::fcntl(fd, libc::F_SETFL, libc::O_NONBLOCK) };
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.output.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// A VM booting vdev.elf with `test` on its command line and `devices`
/// (each a `device` line with `{}` replaced by the descriptor handed over).
pub fn vdev_vm(name: &str, test: &str, devices: Vec<(String, Vec<OwnedFd>)>) -> TestVm {
    vdev_vm_with(name, "128M", test, devices)
}

/// [`vdev_vm`] with `memory` of guest RAM.
pub fn vdev_vm_with(
    name: &str,
    memory: &str,
    test: &str,
    devices: Vec<(String, Vec<OwnedFd>)>,
) -> TestVm {
    let t = TestVm::new(name, &[&format!("memory {memory}")]);
    let mut fds = Fds::default();
    let k = fds.add(memfd_with(&guest("vdev.elf")));
    t.vm.execute(Command::Kernel(k), &mut fds).expect("kernel");
    t.exec(&format!("cmdline {test}")).unwrap();
    for (line, owned) in devices {
        let mut fds = Fds::default();
        let mut l = line.clone();
        for fd in owned {
            let n = fds.add(fd);
            l = l.replacen("{}", &n.to_string(), 1);
        }
        t.vm.execute(Command::parse(&l).unwrap(), &mut fds)
            .unwrap_or_else(|e| panic!("{l}: {e}"));
    }
    t
}

/// Wait for power-off; anything else fails with the guest's output.
pub fn powered_off(t: &mut TestVm, secs: u64) -> String {
    let r = t.wait_exit(secs);
    let out = t.drain();
    assert_eq!(r, ExitReason::PowerOff, "guest output: {out:?}");
    out
}
