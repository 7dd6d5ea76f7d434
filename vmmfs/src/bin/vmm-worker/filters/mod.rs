//! Seccomp allow-lists, one per kind of thread (vmmfs(8) SECCOMP).
//!
//! The main thread installs [`Kind::Main`] before it reads a request; every
//! engine thread adds the filter of its kind when it starts (the engine's
//! start hook), on top of the one it inherited. Filters stack: a thread may
//! make a call only if every filter it carries allows it. A thread's filter
//! must therefore also allow what the threads it starts need: device
//! threads are started by vCPU threads (a guest writes DRIVER_OK), so the
//! vCPU list includes the device list.
//!
//! Anything else kills the whole worker (SECCOMP_RET_KILL_PROCESS): the
//! daemon reports it as the VM's `cause=` and destroys the VM.
//!
//! The lists were measured (strace of the engine's test guests and the
//! conformance suite under workers) and then trimmed to what the code
//! calls. `ioctl` is allowed only for KVM's requests (type 0xAE) and
//! FIONREAD; `clone`/`clone3` only make threads; `socket`, `open*`,
//! `execve`, `ptrace`, `mount`, `kill` of other processes and the like
//! are in no list.

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule,
};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use vmm_engine::threads::ThreadKind;

mod tree;

/// Which filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request loop: creates and configures the VM, starts its threads.
    Main,
    Vcpu,
    Device,
    Helper,
}

/// What every thread does to live: memory, locks, signals, time, exit.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    // Kicking a vCPU out of KVM_RUN; the worker's PID namespace and uid
    // hold nobody else to signal.
    libc::SYS_tgkill,
    libc::SYS_getrandom,
    libc::SYS_close,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_fcntl,
];

/// Starting a thread (glibc's pthread_create and Rust's thread setup); the
/// new thread installs its own filter under its parent's, which can only
/// narrow what it may do.
const THREADS: &[i64] = &[libc::SYS_clone3, libc::SYS_clone, libc::SYS_seccomp];

/// Device back ends: client disks, consoles, sockets, taps, eventfds.
const DEVICE_IO: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    // Rust's File::metadata (the UEFI variable file's size); the worker's
    // root is empty, so a path names nothing of the host's.
    libc::SYS_statx,
    libc::SYS_fallocate,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    // virtio-net's slirp back end bounds its sends (SO_SNDTIMEO).
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
];

/// Only the main thread makes memory and receives the daemon's descriptors.
const MAIN_ONLY: &[i64] = &[
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_recvmsg,
    libc::SYS_rt_sigaction,
    libc::SYS_pipe2,
    libc::SYS_socketpair,
    // An adoptable VM's socket for a restarted daemon (main.rs).
    libc::SYS_listen,
    libc::SYS_accept4,
];

/// Status reports go to the daemon from whichever thread saw the change;
/// a status counts the guest memory's allocated blocks (fstat of its memfds).
const REPORT: &[i64] = &[libc::SYS_sendmsg, libc::SYS_fstat, libc::SYS_newfstatat];

/// KVM's ioctl type.
const KVMIO: u64 = 0xAE;

fn ioctl_rules() -> Vec<SeccompRule> {
    let kvm = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(0xff00),
        KVMIO << 8,
    );
    let fionread =
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, libc::FIONREAD);
    [kvm, fionread]
        .into_iter()
        .map(|c| SeccompRule::new(vec![c.expect("a valid condition")]).expect("a valid rule"))
        .collect()
}

/// `clone` and `clone3` only for threads: CLONE_THREAD set in the flags
/// (clone3's flags are in memory the filter cannot read: it is allowed to
/// the threads that start threads, and the kernel refuses new namespaces
/// to a worker without capabilities).
fn clone_rule() -> Vec<SeccompRule> {
    let thread = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
        libc::CLONE_THREAD as u64,
    )
    .expect("a valid condition");
    vec![SeccompRule::new(vec![thread]).expect("a valid rule")]
}

/// The system calls of `kind`.
pub fn syscalls(kind: Kind) -> Vec<i64> {
    let mut v: Vec<i64> = COMMON.iter().chain(REPORT).copied().collect();
    match kind {
        Kind::Main => {
            v.extend(THREADS);
            v.extend(DEVICE_IO);
            v.extend(MAIN_ONLY);
        }
        Kind::Vcpu => {
            v.extend(THREADS);
            v.extend(DEVICE_IO);
        }
        Kind::Device => v.extend(DEVICE_IO),
        Kind::Helper => {}
    }
    v.push(libc::SYS_ioctl);
    v.sort_unstable();
    v.dedup();
    v
}

/// The allowed calls of `kind` and the argument rules of each.
fn rules_of(kind: Kind) -> BTreeMap<i64, Vec<SeccompRule>> {
    syscalls(kind)
        .into_iter()
        .map(|nr| {
            let r = match nr {
                libc::SYS_ioctl => ioctl_rules(),
                libc::SYS_clone => clone_rule(),
                _ => Vec::new(),
            };
            (nr, r)
        })
        .collect()
}

/// The compiled filter of `kind`, as a search on the call's number
/// (tree.rs says why).
pub fn program(kind: Kind) -> Result<BpfProgram, String> {
    tree::compile(
        rules_of(kind),
        SeccompAction::KillProcess,
        SeccompAction::Allow,
    )
}

/// Every kind's compiled program.
pub struct Programs {
    main: BpfProgram,
    /// vCPU, device and helper threads.
    threads: [BpfProgram; 3],
}

static PROGRAMS: OnceLock<Programs> = OnceLock::new();

/// Compile every kind's program, once. The zygote does it before it forks,
/// so a spare worker inherits them and neither its start nor a launch's
/// threads compile anything.
pub fn prepare() -> Result<&'static Programs, String> {
    if let Some(p) = PROGRAMS.get() {
        return Ok(p);
    }
    let p = Programs {
        main: program(Kind::Main)?,
        threads: [
            program(Kind::Vcpu)?,
            program(Kind::Device)?,
            program(Kind::Helper)?,
        ],
    };
    Ok(PROGRAMS.get_or_init(|| p))
}

/// Install the main thread's filter (after no_new_privs).
pub fn install() -> Result<(), String> {
    let p = prepare()?;
    seccompiler::apply_filter(&p.main).map_err(|e| e.to_string())?;
    if !vmm_engine::threads::set_start_hook(on_thread_start) {
        return Err("the engine's thread hook was already set".into());
    }
    Ok(())
}

/// The engine's start hook: confine the new thread to its kind. A thread
/// that cannot be confined must not run guest work: the worker ends.
fn on_thread_start(kind: ThreadKind) {
    let i = match kind {
        ThreadKind::Vcpu => 0,
        ThreadKind::Device => 1,
        ThreadKind::Helper => 2,
    };
    let r = PROGRAMS
        .get()
        .ok_or_else(|| "no compiled filters".to_string())
        .and_then(|p| seccompiler::apply_filter(&p.threads[i]).map_err(|e| e.to_string()));
    if let Err(e) = r {
        log::error!("cannot confine a {kind:?} thread: {e}");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_nest_as_threads_are_started() {
        let main = syscalls(Kind::Main);
        let vcpu = syscalls(Kind::Vcpu);
        for nr in &vcpu {
            assert!(
                main.contains(nr),
                "vCPU threads start from the main thread: {nr}"
            );
        }
        for nr in syscalls(Kind::Helper) {
            assert!(
                main.contains(&nr),
                "helpers start from the main thread: {nr}"
            );
        }
        for nr in syscalls(Kind::Device) {
            assert!(
                vcpu.contains(&nr),
                "device threads start from vCPU threads: {nr}"
            );
        }
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_kill,
            libc::SYS_setuid,
            libc::SYS_unshare,
            libc::SYS_connect,
        ] {
            assert!(
                !main.contains(&forbidden),
                "{forbidden} must stay forbidden"
            );
        }
        assert!(!syscalls(Kind::Device).contains(&libc::SYS_memfd_create));
        assert!(!syscalls(Kind::Vcpu).contains(&libc::SYS_recvmsg));
    }

    #[test]
    fn every_kind_compiles() {
        for k in [Kind::Main, Kind::Vcpu, Kind::Device, Kind::Helper] {
            assert!(!program(k).unwrap().is_empty());
        }
    }
}
