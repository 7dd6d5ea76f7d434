//! The UEFI variable store as a CFI (Intel command set) flash below the boot
//! ROM, as OVMF drives QEMU's pflash: reads come straight from a read-only
//! KVM memory slot while the flash is in read-array mode; every write exits
//! and is decoded as a command (program byte 0x10/0x40, block erase
//! 0x20 + 0xd0, clear status 0x50, read status 0x70, read array 0xff).
//! While the flash answers status reads the slot is removed, so reads exit
//! too. Programmed and erased bytes go to the memory copy and, when the
//! flash returns to read-array mode, to the user's VARS file: variables the
//! guest writes survive the VM.
//!
//! Guest input is the address and value of each write: offsets are checked
//! against the store's size, an erase covers one 4 KiB block, and nothing
//! is allocated per write.

use crate::cast;
use crate::memory::Mapping;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Erase granularity: OVMF's firmware block size.
pub const BLOCK: u64 = 4096;

const CMD_PROGRAM: u8 = 0x10;
const CMD_PROGRAM_ALT: u8 = 0x40;
const CMD_ERASE: u8 = 0x20;
const CMD_CLEAR_STATUS: u8 = 0x50;
const CMD_READ_STATUS: u8 = 0x70;
const CMD_CONFIRM: u8 = 0xd0;
const CMD_READ_ARRAY: u8 = 0xff;
/// Status register: write state machine ready.
const STATUS_READY: u8 = 0x80;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    ReadArray,
    Status,
    Program,
    EraseConfirm,
}

/// Where the store lives and what backs it.
pub struct FlashConfig {
    pub vm: Arc<VmFd>,
    pub slot: u32,
    pub gpa: u64,
    pub map: Arc<Mapping>,
    /// The user's VARS file; None keeps changes in memory only.
    pub file: Option<Arc<OwnedFd>>,
}

pub struct Flash {
    cfg: FlashConfig,
    mode: Mode,
    status: u8,
    /// The slot is mapped (read-array mode) as far as KVM knows.
    mapped: bool,
    /// Bytes changed since the last write-back: [lo, hi).
    dirty: Option<(u64, u64)>,
}

impl Flash {
    /// Map the store read-only at its address (read-array mode).
    pub fn new(cfg: FlashConfig) -> Flash {
        let mut f = Flash {
            cfg,
            mode: Mode::ReadArray,
            status: 0,
            mapped: false,
            dirty: None,
        };
        f.set_mapped(true);
        f
    }

    fn len(&self) -> u64 {
        self.cfg.map.len() as u64
    }

    /// The guest range of the store: (address, length).
    pub fn range(&self) -> (u64, u64) {
        (self.cfg.gpa, self.len())
    }

    /// The guest range of the store.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.cfg.gpa && addr - self.cfg.gpa < self.len()
    }

    fn set_mapped(&mut self, on: bool) {
        if self.mapped == on {
            return;
        }
        let region = kvm_userspace_memory_region {
            slot: self.cfg.slot,
            flags: if on { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: self.cfg.gpa,
            memory_size: if on { self.len() } else { 0 },
            userspace_addr: if on { self.cfg.map.addr() as u64 } else { 0 },
        };
        // SAFETY: the mapping is owned by this device's Arc and outlives the
        // slot: the VM (and its slots) goes before the mapping is dropped.
        match unsafe { self.cfg.vm.set_user_memory_region(region) } {
            Ok(()) => self.mapped = on,
            Err(e) => log::warn!(
                "flash: memory slot {}: {e}",
                if on { "map" } else { "unmap" }
            ),
        }
    }

    fn byte(&self, off: u64) -> u8 {
        // SAFETY: callers checked off < len; the mapping is live.
        unsafe { *((self.cfg.map.addr() as u64 + off) as *const u8) }
    }

    fn store(&mut self, off: u64, data: &[u8]) {
        let n = cast::usize_from((data.len() as u64).min(self.len() - off));
        // SAFETY: [off, off + n) lies inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.cfg.map.addr() as u64 + off) as *mut u8,
                n,
            )
        };
        self.mark(off, off + n as u64);
    }

    fn mark(&mut self, lo: u64, hi: u64) {
        self.dirty = Some(match self.dirty {
            None => (lo, hi),
            Some((a, b)) => (a.min(lo), b.max(hi)),
        });
    }

    /// Write the changed bytes back to the VARS file.
    fn write_back(&mut self) {
        let Some((lo, hi)) = self.dirty.take() else {
            return;
        };
        let Some(file) = &self.cfg.file else { return };
        let mut off = lo;
        while off < hi {
            // SAFETY: [off, hi) lies inside the mapping.
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    (self.cfg.map.addr() as u64 + off) as *const libc::c_void,
                    cast::usize_from(hi - off),
                    cast::off_t(off),
                )
            };
            if n <= 0 {
                let e = std::io::Error::last_os_error();
                if n < 0 && e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                log::warn!("flash: writing the variable store back: {e}");
                return;
            }
            off += cast::count(n) as u64; // n > 0 here
        }
    }

    fn enter(&mut self, mode: Mode) {
        self.mode = mode;
        if mode == Mode::ReadArray {
            self.write_back();
        }
        self.set_mapped(mode == Mode::ReadArray);
    }

    /// A read that exited: the slot is unmapped, so the flash is answering
    /// status (or the read raced a mode change: serve the array).
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let off = addr - self.cfg.gpa;
        for (i, b) in data.iter_mut().enumerate() {
            *b = match self.mode {
                Mode::ReadArray => {
                    let o = off + i as u64;
                    if o < self.len() {
                        self.byte(o)
                    } else {
                        0xff
                    }
                }
                _ => self.status,
            };
        }
    }

    /// A guest write: a command, or the data of a program command.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let off = addr - self.cfg.gpa;
        let Some(&cmd) = data.first() else { return };
        match self.mode {
            Mode::Program => {
                self.store(off, data);
                self.status |= STATUS_READY;
                self.enter(Mode::Status);
            }
            Mode::EraseConfirm => {
                if cmd == CMD_CONFIRM {
                    let start = off & !(BLOCK - 1);
                    let end = (start + BLOCK).min(self.len());
                    // SAFETY: [start, end) lies inside the mapping.
                    unsafe {
                        std::ptr::write_bytes(
                            (self.cfg.map.addr() as u64 + start) as *mut u8,
                            0xff,
                            cast::usize_from(end - start),
                        )
                    };
                    self.mark(start, end);
                    self.status |= STATUS_READY;
                } else {
                    // A sequence error: erase and program error bits.
                    self.status |= STATUS_READY | 0x30;
                }
                self.enter(Mode::Status);
            }
            Mode::ReadArray | Mode::Status => match cmd {
                CMD_PROGRAM | CMD_PROGRAM_ALT => self.enter(Mode::Program),
                CMD_ERASE => self.enter(Mode::EraseConfirm),
                CMD_CLEAR_STATUS => {
                    self.status = 0;
                    self.enter(Mode::ReadArray);
                }
                CMD_READ_STATUS => self.enter(Mode::Status),
                CMD_READ_ARRAY => self.enter(Mode::ReadArray),
                other => {
                    log::debug!("flash: unsupported command {other:#x} at {off:#x}");
                    self.enter(Mode::ReadArray);
                }
            },
        }
    }
}

impl Drop for Flash {
    fn drop(&mut self) {
        self.write_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd;
    use std::os::unix::fs::FileExt;

    /// A flash of `blocks` 4 KiB blocks over a file holding `fill`.
    fn flash(blocks: u64, fill: u8) -> (Flash, std::fs::File) {
        let kvm = kvm_ioctls::Kvm::new().expect("KVM must be available for engine tests");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let size = blocks * BLOCK;
        let file = memfd("vars", size).unwrap();
        let f = std::fs::File::from(file.try_clone().unwrap());
        f.write_all_at(&vec![fill; cast::usize_from(size)], 0)
            .unwrap();
        let mfd = memfd("copy", size).unwrap();
        let map = Arc::new(Mapping::shared(&mfd, size).unwrap());
        // SAFETY: the mapping is `size` bytes.
        unsafe { std::ptr::write_bytes(map.addr() as *mut u8, fill, cast::usize_from(size)) };
        let fl = Flash::new(FlashConfig {
            vm,
            slot: 3,
            gpa: 0xffc0_0000,
            map,
            file: Some(Arc::new(file)),
        });
        (fl, f)
    }

    fn rd(f: &mut Flash, off: u64) -> u8 {
        let mut b = [0u8];
        f.read(0xffc0_0000 + off, &mut b);
        b[0]
    }

    fn wr(f: &mut Flash, off: u64, v: u8) {
        f.write(0xffc0_0000 + off, &[v]);
    }

    /// OVMF's QemuFlashDetected: clear status reads the array back, read
    /// status gives 0, a program of the same byte reports no error.
    #[test]
    fn ovmf_detects_a_flash() {
        let (mut f, _) = flash(2, 0x5a);
        wr(&mut f, 0, CMD_CLEAR_STATUS);
        assert_eq!(rd(&mut f, 0), 0x5a, "clear status returns to read array");
        wr(&mut f, 0, CMD_READ_STATUS);
        assert_eq!(rd(&mut f, 0), 0x00, "cleared status");
        assert!(!f.mapped, "status reads must exit");
        wr(&mut f, 0, CMD_PROGRAM);
        wr(&mut f, 0, 0x5a);
        wr(&mut f, 0, CMD_READ_STATUS);
        assert_eq!(rd(&mut f, 0) & 0x10, 0, "no program error");
        wr(&mut f, 0, CMD_READ_ARRAY);
        assert!(f.mapped);
    }

    #[test]
    fn program_and_erase_go_back_to_the_file() {
        let (mut f, file) = flash(2, 0xff);
        for (i, b) in b"boot1".iter().enumerate() {
            wr(&mut f, 100 + i as u64, CMD_PROGRAM);
            wr(&mut f, 100 + i as u64, *b);
        }
        wr(&mut f, 104, CMD_READ_ARRAY);
        let mut back = [0u8; 5];
        file.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(&back, b"boot1");
        // Erase the second block: 0xff there, the first one untouched.
        wr(&mut f, BLOCK + 17, CMD_ERASE);
        wr(&mut f, BLOCK + 17, CMD_CONFIRM);
        wr(&mut f, BLOCK, CMD_READ_ARRAY);
        assert_eq!(rd(&mut f, BLOCK + 5), 0xff);
        file.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(&back, b"boot1");
    }

    /// Writes anywhere, of any width, in any order: no panic, and the
    /// flash comes back to read-array mode.
    #[test]
    fn hostile_writes() {
        let (mut f, _) = flash(1, 0);
        let end = 0xffc0_0000 + BLOCK;
        for v in 0..=255u8 {
            for off in [0, 1, BLOCK - 1] {
                f.write(0xffc0_0000 + off, &[v]);
                f.write(0xffc0_0000 + off, &[v, v, v, v, v, v, v, v]);
                let mut b = [0u8; 8];
                f.read(0xffc0_0000 + off, &mut b);
            }
        }
        // A program of 8 bytes at the last byte stores only what fits.
        wr(&mut f, 0, CMD_READ_ARRAY);
        f.write(end - 1, &[CMD_PROGRAM]);
        f.write(end - 1, &[1, 2, 3, 4, 5, 6, 7, 8]);
        f.write(end - 1, &[CMD_ERASE]);
        f.write(end - 1, &[0x00]); // not a confirm: a sequence error
        f.write(end - 1, &[CMD_READ_STATUS]);
        assert_eq!(rd(&mut f, BLOCK - 1) & 0x30, 0x30);
        f.write(end - 1, &[CMD_READ_ARRAY]);
        assert!(f.mapped);
        assert!(!f.contains(end) && f.contains(end - 1));
    }
}
