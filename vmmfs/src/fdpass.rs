//! Descriptors handed over by clients: the daemon takes copies of the
//! writer's own open descriptors with pidfd_getfd(2), so it never opens a
//! user's path with root's rights.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use vmm_engine::FdSource;

/// Copies descriptors from the process of the request's thread.
pub struct ClientFds {
    pid: u32,
    pidfd: Option<OwnedFd>,
}

impl ClientFds {
    /// For requests of thread `tid` (FUSE reports thread ids).
    pub fn new(tid: u32) -> ClientFds {
        ClientFds {
            pid: tid,
            pidfd: None,
        }
    }

    fn pidfd(&mut self) -> io::Result<&OwnedFd> {
        if self.pidfd.is_none() {
            // pidfd_open needs a thread-group leader: map the thread to its process.
            let tgid = thread_group(self.pid)?;
            // SAFETY: plain syscall; the result is a new descriptor we own.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tgid as libc::pid_t, 0u32) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: fd is a fresh pidfd.
            self.pidfd = Some(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        Ok(self.pidfd.as_ref().expect("set above"))
    }
}

/// The thread-group id (process id) of thread `tid`.
fn thread_group(tid: u32) -> io::Result<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))
}

impl FdSource for ClientFds {
    fn take(&mut self, client_fd: i32) -> io::Result<OwnedFd> {
        use std::os::fd::AsRawFd;
        let pidfd = self.pidfd()?.as_raw_fd();
        // SAFETY: plain syscall; the result is a new descriptor we own (O_CLOEXEC is implied).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, client_fd, 0u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn copies_a_descriptor_of_a_process() {
        let mut f = std::fs::File::from(
            // A file only this test knows: the copy must see the same open file description.
            {
                let p = std::env::temp_dir().join(format!("vmmfs-fdpass-{}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&p)
                    .unwrap();
                std::fs::remove_file(&p).unwrap();
                OwnedFd::from(f)
            },
        );
        f.write_all(b"shared").unwrap();
        // Thread id of another thread of this process: exercises the tid -> tgid mapping.
        let tid = std::thread::spawn(|| unsafe { libc::gettid() } as u32)
            .join()
            .unwrap();
        let me = std::process::id();
        let mut src = ClientFds::new(if thread_group(tid).is_ok() { tid } else { me });
        let copy = src.take(f.as_raw_fd()).unwrap();
        let mut copy = std::fs::File::from(copy);
        copy.rewind().unwrap();
        let mut s = String::new();
        copy.read_to_string(&mut s).unwrap();
        assert_eq!(s, "shared");
        assert_eq!(
            src.take(99999).unwrap_err().raw_os_error(),
            Some(libc::EBADF)
        );
    }
}
