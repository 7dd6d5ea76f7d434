//! virtio devices end to end: the vdev.elf guest drives each device from
//! CPL3 and reports on COM1; the host checks the exact lines and the side
//! effects (disk contents, console bytes, TCP through passt).

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(clippy::cast_possible_truncation)]
mod common;
use common::*;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;
use vmm_engine::{ExitReason, VmState};

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
         blk id status 0 'vmmfs'\nblk flush status 0\nblk discard status 0, reads zeros\nblk past end status 1\nmsix delivered\n"
    );
    use std::os::unix::fs::FileExt;
    let mut back = vec![0u8; 4096 + 512];
    file.read_exact_at(&mut back, 2048 * 512).unwrap();
    for (i, b) in back[..4096].iter().enumerate() {
        assert_eq!(*b, 0xa5 ^ (i as u8), "byte {i}");
    }
    let mut hole = vec![0xffu8; 4096];
    file.read_exact_at(&mut hole, 1024 * 512).unwrap();
    assert!(hole.iter().all(|b| *b == 0), "discarded range not zero");
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
         indirect descriptor: needs reset\n\
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

/// passt on one end of a socketpair (QEMU stream framing), as bhyve's slirp
/// back end starts it; killed on drop.
pub struct Passt(std::process::Child);

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn passt(extra: &[&str]) -> Option<(OwnedFd, Passt)> {
    use std::os::unix::process::CommandExt;
    if std::process::Command::new("passt")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipping: passt not installed");
        return None;
    }
    let (ours, theirs) = socketpair();
    let raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new("passt");
    if std::env::var_os("PASST_DEBUG").is_none() {
        cmd.arg("-q");
    }
    cmd.args(["-f", "-1", "-F", "3"])
        .args(["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2"])
        .args(["--dns-forward", "10.0.2.3"])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if std::env::var_os("PASST_DEBUG").is_some() {
        cmd.args(["-d", "--trace"])
            .stderr(std::process::Stdio::inherit());
    }
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0);
            } else if libc::dup2(raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn passt");
    drop(theirs);
    Some((ours, Passt(child)))
}

pub fn free_port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

#[test]
fn virtio_net_slirp_dhcp_arp_and_hostfwd_tcp() {
    if !kvm_or_skip() {
        return;
    }
    let port = free_port(false);
    let fwd = format!("127.0.0.1/{port}:22");
    // As bhyve starts it without `open`: outbound sockets on 127.0.0.1.
    let Some((sock, _passt)) = passt(&["-t", &fwd, "-u", "none", "-o", "127.0.0.1"]) else {
        return;
    };
    let mut t = vdev_vm(
        "net",
        "net",
        vec![(
            "device 4 virtio-net slirp,fd={},mac=52:54:00:12:34:56".into(),
            vec![sock],
        )],
    );
    t.run();
    let mut out = t.read_until("tcp listening\n", 60);
    let mut c = None;
    for _ in 0..100 {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                c = Some(s);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let mut c = c.expect("connect to the hostfwd port");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"hello guest\n").unwrap();
    let mut reply = vec![0u8; 18];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(reply, b"pong: hello guest\n");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    out.push_str(&powered_off(&mut t, 60));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 8, "{out}");
    assert_eq!(
        lines[..3],
        ["vdev net", "net mtu 65520", "dhcp offer 10.0.2.15"]
    );
    assert!(lines[3].starts_with("arp gateway is-at "), "{out}");
    assert_eq!(lines[3].len(), "arp gateway is-at ".len() + 17);
    assert_eq!(
        lines[4..],
        ["tcp listening", "tcp syn", "tcp closed", "msix delivered"]
    );
}

/// A tap device in a private network namespace of this test thread
/// (root only): the host side is 10.0.2.2/24, the guest 10.0.2.15.
fn tap_in_new_netns() -> Option<OwnedFd> {
    // SAFETY: unshare affects only this thread's network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "skipping: no network namespace: {}",
            std::io::Error::last_os_error()
        );
        return None;
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .ok()?;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..6].copy_from_slice(b"vtap0\0");
    // SAFETY: TUNSETIFF reads and writes a struct ifreq we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF as _, &mut req as *mut IfReq) };
    if r != 0 {
        eprintln!("skipping: TUNSETIFF: {}", std::io::Error::last_os_error());
        return None;
    }
    for args in [
        &["link", "set", "lo", "up"][..],
        &["addr", "add", "10.0.2.2/24", "dev", "vtap0"],
        &["link", "set", "vtap0", "up"],
    ] {
        let ok = std::process::Command::new("ip")
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("skipping: ip {args:?} failed");
            return None;
        }
    }
    Some(f.into())
}

#[test]
fn virtio_net_tap_tcp_from_the_host_stack() {
    if !kvm_or_skip() {
        return;
    }
    // Its own thread: the network namespace change must not outlive the test.
    std::thread::spawn(tap_tcp).join().unwrap();
}

fn tap_tcp() {
    let Some(tap) = tap_in_new_netns() else {
        return;
    };
    let mut t = vdev_vm(
        "nettap",
        "nettap",
        vec![("device 4 virtio-net tap,fd={}".into(), vec![tap])],
    );
    t.run();
    let mut out = t.read_until("tcp listening\n", 60);
    let addr = "10.0.2.15:22".parse().unwrap();
    let mut c = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .expect("connect to the guest over the tap");
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(b"over tap\n").unwrap();
    let mut reply = vec![0u8; 15];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(reply, b"pong: over tap\n");
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = c.read_to_end(&mut rest);
    out.push_str(&powered_off(&mut t, 60));
    assert_eq!(
        out,
        "vdev nettap\nnet mtu 0\ntcp listening\ntcp syn\ntcp closed\nmsix delivered\n"
    );
}

#[test]
fn virtio_blk_bench_guest_reads_whole_disk() {
    if !kvm_or_skip() {
        return;
    }
    let (_file, fd) = disk(4 << 20);
    let mut t = vdev_vm(
        "blkbench",
        "blkbench",
        vec![("device 3 virtio-blk fd={},ro".into(), vec![fd])],
    );
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev blkbench\nbench start\nbench done 4194304\n"
    );
}

#[test]
fn virtio_intx_through_the_ioapic_without_msix() {
    if !kvm_or_skip() {
        return;
    }
    let mut t = vdev_vm(
        "intx",
        "rngintx",
        vec![("device 5 virtio-rnd".into(), vec![])],
    );
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev rngintx\nintx pin 1 line ok, rng 32 bytes, intx delivered\n"
    );
}

#[test]
fn several_devices_and_reinit_between_runs() {
    if !kvm_or_skip() {
        return;
    }
    let (file, fd) = disk(2 << 20);
    let (in_r, _in_w) = pipe();
    let (_out_r, out_w) = pipe();
    let mut t = vdev_vm(
        "multi",
        "rng",
        vec![
            ("device 3 virtio-blk fd={}".into(), vec![fd]),
            ("device 4 virtio-console fd={}:{}".into(), vec![in_r, out_w]),
            ("device 5 virtio-rnd".into(), vec![]),
        ],
    );
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev rng\nrng 64 bytes, random, msix delivered\n"
    );
    // Same devices, next run: fresh device state, the disk's descriptor kept.
    t.exec("reinit").unwrap();
    t.exec("cmdline blk").unwrap();
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev blk\nblk capacity 4096 rw\nblk read 1048576 bytes, 0 bad\nblk write status 0\n\
         blk id status 0 'vmmfs'\nblk flush status 0\nblk discard status 0, reads zeros\nblk past end status 1\nmsix delivered\n"
    );
    use std::os::unix::fs::FileExt;
    let mut back = [0u8; 4];
    file.read_exact_at(&mut back, 2048 * 512).unwrap();
    assert_eq!(back, [0xa5, 0xa4, 0xa7, 0xa6]);
    // And once more after the guest reset itself.
    t.exec("reinit").unwrap();
    t.exec("cmdline rng").unwrap();
    t.run();
    assert_eq!(
        powered_off(&mut t, 60),
        "vdev rng\nrng 64 bytes, random, msix delivered\n"
    );
    t.vm.destroy();
}

#[test]
fn destroy_while_devices_are_live() {
    if !kvm_or_skip() {
        return;
    }
    let Some((sock, mut passt)) = passt(&["-t", "none", "-u", "none"]) else {
        return;
    };
    let (in_r, _in_w) = pipe();
    let (_out_r, out_w) = pipe();
    let mut t = vdev_vm(
        "live",
        "net",
        vec![
            ("device 4 virtio-net slirp,fd={}".into(), vec![sock]),
            ("device 5 virtio-console fd={}:{}".into(), vec![in_r, out_w]),
        ],
    );
    t.run();
    t.read_until("tcp listening\n", 60);
    let start = std::time::Instant::now();
    t.vm.destroy();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(t.vm.state(), VmState::Destroyed);
    // The VM let go of the socket: passt (one-off) sees it close and exits.
    let mut gone = false;
    for _ in 0..300 {
        if passt.0.try_wait().unwrap().is_some() {
            gone = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(gone, "passt still running after destroy");
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[test]
fn no_descriptor_or_thread_leaks_with_devices() {
    if !kvm_or_skip() {
        return;
    }
    let cycle = |i: usize| {
        let (_file, fd) = disk(64 << 10);
        let mut t = vdev_vm(
            &format!("leak{i}"),
            "rng",
            vec![
                ("device 3 virtio-blk fd={}".into(), vec![fd]),
                ("device 5 virtio-rnd".into(), vec![]),
            ],
        );
        t.run();
        assert_eq!(
            powered_off(&mut t, 60),
            "vdev rng\nrng 64 bytes, random, msix delivered\n"
        );
        t.vm.destroy();
    };
    // Other tests run in parallel threads of this process: compare the
    // trend over many cycles, not exact counts.
    cycle(0);
    let (fds0, tasks0) = (count("/proc/self/fd"), count("/proc/self/task"));
    for i in 1..=30 {
        cycle(i);
    }
    let (fds1, tasks1) = (count("/proc/self/fd"), count("/proc/self/task"));
    assert!(fds1 <= fds0 + 10, "descriptors {fds0} -> {fds1}");
    assert!(tasks1 <= tasks0 + 10, "threads {tasks0} -> {tasks1}");
}

#[test]
fn virtio_blk_host_io_error_is_ioerr() {
    if !kvm_or_skip() {
        return;
    }
    let (file, fd) = disk(64 << 10);
    let mut t = vdev_vm(
        "blkerr",
        "blkerr",
        vec![("device 3 virtio-blk fd={}".into(), vec![fd])],
    );
    t.run();
    std::thread::sleep(Duration::from_millis(200));
    // Reads past the new end of file come back short: EIO on the host.
    file.set_len(0).unwrap();
    assert_eq!(powered_off(&mut t, 60), "vdev blkerr\nblk read status 1\n");
}
