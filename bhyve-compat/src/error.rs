//! Errors of the bhyve tools, each with the exit status FreeBSD's tools use.

use nix::errno::Errno;

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
    /// Anything else (exit 4).
    #[error("{0}")]
    Other(String),
}

fn command_message(command: &str, errno: &Errno, detail: &Option<String>) -> String {
    match detail {
        Some(d) if !d.is_empty() => format!("{command}: {d} ({})", strerror(*errno)),
        _ => format!("{command}: {}", strerror(*errno)),
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
            Error::Sys { errno, .. } | Error::Command { errno, .. } => Some(*errno),
            Error::Unprivileged => Some(Errno::EPERM),
            _ => None,
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
        assert_eq!(e.to_string(), "bootrom 5: bad image (Invalid argument)");
        assert_eq!(Error::Usage(None).bhyve_status(), 1);
        assert_eq!(strerror(Errno::EOPNOTSUPP), "Operation not supported");
        assert_eq!(Error::BadOption("x".into()).bhyve_status(), 64);
    }
}
