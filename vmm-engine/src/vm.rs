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
use crate::builder::{Control, Machine};
use crate::command::{Command, FdSource, PciSlot, Topology};
use crate::config::{SerialFds, VmConfig};
use crate::devices::{Counters, PciEmulation};
use crate::error::{Error, Result};
use crate::memory::MAX_BOOTROM;
use parking_lot::Mutex;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

pub use crate::builder::{prefetch_supported_cpuid, use_kvm_fd};
pub use crate::config::{DEFAULT_MEMORY, MAX_DEVICES, MAX_KERNEL};
pub use crate::memory::Segment;

/// Why a guest stopped, with bhyve's exit status; the life cycle of a VM.
/// Both are the status types of the protocol crate, so that what the engine
/// reports and what vmmfs serves (or receives from a VM worker) are one.
pub use crate::events::ExitReason;
pub use vmm_protocol::status::State as VmState;

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

fn take(fds: &mut dyn FdSource, n: i32) -> Result<OwnedFd> {
    fds.take(n)
        .map_err(|e| Error::io(format!("descriptor {n}"), e))
}

/// A VM before it has a name: its KVM VM and default RAM. A spare worker
/// makes one while it waits for a create, which then costs no KVM VM and no
/// memory (KVM is given the RAM's slot at the first run, as every VM's).
pub struct Unnamed(Core);

impl Unnamed {
    /// The KVM VM with default RAM (256 MiB, not yet touched).
    pub fn new() -> Result<Unnamed> {
        let mut machine = Machine::create()?;
        let fd = machine.set_memory(DEFAULT_MEMORY)?;
        let config = VmConfig::default();
        let st = Status {
            state: VmState::Configuring,
            memory: config.memory,
            cpus: config.topology.cpus,
            segments: vec![Segment::new("sysmem", DEFAULT_MEMORY, fd)],
        };
        Ok(Unnamed(Core {
            ctl: Mutex::new(Control { machine, config }),
            st: Mutex::new(st),
            generation: AtomicU64::new(0),
            notifier: Mutex::new(None),
            counters: Arc::new(Counters::default()),
        }))
    }

    /// Start making the in-kernel irqchip and PIT now, on a thread of their
    /// own, for the first run to take: for a VM made ahead of need (a spare
    /// worker's), where the wait is off every client's path. Most of it is
    /// waiting: turning the PIT's tick reinjection off makes KVM wait for
    /// two SRCU grace periods (16 ms measured under perf, most of a small
    /// guest's launch).
    pub fn start_irqchip(&mut self) -> Result<()> {
        self.0.ctl.get_mut().machine.start_irqchip()
    }

    /// The VM, named.
    pub fn named(self, name: &str) -> Vm {
        Vm {
            name: name.to_string(),
            core: Arc::new(self.0),
        }
    }
}

impl Vm {
    /// Create a VM: a KVM VM with default RAM (256 MiB, not yet touched).
    pub fn create(name: &str) -> Result<Vm> {
        Ok(Unnamed::new()?.named(name))
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

    /// Run one command: one function each, which checks the state first
    /// (as FreeBSD's vmm_dev.c); true from it means a state change.
    pub fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<()> {
        let mut guard = self.core.ctl.lock();
        let state = self.core.state();
        if state == VmState::Destroyed {
            return Err(Error::Destroyed);
        }
        let mut op = Op {
            vm: self,
            ctl: &mut guard,
            state,
        };
        let changed = match cmd {
            Command::Memory(bytes) => op.memory(bytes)?,
            Command::Cpus(t) => op.cpus(t)?,
            Command::Bootrom(n) => op.bootrom(fds, n)?,
            Command::BootVars(n) => op.bootvars(fds, n)?,
            Command::Kernel(n) => op.kernel(fds, n)?,
            Command::Initrd(n) => op.initrd(fds, n)?,
            Command::Cmdline(line) => op.cmdline(line)?,
            Command::Serial {
                port,
                input,
                output,
            } => op.serial(port as usize, fds, [input, output])?,
            Command::Device {
                slot,
                emulation,
                options,
            } => op.device(slot, &emulation, &options, fds)?,
            Command::Set { key, value } => op.set(&key, &value)?,
            Command::Run => op.run()?,
            Command::Reinit => op.reinit()?,
            Command::Reset => op.stop(ExitReason::Reboot)?,
            Command::Suspend => op.stop(ExitReason::Suspend)?,
            Command::ForcePowerOff => op.stop(ExitReason::PowerOff)?,
            Command::PowerOff => op.power_button()?,
        };
        drop(guard);
        if changed {
            self.core.changed();
        }
        Ok(())
    }

    /// `key=value` lines describing the VM: its name, then
    /// [`vmm_protocol::status::Status`].
    pub fn status(&self) -> String {
        let st = self.core.st.lock();
        // Guest memory the host has actually allocated (bhyvectl's
        // "Resident memory").
        let resident = st.segments.iter().filter_map(Segment::allocated).sum();
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

/// One command in progress: the VM, its machinery (the command lock is
/// held) and the state the command found.
struct Op<'a> {
    vm: &'a Vm,
    ctl: &'a mut Control,
    state: VmState,
}

impl Op<'_> {
    /// The state check every command makes first.
    fn require(&self, want: VmState) -> Result<()> {
        if self.state == want {
            return Ok(());
        }
        Err(Error::WrongState(self.state.name()))
    }

    /// `memory`: fresh guest RAM of `bytes`.
    fn memory(&mut self, bytes: u64) -> Result<bool> {
        self.require(VmState::Configuring)?;
        let fd = self.ctl.machine.set_memory(bytes)?;
        self.ctl.config.memory = bytes;
        let mut st = self.vm.core.st.lock();
        st.memory = bytes;
        st.put_segment(Segment::new("sysmem", bytes, fd), true);
        Ok(true)
    }

    /// `cpus`: how many vCPUs, in which topology.
    fn cpus(&mut self, t: Topology) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.topology = t;
        self.vm.core.st.lock().cpus = t.cpus;
        Ok(true)
    }

    /// `bootrom`: map a firmware image below 4 GiB.
    fn bootrom(&mut self, fds: &mut dyn FdSource, n: i32) -> Result<bool> {
        self.require(VmState::Configuring)?;
        let img = boot::read_image(take(fds, n)?, "bootrom", MAX_BOOTROM)?;
        boot::check_bootrom(&img)?;
        let fd = self.ctl.machine.set_bootrom(&img)?;
        let size = img.len() as u64;
        self.ctl.config.bootrom = Some(size);
        let seg = Segment::new("bootrom", size, fd);
        self.vm.core.st.lock().put_segment(seg, false);
        Ok(true)
    }

    /// `bootvars`: the UEFI variable store.
    fn bootvars(&mut self, fds: &mut dyn FdSource, n: i32) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.vars = Some(crate::firmware::load_vars(take(fds, n)?)?);
        Ok(true)
    }

    /// `kernel`: a Linux kernel to boot directly.
    fn kernel(&mut self, fds: &mut dyn FdSource, n: i32) -> Result<bool> {
        self.require(VmState::Configuring)?;
        let img = boot::read_image(take(fds, n)?, "kernel", MAX_KERNEL)?;
        self.ctl.config.set_kernel(img)?;
        Ok(true)
    }

    /// `initrd`: the kernel's initial ramdisk.
    fn initrd(&mut self, fds: &mut dyn FdSource, n: i32) -> Result<bool> {
        self.require(VmState::Configuring)?;
        let limit = self.ctl.config.initrd_limit();
        self.ctl.config.initrd = Some(boot::read_image(take(fds, n)?, "initrd", limit)?);
        Ok(true)
    }

    /// `cmdline`: the kernel's command line.
    fn cmdline(&mut self, line: String) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.cmdline = line;
        Ok(true)
    }

    /// `serial`: a COM port's input and output descriptors.
    fn serial(&mut self, port: usize, fds: &mut dyn FdSource, [i, o]: [i32; 2]) -> Result<bool> {
        self.require(VmState::Configuring)?;
        let input = Arc::new(take(fds, i)?);
        let output = Arc::new(take(fds, o)?);
        self.ctl.config.serial[port] = Some(SerialFds { input, output });
        Ok(true)
    }

    /// `device`: a PCI function in a slot.
    fn device(
        &mut self,
        slot: PciSlot,
        emu: &str,
        opts: &[String],
        fds: &mut dyn FdSource,
    ) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.check_device_room(slot)?;
        let slot_name = format!("{}:{}:{}", slot.bus, slot.slot, slot.func);
        let mut take_fd = |n| take(fds, n);
        let e = PciEmulation::configure(&self.vm.name, &slot_name, emu, opts, &mut take_fd)?;
        self.ctl.config.add_device(slot, e);
        Ok(true)
    }

    /// `set`: a platform option.
    fn set(&mut self, key: &str, value: &str) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.options.set(key, value)?;
        Ok(true)
    }

    /// `run`: build the machine from the configuration and start it.
    fn run(&mut self) -> Result<bool> {
        self.require(VmState::Configuring)?;
        self.ctl.config.validate()?;
        let core = &self.vm.core;
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
        let ctl = &mut *self.ctl;
        if let Err(e) = ctl
            .machine
            .start(&self.vm.name, &ctl.config, &core.counters, on_exit)
        {
            core.set_state(VmState::Configuring);
            return Err(e);
        }
        Ok(true)
    }

    /// `reinit`: stop the guest; vCPUs and interrupt controllers back to
    /// power-on state. Memory contents and segments stay (as bhyve's
    /// vm_reinit).
    fn reinit(&mut self) -> Result<bool> {
        self.ctl.machine.stop_threads();
        self.ctl.machine.reset()?;
        self.vm.core.set_state(VmState::Configuring);
        Ok(true)
    }

    /// `reset`, `suspend`, `force-poweroff`: stop the guest with `reason`,
    /// unless it got there first (and already reported).
    fn stop(&mut self, reason: ExitReason) -> Result<bool> {
        self.require(VmState::Running)?;
        if !self.ctl.machine.stop_threads() {
            return Ok(false);
        }
        self.vm.core.set_state(VmState::Exited(reason));
        Ok(true)
    }

    /// `poweroff`: press the power button; the guest decides.
    fn power_button(&mut self) -> Result<bool> {
        self.require(VmState::Running)?;
        self.ctl.machine.power_button();
        Ok(false)
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
        // Neither a bootrom nor a kernel.
        let err = vm.execute(Command::Run, &mut NoFds::default());
        assert_eq!(err.unwrap_err().errno(), libc::EINVAL);
        assert_eq!(vm.state(), VmState::Configuring);
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
}
