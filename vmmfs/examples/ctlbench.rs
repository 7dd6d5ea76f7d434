//! vmmctl create+destroy through a vmmfs mount, side by side with the same
//! work done directly on /dev/kvm and with a plain tmpfs write.
//!
//! Usage: ctlbench MOUNT [PAIRS]   (run by scripts/bench against a running vmmfs)

use kvm_ioctls::Kvm;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const RAM: u64 = 256 << 20;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(n: usize, mut f: impl FnMut(usize)) -> (Duration, Duration, f64) {
    for i in 0..n / 10 {
        f(i);
    }
    let mut times = Vec::with_capacity(n);
    let t0 = Instant::now();
    for i in 0..n {
        let t = Instant::now();
        f(i);
        times.push(t.elapsed());
    }
    let per_sec = n as f64 / t0.elapsed().as_secs_f64();
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99), per_sec)
}

/// What the engine does for a create, directly: KVM_CREATE_VM, a 256 MiB memfd
/// mapped and registered as guest RAM; then close everything.
fn bare_kvm(kvm: &Kvm) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: plain syscalls on descriptors and a mapping this function owns.
    unsafe {
        let fd = libc::memfd_create(c"sysmem".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        assert_eq!(libc::ftruncate(fd, RAM as i64), 0);
        let p = libc::mmap(
            std::ptr::null_mut(),
            RAM as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM,
            userspace_addr: p as u64,
        };
        vm.set_user_memory_region(region).expect("set memory");
        drop(vm);
        libc::munmap(p, RAM as usize);
        libc::close(fd);
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mount = args.get(1).expect("usage: ctlbench MOUNT [PAIRS]");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);

    let mut ctl = OpenOptions::new().write(true).open(format!("{mount}/vmmctl")).expect("open vmmctl");
    let vmmfs = measure(n, |i| {
        ctl.write_all(format!("create bench{i}").as_bytes()).expect("create");
        ctl.write_all(format!("destroy bench{i}").as_bytes()).expect("destroy");
    });
    let vmmfs_transient = measure(n, |i| {
        let mut c = OpenOptions::new().write(true).open(format!("{mount}/vmmctl")).expect("open vmmctl");
        c.write_all(format!("create tbench{i} destroy-on-close").as_bytes()).expect("create");
    });
    let kvm = Kvm::new().expect("/dev/kvm");
    let bare = measure(n, |_| bare_kvm(&kvm));
    let shm = std::env::temp_dir().join(format!("ctlbench-{}", std::process::id()));
    let tmpfs_path = if std::path::Path::new("/dev/shm").is_dir() {
        format!("/dev/shm/ctlbench-{}", std::process::id())
    } else {
        shm.display().to_string()
    };
    let tmpfs = measure(n, |_| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmpfs_path).unwrap();
        f.write_all(b"create x").unwrap();
        let _ = f.as_raw_fd();
    });
    let _ = std::fs::remove_file(&tmpfs_path);

    println!("vmmctl create+destroy, {n} pairs each (256 MiB guest RAM, no vCPU run)");
    println!("{:<44} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "pairs/s");
    for (label, (p50, p99, rate)) in [
        ("vmmfs: write create + write destroy", vmmfs),
        ("vmmfs: open, create destroy-on-close, close", vmmfs_transient),
        ("bare /dev/kvm: create VM + memory, close", bare),
        ("tmpfs: open + write + close", tmpfs),
    ] {
        println!("{label:<44} {:>10.1} {:>10.1} {:>10.0}", us(p50), us(p99), rate);
    }
    let over = us(vmmfs.0) - us(bare.0);
    println!(
        "vmmfs / bare KVM (p50): {:.2}  (vmmfs adds {:.0} us per pair; goal <= 150 us, ratio <= 1.25)",
        us(vmmfs.0) / us(bare.0),
        over
    );
    println!(
        "vmmfs transient / bare KVM (p50): {:.2}  (the destroy happens after close returns, in the release)",
        us(vmmfs_transient.0) / us(bare.0)
    );
    println!("vmmfs / tmpfs write (p50): {:.1}", us(vmmfs.0) / us(tmpfs.0));
}
