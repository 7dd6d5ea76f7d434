//! vmmctl create+destroy through a vmmfs mount, side by side with the same
//! work done directly on /dev/kvm and with a plain tmpfs write.
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
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
            p50: percentile(&times, 0.5),
            p99: percentile(&times, 0.99),
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
}
