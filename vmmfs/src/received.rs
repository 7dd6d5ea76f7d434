//! Descriptors a client sent: what kind each is, and whether a VM may have it.
//!
//! Only what a device can use is accepted: regular files and block devices
//! (disks, boot images), pipes, ttys, sockets and /dev/null (consoles), tap
//! devices (network). Refused: files of the vmmfs mount itself (a VM holding
//! its own vmmctl or vmm/NAME descriptor would outlive its monitor), O_PATH
//! descriptors, directories, anonymous files (eventfd, epoll, io_uring,
//! pidfd...) and every other character device.
//!
//! Nothing here may block on a user: the type comes from statx with
//! AT_STATX_DONT_SYNC (no FUSE GETATTR, no NFS round trip), the anonymous
//! check from the /proc link text.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// SO_PASSRIGHTS (Linux 6.16): refuse SCM_RIGHTS sent to this socket. Not in
/// the libc crate yet.
const SO_PASSRIGHTS: libc::c_int = 83;

/// What a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Regular {
        size: u64,
    },
    Block,
    Pipe,
    Socket,
    Tty,
    /// /dev/null or /dev/zero.
    Null,
    /// /dev/net/tun (a tap the client opened and configured).
    Tap,
}

/// A descriptor a client sent, checked.
#[derive(Debug)]
pub struct Received {
    pub fd: OwnedFd,
    pub kind: Kind,
}

/// Why a descriptor was refused.
pub type Refusal = String;

/// The descriptors one command names, by the client's labels.
pub use vmm_protocol::command::Labelled;

/// Classify `fd`. `own_dev`: the device number of the vmmfs mount.
pub fn classify(fd: &OwnedFd, own_dev: Option<(u32, u32)>) -> Result<Kind, Refusal> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(format!("fcntl: {}", std::io::Error::last_os_error()));
    }
    if flags & libc::O_PATH != 0 {
        return Err("an O_PATH descriptor cannot be read or written".into());
    }
    // SAFETY: `libc::statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx writes only into `stx`, which lives across the call; the
    // empty C string with AT_EMPTY_PATH names `raw`, a descriptor we own.
    let rc = unsafe {
        libc::statx(
            raw,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_STATX_DONT_SYNC,
            libc::STATX_TYPE | libc::STATX_SIZE,
            &mut stx,
        )
    };
    if rc != 0 {
        return Err(format!("statx: {}", std::io::Error::last_os_error()));
    }
    if own_dev == Some((stx.stx_dev_major, stx.stx_dev_minor)) {
        return Err("files of the vmmfs mount itself cannot be handed to a VM".into());
    }
    let mode = u32::from(stx.stx_mode) & libc::S_IFMT;
    match mode {
        libc::S_IFREG => {
            let target = std::fs::read_link(format!("/proc/self/fd/{raw}"))
                .map_err(|e| format!("reading the descriptor's link: {e}"))?;
            if !target.as_os_str().as_encoded_bytes().starts_with(b"/") {
                return Err(format!(
                    "{} is not a file a device can use",
                    target.display()
                ));
            }
            Ok(Kind::Regular { size: stx.stx_size })
        }
        libc::S_IFBLK => Ok(Kind::Block),
        libc::S_IFIFO => Ok(Kind::Pipe),
        libc::S_IFSOCK => check_socket(fd).map(|()| Kind::Socket),
        libc::S_IFCHR => {
            match (stx.stx_rdev_major, stx.stx_rdev_minor) {
                (1, 3) | (1, 5) => return Ok(Kind::Null),
                (10, 200) => return Ok(Kind::Tap),
                _ => {}
            }
            // SAFETY: isatty on a descriptor we own.
            if unsafe { libc::isatty(raw) } == 1 {
                return Ok(Kind::Tty);
            }
            Err(format!(
                "character device {}:{} cannot be used by a VM",
                stx.stx_rdev_major, stx.stx_rdev_minor
            ))
        }
        libc::S_IFDIR => Err("a directory cannot be used by a VM".into()),
        _ => Err(format!("file type {mode:#o} cannot be used by a VM")),
    }
}

fn sockopt(raw: i32, opt: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len: libc::socklen_t =
        const { vmm_engine::cast::const_u32(std::mem::size_of::<libc::c_int>() as u64) };
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let rc = unsafe {
        libc::getsockopt(
            raw,
            libc::SOL_SOCKET,
            opt,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

static NO_PASSRIGHTS_WARNED: AtomicBool = AtomicBool::new(false);

/// A Unix socket could carry descriptors to the VM's end: a client could
/// queue its own vmmctl and vmm/NAME descriptors there and keep a monitor
/// mode VM alive after it exits. So the VM's end refuses SCM_RIGHTS from
/// now on (SO_PASSRIGHTS) and must have nothing queued yet.
fn check_socket(fd: &OwnedFd) -> Result<(), Refusal> {
    let raw = fd.as_raw_fd();
    let domain = sockopt(raw, libc::SO_DOMAIN).map_err(|e| format!("SO_DOMAIN: {e}"))?;
    match domain {
        libc::AF_INET | libc::AF_INET6 => return Ok(()),
        libc::AF_UNIX => {}
        d => {
            return Err(format!(
                "a socket of address family {d} cannot be used by a VM"
            ))
        }
    }
    if sockopt(raw, libc::SO_TYPE).map_err(|e| format!("SO_TYPE: {e}"))? != libc::SOCK_STREAM {
        return Err("a VM takes only stream Unix sockets".into());
    }
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads `off`.
    let rc = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            (&off as *const libc::c_int).cast(),
            const { vmm_engine::cast::const_u32(std::mem::size_of::<libc::c_int>() as u64) },
        )
    };
    if rc < 0 && !NO_PASSRIGHTS_WARNED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "this kernel lacks SO_PASSRIGHTS (Linux 6.16): a client could keep a \
             monitor-mode VM alive by sending descriptors into its console or network socket"
        );
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    if unsafe { libc::ioctl(raw, libc::FIONREAD, &mut queued) } < 0 {
        return Err(format!("FIONREAD: {}", std::io::Error::last_os_error()));
    }
    if queued != 0 {
        return Err("a Unix socket with data already queued cannot be handed to a VM".into());
    }
    Ok(())
}

/// The device number of the filesystem mounted at `mountpoint`, from
/// /proc/self/mountinfo (a stat would ask the daemon itself).
pub fn mount_dev(mountpoint: &std::path::Path) -> Option<(u32, u32)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    // Later lines are newer mounts: the last match is what the path shows.
    info.lines()
        .rev()
        .filter(|l| l.split(' ').nth(4) == Some(want))
        .find_map(|l| {
            let (maj, min) = l.split(' ').nth(2)?.split_once(':')?;
            Some((maj.parse().ok()?, min.parse().ok()?))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn kind(fd: impl Into<OwnedFd>) -> Result<Kind, Refusal> {
        classify(&fd.into(), None)
    }

    #[test]
    fn kinds() {
        let f = tempfile_with(b"abc");
        assert_eq!(kind(f), Ok(Kind::Regular { size: 3 }));
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert_eq!(kind(r), Ok(Kind::Pipe));
        let null = std::fs::File::open("/dev/null").unwrap();
        assert_eq!(kind(null), Ok(Kind::Null));
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(kind(a), Ok(Kind::Socket));
    }

    #[test]
    fn refusals() {
        let dir = std::fs::File::open("/").unwrap();
        assert!(kind(dir).unwrap_err().contains("directory"));
        let ev = nix::sys::eventfd::EventFd::new().unwrap();
        assert!(kind(OwnedFd::from(ev)).is_err(), "eventfd");
        // SAFETY: open with O_PATH returns a new descriptor or -1.
        let p = unsafe { libc::open(c"/etc".as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
        assert!(p >= 0);
        // SAFETY: p is a fresh descriptor.
        let p = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(p) };
        assert!(kind(p).unwrap_err().contains("O_PATH"));
        let (a, b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut &b, b"x").unwrap();
        assert!(kind(a).unwrap_err().contains("queued"));
        let (a, _b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        assert!(kind(a).unwrap_err().contains("stream"));
        let f = tempfile_with(b"");
        let stx_dev = {
            let m = std::fs::metadata(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
            use std::os::unix::fs::MetadataExt;
            (libc::major(m.dev()), libc::minor(m.dev()))
        };
        assert!(classify(&f, Some(stx_dev))
            .unwrap_err()
            .contains("vmmfs mount"));
    }

    #[test]
    fn a_handed_socket_refuses_descriptors_afterwards() {
        let (a, b) = UnixStream::pair().unwrap();
        let a: OwnedFd = a.into();
        assert_eq!(classify(&a, None), Ok(Kind::Socket));
        let null = std::fs::File::open("/dev/null").unwrap();
        let sent = nix::sys::socket::sendmsg::<()>(
            b.as_raw_fd(),
            &[std::io::IoSlice::new(b"x")],
            &[nix::sys::socket::ControlMessage::ScmRights(&[
                null.as_raw_fd()
            ])],
            nix::sys::socket::MsgFlags::empty(),
            None,
        );
        assert!(sent.is_err(), "SCM_RIGHTS into a VM's socket must fail");
    }

    fn tempfile_with(data: &[u8]) -> OwnedFd {
        let p = std::env::temp_dir().join(format!(
            "vmmfs-received-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&p, data).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        f.into()
    }
}
