//! Engine errors, each with the errno a client of vmmfs sees.

use std::io;

/// Everything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed or unknown command, or an argument out of range.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// The command is valid but not in the VM's current state (e.g. `memory` while running).
    #[error("not allowed while the VM is {0}")]
    WrongState(&'static str),
    /// The VM was destroyed; handles on it are dead.
    #[error("the VM has been destroyed")]
    Destroyed,
    /// A feature this build or host does not provide.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// Guest memory could not be allocated.
    #[error("out of memory: {0}")]
    NoMemory(String),
    /// A KVM ioctl failed.
    #[error("kvm: {what}: {source}")]
    Kvm {
        what: &'static str,
        source: io::Error,
    },
    /// Some other OS call failed (memfd, mmap, descriptors handed over).
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

impl From<vmm_protocol::ParseError> for Error {
    fn from(e: vmm_protocol::ParseError) -> Self {
        Error::InvalidCommand(e.0)
    }
}

/// Engine result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The errno a vmmfs client sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidCommand(_) => libc::EINVAL,
            Error::WrongState(_) => libc::EBUSY,
            Error::Destroyed => libc::ENXIO,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::NoMemory(_) => libc::ENOMEM,
            Error::Kvm { source, .. } | Error::Io { source, .. } => {
                source.raw_os_error().unwrap_or(libc::EIO)
            }
        }
    }

    /// Wrap a KVM ioctl failure.
    pub fn kvm(what: &'static str, e: impl Into<io::Error>) -> Self {
        Error::Kvm {
            what,
            source: e.into(),
        }
    }

    /// Wrap any other OS failure.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}
