//! PCI configuration space through mechanism #1 (ports 0xcf8/0xcfc), BARs
//! (sized and placed by the guest) and the MMIO dispatch to functions'
//! memory BARs. Functions present: a host bridge at 0:0.0 and whatever
//! `device` added. Offsets and sizes come from the guest and are checked on
//! every access.

use crate::cast;
use crate::command::PciSlot;
use std::collections::BTreeMap;

/// Offset of the first BAR register.
pub const BAR0: usize = 0x10;
/// Capabilities start here (after the standard header).
const CAP_START: usize = 0x40;

fn size_ones(size: usize) -> u32 {
    if size >= 4 {
        u32::MAX
    } else {
        (1u32 << (8 * size)) - 1
    }
}

/// Standard 256-byte configuration space of one function.
pub struct PciFunction {
    pub(crate) cfg: [u8; 256],
    /// Bits the guest may change.
    pub(crate) wmask: [u8; 256],
    /// Sizes of 32-bit memory BARs (0: no BAR).
    bar_sizes: [u64; 6],
    /// Where the next capability goes.
    cap_next: usize,
    /// The device behind this function's BARs (virtio transport, AHCI), if any.
    pub(crate) dev: Option<Box<dyn PciDevice>>,
}

/// A device behind a function: its memory BARs, and the configuration
/// space it follows (BAR placement, memory decoding, MSI/MSI-X control,
/// INTx disable). The bus knows devices only as `dyn PciDevice`.
/// Offsets are inside the BAR; sizes 1 to 8.
pub trait PciDevice: Send {
    fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]);
    /// The guest wrote configuration space, which is now `cfg`.
    fn config_written(&mut self, cfg: &[u8; 256]);
    /// End of a run: stop the device's threads.
    fn shutdown(&mut self) {}
}

/// Guest-programmed address of 32-bit memory BAR `idx` in `cfg`.
pub fn cfg_bar_addr(cfg: &[u8; 256], idx: usize) -> u64 {
    let off = BAR0 + 4 * idx;
    let mut b = [0u8; 4];
    b.copy_from_slice(&cfg[off..off + 4]);
    u64::from(u32::from_le_bytes(b) & 0xffff_fff0)
}

/// Memory decoding on in `cfg` (command register bit 1).
pub fn cfg_mem_enabled(cfg: &[u8; 256]) -> bool {
    cfg[4] & 2 != 0
}

/// A capability pointer: an offset in the 256-byte configuration space
/// (add_cap checks off + len <= 256). 0, the list's end, is unreachable.
fn cfg_ptr(off: usize) -> u8 {
    u8::try_from(off).unwrap_or(0)
}

impl PciFunction {
    pub(crate) fn new(vendor: u16, device: u16, class: u8, subclass: u8) -> PciFunction {
        let mut f = PciFunction {
            cfg: [0; 256],
            wmask: [0; 256],
            bar_sizes: [0; 6],
            cap_next: CAP_START,
            dev: None,
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

    /// The Intel 82441FX (i440FX) host bridge: OVMF identifies the
    /// platform by this id at 0:0.0 and stops on any it does not know.
    pub fn i440fx() -> PciFunction {
        PciFunction::new(0x8086, 0x1237, 0x06, 0x00)
    }

    /// The PIIX4 power-management function OVMF looks for at 0:1.3: its
    /// PM base (0x40) already holds the engine's fixed ACPI block and
    /// PMIOSE (0x80 bit 0) is set, read-only, so firmware keeps using
    /// ports 0x400-0x40b (the PM timer at 0x408) instead of moving them.
    pub fn piix4_pm() -> PciFunction {
        let mut f = PciFunction::new(0x8086, 0x7113, 0x06, 0x80);
        let pmba = u32::from(super::pm::PM1A_EVT) | 1;
        f.cfg[0x40..0x44].copy_from_slice(&pmba.to_le_bytes());
        f.cfg[0x80] = 1;
        f
    }

    /// A 32-bit, non-prefetchable memory BAR of `size` bytes (a power of two,
    /// at least 16) at `addr`. The write mask makes BAR sizing work: writing
    /// all ones reads back the size mask.
    pub(crate) fn set_mem_bar(&mut self, idx: usize, size: u64, addr: u32) {
        let off = BAR0 + 4 * idx;
        // 32-bit BARs: the size is a power of two below 4 GiB (BAR_SIZE).
        let mask = !(cast::low_u32(size) - 1) & 0xffff_fff0;
        self.cfg[off..off + 4].copy_from_slice(&(addr & mask).to_le_bytes());
        self.wmask[off..off + 4].copy_from_slice(&mask.to_le_bytes());
        self.bar_sizes[idx] = size;
    }

    /// Guest-programmed address of memory BAR `idx`.
    pub(crate) fn bar_addr(&self, idx: usize) -> u64 {
        cfg_bar_addr(&self.cfg, idx)
    }

    pub(crate) fn bar_size(&self, idx: usize) -> u64 {
        self.bar_sizes[idx]
    }

    /// Memory decoding on (command register bit 1).
    pub(crate) fn mem_enabled(&self) -> bool {
        cfg_mem_enabled(&self.cfg)
    }

    /// Append a capability (its first byte is the id; the next-pointer byte
    /// is filled in); returns its offset, None when the space is full.
    pub(crate) fn add_cap(&mut self, body: &[u8]) -> Option<usize> {
        let off = self.cap_next;
        let len = (body.len() + 3) & !3;
        if body.len() < 2 || off + len > 256 {
            return None;
        }
        self.cfg[off..off + body.len()].copy_from_slice(body);
        self.cfg[off + 1] = 0;
        // Link: the header's pointer for the first one, else the previous cap's.
        if off == CAP_START {
            self.cfg[0x34] = cfg_ptr(off);
            self.cfg[6] |= 0x10; // status: capabilities list
        } else {
            let mut p = usize::from(self.cfg[0x34]);
            while self.cfg[p + 1] != 0 {
                p = usize::from(self.cfg[p + 1]);
            }
            self.cfg[p + 1] = cfg_ptr(off);
        }
        self.cap_next = off + len;
        Some(off)
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
            let b = cast::byte(u64::from(val), i);
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

    /// Whether a function sits at `bdf`.
    pub fn has(&self, bdf: (u8, u8, u8)) -> bool {
        self.functions.contains_key(&bdf)
    }

    /// Whether any function has the given vendor and device id.
    pub fn has_id(&self, vendor: u16, device: u16) -> bool {
        self.functions.values().any(|f| {
            f.cfg[0..4]
                == [
                    vendor.to_le_bytes()[0],
                    vendor.to_le_bytes()[1],
                    device.to_le_bytes()[0],
                    device.to_le_bytes()[1],
                ]
        })
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
        let bus = self.addr.to_le_bytes()[2];
        let slot = ((self.addr >> 11) & 0x1f) as u8;
        let func = ((self.addr >> 8) & 0x7) as u8;
        let off = (self.addr & 0xfc) as usize + usize::from(port_off);
        // An access must stay inside one dword of the 256-byte space.
        if port_off > 3 || usize::from(port_off) + size > 4 || off + size > 256 {
            return None;
        }
        Some(((bus, slot, func), off))
    }

    /// Read `size` (1, 2 or 4) bytes of a function's configuration space;
    /// all ones where no function is, zeros beyond the 256-byte header
    /// (no extended capabilities). The caller checked that the access stays
    /// inside one dword.
    pub fn config_read(&self, bdf: (u8, u8, u8), off: usize, size: usize) -> u32 {
        match self.functions.get(&bdf) {
            None => size_ones(size),
            Some(_) if off + size > 256 => 0,
            Some(f) => f.read(off, size),
        }
    }

    /// Write a function's configuration space (see `config_read`).
    pub fn config_write(&mut self, bdf: (u8, u8, u8), off: usize, size: usize, val: u32) {
        if off + size > 256 {
            return;
        }
        if let Some(f) = self.functions.get_mut(&bdf) {
            f.write(off, size, val);
            if let Some(d) = f.dev.as_mut() {
                d.config_written(&f.cfg);
            }
        }
    }

    /// Read from port 0xcf8..=0xcff; `size` is 1, 2 or 4.
    pub fn io_read(&self, port: u16, size: usize) -> u32 {
        match port {
            0xcf8 if size == 4 => self.addr,
            0xcfc..=0xcff => match self.target(port - 0xcfc, size) {
                Some((bdf, off)) => self.config_read(bdf, off, size),
                None => size_ones(size),
            },
            _ => size_ones(size),
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
                    self.config_write(bdf, off, size, val);
                }
            }
            _ => {}
        }
    }

    /// An access at byte `off` of the ECAM window (PCIe enhanced
    /// configuration: bus << 20 | slot << 15 | func << 12 | register).
    /// Accesses must be 1, 2 or 4 bytes inside one dword; others read ones
    /// and write nothing.
    pub fn ecam(&mut self, off: u64, data: &mut [u8], write: bool) {
        let size = data.len();
        let reg = (off & 0xfff) as usize;
        let bdf = (
            cast::low_u8(off >> 20),
            ((off >> 15) & 0x1f) as u8,
            ((off >> 12) & 0x7) as u8,
        );
        let aligned = matches!(size, 1 | 2 | 4) && reg % 4 + size <= 4;
        if write {
            if aligned {
                let mut v = 0u32;
                for (i, b) in data.iter().enumerate() {
                    v |= u32::from(*b) << (8 * i);
                }
                self.config_write(bdf, reg, size, v);
            }
        } else {
            let v = if aligned {
                self.config_read(bdf, reg, size)
            } else {
                u32::MAX
            };
            for (i, b) in data.iter_mut().enumerate() {
                *b = if i < 4 { v.to_le_bytes()[i] } else { 0xff };
            }
        }
    }

    /// An MMIO access outside RAM: find the function whose enabled memory
    /// BAR contains it. False when nothing decodes the address.
    pub fn mmio(&mut self, addr: u64, data: &mut [u8], write: bool) -> bool {
        for f in self.functions.values_mut() {
            if !f.mem_enabled() {
                continue;
            }
            for idx in 0..6 {
                let size = f.bar_size(idx);
                let base = f.bar_addr(idx);
                if size == 0 || base == 0 || addr < base || addr - base >= size {
                    continue;
                }
                let off = addr - base;
                if off + data.len() as u64 > size {
                    // Straddles the BAR's end: decode nothing.
                    return false;
                }
                if let Some(d) = f.dev.as_mut() {
                    if write {
                        d.bar_write(idx, off, data);
                    } else {
                        d.bar_read(idx, off, data);
                    }
                    return true;
                }
            }
        }
        false
    }

    /// Stop every device thread (end of a run).
    pub fn shutdown(&mut self) {
        for f in self.functions.values_mut() {
            if let Some(d) = f.dev.as_mut() {
                d.shutdown();
            }
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
    fn ecam_reaches_the_same_functions() {
        let mut bus = PciBus::new();
        let mut d = [0u8; 4];
        bus.ecam(0, &mut d, false);
        assert_eq!(u32::from_le_bytes(d), 0x1275_1275);
        // Slot 1 is empty; an extended register of the host bridge reads 0.
        bus.ecam(1 << 15, &mut d, false);
        assert_eq!(u32::from_le_bytes(d), u32::MAX);
        bus.ecam(0x100, &mut d, false);
        assert_eq!(u32::from_le_bytes(d), 0);
        // A write through ECAM is seen through the ports, within the mask.
        bus.ecam(4, &mut [0xff, 0xff], true);
        bus.io_write(0xcf8, 4, 0x8000_0004);
        assert_eq!(bus.io_read(0xcfc, 2), 0x0547);
        // Misaligned and oversized accesses: ones, no effect.
        let mut odd = [0u8; 4];
        bus.ecam(2, &mut odd, false);
        assert_eq!(odd, [0xff; 4]);
        let mut big = [0u8; 8];
        bus.ecam(0, &mut big, false);
        assert_eq!(big, [0xff; 8]);
        bus.ecam(0x3d, &mut [0xff, 0xff], true);
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
