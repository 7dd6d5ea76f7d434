//! End-to-end: a real vmmfs mount, real KVM guests, bhyve run by an
//! unprivileged user (nobody, whose primary group is made the vmm group).
//!
//! Needs root (to mount and to switch users), /dev/kvm and /dev/fuse, and a
//! built daemon (`cargo build -p vmmfs`, or `VMMFS_BIN=/path/to/vmmfs`).
//! Skipped when not root and not in CI; in CI every missing prerequisite fails.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// A user and group that are neither nobody nor in the vmm group.
const OTHER_UID: u32 = 54321;
const OTHER_GID: u32 = 54321;

use test_support::{in_ci, is_root};

/// Whether to run; panics in CI (or as root) when something is missing.
fn prerequisites() -> bool {
    if !is_root() && !in_ci() {
        eprintln!("skipped: needs root (mount, user switch); CI would fail here");
        return false;
    }
    assert!(is_root(), "integration tests must run as root in CI");
    for dev in ["/dev/kvm", "/dev/fuse"] {
        assert!(
            Path::new(dev).exists(),
            "{dev} is missing: cannot run VMs in FUSE"
        );
    }
    assert!(
        vmmfs_bin().exists(),
        "vmmfs binary not found at {} (cargo build -p vmmfs, or set VMMFS_BIN)",
        vmmfs_bin().display()
    );
    true
}

fn vmmfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMMFS_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vmmfs")
}

/// A private directory of this test process under /tmp: made by root with a
/// random name, mode 0755 (others may traverse it, only root may write), so
/// that the unprivileged users the tests run as can execute and read what is
/// copied there wherever the build directory is (a 0700 home included).
/// Directories left by earlier runs that died are removed.
fn staging() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let prefix = "bhyve-compat-tests.";
        if let Ok(rd) = std::fs::read_dir("/tmp") {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name
                    .strip_prefix(prefix)
                    .and_then(|r| r.split('.').next())
                    .and_then(|p| p.parse::<i32>().ok())
                else {
                    continue;
                };
                // SAFETY: kill with signal 0 only checks that the process exists.
                let alive = unsafe { libc::kill(pid, 0) } == 0;
                let ours = std::fs::symlink_metadata(e.path())
                    .is_ok_and(|m| m.is_dir() && std::os::unix::fs::MetadataExt::uid(&m) == 0);
                if !alive && ours {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let template = format!("/tmp/{prefix}{}.XXXXXX", std::process::id());
        let dir = nix::unistd::mkdtemp(template.as_str()).expect("mkdtemp in /tmp");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    })
}

/// The tool `name`, copied into [`staging`] (the build directory may not be
/// reachable by the test users).
fn bin(name: &str) -> PathBuf {
    static STAGED: OnceLock<PathBuf> = OnceLock::new();
    let dir = STAGED.get_or_init(|| {
        let dir = staging().join("bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        for (tool, built) in [
            ("bhyve", env!("CARGO_BIN_EXE_bhyve")),
            ("bhyvectl", env!("CARGO_BIN_EXE_bhyvectl")),
            ("bhyveload", env!("CARGO_BIN_EXE_bhyveload")),
        ] {
            let to = dir.join(tool);
            std::fs::copy(built, &to).unwrap_or_else(|e| panic!("copy {built}: {e}"));
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    });
    dir.join(name)
}

fn tempdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base = std::env::temp_dir().join(format!("bhyve-compat-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
    base
}

/// A vmmfs mount for one test.
struct Mount {
    dir: PathBuf,
    mnt: PathBuf,
    daemon: Child,
}

impl Mount {
    fn new(tag: &str) -> Mount {
        let dir = tempdir(tag);
        let mnt = dir.join("mnt");
        let state = dir.join("state");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::create_dir_all(&state).unwrap();
        let log = std::fs::File::create(dir.join("vmmfs.log")).unwrap();
        let daemon = Command::new(vmmfs_bin())
            .arg("--group")
            .arg("nogroup")
            .arg("--state-dir")
            .arg(&state)
            .arg(&mnt)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start vmmfs");
        let m = Mount { dir, mnt, daemon };
        let t = Instant::now();
        while !m.mnt.join("vmmctl").exists() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "vmmfs did not come up: {}",
                m.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("vmmfs.log")).unwrap_or_default()
    }

    fn vms(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.mnt.join("vmm"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Wait until VM `name` is gone (destroyed); false on timeout.
    fn wait_gone(&self, name: &str, secs: u64) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            if !self.mnt.join("vmm").join(name).exists() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A command for tool `tool` with VMM_DEV_DIR set, run as `who`.
    fn cmd(&self, tool: &str, who: Who) -> Command {
        let mut c = Command::new(bin(tool));
        c.env("VMM_DEV_DIR", &self.mnt)
            .current_dir(&self.dir)
            .stdin(Stdio::null());
        match who {
            Who::Root => {}
            Who::Member => {
                c.uid(NOBODY).gid(NOGROUP);
            }
            Who::Stranger => {
                c.uid(OTHER_UID).gid(OTHER_GID);
            }
        }
        c
    }

    /// Write a file into the test directory.
    fn file(&self, name: &str, img: &[u8], mode: u32) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, img).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(test_support::pid_t(self.daemon.id()), libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.daemon.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        // The daemon detaches its mount on SIGTERM; only a killed one leaves it.
        let _ = nix::mount::umount2(&self.mnt, nix::mount::MntFlags::MNT_DETACH);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("vmmfs log:\n{}", self.log());
        }
    }
}

#[derive(Clone, Copy)]
enum Who {
    Root,
    /// nobody with the vmm group (nogroup here) as primary group.
    Member,
    /// Another user, not in the vmm group.
    Stranger,
}

// ---- test guests: vmm-engine/guests, built with make into a directory of ours.

fn guests() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = staging().join("guests");
        std::fs::create_dir_all(&out).unwrap();
        std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o755)).unwrap();
        test_support::build_guests(&out, &[]);
        for f in std::fs::read_dir(&out).unwrap().flatten() {
            let _ = std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644));
        }
        out
    })
}

fn guest(name: &str) -> PathBuf {
    let p = guests().join(name);
    assert!(p.exists(), "test guest {name} was not built");
    p
}

/// A running bhyve with its serial console on pipes.
struct Bhyve {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    /// Set by each reader thread at end of file: stdout's, stderr's.
    eof: [Arc<std::sync::atomic::AtomicBool>; 2],
}

impl Bhyve {
    fn spawn(mut c: Command) -> Bhyve {
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("spawn bhyve");
        let out = Arc::new(Mutex::new(Vec::new()));
        let err = Arc::new(Mutex::new(Vec::new()));
        let eof: [Arc<std::sync::atomic::AtomicBool>; 2] = Default::default();
        for ((mut pipe, buf), done) in [
            (
                Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
                out.clone(),
            ),
            (
                Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
                err.clone(),
            ),
        ]
        .into_iter()
        .zip(eof.clone())
        {
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut b) {
                    if n == 0 {
                        break;
                    }
                    buf.lock().unwrap().extend_from_slice(&b[..n]);
                }
                done.store(true, std::sync::atomic::Ordering::Release);
            });
        }
        Bhyve {
            child,
            out,
            err,
            eof,
        }
    }

    fn stdout(&self) -> String {
        text(&self.out.lock().unwrap())
    }

    fn stderr(&self) -> String {
        text(&self.err.lock().unwrap())
    }

    /// Wait until the serial output holds `n` copies of `what`.
    fn expect(&self, what: &str, n: usize, secs: u64) {
        let t = Instant::now();
        while self.stdout().matches(what).count() < n {
            assert!(
                t.elapsed() < Duration::from_secs(secs),
                "no {n}x {what:?} on the console: {:?} (stderr {:?})",
                self.stdout(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, s: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    fn wait(&mut self, secs: u64) -> Option<i32> {
        let t = Instant::now();
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.drain();
                return s.code();
            }
            if t.elapsed() > Duration::from_secs(secs) {
                let _ = self.child.kill();
                panic!(
                    "bhyve did not exit within {secs}s: stdout {:?} stderr {:?}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> i32 {
        test_support::pid_t(self.child.id())
    }

    /// After exit, let the reader threads take what is left: stderr to its
    /// end (nobody else holds it; a loaded machine may schedule the reader
    /// late), stdout a moment longer or to its end, whichever comes first
    /// (a persistent VM's worker may keep the console's copy open).
    fn drain(&self) {
        use std::sync::atomic::Ordering::Acquire;
        let t = Instant::now();
        while !self.eof[1].load(Acquire) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        while !self.eof[0].load(Acquire) && t.elapsed() < Duration::from_millis(200) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Bhyve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished tool printed, and its exit status.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run a tool to completion. Output is collected by threads and not read to
/// EOF: a persistent VM's daemon keeps copies of the console descriptors.
fn run(c: Command, secs: u64) -> Out {
    let mut b = Bhyve::spawn(c);
    let code = b.wait(secs);
    Out {
        code,
        stdout: b.stdout(),
        stderr: b.stderr(),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn bhyve_args(c: &mut Command, rom: &Path, name: &str, monitor: bool) {
    if monitor {
        c.arg("-M");
    }
    c.args(["-m", "32M", "-l", "com1,stdio", "-l"])
        .arg(format!("bootrom,{}", rom.display()))
        .arg(name);
}

/// multi.rom as `who` in monitor mode, at its "ready" prompt.
fn multi(m: &Mount, name: &str, who: Who) -> Bhyve {
    let mut c = m.cmd("bhyve", who);
    bhyve_args(&mut c, &guest("multi.rom"), name, true);
    let b = Bhyve::spawn(c);
    b.expect("ready", 1, 60);
    b
}

#[test]
fn unprivileged_monitor_mode_exit_statuses() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("statuses");
    // Plain output, power-off.
    let mut c = m.cmd("bhyve", Who::Member);
    bhyve_args(&mut c, &guest("hello.rom"), "hello", true);
    let out = run(c, 60);
    assert_eq!(out.code, Some(1), "{}", out.stderr.clone());
    assert!(
        out.stdout.contains("hello from bootrom"),
        "{}",
        out.stdout.clone()
    );
    assert!(m.wait_gone("hello", 5), "VM left behind: {:?}", m.vms());

    for (cmd, want) in [("p", 1), ("h", 2), ("t", 3)] {
        let name = format!("vm-{cmd}");
        let mut b = multi(&m, &name, Who::Member);
        b.send(cmd);
        assert_eq!(b.wait(60), Some(want), "command {cmd}: {}", b.stderr());
        assert!(m.wait_gone(&name, 5), "VM left behind: {:?}", m.vms());
    }

    // Reboot (i8042, then 0xcf9): the monitor re-initialises the VM and boots
    // it again; bhyve keeps running until the guest powers off.
    let mut b = multi(&m, "vm-reboot", Who::Member);
    b.send("k");
    b.expect("ready", 2, 60);
    assert!(b.child.try_wait().unwrap().is_none());
    b.send("r");
    b.expect("ready", 3, 60);
    b.send("p");
    assert_eq!(b.wait(60), Some(1), "{}", b.stderr());
    assert!(m.wait_gone("vm-reboot", 5), "VM left behind: {:?}", m.vms());
}

#[test]
fn sigterm_presses_the_power_button() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("sigterm");
    let mut b = multi(&m, "vmt", Who::Member);
    b.send("w");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(b.pid(), libc::SIGTERM) };
    assert_eq!(b.wait(60), Some(1), "{}", b.stderr());
    assert!(m.wait_gone("vmt", 5));

    // SIGINT: stop now, exit 4, VM gone.
    let mut b = multi(&m, "vmi", Who::Member);
    b.send("z");
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: as above.
    unsafe { libc::kill(b.pid(), libc::SIGINT) };
    assert_eq!(b.wait(30), Some(4));
    assert!(m.wait_gone("vmi", 10), "{:?}", m.vms());
}

#[test]
fn unprivileged_without_monitor_mode_is_refused() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("nomonitor");
    let mut c = m.cmd("bhyve", Who::Member);
    bhyve_args(&mut c, &guest("hello.rom"), "vmx", false);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    assert!(
        out.stderr
            .clone()
            .contains("bhyve: An unprivileged user must run VMs in monitor mode"),
        "{}",
        out.stderr.clone()
    );
    assert!(m.vms().is_empty());
    let mut c = m.cmd("bhyvectl", Who::Member);
    c.args(["--vm=vmx", "--create"]);
    let out = run(c, 30);
    assert_eq!(out.code, Some(1));
    assert!(out
        .stderr
        .clone()
        .contains("An unprivileged user must run VMs in monitor mode"));
    let mut c = m.cmd("bhyveload", Who::Member);
    c.args(["-m", "32M", "-k"])
        .arg(guest("kernel.elf"))
        .arg("vmx");
    let out = run(c, 30);
    assert_eq!(out.code, Some(1));
    assert!(out
        .stderr
        .clone()
        .contains("An unprivileged user must run VMs in monitor mode"));
    assert!(m.vms().is_empty());
}

#[test]
fn non_member_gets_permission_denied() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("stranger");
    let mut c = m.cmd("bhyve", Who::Stranger);
    bhyve_args(&mut c, &guest("hello.rom"), "vms", true);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    let err = out.stderr.clone();
    assert!(err.contains("vmmctl: Permission denied"), "{err}");
    assert!(m.vms().is_empty());
}

#[test]
fn unopenable_resources_fail_before_any_vm_exists() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("resources");
    let rom = std::fs::read(guest("hello.rom")).unwrap();
    let secret = m.file("secret.rom", &rom, 0o600);
    let mut c = m.cmd("bhyve", Who::Member);
    bhyve_args(&mut c, &secret, "vmr", true);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    let err = out.stderr.clone();
    assert!(err.contains("secret.rom\": Permission denied"), "{err}");

    let disk = m.file("disk.img", &[0u8; 4096], 0o600);
    let mut c = m.cmd("bhyve", Who::Member);
    c.arg("-s").arg(format!("3,virtio-blk,{}", disk.display()));
    bhyve_args(&mut c, &guest("hello.rom"), "vmr", true);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    let err = out.stderr.clone();
    assert!(err.contains("Could not open backing file"), "{err}");
    assert!(err.contains("Permission denied"), "{err}");

    let mut c = m.cmd("bhyve", Who::Member);
    c.args(["-s", "5,passthru,0/31/0"]);
    bhyve_args(&mut c, &guest("hello.rom"), "vmr", true);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    assert!(
        out.stderr.contains("failed to open /dev/vfio/"),
        "{}",
        out.stderr.clone()
    );

    let tty = m.file("roots-tty", b"", 0o600);
    let mut c = m.cmd("bhyve", Who::Member);
    c.arg("-l").arg(format!("com2,{}", tty.display()));
    bhyve_args(&mut c, &guest("hello.rom"), "vmr", true);
    let out = run(c, 30);
    assert_eq!(out.code, Some(4));
    assert!(
        out.stderr.contains("roots-tty: Permission denied"),
        "{}",
        out.stderr.clone()
    );
    assert!(m.vms().is_empty(), "{:?}", m.vms());
}

#[test]
fn linux_boot_protocol_as_unprivileged_user() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("linux");
    let initrd = m.file("initrd.img", b"INITRD-CONTENTS", 0o644);
    let mut c = m.cmd("bhyve", Who::Member);
    c.args(["-M", "-m", "64M", "-l", "com1,stdio"])
        .arg("-o")
        .arg(format!("linux.kernel={}", guest("kernel.elf").display()))
        .arg("-o")
        .arg(format!("linux.initrd={}", initrd.display()))
        .args(["-o", "linux.cmdline=console=ttyS0 hello=world", "vml"]);
    let out = run(c, 120);
    let s = out.stdout.clone();
    assert_eq!(out.code, Some(1), "{s} {}", out.stderr.clone());
    assert!(s.contains("cmdline 'console=ttyS0 hello=world'"), "{s}");
    assert!(s.contains("INITRD-CONTENTS"), "{s}");
    assert!(m.wait_gone("vml", 5));
}

#[test]
fn root_bhyveload_then_bhyve_and_persistent_vms() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("persist");
    let mut c = m.cmd("bhyveload", Who::Root);
    c.args(["-m", "64M", "-k"])
        .arg(guest("kernel.elf"))
        .args(["-c", "from=bhyveload", "vmp"]);
    let out = run(c, 30);
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
    assert_eq!(m.vms(), vec!["vmp".to_string()]);
    let mut c = m.cmd("bhyve", Who::Root);
    c.args(["-m", "64M", "-l", "com1,stdio", "vmp"]);
    let out = run(c, 120);
    let s = out.stdout.clone();
    assert_eq!(out.code, Some(1), "{s} {}", out.stderr.clone());
    assert!(s.contains("cmdline 'from=bhyveload'"), "{s}");
    // Persistent: still there, exited.
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmp", "--get-stats"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(0));
    assert!(
        out.stdout.contains("state\texited"),
        "{}",
        out.stdout.clone()
    );
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmp", "--destroy"]);
    assert_eq!(run(c, 10).code, Some(0));
    assert!(m.wait_gone("vmp", 5));
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmp", "--get-stats"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(1));
    assert_eq!(
        out.stderr.clone().trim(),
        "vm_open: vmp could not be opened: No such file or directory"
    );

    // Without -M, a guest reboot ends bhyve with 0 and the VM stays.
    let mut c = m.cmd("bhyve", Who::Root);
    bhyve_args(&mut c, &guest("multi.rom"), "vmr", false);
    let mut b = Bhyve::spawn(c);
    b.expect("ready", 1, 60);
    b.send("r");
    assert_eq!(b.wait(60), Some(0), "{}", b.stderr());
    assert_eq!(m.vms(), vec!["vmr".to_string()]);
    // Run it again (reused), power off with -D: destroyed.
    let mut c = m.cmd("bhyve", Who::Root);
    c.arg("-D");
    bhyve_args(&mut c, &guest("multi.rom"), "vmr", false);
    let mut b = Bhyve::spawn(c);
    b.expect("ready", 1, 60);
    b.send("p");
    assert_eq!(b.wait(60), Some(1), "{}", b.stderr());
    assert!(m.wait_gone("vmr", 5), "{:?}", m.vms());
}

fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn gone_or_zombie(pid: i32, secs: u64) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(st) if st.contains(") Z ") => return true,
            Ok(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    false
}

#[test]
fn monitor_mode_sigkill_never_leaks_the_vm() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("sigkill");
    // Parent killed: the child notices, exits, and the VM goes.
    let mut b = multi(&m, "vmk1", Who::Member);
    b.send("z");
    let kids = children_of(b.pid());
    assert_eq!(kids.len(), 1, "monitor child: {kids:?}");
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    assert!(m.wait_gone("vmk1", 10), "VM leaked: {:?}", m.vms());
    assert!(
        gone_or_zombie(kids[0], 10),
        "monitor child survived its parent"
    );

    // Child killed: the parent exits 4 and the VM goes.
    let mut b = multi(&m, "vmk2", Who::Member);
    b.send("z");
    let kids = children_of(b.pid());
    assert_eq!(kids.len(), 1);
    // SAFETY: signalling a process we started (through its parent).
    unsafe { libc::kill(kids[0], libc::SIGKILL) };
    assert_eq!(b.wait(30), Some(4));
    assert!(m.wait_gone("vmk2", 10), "VM leaked: {:?}", m.vms());
}

#[test]
fn existing_vm_is_reused_in_monitor_mode_and_kept() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("reuse");
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmu", "--create"]);
    assert_eq!(run(c, 10).code, Some(0));
    let mut c = m.cmd("bhyve", Who::Root);
    bhyve_args(&mut c, &guest("hello.rom"), "vmu", true);
    let out = run(c, 60);
    assert_eq!(out.code, Some(1), "{}", out.stderr.clone());
    assert!(out.stdout.contains("hello from bootrom"));
    assert_eq!(
        m.vms(),
        vec!["vmu".to_string()],
        "a reused VM must not be destroyed"
    );
}

#[test]
fn bhyvectl_controls_a_running_guest() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("ctl");
    let mut b = multi(&m, "vmc", Who::Member);
    b.send("z");
    let mut c = m.cmd("bhyvectl", Who::Member);
    c.args(["--vm=vmc", "--get-stats", "--get-memmap"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(0), "{}", out.stderr.clone());
    let s = out.stdout.clone();
    assert!(s.contains("state\trunning"), "{s}");
    assert!(s.contains("bootrom"), "{s}");
    // FreeBSD's statistic name, which VM managers grep for: the 32 MiB of
    // RAM are not all touched, the ROM and the guest's stack are.
    let resident: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("Resident memory"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Resident memory line: {s}"));
    assert!((4096..64 << 20).contains(&resident), "{resident}");
    // The process title, as setproctitle gives it on FreeBSD (the monitor
    // and the child that runs the guest alike).
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", b.child.id())).unwrap();
    let title = text(&cmdline);
    assert!(title.starts_with("bhyve: vmc"), "{title:?}");
    // Another user cannot touch it.
    let mut c = m.cmd("bhyvectl", Who::Stranger);
    c.args(["--vm=vmc", "--force-poweroff"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains("Permission denied"),
        "{}",
        out.stderr.clone()
    );
    // Reset: the monitor boots the guest again.
    let mut c = m.cmd("bhyvectl", Who::Member);
    c.args(["--vm=vmc", "--force-reset"]);
    assert_eq!(run(c, 10).code, Some(0));
    b.expect("ready", 2, 60);
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "bhyve exited on reset"
    );
    let mut c = m.cmd("bhyvectl", Who::Member);
    c.args(["--vm=vmc", "--force-poweroff"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert_eq!(b.wait(30), Some(1));
    assert!(m.wait_gone("vmc", 5));
    let mut c = m.cmd("bhyvectl", Who::Member);
    c.args(["--vm=vmc", "--create", "--destroy"]);
    let out = run(c, 10);
    assert_eq!(out.code, Some(1));
    assert!(out.stderr.contains("mutually exclusive"));
}

#[test]
fn vm_destroyed_under_bhyve_is_status_4() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("destroyed");
    let mut b = multi(&m, "vmz", Who::Member);
    b.send("z");
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmz", "--destroy"]);
    assert_eq!(run(c, 10).code, Some(0));
    assert_eq!(b.wait(30), Some(4), "{}", b.stderr());
    assert!(b.stderr().contains("was destroyed"), "{}", b.stderr());
}

#[test]
fn killed_bhyve_stops_a_persistent_guest_and_lets_go_of_its_console() {
    if !prerequisites() {
        return;
    }
    let m = Mount::new("detach");
    let mut c = m.cmd("bhyve", Who::Root);
    bhyve_args(&mut c, &guest("multi.rom"), "vmk", false);
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = c.spawn().expect("spawn bhyve");
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Everything on the console until end-of-file, which needs every copy of
    // bhyve's stdout closed: bhyve's own and the daemon's.
    std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut b = [0u8; 4096];
        while let Ok(n) = out.read(&mut b) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&b[..n]);
            if text(&all).contains("ready") {
                let _ = tx.send(false);
            }
        }
        let _ = tx.send(true);
    });
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(60)),
        Ok(false),
        "no ready prompt"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let eof = loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(false) => continue,
            other => break other,
        }
    };
    assert_eq!(
        eof,
        Ok(true),
        "the daemon still holds bhyve's console after bhyve died"
    );
    // The VM persists (it was created without -M), stopped.
    assert_eq!(m.vms(), vec!["vmk".to_string()]);
    let t = Instant::now();
    loop {
        let status = std::fs::read_to_string(m.mnt.join("vmm/vmk")).unwrap();
        if status.contains("state=exited") {
            assert!(status.contains("status=4"), "{status}");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "guest still running without its bhyve: {status}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = m.cmd("bhyvectl", Who::Root);
    c.args(["--vm=vmk", "--destroy"]);
    assert_eq!(run(c, 10).code, Some(0));
}

// ---- peer corpus: command lines as VM managers write them ----------------

/// What a command line must do.
enum Expect {
    /// Boots the stand-in boot ROM (hello.rom): "hello from bootrom" on
    /// COM1, power-off, exit status 1.
    Runs,
    /// Refused before any VM exists: this exit status and message (the one
    /// FreeBSD's bhyve prints for the same line, or, where this edition
    /// lacks a device, FreeBSD's message for a device it does not know).
    Refused(i32, &'static str),
    /// Prints this and exits with that status (help, config.dump).
    Prints(i32, &'static str),
}

/// Lines in the shape libvirt's bhyve driver, vm-bhyve and FreeBSD's
/// vmrun.sh (and the Handbook, bhyve(8)) generate them. Stand-ins: {ROM}
/// the boot ROM (BHYVE_UEFI.fd, OVMF), {VARS} a variable store, {DISK},
/// {DISK2} disk images, {ISO} install media, {CON} the console device
/// (/dev/nmdmNA), {TAP} a tap interface, {NAME} the VM.
const CORPUS: &[(&str, &str, Expect)] = {
    use Expect::*;
    &[
        ("libvirt, UEFI, ahci disk", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,ahci,hd:{DISK} -s 3:0,virtio-net,{TAP},mac=52:54:00:b9:94:02 -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, UEFI with vars, ahci disk and cd", "-c 2 -m 1024 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM},{VARS} -s 2:0,ahci,hd:{DISK},cd:{ISO} -s 3:0,virtio-net,{TAP},mac=52:54:00:00:00:01 -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, virtio-blk", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,virtio-blk,{DISK} -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, two ahci controllers", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,ahci,hd:{DISK} -s 3:0,ahci,cd:{ISO} -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, memory in bytes suffix", "-c 2 -m 512MB -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,ahci,hd:{DISK} -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, hex memory", "-c 1 -m 0x10000000 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, virtio-rnd", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,virtio-rnd -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, ahci sectorsize and serial", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,ahci,hd:{DISK},sectorsize=4096,ser=123456 -s 1,lpc -l com1,{CON} {NAME}", Runs),
        ("libvirt, fbuf (VNC)", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,ahci,hd:{DISK} -s 3:0,fbuf,tcp=127.0.0.1:5904 -s 4:0,xhci,tablet -s 1,lpc -l com1,{CON} {NAME}", Refused(4, "pci slot 0:3:0: unknown device \"fbuf\"")),
        ("libvirt, xhci tablet", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 4:0,xhci,tablet -s 1,lpc -l com1,{CON} {NAME}", Refused(4, "pci slot 0:4:0: unknown device \"xhci\"")),
        ("libvirt, e1000", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 3:0,e1000,{TAP},mac=52:54:00:00:00:02 -s 1,lpc -l com1,{CON} {NAME}", Refused(4, "pci slot 0:3:0: unknown device \"e1000\"")),
        ("libvirt, nvme", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,nvme,{DISK} -s 1,lpc -l com1,{CON} {NAME}", Refused(4, "pci slot 0:2:0: unknown device \"nvme\"")),
        ("libvirt, virtio-9p", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 2:0,virtio-9p,shared=/tmp -s 1,lpc -l com1,{CON} {NAME}", Refused(4, "pci slot 0:2:0: unknown device \"virtio-9p\"")),
        ("libvirt, TCP console", "-c 1 -m 214 -A -I -u -H -P -s 0:0,hostbridge -l bootrom,{ROM} -s 1,lpc -l com1,tcp=127.0.0.1:{PORT} {NAME}", Runs),
        ("vm-bhyve, uefi", "-c 1 -m 256M -AHP -U 3b1a2c4d-0000-4000-8000-000000000001 -u -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -s 5:0,virtio-net,{TAP},mac=58:9c:fc:00:00:01 -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, uefi vars", "-c 2 -m 512M -AHP -U 3b1a2c4d-0000-4000-8000-000000000002 -u -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -s 5:0,virtio-net,{TAP},mac=58:9c:fc:00:00:02 -l com1,{CON} -l bootrom,{ROM},{VARS} {NAME}", Runs),
        ("vm-bhyve, ahci-hd", "-c 1 -m 256M -AHP -U 3b1a2c4d-0000-4000-8000-000000000003 -s 0,hostbridge -s 31,lpc -s 4:0,ahci-hd,{DISK} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, install from ISO", "-c 1 -m 256M -AHP -U 3b1a2c4d-0000-4000-8000-000000000004 -s 0,hostbridge -s 31,lpc -s 3:0,ahci-cd,{ISO} -s 4:0,virtio-blk,{DISK} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, two disks and topology", "-c 2,sockets=1,cores=1,threads=2 -m 1G -AHP -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -s 4:1,virtio-blk,{DISK2} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, wired memory", "-c 1 -m 256M -AHPS -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, debug console", "-c 1 -m 256M -AHP -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -s 6:0,virtio-console,org.qemu.guest_agent.0={SOCK} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vm-bhyve, graphics", "-c 1 -m 256M -AHP -s 0,hostbridge -s 31,lpc -s 4:0,virtio-blk,{DISK} -s 7:0,fbuf,tcp=0.0.0.0:5900,w=1024,h=768 -s 8:0,xhci,tablet -l com1,{CON} -l bootrom,{ROM} {NAME}", Refused(4, "pci slot 0:7:0: unknown device \"fbuf\"")),
        ("vmrun.sh, UEFI", "-c 2 -m 512M -A -H -P -s 0:0,hostbridge -s 1:0,lpc -s 2:0,virtio-net,{TAP} -s 3:0,virtio-blk,{DISK} -s 4:0,ahci-cd,{ISO} -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("vmrun.sh, UEFI with vars", "-c 1 -m 256M -A -H -P -s 0:0,hostbridge -s 1:0,lpc -s 3:0,virtio-blk,{DISK} -l com1,{CON} -l bootrom,{ROM},{VARS} {NAME}", Runs),
        ("vmrun.sh, loader-booted (no bootrom, no bhyveload)", "-c 1 -m 256M -A -H -P -s 0:0,hostbridge -s 1:0,lpc -s 3:0,virtio-blk,{DISK} -l com1,{CON} {NAME}", Refused(4, "no bootrom was configured")),
        ("bhyve(8), four serial ports", "-c 1 -m 256M -s 0,hostbridge -s 31,lpc -l com1,{CON} -l com2,{CON} -l com3,{CON} -l com4,tcp={PORT} -l bootrom,{ROM} {NAME}", Runs),
        ("Handbook, NUMA domain", "-c 2 -m 512M -n 0,512M,0-1 -A -H -P -s 0:0,hostbridge -s 31,lpc -l com1,{CON} -l bootrom,{ROM} {NAME}", Runs),
        ("Handbook, two NUMA domains", "-c 2 -m 512M -n 0,256M,0 -n 1,256M,1 -s 0:0,hostbridge -s 31,lpc -l com1,{CON} -l bootrom,{ROM} {NAME}", Refused(64, "only one domain is supported")),
        ("bhyve(8), bootrom without a file", "-s 0,hostbridge -s 31,lpc -l bootrom {NAME}", Refused(4, "invalid bootrom option \"bootrom\"")),
        ("bhyve(8), unknown lpc device", "-l com9,stdio {NAME}", Refused(64, "invalid lpc device configuration 'com9,stdio'")),
        ("bhyve(8), bad memory size", "-m 1Q -l bootrom,{ROM} {NAME}", Refused(64, "invalid memsize '1Q'")),
        ("bhyve(8), bad topology", "-c cpus=2,bogus=1 -l bootrom,{ROM} {NAME}", Refused(64, "invalid cpu topology 'cpus=2,bogus=1'")),
        ("bhyve(8), occupied slot", "-s 3,virtio-rnd -s 3,virtio-rnd -l bootrom,{ROM} {NAME}", Refused(4, "pci slot 0:3:0 already occupied!")),
        ("bhyve(8), config.dump", "-c 2 -m 1G -s 0,hostbridge -s 31,lpc -l com1,stdio -o config.dump=1 {NAME}",
            Prints(1, "acpi_tables=false\nacpi_tables_in_memory=true\nmemory.size=1G\nx86.strictmsr=true\nlpc.fwcfg=bhyve\nlpc.com1.path=stdio\ncpus=2\npci.0.0.0.device=hostbridge\npci.0.31.0.device=lpc\nconfig.dump=1\nname={NAME}\n")),
    ]
};

/// A tap interface the member may open, removed when dropped.
struct Tap(String);

impl Tap {
    fn new() -> Tap {
        let name = format!("tapbc{}", std::process::id() % 100_000);
        let st = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap", "user", "0"])
            .status()
            .expect("ip tuntap (iproute2)");
        assert!(st.success(), "cannot create tap {name}");
        Tap(name)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["tuntap", "del", "dev", &self.0, "mode", "tap"])
            .status();
    }
}

#[test]
fn peer_corpus_runs_or_is_refused_as_freebsd() {
    if !prerequisites() {
        return;
    }
    assert!(CORPUS.len() >= 30);
    let m = Mount::new("corpus");
    let tap = Tap::new();
    let rom = guest("hello.rom");
    let disk = m.file("disk.img", &[], 0o644);
    let f = std::fs::File::options().write(true).open(&disk).unwrap();
    f.set_len(8 << 20).unwrap();
    let disk2 = m.file("disk2.img", &vec![0; 1 << 20], 0o644);
    let iso = m.file("install.iso", &vec![0; 1 << 20], 0o444);
    let mut failures = Vec::new();
    for (i, (origin, line, expect)) in (0u32..).zip(CORPUS) {
        let name = format!("corpus{i}");
        let con = m.file(&format!("con{i}"), &[], 0o644);
        let vars = m.file(&format!("vars{i}.fd"), &[0xff; 8192], 0o644);
        let port = 20000 + (std::process::id() % 20000) + i;
        let args = line
            .replace("{ROM}", &rom.display().to_string())
            .replace("{VARS}", &vars.display().to_string())
            .replace("{DISK2}", &disk2.display().to_string())
            .replace("{DISK}", &disk.display().to_string())
            .replace("{ISO}", &iso.display().to_string())
            .replace("{CON}", &con.display().to_string())
            .replace(
                "{SOCK}",
                &m.dir.join(format!("s{i}.sock")).display().to_string(),
            )
            .replace("{TAP}", &tap.0)
            .replace("{PORT}", &port.to_string())
            .replace("{NAME}", &name);
        let mut c = m.cmd("bhyve", Who::Root);
        c.args(args.split(' '));
        let out = run(c, 60);
        let con_text = std::fs::read_to_string(&con).unwrap_or_default();
        let ok = match expect {
            Expect::Runs => {
                out.code == Some(1)
                    && (con_text.contains("hello from bootrom") || line.contains("tcp="))
            }
            Expect::Refused(code, msg) => out.code == Some(*code) && out.stderr.contains(msg),
            Expect::Prints(code, text) => {
                out.code == Some(*code) && out.stdout == text.replace("{NAME}", &name)
            }
        };
        // Persistent VMs (no -M, as these managers run bhyve) are removed.
        let mut d = m.cmd("bhyvectl", Who::Root);
        d.arg(format!("--vm={name}")).arg("--destroy");
        let _ = run(d, 20);
        if !ok {
            failures.push(format!(
                "{origin}: bhyve {args}\n  exit {:?}\n  stderr: {}\n  console: {}",
                out.code,
                out.stderr.trim(),
                con_text.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} lines did not behave:\n{}",
        failures.len(),
        CORPUS.len(),
        failures.join("\n")
    );
}
