//! virtio devices end to end: the vdev.elf guest drives each device from
//! CPL3 and reports on COM1; the host checks the exact lines and the side
//! effects (disk contents, console bytes, TCP through passt).
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use vmm_engine::{Command, ExitReason, VmState};

/// A VM booting vdev.elf with `test` on its command line and `devices`
/// (each a `device` line with `{}` replaced by the descriptor handed over).
pub fn vdev_vm(name: &str, test: &str, devices: Vec<(String, Vec<OwnedFd>)>) -> TestVm {
    let t = TestVm::new(name, &["memory 128M"]);
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
fn powered_off(t: &mut TestVm, secs: u64) -> String {
    let r = t.wait_exit(secs);
    let out = t.drain();
    assert_eq!(r, ExitReason::PowerOff, "guest output: {out:?}");
    out
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

fn disk(len: usize) -> (std::fs::File, OwnedFd) {
    let path = std::env::temp_dir().join(format!(
        "vmm-engine-disk-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f.write_all(&pattern(len)).unwrap();
    let dup = f.try_clone().unwrap();
    (f, dup.into())
}

#[test]
fn virtio_blk_reads_pattern_and_writes_back() {
    if !kvm_or_skip() {
        return;
    }
    let (file, fd) = disk(2 << 20);
    let mut t = vdev_vm(
        "blk",
        "blk",
        vec![("device 3 virtio-blk fd={}".into(), vec![fd])],
    );
    t.run();
    let out = powered_off(&mut t, 60);
    assert_eq!(
        out,
        "vdev blk\nblk capacity 4096 rw\nblk read 1048576 bytes, 0 bad\nblk write status 0\n\
         blk id status 0 'vmmfs'\nblk flush status 0\nblk past end status 1\nmsix delivered\n"
    );
    use std::os::unix::fs::FileExt;
    let mut back = vec![0u8; 4096 + 512];
    file.read_exact_at(&mut back, 2048 * 512).unwrap();
    for (i, b) in back[..4096].iter().enumerate() {
        assert_eq!(*b, 0xa5 ^ (i as u8), "byte {i}");
    }
    // Untouched around it.
    assert_eq!(
        back[4096..],
        pattern(2 << 20)[2048 * 512 + 4096..2048 * 512 + 4608]
    );
}

#[test]
fn virtio_blk_read_only_refuses_writes() {
    if !kvm_or_skip() {
        return;
    }
    let (file, fd) = disk(64 << 10);
    let mut t = vdev_vm(
        "blkro",
        "blkro",
        vec![("device 3 virtio-blk fd={},ro".into(), vec![fd])],
    );
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev blkro\nblk capacity 128 ro\nblk write status 1\n"
    );
    use std::os::unix::fs::FileExt;
    let mut back = vec![0u8; 512];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, pattern(512));
}

#[test]
fn virtio_rnd_gives_entropy() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = vdev_vm("rng", "rng", vec![("device 5 virtio-rnd".into(), vec![])]);
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev rng\nrng 64 bytes, random, msix delivered\n"
    );
}

#[test]
fn virtio_console_both_ways() {
    if !kvm_or_skip() {
        return;
    }
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let mut t = vdev_vm(
        "con",
        "con",
        vec![("device 6 virtio-console fd={}:{}".into(), vec![in_r, out_w])],
    );
    t.run();
    let mut out = std::fs::File::from(out_r);
    let mut w = std::fs::File::from(in_w);
    let mut buf = vec![0u8; 26];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(buf, b"hello from virtio-console\n");
    w.write_all(b"line from the host\n").unwrap();
    let mut buf = vec![0u8; 25];
    out.read_exact(&mut buf).unwrap();
    assert_eq!(buf, b"echo: line from the host\n");
    assert_eq!(t.wait_exit(60), ExitReason::PowerOff);
    assert_eq!(t.drain(), "vdev con\nconsole done\n");
}

#[test]
fn hostile_driver_gets_needs_reset_and_host_survives() {
    if !kvm_or_skip() {
        return;
    }
    // A second VM runs alongside and must be unaffected.
    let mut other = vdev_vm(
        "bystander",
        "rng",
        vec![("device 5 virtio-rnd".into(), vec![])],
    );
    let mut t = vdev_vm(
        "hostile",
        "hostile",
        vec![("device 5 virtio-rnd".into(), vec![])],
    );
    t.run();
    other.run();
    assert_eq!(
        powered_off(&mut t, 120),
        "vdev hostile\n\
         buffer outside RAM: needs reset\n\
         oversized length: needs reset\n\
         chain loop: needs reset\n\
         next index past table: needs reset\n\
         head index past table: needs reset\n\
         avail index jump: needs reset\n\
         queue size 3: needs reset\n\
         rings outside RAM: needs reset\n\
         bad features refused\n\
         device works after reset\n\
         hostile done\n"
    );
    assert_eq!(
        powered_off(&mut other, 60),
        "vdev rng\nrng 64 bytes, random, msix delivered\n"
    );
}

#[test]
fn device_options_are_checked() {
    if !kvm_or_skip() {
        return;
    }
    let t = TestVm::new("opts", &[]);
    for (line, errno) in [
        ("device 3 virtio-blk", libc::EINVAL),
        ("device 3 virtio-blk fd=x", libc::EINVAL),
        ("device 3 virtio-blk fd=99,sectorsize=1000", libc::EINVAL),
        ("device 3 virtio-net fd=99", libc::EINVAL),
        (
            "device 3 virtio-net slirp,fd=99,mac=ff:ff:ff:ff:ff:ff",
            libc::EINVAL,
        ),
        ("device 3 virtio-console", libc::EINVAL),
        ("device 3 passthru 2/0/0", libc::EOPNOTSUPP),
        ("device 3 frobnicator", libc::EOPNOTSUPP),
    ] {
        let e = t.exec(line).unwrap_err();
        assert_eq!(e.errno(), errno, "{line}: {e}");
    }
    let e = t.exec("device 3 passthru 2/0/0").unwrap_err();
    assert!(e.to_string().contains("needs an IOMMU"), "{e}");
    // A descriptor that was not handed over.
    assert_eq!(
        t.exec("device 3 virtio-blk fd=12345").unwrap_err().errno(),
        libc::EBADF
    );
    assert_eq!(t.vm.state(), VmState::Configuring);
}

#[allow(dead_code)]
fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: plain syscall into a 2-int array.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            p.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    // SAFETY: new descriptors.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

#[allow(dead_code)]
fn unused() {
    let _ = Duration::from_secs(1);
    let _ = std::io::stdout().as_raw_fd();
}
