//! What the workspace's integration tests share (a dev-dependency only).
//!
//! Tests that need the real thing (root, /dev/kvm, /dev/fuse, a member of
//! the vmm group) skip loudly on a developer's machine that lacks it and fail
//! in CI, where a silent skip would hide that nothing was tested.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether this is a CI run (`CI` set to anything but empty, `0` or `false`).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// Whether the process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Root,
    /// A device node that must open read-write (`/dev/kvm`, `/dev/fuse`).
    Device(&'static str),
    /// A user that must exist and be a member of the group `vmm`.
    VmmMember(&'static str),
}

impl Need {
    /// Why it is missing, or None when it is there.
    fn missing(self) -> Option<String> {
        match self {
            Need::Root => (!is_root()).then(|| "not root".to_string()),
            Need::Device(path) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .err()
                .map(|e| format!("{path}: {e}")),
            Need::VmmMember(user) => {
                let member = group_entry("vmm").is_some_and(|g| {
                    g.split(':')
                        .nth(3)
                        .is_some_and(|m| m.split(',').any(|u| u == user))
                });
                (!member).then(|| format!("no user {user} in group vmm (scripts/setup)"))
            }
        }
    }
}

/// True when everything `needs` is there. Otherwise: a panic in CI, a
/// `SKIPPED:` line naming `tests` and the reason elsewhere, and false.
pub fn require(tests: &str, needs: &[Need]) -> bool {
    let why: Vec<String> = needs.iter().filter_map(|n| n.missing()).collect();
    if why.is_empty() {
        return true;
    }
    let why = why.join("; ");
    assert!(!in_ci(), "{tests} cannot run in CI: {why}");
    eprintln!("SKIPPED: {tests}: {why}");
    false
}

/// `require(tests, [/dev/kvm])`.
pub fn kvm_or_skip(tests: &str) -> bool {
    require(tests, &[Need::Device("/dev/kvm")])
}

fn group_entry(name: &str) -> Option<String> {
    std::fs::read_to_string("/etc/group")
        .ok()?
        .lines()
        .find(|l| l.split(':').next() == Some(name))
        .map(str::to_string)
}

/// The group for a test mount: `vmm` where it exists (scripts/setup makes
/// it), root's group on a developer's machine without it.
pub fn vmm_group() -> &'static str {
    if group_entry("vmm").is_some() {
        "vmm"
    } else {
        "root"
    }
}

/// A process id as `Child::id` gives it, as the kernel's `pid_t` (kill(2),
/// waitpid(2), pidfd_open(2)). Pids never exceed pid_max (2^22), so this
/// only fails, failing the test, for a number that is no pid.
pub fn pid_t(id: u32) -> libc::pid_t {
    libc::pid_t::try_from(id).expect("a process id fits pid_t")
}

/// Wait until `f` holds, checking every 20 ms; panics naming `what` once
/// `within` has passed. For effects that lag behind what a test can wait
/// on by design (a reply that comes before the clean-up it announces).
pub fn wait_for(what: &str, within: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(t0.elapsed() < within, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A close-on-exec pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut p = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and ours.
    unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) }
}

/// Build the engine's test guests (vmm-engine/guests: make, gcc, binutils)
/// into `out`, all of them or only `targets` (file names), and return
/// `out`.
pub fn build_guests(out: &Path, targets: &[&str]) -> PathBuf {
    std::fs::create_dir_all(out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vmm-engine/guests");
    let st = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", out.display()))
        .args(targets.iter().map(|t| out.join(t)))
        .status()
        .expect("make for the test guests (needs make, as, ld, gcc)");
    assert!(st.success(), "building the test guests {targets:?} failed");
    out.to_path_buf()
}
