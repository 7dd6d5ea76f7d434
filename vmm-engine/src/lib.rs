//! vmm-engine: one VM on KVM, driven by text commands.
//!
//! The engine knows nothing of FUSE, users or files by path. Its caller (vmmfs)
//! hands it descriptors and command lines; it answers with status text and
//! wakes the caller when the VM's state changes.
//!
//! The command language is the `vmm/NAME` protocol documented in vmm(4); the
//! parser lives in [`command`] so that the boundary can later become a socket to
//! a per-VM worker process without changing the protocol.

pub mod acpi;
pub mod boot;
mod builder;
pub mod bus;
pub mod cast;
pub mod config;
pub mod devices;
pub mod error;
pub mod events;
pub mod files;
pub mod firmware;
pub mod memory;
mod runtime;
pub mod threads;
pub mod vcpu;
pub mod vm;

/// The `vmm/NAME` command language lives in the protocol crate, shared with
/// vmmfs and the tools.
pub use vmm_protocol::command;

pub use command::{Command, FdSource};
pub use error::{Error, Result};
pub use vcpu::kick_signal;
pub use vm::{ExitReason, Segment, Vm, VmState};
