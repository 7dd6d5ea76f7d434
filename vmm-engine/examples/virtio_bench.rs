//! virtio data paths against the host, printed side by side in one run:
//! - virtio-blk sequential read (vdev.elf `blkbench`: 64 requests of 256 KiB
//!   in flight, driver at CPL3) vs a host pread loop over the same file with
//!   the same chunk size, both from the page cache;
//! - guest-to-host bytes/s through slirp (passt; UDP datagrams of 16000
//!   bytes to 10.0.2.2:5555, which passt maps to the host's loopback) vs the
//!   same datagrams sent over host loopback.
//!
//! `cargo run --release -p vmm-engine --example virtio_bench [-- DISK_MiB]`

// Test code: casts of small fixed test values and test-side syscall results.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::time::{Duration, Instant};
use vmm_engine::command::OwnedFds;
use vmm_engine::{Command, ExitReason, Vm, VmState};

fn memfd_with(data: &[u8]) -> OwnedFd {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::memfd_create(c"img".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: fresh descriptor.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    f.write_all(data).unwrap();
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(0)).unwrap();
    f.into()
}

/// Boot vdev.elf with `test` and one device line (`{}` = the descriptor);
/// returns the VM and the time the run started.
fn vdev(test: &str, device: &str, fd: OwnedFd) -> (Vm, Instant) {
    let dir = std::path::PathBuf::from(env!("VMM_GUESTS_DIR"));
    let elf = std::fs::read(dir.join("vdev.elf")).expect("vdev.elf (guests not built?)");
    let vm = Vm::create("vbench").expect("create");
    let devnull: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .unwrap()
        .into();
    let null2 = devnull.try_clone().unwrap();
    let k = memfd_with(&elf);
    let (a, b, kn, dn) = (
        devnull.as_raw_fd(),
        null2.as_raw_fd(),
        k.as_raw_fd(),
        fd.as_raw_fd(),
    );
    let mut fds = OwnedFds::from(vec![devnull, null2, k, fd]);
    for c in [
        "memory 256M".to_string(),
        format!("com1 {a} {b}"),
        format!("kernel {kn}"),
        format!("cmdline {test}"),
        device.replace("{}", &dn.to_string()),
    ] {
        vm.execute(Command::parse(&c).unwrap(), &mut fds)
            .unwrap_or_else(|e| panic!("{c}: {e}"));
    }
    let t = Instant::now();
    vm.execute(Command::Run, &mut fds).unwrap();
    (vm, t)
}

fn wait_exit(vm: &Vm) -> Instant {
    loop {
        if let VmState::Exited(r) = vm.state() {
            assert_eq!(r, ExitReason::PowerOff, "{}", vm.status());
            return Instant::now();
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// (guest MB/s, host MB/s, vCPU exits to user space in the last guest run).
fn blk(mib: usize) -> (f64, f64, u64) {
    let path = std::env::temp_dir().join(format!("vmm-bench-disk-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    let bytes = (mib << 20) as f64;
    // Host: pread 256 KiB at a time, rotating over 16 MiB (the guest's
    // requests in flight) of shared memory like guest RAM (a memfd); the
    // first pass warms the cache. Heap buffers are also measured: the
    // better of the two is the baseline.
    let file = std::fs::File::open(&path).unwrap();
    let shared = {
        let fd = memfd_with(&vec![0u8; 16 << 20]);
        // SAFETY: mapping 16 MiB of our memfd; leaked on purpose (benchmark).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                16 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as *mut u8
    };
    let mut heap = vec![0u8; 16 << 20];
    let mut host = f64::MAX;
    for base in [shared, heap.as_mut_ptr()] {
        for _ in 0..3 {
            let t = Instant::now();
            let mut off = 0u64;
            for k in 0.. {
                // SAFETY: 256 KiB inside a live 16 MiB buffer.
                let n = unsafe {
                    libc::pread(
                        file.as_raw_fd(),
                        base.add((k % 64) << 18).cast(),
                        256 << 10,
                        off as libc::off_t,
                    )
                };
                assert!(n >= 0, "pread");
                if n == 0 {
                    break;
                }
                off += n as u64;
            }
            host = host.min(t.elapsed().as_secs_f64());
        }
    }
    let mut guest = f64::MAX;
    let mut exits = 0;
    for _ in 0..3 {
        let fd: OwnedFd = std::fs::File::open(&path).unwrap().into();
        let (vm, t0) = vdev("blkbench", "device 3 virtio-blk fd={},ro", fd);
        let t1 = wait_exit(&vm);
        // The guest marks the start of its read loop on the boot-timer port.
        let start = Duration::from_micros(vm.boot_time_us().expect("bench start mark"));
        guest = guest.min((t1 - t0 - start).as_secs_f64());
        exits = vm.exits();
        vm.destroy();
    }
    let _ = std::fs::remove_file(&path);
    (bytes / guest / 1e6, bytes / host / 1e6, exits)
}

/// As vdev.elf `netbench`: frames stay below 32 KiB (see net.rs on passt).
const DGRAM: usize = 16000;
const COUNT: usize = 4194;

/// Receive on 127.0.0.1:5555 until `idle` passes without data; returns bytes
/// and the time from the first to the last datagram.
fn receiver(sock: std::net::UdpSocket, idle: Duration) -> std::thread::JoinHandle<(usize, f64)> {
    std::thread::spawn(move || {
        sock.set_read_timeout(Some(idle)).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut total = 0;
        let mut first = None;
        let mut last = Instant::now();
        while let Ok(n) = sock.recv(&mut buf) {
            total += n;
            last = Instant::now();
            first.get_or_insert(last);
        }
        let dt = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
        (total, dt)
    })
}

fn bind_5555() -> std::net::UdpSocket {
    let s = std::net::UdpSocket::bind("127.0.0.1:5555").expect("UDP port 5555 busy");
    let sz: libc::c_int = 32 << 20;
    // SAFETY: setsockopt with an int we own; FORCE needs root, else the plain one.
    unsafe {
        let p = (&sz as *const libc::c_int).cast();
        let l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, p, l) != 0 {
            libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, p, l);
        }
    }
    s
}

fn slirp() -> Option<(f64, f64, usize, usize)> {
    // Host loopback first.
    let rx = receiver(bind_5555(), Duration::from_millis(500));
    let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let payload = vec![0x42u8; DGRAM];
    for _ in 0..COUNT {
        tx.send_to(&payload, "127.0.0.1:5555").unwrap();
    }
    let (host_bytes, host_dt) = rx.join().unwrap();

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
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
    let raw = theirs.as_raw_fd();
    let mut cmd = std::process::Command::new("passt");
    cmd.args(["-f", "-q", "-1", "-F", "3"])
        .args(["-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2"])
        .args(["-t", "none", "-u", "none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
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
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("passt not available: {e}");
            return None;
        }
    };
    drop(theirs);
    let rx = receiver(bind_5555(), Duration::from_secs(3));
    let (vm, _) = vdev("netbench", "device 4 virtio-net slirp,fd={}", ours);
    wait_exit(&vm);
    vm.destroy();
    let (guest_bytes, guest_dt) = rx.join().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    Some((
        guest_bytes as f64 / guest_dt / 1e6,
        host_bytes as f64 / host_dt / 1e6,
        guest_bytes,
        host_bytes,
    ))
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let (g, h, exits) = blk(mib);
    println!(
        "{:<48} {:>12} {:>12} {:>8}",
        "measure", "guest", "host", "ratio"
    );
    println!(
        "{:<48} {:>12.0} {:>12.0} {:>8.2}",
        format!("virtio-blk sequential read, {mib} MiB (MB/s)"),
        g,
        h,
        g / h
    );
    println!(
        "  ({} requests of 256 KiB; {exits} vCPU exits to user space in the whole guest run:\n   notifies go through ioeventfd; the guest polls the used ring with interrupts suppressed)",
        mib * 4
    );
    match slirp() {
        Some((g, h, gb, hb)) => println!(
            "{:<48} {:>12.0} {:>12.0} {:>8.2}\n  (UDP, {COUNT} x {DGRAM} B sent; received: guest path {gb} B, loopback {hb} B)",
            "guest-to-host via slirp vs loopback (MB/s)",
            g,
            h,
            g / h,
        ),
        None => println!("slirp: passt missing, skipped"),
    }
}
