//! The worker engine with real workers on /dev/kvm (root needed: workers
//! are started in new namespaces and change uid).

use super::*;
use std::io::Read;
use std::sync::OnceLock;
use std::time::Instant;
use vmm_engine::command::OwnedFds;

/// A creator that is not root, whose uid no worker may get.
const CREATOR: u32 = 2147483650;
const RANGE: UidRange = UidRange {
    first: 2147483648,
    count: 16,
};

fn usable() -> bool {
    use test_support::Need;
    test_support::require("worker tests", &[Need::Root, Need::Device("/dev/kvm")])
}

fn worker_exe() -> PathBuf {
    // target/debug/deps/vmmfs-HASH -> target/debug/vmm-worker
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("vmm-worker"))
        .filter(|p| p.is_file())
        .expect("vmm-worker is built beside the tests (cargo test builds every binary)")
}

/// The engine under test. VMMFS_TEST_WORKER_EXE names another worker
/// executable, e.g. a script running vmm-worker under `strace -f` to see
/// which call a filter refused.
fn engine(test_hooks: bool) -> Workers {
    Workers::new(
        WorkerConfig {
            exe: std::env::var_os("VMMFS_TEST_WORKER_EXE").map_or_else(worker_exe, PathBuf::from),
            uids: RANGE,
            max_cpus: 2,
            test_hooks,
            prefork: 1,
            sockets: None,
            reserved: Vec::new(),
        },
        None,
    )
    .unwrap()
}

fn creator() -> Creator {
    Creator {
        ruid: CREATOR,
        euid: CREATOR,
        pid: std::process::id(),
    }
}

/// The engine's test guests, built once.
fn guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("vmmfs-worker-guests-{}", std::process::id()));
        test_support::build_guests(&out, &[])
    })
    .join(name)
}

use test_support::pipe;

fn exec(vm: &WorkerVm, line: &str, fds: Vec<OwnedFd>) -> Result<(), EngineError> {
    let mut src = OwnedFds::default();
    let mut line = line.to_string();
    for fd in fds {
        let n = src.add(fd);
        line = line.replacen("{}", &n.to_string(), 1);
    }
    vm.execute(Command::parse(&line).unwrap(), &mut src)
}

fn wait_status(vm: &WorkerVm, want: &str, within: Duration) -> String {
    let end = Instant::now() + within;
    loop {
        let s = vm.status();
        if s.contains(want) {
            return s;
        }
        assert!(Instant::now() < end, "waited for '{want}': {s}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn proc_status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap()
}

fn field<'a>(status: &'a str, key: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(':')))
        .unwrap_or_else(|| panic!("{key} missing"))
        .trim()
}

fn ns(pid: &str, which: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{which}")).unwrap()
}

#[test]
fn a_worker_is_jailed() {
    if !usable() {
        return;
    }
    let e = engine(false);
    let vm = e.create("jailed", &creator()).unwrap();
    let pid = vm.0.pid;
    let st = proc_status(pid);
    let uid: u32 = field(&st, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(RANGE.contains(uid), "uid {uid} from the range");
    assert_ne!(uid, CREATOR, "never the creator's uid");
    assert_eq!(
        field(&st, "Uid").split_whitespace().collect::<Vec<_>>(),
        vec![uid.to_string(); 4],
        "real, effective, saved and fs uid"
    );
    assert_eq!(field(&st, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(field(&st, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(field(&st, "NoNewPrivs"), "1");
    assert_eq!(field(&st, "Seccomp"), "2", "filter mode");
    for which in ["mnt", "net", "ipc", "uts", "pid"] {
        assert_ne!(
            ns(&pid.to_string(), which),
            ns("self", which),
            "{which} namespace"
        );
    }
    let root: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .collect();
    assert!(root.is_empty(), "an empty root: {root:?}");
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    assert_eq!(mounts.lines().count(), 1, "one mount: {mounts}");
    assert!(mounts.contains(" / ro,"), "read-only root: {mounts}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits.lines().any(|l| l.starts_with("Max open files")
            && l.split_whitespace().nth(3) == Some(&WORKER_MAX_FDS.to_string())),
        "{limits}"
    );
    // Not dumpable: its /proc files belong to root, not to its uid.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}/environ"))
            .unwrap()
            .uid(),
        0
    );
    // Nothing of the daemon's reaches the worker (not /dev/fuse, not a
    // client's file): beyond standard input and output it has its socket,
    // /dev/kvm, its VM and the VM's memory.
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|d| d.unwrap())
        .filter(|d| d.file_name().to_string_lossy().parse::<u32>().unwrap() > 2)
        .map(|d| {
            let t = std::fs::read_link(d.path()).unwrap().display().to_string();
            t.split(':').next().unwrap().to_string()
        })
        .collect();
    fds.sort();
    assert_eq!(fds, ["/dev/kvm", "/memfd", "anon_inode", "socket"]);
    vm.destroy();
    assert!(vm.status().contains("state=destroyed"));
    let end = Instant::now() + Duration::from_secs(2);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < end, "the worker is gone after destroy");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_guest_runs_in_a_worker_and_its_memory_is_shared_by_memfd() {
    if !usable() {
        return;
    }
    let e = engine(false);
    let vm = e.create("hello", &creator()).unwrap();
    exec(&vm, "memory 32M", vec![]).unwrap();
    let rom = std::fs::File::open(guest("hello.rom")).unwrap();
    exec(&vm, "bootrom {}", vec![rom.into()]).unwrap();
    let segs = vm.segments();
    let names: Vec<(&str, u64)> = segs.iter().map(|s| (s.name.as_str(), s.size)).collect();
    assert_eq!(names[0], ("sysmem", 32 << 20));
    assert_eq!(names[1].0, "bootrom");
    for s in &segs {
        assert_eq!(check_memfd(&s.fd, s.size), Ok(()));
    }
    let (in_r, _in_w) = pipe();
    let (out_r, out_w) = pipe();
    exec(&vm, "com1 {} {}", vec![in_r, out_w]).unwrap();
    exec(&vm, "run", vec![]).unwrap();
    let st = wait_status(&vm, "state=exited", Duration::from_secs(30));
    assert!(st.contains("exit=poweroff\nstatus=1\n"), "{st}");
    let mut out = String::new();
    let mut f = std::fs::File::from(out_r);
    // The worker holds the write end until the VM lets its console go.
    vm.detach();
    vm.destroy();
    f.read_to_string(&mut out).unwrap();
    assert_eq!(out, "hello from bootrom\n");
    // Errors keep their errno and text across the process boundary.
    let vm = e.create("errors", &creator()).unwrap();
    let err = exec(&vm, "run", vec![]).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert!(err.to_string().contains("nothing to boot"), "{err}");
    assert_eq!(
        exec(&vm, "set a=b", vec![]).unwrap_err().errno(),
        libc::EOPNOTSUPP
    );
    vm.destroy();
}

#[test]
fn a_forbidden_system_call_kills_only_its_vm() {
    if !usable() {
        return;
    }
    let e = engine(true);
    let victim = e.create("victim", &creator()).unwrap();
    let other = e.create("other", &creator()).unwrap();
    let changed = Arc::new(AtomicU64::new(0));
    let c2 = changed.clone();
    victim.set_notifier(Box::new(move || {
        c2.fetch_add(1, Ordering::Relaxed);
    }));
    let r = exec(&victim, "set x-test-forbidden-syscall=1", vec![]);
    assert_eq!(r.unwrap_err().errno(), libc::ENXIO, "the VM is gone");
    let st = wait_status(&victim, "state=exited", Duration::from_secs(5));
    assert!(st.contains("exit=error\nstatus=4\n"), "{st}");
    assert!(st.contains("seccomp"), "the cause names the filter: {st}");
    assert!(victim.failed(), "the daemon is told to destroy it");
    // The reader thread wakes pollers just after it publishes the end.
    test_support::wait_for("pollers to be woken", Duration::from_secs(5), || {
        changed.load(Ordering::Relaxed) > 0
    });
    // The other VM lives on.
    exec(&other, "memory 64M", vec![]).unwrap();
    assert!(other.status().contains("memory=67108864"));
    assert!(!other.failed());
    victim.destroy();
    other.destroy();
    // Without the test hook the same command is only an unknown option.
    let plain = engine(false).create("plain", &creator()).unwrap();
    assert_eq!(
        exec(&plain, "set x-test-forbidden-syscall=1", vec![])
            .unwrap_err()
            .errno(),
        libc::EOPNOTSUPP
    );
    plain.destroy();
}

#[test]
fn kill_ends_a_command_stuck_on_a_client_file() {
    if !usable() {
        return;
    }
    let e = engine(false);
    let vm = Arc::new(e.create("stuck", &creator()).unwrap());
    // A bootrom is read to its end: a pipe whose writer stays open never ends.
    let (r, w) = pipe();
    let v2 = vm.clone();
    let stuck = std::thread::spawn(move || exec(&v2, "bootrom {}", vec![r]));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!stuck.is_finished(), "the worker is blocked on the pipe");
    let t0 = Instant::now();
    vm.kill();
    vm.destroy();
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(stuck.join().unwrap().unwrap_err().errno(), libc::ENXIO);
    assert!(!vm.failed(), "a destroy is no failure");
    drop(w);
}

/// vdev.elf running test `test` with `device` (descriptors as `{}`) in a
/// worker; its COM1 output once it powered off.
fn vdev(e: &Workers, test: &str, device: &str, fds: Vec<OwnedFd>) -> String {
    let vm = e.create(&format!("vdev-{test}"), &creator()).unwrap();
    exec(&vm, "memory 128M", vec![]).unwrap();
    let k = std::fs::File::open(guest("vdev.elf")).unwrap();
    exec(&vm, "kernel {}", vec![k.into()]).unwrap();
    exec(&vm, &format!("cmdline {test}"), vec![]).unwrap();
    exec(&vm, device, fds).unwrap();
    let (in_r, _in_w) = pipe();
    let (out_r, out_w) = pipe();
    exec(&vm, "com1 {} {}", vec![in_r, out_w]).unwrap();
    exec(&vm, "run", vec![]).unwrap();
    let st = wait_status(&vm, "state=exited", Duration::from_secs(60));
    vm.detach();
    vm.destroy();
    let mut out = String::new();
    std::fs::File::from(out_r).read_to_string(&mut out).unwrap();
    assert!(st.contains("exit=poweroff"), "{st}\nguest output: {out}");
    out
}

#[test]
fn virtio_devices_run_under_the_filters() {
    if !usable() {
        return;
    }
    let e = engine(false);
    let out = vdev(&e, "rng", "device 5 virtio-rnd", vec![]);
    assert_eq!(out, "vdev rng\nrng 64 bytes, random, msix delivered\n");
    let path = std::env::temp_dir().join(format!("vmmfs-worker-disk-{}", std::process::id()));
    let data: Vec<u8> = (0..2 << 20)
        .map(|i: usize| (i * 7 + i / 4096).to_le_bytes()[0])
        .collect();
    std::fs::write(&path, &data).unwrap();
    let disk = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    let out = vdev(&e, "blk", "device 3 virtio-blk fd={}", vec![disk.into()]);
    assert!(
        out.starts_with("vdev blk\nblk capacity 4096 rw\nblk read 1048576 bytes, 0 bad\n"),
        "{out}"
    );
    assert!(
        out.contains("blk flush status 0\nblk discard status 0, reads zeros\n"),
        "{out}"
    );
    assert!(out.ends_with("msix delivered\n"), "{out}");
}
