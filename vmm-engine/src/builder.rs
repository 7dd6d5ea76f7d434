//! From a [`VmConfig`] to a running machine: the KVM VM, its memory slots,
//! in-kernel irqchip and PIT, vCPUs, the platform's devices and the threads
//! of a run (Firecracker's `builder.rs`). Nothing here knows the VM's state
//! machine or status; a guest's exit is reported through a callback.

use crate::boot;
use crate::cast;
use crate::config::VmConfig;
use crate::devices::{Counters, FirmwareConfig, Platform, PlatformConfig};
use crate::error::{Error, Result};
use crate::events::ExitReason;
use crate::memory::{self, GuestMemory, Mapping, Region, FOUR_GIB};
use crate::runtime::Runtime;
use crate::vcpu::{self, RunCtx, Vcpu};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, CpuId,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};

const SLOT_LOW: u32 = 0;
const SLOT_HIGH: u32 = 1;
const SLOT_BOOTROM: u32 = 2;
/// The UEFI variable store's flash (mapped and unmapped by the device).
const SLOT_VARS: u32 = 3;
/// KVM's real-mode helpers (Intel) live in the PCI hole, below a 16 MiB bootrom.
const IDENTITY_MAP_ADDR: u64 = 0xfeff_c000;
const TSS_ADDR: usize = 0xfeff_d000;

/// What a vCPU or the watchdog calls when the guest exits by itself.
pub type OnExit = Box<dyn Fn(ExitReason) + Send + Sync>;

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

/// What KVM_GET_SUPPORTED_CPUID answered, asked once per process.
static CPUID: OnceLock<std::result::Result<CpuId, i32>> = OnceLock::new();

/// Ask KVM now, through `kvm` (an open /dev/kvm, left open), which CPUID
/// it supports, for the first run of this process or of any process forked
/// from it. vmmfs's worker zygote does it once: the answer is the host's,
/// and the call took 1 ms of every worker's first run on this machine's
/// KVM.
pub fn prefetch_supported_cpuid(kvm: BorrowedFd<'_>) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: `kvm` is an open /dev/kvm; ManuallyDrop keeps the borrowed
    // descriptor from being closed when this handle goes.
    let k = std::mem::ManuallyDrop::new(unsafe { Kvm::from_raw_fd(kvm.as_raw_fd()) });
    cpuid_of(&k);
}

/// [`CPUID`], asked of `k` if no one has yet.
fn cpuid_of(k: &Kvm) -> &'static std::result::Result<CpuId, i32> {
    CPUID.get_or_init(|| {
        k.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| e.errno())
    })
}

fn supported_cpuid() -> Result<&'static CpuId> {
    cpuid_of(kvm()?).as_ref().map_err(|e| {
        Error::kvm(
            "KVM_GET_SUPPORTED_CPUID",
            std::io::Error::from_raw_os_error(*e),
        )
    })
}

/// Power-on state of the in-kernel PIC/IOAPIC and PIT.
struct IrqSnapshot {
    chips: Vec<kvm_irqchip>,
    pit: Option<kvm_pit_state2>,
}

/// The KVM objects of one VM and the threads of its current run.
pub(crate) struct Machine {
    // Declared first so it drops (threads joined) before what they use.
    runtime: Option<Runtime>,
    vcpus: Vec<Vcpu>,
    vm: Option<Arc<VmFd>>,
    irqchip: Option<IrqSnapshot>,
    /// The irqchip and PIT being made ahead ([`Machine::start_irqchip`]).
    irqchip_ahead: Option<std::thread::JoinHandle<Result<IrqSnapshot>>>,
    /// Guest RAM and its size.
    ram: Option<(Mapping, u64)>,
    /// Whether KVM has slots for `ram` ([`Machine::register_ram`]).
    ram_in_kvm: bool,
    /// The boot ROM and its size.
    bootrom: Option<(Mapping, u64)>,
}

impl Machine {
    /// A KVM VM without memory, vCPUs or devices.
    pub(crate) fn create() -> Result<Machine> {
        let vm = kvm()?
            .create_vm()
            .map_err(|e| Error::kvm("KVM_CREATE_VM", e))?;
        Ok(Machine {
            runtime: None,
            vcpus: Vec::new(),
            vm: Some(Arc::new(vm)),
            irqchip: None,
            irqchip_ahead: None,
            ram: None,
            ram_in_kvm: false,
            bootrom: None,
        })
    }

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
        // SAFETY: the host range is a live mapping owned by this Machine; it
        // is removed from KVM (or the VM closed) before it is unmapped.
        unsafe { self.vm()?.set_user_memory_region(region) }
            .map_err(|e| Error::kvm("KVM_SET_USER_MEMORY_REGION", e))
    }

    /// Give the guest `bytes` of fresh RAM (replacing any); returns its memfd.
    ///
    /// KVM is told of it only when a vCPU is about to run
    /// ([`Machine::register_ram`]): each slot change waits for KVM's SRCU
    /// grace periods (three for a replacement: measured 0.9 ms of a
    /// 12 ms launch, where bhyve's `-m` replaced the default RAM), and a VM
    /// that never runs needs no slot. Until then the RAM is the memfd and
    /// its mapping, which loaders, devices and `vmm.io` use alike.
    pub(crate) fn set_memory(&mut self, bytes: u64) -> Result<OwnedFd> {
        let fd = memory::memfd("sysmem", bytes)?;
        let map = Mapping::shared(&fd, bytes)?;
        if let (true, Some((_, old))) = (self.ram_in_kvm, &self.ram) {
            // KVM cannot resize a slot in place, and its slots must go
            // before the mapping they point into.
            let old_high = memory::ram_layout(*old).1;
            self.set_slot(SLOT_LOW, 0, 0, 0, 0)?;
            if old_high > 0 {
                self.set_slot(SLOT_HIGH, 0, 0, 0, 0)?;
            }
            self.ram_in_kvm = false;
        }
        self.ram = Some((map, bytes));
        Ok(fd)
    }

    /// Give KVM the slots of the guest's RAM, once (before the first run
    /// after [`Machine::set_memory`]).
    fn register_ram(&mut self) -> Result<()> {
        let Some((map, bytes)) = &self.ram else {
            return Ok(());
        };
        if self.ram_in_kvm {
            return Ok(());
        }
        let (low, high) = memory::ram_layout(*bytes);
        let host = map.addr();
        self.set_slot(SLOT_LOW, 0, low, host, 0)?;
        if high > 0 {
            if let Err(e) =
                self.set_slot(SLOT_HIGH, FOUR_GIB, high, host + cast::usize_from(low), 0)
            {
                let _ = self.set_slot(SLOT_LOW, 0, 0, 0, 0);
                return Err(e);
            }
        }
        self.ram_in_kvm = true;
        Ok(())
    }

    /// Map `img` as the boot ROM ending at 4 GiB (replacing any); returns its memfd.
    pub(crate) fn set_bootrom(&mut self, img: &[u8]) -> Result<OwnedFd> {
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
        Ok(fd)
    }

    /// Guest RAM as the devices and loaders see it.
    pub(crate) fn guest_memory(&self) -> GuestMemory {
        let Some((ram, size)) = &self.ram else {
            return GuestMemory::default();
        };
        let (low, high) = memory::ram_layout(*size);
        let mut regions = vec![Region {
            gpa: 0,
            len: low,
            host: ram.addr(),
        }];
        if high > 0 {
            regions.push(Region {
                gpa: FOUR_GIB,
                len: high,
                host: ram.addr() + cast::usize_from(low),
            });
        }
        GuestMemory::new(regions)
    }

    /// Start making the in-kernel irqchip and PIT on a thread of their own,
    /// for the first run to take ([`crate::vm::Unnamed::start_irqchip`]).
    pub(crate) fn start_irqchip(&mut self) -> Result<()> {
        let vm = self.vm()?.clone();
        let h = crate::runtime::spawn(
            "irqchip".into(),
            crate::threads::ThreadKind::Helper,
            move || make_irqchip(&vm),
        )?;
        self.irqchip_ahead = Some(h);
        Ok(())
    }

    /// Create the in-kernel irqchip and PIT once (or take those made
    /// ahead), remembering their power-on state; later runs restore it.
    fn ensure_irqchip(&mut self) -> Result<()> {
        if self.irqchip.is_some() {
            return self.restore_irqchip();
        }
        let snap = match self.irqchip_ahead.take() {
            Some(h) => h
                .join()
                .map_err(|_| Error::io("irqchip", std::io::Error::other("thread panicked")))??,
            None => make_irqchip(self.vm()?)?,
        };
        self.irqchip = Some(snap);
        Ok(())
    }

    fn restore_irqchip(&self) -> Result<()> {
        let Some(snap) = &self.irqchip else {
            return Ok(());
        };
        let vm = self.vm()?;
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
        Ok(())
    }

    fn ensure_vcpus(&mut self, config: &VmConfig) -> Result<()> {
        let vm = self.vm()?.clone();
        let base = supported_cpuid()?;
        while self.vcpus.len() < usize::from(config.topology.cpus) {
            // Fits: len < cpus, itself a u16.
            let id = u16::try_from(self.vcpus.len()).unwrap_or(u16::MAX);
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|e| Error::kvm("KVM_CREATE_VCPU", e))?;
            let cpuid = vcpu::cpuid_for(base, u32::from(id), &config.topology)?;
            self.vcpus.push(Vcpu::new(fd, id, &cpuid)?);
        }
        Ok(())
    }

    /// Build the platform, load the boot image and start the threads of
    /// the VM named `name`. `config` has been validated.
    pub(crate) fn start(
        &mut self,
        name: &str,
        config: &VmConfig,
        counters: &Arc<Counters>,
        on_exit: OnExit,
    ) -> Result<()> {
        self.register_ram()?;
        self.ensure_irqchip()?;
        self.ensure_vcpus(config)?;
        let mem = self.guest_memory();
        let coms = crate::devices::com_present(&config.serial_configured());
        let uuid = config
            .options
            .uuid
            .unwrap_or_else(|| crate::acpi::vm_uuid(name));
        if mem.low_end() >= 0x10_0000 {
            let (topology, mptable) = (&config.topology, config.options.mptable);
            crate::acpi::write_tables(&mem, topology, mptable, coms, uuid)?;
        }
        self.load_kernel(config, &mem)?;
        let vm = self.vm()?.clone();
        let firmware = self.firmware(config, &mem, coms, uuid)?;
        let platform = Arc::new(Platform::new(
            vm,
            PlatformConfig {
                serial_out: config
                    .serial
                    .each_ref()
                    .map(|s| s.as_ref().map(|s| s.output.clone())),
                pci: config.pci.clone(),
                ram: mem.regions().to_vec(),
                rtc_utc: !config.options.rtc_localtime,
                firmware,
            },
            counters.clone(),
        )?);
        let cpus = usize::from(config.topology.cpus);
        let ctx = RunCtx::new(cpus, platform, counters.clone(), on_exit)?;
        self.launch(ctx, config)
    }

    /// Load the Linux kernel, if any, and point the boot vCPU at it.
    fn load_kernel(&self, config: &VmConfig, mem: &GuestMemory) -> Result<()> {
        let Some(k) = &config.kernel else {
            return Ok(());
        };
        let l = boot::linux::load(mem, k, config.initrd.as_deref(), &config.cmdline)?;
        log::debug!("linux loaded: {l:?}");
        let bsp = &self.vcpus[0];
        let (regs, sregs) = boot::linux::entry_state(&l.entry, bsp.initial_sregs());
        bsp.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
        bsp.fd
            .set_regs(&regs)
            .map_err(|e| Error::kvm("KVM_SET_REGS", e))
    }

    /// UEFI's platform (fw_cfg, variable store) for a boot ROM with
    /// `lpc.fwcfg=qemu`; `uuid` is the system's in SMBIOS.
    fn firmware(
        &self,
        config: &VmConfig,
        mem: &GuestMemory,
        coms: [bool; 4],
        uuid: [u8; 16],
    ) -> Result<Option<FirmwareConfig>> {
        let (Some((_, rom_size)), true) = (&self.bootrom, config.options.fwcfg) else {
            return Ok(None);
        };
        let mut fw = crate::firmware::config(
            self.vm()?,
            mem,
            config.topology.cpus,
            *rom_size,
            config.vars.as_ref(),
            SLOT_VARS,
            coms,
        )?;
        // SMBIOS as a directly booted guest finds it, for OVMF to install.
        let smbios = crate::acpi::smbios_fw_cfg_files(&config.topology, mem, uuid);
        crate::firmware::add_files(&mut fw.fwcfg, smbios)?;
        Ok(Some(fw))
    }

    /// Start the run's threads on the first vCPUs.
    fn launch(&mut self, ctx: Arc<RunCtx>, config: &VmConfig) -> Result<()> {
        let run_size = self.vm()?.run_size();
        let cpus = usize::from(config.topology.cpus);
        let to_run: Vec<Vcpu> = self.vcpus.drain(..cpus).collect();
        match Runtime::start(ctx, to_run, run_size, &config.serial) {
            Ok(rt) => self.runtime = Some(rt),
            Err((e, back)) => {
                self.vcpus.splice(0..0, back);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stop and join the threads of the current run, if any. True if the
    /// guest was still running (this call stopped it).
    pub(crate) fn stop_threads(&mut self) -> bool {
        let Some(rt) = self.runtime.take() else {
            return false;
        };
        let mut back = Vec::new();
        let first = rt.stop(&mut back);
        // Running vCPUs were the first ones; put them back in front.
        self.vcpus.splice(0..0, back);
        first
    }

    /// Press the ACPI power button of the running guest, if one runs.
    pub(crate) fn power_button(&self) {
        if let Some(rt) = &self.runtime {
            rt.ctx.platform.power_button();
        }
    }

    /// vCPUs and interrupt controllers back to power-on state. Memory
    /// contents stay (as bhyve's vm_reinit).
    pub(crate) fn reset(&mut self) -> Result<()> {
        for v in &mut self.vcpus {
            v.reset()?;
        }
        self.restore_irqchip()
    }

    /// Close the KVM VM, then unmap its memory. An irqchip still being made
    /// ahead is not waited for: its thread holds the VM open a few more
    /// milliseconds, with no vCPU to touch the unmapped memory.
    pub(crate) fn close(&mut self) {
        self.stop_threads();
        self.vcpus.clear();
        // Closing the VM drops its memory slots before the mappings go.
        self.vm = None;
        self.irqchip = None;
        self.ram = None;
        self.ram_in_kvm = false;
        self.bootrom = None;
    }
}

/// Owned by whoever holds the command lock: the configuration and the
/// machine built from it.
pub(crate) struct Control {
    pub(crate) machine: Machine,
    pub(crate) config: VmConfig,
}

impl Control {
    /// Stop the guest and let go of everything but the VM's name.
    pub(crate) fn release(&mut self) {
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

/// The in-kernel irqchip and PIT of `vm` (before its vCPUs), with their
/// power-on state.
fn make_irqchip(vm: &VmFd) -> Result<IrqSnapshot> {
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
    crate::devices::pit_drop_lost_ticks(vm);
    // The PIT on IOAPIC pin 2 from the start, as the tables say: KVM's
    // default puts it on pin 0 (devices::legacy_routes).
    crate::devices::set_gsi_routing(vm, &[])?;
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
    Ok(IrqSnapshot {
        chips,
        pit: vm.get_pit2().ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_above_4g() {
        let mut m = Machine::create().expect("KVM must be available for engine tests");
        m.set_memory(4 << 30).unwrap();
        let gm = m.guest_memory();
        assert_eq!(gm.low_end(), memory::PCI_HOLE_START);
        assert_eq!(gm.high_len(), 1 << 30);
    }

    /// The PIT's GSI 0 reaches IOAPIC pin 2, where the MADT and the MP
    /// table put ISA IRQ 0, and not KVM's default pin 0. Every pin starts
    /// masked, so a raised line stays in the IOAPIC's IRR, which tells
    /// the pin.
    #[test]
    fn the_pit_line_reaches_the_ioapic_pin_the_tables_name() {
        let vm = kvm()
            .expect("KVM must be available for engine tests")
            .create_vm()
            .unwrap();
        make_irqchip(&vm).unwrap();
        vm.set_irq_line(0, true).unwrap();
        let mut c = kvm_irqchip {
            chip_id: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm.get_irqchip(&mut c).unwrap();
        // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
        let irr = unsafe { c.chip.ioapic.irr };
        assert_eq!(
            irr,
            1 << crate::devices::PIT_IOAPIC_PIN,
            "IOAPIC IRR {irr:#x}"
        );
        // A serial port's line is still its own pin.
        vm.set_irq_line(4, true).unwrap();
        vm.get_irqchip(&mut c).unwrap();
        // SAFETY: as above.
        let irr = unsafe { c.chip.ioapic.irr };
        assert_eq!(irr, (1 << 2) | (1 << 4), "IOAPIC IRR {irr:#x}");
    }

    #[test]
    fn ram_reaches_kvm_at_the_first_run_and_is_replaced_cleanly() {
        let mut m = Machine::create().expect("KVM must be available for engine tests");
        m.set_memory(256 << 20).unwrap();
        assert!(!m.ram_in_kvm, "no slot before a run");
        // A replacement before any run costs KVM nothing.
        m.set_memory(32 << 20).unwrap();
        assert!(!m.ram_in_kvm);
        m.register_ram().unwrap();
        assert!(m.ram_in_kvm);
        // Again is a no-op.
        m.register_ram().unwrap();
        // After a run, a replacement removes the slots first: registering
        // the new RAM at the same slot numbers then succeeds.
        m.set_memory(5 << 30).unwrap();
        assert!(!m.ram_in_kvm);
        m.register_ram().unwrap();
        assert_eq!(
            m.guest_memory().high_len(),
            (5 << 30) - memory::PCI_HOLE_START
        );
    }
}
