//! The zygote: a `vmm-worker` the daemon starts once, as root, that forks
//! a worker per request. Forking a process that has already been loaded and
//! initialised saves the program start of every VM; the daemon still owns
//! each worker: it is cloned with CLONE_PARENT, so it is the daemon's child
//! (the daemon reaps it and learns how it died), and its pidfd goes to the
//! daemon. Nothing ties a worker's life to the daemon's (no parent-death
//! signal): when the daemon dies, an adoptable worker is re-parented and
//! waits for the next daemon (vmmfs(8) RESTART). The zygote itself runs no guest and reads nothing but the
//! daemon's requests; it exits when the daemon's end closes.

use crate::{close_from, run_worker, KVM_FD, SOCKET_FD};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_protocol::worker::{self, Spawn, Spawned};

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Serve spawn requests on `control` until the daemon goes away.
pub fn serve(control: OwnedFd) -> ! {
    loop {
        let (text, mut fds) = match worker::recv(control.as_fd()) {
            Ok(Some(m)) => m,
            Ok(None) => std::process::exit(0),
            Err(e) => {
                log::error!("zygote: receiving: {e}");
                std::process::exit(1);
            }
        };
        let answer = match (Spawn::parse(&text), fds.pop()) {
            (Ok(req), Some(sock)) if fds.is_empty() => clone_worker(&req, sock),
            _ => {
                log::error!("zygote: malformed request from the daemon");
                std::process::exit(1);
            }
        };
        let sent = match answer {
            Ok((pid, pidfd)) => worker::send(
                control.as_fd(),
                &Spawned::Pid(pid).to_string(),
                &[pidfd.as_fd()],
            ),
            Err(e) => worker::send(
                control.as_fd(),
                &Spawned::Failed(e.raw_os_error().unwrap_or(libc::EIO)).to_string(),
                &[],
            ),
        };
        if sent.is_err() {
            std::process::exit(0);
        }
    }
}

/// Clone a worker in new namespaces; it serves `sock`. The parent gets
/// its pid and pidfd.
fn clone_worker(req: &Spawn, sock: OwnedFd) -> std::io::Result<(u32, OwnedFd)> {
    let mut pidfd: RawFd = -1;
    let args = CloneArgs {
        flags: (libc::CLONE_PARENT
            | libc::CLONE_PIDFD
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS) as u64,
        pidfd: &mut pidfd as *mut RawFd as u64,
        // With CLONE_PARENT the child signals the daemon as the zygote does.
        exit_signal: 0,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM copies this single-threaded process.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // The worker: its socket becomes descriptor 3 (replacing the
        // zygote's control socket), /dev/kvm stays 4, nothing else stays.
        // SAFETY: dup2 onto a descriptor number this process owns.
        if unsafe { libc::dup2(sock.as_raw_fd(), SOCKET_FD) } < 0 {
            std::process::exit(126);
        }
        drop(sock);
        close_from(KVM_FD + 1);
        // SAFETY: descriptor 3 now is the worker's socket.
        let sock = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
        run_worker(sock, req);
    }
    drop(sock);
    // SAFETY: clone3 stored a fresh pidfd.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    // A pid is positive and below pid_max (2^22).
    let pid = u32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    Ok((pid, pidfd))
}
