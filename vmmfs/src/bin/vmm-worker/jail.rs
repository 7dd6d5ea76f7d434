//! The worker's jail, entered before it reads a single request: an empty
//! read-only root in its own mount namespace (the daemon started it in new
//! mount, network, IPC, UTS and PID namespaces), resource limits, a
//! dedicated unprivileged uid/gid, no capabilities, no_new_privs and not
//! dumpable. Every step either succeeds or the worker exits: a half-jailed
//! worker never serves a VM.

use std::ffi::CStr;
use std::io::{Error, Result};

/// What the daemon chose for this worker.
pub struct Config {
    pub uid: u32,
    pub gid: u32,
    /// RLIMIT_NOFILE.
    pub max_fds: u64,
    /// RLIMIT_NPROC: the uid is this worker's alone, so this bounds its threads.
    pub max_threads: u64,
}

fn check(what: &str, rc: libc::c_long) -> Result<()> {
    if rc < 0 {
        let e = Error::last_os_error();
        return Err(Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn mount(
    src: &CStr,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: u64,
    data: Option<&CStr>,
) -> Result<()> {
    // SAFETY: every pointer is a NUL-terminated string or null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check(&format!("mount {target:?}"), rc.into())
}

/// Replace the root with an empty read-only tmpfs. The daemon's mounts
/// (its FUSE file system, the state directory, every user's files) are
/// gone from this namespace afterwards, not merely hidden.
fn empty_root() -> Result<()> {
    // Nothing done here may propagate back to the host's mounts.
    mount(c"none", c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    // Any existing directory serves as the mount point: after the pivot
    // the old tree is detached whole.
    mount(
        c"vmm-worker",
        c"/tmp",
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
        Some(c"size=4k,nr_inodes=4,mode=0555"),
    )?;
    // SAFETY: plain syscalls with NUL-terminated paths.
    unsafe {
        check("chdir", libc::chdir(c"/tmp".as_ptr()).into())?;
        // pivot_root(".", "."): the old root is stacked on the new one...
        check(
            "pivot_root",
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
        )?;
        // ...and detached, with everything mounted below it.
        check(
            "umount old root",
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH).into(),
        )?;
        check("chdir /", libc::chdir(c"/".as_ptr()).into())?;
    }
    Ok(())
}

fn limit(resource: libc::__rlimit_resource_t, n: u64, what: &str) -> Result<()> {
    let l = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: setrlimit reads `l`.
    check(what, unsafe { libc::setrlimit(resource, &l) }.into())
}

/// Become `uid`/`gid` with no supplementary groups and no capabilities in
/// any set (bounding and ambient included), so nothing can bring root back.
fn drop_privileges(cfg: &Config) -> Result<()> {
    // SAFETY: prctl and credential syscalls with scalar arguments.
    unsafe {
        // The bounding set needs CAP_SETPCAP to shrink: before the uid change.
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0
                && Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
            {
                return Err(Error::new(
                    Error::last_os_error().kind(),
                    format!("PR_CAPBSET_DROP {cap}: {}", Error::last_os_error()),
                ));
            }
        }
        check(
            "PR_CAP_AMBIENT_CLEAR_ALL",
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
            .into(),
        )?;
        let none: [libc::gid_t; 0] = [];
        check("setgroups", libc::setgroups(0, none.as_ptr()).into())?;
        check(
            "setresgid",
            libc::setresgid(cfg.gid, cfg.gid, cfg.gid).into(),
        )?;
        // Leaving uid 0 clears the permitted and effective sets.
        check(
            "setresuid",
            libc::setresuid(cfg.uid, cfg.uid, cfg.uid).into(),
        )?;
        // The inheritable set survives a uid change: empty it too.
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData::default(); 2];
        check(
            "capset",
            libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr()),
        )?;
        check(
            "PR_SET_NO_NEW_PRIVS",
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0).into(),
        )?;
        // After the uid change, which may reset it: no core dumps, no
        // ptrace by the uid, /proc/PID files owned by root.
        check(
            "PR_SET_DUMPABLE",
            libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0).into(),
        )?;
    }
    Ok(())
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Enter the jail. Called first thing, single-threaded, as root.
pub fn enter(cfg: &Config) -> Result<()> {
    if cfg.uid == 0 || cfg.gid == 0 {
        return Err(Error::other("refusing to run a VM as uid or gid 0"));
    }
    empty_root()?;
    // Cosmetic in the worker's own UTS namespace, so a refusal (systemd's
    // ProtectHostname= forbids the call) is no reason to stop.
    // SAFETY: sethostname reads the given bytes.
    unsafe { libc::sethostname(c"vmm-worker".as_ptr(), 10) };
    limit(libc::RLIMIT_NOFILE, cfg.max_fds, "RLIMIT_NOFILE")?;
    limit(libc::RLIMIT_NPROC, cfg.max_threads, "RLIMIT_NPROC")?;
    limit(libc::RLIMIT_CORE, 0, "RLIMIT_CORE")?;
    drop_privileges(cfg)?;
    // SAFETY: trivial getters.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid != cfg.uid || euid != cfg.uid {
        return Err(Error::other("the uid did not change"));
    }
    Ok(())
}
