//! The x86 platform's port-I/O and MMIO devices, and the dispatch of vCPU
//! I/O exits to them.
//!
//! Everything here faces the guest: ports, sizes and values are guest
//! controlled and are decoded without trusting any of them.

pub mod ahci;
pub mod flash;
pub mod fwcfg;
pub mod pci;
pub mod pm;
pub mod rtc;
pub mod serial;
pub mod virtio;

use crate::command::{ComPort, PciSlot};
use crate::error::{Error, Result};
use crate::events::{ExitReason, VmEvents};
use crate::memory::Region;
use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use pm::{PM1A_CNT, PM1A_EVT, PM_TMR, SCI_IRQ};

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
/// Reset control register (PIIX).
pub const RESET_PORT: u16 = 0xcf9;

/// Counters visible in status text, shared with the VM.
#[derive(Default, Debug)]
pub struct Counters {
    /// Total vCPU exits to user space.
    pub exits: AtomicU64,
    /// Microseconds from `run` to the first boot-timer write, plus one (0 = not marked).
    pub boot_time: AtomicU64,
    /// Port-I/O exits (each costs a round trip to user space; a boot should make few).
    pub io_exits: AtomicU64,
    /// `io_exits` when the boot timer was first written, plus one (0 = not marked).
    pub boot_io_exits: AtomicU64,
}

/// Emulation a `device` command may name, resolved at configuration time
/// (descriptors are taken then and kept across runs).
#[derive(Debug, Clone)]
pub enum PciEmulation {
    HostBridge,
    Lpc,
    VirtioBlk(virtio::blk::BlkConfig),
    VirtioNet(virtio::net::NetConfig),
    VirtioRnd,
    VirtioConsole(virtio::console::ConsoleConfig),
    Ahci(ahci::AhciConfig),
}

/// First address of the window BARs are placed in before the guest moves
/// them (the PCI hole starts at 3 GiB).
pub const PCI_MMIO_BASE: u64 = 0xc000_0000;
/// PCIe enhanced configuration (ECAM), described by the MCFG, for bus 0
/// only: the one bus there is (no bridges). An MCFG reaching further makes
/// Linux's peer-bridge fixup probe every slot of every bus through ports
/// 0xcf8/0xcfc (16,000 port exits of boot time).
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = 1 << 20;

fn bad(msg: String) -> Error {
    Error::InvalidCommand(msg)
}

impl PciEmulation {
    /// Map a bhyve emulation name without options (tests, simple devices).
    pub fn parse(name: &str) -> Option<PciEmulation> {
        match name {
            "hostbridge" | "amd_hostbridge" => Some(PciEmulation::HostBridge),
            "lpc" => Some(PciEmulation::Lpc),
            "virtio-rnd" => Some(PciEmulation::VirtioRnd),
            _ => None,
        }
    }

    /// Resolve `device SLOT EMULATION OPTIONS`: descriptors (`fd=N`) are
    /// taken through `take`. `vm` and `slot` seed the default MAC.
    pub fn configure(
        vm: &str,
        slot: &str,
        emulation: &str,
        options: &[String],
        take: &mut dyn FnMut(i32) -> Result<OwnedFd>,
    ) -> Result<PciEmulation> {
        let kv: Vec<(&str, Option<&str>)> = options
            .iter()
            .map(|o| match o.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (o.as_str(), None),
            })
            .collect();
        let get = |k: &str| kv.iter().find(|(x, _)| *x == k).and_then(|(_, v)| *v);
        let has = |k: &str| kv.iter().any(|(x, _)| *x == k);
        let fd_num = |s: &str| -> Result<i32> {
            s.parse::<i32>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| bad(format!("{emulation}: bad descriptor '{s}'")))
        };
        let need_fd = || get("fd").ok_or_else(|| bad(format!("{emulation}: fd=N required")));
        let known = |list: &[&str]| {
            for (k, _) in &kv {
                if !list.contains(k) {
                    log::warn!("{emulation}: option '{k}' ignored");
                }
            }
        };
        Ok(match emulation {
            "hostbridge" | "amd_hostbridge" => PciEmulation::HostBridge,
            "lpc" => PciEmulation::Lpc,
            "virtio-rnd" => PciEmulation::VirtioRnd,
            "virtio-blk" => {
                known(&[
                    "fd",
                    "ro",
                    "sectorsize",
                    "nocache",
                    "direct",
                    "sync",
                    "nodelete",
                ]);
                let sector_size = match get("sectorsize") {
                    None => None,
                    Some(s) => {
                        let l = s.split('/').next().unwrap_or("");
                        match l.parse::<u32>() {
                            Ok(n) if n.is_power_of_two() && (512..=32768).contains(&n) => Some(n),
                            _ => return Err(bad(format!("virtio-blk: bad sectorsize '{s}'"))),
                        }
                    }
                };
                // Options are checked before the descriptor is taken.
                let file = take(fd_num(need_fd()?)?)?;
                // A descriptor opened read-only makes a read-only disk even
                // without `ro` (writes would fail anyway).
                // SAFETY: F_GETFL on a descriptor we own.
                let fl =
                    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GETFL) };
                let ro = has("ro") || (fl >= 0 && fl & libc::O_ACCMODE == libc::O_RDONLY);
                PciEmulation::VirtioBlk(virtio::blk::BlkConfig {
                    file: Arc::new(file),
                    ro,
                    sector_size,
                    discard: !has("nodelete"),
                })
            }
            "virtio-net" => {
                known(&["fd", "slirp", "tap", "mac", "mtu", "open", "hostfwd"]);
                let backend = if has("slirp") {
                    virtio::net::NetBackend::Slirp
                } else if has("tap") {
                    virtio::net::NetBackend::Tap
                } else {
                    return Err(bad("virtio-net: backend slirp or tap required".into()));
                };
                let mac = match get("mac") {
                    Some(m) => virtio::net::parse_mac(m)
                        .ok_or_else(|| bad(format!("virtio-net: bad mac '{m}'")))?,
                    None => virtio::net::default_mac(vm, slot),
                };
                let fd = take(fd_num(need_fd()?)?)?;
                PciEmulation::VirtioNet(virtio::net::NetConfig {
                    backend,
                    fd: Arc::new(fd),
                    mac,
                })
            }
            "virtio-console" => {
                known(&["fd"]);
                let spec = need_fd()?;
                let (input, output) = match spec.split_once(':') {
                    Some((i, o)) => {
                        let (i, o) = (fd_num(i)?, fd_num(o)?);
                        let a = Arc::new(take(i)?);
                        let b = if o == i {
                            a.clone()
                        } else {
                            Arc::new(take(o)?)
                        };
                        (a, b)
                    }
                    None => {
                        let a = Arc::new(take(fd_num(spec)?)?);
                        (a.clone(), a)
                    }
                };
                PciEmulation::VirtioConsole(virtio::console::ConsoleConfig { input, output })
            }
            "ahci" | "ahci-hd" | "ahci-cd" => {
                PciEmulation::Ahci(ahci::AhciConfig::configure(emulation, options, take)?)
            }
            "passthru" => {
                return Err(Error::Unsupported(
                    "PCI passthrough needs an IOMMU; this engine cannot assign devices".into(),
                ))
            }
            other => return Err(Error::Unsupported(format!("device emulation '{other}'"))),
        })
    }
}

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

struct Devices {
    com: [serial::Serial; 4],
    com_present: [bool; 4],
    pci: pci::PciBus,
    pm: pm::Pm,
    rtc: rtc::Rtc,
    fwcfg: Option<fwcfg::FwCfg>,
    flash: Option<flash::Flash>,
}

/// All emulated devices of one run of a VM.
pub struct Platform {
    vm: Arc<VmFd>,
    devs: Mutex<Devices>,
    counters: Arc<Counters>,
    started: Instant,
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

impl Platform {
    pub fn new(vm: Arc<VmFd>, cfg: PlatformConfig, counters: Arc<Counters>) -> Result<Platform> {
        let com_present = com_present(&cfg.serial_out.each_ref().map(|o| o.is_some()));
        let [o1, o2, o3, o4] = cfg.serial_out;
        let events = VmEvents::new();
        let mut pci = pci::PciBus::new();
        let router = Arc::new(virtio::GsiRouter::new(vm.clone()));
        let mut ram = None;
        for (n, (slot, e)) in cfg.pci.into_iter().enumerate() {
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
                    let bar = PCI_MMIO_BASE + n as u64 * virtio::pci::BAR_SIZE;
                    let (pin, line) = intx_route(slot.slot, slot.func);
                    let irq = Box::new(ahci::KvmIrq {
                        vm: vm.clone(),
                        line,
                    });
                    let mem = crate::memory::GuestMemory::new(cfg.ram.clone());
                    pci.add(slot, ahci::function(c, mem, irq, bar as u32, pin, line));
                    continue;
                }
                PciEmulation::VirtioBlk(c) => {
                    Box::new(virtio::blk::Blk::new(c).map_err(|e| Error::io("virtio-blk disk", e))?)
                }
                PciEmulation::VirtioNet(c) => Box::new(virtio::net::Net::new(c)),
                PciEmulation::VirtioRnd => Box::new(virtio::rng::Rng),
                PciEmulation::VirtioConsole(c) => Box::new(virtio::console::Console::new(c)),
            };
            let ram = match &ram {
                Some(r) => Arc::clone(r),
                None => ram.insert(Arc::new(virtio::Ram::new(&cfg.ram)?)).clone(),
            };
            // BARs start out one per 16 KiB in the PCI hole, in slot order;
            // INTx as the DSDT's _PRT routes it (see intx_route).
            let bar = PCI_MMIO_BASE + n as u64 * virtio::pci::BAR_SIZE;
            let (pin, line) = intx_route(slot.slot, slot.func);
            let name = format!("virtio@{}:{}.{}", slot.bus, slot.slot, slot.func);
            let f = virtio::pci::VirtioPci::function(
                dev,
                name,
                vm.clone(),
                router.clone(),
                ram,
                virtio::pci::Placement {
                    bar_addr: bar as u32,
                    intx_pin: pin,
                    intx_line: line,
                    source: n as u32,
                },
            )?;
            pci.add(slot, f);
        }
        let (fwcfg, flash) = match cfg.firmware {
            Some(fw) => {
                pci.add(
                    PciSlot {
                        bus: 0,
                        slot: 0,
                        func: 0,
                    },
                    pci::PciFunction::i440fx(),
                );
                let pm_at = (0, 1, 3);
                if pci.has(pm_at) {
                    log::warn!("0:1.3 is taken: UEFI firmware will not find its PM timer");
                } else {
                    pci.add(
                        PciSlot {
                            bus: 0,
                            slot: 1,
                            func: 3,
                        },
                        pci::PciFunction::piix4_pm(),
                    );
                }
                if !pci.has_id(0x8086, 0x7000) && !pci.has((0, 1, 0)) {
                    pci.add(
                        PciSlot {
                            bus: 0,
                            slot: 1,
                            func: 0,
                        },
                        pci::PciFunction::lpc(),
                    );
                }
                let mem = crate::memory::GuestMemory::new(cfg.ram.clone());
                (
                    Some(fwcfg::FwCfg::new(fw.fwcfg, mem)),
                    fw.flash.map(flash::Flash::new),
                )
            }
            None => (None, None),
        };
        let low: u64 = cfg
            .ram
            .iter()
            .filter(|r| r.gpa < 1 << 32)
            .map(|r| r.len)
            .sum();
        let high: u64 = cfg
            .ram
            .iter()
            .filter(|r| r.gpa >= 1 << 32)
            .map(|r| r.len)
            .sum();
        Ok(Platform {
            vm,
            devs: Mutex::new(Devices {
                com: [
                    serial::Serial::new(o1, events.clone()),
                    serial::Serial::new(o2, events.clone()),
                    serial::Serial::new(o3, events.clone()),
                    serial::Serial::new(o4, events.clone()),
                ],
                com_present,
                pci,
                pm: pm::Pm::new(events.clone()),
                rtc: rtc::Rtc::new(cfg.rtc_utc, low, high),
                fwcfg,
                flash,
            }),
            counters,
            started: Instant::now(),
            events,
        })
    }

    /// Stop device threads (end of the run; vCPUs are already stopped).
    pub fn shutdown_devices(&self) {
        self.devs.lock().pci.shutdown();
    }

    /// The run is stopping: device output that would block is dropped.
    /// Lock-free: a vCPU may hold the device lock while blocked in a write.
    pub fn set_stopping(&self) {
        self.events.set_stopping();
    }

    fn set_irq(&self, irq: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(irq, level) {
            log::debug!("KVM_IRQ_LINE {irq}={level}: {e}");
        }
    }

    /// Re-drive a UART's IRQ line if its interrupt state changed.
    /// The line is shared with the other port on the same IRQ: its level
    /// is theirs together.
    fn update_serial_irq(&self, d: &mut Devices, i: usize) {
        let want = d.com[i].interrupt();
        if want != d.com[i].irq_level {
            d.com[i].irq_level = want;
            let irq = COM_PORTS[i].1;
            let level =
                (0..4).any(|j| d.com_present[j] && COM_PORTS[j].1 == irq && d.com[j].irq_level);
            self.set_irq(irq, level);
        }
    }

    fn update_sci(&self, d: &mut Devices) {
        let want = d.pm.sci();
        if want != d.pm.sci_level {
            d.pm.sci_level = want;
            self.set_irq(SCI_IRQ, want);
        }
    }

    /// Room in a UART's receive FIFO.
    pub fn serial_space(&self, port: ComPort) -> usize {
        self.devs.lock().com[port as usize].rx_space()
    }

    /// Bytes arriving on a serial input descriptor.
    pub fn serial_input(&self, port: ComPort, bytes: &[u8]) -> usize {
        let mut d = self.devs.lock();
        let i = port as usize;
        let n = d.com[i].push_input(bytes);
        self.update_serial_irq(&mut d, i);
        n
    }

    /// The ACPI power button (the `poweroff` command).
    pub fn power_button(&self) {
        let mut d = self.devs.lock();
        d.pm.press_power_button();
        self.update_sci(&mut d);
    }

    /// A port read of `data.len()` bytes (1, 2 or 4; anything else reads ones).
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let size = data.len();
        let v = if matches!(size, 1 | 2 | 4) {
            self.read_port(port, size)
        } else {
            u32::MAX
        };
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i < 4 { (v >> (8 * i)) as u8 } else { 0xff };
        }
    }

    fn read_port(&self, port: u16, size: usize) -> u32 {
        let mut d = self.devs.lock();
        for (i, &(base, _)) in COM_PORTS.iter().enumerate() {
            if d.com_present[i] && (base..base + 8).contains(&port) {
                // A wider access touches consecutive registers, as on ISA.
                let mut v = 0u32;
                for k in 0..size as u16 {
                    let off = port - base + k;
                    let b = if off < 8 { d.com[i].read(off) } else { 0xff };
                    v |= u32::from(b) << (8 * k);
                }
                self.update_serial_irq(&mut d, i);
                return v;
            }
        }
        match port {
            0xcf8..=0xcff => d.pci.io_read(port, size),
            PM1A_EVT..=0x407 => d.pm.read(port, size, self.started),
            PM_TMR..=0x40b => d.pm.read(port, size, self.started),
            rtc::RTC_INDEX | rtc::RTC_DATA => {
                // Byte-wise, as on ISA; only single-byte accesses occur in practice.
                let mut v = 0u32;
                for k in 0..size as u16 {
                    v |= u32::from(d.rtc.read(port + k)) << (8 * k);
                }
                v
            }
            fwcfg::PORT_SELECTOR..=fwcfg::PORT_DMA_END if d.fwcfg.is_some() => {
                d.fwcfg.as_mut().map_or(0, |f| f.io_read(port, size))
            }
            // No i8042 under UEFI firmware: the port floats, so OVMF's PS/2
            // driver gives up at once instead of timing out on each command.
            0x60 | 0x64 if d.fwcfg.is_some() => size_mask(size),
            // i8042: status "no data, input buffer empty"; data reads 0. The
            // FADT does not announce an 8042, so OSes do not probe it; boot
            // ROMs may still poll the status.
            0x60 | 0x64 => 0,
            p if is_absent_probe(p) => size_mask(size),
            _ => {
                log::debug!("unhandled read of port {port:#x} size {size}");
                size_mask(size)
            }
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
        let mut v = 0u32;
        for (i, b) in data.iter().enumerate() {
            v |= u32::from(*b) << (8 * i);
        }
        self.write_port(port, size, v);
        self.events.take_stop()
    }

    fn write_port(&self, port: u16, size: usize, v: u32) {
        let mut d = self.devs.lock();
        for (i, &(base, _)) in COM_PORTS.iter().enumerate() {
            if d.com_present[i] && (base..base + 8).contains(&port) {
                for k in 0..size as u16 {
                    let off = port - base + k;
                    if off < 8 {
                        d.com[i].write(off, (v >> (8 * k)) as u8);
                    }
                }
                self.update_serial_irq(&mut d, i);
                return;
            }
        }
        match port {
            RESET_PORT if size == 1 => {
                // Bit 2 starts the reset (0x6 = hard, 0xe = full).
                if v & 0x4 != 0 {
                    self.events.request_stop(ExitReason::Reboot);
                }
            }
            0xcf8..=0xcff => d.pci.io_write(port, size, v),
            PM1A_EVT..=0x407 => {
                d.pm.write(port, size, v);
                self.update_sci(&mut d);
            }
            rtc::RTC_INDEX | rtc::RTC_DATA => {
                for k in 0..size as u16 {
                    d.rtc.write(port + k, (v >> (8 * k)) as u8);
                }
            }
            0x64 if v & 0xff == 0xfe => self.events.request_stop(ExitReason::Reboot),
            fwcfg::PORT_SELECTOR..=fwcfg::PORT_DMA_END if d.fwcfg.is_some() => {
                if let Some(f) = d.fwcfg.as_mut() {
                    f.io_write(port, size, v);
                }
            }
            BOOT_TIMER_PORT => {
                let us = self.started.elapsed().as_micros() as u64;
                if self
                    .counters
                    .boot_time
                    .compare_exchange(0, us + 1, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    let exits = self.counters.io_exits.load(Ordering::Relaxed);
                    self.counters
                        .boot_io_exits
                        .store(exits + 1, Ordering::Release);
                }
            }
            0x80 => {} // POST codes
            p if is_absent_probe(p) => {}
            _ => log::debug!("unhandled write of port {port:#x} size {size} value {v:#x}"),
        }
    }

    /// MMIO outside RAM: the ECAM window and PCI memory BARs; elsewhere
    /// reads return ones and writes are dropped.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(f) = self.devs.lock().flash.as_mut().filter(|f| f.contains(addr)) {
            f.read(addr, data);
            return;
        }
        if let Some(off) = addr.checked_sub(ECAM_BASE).filter(|o| *o < ECAM_SIZE) {
            self.devs.lock().pci.ecam(off, data, false);
            return;
        }
        if !self.devs.lock().pci.mmio(addr, data, false) {
            log::debug!("unhandled MMIO read {addr:#x} size {}", data.len());
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        if let Some(f) = self.devs.lock().flash.as_mut().filter(|f| f.contains(addr)) {
            f.write(addr, &buf[..n]);
            return;
        }
        if let Some(off) = addr.checked_sub(ECAM_BASE).filter(|o| *o < ECAM_SIZE) {
            self.devs.lock().pci.ecam(off, &mut buf[..n], true);
            return;
        }
        if !self.devs.lock().pci.mmio(addr, &mut buf[..n], true) {
            log::debug!("unhandled MMIO write {addr:#x} size {}", data.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_names() {
        assert!(matches!(
            PciEmulation::parse("hostbridge"),
            Some(PciEmulation::HostBridge)
        ));
        assert!(matches!(
            PciEmulation::parse("lpc"),
            Some(PciEmulation::Lpc)
        ));
        assert!(PciEmulation::parse("virtio-blk").is_none());
    }
}
