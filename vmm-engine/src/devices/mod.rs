//! The x86 platform's port-I/O and MMIO devices, and the dispatch of vCPU
//! I/O exits to them.
//!
//! Everything here faces the guest: ports, sizes and values are guest
//! controlled and are decoded without trusting any of them.

pub mod pci;
pub mod pm;
pub mod serial;

use crate::command::{ComPort, PciSlot};
use crate::vm::ExitReason;
use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use pm::{PM1A_CNT, PM1A_EVT, PM_TMR, SCI_IRQ};

/// COM1/COM2 I/O bases and ISA IRQs.
pub const COM_PORTS: [(u16, u32); 2] = [(0x3f8, 4), (0x2f8, 3)];
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
}

/// Emulation a `device` command may name, resolved at configuration time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PciEmulation {
    HostBridge,
    Lpc,
}

impl PciEmulation {
    /// Map a bhyve emulation name; virtio devices are not here yet.
    pub fn parse(name: &str) -> Option<PciEmulation> {
        match name {
            "hostbridge" | "amd_hostbridge" => Some(PciEmulation::HostBridge),
            "lpc" => Some(PciEmulation::Lpc),
            _ => None,
        }
    }
}

/// What the platform is built from at `run`.
pub struct PlatformConfig {
    pub serial_out: [Option<Arc<OwnedFd>>; 2],
    pub pci: Vec<(PciSlot, PciEmulation)>,
}

struct Devices {
    com: [serial::Serial; 2],
    pci: pci::PciBus,
    pm: pm::Pm,
}

/// All emulated devices of one run of a VM.
pub struct Platform {
    vm: Arc<VmFd>,
    devs: Mutex<Devices>,
    counters: Arc<Counters>,
    started: Instant,
    stopping: Arc<AtomicBool>,
}

fn size_mask(size: usize) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

impl Platform {
    pub fn new(vm: Arc<VmFd>, cfg: PlatformConfig, counters: Arc<Counters>) -> Platform {
        let [o1, o2] = cfg.serial_out;
        let stopping = Arc::new(AtomicBool::new(false));
        let mut pci = pci::PciBus::new();
        for (slot, e) in cfg.pci {
            let f = match e {
                PciEmulation::HostBridge => pci::PciFunction::host_bridge(),
                PciEmulation::Lpc => pci::PciFunction::lpc(),
            };
            pci.add(slot, f);
        }
        Platform {
            vm,
            devs: Mutex::new(Devices {
                com: [
                    serial::Serial::new(o1, stopping.clone()),
                    serial::Serial::new(o2, stopping.clone()),
                ],
                pci,
                pm: pm::Pm::new(),
            }),
            counters,
            started: Instant::now(),
            stopping,
        }
    }

    /// The run is stopping: device output that would block is dropped.
    /// Lock-free: a vCPU may hold the device lock while blocked in a write.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    fn set_irq(&self, irq: u32, level: bool) {
        if let Err(e) = self.vm.set_irq_line(irq, level) {
            log::debug!("KVM_IRQ_LINE {irq}={level}: {e}");
        }
    }

    /// Re-drive a UART's IRQ line if its interrupt state changed.
    fn update_serial_irq(&self, d: &mut Devices, i: usize) {
        let want = d.com[i].interrupt();
        if want != d.com[i].irq_level {
            d.com[i].irq_level = want;
            self.set_irq(COM_PORTS[i].1, want);
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
            if (base..base + 8).contains(&port) {
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
            // i8042: status "no data, input buffer empty"; data reads 0.
            0x60 | 0x64 => 0,
            _ => {
                log::debug!("unhandled read of port {port:#x} size {size}");
                size_mask(size)
            }
        }
    }

    /// A port write; returns an exit reason when the write stops the VM.
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
        let mut d = self.devs.lock();
        for (i, &(base, _)) in COM_PORTS.iter().enumerate() {
            if (base..base + 8).contains(&port) {
                for k in 0..size as u16 {
                    let off = port - base + k;
                    if off < 8 {
                        d.com[i].write(off, (v >> (8 * k)) as u8);
                    }
                }
                self.update_serial_irq(&mut d, i);
                return None;
            }
        }
        match port {
            RESET_PORT if size == 1 => {
                // Bit 2 starts the reset (0x6 = hard, 0xe = full).
                if v & 0x4 != 0 {
                    return Some(ExitReason::Reboot);
                }
            }
            0xcf8..=0xcff => d.pci.io_write(port, size, v),
            PM1A_EVT..=0x407 => {
                let r = d.pm.write(port, size, v);
                self.update_sci(&mut d);
                return r;
            }
            0x64 if v & 0xff == 0xfe => return Some(ExitReason::Reboot),
            BOOT_TIMER_PORT => {
                let us = self.started.elapsed().as_micros() as u64;
                let _ = self.counters.boot_time.compare_exchange(
                    0,
                    us + 1,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
            }
            0x80 => {} // POST codes
            _ => log::debug!("unhandled write of port {port:#x} size {size} value {v:#x}"),
        }
        None
    }

    /// MMIO: nothing is mapped outside RAM yet; reads return ones, writes are dropped.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!("unhandled MMIO read {addr:#x} size {}", data.len());
        data.fill(0xff);
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        log::debug!("unhandled MMIO write {addr:#x} size {}", data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_names() {
        assert_eq!(
            PciEmulation::parse("hostbridge"),
            Some(PciEmulation::HostBridge)
        );
        assert_eq!(PciEmulation::parse("lpc"), Some(PciEmulation::Lpc));
        assert_eq!(PciEmulation::parse("virtio-blk"), None);
    }
}
