//! Every error the daemon returns to a client, and its errno: the one place
//! where policy outcomes become errnos.

/// A refused or failed vmmfs operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Malformed command, bad name, flags or reserved fields; unknown VM on
    /// destroy; a descriptor of a kind the VM cannot use.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A VM of that name is visible to the caller.
    #[error("a VM named '{0}' already exists")]
    Exists(String),
    /// Not allowed by vmm policy (privilege, jail, read-only open, authority).
    #[error("{0}")]
    NotPermitted(String),
    /// A resource limit (hw.vmm.maxvmms, guest memory per user, daemon capacity).
    #[error("{0}")]
    Limit(String),
    /// Too many open handles or descriptors for one user.
    #[error("{0}")]
    TooMany(String),
    /// The VM's or the user's queue is full: try again.
    #[error("{0}")]
    Busy(String),
    /// A command names a descriptor that was not handed over.
    #[error("descriptor {0} was not handed over (see vmm(4), DESCRIPTORS)")]
    BadFd(i32),
    /// The VM behind a handle has been destroyed.
    #[error("the VM has been destroyed")]
    Gone,
    /// No such node.
    #[error("no such node")]
    NotFound,
    /// The engine refused or failed.
    #[error(transparent)]
    Engine(#[from] vmm_engine::Error),
    /// Anything else from the OS.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl FsError {
    /// errno seen by the client.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Exists(_) => libc::EEXIST,
            FsError::NotPermitted(_) => libc::EPERM,
            FsError::Limit(_) => libc::ENOMEM,
            FsError::TooMany(_) => libc::EMFILE,
            FsError::Busy(_) => libc::EAGAIN,
            FsError::BadFd(_) => libc::EBADF,
            FsError::Gone => libc::ENXIO,
            FsError::NotFound => libc::ENOENT,
            FsError::Engine(e) => e.errno(),
            FsError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

impl From<vmm_protocol::ParseError> for FsError {
    fn from(e: vmm_protocol::ParseError) -> Self {
        FsError::Invalid(e.0)
    }
}

/// Result of a vmmfs operation.
pub type FsResult<T> = Result<T, FsError>;
