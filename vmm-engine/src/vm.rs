//! A VM: KVM VM descriptor, memory segments, vCPU threads, state machine.
//!
//! Locking: `ctl` serializes commands and owns the machinery (KVM
//! descriptors, mappings, threads); it is held while vCPU threads are
//! stopped and joined. `st` holds what status readers need and is only held
//! briefly, so vCPU threads can report an exit (and the notifier can read
//! status) while a command waits for them.

use crate::boot;
use crate::command::{ComPort, Command, FdSource, PciSlot, Topology};
use crate::devices::{Counters, PciEmulation, Platform, PlatformConfig};
use crate::error::{Error, Result};
use crate::memory::{self, GuestMemory, Mapping, Region, FOUR_GIB, MAX_BOOTROM};
use crate::vcpu::{self, RunCtx, Vcpu};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use parking_lot::Mutex;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

/// Default guest RAM, as bhyve.
pub const DEFAULT_MEMORY: u64 = 256 << 20;
/// Largest kernel image accepted by `kernel`.
pub const MAX_KERNEL: u64 = 512 << 20;
/// Most PCI devices a VM takes (besides the host bridge): one bus's worth of
/// slots, as bhyve's pci_emul places them. Each holds descriptors and a
/// thread in the daemon, so the number is bounded.
pub const MAX_DEVICES: usize = 32;

const SLOT_LOW: u32 = 0;
const SLOT_HIGH: u32 = 1;
const SLOT_BOOTROM: u32 = 2;
/// The UEFI variable store's flash (mapped and unmapped by the device).
const SLOT_VARS: u32 = 3;
/// KVM's real-mode helpers (Intel) live in the PCI hole, below a 16 MiB bootrom.
const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
const TSS_ADDR: usize = 0xfeff_d000;

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

/// Serial port descriptors.
struct SerialFds {
    input: Arc<OwnedFd>,
    output: Arc<OwnedFd>,
}

/// Threads of one run.
struct Runtime {
    ctx: Arc<RunCtx>,
    vcpus: Vec<JoinHandle<Vcpu>>,
    helpers: Vec<JoinHandle<()>>,
}

impl Runtime {
    /// Stop every thread and take the vCPUs back. Returns whether this call
    /// stopped the guest (false: it had already exited by itself).
    fn stop(mut self, out: &mut Vec<Vcpu>) -> bool {
        let first = self.ctx.stop();
        for h in self.vcpus.drain(..) {
            match h.join() {
                Ok(v) => out.push(v),
                Err(_) => log::error!("a vCPU thread panicked; its vCPU is lost"),
            }
        }
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
        // Device threads touch guest RAM: they end before anything can change it.
        self.ctx.platform.shutdown_devices();
        out.sort_by_key(|v| v.id);
        first
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if !self.vcpus.is_empty() || !self.helpers.is_empty() {
            let mut v = Vec::new();
            let rt = Runtime {
                ctx: self.ctx.clone(),
                vcpus: std::mem::take(&mut self.vcpus),
                helpers: std::mem::take(&mut self.helpers),
            };
            rt.stop(&mut v);
        }
    }
}

/// The machinery, owned by whoever holds the command lock.
struct Control {
    // Declared first so it drops (threads joined) before what they use.
    runtime: Option<Runtime>,
    vcpus: Vec<Vcpu>,
    vm: Option<Arc<VmFd>>,
    irqchip: Option<IrqSnapshot>,
    topology: Topology,
    memory: u64,
    ram: Option<Mapping>,
    bootrom: Option<(Mapping, u64)>,
    vars: Option<crate::firmware::BootVars>,
    kernel: Option<Vec<u8>>,
    initrd: Option<Vec<u8>>,
    cmdline: String,
    serial: [Option<SerialFds>; 4],
    pci: Vec<(PciSlot, PciEmulation)>,
    options: PlatformOptions,
}

/// Platform options set with `set KEY=VALUE` (bhyve's configuration variables).
#[derive(Debug, Clone, Copy)]
struct PlatformOptions {
    /// `rtc.use_localtime`: the RTC shows local time (bhyve's default) or UTC (`-u`).
    rtc_localtime: bool,
    /// `x86.mptable`: write an MP table (`-Y` turns it off).
    mptable: bool,
    /// `lpc.fwcfg=qemu`: the platform UEFI firmware (OVMF) expects.
    fwcfg: bool,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        PlatformOptions {
            rtc_localtime: true,
            mptable: true,
            fwcfg: false,
        }
    }
}

impl PlatformOptions {
    /// Apply one `set`; keys this engine has no use for are EOPNOTSUPP.
    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        if key == "lpc.fwcfg" {
            // bhyve's own firmware interface ("bhyve") is not provided:
            // that value means no fw_cfg at all.
            self.fwcfg = match value {
                "qemu" => true,
                "bhyve" => false,
                _ => {
                    return Err(Error::InvalidCommand(format!(
                        "lpc.fwcfg: '{value}' is neither qemu nor bhyve"
                    )))
                }
            };
            return Ok(());
        }
        let slot = match key {
            "rtc.use_localtime" => &mut self.rtc_localtime,
            "x86.mptable" => &mut self.mptable,
            _ => return Err(Error::Unsupported(format!("option '{key}'"))),
        };
        // bhyve's get_config_bool spellings.
        *slot = match value.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            _ => {
                return Err(Error::InvalidCommand(format!(
                    "{key}: '{value}' is not a boolean"
                )))
            }
        };
        Ok(())
    }
}

/// Power-on state of the in-kernel PIC/IOAPIC and PIT.
struct IrqSnapshot {
    chips: Vec<kvm_irqchip>,
    pit: Option<kvm_pit_state2>,
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

static KVM: OnceLock<std::result::Result<Kvm, i32>> = OnceLock::new();

/// Use `fd` (an open /dev/kvm) instead of opening /dev/kvm: for a process
/// that cannot open it (vmmfs's VM worker runs in an empty root). Must come
/// before the first VM; false if the engine already has one.
pub fn use_kvm_fd(fd: OwnedFd) -> bool {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `fd` is an open /dev/kvm descriptor whose ownership moves here.
    let kvm = unsafe { Kvm::from_raw_fd(fd.into_raw_fd()) };
    KVM.set(Ok(kvm)).is_ok()
}

fn kvm() -> Result<&'static Kvm> {
    KVM.get_or_init(|| Kvm::new().map_err(|e| e.errno()))
        .as_ref()
        .map_err(|e| Error::kvm("open /dev/kvm", std::io::Error::from_raw_os_error(*e)))
}

fn supported_cpuid() -> Result<&'static CpuId> {
    static CPUID: OnceLock<std::result::Result<CpuId, i32>> = OnceLock::new();
    let k = kvm()?;
    CPUID
        .get_or_init(|| {
            k.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(|e| e.errno())
        })
        .as_ref()
        .map_err(|e| {
            Error::kvm(
                "KVM_GET_SUPPORTED_CPUID",
                std::io::Error::from_raw_os_error(*e),
            )
        })
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

impl Vm {
    /// Create a VM: a KVM VM with default RAM (256 MiB, not yet touched).
    pub fn create(name: &str) -> Result<Vm> {
        let vm = kvm()?
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        let mut ctl = Control {
            runtime: None,
            vcpus: Vec::new(),
            vm: Some(Arc::new(vm)),
            irqchip: None,
            topology: Topology {
                cpus: 1,
                sockets: 1,
                cores: 1,
                threads: 1,
            },
            memory: 0,
            ram: None,
            bootrom: None,
            vars: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            serial: [None, None, None, None],
            pci: Vec::new(),
            options: PlatformOptions::default(),
        };
        let mut st = Status {
            state: VmState::Configuring,
            memory: DEFAULT_MEMORY,
            cpus: 1,
            segments: Vec::new(),
        };
        ctl.set_memory(&mut st, DEFAULT_MEMORY)?;
        Ok(Vm {
            name: name.to_string(),
            core: Arc::new(Core {
                ctl: Mutex::new(ctl),
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

    /// Run one command.
    pub fn execute(&self, cmd: Command, fds: &mut dyn FdSource) -> Result<()> {
        let core = &self.core;
        let mut ctl = core.ctl.lock();
        let state = core.state();
        if state == VmState::Destroyed {
            return Err(Error::Destroyed);
        }
        let configuring = || -> Result<()> {
            match &state {
                VmState::Configuring => Ok(()),
                s => Err(Error::WrongState(s.name())),
            }
        };
        let running = || -> Result<()> {
            match &state {
                VmState::Running => Ok(()),
                s => Err(Error::WrongState(s.name())),
            }
        };
        let take = |fds: &mut dyn FdSource, n: i32| -> Result<OwnedFd> {
            fds.take(n)
                .map_err(|e| Error::io(format!("descriptor {n}"), e))
        };
        match cmd {
            Command::Memory(bytes) => {
                configuring()?;
                let mut st = core.st.lock();
                ctl.set_memory(&mut st, bytes)?;
            }
            Command::Cpus(t) => {
                configuring()?;
                ctl.topology = t;
                core.st.lock().cpus = t.cpus;
            }
            Command::Bootrom(n) => {
                configuring()?;
                let fd = take(fds, n)?;
                let img = boot::read_image(fd, "bootrom", MAX_BOOTROM)?;
                boot::check_bootrom(&img)?;
                let mut st = core.st.lock();
                ctl.set_bootrom(&mut st, &img)?;
            }
            Command::BootVars(n) => {
                configuring()?;
                ctl.vars = Some(crate::firmware::load_vars(take(fds, n)?)?);
            }
            Command::Kernel(n) => {
                configuring()?;
                let img = boot::read_image(take(fds, n)?, "kernel", MAX_KERNEL)?;
                if !boot::linux::is_bzimage(&img) && !boot::linux::is_elf64(&img) {
                    return Err(Error::InvalidCommand(
                        "kernel is neither a bzImage nor an x86-64 ELF".into(),
                    ));
                }
                ctl.kernel = Some(img);
            }
            Command::Initrd(n) => {
                configuring()?;
                let limit = ctl.memory.min(MAX_KERNEL * 4);
                ctl.initrd = Some(boot::read_image(take(fds, n)?, "initrd", limit)?);
            }
            Command::Cmdline(s) => {
                configuring()?;
                ctl.cmdline = s;
            }
            Command::Serial {
                port,
                input,
                output,
            } => {
                configuring()?;
                let i = Arc::new(take(fds, input)?);
                let o = Arc::new(take(fds, output)?);
                ctl.serial[port as usize] = Some(SerialFds {
                    input: i,
                    output: o,
                });
            }
            Command::Device {
                slot,
                emulation,
                options,
            } => {
                configuring()?;
                if ctl.pci.len() >= MAX_DEVICES && !ctl.pci.iter().any(|(s, _)| *s == slot) {
                    return Err(Error::InvalidCommand(format!(
                        "at most {MAX_DEVICES} PCI devices per VM"
                    )));
                }
                let slot_name = format!("{}:{}:{}", slot.bus, slot.slot, slot.func);
                let e = PciEmulation::configure(
                    &self.name,
                    &slot_name,
                    &emulation,
                    &options,
                    &mut |n| take(fds, n),
                )?;
                ctl.pci.retain(|(s, _)| *s != slot);
                ctl.pci.push((slot, e));
            }
            Command::Set { key, value } => {
                configuring()?;
                ctl.options.set(&key, &value)?;
            }
            Command::Run => {
                configuring()?;
                core.counters.boot_time.store(0, Ordering::Release);
                core.counters.boot_io_exits.store(0, Ordering::Release);
                // Running before the threads start: a guest that exits at
                // once must find the state it moves from.
                core.set_state(VmState::Running);
                if let Err(e) = ctl.start(core) {
                    core.set_state(VmState::Configuring);
                    return Err(e);
                }
            }
            Command::Reinit => {
                ctl.stop_threads();
                ctl.reset_machine()?;
                core.set_state(VmState::Configuring);
            }
            Command::Reset | Command::ForcePowerOff | Command::Suspend => {
                running()?;
                let reason = match cmd {
                    Command::Reset => ExitReason::Reboot,
                    Command::Suspend => ExitReason::Suspend,
                    _ => ExitReason::PowerOff,
                };
                if ctl.stop_threads() {
                    core.set_state(VmState::Exited(reason));
                } else {
                    // The guest got there first and already reported.
                    return Ok(());
                }
            }
            Command::PowerOff => {
                running()?;
                if let Some(rt) = &ctl.runtime {
                    rt.ctx.platform.power_button();
                }
                return Ok(());
            }
        }
        drop(ctl);
        core.changed();
        Ok(())
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
        let stopped = ctl.stop_threads();
        ctl.serial = [None, None, None, None];
        ctl.pci.clear();
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

impl Control {
    fn vm(&self) -> Result<&Arc<VmFd>> {
        self.vm.as_ref().ok_or(Error::Destroyed)
    }

    fn set_slot(&self, slot: u32, gpa: u64, size: u64, host: usize, flags: u32) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by this Control; it
        // is removed from KVM (or the VM closed) before it is unmapped.
        unsafe { self.vm()?.set_user_memory_region(region) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn set_memory(&mut self, st: &mut Status, bytes: u64) -> Result<()> {
        let (low, high) = memory::ram_layout(bytes);
        let fd = memory::memfd("sysmem", bytes)?;
        let map = Mapping::shared(&fd, bytes)?;
        if self.ram.is_some() {
            // KVM cannot resize a slot in place: delete the old ones first.
            self.set_slot(SLOT_LOW, 0, 0, 0, 0)?;
            if memory::ram_layout(self.memory).1 > 0 {
                self.set_slot(SLOT_HIGH, 0, 0, 0, 0)?;
            }
        }
        self.set_slot(SLOT_LOW, 0, low, map.addr(), 0)?;
        if high > 0 {
            if let Err(e) = self.set_slot(SLOT_HIGH, FOUR_GIB, high, map.addr() + low as usize, 0) {
                let _ = self.set_slot(SLOT_LOW, 0, 0, 0, 0);
                return Err(e);
            }
        }
        self.ram = Some(map);
        self.memory = bytes;
        st.memory = bytes;
        st.segments.retain(|s| s.name != "sysmem");
        st.segments.insert(
            0,
            Segment {
                name: "sysmem".into(),
                size: bytes,
                fd: Arc::new(fd),
            },
        );
        Ok(())
    }

    fn set_bootrom(&mut self, st: &mut Status, img: &[u8]) -> Result<()> {
        let size = img.len() as u64;
        let fd = memory::memfd("bootrom", size)?;
        let map = Mapping::shared(&fd, size)?;
        // SAFETY: the mapping is `size` bytes long and img has `size` bytes.
        unsafe { std::ptr::copy_nonoverlapping(img.as_ptr(), map.addr() as *mut u8, img.len()) };
        if self.bootrom.is_some() {
            self.set_slot(SLOT_BOOTROM, 0, 0, 0, 0)?;
        }
        // Read-only when KVM can: guest writes then become (ignored) MMIO exits.
        let flags = if kvm()?.check_extension(Cap::ReadonlyMem) {
            KVM_MEM_READONLY
        } else {
            0
        };
        self.set_slot(SLOT_BOOTROM, FOUR_GIB - size, size, map.addr(), flags)?;
        self.bootrom = Some((map, size));
        st.segments.retain(|s| s.name != "bootrom");
        st.segments.push(Segment {
            name: "bootrom".into(),
            size,
            fd: Arc::new(fd),
        });
        Ok(())
    }

    fn guest_memory(&self) -> GuestMemory {
        let Some(ram) = &self.ram else {
            return GuestMemory::default();
        };
        let (low, high) = memory::ram_layout(self.memory);
        let mut regions = vec![Region {
            gpa: 0,
            len: low,
            host: ram.addr(),
        }];
        if high > 0 {
            regions.push(Region {
                gpa: FOUR_GIB,
                len: high,
                host: ram.addr() + low as usize,
            });
        }
        GuestMemory::new(regions)
    }

    /// Create the in-kernel irqchip and PIT once, remembering their
    /// power-on state; later runs restore it.
    fn ensure_irqchip(&mut self) -> Result<()> {
        let vm = self.vm()?.clone();
        if self.irqchip.is_none() {
            if let Err(e) = vm.set_identity_map_address(IDENTITY_MAP_ADDR) {
                log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e}");
            }
            if let Err(e) = vm.set_tss_address(TSS_ADDR) {
                log::debug!("KVM_SET_TSS_ADDR: {e}");
            }
            vm.create_irq_chip()
                .map_err(|e| Error::kvm("KVM_CREATE_IRQCHIP", e))?;
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            vm.create_pit2(pit)
                .map_err(|e| Error::kvm("KVM_CREATE_PIT2", e))?;
            crate::devices::pit_drop_lost_ticks(&vm);
            let mut chips = Vec::new();
            for id in 0..3 {
                let mut c = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                if vm.get_irqchip(&mut c).is_ok() {
                    chips.push(c);
                }
            }
            self.irqchip = Some(IrqSnapshot {
                chips,
                pit: vm.get_pit2().ok(),
            });
        } else if let Some(snap) = &self.irqchip {
            for c in &snap.chips {
                if let Err(e) = vm.set_irqchip(c) {
                    log::debug!("KVM_SET_IRQCHIP {}: {e}", c.chip_id);
                }
            }
            if let Some(p) = &snap.pit {
                if let Err(e) = vm.set_pit2(p) {
                    log::debug!("KVM_SET_PIT2: {e}");
                }
            }
        }
        Ok(())
    }

    fn ensure_vcpus(&mut self) -> Result<()> {
        let vm = self.vm()?.clone();
        let base = supported_cpuid()?;
        while self.vcpus.len() < usize::from(self.topology.cpus) {
            let id = self.vcpus.len() as u16;
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
            let cpuid = vcpu::cpuid_for(base, u32::from(id), &self.topology)?;
            self.vcpus.push(Vcpu::new(fd, id, &cpuid)?);
        }
        Ok(())
    }

    /// Build the platform, load the boot image and start the threads.
    fn start(&mut self, core: &Arc<Core>) -> Result<()> {
        if self.bootrom.is_none() && self.kernel.is_none() {
            return Err(Error::InvalidCommand(
                "nothing to boot: give a bootrom or a kernel".into(),
            ));
        }
        self.ensure_irqchip()?;
        self.ensure_vcpus()?;
        let cpus = usize::from(self.topology.cpus);
        let mem = self.guest_memory();
        let coms = crate::devices::com_present(&self.serial.each_ref().map(|s| s.is_some()));
        if mem.low_end() >= 0x10_0000 {
            crate::acpi::write_tables(&mem, self.topology.cpus, self.options.mptable, coms)?;
        }
        let mut entry = None;
        if let Some(k) = &self.kernel {
            let l = boot::linux::load(&mem, k, self.initrd.as_deref(), &self.cmdline)?;
            log::debug!("linux loaded: {l:?}");
            entry = Some(l.entry);
        }
        if let Some(e) = entry {
            let bsp = &self.vcpus[0];
            let (regs, sregs) = boot::linux::entry_state(&e, bsp.initial_sregs());
            bsp.fd
                .set_sregs(&sregs)
                .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
            bsp.fd
                .set_regs(&regs)
                .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
        }
        let vm = self.vm()?.clone();
        let firmware = match (&self.bootrom, self.options.fwcfg) {
            (Some((_, rom_size)), true) => Some(crate::firmware::config(
                &vm,
                &mem,
                self.topology.cpus,
                *rom_size,
                self.vars.as_ref(),
                SLOT_VARS,
                coms,
            )?),
            _ => None,
        };
        if self.vars.is_some() && firmware.is_none() {
            return Err(Error::InvalidCommand(
                "a variable store needs a boot ROM and lpc.fwcfg=qemu".into(),
            ));
        }
        let platform = Arc::new(Platform::new(
            vm.clone(),
            PlatformConfig {
                serial_out: self
                    .serial
                    .each_ref()
                    .map(|s| s.as_ref().map(|s| s.output.clone())),
                pci: self.pci.clone(),
                ram: mem.regions().to_vec(),
                rtc_utc: !self.options.rtc_localtime,
                firmware,
            },
            core.counters.clone(),
        )?);
        let weak: Weak<Core> = Arc::downgrade(core);
        let ctx = RunCtx::new(
            cpus,
            platform,
            core.counters.clone(),
            Box::new(move |r| {
                if let Some(c) = weak.upgrade() {
                    c.guest_exited(r);
                }
            }),
        )?;
        let run_size = vm.run_size();
        let mut rt = Runtime {
            ctx: ctx.clone(),
            vcpus: Vec::new(),
            helpers: Vec::new(),
        };
        let to_run: Vec<Vcpu> = self.vcpus.drain(..cpus).collect();
        let spawn_err = |e: std::io::Error| Error::io("spawn thread", e);
        let mut spawn_failed = None;
        for (i, v) in to_run.into_iter().enumerate() {
            let c = ctx.clone();
            match std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    crate::threads::started(crate::threads::ThreadKind::Vcpu);
                    vcpu::vcpu_thread(v, i, run_size, c)
                }) {
                Ok(h) => rt.vcpus.push(h),
                Err(e) => {
                    // The vCPU moved into the failed closure is gone; KVM cannot
                    // recreate it, so this VM can only be destroyed now.
                    spawn_failed = Some(spawn_err(e));
                    break;
                }
            }
        }
        if spawn_failed.is_none() {
            let c = ctx.clone();
            match std::thread::Builder::new()
                .name("vcpu-watchdog".into())
                .spawn(move || {
                    crate::threads::started(crate::threads::ThreadKind::Helper);
                    vcpu::watchdog_thread(c)
                }) {
                Ok(h) => rt.helpers.push(h),
                Err(e) => spawn_failed = Some(spawn_err(e)),
            }
        }
        for (i, s) in self.serial.iter().enumerate() {
            if spawn_failed.is_some() {
                break;
            }
            let Some(s) = s else { continue };
            let c = ctx.clone();
            let input = s.input.clone();
            let port = ComPort::ALL[i];
            match std::thread::Builder::new()
                .name(format!("com{}-in", i + 1))
                .spawn(move || {
                    crate::threads::started(crate::threads::ThreadKind::Helper);
                    serial_reader(input, port, c)
                }) {
                Ok(h) => rt.helpers.push(h),
                Err(e) => spawn_failed = Some(spawn_err(e)),
            }
        }
        if let Some(e) = spawn_failed {
            let mut back = Vec::new();
            rt.stop(&mut back);
            self.vcpus.splice(0..0, back);
            return Err(e);
        }
        self.runtime = Some(rt);
        Ok(())
    }

    /// Stop and join the threads of the current run, if any. True if the
    /// guest was still running (this call stopped it).
    fn stop_threads(&mut self) -> bool {
        let Some(rt) = self.runtime.take() else {
            return false;
        };
        let mut back = Vec::new();
        let first = rt.stop(&mut back);
        // Running vCPUs were the first ones; put them back in front.
        self.vcpus.splice(0..0, back);
        first
    }

    /// `reinit`: vCPUs and interrupt controllers back to power-on state.
    /// Memory contents and segments stay (as bhyve's vm_reinit).
    fn reset_machine(&mut self) -> Result<()> {
        for v in &mut self.vcpus {
            v.reset()?;
        }
        if self.irqchip.is_some() {
            self.ensure_irqchip()?;
        }
        Ok(())
    }

    fn release(&mut self) {
        self.stop_threads();
        self.vcpus.clear();
        self.serial = [None, None, None, None];
        // Device descriptors (disks, passt sockets, taps) go with the VM:
        // passt then sees its socket close and exits.
        self.pci.clear();
        self.kernel = None;
        self.initrd = None;
        // Closing the VM drops its memory slots before the mappings go.
        self.vm = None;
        self.irqchip = None;
        self.ram = None;
        self.bootrom = None;
        self.vars = None;
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.release();
    }
}

/// Copy bytes from a serial input descriptor into the UART until the run
/// stops or the input ends.
fn serial_reader(input: Arc<OwnedFd>, port: ComPort, ctx: Arc<RunCtx>) {
    let mut buf = [0u8; crate::devices::serial::RX_FIFO];
    loop {
        if ctx.stopping() {
            return;
        }
        let space = ctx.platform.serial_space(port);
        let mut fds = [
            libc::pollfd {
                fd: ctx.stop_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: input.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // With a full FIFO only wait for stop, briefly, then look again.
        let (n, timeout) = if space == 0 { (1, 2) } else { (2, -1) };
        // SAFETY: fds is a valid array of n pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), n, timeout) };
        if r < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        if n == 1 || fds[1].revents == 0 {
            continue;
        }
        if fds[1].revents & libc::POLLNVAL != 0 {
            return;
        }
        let want = space.min(buf.len());
        // SAFETY: reading at most `want` bytes into buf.
        let got = unsafe { libc::read(input.as_raw_fd(), buf.as_mut_ptr().cast(), want) };
        match got {
            0 => return, // end of input
            n if n > 0 => {
                ctx.platform.serial_input(port, &buf[..n as usize]);
            }
            _ => {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    _ => {
                        log::debug!("serial input: {e}");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::command::OwnedFds as NoFds;

    #[test]
    fn every_protocol_set_key_is_accepted() {
        for key in vmm_protocol::command::SET_KEYS {
            let value = if *key == "lpc.fwcfg" { "qemu" } else { "true" };
            PlatformOptions::default().set(key, value).unwrap();
        }
        assert!(matches!(
            PlatformOptions::default().set("x86.strictmsr", "true"),
            Err(Error::Unsupported(_))
        ));
    }

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
        let gm = c.guest_memory();
        assert_eq!(gm.low_end(), memory::PCI_HOLE_START);
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
