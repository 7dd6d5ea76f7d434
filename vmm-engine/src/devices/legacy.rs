//! The PC's fixed port-I/O devices as [`BusDevice`]s, one lock each: the
//! UARTs, the ACPI PM block, the RTC, the i8042's reset line, the boot
//! timer, the fw_cfg ports and the PCI configuration ports. Values are
//! little-endian; accesses wider than a register touch the following
//! registers, as on ISA.

use super::pci::PciBus;
use super::{flash, fwcfg, pm, rtc, serial};
use crate::bus::{le_value, put_le, BusDevice};
use crate::cast;
use crate::events::Counters;
use crate::events::{ExitReason, VmEvents};
use kvm_ioctls::VmFd;
use parking_lot::Mutex;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use vm_superio::{I8042Device, Trigger};

/// Reset control register (PIIX), between the PCI address and data ports.
pub const RESET_PORT: u16 = 0xcf9;

/// An interrupt line shared by several sources (COM1 and COM3 on IRQ 4):
/// its level is theirs together.
pub struct IrqLine {
    vm: Option<Arc<VmFd>>,
    irq: u32,
    levels: Mutex<u32>,
}

impl IrqLine {
    /// `vm` None: a line that goes nowhere (tests).
    pub fn new(vm: Option<Arc<VmFd>>, irq: u32) -> Arc<IrqLine> {
        Arc::new(IrqLine {
            vm,
            irq,
            levels: Mutex::new(0),
        })
    }

    /// Source `bit` (0..32) changed to `level`: drive the line.
    pub fn set(&self, bit: u32, level: bool) {
        let mut l = self.levels.lock();
        if level {
            *l |= 1 << bit;
        } else {
            *l &= !(1 << bit);
        }
        if let Some(vm) = &self.vm {
            if let Err(e) = vm.set_irq_line(self.irq, *l != 0) {
                log::debug!("KVM_IRQ_LINE {}={}: {e}", self.irq, *l != 0);
            }
        }
    }

    #[cfg(test)]
    pub fn level(&self) -> bool {
        *self.levels.lock() != 0
    }
}

/// A 16550 at 8 ports, on its (possibly shared) IRQ line.
pub struct SerialPort {
    pub uart: serial::Serial,
    line: Arc<IrqLine>,
    bit: u32,
}

impl SerialPort {
    pub fn new(uart: serial::Serial, line: Arc<IrqLine>, bit: u32) -> SerialPort {
        SerialPort { uart, line, bit }
    }

    /// Re-drive the IRQ line if the UART's interrupt state changed.
    pub fn update_irq(&mut self) {
        let want = self.uart.interrupt();
        if want != self.uart.irq_level {
            self.uart.irq_level = want;
            self.line.set(self.bit, want);
        }
    }

    /// Bytes from the input descriptor; returns how many fit.
    pub fn input(&mut self, bytes: &[u8]) -> usize {
        let n = self.uart.push_input(bytes);
        self.update_irq();
        n
    }
}

/// The I/O port of an access to the PIO bus, whose addresses are 16-bit
/// ports (the low word is the port, as on the ISA bus).
fn pio_port(base: u64, offset: u64) -> u16 {
    cast::low_u16(base + offset)
}

impl BusDevice for SerialPort {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            let off = offset + k as u64;
            *b = if off < 8 {
                self.uart.read(cast::low_u16(off)) // off < 8
            } else {
                0xff
            };
        }
        self.update_irq();
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        for (k, b) in data.iter().enumerate() {
            let off = offset + k as u64;
            if off < 8 {
                self.uart.write(cast::low_u16(off), *b); // off < 8
            }
        }
        self.update_irq();
    }
}

/// The ACPI PM1a event/control blocks and PM timer (0x400-0x40b), on the SCI.
pub struct PmBlock {
    pub pm: pm::Pm,
    sci: Arc<IrqLine>,
    started: Instant,
}

impl PmBlock {
    pub fn new(pm: pm::Pm, sci: Arc<IrqLine>, started: Instant) -> PmBlock {
        PmBlock { pm, sci, started }
    }

    pub fn update_sci(&mut self) {
        let want = self.pm.sci();
        if want != self.pm.sci_level {
            self.pm.sci_level = want;
            self.sci.set(0, want);
        }
    }
}

impl BusDevice for PmBlock {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let port = pio_port(base, offset);
        put_le(data, self.pm.read(port, data.len(), self.started));
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let port = pio_port(base, offset);
        if port < pm::PM_TMR {
            self.pm.write(port, data.len(), le_value(data));
            self.update_sci();
        }
    }
}

impl BusDevice for rtc::Rtc {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        // Byte-wise, as on ISA; only single-byte accesses occur in practice.
        for (k, b) in data.iter_mut().enumerate() {
            *b = rtc::Rtc::read(self, pio_port(base, offset + k as u64));
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        for (k, b) in data.iter().enumerate() {
            rtc::Rtc::write(self, pio_port(base, offset + k as u64), *b);
        }
    }
}

impl BusDevice for fwcfg::FwCfg {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let v = self.io_read(pio_port(base, offset), data.len());
        put_le(data, v);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.io_write(pio_port(base, offset), data.len(), le_value(data));
    }
}

impl BusDevice for flash::Flash {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        flash::Flash::read(self, base + offset, data);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        flash::Flash::write(self, base + offset, data);
    }
}

/// The i8042's ports 0x60/0x64, served by vm-superio's `I8042Device`:
/// writing 0xfe to 0x64 pulses the reset line. Reads answer 0 ("no data,
/// input buffer empty"; the FADT does not announce an 8042 and the DSDT
/// has no PS/2 device, so OSes do not probe it; boot ROMs may still poll).
/// Under UEFI firmware the ports float, so OVMF's PS/2 driver gives up at
/// once instead of timing out on each command.
pub struct I8042 {
    floating: bool,
    dev: I8042Device<ResetLine>,
}

/// Where the i8042's ports start: vm-superio decodes offsets from here.
const I8042_BASE: u64 = 0x60;

/// The i8042's reset line: the guest asks for a reboot.
struct ResetLine(VmEvents);

impl Trigger for ResetLine {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.request_stop(ExitReason::Reboot);
        Ok(())
    }
}

impl I8042 {
    pub fn new(events: VmEvents, floating: bool) -> I8042 {
        I8042 {
            floating,
            dev: I8042Device::new(ResetLine(events)),
        }
    }

    /// The port's offset from 0x60, as vm-superio takes it (0 or 4 here).
    fn offset(base: u64, offset: u64) -> Option<u8> {
        let o = (base + offset).checked_sub(I8042_BASE)?;
        u8::try_from(o).ok()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let v = match I8042::offset(base, offset) {
            Some(o) if !self.floating => self.dev.read(o),
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let (Some(o), Some(&v)) = (I8042::offset(base, offset), data.first()) else {
            return;
        };
        // The reset line cannot fail (its error type has no value).
        let Ok(()) = self.dev.write(o, v);
    }
}

/// Firecracker-style boot timer: the first write marks "booted".
pub struct BootTimer {
    pub counters: Arc<Counters>,
    pub started: Instant,
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        let us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
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
}

/// PCI configuration mechanism #1 at 0xcf8-0xcff, with the PIIX reset
/// control register the chipset decodes at byte 0xcf9.
pub struct PciConfigIo {
    pub pci: Arc<Mutex<PciBus>>,
    pub events: VmEvents,
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let v = self.pci.lock().io_read(pio_port(base, offset), data.len());
        put_le(data, v);
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let port = pio_port(base, offset);
        if port == RESET_PORT && data.len() == 1 {
            // Bit 2 starts the reset (0x6 = hard, 0xe = full).
            if data[0] & 0x4 != 0 {
                self.events.request_stop(ExitReason::Reboot);
            }
            return;
        }
        self.pci.lock().io_write(port, data.len(), le_value(data));
    }
}

/// The ECAM window (PCIe enhanced configuration) on the MMIO bus.
pub struct PciEcam {
    pub pci: Arc<Mutex<PciBus>>,
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.pci.lock().ecam(offset, data, false);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut buf = [0u8; 8];
        let n = data.len().min(8);
        buf[..n].copy_from_slice(&data[..n]);
        self.pci.lock().ecam(offset, &mut buf[..n], true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_line_is_high_while_any_source_is() {
        let line = IrqLine::new(None, 4);
        line.set(0, true);
        line.set(2, true);
        line.set(0, false);
        assert!(line.level());
        line.set(2, false);
        assert!(!line.level());
    }

    #[test]
    fn reset_paths_request_a_reboot() {
        let events = VmEvents::new();
        let mut cf9 = PciConfigIo {
            pci: Arc::new(Mutex::new(PciBus::new())),
            events: events.clone(),
        };
        cf9.write(0xcf8, 1, &[0x2]);
        assert_eq!(events.take_stop(), None);
        cf9.write(0xcf8, 1, &[0x6]);
        assert_eq!(events.take_stop(), Some(ExitReason::Reboot));
        // The address latch is still reached by dword writes.
        cf9.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        cf9.read(0xcf8, 4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x1275_1275);
        let mut kbd = I8042::new(events.clone(), false);
        kbd.write(0x60, 0, &[0xfe]);
        assert_eq!(events.take_stop(), None);
        kbd.write(0x64, 0, &[0xfe]);
        assert_eq!(events.take_stop(), Some(ExitReason::Reboot));
        let mut status = [0xaa];
        kbd.read(0x64, 0, &mut status);
        assert_eq!(status, [0]);
        let mut floating = I8042::new(events.clone(), true);
        floating.read(0x60, 0, &mut status);
        assert_eq!(status, [0xff]);
        floating.write(0x64, 0, &[0xfe]);
        assert_eq!(events.take_stop(), Some(ExitReason::Reboot));
    }
}
