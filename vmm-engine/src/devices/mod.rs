//! The x86 platform's port-I/O and MMIO devices, and the dispatch of vCPU
//! I/O exits to them.
//!
//! Everything here faces the guest: ports, sizes and values are guest
//! controlled and are decoded without trusting any of them.

pub mod ahci;
mod emulation;
pub mod flash;
pub mod fwcfg;
pub mod legacy;
pub mod pci;
pub mod pm;
pub mod routing;
pub mod rtc;
pub mod serial;
pub mod virtio;

use crate::bus::{Bus, SharedDevice};
use crate::command::{ComPort, PciSlot};
use crate::error::{Error, Result};
use crate::events::{ExitReason, VmEvents};
use crate::memory::Region;
use kvm_ioctls::VmFd;
use legacy::{BootTimer, IrqLine, PciConfigIo, PciEcam, PmBlock, SerialPort, I8042};
use parking_lot::Mutex;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

pub use crate::events::Counters;
pub use emulation::PciEmulation;
pub use legacy::RESET_PORT;
pub use pm::{PM1A_CNT, PM1A_EVT, PM_TMR, SCI_IRQ};
pub use routing::{legacy_routes, set_gsi_routing, PIT_IOAPIC_PIN};

/// COM1-COM4 I/O bases and ISA IRQs (COM3 shares IRQ 4 with COM1, COM4
/// IRQ 3 with COM2, as on a PC).
pub const COM_PORTS: [(u16, u32); 4] = [(0x3f8, 4), (0x2f8, 3), (0x3e8, 4), (0x2e8, 3)];

/// Which serial ports a guest has: COM1 and COM2 always, COM3 and COM4
/// when configured (otherwise their ports stay empty, as Linux's probes
/// expect on a PC without them).
pub fn com_present(configured: &[bool; 4]) -> [bool; 4] {
    [true, true, configured[2], configured[3]]
}
/// Firecracker-style boot-timer port: a write marks "booted".
pub const BOOT_TIMER_PORT: u16 = 0x440;

/// First address of the window BARs are placed in before the guest moves
/// them (the PCI hole starts at 3 GiB).
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
/// PCIe enhanced configuration (ECAM), described by the MCFG, for bus 0
/// only: the one bus there is (no bridges). An MCFG reaching further makes
/// Linux's peer-bridge fixup probe every slot of every bus through ports
/// 0xcf8/0xcfc (16,000 port exits of boot time).
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;

/// Make KVM's PIT drop the ticks a guest could not take in time instead of
/// delivering them later in a burst (its default "reinject" policy); bhyve's
/// PIT does not catch up either. A guest whose timer handler runs slowly
/// (UEFI firmware with interrupts off, on a slow or nested host) otherwise
/// finds a new tick pending every time it returns from the last one.
pub fn pit_drop_lost_ticks(vm: &VmFd) {
    /// KVM_REINJECT_CONTROL = _IO(KVMIO, 0x71); struct kvm_reinject_control.
    const KVM_REINJECT_CONTROL: libc::c_ulong = 0xae71;
    #[repr(C)]
    struct ReinjectControl {
        pit_reinject: u8,
        reserved: [u8; 31],
    }
    let ctl = ReinjectControl {
        pit_reinject: 0,
        reserved: [0; 31],
    };
    // SAFETY: the ioctl reads a kvm_reinject_control from a valid pointer.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(vm),
            KVM_REINJECT_CONTROL as _,
            &ctl,
        )
    };
    if r < 0 {
        log::debug!("KVM_REINJECT_CONTROL: {}", std::io::Error::last_os_error());
    }
}

/// Pin (0 = INTA) and IOAPIC line of a PCI function's INTx: function f uses
/// INT(A+f%4), and (slot, pin) goes to line 16 + (slot + pin) % 8, the
/// swizzle the DSDT's _PRT describes.
pub fn intx_route(slot: u8, func: u8) -> (u8, u32) {
    let pin = func % 4;
    (pin, 16 + (u32::from(slot) + u32::from(pin)) % 8)
}

/// Ports a stock kernel probes for hardware this platform does not have:
/// Super-I/O configuration (0x2e/0x4e), COM3/COM4, the DMA page registers
/// (0x80-0x8f but 0x80 itself), the second RTC bank. Reads float to ones
/// and writes go nowhere, as on a PC without them; known, so not logged.
fn is_absent_probe(port: u16) -> bool {
    matches!(port, 0x2e | 0x2f | 0x4e | 0x4f | 0x72 | 0x73 | 0x81..=0x8f)
        || (0x3e8..0x3f0).contains(&port)
        || (0x2e8..0x2f0).contains(&port)
}

/// What the platform is built from at `run`.
pub struct PlatformConfig {
    pub serial_out: [Option<Arc<OwnedFd>>; 4],
    pub pci: Vec<(PciSlot, PciEmulation)>,
    /// Guest RAM, for device threads.
    pub ram: Vec<Region>,
    /// The RTC keeps UTC (bhyve -u) rather than local time.
    pub rtc_utc: bool,
    /// UEFI firmware's platform (bhyve's `lpc.fwcfg=qemu`), if asked for.
    pub firmware: Option<FirmwareConfig>,
}

/// What OVMF finds besides the common platform: fw_cfg with its items, the
/// variable store's flash, and the PCI functions it identifies the machine
/// by (an i440FX host bridge, the PIIX4 PM function at 0:1.3, a PIIX3 ISA
/// bridge, which its boot manager puts the serial console behind).
pub struct FirmwareConfig {
    pub fwcfg: fwcfg::FwCfgItems,
    pub flash: Option<flash::FlashConfig>,
}

/// All emulated devices of one run of a VM: a port-I/O bus and an MMIO bus
/// of [`crate::bus::BusDevice`]s, each device behind its own lock, plus the
/// handles the VM drives devices through (serial input, power button).
pub struct Platform {
    pio: Bus,
    mmio: Bus,
    /// PCI functions (configuration space and BARs); the BARs move where the
    /// guest puts them, so MMIO the bus does not hold comes here.
    pci: Arc<Mutex<pci::PciBus>>,
    com: [Arc<Mutex<SerialPort>>; 4],
    pm: Arc<Mutex<PmBlock>>,
    /// Stop requests of the devices; "the run is stopping" for them.
    events: VmEvents,
}

fn size_mask(size: usize) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

/// The PCI functions: the `device`s in slot order, then what UEFI firmware
/// looks for. BARs start out one per 16 KiB in the PCI hole, in slot order;
/// INTx as the DSDT's _PRT routes it (see intx_route).
fn build_pci(
    vm: &Arc<VmFd>,
    devices: Vec<(PciSlot, PciEmulation)>,
    ram: &[Region],
    firmware: bool,
) -> Result<pci::PciBus> {
    let mut pci = pci::PciBus::new();
    let router = Arc::new(virtio::GsiRouter::new(vm.clone()));
    let mut shared_ram = None;
    for (n, (slot, e)) in devices.into_iter().enumerate() {
        let bar = PCI_MMIO_BASE + n as u64 * virtio::pci::BAR_SIZE;
        // The config holds at most MAX_DEVICES devices, whose BARs all fit
        // in the PCI hole below 4 GiB; the error is a safety net.
        let bar = u32::try_from(bar)
            .map_err(|_| Error::InvalidCommand("too many PCI devices for the PCI hole".into()))?;
        let source =
            u32::try_from(n).map_err(|_| Error::InvalidCommand("too many PCI devices".into()))?;
        let (pin, line) = intx_route(slot.slot, slot.func);
        let dev: Box<dyn virtio::VirtioDevice> = match e {
            PciEmulation::HostBridge => {
                pci.add(slot, pci::PciFunction::host_bridge());
                continue;
            }
            PciEmulation::Lpc => {
                pci.add(slot, pci::PciFunction::lpc());
                continue;
            }
            PciEmulation::Ahci(c) => {
                // Placed like a virtio device's BAR; 8 KiB fits the stride.
                let irq = Box::new(ahci::KvmIrq {
                    vm: vm.clone(),
                    line,
                });
                let mem = crate::memory::GuestMemory::new(ram.to_vec());
                pci.add(slot, ahci::function(c, mem, irq, bar, pin, line));
                continue;
            }
            PciEmulation::VirtioBlk(c) => {
                Box::new(virtio::blk::Blk::new(c).map_err(|e| Error::io("virtio-blk disk", e))?)
            }
            PciEmulation::VirtioNet(c) => Box::new(virtio::net::Net::new(c)),
            PciEmulation::VirtioRnd => Box::new(virtio::rng::Rng),
            PciEmulation::VirtioConsole(c) => Box::new(virtio::console::Console::new(c)),
        };
        let ram = match &shared_ram {
            Some(r) => Arc::clone(r),
            None => shared_ram.insert(Arc::new(virtio::Ram::new(ram)?)).clone(),
        };
        let name = format!("virtio@{}:{}.{}", slot.bus, slot.slot, slot.func);
        let placement = virtio::pci::Placement {
            bar_addr: bar,
            intx_pin: pin,
            intx_line: line,
            source,
        };
        let f = virtio::pci::VirtioPci::function(
            dev,
            name,
            vm.clone(),
            router.clone(),
            ram,
            placement,
        )?;
        pci.add(slot, f);
    }
    if firmware {
        add_firmware_functions(&mut pci);
    }
    Ok(pci)
}

/// The functions OVMF identifies the machine by: an i440FX host bridge, the
/// PIIX4 PM function at 0:1.3, a PIIX3 ISA bridge.
fn add_firmware_functions(pci: &mut pci::PciBus) {
    let at = |bus, slot, func| PciSlot { bus, slot, func };
    pci.add(at(0, 0, 0), pci::PciFunction::i440fx());
    if pci.has((0, 1, 3)) {
        log::warn!("0:1.3 is taken: UEFI firmware will not find its PM timer");
    } else {
        pci.add(at(0, 1, 3), pci::PciFunction::piix4_pm());
    }
    if !pci.has_id(0x8086, 0x7000) && !pci.has((0, 1, 0)) {
        pci.add(at(0, 1, 0), pci::PciFunction::lpc());
    }
}

/// COM1-COM4, on the bus where present; ports sharing an IRQ share its line.
fn serial_ports(
    vm: &Arc<VmFd>,
    outs: &[Option<Arc<OwnedFd>>; 4],
    events: &VmEvents,
    pio: &mut Bus,
) -> Result<[Arc<Mutex<SerialPort>>; 4]> {
    let present = com_present(&outs.each_ref().map(|o| o.is_some()));
    let lines: [Arc<IrqLine>; 4] =
        std::array::from_fn(|i| IrqLine::new(Some(vm.clone()), COM_PORTS[i].1));
    let com: [Arc<Mutex<SerialPort>>; 4] = std::array::from_fn(|i| {
        let first = COM_PORTS.iter().position(|p| p.1 == COM_PORTS[i].1);
        let line = lines[first.unwrap_or(i)].clone();
        let uart = serial::Serial::new(outs[i].clone(), events.clone());
        // i < 4.
        let index = u32::try_from(i).unwrap_or(u32::MAX);
        Arc::new(Mutex::new(SerialPort::new(uart, line, index)))
    });
    for (i, port) in com.iter().enumerate() {
        if present[i] {
            insert(pio, port.clone(), u64::from(COM_PORTS[i].0), 8)?;
        }
    }
    Ok(com)
}

fn insert(bus: &mut Bus, dev: SharedDevice, base: u64, len: u64) -> Result<()> {
    bus.insert(dev, base, len)
        .map_err(|e| Error::Unsupported(format!("device layout: {e}")))
}

impl Platform {
    pub fn new(vm: Arc<VmFd>, cfg: PlatformConfig, counters: Arc<Counters>) -> Result<Platform> {
        let started = Instant::now();
        let events = VmEvents::new();
        let pci = Arc::new(Mutex::new(build_pci(
            &vm,
            cfg.pci,
            &cfg.ram,
            cfg.firmware.is_some(),
        )?));
        let mut pio = Bus::new();
        let mut mmio = Bus::new();

        let com = serial_ports(&vm, &cfg.serial_out, &events, &mut pio)?;
        let sci = IrqLine::new(Some(vm.clone()), SCI_IRQ);
        let pm = Arc::new(Mutex::new(PmBlock::new(
            pm::Pm::new(events.clone()),
            sci,
            started,
        )));
        insert(&mut pio, pm.clone(), u64::from(PM1A_EVT), 12)?;
        let pci_io = PciConfigIo {
            pci: pci.clone(),
            events: events.clone(),
        };
        insert(&mut pio, Arc::new(Mutex::new(pci_io)), 0xcf8, 8)?;
        let (low, high) = ram_below_above_4g(&cfg.ram);
        let rtc = rtc::Rtc::new(cfg.rtc_utc, low, high);
        insert(
            &mut pio,
            Arc::new(Mutex::new(rtc)),
            u64::from(rtc::RTC_INDEX),
            2,
        )?;
        let kbd: SharedDevice = Arc::new(Mutex::new(I8042::new(
            events.clone(),
            cfg.firmware.is_some(),
        )));
        insert(&mut pio, kbd.clone(), 0x60, 1)?;
        insert(&mut pio, kbd, 0x64, 1)?;
        let timer = BootTimer { counters, started };
        insert(
            &mut pio,
            Arc::new(Mutex::new(timer)),
            u64::from(BOOT_TIMER_PORT),
            1,
        )?;

        let ecam = PciEcam { pci: pci.clone() };
        insert(&mut mmio, Arc::new(Mutex::new(ecam)), ECAM_BASE, ECAM_SIZE)?;
        if let Some(fw) = cfg.firmware {
            let mem = crate::memory::GuestMemory::new(cfg.ram.clone());
            let fwcfg = fwcfg::FwCfg::new(fw.fwcfg, mem);
            let (base, end) = (fwcfg::PORT_SELECTOR, fwcfg::PORT_DMA_END);
            let len = u64::from(end - base) + 1;
            insert(&mut pio, Arc::new(Mutex::new(fwcfg)), u64::from(base), len)?;
            if let Some(f) = fw.flash.map(flash::Flash::new) {
                let (gpa, len) = f.range();
                insert(&mut mmio, Arc::new(Mutex::new(f)), gpa, len)?;
            }
        }
        Ok(Platform {
            pio,
            mmio,
            pci,
            com,
            pm,
            events,
        })
    }

    /// Stop device threads (end of the run; vCPUs are already stopped).
    pub fn shutdown_devices(&self) {
        self.pci.lock().shutdown();
    }

    /// The run is stopping: device output that would block is dropped.
    /// Lock-free: a vCPU may hold a device lock while blocked in a write.
    pub fn set_stopping(&self) {
        self.events.set_stopping();
    }

    /// Room in a UART's receive FIFO.
    pub fn serial_space(&self, port: ComPort) -> usize {
        self.com[port as usize].lock().uart.rx_space()
    }

    /// Bytes arriving on a serial input descriptor.
    pub fn serial_input(&self, port: ComPort, bytes: &[u8]) -> usize {
        self.com[port as usize].lock().input(bytes)
    }

    /// The ACPI power button (the `poweroff` command).
    pub fn power_button(&self) {
        let mut pm = self.pm.lock();
        pm.pm.press_power_button();
        pm.update_sci();
    }

    /// A port read of `data.len()` bytes (1, 2 or 4; anything else reads ones).
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let size = data.len();
        if !matches!(size, 1 | 2 | 4) {
            data.fill(0xff);
            return;
        }
        if !self.pio.read(u64::from(port), data) {
            if !is_absent_probe(port) {
                log::debug!("unhandled read of port {port:#x} size {size}");
            }
            crate::bus::put_le(data, size_mask(size));
        }
    }

    /// A port write; returns an exit reason when the write stops the VM
    /// (a device asked for it through the events handle).
    pub fn io_out(&self, port: u16, data: &[u8]) -> Option<ExitReason> {
        let size = data.len();
        if !matches!(size, 1 | 2 | 4) {
            log::debug!("ignored {size}-byte write to port {port:#x}");
            return None;
        }
        // 0x80: POST codes; absent hardware: writes go nowhere.
        if !self.pio.write(u64::from(port), data) && port != 0x80 && !is_absent_probe(port) {
            let v = crate::bus::le_value(data);
            log::debug!("unhandled write of port {port:#x} size {size} value {v:#x}");
        }
        self.events.take_stop()
    }

    /// MMIO outside RAM: the ECAM window, the firmware's flash and PCI
    /// memory BARs; elsewhere reads return ones and writes are dropped.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) && !self.pci.lock().mmio(addr, data, false) {
            log::debug!("unhandled MMIO read {addr:#x} size {}", data.len());
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        if !self.mmio.write(addr, &buf[..n]) && !self.pci.lock().mmio(addr, &mut buf[..n], true) {
            log::debug!("unhandled MMIO write {addr:#x} size {}", data.len());
        }
    }
}

/// Guest RAM below and above 4 GiB, in bytes (for the RTC's CMOS).
fn ram_below_above_4g(ram: &[Region]) -> (u64, u64) {
    let low = ram.iter().filter(|r| r.gpa < 1 << 32).map(|r| r.len).sum();
    let high = ram.iter().filter(|r| r.gpa >= 1 << 32).map(|r| r.len).sum();
    (low, high)
}

#[cfg(test)]
mod tests;
