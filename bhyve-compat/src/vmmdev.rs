//! Client side of vmmfs: `$VMM_DEV_DIR/vmmctl`, `vmm/NAME`, `vmm.io/NAME.SEG`.
//! Nothing here touches /dev/kvm.

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::stat::Mode;
use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use vmm_protocol::command::Command;
use vmm_protocol::handover::{self, Ack, Fds, Greeting, MAX_MESSAGE};
use vmm_protocol::vmmctl::{validate_name, CtlRequest};

/// Where the vmmfs files are.
#[derive(Debug, Clone)]
pub struct VmmDev {
    dir: PathBuf,
}

impl VmmDev {
    /// `$VMM_DEV_DIR`, default `/dev`.
    pub fn from_env() -> Self {
        let dir = std::env::var_os("VMM_DEV_DIR")
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/dev"));
        VmmDev { dir }
    }

    /// Files under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        VmmDev { dir: dir.into() }
    }

    /// The vmmctl path.
    pub fn ctl_path(&self) -> PathBuf {
        self.dir.join("vmmctl")
    }

    /// The `vmm/NAME` path.
    pub fn vm_path(&self, name: &str) -> PathBuf {
        self.dir.join("vmm").join(name)
    }

    /// The descriptor hand-over socket.
    pub fn socket_path(&self) -> PathBuf {
        self.dir.join(handover::SOCKET_NAME)
    }

    /// Open vmmctl read-write.
    pub fn open_ctl(&self) -> std::result::Result<Ctl, Errno> {
        let fd = open(
            &self.ctl_path(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Ctl { fd })
    }

    /// Open `vmm/NAME` read-write.
    pub fn open_vm(&self, name: &str) -> std::result::Result<VmHandle, Errno> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Errno::ENOENT);
        }
        let fd = open(
            &self.vm_path(name),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )?;
        Ok(VmHandle {
            fd,
            name: name.to_string(),
            socket_path: self.socket_path(),
            handover: OnceCell::new(),
        })
    }

    /// Segments of VM `name`: (segment name, size in bytes), sorted by name.
    pub fn segments(&self, name: &str) -> std::result::Result<Vec<(String, u64)>, Errno> {
        let dir = self.dir.join("vmm.io");
        let prefix = format!("{name}.");
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
        for ent in rd.flatten() {
            let fname = ent.file_name();
            let Some(fname) = fname.to_str() else {
                continue;
            };
            let Some(seg) = fname.strip_prefix(&prefix) else {
                continue;
            };
            if seg.is_empty() || seg.contains('.') {
                continue;
            }
            let size = std::fs::metadata(dir.join(fname))
                .map(|m| m.len())
                .unwrap_or(0);
            out.push((seg.to_string(), size));
        }
        out.sort();
        Ok(out)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// An open vmmctl.
#[derive(Debug)]
pub struct Ctl {
    fd: OwnedFd,
}

fn write_line(fd: BorrowedFd<'_>, line: &str) -> std::result::Result<(), Errno> {
    loop {
        match nix::unistd::write(fd, line.as_bytes()) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

impl Ctl {
    /// `create NAME [destroy-on-close]`.
    pub fn create(&self, name: &str, destroy_on_close: bool) -> std::result::Result<(), Errno> {
        validate_name(name).map_err(|_| Errno::EINVAL)?;
        let req = CtlRequest::Create {
            name: name.into(),
            transient: destroy_on_close,
        };
        write_line(self.fd.as_fd(), &req.to_string())
    }

    /// `destroy NAME`.
    pub fn destroy(&self, name: &str) -> std::result::Result<(), Errno> {
        validate_name(name).map_err(|_| Errno::EINVAL)?;
        write_line(
            self.fd.as_fd(),
            &CtlRequest::Destroy { name: name.into() }.to_string(),
        )
    }
}

impl AsFd for Ctl {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A VM's status: `key=value` lines read from `vmm/NAME`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub vars: BTreeMap<String, String>,
    /// The `error=` line left by a failed command, if any.
    pub error: Option<String>,
}

impl Status {
    /// Parse the status text.
    pub fn parse(text: &str) -> Status {
        let mut s = Status::default();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                if k == "error" {
                    s.error = Some(v.to_string());
                } else {
                    s.vars.insert(k.to_string(), v.to_string());
                }
            }
        }
        s
    }

    /// `state=`.
    pub fn state(&self) -> &str {
        self.vars.get("state").map(String::as_str).unwrap_or("")
    }

    /// `status=` as a number (when exited).
    pub fn exit_status(&self) -> Option<i32> {
        self.vars.get("status").and_then(|v| v.parse().ok())
    }

    /// `memory=` bytes.
    pub fn memory(&self) -> Option<u64> {
        self.vars.get("memory").and_then(|v| v.parse().ok())
    }
}

/// An open `vmm/NAME`.
#[derive(Debug)]
pub struct VmHandle {
    fd: OwnedFd,
    name: String,
    socket_path: PathBuf,
    /// The hand-over connection attached to this handle, made on first use.
    handover: OnceCell<OwnedFd>,
}

/// What woke [`VmHandle::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The VM's state may have changed.
    Vm,
    /// The extra descriptor with this index is readable or hung up.
    Extra(usize),
    /// Timeout.
    Timeout,
}

impl VmHandle {
    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Send one command; on failure, the daemon's message (`error=`) is attached.
    /// The descriptors it names are handed over first (see vmm(4), DESCRIPTORS).
    pub fn command(&self, cmd: &Command) -> Result<()> {
        let fds = cmd.descriptors();
        if !fds.is_empty() {
            self.send_fds(&fds)?;
        }
        let cmd = cmd.to_string();
        log::debug!("vmm/{}: {cmd}", self.name);
        write_line(self.fd.as_fd(), &cmd).map_err(|errno| self.command_error(cmd, errno))
    }

    fn command_error(&self, command: String, errno: Errno) -> Error {
        let detail = self.status().ok().and_then(|s| s.error);
        Error::Command {
            command,
            errno,
            detail,
        }
    }

    /// The hand-over connection, connected and attached on first use.
    fn connection(&self) -> Result<BorrowedFd<'_>> {
        if let Some(c) = self.handover.get() {
            return Ok(c.as_fd());
        }
        use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let path = &self.socket_path;
        let what = || format!("connect {}", path.display());
        let sock = socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| Error::sys(what(), e))?;
        let addr = UnixAddr::new(path).map_err(|e| Error::sys(what(), e))?;
        connect(sock.as_raw_fd(), &addr).map_err(|e| Error::sys(what(), e))?;
        let greeting = recv_text(&sock).map_err(|e| Error::sys(what(), e))?;
        let nonce = match Greeting::parse(&greeting) {
            Ok(Greeting(n)) => n,
            Err(_) => {
                // A refusal is an acknowledgement with the daemon's reason.
                return Err(match Ack::parse(&greeting) {
                    Ok(Ack::Error { errno, message }) => Error::Command {
                        command: "connect".into(),
                        errno: Errno::from_raw(errno),
                        detail: Some(message),
                    },
                    _ => Error::Other(format!("{}: not a vmmfs hand-over socket", path.display())),
                });
            }
        };
        let line = handover::attach_line(&nonce);
        write_line(self.fd.as_fd(), &line)
            .map_err(|errno| self.command_error("attach".into(), errno))?;
        Ok(self.handover.get_or_init(|| sock).as_fd())
    }

    /// Hand descriptors `fds` (this process's own, named by their numbers) to the VM.
    pub fn send_fds(&self, fds: &[i32]) -> Result<()> {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let conn = self.connection()?;
        let text = Fds(fds.to_vec()).to_string();
        let failed = |errno| Error::Command {
            command: text.clone(),
            errno,
            detail: Some("handing descriptors over".into()),
        };
        loop {
            match sendmsg::<()>(
                conn.as_raw_fd(),
                &[std::io::IoSlice::new(text.as_bytes())],
                &[ControlMessage::ScmRights(fds)],
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(failed(e)),
            }
        }
        let reply = recv_text(&conn).map_err(failed)?;
        match Ack::parse(&reply) {
            Ok(Ack::Ok) => Ok(()),
            Ok(Ack::Error { errno, message }) => Err(Error::Command {
                command: text.clone(),
                errno: Errno::from_raw(errno),
                detail: Some(message),
            }),
            Err(_) => Err(failed(Errno::EPROTO)),
        }
    }

    /// Read the status text (from offset 0).
    pub fn status(&self) -> std::result::Result<Status, Errno> {
        let mut buf = vec![0u8; 8192];
        let mut len = 0usize;
        loop {
            if len == buf.len() {
                if buf.len() >= 1 << 20 {
                    break;
                }
                buf.resize(buf.len() * 2, 0);
            }
            // len stays below 2 MiB (the loop's bound).
            let offset = libc::off_t::try_from(len).map_err(|_| Errno::EOVERFLOW)?;
            match nix::sys::uio::pread(self.fd.as_fd(), &mut buf[len..], offset) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Status::parse(&String::from_utf8_lossy(&buf[..len])))
    }

    /// Wait until the VM's handle polls readable, one of `extra` is readable
    /// or hung up, or `timeout_ms` passes (-1: no timeout).
    pub fn wait(
        &self,
        extra: &[BorrowedFd<'_>],
        timeout_ms: i32,
    ) -> std::result::Result<Wake, Errno> {
        let mut fds = Vec::with_capacity(extra.len() + 1);
        fds.push(PollFd::new(self.fd.as_fd(), PollFlags::POLLIN));
        for e in extra {
            fds.push(PollFd::new(*e, PollFlags::POLLIN));
        }
        let timeout = if timeout_ms < 0 {
            PollTimeout::NONE
        } else {
            PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX)
        };
        loop {
            match poll(&mut fds, timeout) {
                Ok(0) => return Ok(Wake::Timeout),
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
        for (i, p) in fds.iter().enumerate().skip(1) {
            if p.revents().is_some_and(|r| !r.is_empty()) {
                return Ok(Wake::Extra(i - 1));
            }
        }
        Ok(Wake::Vm)
    }

    /// The raw descriptor.
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// One message from a hand-over socket, as text.
fn recv_text(sock: &impl AsFd) -> std::result::Result<String, Errno> {
    let mut buf = [0u8; MAX_MESSAGE];
    loop {
        match nix::sys::socket::recv(
            sock.as_fd().as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::empty(),
        ) {
            Ok(0) => return Err(Errno::ECONNRESET),
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
}

impl AsFd for VmHandle {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_parsing() {
        let s = Status::parse("error=bad image\nname=vm1\nstate=exited\ncpus=1\nmemory=67108864\nexit=poweroff\nstatus=1\n");
        assert_eq!(s.error.as_deref(), Some("bad image"));
        assert_eq!(s.state(), "exited");
        assert_eq!(s.exit_status(), Some(1));
        assert_eq!(s.memory(), Some(64 << 20));
        let s = Status::parse("garbage\n\nstate=running");
        assert_eq!(s.state(), "running");
        assert_eq!(s.exit_status(), None);
    }

    #[test]
    fn paths() {
        let d = VmmDev::new("/mnt");
        assert_eq!(d.ctl_path(), PathBuf::from("/mnt/vmmctl"));
        assert_eq!(d.vm_path("a"), PathBuf::from("/mnt/vmm/a"));
        assert_eq!(d.open_vm("../x").unwrap_err(), Errno::ENOENT);
    }
}
