//! PCI configuration space through mechanism #1 (ports 0xcf8/0xcfc).
//! Functions present: a host bridge at 0:0.0 and whatever `device` added.
//! Offsets and sizes come from the guest and are checked on every access.

use crate::command::PciSlot;
use std::collections::BTreeMap;

/// Standard 256-byte configuration space of one function.
pub struct PciFunction {
    cfg: [u8; 256],
    /// Bits the guest may change.
    wmask: [u8; 256],
}

impl PciFunction {
    fn new(vendor: u16, device: u16, class: u8, subclass: u8) -> PciFunction {
        let mut f = PciFunction {
            cfg: [0; 256],
            wmask: [0; 256],
        };
        f.cfg[0..2].copy_from_slice(&vendor.to_le_bytes());
        f.cfg[2..4].copy_from_slice(&device.to_le_bytes());
        f.cfg[0x0a] = subclass;
        f.cfg[0x0b] = class;
        // Command: I/O, memory, bus master, SERR, INTx disable.
        f.wmask[4] = 0x47;
        f.wmask[5] = 0x05;
        // Interrupt line is scratch for the OS.
        f.wmask[0x3c] = 0xff;
        f
    }

    /// The host bridge bhyve emulates (vendor/device 0x1275).
    pub fn host_bridge() -> PciFunction {
        PciFunction::new(0x1275, 0x1275, 0x06, 0x00)
    }

    /// An LPC/ISA bridge as bhyve's `lpc` (Intel 82371SB PIIX3 ids).
    pub fn lpc() -> PciFunction {
        PciFunction::new(0x8086, 0x7000, 0x06, 0x01)
    }

    fn read(&self, off: usize, size: usize) -> u32 {
        let mut v = 0u32;
        for i in 0..size {
            v |= u32::from(self.cfg[off + i]) << (8 * i);
        }
        v
    }

    fn write(&mut self, off: usize, size: usize, val: u32) {
        for i in 0..size {
            let b = (val >> (8 * i)) as u8;
            let m = self.wmask[off + i];
            self.cfg[off + i] = (self.cfg[off + i] & !m) | (b & m);
        }
    }
}

/// The configuration-space address decoder and the functions behind it.
pub struct PciBus {
    addr: u32,
    functions: BTreeMap<(u8, u8, u8), PciFunction>,
}

impl PciBus {
    pub fn new() -> PciBus {
        let mut functions = BTreeMap::new();
        functions.insert((0, 0, 0), PciFunction::host_bridge());
        PciBus { addr: 0, functions }
    }

    /// Place `f` at `slot`, replacing what was there.
    pub fn add(&mut self, slot: PciSlot, f: PciFunction) {
        self.functions.insert((slot.bus, slot.slot, slot.func), f);
    }

    /// Decode the latched address plus the data-port byte offset into
    /// (function, register offset), if enabled and in range.
    fn target(&self, port_off: u16, size: usize) -> Option<((u8, u8, u8), usize)> {
        if self.addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (self.addr >> 16) as u8;
        let slot = ((self.addr >> 11) & 0x1f) as u8;
        let func = ((self.addr >> 8) & 0x7) as u8;
        let off = (self.addr & 0xfc) as usize + usize::from(port_off);
        // An access must stay inside one dword of the 256-byte space.
        if port_off > 3 || usize::from(port_off) + size > 4 || off + size > 256 {
            return None;
        }
        Some(((bus, slot, func), off))
    }

    /// Read from port 0xcf8..=0xcff; `size` is 1, 2 or 4.
    pub fn io_read(&self, port: u16, size: usize) -> u32 {
        let ones = if size >= 4 {
            u32::MAX
        } else {
            (1u32 << (8 * size)) - 1
        };
        match port {
            0xcf8 if size == 4 => self.addr,
            0xcfc..=0xcff => match self.target(port - 0xcfc, size) {
                Some((bdf, off)) => self
                    .functions
                    .get(&bdf)
                    .map(|f| f.read(off, size))
                    .unwrap_or(ones),
                None => ones,
            },
            _ => ones,
        }
    }

    /// Write to port 0xcf8..=0xcff.
    pub fn io_write(&mut self, port: u16, size: usize, val: u32) {
        match port {
            // Only dword accesses reach the address latch (byte 0xcf9 is the
            // reset control register, handled by the platform).
            0xcf8 if size == 4 => self.addr = val & 0x80ff_fffc,
            0xcfc..=0xcff => {
                if let Some((bdf, off)) = self.target(port - 0xcfc, size) {
                    if let Some(f) = self.functions.get_mut(&bdf) {
                        f.write(off, size, val);
                    }
                }
            }
            _ => {}
        }
    }
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_bridge_and_empty_slots() {
        let mut bus = PciBus::new();
        bus.io_write(0xcf8, 4, 0x8000_0000);
        assert_eq!(bus.io_read(0xcfc, 4), 0x1275_1275);
        assert_eq!(bus.io_read(0xcfe, 2), 0x1275);
        bus.io_write(0xcf8, 4, 0x8000_0800);
        assert_eq!(bus.io_read(0xcfc, 4), 0xffff_ffff);
        // Disabled: all ones.
        bus.io_write(0xcf8, 4, 0);
        assert_eq!(bus.io_read(0xcfc, 4), 0xffff_ffff);
    }

    #[test]
    fn hostile_offsets() {
        let mut bus = PciBus::new();
        bus.io_write(0xcf8, 4, 0x8000_00fc);
        assert_eq!(bus.io_read(0xcff, 4), u32::MAX);
        assert_eq!(bus.io_read(0xcfd, 4), u32::MAX);
        assert_eq!(bus.io_read(0xcff, 1), 0);
        bus.io_write(0xcff, 4, 0xdead_beef);
        bus.io_write(0xcfe, 8, 0xdead_beef);
        // Read-only ids stay.
        bus.io_write(0xcf8, 4, 0x8000_0000);
        bus.io_write(0xcfc, 4, 0);
        assert_eq!(bus.io_read(0xcfc, 4), 0x1275_1275);
        // Command register is writable within its mask.
        bus.io_write(0xcf8, 4, 0x8000_0004);
        bus.io_write(0xcfc, 2, 0xffff);
        assert_eq!(bus.io_read(0xcfc, 2), 0x0547);
    }
}
