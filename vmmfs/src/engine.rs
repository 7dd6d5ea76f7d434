//! What the daemon needs from a VMM, as a trait: the real one is
//! `vmm_engine::Vm`; unit tests of the policy and handle semantics use
//! [`fake::FakeEngine`], which needs no /dev/kvm.

use std::sync::Arc;
use std::time::Duration;
use vmm_engine::{Command, FdSource, Segment};

pub use vmm_engine::Error as EngineError;

/// Who asked for a VM: an engine that runs VMs in processes of their own
/// keeps them apart from the creator (another uid) and charges them to the
/// creator's resource accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Creator {
    pub ruid: u32,
    pub euid: u32,
    /// The process that opened vmmctl.
    pub pid: u32,
}

/// The process that runs a VM, as recorded for a restarted daemon: its pid,
/// its start time (so that a reused pid is never taken for it) and its uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerId {
    pub pid: u32,
    pub start: u64,
    pub uid: u32,
}

/// Makes VMs.
pub trait Engine: Send + Sync + 'static {
    type Vm: EngineVm;
    /// Create a VM (no vCPU runs yet, no client descriptor is held).
    fn create(&self, name: &str, creator: &Creator) -> Result<Self::Vm, EngineError>;
    /// Take over the VM `name` that an earlier daemon left running in
    /// process `id` (see [`EngineVm::worker`]).
    fn adopt(&self, _name: &str, _id: &WorkerId) -> Result<Self::Vm, EngineError> {
        Err(EngineError::Unsupported(
            "this engine's VMs end with the daemon".into(),
        ))
    }
    /// Wait until every destroyed VM has ended and what it left outside
    /// the daemon is cleaned up (a worker's cgroup leaf and adoption
    /// socket), for at most `within`: false if some has not. A daemon that
    /// exits earlier leaves those behind, and a stale leaf would keep the
    /// next daemon from giving that uid's worker a cgroup.
    fn settle(&self, _within: Duration) -> bool {
        true
    }
}

/// One VM. `execute`, `detach` and `destroy` may block on client descriptors
/// (a disk on a hung file system, a console pipe nobody reads): the daemon
/// calls them only on the VM's own executor thread. The others only read
/// state and never block.
pub trait EngineVm: Send + Sync + 'static {
    fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<(), EngineError>;
    fn detach(&self);
    fn destroy(&self);
    fn status(&self) -> String;
    fn generation(&self) -> u64;
    fn segments(&self) -> Vec<Segment>;
    /// Called after every state change, possibly on an engine thread.
    fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>);
    /// Stop the VM now, from any thread, without blocking, ahead of its
    /// `destroy` (which may be queued behind a command stuck on a client's
    /// file). Only an engine that can end a VM from outside does anything.
    fn kill(&self) {}
    /// The VM broke down by itself (its worker process died): the daemon
    /// must destroy it. Its status already shows the cause.
    fn failed(&self) -> bool {
        false
    }
    /// The process that runs this VM and outlives the daemon, if any: a
    /// restarted daemon adopts it ([`Engine::adopt`]).
    fn worker(&self) -> Option<WorkerId> {
        None
    }
}

/// Guest memory a new VM has before any `memory` command.
pub const DEFAULT_MEMORY: u64 = vmm_engine::vm::DEFAULT_MEMORY;

/// The KVM engine.
pub struct Kvm;

impl Engine for Kvm {
    type Vm = vmm_engine::Vm;

    fn create(&self, name: &str, _: &Creator) -> Result<vmm_engine::Vm, EngineError> {
        vmm_engine::Vm::create(name)
    }
}

impl EngineVm for vmm_engine::Vm {
    fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<(), EngineError> {
        vmm_engine::Vm::execute(self, cmd, fds)
    }
    fn detach(&self) {
        vmm_engine::Vm::detach(self)
    }
    fn destroy(&self) {
        vmm_engine::Vm::destroy(self)
    }
    fn status(&self) -> String {
        vmm_engine::Vm::status(self)
    }
    fn generation(&self) -> u64 {
        vmm_engine::Vm::generation(self)
    }
    fn segments(&self) -> Vec<Segment> {
        vmm_engine::Vm::segments(self)
    }
    fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
        vmm_engine::Vm::set_notifier(self, f)
    }
}

impl<T: EngineVm> EngineVm for Arc<T> {
    fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<(), EngineError> {
        (**self).execute(cmd, fds)
    }
    fn detach(&self) {
        (**self).detach()
    }
    fn destroy(&self) {
        (**self).destroy()
    }
    fn status(&self) -> String {
        (**self).status()
    }
    fn generation(&self) -> u64 {
        (**self).generation()
    }
    fn segments(&self) -> Vec<Segment> {
        (**self).segments()
    }
    fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
        (**self).set_notifier(f)
    }
    fn kill(&self) {
        (**self).kill()
    }
    fn failed(&self) -> bool {
        (**self).failed()
    }
    fn worker(&self) -> Option<WorkerId> {
        (**self).worker()
    }
}

#[cfg(test)]
pub mod fake {
    //! An engine without KVM: records commands, takes descriptors, and can be
    //! told to block (a stuck client file) so tests can show that nothing
    //! else waits.

    use super::*;
    use parking_lot::{Condvar, Mutex};
    use std::os::fd::OwnedFd;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    pub struct FakeEngine {
        /// Every VM made, for inspection.
        pub made: Mutex<Vec<Arc<FakeVm>>>,
        pub fail_create: std::sync::atomic::AtomicBool,
    }

    #[derive(Default)]
    pub struct FakeVm {
        pub name: String,
        pub commands: Mutex<Vec<String>>,
        /// Descriptors the VM took, with the command that took them.
        pub fds: Mutex<Vec<OwnedFd>>,
        pub destroyed: std::sync::atomic::AtomicBool,
        /// Broke down by itself, as a VM whose worker died.
        pub failed: std::sync::atomic::AtomicBool,
        pub detached: AtomicU64,
        generation: AtomicU64,
        notifier: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
        /// While set, `execute` and `destroy` wait (a client file that hangs).
        pub stuck: Mutex<bool>,
        unstuck: Condvar,
    }

    impl FakeVm {
        /// Break down as a VM whose worker died: report it, as engines do,
        /// through the notifier.
        pub fn fail(&self) {
            self.failed.store(true, Ordering::Release);
            self.changed();
        }

        pub fn set_stuck(&self, on: bool) {
            *self.stuck.lock() = on;
            self.unstuck.notify_all();
        }

        fn wait_unstuck(&self) {
            let mut s = self.stuck.lock();
            while *s {
                self.unstuck.wait(&mut s);
            }
        }

        fn changed(&self) {
            self.generation.fetch_add(1, Ordering::AcqRel);
            if let Some(f) = &*self.notifier.lock() {
                f();
            }
        }
    }

    impl Engine for FakeEngine {
        type Vm = Arc<FakeVm>;

        fn create(&self, name: &str, _: &Creator) -> Result<Arc<FakeVm>, EngineError> {
            if self.fail_create.load(Ordering::Relaxed) {
                return Err(EngineError::NoMemory("fake".into()));
            }
            let vm = Arc::new(FakeVm {
                name: name.into(),
                ..Default::default()
            });
            self.made.lock().push(vm.clone());
            Ok(vm)
        }
    }

    impl EngineVm for FakeVm {
        fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<(), EngineError> {
            self.wait_unstuck();
            if self.destroyed.load(Ordering::Acquire) {
                return Err(EngineError::Destroyed);
            }
            for n in cmd.descriptors() {
                let fd = fds
                    .take(n)
                    .map_err(|e| EngineError::io(format!("descriptor {n}"), e))?;
                self.fds.lock().push(fd);
            }
            self.commands.lock().push(cmd.to_string());
            self.changed();
            Ok(())
        }
        fn detach(&self) {
            self.wait_unstuck();
            self.detached.fetch_add(1, Ordering::AcqRel);
            self.fds.lock().clear();
            self.changed();
        }
        fn destroy(&self) {
            self.wait_unstuck();
            self.destroyed.store(true, Ordering::Release);
            self.fds.lock().clear();
            self.changed();
        }
        fn status(&self) -> String {
            format!(
                "name={}\nstate={}\n",
                self.name,
                if self.destroyed.load(Ordering::Acquire) {
                    "destroyed"
                } else {
                    "configuring"
                }
            )
        }
        fn generation(&self) -> u64 {
            self.generation.load(Ordering::Acquire)
        }
        fn segments(&self) -> Vec<Segment> {
            Vec::new()
        }
        fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
            *self.notifier.lock() = Some(f);
        }
        fn failed(&self) -> bool {
            self.failed.load(Ordering::Acquire)
        }
    }
}
