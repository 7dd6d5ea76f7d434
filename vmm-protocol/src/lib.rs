//! The protocols spoken through vmmfs files, in one place so that the daemon,
//! the engine and the tools agree on them:
//!
//! - [`vmmctl`]: `create NAME [destroy-on-close]` / `destroy NAME` lines and
//!   FreeBSD's `VMMCTL_VM_CREATE` / `VMMCTL_VM_DESTROY` ioctl structures;
//! - [`handover`]: how clients send descriptors to a VM (SCM_RIGHTS on a
//!   socket bound to their `vmm/NAME` handle);
//! - [`command`]: the `vmm/NAME` command lines that configure and run a VM;
//! - [`status`]: what reading `vmm/NAME` reports, as typed data;
//! - [`worker`]: the daemon's messages to and from a VM's worker process.
//!
//! Parsing never trusts its input: every malformed request is a [`ParseError`]
//! (EINVAL for the client).

pub mod command;
pub mod handover;
pub mod status;
pub mod vmmctl;
pub mod worker;

/// A malformed request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Result of parsing.
pub type Result<T> = std::result::Result<T, ParseError>;
