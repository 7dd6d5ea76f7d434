//! A VM: KVM VM descriptor, memory segments, state machine.
//!
//! Skeleton: creation with guest RAM, configuration commands, status and
//! notification. vCPU threads, boot and platform devices plug in here.

use crate::command::{Command, FdSource};
use crate::error::{Error, Result};
use kvm_ioctls::{Kvm, VmFd};
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Default guest RAM, as bhyve.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// Why a guest stopped, with bhyve's exit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    Reboot,
    PowerOff,
    Halt,
    TripleFault,
    Error(String),
    Suspend,
}

impl ExitReason {
    /// bhyve's exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Reboot => 0,
            ExitReason::PowerOff => 1,
            ExitReason::Halt => 2,
            ExitReason::TripleFault => 3,
            ExitReason::Error(_) => 4,
            ExitReason::Suspend => 5,
        }
    }

    /// The word used in status text.
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::Reboot => "reboot",
            ExitReason::PowerOff => "poweroff",
            ExitReason::Halt => "halt",
            ExitReason::TripleFault => "triple-fault",
            ExitReason::Error(_) => "error",
            ExitReason::Suspend => "suspend",
        }
    }
}

/// Life cycle of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// Created, accepting configuration.
    Configuring,
    /// vCPUs running.
    Running,
    /// Guest stopped; `reinit` makes it configurable again.
    Exited(ExitReason),
    /// Destroyed: every operation fails with ENXIO.
    Destroyed,
}

impl VmState {
    fn name(&self) -> &'static str {
        match self {
            VmState::Configuring => "configuring",
            VmState::Running => "running",
            VmState::Exited(_) => "exited",
            VmState::Destroyed => "destroyed",
        }
    }
}

/// A memory segment: memfd-backed, shareable through vmmfs (`vmm.io/NAME.SEG`).
#[derive(Debug, Clone)]
pub struct Segment {
    /// Segment name (`sysmem`, `bootrom`, ...).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// The memfd.
    pub fd: Arc<OwnedFd>,
}

type Notifier = Box<dyn Fn() + Send + Sync>;

struct Inner {
    state: VmState,
    vm: Option<VmFd>,
    memory: u64,
    cpus: u16,
    segments: Vec<Segment>,
    /// Host mappings of segments that are guest-visible: (addr, len).
    mappings: Vec<(usize, usize)>,
}

/// One virtual machine.
pub struct Vm {
    name: String,
    inner: Mutex<Inner>,
    generation: AtomicU64,
    notifier: Mutex<Option<Notifier>>,
}

fn kvm() -> Result<&'static Kvm> {
    static KVM: OnceLock<std::result::Result<Kvm, i32>> = OnceLock::new();
    KVM.get_or_init(|| Kvm::new().map_err(|e| e.errno()))
        .as_ref()
        .map_err(|e| Error::kvm("open /dev/kvm", std::io::Error::from_raw_os_error(*e)))
}

fn memfd(name: &str, size: u64) -> Result<OwnedFd> {
    let cname =
        std::ffi::CString::new(name).map_err(|_| Error::InvalidCommand("bad name".into()))?;
    // SAFETY: plain syscall on a valid C string.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by the kernel and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: valid descriptor.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
        return Err(Error::NoMemory(format!(
            "{name}: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(fd)
}

fn map_shared(fd: &OwnedFd, size: u64) -> Result<usize> {
    // SAFETY: mapping a memfd we own; the mapping is tracked and unmapped in Drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::NoMemory(format!(
            "mmap: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(p as usize)
}

impl Vm {
    /// Create a VM: a KVM VM with default RAM (256 MiB, not yet touched).
    pub fn create(name: &str) -> Result<Vm> {
        let vm = kvm()?
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let mut inner = Inner {
            state: VmState::Configuring,
            vm: Some(vm),
            memory: DEFAULT_MEMORY,
            cpus: 1,
            segments: Vec::new(),
            mappings: Vec::new(),
        };
        inner.set_memory(DEFAULT_MEMORY)?;
        Ok(Vm {
            name: name.to_string(),
            inner: Mutex::new(inner),
            generation: AtomicU64::new(0),
            notifier: Mutex::new(None),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.inner.lock().state.clone()
    }

    /// Increases on every state change (for poll).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Called (from any thread) after each state change.
    pub fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.notifier.lock() = Some(f);
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(f) = self.notifier.lock().as_ref() {
            f();
        }
    }

    /// Memory segments, guest RAM first.
    pub fn segments(&self) -> Vec<Segment> {
        self.inner.lock().segments.clone()
    }

    /// Run one command.
    pub fn execute(&self, cmd: Command, _fds: &mut dyn FdSource) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.state == VmState::Destroyed {
            return Err(Error::Destroyed);
        }
        match cmd {
            Command::Memory(bytes) => {
                inner.require_configuring()?;
                inner.set_memory(bytes)?;
            }
            Command::Cpus(t) => {
                inner.require_configuring()?;
                inner.cpus = t.cpus;
            }
            other => return Err(Error::Unsupported(format!("{other:?}"))),
        }
        drop(inner);
        self.changed();
        Ok(())
    }

    /// `key=value` lines describing the VM.
    pub fn status(&self) -> String {
        let inner = self.inner.lock();
        let mut s = String::new();
        let _ = writeln!(s, "name={}", self.name);
        let _ = writeln!(s, "state={}", inner.state.name());
        let _ = writeln!(s, "cpus={}", inner.cpus);
        let _ = writeln!(s, "memory={}", inner.memory);
        if let VmState::Exited(r) = &inner.state {
            let _ = writeln!(s, "exit={}", r.name());
            let _ = writeln!(s, "status={}", r.status());
            if let ExitReason::Error(cause) = r {
                let _ = writeln!(s, "cause={cause}");
            }
        }
        s
    }

    /// Stop everything and free the KVM VM and memory. Idempotent.
    pub fn destroy(&self) {
        let mut inner = self.inner.lock();
        if inner.state == VmState::Destroyed {
            return;
        }
        inner.release();
        inner.state = VmState::Destroyed;
        drop(inner);
        self.changed();
    }
}

impl Inner {
    fn require_configuring(&self) -> Result<()> {
        match self.state {
            VmState::Configuring => Ok(()),
            ref s => Err(Error::WrongState(s.name())),
        }
    }

    fn set_memory(&mut self, bytes: u64) -> Result<()> {
        let vm = self.vm.as_ref().ok_or(Error::Destroyed)?;
        let fd = memfd("sysmem", bytes)?;
        let addr = map_shared(&fd, bytes)?;
        if self.segments.iter().any(|s| s.name == "sysmem") {
            // KVM cannot resize a slot in place: delete it first.
            let gone = kvm_bindings::kvm_userspace_memory_region {
                slot: 0,
                memory_size: 0,
                ..Default::default()
            };
            // SAFETY: removing a slot never exposes memory.
            unsafe { vm.set_user_memory_region(gone) }
                .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: bytes,
            userspace_addr: addr as u64,
        };
        // SAFETY: the mapping stays alive until the slot is replaced or the VM is released.
        if let Err(e) = unsafe { vm.set_user_memory_region(region) } {
            // SAFETY: addr/bytes come from map_shared above.
            unsafe { libc::munmap(addr as *mut _, bytes as usize) };
            return Err(Error::kvm("KVM_SET_USER_MEMORY_REGION", e));
        }
        self.unmap_all();
        self.segments.retain(|s| s.name != "sysmem");
        self.segments.insert(
            0,
            Segment {
                name: "sysmem".into(),
                size: bytes,
                fd: Arc::new(fd),
            },
        );
        self.mappings.push((addr, bytes as usize));
        self.memory = bytes;
        Ok(())
    }

    fn unmap_all(&mut self) {
        for (addr, len) in self.mappings.drain(..) {
            // SAFETY: each entry is a live mapping made by map_shared.
            unsafe { libc::munmap(addr as *mut _, len) };
        }
    }

    fn release(&mut self) {
        self.vm = None;
        self.unmap_all();
        self.segments.clear();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct NoFds;
    impl FdSource for NoFds {
        fn take(&mut self, _: i32) -> std::io::Result<OwnedFd> {
            Err(std::io::Error::from_raw_os_error(libc::EBADF))
        }
    }

    #[test]
    fn create_configure_destroy() {
        let vm = Vm::create("t").expect("KVM must be available for engine tests");
        assert_eq!(vm.segments()[0].size, DEFAULT_MEMORY);
        vm.execute(Command::parse("memory 64M").unwrap(), &mut NoFds)
            .unwrap();
        assert_eq!(vm.segments()[0].size, 64 << 20);
        assert!(vm.status().contains("memory=67108864"));
        vm.destroy();
        assert_eq!(
            vm.execute(Command::Run, &mut NoFds).unwrap_err().errno(),
            libc::ENXIO
        );
        assert!(vm.segments().is_empty());
    }
}
