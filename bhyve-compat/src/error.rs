//! Errors of the bhyve tools, each with the exit status FreeBSD's tools use.

use nix::errno::Errno;
use std::path::{Path, PathBuf};

/// `EX_USAGE` from sysexits(3): bhyve's `errx(EX_USAGE, ...)`.
pub const EX_USAGE: i32 = 64;

/// Everything the tools can fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line: the usage text follows, exit status 1 (`usage(1)`).
    #[error("{}", .0.as_deref().unwrap_or("usage"))]
    Usage(Option<String>),
    /// An option value bhyve rejects with `errx(EX_USAGE, ...)` (exit 64).
    #[error("{0}")]
    BadOption(String),
    /// An invalid configuration (exit 4).
    #[error("{0}")]
    Config(String),
    /// An OS call failed: "WHAT: strerror" (exit 4).
    #[error("{what}: {}", strerror(*.errno))]
    Sys { what: String, errno: Errno },
    /// A vmm/NAME command failed; `detail` is the daemon's message if any.
    #[error("{}", command_message(.command, .errno, .detail))]
    Command {
        command: String,
        errno: Errno,
        detail: Option<String>,
    },
    /// Non-transient create refused (EPERM).
    #[error("An unprivileged user must run VMs in monitor mode")]
    Unprivileged,
    /// vmmctl (or the hand-over socket) is missing or dead: no daemon serves
    /// `dir`.
    #[error(
        "open {}: {} (is vmmfs running? searched {}; VMM_DEV_DIR names another directory)",
        .path.display(),
        strerror(*.errno),
        .dir.display()
    )]
    NoDaemon {
        path: PathBuf,
        dir: PathBuf,
        errno: Errno,
    },
    /// A create refused with ENOMEM: one of the per-user limits of vmm(4).
    #[error(
        "vm_create: {}: a per-user limit is reached (hw.vmm.maxvmms virtual machines, \
         or guest memory; the vmmfs log names it)",
        strerror(Errno::ENOMEM)
    )]
    Limit,
    /// No boot ROM or kernel given, and no VM prepared by bhyveload(8).
    #[error("no bootrom was configured")]
    NoBootrom,
    /// Anything else (exit 4).
    #[error("{0}")]
    Other(String),
}

fn command_message(command: &str, errno: &Errno, detail: &Option<String>) -> String {
    let what = describe(command);
    // The daemon's text, without the engine's category prefix.
    let detail = detail
        .as_deref()
        .map(|d| d.strip_prefix("invalid command: ").unwrap_or(d).trim())
        .filter(|d| !d.is_empty());
    match detail {
        Some(d) => format!("{what}: {d} ({})", strerror(*errno)),
        None => format!("{what}: {}", strerror(*errno)),
    }
}

/// What a vmm/NAME command does, in words (never the command text itself,
/// whose descriptor numbers mean nothing to a user).
pub fn describe(command: &str) -> String {
    let mut words = command.split_whitespace();
    let first = words.next().unwrap_or("");
    match first {
        "memory" => "guest memory".into(),
        "cpus" => "vCPU topology".into(),
        "bootrom" => "boot ROM".into(),
        "kernel" => "Linux kernel".into(),
        "initrd" => "initial ramdisk".into(),
        "cmdline" => "kernel command line".into(),
        "com1" | "com2" | "com3" | "com4" => format!("serial port {first}"),
        "device" => {
            let slot = words.next().unwrap_or("?");
            let emulation = words.next().unwrap_or("device");
            format!("{emulation} in PCI slot {slot}")
        }
        "set" => {
            let key = words.next().unwrap_or("").split('=').next().unwrap_or("");
            format!("option {key}")
        }
        "run" => "starting the virtual machine".into(),
        "reinit" => "re-initializing the virtual machine".into(),
        "reset" => "resetting the virtual machine".into(),
        "poweroff" | "force-poweroff" => "powering off the virtual machine".into(),
        "suspend" => "suspending the virtual machine".into(),
        "fds" => "handing descriptors to the virtual machine".into(),
        "attach" | "connect" => "connecting to the vmmfs hand-over socket".into(),
        _ => "virtual machine command".into(),
    }
}

impl Error {
    /// An OS error with context.
    pub fn sys(what: impl Into<String>, errno: Errno) -> Self {
        Error::Sys {
            what: what.into(),
            errno,
        }
    }

    /// From a std::io::Error with context.
    pub fn io(what: impl Into<String>, e: &std::io::Error) -> Self {
        Error::sys(what, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    /// The errno behind this error, if it came from the OS.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            Error::Sys { errno, .. }
            | Error::Command { errno, .. }
            | Error::NoDaemon { errno, .. } => Some(*errno),
            Error::Unprivileged => Some(Errno::EPERM),
            Error::Limit => Some(Errno::ENOMEM),
            Error::NoBootrom => Some(Errno::ENOENT),
            _ => None,
        }
    }

    /// Opening `path` (vmmctl) in `dir` failed with `errno`. A missing file,
    /// a dangling /dev link or the dead mount of a stopped daemon get the
    /// "is vmmfs running?" hint; anything else (EACCES) is the plain error.
    pub fn open_ctl(path: &Path, dir: &Path, errno: Errno) -> Self {
        match errno {
            Errno::ENOENT | Errno::ENOTCONN | Errno::ECONNREFUSED | Errno::ENXIO => {
                Error::NoDaemon {
                    path: path.to_path_buf(),
                    dir: dir.to_path_buf(),
                    errno,
                }
            }
            _ => Error::sys(format!("open {}", path.display()), errno),
        }
    }

    /// When `path` (vmmctl) cannot be reached because no daemon serves `dir`:
    /// the error to report instead of a failure on another file there.
    pub fn daemon_missing(path: &Path, dir: &Path) -> Option<Self> {
        match std::fs::metadata(path) {
            Ok(_) => None,
            Err(e) => {
                let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO));
                matches!(Error::open_ctl(path, dir, errno), Error::NoDaemon { .. })
                    .then(|| Error::open_ctl(path, dir, errno))
            }
        }
    }

    /// A non-transient or transient create failed with `errno` (EPERM is the
    /// caller's to judge: monitor mode or not).
    pub fn create(errno: Errno) -> Self {
        match errno {
            Errno::ENOMEM => Error::Limit,
            Errno::EPERM => Error::Unprivileged,
            _ => Error::sys("vm_create", errno),
        }
    }

    /// bhyve's exit status for this error.
    pub fn bhyve_status(&self) -> i32 {
        match self {
            Error::Usage(_) => 1,
            Error::BadOption(_) => EX_USAGE,
            _ => 4,
        }
    }
}

/// The C library's text for `errno` (strerror(3)), without Rust's
/// " (os error N)" suffix.
pub fn strerror(errno: Errno) -> String {
    let s = std::io::Error::from_raw_os_error(errno as i32).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_no_rust_noise() {
        let e = Error::sys("open /x", Errno::EACCES);
        assert_eq!(e.to_string(), "open /x: Permission denied");
        assert_eq!(e.bhyve_status(), 4);
        let e = Error::io("open /y", &std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.to_string(), "open /y: No such file or directory");
        let e = Error::Command {
            command: "bootrom 5".into(),
            errno: Errno::EINVAL,
            detail: Some("bad image".into()),
        };
        assert_eq!(e.to_string(), "boot ROM: bad image (Invalid argument)");
        assert_eq!(Error::Usage(None).bhyve_status(), 1);
        assert_eq!(strerror(Errno::EOPNOTSUPP), "Operation not supported");
        assert_eq!(Error::BadOption("x".into()).bhyve_status(), 64);
    }

    #[test]
    fn no_protocol_text_in_command_errors() {
        let e = Error::Command {
            command: "bootrom 3".into(),
            errno: Errno::EINVAL,
            detail: Some("invalid command: boot ROM is 100 bytes".into()),
        };
        assert_eq!(
            e.to_string(),
            "boot ROM: boot ROM is 100 bytes (Invalid argument)"
        );
        let e = Error::Command {
            command: "device 0:3:0 virtio-blk fd=7,ro".into(),
            errno: Errno::EBADF,
            detail: None,
        };
        assert_eq!(
            e.to_string(),
            "virtio-blk in PCI slot 0:3:0: Bad file descriptor"
        );
        for cmd in [
            "memory 1024",
            "fds 3 4",
            "com1 0 1",
            "run",
            "set x=1",
            "frob 9",
        ] {
            let text = describe(cmd);
            assert!(!text.contains(cmd), "{cmd} -> {text}");
            // Descriptor numbers and sizes are protocol, not words.
            assert!(
                !text
                    .split_whitespace()
                    .any(|w| w.bytes().all(|b| b.is_ascii_digit())),
                "{cmd} -> {text}"
            );
        }
    }

    #[test]
    fn a_missing_daemon_is_named() {
        let dir = Path::new("/dev");
        let ctl = Path::new("/dev/vmmctl");
        for errno in [Errno::ENOENT, Errno::ENOTCONN] {
            let text = Error::open_ctl(ctl, dir, errno).to_string();
            assert!(text.starts_with("open /dev/vmmctl: "), "{text}");
            assert!(text.contains("is vmmfs running? searched /dev"), "{text}");
            assert_eq!(Error::open_ctl(ctl, dir, errno).bhyve_status(), 4);
        }
        assert_eq!(
            Error::open_ctl(ctl, dir, Errno::EACCES).to_string(),
            "open /dev/vmmctl: Permission denied"
        );
        let nowhere = Path::new("/nonexistent-vmmfs-dir");
        let e = Error::daemon_missing(&nowhere.join("vmmctl"), nowhere).expect("missing");
        assert!(
            e.to_string().contains("searched /nonexistent-vmmfs-dir"),
            "{e}"
        );
        assert!(Error::daemon_missing(Path::new("/proc/self/exe"), Path::new("/proc")).is_none());
    }

    #[test]
    fn create_errors() {
        let text = Error::create(Errno::ENOMEM).to_string();
        assert!(
            text.starts_with("vm_create: Cannot allocate memory: "),
            "{text}"
        );
        assert!(text.contains("hw.vmm.maxvmms"), "{text}");
        assert_eq!(
            Error::create(Errno::EPERM).to_string(),
            "An unprivileged user must run VMs in monitor mode"
        );
        assert_eq!(
            Error::create(Errno::EINVAL).to_string(),
            "vm_create: Invalid argument"
        );
        assert_eq!(Error::NoBootrom.to_string(), "no bootrom was configured");
    }
}
