//! vmmctl create+destroy through a vmmfs mount, side by side with the same
//! work done directly on /dev/kvm and with a plain tmpfs write.
//!
//! Then fairness: one user's create+destroy pairs alone, and while another
//! user hammers vmmctl from 16 processes.
//!
//! Usage: ctlbench MOUNT [PAIRS]   (run by scripts/bench against a running vmmfs)

#[path = "../../vmm-engine/examples/baseline/mod.rs"]
mod baseline;

use kvm_ioctls::Kvm;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const RAM: u64 = 256 << 20;

/// The `pct`th percentile (nearest rank, rounded half up) of `sorted`.
fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    sorted[((sorted.len() - 1) * pct + 50) / 100]
}

/// p50, p99 and operations per second of one series.
struct Stats {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

impl Stats {
    fn of(mut times: Vec<Duration>) -> Stats {
        let total: Duration = times.iter().sum();
        times.sort();
        Stats {
            p50: percentile(&times, 50),
            p99: percentile(&times, 99),
            per_sec: times.len() as f64 / total.as_secs_f64(),
        }
    }
}

/// Run the candidates interleaved, one round of each per iteration, so that
/// drift in the machine's state (caches, other load) hits all of them alike.
fn measure(n: usize, candidates: &mut [&mut dyn FnMut(usize)]) -> Vec<Stats> {
    for i in 0..n / 10 {
        for f in candidates.iter_mut() {
            f(i);
        }
    }
    let mut times = vec![Vec::with_capacity(n); candidates.len()];
    for i in 0..n {
        for (f, t) in candidates.iter_mut().zip(times.iter_mut()) {
            let start = Instant::now();
            f(i);
            t.push(start.elapsed());
        }
    }
    times.into_iter().map(Stats::of).collect()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mount = args.get(1).expect("usage: ctlbench MOUNT [PAIRS]");
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2000);

    let mut ctl = OpenOptions::new()
        .write(true)
        .open(format!("{mount}/vmmctl"))
        .expect("open vmmctl");
    let kvm = Kvm::new().expect("/dev/kvm");
    let tmpfs_dir = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm".into()
    } else {
        std::env::temp_dir()
    };
    let tmpfs_path = tmpfs_dir.join(format!("ctlbench-{}", std::process::id()));
    let mut pair = |i: usize| {
        ctl.write_all(format!("create bench{i}").as_bytes())
            .expect("create");
        ctl.write_all(format!("destroy bench{i}").as_bytes())
            .expect("destroy");
    };
    let mut transient = |i: usize| {
        let mut c = OpenOptions::new()
            .write(true)
            .open(format!("{mount}/vmmctl"))
            .expect("open vmmctl");
        c.write_all(format!("create tbench{i} destroy-on-close").as_bytes())
            .expect("create");
    };
    let mut bare = |_| baseline::bare_vm_with_ram(&kvm, RAM);
    let mut tmpfs = |_| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmpfs_path)
            .unwrap();
        f.write_all(b"create x").unwrap();
        let _ = f.as_raw_fd();
    };
    let stats = measure(n, &mut [&mut pair, &mut transient, &mut bare, &mut tmpfs]);
    let _ = std::fs::remove_file(&tmpfs_path);
    let labels = [
        "vmmfs: write create + write destroy",
        "vmmfs: open, create destroy-on-close, close",
        "bare /dev/kvm: create VM + memory, close",
        "tmpfs: open + write + close",
    ];

    println!("vmmctl create+destroy, {n} rounds, interleaved (256 MiB guest RAM, no vCPU run)");
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "p50 us", "p99 us", "pairs/s"
    );
    for (label, s) in labels.iter().zip(&stats) {
        println!(
            "{label:<44} {:>10.1} {:>10.1} {:>10.0}",
            us(s.p50),
            us(s.p99),
            s.per_sec
        );
    }
    let (vmmfs, trans, bare, tmpfs) = (&stats[0], &stats[1], &stats[2], &stats[3]);
    println!(
        "vmmfs / bare KVM (p50): {:.2}  (vmmfs adds {:.0} us per pair; goal <= 150 us, ratio <= 1.25)",
        us(vmmfs.p50) / us(bare.p50),
        us(vmmfs.p50) - us(bare.p50)
    );
    println!(
        "vmmfs transient / bare KVM (p50): {:.2}  (its destroy runs in the release, after close returns)",
        us(trans.p50) / us(bare.p50)
    );
    println!(
        "vmmfs / tmpfs write (p50): {:.1}",
        us(vmmfs.p50) / us(tmpfs.p50)
    );
    fairness(mount, 500);
}

/// Unprivileged users of the fairness run (need no account: the mount's
/// vmmctl is opened up for the run).
const VICTIM: u32 = 61001;
const HAMMER: u32 = 61000;
const HAMMERERS: usize = 16;

/// Fork a child running `f` as `uid`; returns its pid.
fn as_user(uid: u32, f: impl FnOnce()) -> libc::pid_t {
    // SAFETY: the child only switches credentials, runs `f` and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        // SAFETY: credential syscalls in the single-threaded child.
        unsafe {
            let none: [libc::gid_t; 0] = [];
            libc::setgroups(0, none.as_ptr());
            libc::setresgid(uid, uid, uid);
            libc::setresuid(uid, uid, uid);
        }
        f();
        // SAFETY: leave without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    pid
}

/// `n` transient create+destroy pairs as the victim; each pair's time.
fn victim_pairs(mount: &str, n: usize, tag: &str) -> Vec<Duration> {
    let (mut r, w) = std::io::pipe().expect("pipe");
    let path = format!("{mount}/vmmctl");
    let tag = tag.to_string();
    let pid = as_user(VICTIM, move || {
        let mut w = w;
        let mut ctl = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("victim: open vmmctl");
        for i in 0..n {
            let t0 = Instant::now();
            ctl.write_all(format!("create {tag}{i} destroy-on-close").as_bytes())
                .expect("victim: create");
            ctl.write_all(format!("destroy {tag}{i}").as_bytes())
                .expect("victim: destroy");
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            w.write_all(&ns.to_le_bytes()).expect("victim: report");
        }
    });
    let mut out = Vec::with_capacity(n);
    let mut b = [0u8; 8];
    while std::io::Read::read_exact(&mut r, &mut b).is_ok() {
        out.push(Duration::from_nanos(u64::from_le_bytes(b)));
    }
    // SAFETY: reap our child.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    assert_eq!(out.len(), n, "the victim did not finish");
    out
}

fn fairness(mount: &str, n: usize) {
    use std::os::unix::fs::PermissionsExt;
    let ctl = format!("{mount}/vmmctl");
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o666)).expect("chmod vmmctl");
    let solo = victim_pairs(mount, n, "solo");
    let hammers: Vec<libc::pid_t> = (0..HAMMERERS)
        .map(|h| {
            let path = ctl.clone();
            as_user(HAMMER, move || {
                let mut c = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .expect("hammer: open");
                for i in 0.. {
                    let _ = c.write_all(format!("create h{h}-{i} destroy-on-close").as_bytes());
                    let _ = c.write_all(format!("destroy h{h}-{i}").as_bytes());
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let loaded = victim_pairs(mount, n, "load");
    for pid in hammers {
        // SAFETY: our children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    std::fs::set_permissions(&ctl, std::fs::Permissions::from_mode(0o660)).expect("chmod vmmctl");
    let worst = |v: &[Duration]| v.iter().max().copied().unwrap_or_default();
    let (ws, wl) = (worst(&solo), worst(&loaded));
    let (s, l) = (Stats::of(solo), Stats::of(loaded));
    println!();
    println!("fairness: uid {VICTIM}'s transient create+destroy pairs, {n} each, alone and while uid {HAMMER} hammers from {HAMMERERS} processes");
    println!(
        "{:<44} {:>10} {:>10} {:>10}",
        "", "p50 us", "p99 us", "max us"
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10.1}",
        "victim alone",
        us(s.p50),
        us(s.p99),
        us(ws)
    );
    println!(
        "{:<44} {:>10.1} {:>10.1} {:>10.1}",
        "victim under load",
        us(l.p50),
        us(l.p99),
        us(wl)
    );
    println!(
        "victim p99 under load / alone: {:.2}  (goal <= 2); worst case {:.1} ms (goal < 100 ms)",
        us(l.p99) / us(s.p99),
        us(wl) / 1000.0
    );
}
