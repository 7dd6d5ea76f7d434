//! QEMU's firmware configuration interface (fw_cfg) at I/O ports
//! 0x510 (selector), 0x511 (data) and 0x514 (DMA address), as OVMF reads it:
//! the signature, the feature bitmap, the vCPU count, the RAM size, and named
//! files (e820 map, ACPI tables with their table-loader script) listed in the
//! file directory. FreeBSD's bhyve offers the same with `lpc.fwcfg=qemu`.
//!
//! Everything the guest sends is hostile: selectors are any 16-bit value,
//! reads past an item's end return zeros, and a DMA request is a 16-byte
//! structure at a guest-chosen address whose length and buffer address are
//! checked against guest RAM before anything is copied. Items are built by
//! the engine before the run; the guest can write none of them.

use crate::cast;
use crate::memory::GuestMemory;
use std::collections::BTreeMap;
use std::sync::Arc;

pub const PORT_SELECTOR: u16 = 0x510;
pub const PORT_DATA: u16 = 0x511;
/// The 64-bit big-endian DMA address register: 0x514 (high half), 0x518 (low).
pub const PORT_DMA: u16 = 0x514;
pub const PORT_DMA_END: u16 = 0x51b;

pub const KEY_SIGNATURE: u16 = 0x00;
pub const KEY_ID: u16 = 0x01;
pub const KEY_RAM_SIZE: u16 = 0x03;
pub const KEY_NB_CPUS: u16 = 0x05;
pub const KEY_MAX_CPUS: u16 = 0x0f;
pub const KEY_FILE_DIR: u16 = 0x19;
pub const KEY_FILE_FIRST: u16 = 0x20;
/// File names are NUL-terminated in a 56-byte field.
pub const FILE_NAME_MAX: usize = 55;
/// The engine makes a handful of files; a bound keeps the directory small.
pub const MAX_FILES: usize = 64;

/// Feature bitmap: traditional interface and DMA.
const FEATURES: u32 = 0b11;
/// What the DMA address register reads as: "QEMU CFG", big-endian.
const DMA_SIGNATURE: u64 = 0x5145_4d55_2043_4647;

const DMA_ERROR: u32 = 1 << 0;
const DMA_READ: u32 = 1 << 1;
const DMA_SKIP: u32 = 1 << 2;
const DMA_SELECT: u32 = 1 << 3;
const DMA_WRITE: u32 = 1 << 4;

/// The items, built once per run; cheap to clone.
#[derive(Clone, Default)]
pub struct FwCfgItems {
    items: BTreeMap<u16, Arc<[u8]>>,
    files: Vec<(String, u16)>,
}

impl FwCfgItems {
    /// The fixed items for `cpus` vCPUs and `ram` bytes of RAM.
    pub fn new(cpus: u16, ram: u64) -> FwCfgItems {
        let mut f = FwCfgItems::default();
        f.items.insert(KEY_SIGNATURE, Arc::from(&b"QEMU"[..]));
        f.items
            .insert(KEY_ID, Arc::from(&FEATURES.to_le_bytes()[..]));
        f.items
            .insert(KEY_RAM_SIZE, Arc::from(&ram.to_le_bytes()[..]));
        f.items
            .insert(KEY_NB_CPUS, Arc::from(&cpus.to_le_bytes()[..]));
        f.items
            .insert(KEY_MAX_CPUS, Arc::from(&cpus.to_le_bytes()[..]));
        f.update_dir();
        f
    }

    /// Add (or replace) the named file. Names longer than 55 bytes and more
    /// than [`MAX_FILES`] files are refused (false).
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> bool {
        if name.len() > FILE_NAME_MAX || name.contains('\0') {
            return false;
        }
        let key = match self.files.iter().find(|(n, _)| n == name) {
            Some((_, k)) => *k,
            None => {
                if self.files.len() >= MAX_FILES {
                    return false;
                }
                let Ok(n) = u16::try_from(self.files.len()) else {
                    return false;
                };
                let k = KEY_FILE_FIRST + n;
                self.files.push((name.to_string(), k));
                k
            }
        };
        self.items.insert(key, Arc::from(data));
        self.update_dir();
        true
    }

    /// The contents of a file, by name.
    pub fn file(&self, name: &str) -> Option<&[u8]> {
        let (_, k) = self.files.iter().find(|(n, _)| n == name)?;
        self.items.get(k).map(|d| &d[..])
    }

    /// The file directory item: a big-endian count, then 64-byte entries
    /// (size, selector, reserved, name), sorted by name as QEMU's.
    fn update_dir(&mut self) {
        let mut files = self.files.clone();
        files.sort();
        let mut dir = Vec::with_capacity(4 + 64 * files.len());
        // At most MAX_FILES files.
        dir.extend_from_slice(&u32::try_from(files.len()).unwrap_or(u32::MAX).to_be_bytes());
        for (name, key) in &files {
            let size = self.items.get(key).map_or(0, |d| d.len());
            // The directory's size field is 32 bits; the files are the e820
            // map and the ACPI blobs, a few KiB each.
            dir.extend_from_slice(&u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
            dir.extend_from_slice(&key.to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            dir.extend_from_slice(&n);
        }
        self.items.insert(KEY_FILE_DIR, Arc::from(dir));
    }
}

/// The device: a selected item and an offset into it.
pub struct FwCfg {
    items: FwCfgItems,
    mem: GuestMemory,
    selected: Option<Arc<[u8]>>,
    offset: usize,
    dma_high: u32,
}

impl FwCfg {
    pub fn new(items: FwCfgItems, mem: GuestMemory) -> FwCfg {
        FwCfg {
            items,
            mem,
            selected: None,
            offset: 0,
            dma_high: 0,
        }
    }

    /// Select an item; an unknown key selects nothing (reads give zeros).
    /// Bit 14 (write) and bit 15 (architecture) are part of the key: no
    /// item here has them, as writes through the data port are gone since
    /// QEMU 2.4 and there are no x86-specific items.
    fn select(&mut self, key: u16) {
        self.selected = self.items.items.get(&key).cloned();
        self.offset = 0;
    }

    fn read_byte(&mut self) -> u8 {
        let b = self
            .selected
            .as_ref()
            .and_then(|d| d.get(self.offset).copied());
        if b.is_some() {
            self.offset += 1;
        }
        b.unwrap_or(0)
    }

    /// A port read inside 0x510..=0x51b.
    pub fn io_read(&mut self, port: u16, size: usize) -> u32 {
        match port {
            // The data register is 8 bits wide; a wider read takes the
            // next bytes, as a memcpy would.
            PORT_DATA => {
                let mut v = 0u32;
                for i in 0..size.min(4) {
                    v |= u32::from(self.read_byte()) << (8 * i);
                }
                v
            }
            PORT_DMA..=PORT_DMA_END => {
                // Big-endian register: byte k of the signature is at 0x514 + k.
                let bytes = DMA_SIGNATURE.to_be_bytes();
                let mut v = 0u32;
                for i in 0..size.min(4) {
                    let k = usize::from(port - PORT_DMA) + i;
                    v |= u32::from(bytes.get(k).copied().unwrap_or(0)) << (8 * i);
                }
                v
            }
            _ => 0,
        }
    }

    /// A port write inside 0x510..=0x51b.
    pub fn io_write(&mut self, port: u16, size: usize, val: u32) {
        match (port, size) {
            (PORT_SELECTOR, 2) => self.select(cast::low_u16(u64::from(val))),
            // The high half of the address, then the low half starts the transfer.
            (PORT_DMA, 4) => self.dma_high = u32::from_be(val),
            (0x518, 4) => {
                let addr = (u64::from(self.dma_high) << 32) | u64::from(u32::from_be(val));
                self.dma_high = 0;
                self.dma(addr);
            }
            _ => log::debug!("fw_cfg: ignored {size}-byte write to {port:#x}"),
        }
    }

    /// Carry out the DMA request at guest address `addr`; the control word
    /// is written back (0, or the error bit).
    fn dma(&mut self, addr: u64) {
        let mut req = [0u8; 16];
        if self.mem.read(addr, &mut req).is_err() {
            log::debug!("fw_cfg: DMA request at {addr:#x} outside RAM");
            return;
        }
        let control = u32::from_be_bytes(req[0..4].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(req[4..8].try_into().expect("4 bytes")) as usize;
        let buf = u64::from_be_bytes(req[8..16].try_into().expect("8 bytes"));
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let ok = if control & DMA_READ != 0 {
            self.dma_read(buf, len)
        } else if control & DMA_WRITE != 0 {
            // No item is writable.
            false
        } else if control & DMA_SKIP != 0 {
            let end = self.selected.as_ref().map_or(0, |d| d.len());
            self.offset = self.offset.saturating_add(len).min(end);
            true
        } else {
            true
        };
        let done = if ok { 0u32 } else { DMA_ERROR };
        if self.mem.write(addr, &done.to_be_bytes()).is_err() {
            log::debug!("fw_cfg: cannot complete DMA request at {addr:#x}");
        }
    }

    /// Copy `len` bytes of the selected item to guest `buf`; past the item's
    /// end the buffer is zeroed, as QEMU does. The whole buffer must be RAM.
    fn dma_read(&mut self, buf: u64, len: usize) -> bool {
        let data = self.selected.clone();
        let avail = data
            .as_ref()
            .map_or(0, |d| d.len().saturating_sub(self.offset));
        let n = avail.min(len);
        if n > 0 {
            let d = data.as_ref().expect("avail > 0");
            if self
                .mem
                .write(buf, &d[self.offset..self.offset + n])
                .is_err()
            {
                return false;
            }
            self.offset += n;
        }
        if len > n {
            let Some(at) = buf.checked_add(n as u64) else {
                return false;
            };
            if self.mem.zero(at, len - n).is_err() {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Region;

    fn ram(buf: &mut [u8]) -> GuestMemory {
        GuestMemory::new(vec![Region {
            gpa: 0,
            len: buf.len() as u64,
            host: buf.as_mut_ptr() as usize,
        }])
    }

    fn read_item(dev: &mut FwCfg, key: u16, n: usize) -> Vec<u8> {
        dev.io_write(PORT_SELECTOR, 2, u32::from(key));
        (0..n)
            .map(|_| u8::try_from(dev.io_read(PORT_DATA, 1)).unwrap())
            .collect()
    }

    #[test]
    fn signature_features_and_directory() {
        let mut buf = vec![0u8; 4096];
        let mut items = FwCfgItems::new(2, 512 << 20);
        assert!(items.add_file("etc/e820", vec![1, 2, 3]));
        assert!(items.add_file("bootorder", b"/x\n".to_vec()));
        let mut dev = FwCfg::new(items, ram(&mut buf));
        assert_eq!(read_item(&mut dev, KEY_SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut dev, KEY_ID, 4), [3, 0, 0, 0]);
        assert_eq!(read_item(&mut dev, KEY_NB_CPUS, 2), [2, 0]);
        let dir = read_item(&mut dev, KEY_FILE_DIR, 4 + 128);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        // Sorted by name: bootorder first.
        assert_eq!(&dir[4..8], &[0, 0, 0, 3]);
        assert_eq!(&dir[8..10], &[0, 0x21]);
        assert_eq!(&dir[12..21], b"bootorder");
        assert_eq!(&dir[68..76], &[0, 0, 0, 3, 0, 0x20, 0, 0]);
        // Past the end and unknown keys read zeros.
        assert_eq!(read_item(&mut dev, 0x20, 5), [1, 2, 3, 0, 0]);
        assert_eq!(read_item(&mut dev, 0x7777, 2), [0, 0]);
        assert_eq!(dev.io_read(PORT_DMA, 4), u32::from_le_bytes(*b"QEMU"));
    }

    #[test]
    fn dma_read_skip_and_hostile_requests() {
        let mut buf = vec![0u8; 8192];
        let mut items = FwCfgItems::new(1, 1 << 20);
        items.add_file("f", (0..100u8).collect());
        let mem = ram(&mut buf);
        let mut dev = FwCfg::new(items, mem.clone());
        let req = |mem: &GuestMemory, at: u64, control: u32, len: u32, addr: u64| {
            let mut r = Vec::new();
            r.extend_from_slice(&control.to_be_bytes());
            r.extend_from_slice(&len.to_be_bytes());
            r.extend_from_slice(&addr.to_be_bytes());
            mem.write(at, &r).unwrap();
        };
        let go = |dev: &mut FwCfg, at: u32| {
            dev.io_write(PORT_DMA, 4, 0);
            dev.io_write(0x518, 4, at.to_be());
        };
        let control = |mem: &GuestMemory, at: u64| {
            let mut c = [0u8; 4];
            mem.read(at, &mut c).unwrap();
            u32::from_be_bytes(c)
        };
        // Select + skip 10, then read 95: 90 bytes of data, 5 zeros.
        mem.write(0x1000, &[0xaa; 200]).unwrap();
        req(&mem, 0x100, (0x20 << 16) | DMA_SELECT | DMA_SKIP, 10, 0);
        go(&mut dev, 0x100);
        assert_eq!(control(&mem, 0x100), 0);
        req(&mem, 0x100, DMA_READ, 95, 0x1000);
        go(&mut dev, 0x100);
        assert_eq!(control(&mem, 0x100), 0);
        let mut out = [0u8; 96];
        mem.read(0x1000, &mut out).unwrap();
        assert_eq!(out[0], 10);
        assert_eq!(out[89], 99);
        assert_eq!(&out[90..95], &[0; 5]);
        assert_eq!(out[95], 0xaa);
        // A buffer outside RAM, a huge length, a write: error bit, nothing copied.
        req(
            &mem,
            0x100,
            (0x20 << 16) | DMA_SELECT | DMA_READ,
            16,
            0xffff_0000,
        );
        go(&mut dev, 0x100);
        assert_eq!(control(&mem, 0x100), DMA_ERROR);
        req(&mem, 0x100, DMA_READ, u32::MAX, 0x1000);
        go(&mut dev, 0x100);
        assert_eq!(control(&mem, 0x100), DMA_ERROR);
        req(&mem, 0x100, DMA_WRITE, 4, 0x1000);
        go(&mut dev, 0x100);
        assert_eq!(control(&mem, 0x100), DMA_ERROR);
        // A request structure outside RAM (or straddling its end) is ignored.
        go(&mut dev, 0x1ff8);
        go(&mut dev, u32::MAX);
        dev.io_write(PORT_DMA, 4, u32::MAX);
        dev.io_write(0x518, 4, 0);
        // Odd widths and ports do nothing.
        dev.io_write(PORT_SELECTOR, 1, 5);
        dev.io_write(PORT_DATA, 4, 5);
    }

    #[test]
    fn file_limits() {
        let mut items = FwCfgItems::new(1, 0);
        assert!(!items.add_file(&"x".repeat(56), vec![]));
        for i in 0..MAX_FILES {
            assert!(items.add_file(&format!("f{i}"), vec![]));
        }
        assert!(!items.add_file("one-more", vec![]));
        assert!(items.add_file("f3", vec![1]));
        assert_eq!(items.file("f3"), Some(&[1u8][..]));
    }
}
