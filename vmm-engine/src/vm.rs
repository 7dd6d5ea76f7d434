//! A VM: the handle vmmfs holds. It serializes commands, keeps the state
//! machine and the status, and wakes the caller on each state change.
//!
//! As FreeBSD's vmm_dev.c, one function per command, each checking the
//! state first: commands before `run` accumulate a [`VmConfig`]
//! (`config.rs`, plain data); `run` hands it to the builder (`builder.rs`),
//! which owns the KVM objects and threads.
//!
//! Locking: `ctl` serializes commands and owns the machinery (KVM
//! descriptors, mappings, threads); it is held while vCPU threads are
//! stopped and joined. `st` holds what status readers need and is only held
//! briefly, so vCPU threads can report an exit (and the notifier can read
//! status) while a command waits for them.

use crate::boot;
use crate::builder::Machine;
use crate::command::{Command, FdSource, PciSlot, Topology};
use crate::config::{SerialFds, VmConfig};
use crate::devices::{Counters, PciEmulation};
use crate::error::{Error, Result};
use crate::memory::MAX_BOOTROM;
use parking_lot::Mutex;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub use crate::builder::use_kvm_fd;
pub use crate::config::{DEFAULT_MEMORY, MAX_DEVICES, MAX_KERNEL};

/// Why a guest stopped, with bhyve's exit status; the life cycle of a VM.
/// Both are the status types of the protocol crate, so that what the engine
/// reports and what vmmfs serves (or receives from a VM worker) are one.
pub use crate::events::ExitReason;
pub use vmm_protocol::status::State as VmState;

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

type Notifier = Arc<dyn Fn() + Send + Sync>;

/// What status readers see.
struct Status {
    state: VmState,
    memory: u64,
    cpus: u16,
    segments: Vec<Segment>,
}

impl Status {
    /// Put `seg` in place of the segment of the same name: guest RAM
    /// first, others last.
    fn put_segment(&mut self, seg: Segment, first: bool) {
        self.segments.retain(|s| s.name != seg.name);
        if first {
            self.segments.insert(0, seg);
        } else {
            self.segments.push(seg);
        }
    }
}

/// Owned by whoever holds the command lock: the configuration and the
/// machine built from it.
struct Control {
    machine: Machine,
    config: VmConfig,
}

impl Control {
    /// Stop the guest and let go of everything but the VM's name.
    fn release(&mut self) {
        self.machine.stop_threads();
        self.config.detach();
        self.config.kernel = None;
        self.config.initrd = None;
        self.config.bootrom = None;
        self.machine.close();
        // The variable store's flash was a slot of the closed VM.
        self.config.vars = None;
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.release();
    }
}

struct Core {
    ctl: Mutex<Control>,
    st: Mutex<Status>,
    generation: AtomicU64,
    notifier: Mutex<Option<Notifier>>,
    counters: Arc<Counters>,
}

/// One virtual machine.
pub struct Vm {
    name: String,
    core: Arc<Core>,
}

impl Core {
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let f = self.notifier.lock().clone();
        if let Some(f) = f {
            f();
        }
    }

    /// A guest exit reported by a vCPU or the watchdog.
    fn guest_exited(&self, reason: ExitReason) {
        {
            let mut st = self.st.lock();
            if st.state != VmState::Running {
                return;
            }
            log::info!("guest exited: {} ({reason:?})", reason.name());
            st.state = VmState::Exited(reason);
        }
        self.changed();
    }

    fn set_state(&self, s: VmState) {
        self.st.lock().state = s;
    }

    fn state(&self) -> VmState {
        self.st.lock().state.clone()
    }
}

/// The state check of a command allowed only before `run`.
fn configuring(state: &VmState) -> Result<()> {
    match state {
        VmState::Configuring => Ok(()),
        s => Err(Error::WrongState(s.name())),
    }
}

/// The state check of a command allowed only while the guest runs.
fn running(state: &VmState) -> Result<()> {
    match state {
        VmState::Running => Ok(()),
        s => Err(Error::WrongState(s.name())),
    }
}

fn take(fds: &mut dyn FdSource, n: i32) -> Result<OwnedFd> {
    fds.take(n)
        .map_err(|e| Error::io(format!("descriptor {n}"), e))
}

fn segment(name: &str, size: u64, fd: OwnedFd) -> Segment {
    Segment {
        name: name.into(),
        size,
        fd: Arc::new(fd),
    }
}

impl Vm {
    /// Create a VM: a KVM VM with default RAM (256 MiB, not yet touched).
    pub fn create(name: &str) -> Result<Vm> {
        let mut machine = Machine::create()?;
        let fd = machine.set_memory(DEFAULT_MEMORY)?;
        let config = VmConfig::default();
        let st = Status {
            state: VmState::Configuring,
            memory: config.memory,
            cpus: config.topology.cpus,
            segments: vec![segment("sysmem", DEFAULT_MEMORY, fd)],
        };
        Ok(Vm {
            name: name.to_string(),
            core: Arc::new(Core {
                ctl: Mutex::new(Control { machine, config }),
                st: Mutex::new(st),
                generation: AtomicU64::new(0),
                notifier: Mutex::new(None),
                counters: Arc::new(Counters::default()),
            }),
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        self.core.state()
    }

    /// Increases on every state change (for poll).
    pub fn generation(&self) -> u64 {
        self.core.generation.load(Ordering::Acquire)
    }

    /// Called (from any thread, including vCPU threads) after each state
    /// change. It must not call [`Vm::execute`] or [`Vm::destroy`].
    pub fn set_notifier(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self.core.notifier.lock() = Some(Arc::from(f));
    }

    /// Memory segments, guest RAM first.
    pub fn segments(&self) -> Vec<Segment> {
        self.core.st.lock().segments.clone()
    }

    /// Total vCPU exits to user space over the VM's life.
    pub fn exits(&self) -> u64 {
        self.core.counters.exits.load(Ordering::Relaxed)
    }

    /// Microseconds from `run` to the guest's first write to the boot-timer
    /// port (0x440), if it wrote.
    pub fn boot_time_us(&self) -> Option<u64> {
        match self.core.counters.boot_time.load(Ordering::Acquire) {
            0 => None,
            n => Some(n - 1),
        }
    }

    /// Run one command. Each has its own function, which checks the state
    /// first; true from it means a state change to announce.
    pub fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<()> {
        let mut guard = self.core.ctl.lock();
        let state = self.core.state();
        if state == VmState::Destroyed {
            return Err(Error::Destroyed);
        }
        let (ctl, s) = (&mut *guard, &state);
        let changed = match cmd {
            Command::Memory(bytes) => self.memory(ctl, s, bytes)?,
            Command::Cpus(t) => self.cpus(ctl, s, t)?,
            Command::Bootrom(n) => self.bootrom(ctl, s, fds, n)?,
            Command::BootVars(n) => self.bootvars(ctl, s, fds, n)?,
            Command::Kernel(n) => self.kernel(ctl, s, fds, n)?,
            Command::Initrd(n) => self.initrd(ctl, s, fds, n)?,
            Command::Cmdline(line) => self.cmdline(ctl, s, line)?,
            Command::Serial {
                port,
                input,
                output,
            } => self.serial(ctl, s, port as usize, fds, [input, output])?,
            Command::Device {
                slot,
                emulation,
                options,
            } => self.device(ctl, s, slot, &emulation, &options, fds)?,
            Command::Set { key, value } => self.set(ctl, s, &key, &value)?,
            Command::Run => self.run(ctl, s)?,
            Command::Reinit => self.reinit(ctl)?,
            Command::Reset => self.stop(ctl, s, ExitReason::Reboot)?,
            Command::Suspend => self.stop(ctl, s, ExitReason::Suspend)?,
            Command::ForcePowerOff => self.stop(ctl, s, ExitReason::PowerOff)?,
            Command::PowerOff => self.power_button(ctl, s)?,
        };
        drop(guard);
        if changed {
            self.core.changed();
        }
        Ok(())
    }

    /// `memory`: fresh guest RAM of `bytes`.
    fn memory(&self, ctl: &mut Control, state: &VmState, bytes: u64) -> Result<bool> {
        configuring(state)?;
        let fd = ctl.machine.set_memory(bytes)?;
        ctl.config.memory = bytes;
        let mut st = self.core.st.lock();
        st.memory = bytes;
        st.put_segment(segment("sysmem", bytes, fd), true);
        Ok(true)
    }

    /// `cpus`: how many vCPUs, in which topology.
    fn cpus(&self, ctl: &mut Control, state: &VmState, t: Topology) -> Result<bool> {
        configuring(state)?;
        ctl.config.topology = t;
        self.core.st.lock().cpus = t.cpus;
        Ok(true)
    }

    /// `bootrom`: map a firmware image below 4 GiB.
    fn bootrom(
        &self,
        ctl: &mut Control,
        state: &VmState,
        fds: &mut dyn FdSource,
        n: i32,
    ) -> Result<bool> {
        configuring(state)?;
        let img = boot::read_image(take(fds, n)?, "bootrom", MAX_BOOTROM)?;
        boot::check_bootrom(&img)?;
        let fd = ctl.machine.set_bootrom(&img)?;
        let size = img.len() as u64;
        ctl.config.bootrom = Some(size);
        self.core
            .st
            .lock()
            .put_segment(segment("bootrom", size, fd), false);
        Ok(true)
    }

    /// `bootvars`: the UEFI variable store.
    fn bootvars(
        &self,
        ctl: &mut Control,
        state: &VmState,
        fds: &mut dyn FdSource,
        n: i32,
    ) -> Result<bool> {
        configuring(state)?;
        ctl.config.vars = Some(crate::firmware::load_vars(take(fds, n)?)?);
        Ok(true)
    }

    /// `kernel`: a Linux kernel to boot directly.
    fn kernel(
        &self,
        ctl: &mut Control,
        state: &VmState,
        fds: &mut dyn FdSource,
        n: i32,
    ) -> Result<bool> {
        configuring(state)?;
        let img = boot::read_image(take(fds, n)?, "kernel", MAX_KERNEL)?;
        ctl.config.set_kernel(img)?;
        Ok(true)
    }

    /// `initrd`: the kernel's initial ramdisk.
    fn initrd(
        &self,
        ctl: &mut Control,
        state: &VmState,
        fds: &mut dyn FdSource,
        n: i32,
    ) -> Result<bool> {
        configuring(state)?;
        let limit = ctl.config.initrd_limit();
        ctl.config.initrd = Some(boot::read_image(take(fds, n)?, "initrd", limit)?);
        Ok(true)
    }

    /// `cmdline`: the kernel's command line.
    fn cmdline(&self, ctl: &mut Control, state: &VmState, line: String) -> Result<bool> {
        configuring(state)?;
        ctl.config.cmdline = line;
        Ok(true)
    }

    /// `serial`: a COM port's input and output descriptors.
    fn serial(
        &self,
        ctl: &mut Control,
        state: &VmState,
        port: usize,
        fds: &mut dyn FdSource,
        [input, output]: [i32; 2],
    ) -> Result<bool> {
        configuring(state)?;
        let input = Arc::new(take(fds, input)?);
        let output = Arc::new(take(fds, output)?);
        ctl.config.serial[port] = Some(SerialFds { input, output });
        Ok(true)
    }

    /// `device`: a PCI function in a slot.
    fn device(
        &self,
        ctl: &mut Control,
        state: &VmState,
        slot: PciSlot,
        emulation: &str,
        options: &[String],
        fds: &mut dyn FdSource,
    ) -> Result<bool> {
        configuring(state)?;
        ctl.config.check_device_room(slot)?;
        let slot_name = format!("{}:{}:{}", slot.bus, slot.slot, slot.func);
        let e = PciEmulation::configure(&self.name, &slot_name, emulation, options, &mut |n| {
            take(fds, n)
        })?;
        ctl.config.add_device(slot, e);
        Ok(true)
    }

    /// `set`: a platform option.
    fn set(&self, ctl: &mut Control, state: &VmState, key: &str, value: &str) -> Result<bool> {
        configuring(state)?;
        ctl.config.options.set(key, value)?;
        Ok(true)
    }

    /// `run`: build the machine from the configuration and start it.
    fn run(&self, ctl: &mut Control, state: &VmState) -> Result<bool> {
        configuring(state)?;
        ctl.config.validate()?;
        let core = &self.core;
        core.counters.boot_time.store(0, Ordering::Release);
        core.counters.boot_io_exits.store(0, Ordering::Release);
        // Running before the threads start: a guest that exits at
        // once must find the state it moves from.
        core.set_state(VmState::Running);
        let weak: Weak<Core> = Arc::downgrade(core);
        let on_exit = Box::new(move |r| {
            if let Some(c) = weak.upgrade() {
                c.guest_exited(r);
            }
        });
        if let Err(e) = ctl.machine.start(&ctl.config, &core.counters, on_exit) {
            core.set_state(VmState::Configuring);
            return Err(e);
        }
        Ok(true)
    }

    /// `reinit`: stop the guest; vCPUs and interrupt controllers back to
    /// power-on state. Memory contents and segments stay (as bhyve's
    /// vm_reinit).
    fn reinit(&self, ctl: &mut Control) -> Result<bool> {
        ctl.machine.stop_threads();
        ctl.machine.reset()?;
        self.core.set_state(VmState::Configuring);
        Ok(true)
    }

    /// `reset`, `suspend`, `force-poweroff`: stop the guest with `reason`,
    /// unless it got there first (and already reported).
    fn stop(&self, ctl: &mut Control, state: &VmState, reason: ExitReason) -> Result<bool> {
        running(state)?;
        if !ctl.machine.stop_threads() {
            return Ok(false);
        }
        self.core.set_state(VmState::Exited(reason));
        Ok(true)
    }

    /// `poweroff`: press the power button; the guest decides.
    fn power_button(&self, ctl: &mut Control, state: &VmState) -> Result<bool> {
        running(state)?;
        ctl.machine.power_button();
        Ok(false)
    }

    /// `key=value` lines describing the VM: its name, then
    /// [`vmm_protocol::status::Status`].
    pub fn status(&self) -> String {
        let st = self.core.st.lock();
        // Guest memory the host has actually allocated (bhyvectl's
        // "Resident memory"): the segments' memfds, by allocated blocks.
        let resident: u64 = st
            .segments
            .iter()
            .filter_map(|seg| {
                // SAFETY: fstat on a descriptor the segment owns.
                let mut sb: libc::stat = unsafe { std::mem::zeroed() };
                (unsafe { libc::fstat(seg.fd.as_raw_fd(), &mut sb) } == 0)
                    .then(|| sb.st_blocks as u64 * 512)
            })
            .sum();
        let status = vmm_protocol::status::Status {
            state: st.state.clone(),
            cpus: st.cpus,
            memory: st.memory,
            exits: self.exits(),
            io_exits: self.core.counters.io_exits.load(Ordering::Relaxed),
            boot_time_us: self.boot_time_us(),
            boot_io_exits: self
                .core
                .counters
                .boot_io_exits
                .load(Ordering::Acquire)
                .checked_sub(1),
            resident: Some(resident),
        };
        format!("name={}\n{status}", self.name)
    }

    /// The client that ran the guest went away (vmmfs: its `vmm/NAME` handle
    /// was closed). As when bhyve exits on FreeBSD, the guest stops (exit
    /// `error`, status 4) and the VM lets go of the client's descriptors:
    /// consoles and devices. The VM, its memory and boot images stay; the
    /// next client configures consoles and devices again.
    pub fn detach(&self) {
        let mut ctl = self.core.ctl.lock();
        if self.core.state() == VmState::Destroyed {
            return;
        }
        let stopped = ctl.machine.stop_threads();
        ctl.config.detach();
        if stopped {
            self.core.set_state(VmState::Exited(ExitReason::Error(
                "the process that ran the guest went away".into(),
            )));
        }
        drop(ctl);
        self.core.changed();
    }

    /// Stop everything and free the KVM VM and memory. Idempotent.
    pub fn destroy(&self) {
        let mut ctl = self.core.ctl.lock();
        if self.core.state() == VmState::Destroyed {
            return;
        }
        ctl.release();
        {
            let mut st = self.core.st.lock();
            st.state = VmState::Destroyed;
            st.segments.clear();
        }
        drop(ctl);
        self.core.changed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::command::OwnedFds as NoFds;

    #[test]
    fn create_configure_destroy() {
        let vm = Vm::create("t").expect("KVM must be available for engine tests");
        assert_eq!(vm.segments()[0].size, DEFAULT_MEMORY);
        vm.execute(Command::parse("memory 64M").unwrap(), &mut NoFds::default())
            .unwrap();
        assert_eq!(vm.segments()[0].size, 64 << 20);
        assert!(vm.status().contains("memory=67108864"));
        vm.destroy();
        assert_eq!(
            vm.execute(Command::Run, &mut NoFds::default())
                .unwrap_err()
                .errno(),
            libc::ENXIO
        );
        assert!(vm.segments().is_empty());
    }

    #[test]
    fn vm_is_shareable_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Vm>();
    }

    #[test]
    fn memory_above_4g() {
        let vm = Vm::create("big").unwrap();
        vm.execute(Command::parse("memory 4G").unwrap(), &mut NoFds::default())
            .unwrap();
        let c = vm.core.ctl.lock();
        let gm = c.machine.guest_memory();
        assert_eq!(gm.low_end(), crate::memory::PCI_HOLE_START);
        assert_eq!(gm.high_len(), 1 << 30);
    }

    #[test]
    fn run_without_boot_image_is_einval() {
        let vm = Vm::create("t").unwrap();
        assert_eq!(
            vm.execute(Command::Run, &mut NoFds::default())
                .unwrap_err()
                .errno(),
            libc::EINVAL
        );
    }
}
